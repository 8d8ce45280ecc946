// CUDA emulator stand-in for <cuda_runtime_api.h> (csrc/emu/cuda_emu.h).
#pragma once
#include "../cuda_emu.h"
