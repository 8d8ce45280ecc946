// CUDA emulator stand-in (csrc/emu/cuda_emu.h): the emulated device is an sm_90 part (227 KiB opt-in shared memory).
#pragma once
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <cstdlib>

namespace at {
namespace cuda {
// PYATTN_EMU_SMS: the emulated device's SM count (default 132), which tests shrink so that a persistent kernel's
// blocks take several tiles each.
inline cudaDeviceProp* getDeviceProperties(int64_t) {
  static cudaDeviceProp prop;
  const char* sms = std::getenv("PYATTN_EMU_SMS");
  prop.multiProcessorCount = sms != nullptr ? std::atoi(sms) : 132;
  return &prop;
}
using c10::cuda::getCurrentCUDAStream;
}  // namespace cuda
}  // namespace at
