// Host side of a launch, shared by csrc/cuda/*.cu: the runtime calls a launcher needs before the launch itself, made
// once instead of on every call. Torch-free.
//
// A launch that takes more than 48 KB of dynamic shared memory must first raise the kernel's limit
// (cudaFuncSetAttribute, per device), and a launch that sizes its grid from the occupancy (the persistent GRU's
// plan) asks cudaOccupancyMaxActiveBlocksPerMultiprocessor. The first needs doing once per (device, kernel) and
// largest size, the second's answer depends only on the device, the kernel, the block size and the shared memory;
// yet the launchers run on every call: a GRU cell's every step, a decoding step's attention. fit_kernel keeps both
// in two small tables.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <mutex>
#include <vector>

namespace pyattn {
namespace cuda {

namespace launch_detail {
struct Limit {  // the dynamic shared-memory limit a kernel was raised to on a device
  int device;
  const void* kernel;
  size_t smem;
};
struct Occupancy {  // blocks of `threads` threads with `smem` bytes an SM holds at once
  int device;
  const void* kernel;
  size_t smem;
  int threads;
  int per_sm;
};
// (kernels x devices, and x shared-memory sizes in use for the occupancy: a handful; the cap only bounds a program
// that sweeps shapes)
constexpr size_t kMaxEntries = 256;
struct Table {
  std::mutex mutex;
  std::vector<Limit> limits;
  std::vector<Occupancy> occupancy;
};
inline Table& table() {
  static Table t;
  return t;
}
}  // namespace launch_detail

// Readies `kernel` for a launch with `smem` bytes of dynamic shared memory on the current device: raises its limit
// when smem is above 48 KB and above what it was raised to before (the limit only ever rises: lowering it for a
// smaller launch would refuse a larger one that a remembered answer let through); with per_sm, also stores how many
// blocks of `threads` threads an SM holds at once (remembered per (device, kernel, smem, threads)). Errors are
// returned, never remembered.
template <class Kernel>
cudaError_t fit_kernel(Kernel* kernel, size_t smem, int threads = 0, int* per_sm = nullptr) {
  using namespace launch_detail;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const void* key = reinterpret_cast<const void*>(kernel);
  Table& t = table();
  // (held across the runtime calls of a miss: two threads raising one kernel's limit must not leave the smaller)
  std::lock_guard<std::mutex> lock(t.mutex);
  if (smem > 48 * 1024) {
    Limit* known = nullptr;
    for (Limit& l : t.limits)
      if (l.device == device && l.kernel == key) known = &l;
    if (known == nullptr || known->smem < smem) {
      err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
      if (err != cudaSuccess) return err;
      if (known != nullptr)
        known->smem = smem;
      else if (t.limits.size() < kMaxEntries)
        t.limits.push_back(Limit{device, key, smem});
    }
  }
  if (per_sm == nullptr) return cudaSuccess;
  for (const Occupancy& o : t.occupancy)
    if (o.device == device && o.kernel == key && o.smem == smem && o.threads == threads) {
      *per_sm = o.per_sm;
      return cudaSuccess;
    }
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(per_sm, kernel, threads, smem);
  if (err != cudaSuccess) return err;
  if (t.occupancy.size() < kMaxEntries) t.occupancy.push_back(Occupancy{device, key, smem, threads, *per_sm});
  return cudaSuccess;
}

}  // namespace cuda
}  // namespace pyattn
