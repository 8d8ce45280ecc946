// CUDA emulator stand-in (csrc/emu/cuda_emu.h): the emulated device is an sm_90 part (227 KiB opt-in shared memory).
#pragma once
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <cstdlib>

namespace at {
namespace cuda {
// PYATTN_EMU_SMS: the emulated device's SM count (default 132, ::pyattn_emu::sm_count()), which tests shrink so that
// a persistent kernel's blocks take several tiles each. PYATTN_EMU_SMEM_OPTIN: the opt-in shared memory per block
// that the properties report (bytes, default 227 KiB; the launch limit stays 227 KiB), which tests shrink so that
// the GRU's persistent kernels stage the batch in several chunks. PYATTN_EMU_L2: the L2 cache size (bytes, default
// 50 MiB, an H100's / H200's), which tests shrink so that causal attention grids group their heads in several
// L2 sections.
inline cudaDeviceProp* getDeviceProperties(int64_t) {
  static cudaDeviceProp prop;
  prop.multiProcessorCount = ::pyattn_emu::sm_count();
  const char* l2 = std::getenv("PYATTN_EMU_L2");
  prop.l2CacheSize = l2 != nullptr ? std::atoi(l2) : 50 * 1024 * 1024;
  const char* optin = std::getenv("PYATTN_EMU_SMEM_OPTIN");
  prop.sharedMemPerBlockOptin = optin != nullptr ? size_t(std::atol(optin)) : size_t(227 * 1024);
  return &prop;
}
using c10::cuda::getCurrentCUDAStream;
}  // namespace cuda
}  // namespace at
