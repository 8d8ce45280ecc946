// CUDA emulator stand-in (csrc/emu/cuda_emu.h): launches run synchronously, the stream is a null handle.
#pragma once
#include <cuda_runtime_api.h>

namespace c10 {
namespace cuda {
struct CUDAStream {
  operator cudaStream_t() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(int = -1) { return CUDAStream{}; }
}  // namespace cuda
}  // namespace c10
