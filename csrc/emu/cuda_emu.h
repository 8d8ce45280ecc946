// pyattn's CUDA emulator: runs csrc/cuda/*.cu unchanged (bar the PYATTN_CUDA_EMU branches of the inline PTX) on the
// CPU, so that the CUDA kernels and their bindings are tested on machines without a GPU (tests/test_cuda_emu.py).
// Built by scripts/cuda_emu.py, which turns `k<<<grid, block, smem, stream>>>(args)` into
// `::pyattn_emu::launch(k, grid, block, smem, stream)(args)` and `extern __shared__ T name[];` into a pointer to the
// launch's dynamic shared memory, then compiles everything as C++ with csrc/emu/include first on the include path
// (its cuda_runtime.h, cuda_fp16.h, c10/cuda/... headers all come here).
//
// Execution model (what it checks is in docs/design.md, "CUDA emulator"):
// - blocks run one after another; the threads of a block are fibers (ucontext) scheduled cooperatively: each runs
//   until it reaches __syncthreads(), a warp collective (shuffle, ldmatrix, mma, wgmma), an mbarrier wait that cannot
//   pass yet, or its end. The next thread to run
//   is the lowest-numbered ready one, the highest, or a random one (PYATTN_EMU_ORDER=forward|reverse|random): the
//   first two let one warp run as far ahead of the others as the barriers allow, so a missing barrier shows up as a
//   wrong result in at least one order.
// - a cooperative launch (cudaLaunchCooperativeKernel) keeps every block of the grid alive at once, each with its own
//   threads, warps, barriers and shared memory, so that grid_sync (the grid-wide barrier) works: forward / reverse
//   run the blocks in increasing / decreasing order, each until all its threads have exited or wait at grid_sync
//   (its threads in the order above), random runs one random ready thread of a random block at a time; grid_sync
//   releases when every thread of the grid waits at it, at one source line. Each thread has its own 256 KiB stack
//   (address space, touched lazily), so keep cooperative grids in tests small (PYATTN_EMU_SMS). `__shared__`
//   variables are statics, one for all blocks: a cooperative kernel must keep its shared memory dynamic.
// - warp collectives need all 32 lanes (full mask, blockDim a multiple of 32) and the same instruction; the last
//   lane to arrive computes the result for all. ldmatrix / mma follow the PTX ISA fragment layouts.
// - cp.async copies land at the cp.async.wait_group that covers them (PYATTN_EMU_CP_ASYNC=late, the default: the
//   latest moment hardware may complete them, so a read before the wait sees stale data) or at issue (early: a copy
//   into a buffer that other warps still read shows up); bulk tensor copies (TMA) likewise land at the mbarrier wait
//   that observes them, or at issue; wgmma runs at the wgmma.wait_group that covers it; dynamic shared memory is
//   filled with 0xff bytes (NaN in fp32, fp16 and bf16) before each block.
// - errors (deadlock, at a barrier, an mbarrier or grid_sync; divergent __syncthreads or grid_sync, grid_sync outside a
//   cooperative launch, a cooperative grid larger than can be co-resident, collective with exited lanes,
//   ldmatrix/cp.async/TMA outside shared memory or misaligned, wgmma or TMA left in flight, too much shared memory,
//   bad launch configuration) abort the launch: cudaGetLastError()
//   returns an error and pyattn_emu::last_error_message() says what happened, where.
#pragma once

#include <math.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>

#include "include/cuda.h"

// ---- CUDA C++ keywords -------------------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __shared__ static
#define __constant__ static
#define __restrict__ __restrict
#define __grid_constant__

// ---- runtime types -------------------------------------------------------------------------------------------------
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x, y, z;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned x, y;
};
struct alignas(8) float2 {
  float x, y;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return uint2{x, y}; }
inline float2 make_float2(float x, float y) { return float2{x, y}; }

enum cudaError {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
  cudaErrorCooperativeLaunchTooLarge = 720,
};
typedef enum cudaError cudaError_t;
typedef struct CUstream_st* cudaStream_t;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr {
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrCooperativeLaunch = 95,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97
};
enum cudaDriverEntryPointQueryResult {
  cudaDriverEntryPointSuccess = 0,
  cudaDriverEntryPointSymbolNotFound = 1,
  cudaDriverEntryPointVersionNotSufficent = 2
};
enum cudaGetDriverEntryPointFlags { cudaEnableDefault = 0 };
struct cudaDeviceProp {
  int major = 9, minor = 0;
  size_t sharedMemPerBlock = 48 * 1024;
  size_t sharedMemPerBlockOptin = 227 * 1024;
  int multiProcessorCount = 132;
  int l2CacheSize = 50 * 1024 * 1024;
  int warpSize = 32;
};
constexpr int warpSize = 32;

namespace pyattn_emu {

// The emulated device's SM count: 132, or PYATTN_EMU_SMS (tests shrink it so that a persistent kernel's blocks take
// several tiles each). at::cuda::getDeviceProperties, cudaDeviceGetAttribute and the cooperative launch's
// co-residency check read it here.
inline int sm_count() {
  const char* sms = std::getenv("PYATTN_EMU_SMS");
  return sms != nullptr ? std::atoi(sms) : 132;
}

// The occupancy model of cudaOccupancyMaxActiveBlocksPerMultiprocessor (and of the cooperative launch's check): blocks
// an SM holds by threads (2048 / block_size), at most 32, and by dynamic shared memory (228 KiB an SM, each block's
// dynamic_smem + 1 KiB reserved); no registers or static shared memory.
inline cudaError_t max_active_blocks(int* num_blocks, int block_size, size_t dynamic_smem) {
  if (num_blocks == nullptr || block_size <= 0 || block_size > 1024) return cudaErrorInvalidValue;
  size_t n = std::min<size_t>(2048 / size_t(block_size), 32);
  if (dynamic_smem > 0) n = std::min<size_t>(n, (228 * 1024) / (dynamic_smem + 1024));
  *num_blocks = int(n);
  return cudaSuccess;
}

// ---- scheduler state (cuda_emu.cpp) ----------------------------------------------------------------------------------
uint3 thread_idx();
uint3 block_idx();
dim3 block_dim();
dim3 grid_dim();

cudaError_t take_last_error();     // cudaGetLastError: returns and clears
const char* last_error_message();  // what went wrong in the last failed launch ("" if none)
void set_max_dynamic_smem(const void* kernel, int bytes);
cudaError_t run_grid(const void* kernel, dim3 grid, dim3 block, size_t smem, const std::function<void()>& body);
// cudaLaunchCooperativeKernel: every block alive at once (as a cooperative launch guarantees on hardware), so that
// grid_sync works; cudaErrorCooperativeLaunchTooLarge for more blocks than sm_count() x max_active_blocks (or than
// PYATTN_EMU_COOP_LIMIT, which tests set to reach a caller's fallback).
cudaError_t run_cooperative(const void* kernel, dim3 grid, dim3 block, size_t smem,
                            const std::function<void()>& body);
// The grid-wide barrier of a cooperative launch, called by every thread of every block (the kernel's stand-in for
// its atomic-counter barrier): blocks the thread until every thread of the grid waits at grid_sync, at one source
// line. An error outside a cooperative launch, at different lines, or when it can never release (a thread of the
// grid has exited or waits elsewhere: deadlock). No memory model: every write is visible to every later read.
void grid_sync(const char* file, int line);

// Distributed shared memory of a thread-block cluster (mapa / st.shared::cluster): the dynamic shared memory of block
// `rank` (linear index) of the running cooperative launch, which stands in for a launch of one cluster (its blocks
// alive at once, grid_sync as the cluster barrier). An error outside a cooperative launch or for a rank past the grid.
unsigned char* block_smem(unsigned rank, const char* file, int line);

[[noreturn]] void fail(const char* what, const char* file, int line);  // aborts the running launch
void syncthreads(const char* file, int line);
unsigned char* dynamic_smem();
bool in_dynamic_smem(const void* p, size_t bytes);

// Warp collectives: each lane gives up to 12 words, gets up to 4 back.
enum class Op : int { Shfl, Ldsm, LdsmTrans, MmaF16, MmaBF16, Wgmma, WgmmaCommit, WgmmaWait };
using Collective = void (*)(const uint64_t (*in)[12], uint32_t (*out)[4], uint64_t param);
void warp_collective(Op op, uint64_t param, const uint64_t (&in)[12], uint32_t (&out)[4], Collective fn);

// __launch_bounds__(max_threads): scripts/cuda_emu.py adds this check at the top of each kernel that declares it
// (hardware refuses a launch with more threads than that).
void check_launch_bounds(long long max_threads, const char* file, int line);

// Counters since the last reset: [0] ldmatrix phases (8 row addresses each), [1] shared-memory wavefronts they take
// (1 per phase when conflict-free: the 8 rows fall in 8 different 16-byte bank groups), [2] launches, [3] blocks,
// [4] the largest dynamic shared memory of a launch (bytes), [5] wgmma instructions (one per warp).
enum Counter { kLdsmPhases, kLdsmWavefronts, kLaunches, kBlocks, kMaxDynamicSmem, kWgmma, kNumCounters };
const long long* counters();
void reset_counters();

// cp.async (16 bytes): lands at the wait_group that covers it, or at issue with PYATTN_EMU_CP_ASYNC=early.
void cp_async16(void* smem, const void* gmem);
void cp_async_commit();
void cp_async_wait(int n);

// ---- launches: k<<<g, b, s, st>>>(args) becomes launch(k, g, b, s, st)(args) ------------------------------------------
template <class... P>
struct Launcher {
  void (*kernel)(P...);
  dim3 grid, block;
  size_t smem;
  template <class... A>
  void operator()(A&&... args) const {
    // kernel parameters are copies made at launch (as CUDA copies them to the parameter space)
    std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
    auto* k = kernel;
    run_grid(reinterpret_cast<const void*>(kernel), grid, block, smem, [&] { std::apply(k, params); });
  }
};
template <class... P>
Launcher<P...> launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem = 0, cudaStream_t = nullptr) {
  return Launcher<P...>{kernel, grid, block, smem};
}
// cudaLaunchCooperativeKernel's args[i] points at the i-th parameter: copied at launch, as the runtime copies them.
template <class... P, size_t... I>
cudaError_t launch_cooperative(void (*kernel)(P...), dim3 grid, dim3 block, void** args, size_t smem,
                               std::index_sequence<I...>) {
  std::tuple<std::decay_t<P>...> params(*static_cast<const std::decay_t<P>*>(args[I])...);
  return run_cooperative(reinterpret_cast<const void*>(kernel), grid, block, smem, [&] { std::apply(kernel, params); });
}

// ---- 16-bit floats ---------------------------------------------------------------------------------------------------
inline uint32_t f2u(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float u2f(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  if (exp == 0x1f) return u2f(sign | 0x7f800000u | (man << 13));  // inf / NaN
  if (exp == 0) {                                                  // zero / subnormal: man * 2^-24
    const float v = float(man) * 5.9604644775390625e-08f;
    return sign ? -v : v;
  }
  return u2f(sign | ((exp + 112u) << 23) | (man << 13));
}
inline uint16_t float_to_half_rn(float f) {  // round to nearest even, overflow to inf, NaN stays NaN
  const uint32_t u = f2u(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a >= 0x7f800000u) return uint16_t(sign | 0x7c00u | (a > 0x7f800000u ? 0x200u : 0u));
  if (a >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // >= 65520: rounds to inf
  if (a < 0x38800000u) {                                     // below 2^-14: subnormal half (or zero)
    const float v = u2f(a) * 16777216.0f;                    // exact: a * 2^24, value in units of 2^-24
    return uint16_t(sign | uint16_t(nearbyintf(v)));         // default rounding mode: to nearest even
  }
  const uint32_t m = a + 0xfffu + ((a >> 13) & 1u);  // round the 13 dropped bits to nearest even
  return uint16_t(sign | ((m - 0x38000000u) >> 13));
}
inline float bf16_to_float(uint16_t h) { return u2f(uint32_t(h) << 16); }
inline uint16_t float_to_bf16_rn(float f) {
  const uint32_t u = f2u(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);  // quiet NaN
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// PTX cvt.rn.{f16,bf16}x2.f32 d, a, b: a -> upper half of d, b -> lower half.
inline uint32_t cvt_rn_f16x2(float a, float b) { return (uint32_t(float_to_half_rn(a)) << 16) | float_to_half_rn(b); }
inline uint32_t cvt_rn_bf16x2(float a, float b) { return (uint32_t(float_to_bf16_rn(a)) << 16) | float_to_bf16_rn(b); }
// PTX ex2.approx.ftz.f32 (subnormal inputs and results flushed to zero)
inline float ex2_approx_ftz(float x) {
  if (fabsf(x) < 1.17549435e-38f) x = 0.0f;
  const float y = exp2f(x);
  return fabsf(y) < 1.17549435e-38f ? 0.0f : y;
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32 d, a, b, c (d = c in place)
void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16);
// wgmma.mma_async.sync.aligned.m64nNk16.f32.{f16,bf16} (n = N): the calling warp's 16 of the warpgroup's 64 rows
// (warp index % 4). Recorded when the warp's 32 lanes have issued it, grouped by wgmma_commit (commit_group) and
// computed at the wgmma_wait(n) (wait_group n) that covers it, reading shared memory and the accumulators then: the
// latest moment hardware may, so reading results before their wait, or refilling an operand's shared memory before
// it, gives wrong results here (wgmma.fence is a no-op). d: this lane's N / 2 accumulators (D = A B when !scale_d, else D += A B); a: this lane's 4 A registers,
// or nullptr for A from shared memory (a_desc, K-major, or M-major when trans_a); b_desc: B from shared memory,
// K-major (!trans_b) or N-major.
// Descriptors: 128-byte swizzle only (csrc/cuda/wgmma.cuh says how they are read; anything else fails the launch).
void wgmma_m64k16(float* d, int n, const uint32_t* a, uint64_t a_desc, uint64_t b_desc, bool scale_d, bool trans_b,
                  bool bf16, bool trans_a = false);
void wgmma_commit();
void wgmma_wait(int n);

// Shared-memory mbarriers and bulk tensor copies (csrc/cuda/tma.cuh). A barrier's state lives beside the block (the
// 8 bytes in shared memory are only its address). mbar_arrive: one arrival, announcing tx_bytes more bytes first
// (arrive.expect_tx); a phase completes when its arrivals are in and its bytes written, which wakes its waiters.
// mbar_wait blocks the thread until the phase of that parity has completed (a fresh barrier's parity-1 wait passes).
// tma_load_4d copies one box of a tensor map made by the emulated cuTensorMapEncodeTiled (zeros outside the tensor,
// 128-byte swizzle), landing at the wait that observes its barrier (PYATTN_EMU_CP_ASYNC=late, so a read before the
// wait sees stale data) or at issue (early, so a copy into a stage still being read shows up).
// Named barriers 1..15 (bar.sync / bar.arrive id, n; 0 is __syncthreads): a phase completes when n threads have
// arrived or synced on it; bar_sync blocks until then, bar_arrive does not.
void bar_sync(int id, int n);
void bar_arrive(int id, int n);
void mbar_init(uint64_t* bar, uint32_t count);
void mbar_arrive(uint64_t* bar, uint32_t tx_bytes);
void mbar_wait(uint64_t* bar, uint32_t parity);
void tma_load_4d(void* dst, const CUtensorMap* map, uint64_t* bar, int c0, int c1, int c2, int c3);
// Bulk reductions (cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32): bulk_reduce_add_f32 adds `bytes` (a
// positive multiple of 16; both addresses 16-byte aligned, the source in shared memory) of fp32 into global memory as
// part of the calling thread's open bulk group; bulk_commit closes the group; bulk_wait_read(n) returns once all but
// the n most recent groups have read their shared memory. A reduction reads (and adds) at the wait that covers it
// (PYATTN_EMU_CP_ASYNC=late, so shared memory rewritten before the wait shows up) or at issue (early, so a source
// issued before other threads wrote it shows up); a thread that exits with one not waited for fails the launch.
void bulk_reduce_add_f32(float* gdst, const float* ssrc, uint32_t bytes);
void bulk_commit();
void bulk_wait_read(int n);
// The emulated cuTensorMapEncodeTiled (the driver's signature): CUDA_ERROR_INVALID_VALUE for what the driver refuses
// (misaligned address or strides, box too large) and for what the emulator does not model (other than 16-bit
// elements, element strides != 1, a swizzle other than none / 128 bytes, a 128-byte swizzle whose box rows are not
// 128 bytes).
CUresult encode_tiled(CUtensorMap* map, CUtensorMapDataType dtype, cuuint32_t rank, void* addr, const cuuint64_t* dims,
                      const cuuint64_t* strides, const cuuint32_t* box, const cuuint32_t* elem_strides,
                      CUtensorMapInterleave interleave, CUtensorMapSwizzle swizzle, CUtensorMapL2promotion l2,
                      CUtensorMapFloatOOBfill oob);
// ldmatrix.sync.aligned.m8n8.x4{.trans}.shared.b16 {r0..r3}, [p]
void ldmatrix_x4(uint32_t (&r)[4], const void* p, bool trans);

// __shfl_xor_sync (mode 0), __shfl_sync (1), __shfl_down_sync (2) of a 32-bit value, width 32, full mask.
void check_full_mask(unsigned mask, const char* what, const char* file, int line);
void shfl_collective(int mode, int arg, const uint64_t (&in)[12], uint32_t (&out)[4]);
template <class T>
T shfl(unsigned mask, T v, int arg, int mode, const char* file, int line) {
  static_assert((sizeof(T) == 4 || sizeof(T) == 8) && std::is_trivially_copyable<T>::value,
                "emulated shuffles move 32- and 64-bit values");
  check_full_mask(mask, "shuffle", file, line);
  uint64_t in[12] = {};
  std::memcpy(&in[0], &v, sizeof(T));
  uint32_t out[4] = {};
  shfl_collective(mode, arg, in, out);
  T r;
  std::memcpy(&r, out, sizeof(T));  // out[0] = low word, out[1] = high word
  return r;
}

}  // namespace pyattn_emu

// ---- built-in variables and functions ----------------------------------------------------------------------------------
#define threadIdx (::pyattn_emu::thread_idx())
#define blockIdx (::pyattn_emu::block_idx())
#define blockDim (::pyattn_emu::block_dim())
#define gridDim (::pyattn_emu::grid_dim())
#define __syncthreads() ::pyattn_emu::syncthreads(__FILE__, __LINE__)
// width 32 only (no width argument: a call that passes one does not compile here)
#define __shfl_xor_sync(mask, v, m) ::pyattn_emu::shfl(mask, v, m, 0, __FILE__, __LINE__)
#define __shfl_sync(mask, v, l) ::pyattn_emu::shfl(mask, v, l, 1, __FILE__, __LINE__)
#define __shfl_down_sync(mask, v, d) ::pyattn_emu::shfl(mask, v, d, 2, __FILE__, __LINE__)

inline cudaError_t cudaGetLastError() { return ::pyattn_emu::take_last_error(); }
// The typed form only (the runtime's template): the emulator needs the kernel's parameter types to copy args.
template <class... P>
cudaError_t cudaLaunchCooperativeKernel(void (*kernel)(P...), dim3 grid, dim3 block, void** args, size_t smem = 0,
                                        cudaStream_t = nullptr) {
  return ::pyattn_emu::launch_cooperative(kernel, grid, block, args, smem, std::index_sequence_for<P...>{});
}
// The C API's untyped kernel pointer: the emulator cannot call it (pass the kernel itself, as the template above).
cudaError_t cudaLaunchCooperativeKernel(const void* kernel, dim3 grid, dim3 block, void** args, size_t smem = 0,
                                        cudaStream_t stream = nullptr) = delete;
template <class F>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* num_blocks, F*, int block_size, size_t dynamic_smem) {
  return ::pyattn_emu::max_active_blocks(num_blocks, block_size, dynamic_smem);
}
inline cudaError_t cudaGetDevice(int* device) {  // one emulated device
  if (device == nullptr) return cudaErrorInvalidValue;
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (value == nullptr || device != 0) return cudaErrorInvalidValue;
  switch (attr) {
    case cudaDevAttrMultiProcessorCount:
      *value = ::pyattn_emu::sm_count();
      return cudaSuccess;
    case cudaDevAttrCooperativeLaunch:
      *value = 1;
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = 227 * 1024;
      return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}
// Only cuTensorMapEncodeTiled is known (the emulator's encode_tiled, which the Hopper forward's host code calls
// through the same function-pointer type as the driver's).
inline cudaError_t cudaGetDriverEntryPointByVersion(const char* symbol, void** fn, unsigned int, unsigned long long,
                                                    cudaDriverEntryPointQueryResult* status) {
  const bool known = std::strcmp(symbol, "cuTensorMapEncodeTiled") == 0;
  *fn = known ? reinterpret_cast<void*>(&::pyattn_emu::encode_tiled) : nullptr;
  if (status != nullptr) *status = known ? cudaDriverEntryPointSuccess : cudaDriverEntryPointSymbolNotFound;
  return cudaSuccess;
}
inline const char* cudaGetErrorString(cudaError_t e) {
  return e == cudaSuccess ? "no error" : ::pyattn_emu::last_error_message();
}
template <class F>
cudaError_t cudaFuncSetAttribute(F* kernel, cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || value > 227 * 1024) return cudaErrorInvalidValue;
    ::pyattn_emu::set_max_dynamic_smem(reinterpret_cast<const void*>(kernel), value);
  }
  return cudaSuccess;
}

inline float __uint_as_float(unsigned u) { return ::pyattn_emu::u2f(u); }
inline unsigned __float_as_uint(float f) { return ::pyattn_emu::f2u(f); }
inline float __int_as_float(int i) { return ::pyattn_emu::u2f(static_cast<uint32_t>(i)); }
inline int __float_as_int(float f) { return static_cast<int>(::pyattn_emu::f2u(f)); }
inline int __float2int_rn(float f) { return static_cast<int>(nearbyintf(f)); }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmul_rn(float a, float b) { return a * b; }  // no FMA contraction: x86-64 builds have no FMA
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
// Loads / stores through L2 (cache global): plain accesses (the emulator has no caches); __threadfence: nothing to
// order (one OS thread runs every fiber).
template <class T>
T __ldcg(const T* p) {
  return *p;
}
template <class T>
void __stcg(T* p, std::type_identity_t<T> v) {
  *p = v;
}
inline void __threadfence() {}
inline size_t __cvta_generic_to_shared(const void* p) {
  if (!::pyattn_emu::in_dynamic_smem(p, 1)) ::pyattn_emu::fail("__cvta_generic_to_shared: not a shared-memory address", __FILE__, __LINE__);
  return static_cast<size_t>(static_cast<const unsigned char*>(p) - ::pyattn_emu::dynamic_smem());
}

struct __half {
  unsigned short __x;
};
struct __nv_bfloat16 {
  unsigned short __x;
};
inline float __half2float(__half h) { return ::pyattn_emu::half_to_float(h.__x); }
inline __half __float2half_rn(float f) { return __half{::pyattn_emu::float_to_half_rn(f)}; }
inline __half __float2half(float f) { return __float2half_rn(f); }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __ushort_as_half(unsigned short u) { return __half{u}; }
inline float __bfloat162float(__nv_bfloat16 h) { return ::pyattn_emu::bf16_to_float(h.__x); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16{::pyattn_emu::float_to_bf16_rn(f)}; }
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { return __nv_bfloat16{u}; }
