// CUDA attention backward for Hopper (sm_90a): the FlashAttention-2 backward of attention.cu (a dK / dV kernel over
// key blocks and a dQ kernel over query blocks, both after attn_bwd_pre_kernel's row statistics lse2, l2, delta) on
// warpgroup MMA (wgmma, csrc/cuda/wgmma.cuh) instead of mma.sync. Same contract and semantics as attention.cu's
// kernels (causal with both alignments, GQA summed in a fixed order: deterministic, no atomics; a row that saw no
// key has lse +inf, so P = 0 and its dQ is 0); it takes the common case only (bwd_sm90: fp16 / bf16, D == Dv in
// {64, 128}, no mask, no dropout, 16-byte-aligned rows of every tensor), attention.cu's kernels the rest.
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
//     dK * scale and dV are stored from registers.
//   dQ (attn_bwd_dq_sm90_kernel): BM = 128 query rows of one (b, h) per block in fwd_block's order (causal:
//     heaviest first), warpgroup wg rows i0 + 64 wg.. (Q and dO stay in shared memory); key blocks of BN = 64 stream
//     through a double buffer of K and V:
//       S = Q K^T, dP = dO V^T (m64n64k16), P and dS = P (dP - delta), dQ (64 x HD) += dS K (m64nHDk16, B = K N-major)
//     dQ * scale is stored from registers.
// Registers per thread (HD 128): dK / dV kernel S^T 32 + dP^T 32 + dK 64 + dV 64 fp32 + P^T and dS^T 16 + 16 packed;
// dQ kernel S 32 + dP 32 + dQ 64 fp32 + dS 16 packed.
// Shared memory (HD 128): dK / dV 1 KB alignment slack + (2 BNK + 4 BMQ) HD 2 bytes + statistics 2 * 3 * BMQ * 4 =
// 130.5 KB; dQ 1 KB + (2 BM + 4 BN) HD 2 = 129 KB (one block per SM; HD 64: about half, and the registers
// allow two).
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "attention_utils.cuh"
#include "launch.cuh"
#include "pyattn/params.h"
#include "wgmma.cuh"

#if defined(PYATTN_CUDA_EMU) || (defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL))
#define PYATTN_SM90_KERNEL 1  // the device code of this pass can run the kernels (sm_90a, or the CPU emulator)
#endif

namespace pyattn {
namespace cuda {
namespace attn {
namespace sm90 {

template <int HD_>
struct BwdCfg {
  static constexpr int HD = HD_, NT = 256;
  static constexpr int BNK = 128, BMQ = 64;  // dK / dV: keys per block, query rows per step
  static constexpr int BM = 128, BN = 64;    // dQ: query rows per block, keys per step
  static constexpr uint32_t kKeyTile = BNK * HD * 2, kQStage = BMQ * HD * 2;  // bytes
  static constexpr uint32_t kQTile = BM * HD * 2, kKVStage = BN * HD * 2;
  static constexpr size_t dkdv_smem = 1024 + 2 * size_t(kKeyTile) + 4 * size_t(kQStage) + 2 * 3 * BMQ * 4;
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

// dK, dV: see the file comment. Block: key block kb of (b, kv head hk); causal launches the key blocks that the most
// query rows see (the first ones) first.
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
  unsigned char* Ks = smem_raw + (1024 - smem_addr(smem_raw) % 1024) % 1024;  // [SUB][BNK][64] swizzled
  unsigned char* Vs = Ks + C::kKeyTile;                                      // [SUB][BNK][64]
  unsigned char* Qs = Vs + C::kKeyTile;                                      // [2][SUB][BMQ][64]
  unsigned char* Ds = Qs + 2 * C::kQStage;                                   // [2][SUB][BMQ][64] dout
  float* St = reinterpret_cast<float*>(Ds + 2 * C::kQStage);                 // [2][3][BMQ]: lse2, l2, delta

  const int tid = threadIdx.x, wg = tid / 128, warp = (tid / 32) % 4, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int64_t BHk = p.B * p.Hkv, kb = blockIdx.x / BHk, bhk = blockIdx.x % BHk;
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
    if (tid < BMQ) {  // rows past Lq: lse2 +inf (P = 0), delta 0
      float* st = St + buf * 3 * BMQ;
      const bool ok = tid < nq;
      const int64_t row = (b * p.Hq + h) * p.Lq + i0 + tid;
      st[tid] = ok ? lse2[row] : INFINITY;
      st[BMQ + tid] = ok ? l2[row] : 0.0f;
      st[2 * BMQ + tid] = ok ? delta[row] : 0.0f;
    }
  };
  if (niter > 0) stage(0, 0);
  cp_async_commit();

  const int64_t jw = j0 + 64 * wg;                 // the warpgroup's first key
  const int64_t jr = jw + 16 * warp + g;           // this thread's keys jr, jr + 8 (rows of S^T, dK, dV)
  const uint32_t k_addr = smem_addr(Ks) + wg * 64 * 128, v_addr = smem_addr(Vs) + wg * 64 * 128;
  const float c = d.scale_log2;
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
    const float* st = St + buf * 3 * BMQ;

    float s[BMQ / 2], dp[BMQ / 2];
    issue_abt<E, BMQ, HD, BNK, BMQ>(s, k_addr, q_addr);    // S^T = K Q^T
    issue_abt<E, BMQ, HD, BNK, BMQ>(dp, v_addr, do_addr);  // dP^T = V dO^T
    wgmma_wait<1>();  // S^T has landed
    fence_operands(s);
    // P^T; element (n, e): key jr + 8 (e / 2), query i0 + 8 n + 2 t + e % 2. Causal: 0 where j > i + shift.
    const bool check = CAUSAL && jw + 63 > i0 + d.shift;
#pragma unroll
    for (int n = 0; n < BMQ / 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int il = 8 * n + 2 * t + (e & 1);
        float x = fmaf(s[4 * n + e], c, -st[il]) - st[BMQ + il];
        if (check && jr + (e >> 1) * 8 > i0 + il + d.shift) x = -INFINITY;
        s[4 * n + e] = fast_exp2(x);
      }
    uint32_t pa[BMQ / 16][4];
    pack_a<E, BMQ>(pa, s);
    issue_ab<E, HD, BMQ>(dv, pa, do_addr);  // dV += P^T dO (runs during dS^T)
    wgmma_wait<1>();  // dP^T has landed
    fence_operands(dp);
#pragma unroll
    for (int n = 0; n < BMQ / 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[4 * n + e] *= dp[4 * n + e] - st[2 * BMQ + 8 * n + 2 * t + (e & 1)];
    uint32_t da[BMQ / 16][4];
    pack_a<E, BMQ>(da, s);
    issue_ab<E, HD, BMQ>(dk, da, q_addr);  // dK += dS^T Q
    wgmma_wait<0>();
    fence_operands(dv);
    fence_operands(dk);
    __syncthreads();  // every warpgroup is done with the stage the next iteration refills
  }
  cp_async_wait<0>();  // (no query block: the K / V copies are still in flight)

  store_rows<E, HD>(static_cast<uint16_t*>(p.dk) + b * p.dk_stride[0] + hk * p.dk_stride[1], p.dk_stride[2], jr,
                    p.Lk, dk, p.scale, t);
  store_rows<E, HD>(static_cast<uint16_t*>(p.dv) + b * p.dv_stride[0] + hk * p.dv_stride[1], p.dv_stride[2], jr,
                    p.Lk, dv, 1.0f, t);
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
  unsigned char* Qs = smem_raw + (1024 - smem_addr(smem_raw) % 1024) % 1024;  // [SUB][BM][64] swizzled
  unsigned char* Ds = Qs + C::kQTile;                                        // [SUB][BM][64] dout
  unsigned char* Ks = Ds + C::kQTile;                                        // [2][SUB][BN][64]
  unsigned char* Vs = Ks + 2 * C::kKVStage;                                  // [2][SUB][BN][64]

  const int tid = threadIdx.x, wg = tid / 128, warp = (tid / 32) % 4, lane = tid % 32, g = lane / 4, t = lane % 4;
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
    const bool check = j0 + BN > p.Lk || (CAUSAL && j0 + BN - 1 > i0 + d.shift);
#pragma unroll
    for (int n = 0; n < BN / 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1;
        float x = fmaf(s[4 * n + e], c, -lse_r[r]) - l2_r[r];
        if (check) {
          const int64_t j = j0 + 8 * n + 2 * t + (e & 1);
          if (j >= p.Lk || (CAUSAL && j > r0 + 8 * r + d.shift)) x = -INFINITY;
        }
        s[4 * n + e] = fast_exp2(x);
      }
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

template <class E, int HD, bool CAUSAL>
cudaError_t launch_bwd(const AttnBwdParams& p, const Derived& d, const float* lse2, const float* l2,
                       const float* delta, cudaStream_t stream) {
  using C = BwdCfg<HD>;
  auto dkdv = attn_bwd_dkdv_sm90_kernel<E, HD, CAUSAL>;
  cudaError_t err = fit_kernel(dkdv, C::dkdv_smem);
  if (err != cudaSuccess) return err;
  const int64_t dkdv_blocks = (p.Lk + C::BNK - 1) / C::BNK * p.B * p.Hkv;
  dkdv<<<unsigned(dkdv_blocks), C::NT, C::dkdv_smem, stream>>>(p, d, lse2, l2, delta);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  auto dq = attn_bwd_dq_sm90_kernel<E, HD, CAUSAL>;
  if ((err = fit_kernel(dq, C::dq_smem)) != cudaSuccess) return err;
  const int64_t dq_blocks = (p.Lq + C::BM - 1) / C::BM * p.B * p.Hq;
  dq<<<unsigned(dq_blocks), C::NT, C::dq_smem, stream>>>(p, d, lse2, l2, delta);
  return cudaGetLastError();
}

template <class E>
cudaError_t launch_bwd_e(const AttnBwdParams& p, const Derived& d, const float* lse2, const float* l2,
                         const float* delta, cudaStream_t stream) {
  if (p.D == 64)
    return p.causal ? launch_bwd<E, 64, true>(p, d, lse2, l2, delta, stream)
                    : launch_bwd<E, 64, false>(p, d, lse2, l2, delta, stream);
  return p.causal ? launch_bwd<E, 128, true>(p, d, lse2, l2, delta, stream)
                  : launch_bwd<E, 128, false>(p, d, lse2, l2, delta, stream);
}

}  // namespace sm90

// PYATTN_CUDA_ATTN_SM90_BWD=0 in the environment: off (attention.cu's mma.sync kernels).
bool bwd_sm90(const AttnBwdParams& p, const Derived& d, const float* lse2, const float* l2, const float* delta,
              cudaStream_t stream, cudaError_t* err) {
  bool take = false;
#if defined(PYATTN_SM90A) || defined(PYATTN_CUDA_EMU)  // (else no sm_90a code in this build)
  const char* env = std::getenv("PYATTN_CUDA_ATTN_SM90_BWD");  // read per call: tests and benchmarks switch it
  take = !(env != nullptr && std::strcmp(env, "0") == 0) && p.arch == 90 &&
         (p.dtype == DType::F16 || p.dtype == DType::BF16) && (p.D == 64 || p.D == 128) && p.Dv == p.D &&
         p.mask_kind == MaskKind::None && !d.dropout && d.vec_q && d.vec_k && d.vec_v && d.vec_do && d.vec_dq &&
         d.vec_dk && d.vec_dv;
#endif
  if (!take) return false;
  *err = p.dtype == DType::F16 ? sm90::launch_bwd_e<F16>(p, d, lse2, l2, delta, stream)
                               : sm90::launch_bwd_e<BF16>(p, d, lse2, l2, delta, stream);
  return true;
}

}  // namespace attn
}  // namespace cuda
}  // namespace pyattn
