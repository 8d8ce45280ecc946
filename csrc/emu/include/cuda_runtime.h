// CUDA emulator stand-in for <cuda_runtime.h> (csrc/emu/cuda_emu.h).
#pragma once
#include "../cuda_emu.h"
