// CUDA attention backward for Hopper (sm_90a): the FlashAttention-2 backward of attention.cu (a dK / dV kernel over
// key blocks and a dQ kernel over query blocks, both after attn_bwd_pre_kernel's row statistics lse2, l2, delta) on
// warpgroup MMA (wgmma, csrc/cuda/wgmma.cuh) instead of mma.sync. Same contract and semantics as attention.cu's
// kernels (causal with both alignments, GQA summed in a fixed order; no atomics except in the fused dQ below, the
// default outside deterministic mode; a row that saw no key has lse +inf, so P = 0 and its dQ is 0); it takes the
// common case only (sm90_bwd_plan: fp16 / bf16, D == Dv in {64, 128}, no mask, no dropout, 16-byte-aligned rows of
// every tensor), attention.cu's kernels the rest. The dK / dV kernel that runs by default is the warp-specialized
// one further down, adding dQ itself (sm90_bwd_plan); the cp.async one described here runs where its TMA maps cannot
// be made or when asked for.
//
// Both kernels: 2 warpgroups (256 threads); tiles in shared memory as 128-byte-swizzled 64-column sub-tiles
// (wgmma.cuh), filled with cp.async by all threads, the next block of the streamed operands copied while this one is
// computed. x = S c with c = scale log2(e); P = exp2(x - lse2 - l2) (l2 = 0 except for attn_exact_rows.h's rows).
//   dK / dV (attn_bwd_dkdv_sm90_kernel): BNK = 128 keys [j0, j0 + 128) of one (b, kv head) per block, warpgroup wg
//     keys j0 + 64 wg.. (K and V stay in shared memory); the (query head of the GQA group, query block of BMQ = 64
//     rows) pairs that see the keys stream through a double buffer of Q, dO and the rows' statistics:
//       S^T  (64 keys x 64 queries) = K Q^T, dP^T = V dO^T        wgmma m64n64k16, A and B K-major from shared memory
//       P^T, dS^T = P^T (dP^T - delta)                             registers
//       dV (64 x HD) += P^T dO, dK (64 x HD) += dS^T Q              wgmma m64nHDk16, A from registers, B N-major
//     dK * scale and dV are stored from registers. PYATTN_CUDA_ATTN_SM90_BWD=ws: the same steps warp-specialized
//     (attn_bwd_dkdv_sm90_ws_kernel: a TMA producer warpgroup, mbarriers instead of block barriers); by default
//     (=fused) and =fusedat that kernel also adds dQ = dS K into an fp32 accumulator with bulk reductions / atomics
//     (not in deterministic mode), and attn_bwd_dq_convert_kernel writes dq instead of the dQ kernel.
//   dQ (attn_bwd_dq_sm90_kernel): BM = 128 query rows of one (b, h) per block in fwd_block's order (causal:
//     heaviest first in L2 sections of heads), warpgroup wg rows i0 + 64 wg.. (Q and dO stay in shared memory); key
//     blocks of BN = 64 stream through a double buffer of K and V:
//       S = Q K^T, dP = dO V^T (m64n64k16), P and dS = P (dP - delta), dQ (64 x HD) += dS K (m64nHDk16, B = K N-major)
//     dQ * scale is stored from registers.
// Registers per thread (HD 128): dK / dV kernel S^T 32 + dP^T 32 + dK 64 + dV 64 fp32 + P^T and dS^T 16 + 16 packed;
// dQ kernel S 32 + dP 32 + dQ 64 fp32 + dS 16 packed.
// Shared memory (HD 128): dK / dV 1 KB alignment slack + (2 BNK + 4 BMQ) HD 2 bytes + statistics 2 * 3 * BMQ * 4 =
// 130.5 KB; dQ 1 KB + (2 BM + 4 BN) HD 2 = 129 KB (one block per SM; HD 64: about half the shared memory, still
// one block per SM by registers: 150-200 a thread).
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "attention_utils.cuh"
#include "launch.cuh"
#include "pyattn/params.h"
#include "tma.cuh"
#include "wgmma.cuh"

#if defined(PYATTN_CUDA_EMU) || (defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL))
#define PYATTN_SM90_KERNEL 1  // the device code of this pass can run the kernels (sm_90a, or the CPU emulator)
#endif

namespace pyattn {
namespace cuda {
namespace attn {
namespace sm90 {

// Who adds dQ: the dQ kernel, or the warp-specialized dK / dV kernel (fused) with atomics or with bulk reductions.
enum class DqBy { Kernel, Atomic, Bulk };

template <int HD_>
struct BwdCfg {
  static constexpr int HD = HD_, NT = 256;
  static constexpr int BNK = 128, BMQ = 64;  // dK / dV: keys per block, query rows per step
  static constexpr int BM = 128, BN = 64;    // dQ: query rows per block, keys per step
  static constexpr uint32_t kKeyTile = BNK * HD * 2, kQStage = BMQ * HD * 2;  // bytes
  static constexpr uint32_t kQTile = BM * HD * 2, kKVStage = BN * HD * 2;
  static constexpr size_t dkdv_smem = 1024 + 2 * size_t(kKeyTile) + 4 * size_t(kQStage) + 2 * 3 * BMQ * 4;
  static constexpr size_t dkdv_ws_smem = dkdv_smem + 5 * 8;  // + the warp-specialized kernel's mbarriers
  static constexpr uint32_t kDsTile = BNK * BMQ * 2;           // fused dQ: dS^T [BNK][BMQ], two of them
  static constexpr size_t dkdv_fused_smem = dkdv_ws_smem + 2 * kDsTile;
  // fused dQ by bulk reductions: a 64 x 64 fp32 staging chunk per consumer warpgroup, in the accumulator's order
  // (attention_utils.cuh kDqChunkFloats: a warp's float4 stores are 512 contiguous bytes, no bank conflicts)
  static constexpr uint32_t kDqStage = kDqChunkFloats * 4;
  static constexpr size_t dkdv_bulk_smem = dkdv_fused_smem + 2 * size_t(kDqStage);
  static constexpr size_t dq_smem = 1024 + 2 * size_t(kQTile) + 4 * size_t(kKVStage);
};

// Rows r0 and r0 + 8 of a 64 x HD fp32 accumulator (this thread's columns 8 n + 2 t, + 1), times `mul`, stored as
// 16-bit values at base + row * stride (elements), rows >= nrows skipped.
template <class E, int HD>
__device__ __forceinline__ void store_rows(void* base, int64_t stride, int64_t r0, int64_t nrows,
                                           const float (&acc)[HD / 2], float mul, int t) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (r0 + 8 * r >= nrows) continue;
    uint16_t* row = static_cast<uint16_t*>(base) + (r0 + 8 * r) * stride;
#pragma unroll
    for (int n = 0; n < HD / 8; ++n)
      *reinterpret_cast<uint32_t*>(row + n * 8 + 2 * t) =
          E::pack(acc[4 * n + 2 * r] * mul, acc[4 * n + 2 * r + 1] * mul);
  }
}

// A dK / dV block's results, this thread's key rows jr, jr + 8 of (b, kv head hk): dK * scale and dV (keys past Lk
// skipped).
template <class E, int HD>
__device__ __forceinline__ void store_dk_dv(const AttnBwdParams& p, int64_t b, int64_t hk, int64_t jr,
                                            const float (&dk)[HD / 2], const float (&dv)[HD / 2], int t) {
  store_rows<E, HD>(static_cast<uint16_t*>(p.dk) + b * p.dk_stride[0] + hk * p.dk_stride[1], p.dk_stride[2], jr, p.Lk,
                    dk, p.scale, t);
  store_rows<E, HD>(static_cast<uint16_t*>(p.dv) + b * p.dv_stride[0] + hk * p.dv_stride[1], p.dv_stride[2], jr, p.Lk,
                    dv, 1.0f, t);
}

// Row r of a stage's statistics st [3][BMQ] (lse2, l2, delta) from global row row0 + r; a row past Lq (!ok): lse2
// +inf (P = 0), delta 0.
template <int BMQ>
__device__ __forceinline__ void stage_stats(float* st, int r, bool ok, int64_t row0, const float* __restrict__ lse2,
                                            const float* __restrict__ l2, const float* __restrict__ delta) {
  st[r] = ok ? lse2[row0 + r] : INFINITY;
  st[BMQ + r] = ok ? l2[row0 + r] : 0.0f;
  st[2 * BMQ + r] = ok ? delta[row0 + r] : 0.0f;
}

// The key block (level) and (b, kv head) (head) of this dK / dV block: in L2 sections of d.sec_kv kv heads (derive;
// non-causal: 1, a head's key blocks back to back), key blocks in order within each (causal: the first ones, which
// the most query rows see, first).
template <int BNK>
__device__ __forceinline__ GridTile dkdv_tile(const AttnBwdParams& p, const Derived& d) {
  return l2_section_tile(blockIdx.x, (p.Lk + BNK - 1) / BNK, p.B * p.Hkv, d.sec_kv);
}

// One (query head, query block) step of a dK / dV warpgroup (64 keys from jw; this thread's keys jr, jr + 8) against
// the BMQ query rows from i0 staged at q_addr / do_addr (Q and dO tiles) and st (their lse2, l2, delta): dV += P^T dO,
// dK += dS^T Q. k_addr / v_addr: the warpgroup's 64 rows of the block's K / V tiles. Returns with every GEMM done and
// dS^T packed in da.
template <class E, int HD, bool CAUSAL>
__device__ __forceinline__ void dkdv_step(float (&dk)[HD / 2], float (&dv)[HD / 2], uint32_t k_addr, uint32_t v_addr,
                                          uint32_t q_addr, uint32_t do_addr, const float* st, int64_t i0, int64_t jw,
                                          int64_t jr, const Derived& d, int t,
                                          uint32_t (&da)[BwdCfg<HD>::BMQ / 16][4]) {
  constexpr int BNK = BwdCfg<HD>::BNK, BMQ = BwdCfg<HD>::BMQ;
  const float c = d.scale_log2;
  float s[BMQ / 2], dp[BMQ / 2];
  issue_abt<E, BMQ, HD, BNK, BMQ>(s, k_addr, q_addr);    // S^T = K Q^T
  issue_abt<E, BMQ, HD, BNK, BMQ>(dp, v_addr, do_addr);  // dP^T = V dO^T
  wgmma_wait<1>();  // S^T has landed
  fence_operands(s);
  // P^T; element (n, e): key jr + 8 (e / 2), query i0 + il, il = 8 n + 2 t + e % 2. Causal: 0 where j > i + shift,
  // i.e. where off + 8 (e / 2) > il with off = jr - i0 - shift, clamped to 32 bits (|off| > 256 decides alike).
  const bool check = CAUSAL && jw + 63 > i0 + d.shift;
  const int off = int(imax(-256, imin(256, jr - i0 - d.shift)));
  // (the statistics of queries il and il + 1 as one 8-byte load: st is 8-byte aligned, il even for e % 2 == 0)
  auto pair = [&](int row, int n) { return *reinterpret_cast<const float2*>(st + row * BMQ + 8 * n + 2 * t); };
  // two copies, masked and not (as one, ptxas predicates the mask into every step: 121 SASS instructions a step)
  auto probs = [&](auto masked) {
#pragma unroll
    for (int n = 0; n < BMQ / 8; ++n) {
      const float2 ls = pair(0, n), ll = pair(1, n);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int il = 8 * n + 2 * t + (e & 1);
        float x = fmaf(s[4 * n + e], c, -(e & 1 ? ls.y : ls.x)) - (e & 1 ? ll.y : ll.x);
        if (masked && off + (e >> 1) * 8 > il) x = -INFINITY;
        s[4 * n + e] = fast_exp2(x);
      }
    }
  };
  if (check)
    probs(std::true_type());
  else
    probs(std::false_type());
  uint32_t pa[BMQ / 16][4];
  pack_a<E, BMQ>(pa, s);
  issue_ab<E, HD, BMQ>(dv, pa, do_addr);  // dV += P^T dO (runs during dS^T)
  wgmma_wait<1>();  // dP^T has landed
  fence_operands(dp);
#pragma unroll
  for (int n = 0; n < BMQ / 8; ++n) {
    const float2 dl = pair(2, n);
#pragma unroll
    for (int e = 0; e < 4; ++e) s[4 * n + e] *= dp[4 * n + e] - (e & 1 ? dl.y : dl.x);
  }
  pack_a<E, BMQ>(da, s);  // (the caller's: dS^T packed, for the fused dQ)
  issue_ab<E, HD, BMQ>(dk, da, q_addr);  // dK += dS^T Q
  wgmma_wait<0>();
  fence_operands(dv);
  fence_operands(dk);
}

// dK, dV: see the file comment. Block: key block kb of (b, kv head hk) in dkdv_tile's order.
template <class E, int HD, bool CAUSAL>
__global__ void __launch_bounds__(256, 1)
    attn_bwd_dkdv_sm90_kernel(const AttnBwdParams p, const Derived d,
                              const float* __restrict__ lse2,  // (B, Hq, Lq) from attn_bwd_pre_kernel
                              const float* __restrict__ l2,    // (B, Hq, Lq)
                              const float* __restrict__ delta  // (B, Hq, Lq)
    ) {
#ifdef PYATTN_SM90_KERNEL
  using C = BwdCfg<HD>;
  constexpr int BNK = C::BNK, BMQ = C::BMQ, NT = C::NT;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  unsigned char* Ks = align1024(smem_raw);  // [SUB][BNK][64] swizzled
  unsigned char* Vs = Ks + C::kKeyTile;                                      // [SUB][BNK][64]
  unsigned char* Qs = Vs + C::kKeyTile;                                      // [2][SUB][BMQ][64]
  unsigned char* Ds = Qs + 2 * C::kQStage;                                   // [2][SUB][BMQ][64] dout
  float* St = reinterpret_cast<float*>(Ds + 2 * C::kQStage);                 // [2][3][BMQ]: lse2, l2, delta

  const int tid = threadIdx.x, wg = warpgroup_uniform();
  const int warp = (tid / 32) % 4, lane = tid % 32, g = lane / 4, t = lane % 4;
  const GridTile gt = dkdv_tile<BNK>(p, d);
  const int64_t kb = gt.level, bhk = gt.head;
  const int64_t b = bhk / p.Hkv, hk = bhk % p.Hkv, G = d.group;
  const int64_t j0 = kb * BNK;
  const int nk = int(imin(BNK, p.Lk - j0));
  load_tile_sw128<BNK, HD, NT>(
      Ks, static_cast<const uint16_t*>(p.k) + b * p.k_stride[0] + hk * p.k_stride[1] + j0 * p.k_stride[2],
      p.k_stride[2], nk, tid);
  load_tile_sw128<BNK, HD, NT>(
      Vs, static_cast<const uint16_t*>(p.v) + b * p.v_stride[0] + hk * p.v_stride[1] + j0 * p.v_stride[2],
      p.v_stride[2], nk, tid);

  // query blocks that see some key of this block: causal, i >= j0 - shift
  const int64_t qb_lo = CAUSAL ? imax(0, j0 - d.shift) / BMQ : 0;
  const int64_t nqe = imax(0, (p.Lq + BMQ - 1) / BMQ - qb_lo);
  const int64_t niter = G * nqe;  // (query head of the group, query block) pairs, head-major
  auto stage = [&](int64_t it, int buf) {
    const int64_t h = hk * G + it / nqe, i0 = (qb_lo + it % nqe) * BMQ;
    const int nq = int(imin(BMQ, p.Lq - i0));
    load_tile_sw128<BMQ, HD, NT>(
        Qs + buf * C::kQStage,
        static_cast<const uint16_t*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1] + i0 * p.q_stride[2],
        p.q_stride[2], nq, tid);
    load_tile_sw128<BMQ, HD, NT>(
        Ds + buf * C::kQStage,
        static_cast<const uint16_t*>(p.dout) + b * p.dout_stride[0] + h * p.dout_stride[1] + i0 * p.dout_stride[2],
        p.dout_stride[2], nq, tid);
    if (tid < BMQ) stage_stats<BMQ>(St + buf * 3 * BMQ, tid, tid < nq, (b * p.Hq + h) * p.Lq + i0, lse2, l2, delta);
  };
  if (niter > 0) stage(0, 0);
  cp_async_commit();

  const int64_t jw = j0 + 64 * wg;                 // the warpgroup's first key
  const int64_t jr = jw + 16 * warp + g;           // this thread's keys jr, jr + 8 (rows of S^T, dK, dV)
  const uint32_t k_addr = smem_addr(Ks) + wg * 64 * 128, v_addr = smem_addr(Vs) + wg * 64 * 128;
  float dk[HD / 2], dv[HD / 2];
#pragma unroll
  for (int i = 0; i < HD / 2; ++i) dk[i] = dv[i] = 0.0f;

  for (int64_t it = 0; it < niter; ++it) {
    const int buf = int(it & 1);
    if (it + 1 < niter) stage(it + 1, buf ^ 1);
    cp_async_commit();
    cp_async_wait<1>();  // K, V and this stage have landed (this thread's copies) ...
    fence_proxy_async();  // ... visible to the tensor cores ...
    __syncthreads();      // ... and every thread's, with the statistics
    const int64_t i0 = (qb_lo + it % nqe) * BMQ;
    const uint32_t q_addr = smem_addr(Qs + buf * C::kQStage), do_addr = smem_addr(Ds + buf * C::kQStage);

    uint32_t da[BMQ / 16][4];
    dkdv_step<E, HD, CAUSAL>(dk, dv, k_addr, v_addr, q_addr, do_addr, St + buf * 3 * BMQ, i0, jw, jr, d, t, da);
    __syncthreads();  // every warpgroup is done with the stage the next iteration refills
  }
  cp_async_wait<0>();  // (no query block: the K / V copies are still in flight)

  store_dk_dv<E, HD>(p, b, hk, jr, dk, dv, t);
#else
  __trap();  // not an sm_90a pass: bwd_sm90 never launches this
#endif
}

// p[0..3] += (a, b, c, e) atomically (p 16-byte aligned; one vector reduction on sm_90).
__device__ __forceinline__ void atomic_add4(float* p, float a, float b, float c, float e) {
#ifdef PYATTN_CUDA_EMU
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0)
    ::pyattn_emu::fail("atomicAdd(float4*): address not 16-byte aligned", __FILE__, __LINE__);
  p[0] += a;  // (the emulator runs one thread at a time)
  p[1] += b;
  p[2] += c;
  p[3] += e;
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float4*>(p), make_float4(a, b, c, e));
#else
  atomicAdd(p, a);
  atomicAdd(p + 1, b);
  atomicAdd(p + 2, c);
  atomicAdd(p + 3, e);
#endif
}

// ---- warp-specialized dK / dV (the default; PYATTN_CUDA_ATTN_SM90_BWD=cp: the kernel above) ------------------------
// The same blocks and steps as attn_bwd_dkdv_sm90_kernel with FA3's producer / consumer split: warpgroup 0 produces
// (setmaxnreg.dec; its first thread copies K and V once and each step's Q and dO tiles with TMA into a 2-stage ring,
// its first warp writes the step's statistics), warpgroups 1 and 2 consume (setmaxnreg.inc, 64 keys each), each
// stage behind a "full" mbarrier (32 producer lanes arrive, the copies complete) and an "empty" one (all 256 consumer
// threads arrive when their GEMMs on it are done). No block barrier in the loop: the two consumer warpgroups drift
// apart, so one's exp2s and dS run under the other's GEMMs, and the copies run ahead by a stage.
// Shared memory: the cp.async kernel's + 5 mbarriers (fused dQ: + two dS^T tiles of 16 KB; by bulk reductions: + two
// dQ staging chunks of 16 KB).
// Fused dQ (DQ != DqBy::Kernel; FA3's): each step also writes dS^T to shared memory (key rows of BMQ queries,
// swizzled) and, once both consumer warpgroups have (a named barrier: they meet once a step), warpgroup wg computes a
// 64 x 64 block of the step's dQ (wgmma with A read M-major, B N-major): HD 128, dQ[:, 64 wg..] = dS K[:, 64 wg..] over
// the block's 128 keys; HD 64, its own keys' part of the whole dQ, dS[:, its keys] K[its keys, :] (the two parts
// meet in the accumulator). It adds the block into dq_acc (so no dQ kernel recomputes S and dP: 5 GEMMs a step
// instead of 7), laid out in the accumulator's register order (attention_utils.cuh kDqChunkFloats, FA3's dQaccum):
// DqBy::Bulk (PYATTN_CUDA_ATTN_SM90_BWD=fused; FA3's way) stages the 16 KB chunk in shared memory (float4 stores,
// 512 contiguous bytes a warp) and one thread has the TMA unit add it with one bulk reduction; DqBy::Atomic
// (=fusedat) adds it from registers with float4 atomics, 512 contiguous bytes a warp instruction. (Until the fifth
// H200 session the accumulator was row-major: 64 bulk reductions of 256 bytes a warpgroup and step, measured 35%
// slower than the unfused kernels, and float2 atomics scattered over 8 rows, 4% faster.)
template <class E, int HD, bool CAUSAL, DqBy DQ>
__global__ void __launch_bounds__(384, 1)
    attn_bwd_dkdv_sm90_ws_kernel(const __grid_constant__ CUtensorMap tq, const __grid_constant__ CUtensorMap tk,
                                 const __grid_constant__ CUtensorMap tv, const __grid_constant__ CUtensorMap tdo,
                                 const AttnBwdParams p, const Derived d, const float* __restrict__ lse2,
                                 const float* __restrict__ l2, const float* __restrict__ delta,
                                 float* __restrict__ dq_acc /* fused: dq_acc_floats fp32, zeroed */) {
#ifdef PYATTN_SM90_KERNEL
  using C = BwdCfg<HD>;
  constexpr int BNK = C::BNK, BMQ = C::BMQ, SUB = HD / 64, NCONS = 256;
  constexpr bool FUSED = DQ != DqBy::Kernel, BULK = DQ == DqBy::Bulk;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  unsigned char* Ks = align1024(smem_raw);  // [SUB][BNK][64] swizzled
  unsigned char* Vs = Ks + C::kKeyTile;                                      // [SUB][BNK][64]
  unsigned char* Qs = Vs + C::kKeyTile;                                      // [2 stages][SUB][BMQ][64]
  unsigned char* Ds = Qs + 2 * C::kQStage;                                   // [2 stages][SUB][BMQ][64] dout
  unsigned char* Ss = Ds + 2 * C::kQStage;                                   // FUSED: [2][BNK][BMQ] dS^T swizzled
  float* Dq = reinterpret_cast<float*>(Ss + (FUSED ? 2 * C::kDsTile : 0));  // BULK: [2 wg][64 x 64] dQ staging
  float* St = Dq + (BULK ? 2 * C::kDqStage / 4 : 0);                         // [2 stages][3][BMQ]
  uint64_t* bars = reinterpret_cast<uint64_t*>(St + 2 * 3 * BMQ);
  uint64_t* kv_full = bars;      // K and V landed
  uint64_t* q_full = bars + 1;   // [2] stage landed (Q, dO, statistics)
  uint64_t* q_empty = bars + 3;  // [2] stage read by every consumer

  const int tid = threadIdx.x;
  const GridTile gt = dkdv_tile<BNK>(p, d);
  const int64_t kb = gt.level, bhk = gt.head;
  const int64_t b = bhk / p.Hkv, hk = bhk % p.Hkv, G = d.group, j0 = kb * BNK;
  const int64_t qb_lo = CAUSAL ? imax(0, j0 - d.shift) / BMQ : 0;  // as attn_bwd_dkdv_sm90_kernel
  const int64_t nqe = imax(0, (p.Lq + BMQ - 1) / BMQ - qb_lo);
  const int64_t niter = G * nqe;
  if (tid == 0) {
    tma_prefetch(&tk);
    tma_prefetch(&tv);
    tma_prefetch(&tq);
    tma_prefetch(&tdo);
    mbar_init(kv_full, 1);
    for (int st = 0; st < 2; ++st) {
      mbar_init(q_full + st, 32);
      mbar_init(q_empty + st, NCONS);
    }
    mbar_init_fence();
  }
  __syncthreads();
  auto use = [](int64_t it) { return uint32_t((it >> 1) & 1); };  // step it: stage it % 2, its (it / 2)-th use

  if (warpgroup_uniform() == 0) {  // producer warpgroup
    // 32 registers (24 spill), so the consumers get 232: 128 x 32 + 256 x 232 <= the 168 x 384 the block starts with
    // (setmaxnreg.inc waits for registers the dec released). 32-bit indices: TMA's coordinates are 32-bit, and steps
    // < 2^31 (attention_unsupported's grid bound covers Hq * Lq / 64).
    setmaxnreg_dec<32>();
    if (tid < 32) {
      const int bi = int(b), hki = int(hk), n_step = int(niter), nq_blocks = int(nqe), qb0 = int(qb_lo);
      if (tid == 0) {
        mbar_arrive_expect_tx(kv_full, 2 * C::kKeyTile);
        for (int sub = 0; sub < SUB; ++sub) {
          tma_load_4d(Ks + sub * (BNK * 128), &tk, kv_full, sub * 64, int(j0), hki, bi, l2_evict_first());
          tma_load_4d(Vs + sub * (BNK * 128), &tv, kv_full, sub * 64, int(j0), hki, bi, l2_evict_first());
        }
      }
      for (int it = 0; it < n_step; ++it) {
        const int st = it & 1, h = hki * int(G) + it / nq_blocks, i0 = (qb0 + it % nq_blocks) * BMQ;
        mbar_wait(q_empty + st, use(it) ^ 1);
        for (int r = tid; r < BMQ; r += 32)
          stage_stats<BMQ>(St + st * 3 * BMQ, r, i0 + r < p.Lq, (bi * p.Hq + h) * p.Lq + i0, lse2, l2, delta);
        if (tid == 0) {
          mbar_arrive_expect_tx(q_full + st, 2 * C::kQStage);
          for (int sub = 0; sub < SUB; ++sub) {
            tma_load_4d(Qs + st * C::kQStage + sub * (BMQ * 128), &tq, q_full + st, sub * 64, i0, h, bi,
                        l2_evict_last());
            tma_load_4d(Ds + st * C::kQStage + sub * (BMQ * 128), &tdo, q_full + st, sub * 64, i0, h, bi,
                        l2_evict_last());
          }
        } else {
          mbar_arrive(q_full + st);
        }
      }
    }
  } else {  // consumer warpgroups 1, 2: keys j0 + 64 (wg - 1)..
    setmaxnreg_inc<232>();
    const int wg = warpgroup_uniform() - 1, warp = (tid / 32) % 4, lane = tid % 32, g = lane / 4, t = lane % 4;
    const int64_t jw = j0 + 64 * wg, jr = jw + 16 * warp + g;
    const uint32_t k_addr = smem_addr(Ks) + wg * 64 * 128, v_addr = smem_addr(Vs) + wg * 64 * 128;
    float dk[HD / 2], dv[HD / 2];
#pragma unroll
    for (int i = 0; i < HD / 2; ++i) dk[i] = dv[i] = 0.0f;
    mbar_wait(kv_full, 0);  // (also with no step: the block does not exit with the copies in flight)
    for (int64_t it = 0; it < niter; ++it) {
      const int st = int(it & 1);
      mbar_wait(q_full + st, use(it));
      const int64_t i0 = (qb_lo + it % nqe) * BMQ;
      uint32_t da[BMQ / 16][4];
      dkdv_step<E, HD, CAUSAL>(dk, dv, k_addr, v_addr, smem_addr(Qs + st * C::kQStage),
                               smem_addr(Ds + st * C::kQStage), St + st * 3 * BMQ, i0, jw, jr, d, t, da);
      mbar_arrive(q_empty + st);
      if constexpr (FUSED) {
        // da[k][e] (dS^T): key 64 wg + 16 warp + g + 8 (e % 2), queries 8 n + 2 t, + 1 with n = 2 k + e / 2, at
        // byte swizzle128(key * 128 + 16 n + 4 t) of Ss[it % 2] (two buffers: a warpgroup writes one while the
        // other may still read the other in its last step's GEMM; it read this one two steps ago, before the
        // barrier of the last step)
        unsigned char* ss = Ss + st * C::kDsTile;
#pragma unroll
        for (int k = 0; k < BMQ / 16; ++k)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int key = 64 * wg + 16 * warp + g + 8 * (e & 1), n = 2 * k + (e >> 1);
            *reinterpret_cast<uint32_t*>(ss + swizzle128(uint32_t(key * 128 + 16 * n + 4 * t))) = da[k][e];
          }
        // BULK: the issuing warp's reductions of the last step have read the staging tile (the barrier tells the
        // warpgroup; a whole step has passed since they were issued)
        if (BULK && warp == 0) bulk_wait_read<0>();
        fence_proxy_async();
        named_bar_sync(1, NCONS);  // both warpgroups' dS^T written
        float dqp[32];  // HD 128: dQ[:, 64 wg..] over the block's keys; HD 64: dQ over this warpgroup's keys
        if constexpr (HD == 128)
          issue_ab_mn<E, 64, BNK>(dqp, smem_addr(ss), smem_addr(Ks) + wg * (BNK * 128));
        else  // (the warpgroup's 64 key rows of dS^T and of K)
          issue_ab_mn<E, 64, 64>(dqp, smem_addr(ss) + wg * (64 * 128), smem_addr(Ks) + wg * (64 * 128));
        wgmma_wait<0>();
        fence_operands(dqp);
        // this warpgroup's chunk of the accumulator (query block i0 / 64, columns 64 wg.. at HD 128; at HD 64 both
        // warpgroups add into the one chunk), registers 4 n .. 4 n + 3 at float4 n * 128 + w (kDqChunkFloats; rows
        // past Lq land in the last block's padding, which nothing reads)
        const int64_t h = hk * G + it / nqe;
        float* acc = dq_acc + ((b * p.Hq + h) * ((p.Lq + 63) & ~int64_t(63)) + i0) * HD +  // (no division here:
                     (HD == 128 ? wg * kDqChunkFloats : 0);  // one made ptxas inject a warpgroup.arrive, C7519)
        const int w = 32 * warp + lane;
        if constexpr (BULK) {
          float* stage = Dq + wg * kDqChunkFloats;
#pragma unroll
          for (int n = 0; n < 8; ++n)
            *reinterpret_cast<float4*>(stage + (n * 128 + w) * 4) =
                make_float4(dqp[4 * n], dqp[4 * n + 1], dqp[4 * n + 2], dqp[4 * n + 3]);
          fence_proxy_async();
          named_bar_sync(2 + wg, 128);  // the warpgroup's chunk staged
          if (warp == 0 && lane == 0) {
            bulk_reduce_add_f32(acc, stage, C::kDqStage);
            bulk_commit();
          }
        } else {
#pragma unroll
          for (int n = 0; n < 8; ++n)
            atomic_add4(acc + (n * 128 + w) * 4, dqp[4 * n], dqp[4 * n + 1], dqp[4 * n + 2], dqp[4 * n + 3]);
        }
      }
    }
    if (BULK && warp == 0) bulk_wait_read<0>();  // (the staging tiles stay valid until read)
    store_dk_dv<E, HD>(p, b, hk, jr, dk, dv, t);
  }
#else
  __trap();  // not an sm_90a pass: bwd_sm90 never launches this
#endif
}

// dQ: see the file comment.
template <class E, int HD, bool CAUSAL>
__global__ void __launch_bounds__(256, 1)
    attn_bwd_dq_sm90_kernel(const AttnBwdParams p, const Derived d,
                            const float* __restrict__ lse2,  // (B, Hq, Lq) from attn_bwd_pre_kernel
                            const float* __restrict__ l2,    // (B, Hq, Lq)
                            const float* __restrict__ delta  // (B, Hq, Lq)
    ) {
#ifdef PYATTN_SM90_KERNEL
  using C = BwdCfg<HD>;
  constexpr int BM = C::BM, BN = C::BN, NT = C::NT;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  unsigned char* Qs = align1024(smem_raw);  // [SUB][BM][64] swizzled
  unsigned char* Ds = Qs + C::kQTile;                                        // [SUB][BM][64] dout
  unsigned char* Ks = Ds + C::kQTile;                                        // [2][SUB][BN][64]
  unsigned char* Vs = Ks + 2 * C::kKVStage;                                  // [2][SUB][BN][64]

  const int tid = threadIdx.x, wg = warpgroup_uniform();
  const int warp = (tid / 32) % 4, lane = tid % 32, g = lane / 4, t = lane % 4;
  const FwdBlock fb = fwd_block<CAUSAL, BM, BN>(p, d, blockIdx.x);
  const int64_t b = fb.b, h = fb.h, hk = fb.hk, i0 = fb.i0;
  const int nkb = fb.nkb;
  const uint16_t* kg = static_cast<const uint16_t*>(p.k) + b * p.k_stride[0] + hk * p.k_stride[1];
  const uint16_t* vg = static_cast<const uint16_t*>(p.v) + b * p.v_stride[0] + hk * p.v_stride[1];
  auto stage = [&](int kb) {  // key block kb into stage kb % 2
    const int64_t j0 = int64_t(kb) * BN;
    const int n = int(imin(BN, p.Lk - j0));
    load_tile_sw128<BN, HD, NT>(Ks + (kb & 1) * C::kKVStage, kg + j0 * p.k_stride[2], p.k_stride[2], n, tid);
    load_tile_sw128<BN, HD, NT>(Vs + (kb & 1) * C::kKVStage, vg + j0 * p.v_stride[2], p.v_stride[2], n, tid);
  };
  load_tile_sw128<BM, HD, NT>(
      Qs, static_cast<const uint16_t*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1] + i0 * p.q_stride[2],
      p.q_stride[2], fb.nq, tid);
  load_tile_sw128<BM, HD, NT>(
      Ds, static_cast<const uint16_t*>(p.dout) + b * p.dout_stride[0] + h * p.dout_stride[1] + i0 * p.dout_stride[2],
      p.dout_stride[2], fb.nq, tid);
  if (nkb > 0) stage(0);
  cp_async_commit();

  const int64_t r0 = i0 + 64 * wg + 16 * warp + g;  // this thread's rows r0, r0 + 8
  float lse_r[2], l2_r[2], delta_r[2];               // their statistics (rows past Lq: P = 0, never stored)
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const bool ok = r0 + 8 * r < p.Lq;
    const int64_t row = fb.bh * p.Lq + r0 + 8 * r;
    lse_r[r] = ok ? lse2[row] : INFINITY;
    l2_r[r] = ok ? l2[row] : 0.0f;
    delta_r[r] = ok ? delta[row] : 0.0f;
  }
  const uint32_t q_addr = smem_addr(Qs) + wg * 64 * 128, do_addr = smem_addr(Ds) + wg * 64 * 128;
  const float c = d.scale_log2;
  float dq[HD / 2];
#pragma unroll
  for (int i = 0; i < HD / 2; ++i) dq[i] = 0.0f;

  for (int kb = 0; kb < nkb; ++kb) {
    const int64_t j0 = int64_t(kb) * BN;
    if (kb + 1 < nkb) stage(kb + 1);  // the stage of key block kb - 1 (done last iteration)
    cp_async_commit();
    cp_async_wait<1>();  // Q, dO and key block kb have landed (this thread's copies) ...
    fence_proxy_async();  // ... visible to the tensor cores ...
    __syncthreads();      // ... and every thread's
    const uint32_t k_addr = smem_addr(Ks + (kb & 1) * C::kKVStage), v_addr = smem_addr(Vs + (kb & 1) * C::kKVStage);

    float s[BN / 2], dp[BN / 2];
    issue_abt<E, BN, HD, BM, BN>(s, q_addr, k_addr);    // S = Q K^T
    issue_abt<E, BN, HD, BM, BN>(dp, do_addr, v_addr);  // dP = dO V^T
    wgmma_wait<1>();  // S has landed
    fence_operands(s);
    // P; element (n, e): row r0 + 8 (e / 2), key j0 + 8 n + 2 t + e % 2. 0 past Lk (a huge P times a zero row of K
    // would be NaN) and where causal hides the key.
    // Two copies, masked and not (as one, ptxas predicates the mask's compares and selects into every key block: 64
    // of the loop's 549 SASS instructions)
    auto probs = [&](auto masked) {
      int lim[2];
      if (masked) key_limits<CAUSAL, BN>(lim, r0, j0, t, p.Lk, d.shift);
#pragma unroll
      for (int n = 0; n < BN / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = e >> 1;
          float x = fmaf(s[4 * n + e], c, -lse_r[r]) - l2_r[r];
          if (masked && key_masked(lim, n, e)) x = -INFINITY;
          s[4 * n + e] = fast_exp2(x);
        }
    };
    if (j0 + BN > p.Lk || (CAUSAL && j0 + BN - 1 > i0 + d.shift))
      probs(std::true_type());
    else
      probs(std::false_type());
    wgmma_wait<0>();  // dP has landed
    fence_operands(dp);
#pragma unroll
    for (int n = 0; n < BN / 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[4 * n + e] *= dp[4 * n + e] - delta_r[e >> 1];
    uint32_t da[BN / 16][4];
    pack_a<E, BN>(da, s);
    issue_ab<E, HD, BN>(dq, da, k_addr);  // dQ += dS K
    wgmma_wait<0>();
    fence_operands(dq);
    __syncthreads();  // every warpgroup is done with the stage the next iteration refills
  }
  cp_async_wait<0>();  // (no key block: the Q / dO copies are still in flight)

  store_rows<E, HD>(static_cast<uint16_t*>(p.dq) + b * p.dq_stride[0] + h * p.dq_stride[1], p.dq_stride[2], r0,
                    p.Lq, dq, p.scale, t);
#else
  __trap();  // not an sm_90a pass: bwd_sm90 never launches this
#endif
}

// dq = dq_acc * scale in the storage dtype (after the fused dK / dV kernel): a block of 128 threads per chunk of the
// accumulator (64 rows x 64 columns, attention_utils.cuh kDqChunkFloats), thread w reading float4s n * 128 + w
// (coalesced) = rows 16 (w / 32) + (w % 32) / 4 (+ 8), columns 8 n + 2 (w % 4) (+ 1) of the chunk, rows past Lq
// skipped (4-byte stores: dq's rows are 16-byte aligned, its columns even).
template <class E, int HD>
__global__ void __launch_bounds__(128) attn_bwd_dq_convert_kernel(const AttnBwdParams p,
                                                                  const float* __restrict__ dq_acc) {
  constexpr int SUB = HD / 64;
  const int64_t nqb = (p.Lq + 63) / 64, chunk = blockIdx.x, cc = chunk % SUB, qb = chunk / SUB % nqb,
                bh = chunk / SUB / nqb, b = bh / p.Hq, h = bh % p.Hq;
  const int w = threadIdx.x, lane = w % 32;
  const int64_t i = qb * 64 + 16 * (w / 32) + lane / 4;  // rows i, i + 8
  const float* src = dq_acc + chunk * kDqChunkFloats;
  uint16_t* dq = static_cast<uint16_t*>(p.dq) + b * p.dq_stride[0] + h * p.dq_stride[1] + i * p.dq_stride[2] +
                 64 * cc + 2 * (lane % 4);
  const float c = p.scale;
#pragma unroll
  for (int n = 0; n < 8; ++n) {
    const float4 x = *reinterpret_cast<const float4*>(src + (n * 128 + w) * 4);
    if (i < p.Lq) *reinterpret_cast<uint32_t*>(dq + 8 * n) = E::pack(x.x * c, x.y * c);
    if (i + 8 < p.Lq) *reinterpret_cast<uint32_t*>(dq + 8 * p.dq_stride[2] + 8 * n) = E::pack(x.z * c, x.w * c);
  }
}

// The dK / dV kernel (and, fused, dQ): warp-specialized when pl.ws and the TMA maps can be made, else the cp.async
// one (and then the dQ kernel: fused needs the maps). Returns whether dQ is done (*err: the status).
template <class E, int HD, bool CAUSAL>
bool launch_dkdv(const AttnBwdParams& p, const Derived& d, const Sm90BwdPlan& pl, const float* lse2, const float* l2,
                 const float* delta, float* dq_acc, cudaStream_t stream, cudaError_t* err) {
  using C = BwdCfg<HD>;
  const int64_t blocks = (p.Lk + C::BNK - 1) / C::BNK * p.B * p.Hkv;
  CUtensorMap tq, tk, tv, tdo;
  if (pl.ws && make_map(&tq, p.q, p.dtype, p.B, p.Hq, p.Lq, p.D, p.q_stride, C::BMQ) &&
      make_map(&tk, p.k, p.dtype, p.B, p.Hkv, p.Lk, p.D, p.k_stride, C::BNK) &&
      make_map(&tv, p.v, p.dtype, p.B, p.Hkv, p.Lk, p.Dv, p.v_stride, C::BNK) &&
      make_map(&tdo, p.dout, p.dtype, p.B, p.Hq, p.Lq, p.Dv, p.dout_stride, C::BMQ)) {
    if (pl.fused) {
      auto kernel = pl.bulk ? attn_bwd_dkdv_sm90_ws_kernel<E, HD, CAUSAL, DqBy::Bulk>
                            : attn_bwd_dkdv_sm90_ws_kernel<E, HD, CAUSAL, DqBy::Atomic>;
      const size_t smem = pl.bulk ? C::dkdv_bulk_smem : C::dkdv_fused_smem;
      if ((*err = fit_kernel(kernel, smem)) != cudaSuccess) return true;
      kernel<<<unsigned(blocks), 384, smem, stream>>>(tq, tk, tv, tdo, p, d, lse2, l2, delta, dq_acc);
      if ((*err = cudaGetLastError()) != cudaSuccess) return true;
      attn_bwd_dq_convert_kernel<E, HD><<<unsigned(dq_acc_floats(p.B * p.Hq, p.Lq, HD) / kDqChunkFloats), 128, 0,
                                          stream>>>(p, dq_acc);
      *err = cudaGetLastError();
      return true;
    }
    auto kernel = attn_bwd_dkdv_sm90_ws_kernel<E, HD, CAUSAL, DqBy::Kernel>;
    if ((*err = fit_kernel(kernel, C::dkdv_ws_smem)) != cudaSuccess) return true;
    kernel<<<unsigned(blocks), 384, C::dkdv_ws_smem, stream>>>(tq, tk, tv, tdo, p, d, lse2, l2, delta, nullptr);
    *err = cudaGetLastError();
    return false;
  }
  auto kernel = attn_bwd_dkdv_sm90_kernel<E, HD, CAUSAL>;
  if ((*err = fit_kernel(kernel, C::dkdv_smem)) != cudaSuccess) return true;
  kernel<<<unsigned(blocks), C::NT, C::dkdv_smem, stream>>>(p, d, lse2, l2, delta);
  *err = cudaGetLastError();
  return false;
}

template <class E, int HD, bool CAUSAL>
cudaError_t launch_bwd(const AttnBwdParams& p, const Derived& d, const Sm90BwdPlan& pl, const float* lse2,
                       const float* l2, const float* delta, float* dq_acc, cudaStream_t stream) {
  using C = BwdCfg<HD>;
  cudaError_t err = cudaSuccess;
  if (launch_dkdv<E, HD, CAUSAL>(p, d, pl, lse2, l2, delta, dq_acc, stream, &err) || err != cudaSuccess) return err;
  auto dq = attn_bwd_dq_sm90_kernel<E, HD, CAUSAL>;
  if ((err = fit_kernel(dq, C::dq_smem)) != cudaSuccess) return err;
  const int64_t dq_blocks = (p.Lq + C::BM - 1) / C::BM * p.B * p.Hq;
  dq<<<unsigned(dq_blocks), C::NT, C::dq_smem, stream>>>(p, d, lse2, l2, delta);
  return cudaGetLastError();
}

template <class E>
cudaError_t launch_bwd_e(const AttnBwdParams& p, const Derived& d, const Sm90BwdPlan& pl, const float* lse2,
                         const float* l2, const float* delta, float* dq_acc, cudaStream_t stream) {
  if (p.D == 64)
    return p.causal ? launch_bwd<E, 64, true>(p, d, pl, lse2, l2, delta, dq_acc, stream)
                    : launch_bwd<E, 64, false>(p, d, pl, lse2, l2, delta, dq_acc, stream);
  return p.causal ? launch_bwd<E, 128, true>(p, d, pl, lse2, l2, delta, dq_acc, stream)
                  : launch_bwd<E, 128, false>(p, d, pl, lse2, l2, delta, dq_acc, stream);
}

}  // namespace sm90

// Default: the warp-specialized dK / dV kernel adding dQ with bulk reductions (fused), outside deterministic mode;
// in it (torch.use_deterministic_algorithms) the same dK / dV kernel and the dQ kernel (no atomics, repeatable bits).
// Measured on the H100 (bf16, L = 4096, ms non-causal / causal, 3 interleaved rounds in one process, code 4bb3540:
// benchmarks/results/nvidia-h100-80gb-hbm3/gpu-attn-bwd-variants.log):
//   HD 128: fused 3.07 / 1.76, fused with float4 atomics 3.02 / 1.83, warp-specialized + dQ kernel 3.71 / 2.10,
//           cp.async 4.37 / 2.47; torch flash 4.74 / 2.75, cuDNN 2.72 / 1.60
//   HD 64:  fused 4.19 / 2.47, atomics 4.39 / 2.59, warp-specialized 4.99 / 2.94, cp.async 6.01 / 3.41;
//           torch flash 5.06 / 2.97, cuDNN 3.25 / 1.88
// (the H200's run H / I timed the fused kernels with the old row-major accumulator: bulk 4.85 / 2.59 at HD 128.)
// The fused kernels cost an fp32 accumulator of dQ's size (B Hq Lq D x 4 bytes of workspace) and run-to-run dQ bits
// (the order of the additions), as FA3's default backward.
// PYATTN_CUDA_ATTN_SM90_BWD=0: off (attention.cu's mma.sync kernels); =cp: the cp.async dK / dV kernel and the dQ
// kernel; =ws: the warp-specialized dK / dV kernel and the dQ kernel (deterministic mode's pair, named for tests and
// the variants script); =fused: the default (named); =fusedat: the fused kernel with float4 atomics.
Sm90BwdPlan sm90_bwd_plan(const AttnBwdParams& p, const Derived& d) {
  Sm90BwdPlan pl;
#if defined(PYATTN_SM90A) || defined(PYATTN_CUDA_EMU)  // (else no sm_90a code in this build)
  const char* env = std::getenv("PYATTN_CUDA_ATTN_SM90_BWD");  // read per call: tests and benchmarks switch it
  auto is = [&](const char* v) { return env != nullptr && std::strcmp(env, v) == 0; };
  pl.take = !is("0") && p.arch == 90 && (p.dtype == DType::F16 || p.dtype == DType::BF16) &&
            (p.D == 64 || p.D == 128) && p.Dv == p.D && p.mask_kind == MaskKind::None && !d.dropout && d.vec_q &&
            d.vec_k && d.vec_v && d.vec_do && d.vec_dq && d.vec_dk && d.vec_dv;
  pl.ws = pl.take && !is("cp");
  pl.fused = pl.ws && !is("ws") && !p.deterministic;
  pl.bulk = pl.fused && !is("fusedat");
#else
  (void)p;
  (void)d;
#endif
  return pl;
}

cudaError_t bwd_sm90(const AttnBwdParams& p, const Derived& d, const Sm90BwdPlan& pl, const float* lse2,
                     const float* l2, const float* delta, float* dq_acc, cudaStream_t stream) {
  if (pl.fused && dq_acc == nullptr) return cudaErrorInvalidValue;
  return p.dtype == DType::F16 ? sm90::launch_bwd_e<F16>(p, d, pl, lse2, l2, delta, dq_acc, stream)
                               : sm90::launch_bwd_e<BF16>(p, d, pl, lse2, l2, delta, dq_acc, stream);
}

}  // namespace attn
}  // namespace cuda
}  // namespace pyattn
