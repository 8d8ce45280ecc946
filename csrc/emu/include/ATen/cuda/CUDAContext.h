// CUDA emulator stand-in (csrc/emu/cuda_emu.h): the emulated device is an sm_90 part (227 KiB opt-in shared memory).
#pragma once
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

namespace at {
namespace cuda {
inline cudaDeviceProp* getDeviceProperties(int64_t) {
  static cudaDeviceProp prop;
  return &prop;
}
using c10::cuda::getCurrentCUDAStream;
}  // namespace cuda
}  // namespace at
