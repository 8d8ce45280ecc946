// Hopper's bulk tensor copies (TMA, sm_90) and the shared-memory mbarriers they complete on, plus setmaxnreg
// (sm_90a) and named barriers: the producer / consumer plumbing of the warp-specialized attention forward
// (attention_sm90.cu).
// Torch-free. Each PTX wrapper has a PYATTN_CUDA_EMU branch (csrc/emu/cuda_emu.h emulates the same semantics).
//
// mbarrier (a 64-bit word in shared memory): initialised with an arrival count; a phase completes when that many
// arrivals have come AND every byte announced with expect_tx has been written by the copies that complete on it; then
// the next phase starts (parity flips). mbar_wait(bar, parity) returns once the phase of that parity has completed:
// a fresh barrier is in phase 0, so waiting for parity 1 passes at once (a producer's first wait on an "empty" barrier).
// tma_load_4d: one box of a 4-D tensor map (coordinates innermost first) into shared memory, rows laid out as the map's
// swizzle says (128-byte swizzle: the wgmma.cuh layout); elements outside the tensor are written as zeros; the bytes
// count toward the barrier's expect_tx. Its destination must be 1024-byte aligned for the 128-byte swizzle. `policy`:
// the L2 eviction priority of the lines it reads (FA3's: evict-last for data other blocks read again, K and V in
// the forward, Q and dO in the dK / dV kernel; evict-first for data read once, the forward's Q), a cache policy from
// l2_evict_last() / l2_evict_first() (createpolicy; 0 in the emulator, which has no cache).
// bulk_reduce_add_f32: the TMA unit adds `bytes` (a positive multiple of 16; both addresses 16-byte aligned) of fp32
// from shared memory into global memory, reading the shared memory asynchronously as part of the calling thread's
// open bulk group (write it with ordinary stores, then fence_proxy_async() in each writing thread and a barrier before
// the issue); bulk_commit() closes the group; bulk_wait_read<n>() returns once all but the n most recent groups have
// read their shared memory (so it may be rewritten; a thread must not exit before that). The additions are atomic
// per element and complete before the kernel does.
#pragma once

#include <cuda.h>

#include <cstdint>

#include "attention_utils.cuh"

namespace pyattn {
namespace cuda {
namespace attn {
namespace sm90 {

#ifdef PYATTN_CUDA_EMU
__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) { ::pyattn_emu::mbar_init(bar, count); }
__device__ __forceinline__ void mbar_init_fence() {}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) { ::pyattn_emu::mbar_arrive(bar, 0); }
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  ::pyattn_emu::mbar_arrive(bar, bytes);
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) { ::pyattn_emu::mbar_wait(bar, parity); }
__device__ __forceinline__ void tma_prefetch(const CUtensorMap*) {}
__device__ __forceinline__ void bulk_reduce_add_f32(float* gdst, const float* ssrc, uint32_t bytes) {
  ::pyattn_emu::bulk_reduce_add_f32(gdst, ssrc, bytes);
}
__device__ __forceinline__ void bulk_commit() { ::pyattn_emu::bulk_commit(); }
template <int N>
__device__ __forceinline__ void bulk_wait_read() {
  ::pyattn_emu::bulk_wait_read(N);
}
__device__ __forceinline__ uint64_t l2_evict_last() { return 0; }
__device__ __forceinline__ uint64_t l2_evict_first() { return 0; }
__device__ __forceinline__ void tma_load_4d(void* dst, const CUtensorMap* map, uint64_t* bar, int c0, int c1, int c2,
                                            int c3, uint64_t /* policy */) {
  ::pyattn_emu::tma_load_4d(dst, map, bar, c0, c1, c2, c3);
}
template <int N>
__device__ __forceinline__ void setmaxnreg_inc() {}
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() {}
__device__ __forceinline__ void named_bar_sync(int id, int n) { ::pyattn_emu::bar_sync(id, n); }
__device__ __forceinline__ void named_bar_arrive(int id, int n) { ::pyattn_emu::bar_arrive(id, n); }
#else
__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}
// After the inits, before any other thread or the copy engine uses the barriers (then a block barrier).
__device__ __forceinline__ void mbar_init_fence() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(bar)) : "memory");
}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(smem_addr(bar)), "r"(parity)
        : "memory");
  } while (!done);
}
// Starts fetching a tensor map (a __grid_constant__ kernel parameter) into the TMA unit's descriptor cache, so that
// the block's first copy does not wait for it (CUTLASS's prefetch_tma_descriptor; issued before the mbarrier setup).
__device__ __forceinline__ void tma_prefetch(const CUtensorMap* map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}
__device__ __forceinline__ uint64_t l2_evict_last() {
  uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;\n" : "=l"(policy));
  return policy;
}
__device__ __forceinline__ uint64_t l2_evict_first() {
  uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
  return policy;
}
__device__ __forceinline__ void tma_load_4d(void* dst, const CUtensorMap* map, uint64_t* bar, int c0, int c1, int c2,
                                            int c3, uint64_t policy) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], "
      "[%1, {%3, %4, %5, %6}], [%2], %7;\n" ::"r"(smem_addr(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(smem_addr(bar)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "l"(policy)
      : "memory");
}
__device__ __forceinline__ void bulk_reduce_add_f32(float* gdst, const float* ssrc, uint32_t bytes) {
  asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n" ::"l"(gdst),
               "r"(smem_addr(ssrc)), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void bulk_wait_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(N) : "memory");
}
// Registers per thread of the calling warpgroup from here on (all its threads must execute it; sm_90a).
template <int N>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}
// Named barrier id (1..15; 0 is __syncthreads) of n threads (a multiple of 32): sync waits for the phase, arrive
// counts itself in and goes on.
__device__ __forceinline__ void named_bar_sync(int id, int n) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(n) : "memory");
}
__device__ __forceinline__ void named_bar_arrive(int id, int n) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(n) : "memory");
}
#endif

// The TMA map of a (B, H, L, D) 16-bit tensor, boxes of 64 columns x `rows` rows (defined in attention_sm90.cu, which
// says how); false when it cannot be made (then the callers launch their cp.async kernels).
bool make_map(CUtensorMap* map, const void* ptr, DType dtype, int64_t B, int64_t H, int64_t L, int64_t D,
              const int64_t* s, uint32_t rows);

}  // namespace sm90
}  // namespace attn
}  // namespace cuda
}  // namespace pyattn
