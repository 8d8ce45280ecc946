// CUDA emulator stand-in for <cuda_fp16.h> (csrc/emu/cuda_emu.h).
#pragma once
#include "../cuda_emu.h"
