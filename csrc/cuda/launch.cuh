// Host side of a launch, shared by csrc/cuda/*.cu: the runtime calls a launcher needs before the launch itself,
// done once per (device, kernel, dynamic shared memory) instead of on every call. Torch-free.
//
// A launch that takes more than 48 KB of dynamic shared memory must first raise the kernel's limit
// (cudaFuncSetAttribute, per device), and a launch that sizes its grid from the occupancy (the persistent GRU's
// plan) asks cudaOccupancyMaxActiveBlocksPerMultiprocessor. Both answers depend only on the device, the kernel and
// the shared memory, yet the launchers run on every call: a GRU cell's every step, a decoding step's attention.
// fit_kernel keeps them in one small table.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <mutex>
#include <vector>

namespace pyattn {
namespace cuda {

namespace launch_detail {
struct Fit {
  int device;
  const void* kernel;
  size_t smem;
  int threads;  // 0: no occupancy asked
  int per_sm;
};
// (kernels x devices x shared-memory sizes in use: a handful; the cap only bounds a program that sweeps shapes)
constexpr size_t kMaxFits = 256;
inline std::mutex& fits_mutex() {
  static std::mutex m;
  return m;
}
inline std::vector<Fit>& fits() {
  static std::vector<Fit> v;
  return v;
}
}  // namespace launch_detail

// Readies `kernel` for a launch with `smem` bytes of dynamic shared memory on the current device: raises its limit
// when smem > 48 KB; with per_sm, also stores how many blocks of `threads` threads an SM holds at once. The first
// successful answer for a (device, kernel, smem, threads) is remembered; an error is returned, never remembered.
template <class Kernel>
cudaError_t fit_kernel(Kernel* kernel, size_t smem, int threads = 0, int* per_sm = nullptr) {
  using launch_detail::Fit;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const void* key = reinterpret_cast<const void*>(kernel);
  const int asked = per_sm != nullptr ? threads : 0;
  {
    std::lock_guard<std::mutex> lock(launch_detail::fits_mutex());
    for (const Fit& f : launch_detail::fits())
      if (f.device == device && f.kernel == key && f.smem == smem && f.threads == asked) {
        if (per_sm != nullptr) *per_sm = f.per_sm;
        return cudaSuccess;
      }
  }
  if (smem > 48 * 1024) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (err != cudaSuccess) return err;
  }
  int n = 0;
  if (per_sm != nullptr) {
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, threads, smem);
    if (err != cudaSuccess) return err;
    *per_sm = n;
  }
  std::lock_guard<std::mutex> lock(launch_detail::fits_mutex());
  if (launch_detail::fits().size() < launch_detail::kMaxFits)
    launch_detail::fits().push_back(Fit{device, key, smem, asked, n});
  return cudaSuccess;
}

}  // namespace cuda
}  // namespace pyattn
