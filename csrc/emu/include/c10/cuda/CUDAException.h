// CUDA emulator stand-in (csrc/emu/cuda_emu.h): a failed launch raises with the emulator's account of it.
#pragma once
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

#define C10_CUDA_CHECK(EXPR)                                                                              \
  do {                                                                                                    \
    const cudaError_t pyattn_emu_err_ = (EXPR);                                                           \
    TORCH_CHECK(pyattn_emu_err_ == cudaSuccess, "CUDA error (emulated): ", cudaGetErrorString(pyattn_emu_err_)); \
  } while (0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() C10_CUDA_CHECK(cudaGetLastError())
