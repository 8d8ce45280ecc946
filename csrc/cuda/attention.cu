// CUDA attention kernels: FlashAttention-2 forward and backward on tensor cores (mma.sync m16n8k16, fp16/bf16 in,
// fp32 accumulation). Torch-free; the contract is the Attention section of pyattn/params.h, the semantics those of
// the CPU kernel (csrc/cpu/attention.cpp) and the Triton kernel (kernels/attention.py):
//   x_ij = scale * log2(e) * q_i . k_j (+ mask * log2(e); -inf where a bool mask is false, causal hides j
//          (j > i + shift, shift = Lk - Lq when bottom_right else 0) or j >= Lk)
//   forward: online softmax in base 2 per query row, out_i = sum_j p_ij keep_ij / (1 - p) v_j / l_i,
//            lse_i = ln 2 * (m_i + log2 l_i) (fp32, natural log); a row that sees no key: out 0, lse +inf.
//   dropout: keep_ij from the hash of pyattn/attn_dropout.h (the CPU kernel's, bit for bit).
//   GQA: query head h reads kv head h / (Hq / Hkv); nothing is copied.
//
// Head dims: one kernel set per padded head dim HD in {64, 128, 256} with max(D, Dv) <= HD; columns >= D (q, k) and
// >= Dv (v, dout) are zero-filled in shared memory, so any D, Dv <= 256 works (k-steps past D / Dv are skipped).
// Rows: any Lq, Lk; tails are zero-filled on load, masked (-inf) where they would change a result, never stored.
// Loads: cp.async 16-byte copies when a tensor's rows are 16-byte aligned (pointer and b/h/l strides, D % 8 == 0);
// otherwise 2-byte loads and stores (a slower path, same results).
//
// Tiles (4 warps = 128 threads per block; every warp owns 16 rows of the block's M dimension; shared-memory rows are
// padded by 8 elements so ldmatrix and cp.async are conflict-free):
//   forward  (attn_fwd_kernel):  BM query rows x key blocks of BN, K/V double-buffered with cp.async; P goes from
//            the S accumulators straight into the A operand of O += P V. HD 64: BM 128 (2 m-tiles of 16 rows per warp,
//            each K / V fragment feeding 2 mma's), BN 32; HD 128: BM 128, BN 32; HD 256: BM 64 (1 m-tile per warp),
//            BN 32 (BN 64 with 2 m-tiles spills registers). Grid: one block per (BM query rows, b, h); causal: the heaviest rows first.
//   backward (FA2): attn_bwd_pre_kernel: delta = rowsum(dO * O), lse in log2 units (one warp per row);
//            attn_bwd_dkdv_kernel: 64 keys of one (b, kv head) per block (16 per warp), looping over the GQA group's
//            query heads and their query blocks of BMQ rows (Q / dO / row statistics double-buffered): S^T = K Q^T,
//            P^T, dP^T = V dO^T, dV += P^T dO, dS^T = P^T (dP^T - delta), dK += dS^T Q. The group is summed in a
//            fixed order inside one block: deterministic, no atomics.
//            attn_bwd_dq_kernel: 64 query rows per block over key blocks of BN: S, P, dP = dO V^T, dS, dQ += dS K.
//            Deterministic (no atomics).
//            For HD = 256 the dK/dV and dQ accumulators would not fit in registers: those kernels split the output
//            columns in chunks of DC = 128 (grid dimension), each chunk recomputing S and dP.
//            On Hopper the common case runs on wgmma instead, after the same pre kernel (attention_sm90_bwd.cu).
// Rows whose logits are all hugely negative (an additive mask of -1e9 or finfo.min on every visible key) have an
// lse too large for exp2(x - lse) to give P back in fp32; the backward recomputes their max m and
// l2 = log2 sum 2^(x - m) exactly (attn_bwd_pre_kernel; which rows: pyattn/attn_exact_rows.h) and uses
// P = exp2((x - m) - l2), as the CPU kernel does.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "attention_utils.cuh"
#include "launch.cuh"
#include "pyattn/attn_dropout.h"
#include "pyattn/attn_exact_rows.h"
#include "pyattn/cuda_kernels.h"
#include "pyattn/params.h"

namespace pyattn {
namespace cuda {
namespace attn {

// Tile shapes per padded head dim (see the file comment).
template <int HD>
struct Tiles {
  static constexpr int NW = 4;                          // warps per block, every kernel
  static constexpr int FWD_MT = HD <= 128 ? 2 : 1;      // forward: m-tiles (16 query rows) per warp
  static constexpr int FWD_BM = 16 * FWD_MT * NW;        // forward: query rows per block
  static constexpr int FWD_BN = 32;                     // forward: keys per iteration
  static constexpr int DC = HD <= 128 ? HD : 128;       // backward: output columns per block (dK, dV, dQ)
  static constexpr int DKDV_BMQ = HD <= 64 ? 64 : 32;   // dK/dV: query rows per iteration
  static constexpr int DQ_BN = HD <= 128 ? 64 : 32;     // dQ: keys per iteration
  static constexpr int LD = HD + kPad;
  static constexpr size_t kElem = sizeof(uint16_t);
  // Q [FWD_BM][LD] + K, V [2][FWD_BN][LD]
  static constexpr size_t fwd_smem = size_t(FWD_BM + 4 * FWD_BN) * LD * kElem;
  // K, V [64][LD] + Q, dO [2][BMQ][LD] + statistics [2][4][BMQ] fp32
  static constexpr size_t dkdv_smem = size_t(2 * 16 * NW + 4 * DKDV_BMQ) * LD * kElem + 8 * DKDV_BMQ * 4;
  // Q, dO [64][LD] + K, V [2][DQ_BN][LD]
  static constexpr size_t dq_smem = size_t(2 * 16 * NW + 4 * DQ_BN) * LD * kElem;
};

// ============================================================================================================
// Forward
// ============================================================================================================
// Block: BM = 16 * MT * NW query rows [i0, i0 + BM) of one (b, h); warp w owns the MT m-tiles of 16 rows starting at
// row i0 + 16 MT w (each K / V fragment read from shared memory feeds MT mma's); in m-tile mt this thread holds rows
// ri[mt] = i0 + 16 (MT w + mt) + g and ri[mt] + 8 of the S / O accumulators (g = lane / 4), columns 2t, 2t + 1 of
// each n-tile.
// FULL: D == Dv == HD, so no k-step or value column is skipped and the mma loops have no run-time exits (which
// lets ptxas issue the next k-step's ldmatrix ahead of this step's mma's). On sm_8x the causal kernels keep the
// exits: there the branch-free loops spill registers (scripts/compile_cuda.py).
template <class E, int HD, int BN, int MT, int NW, bool CAUSAL, bool FULL>
__global__ void __launch_bounds__(NW * 32) attn_fwd_kernel(const AttnFwdParams p, const Derived d) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  constexpr bool kFull = FULL && !CAUSAL;
#else
  constexpr bool kFull = FULL;
#endif
  constexpr int BM = 16 * MT * NW, NT = NW * 32, LD = HD + kPad;
  constexpr int KS = HD / 16;  // k-steps of S = Q K^T
  constexpr int NS = BN / 8;   // n-tiles of S (keys)
  constexpr int NO = HD / 8;   // n-tiles of O (value columns)
  constexpr bool kCacheQ = MT == 1 && HD <= 128;  // Q fragments in registers (else re-read from shared memory)

  extern __shared__ __align__(16) unsigned char smem_raw[];
  uint16_t* Qs = reinterpret_cast<uint16_t*>(smem_raw);  // [BM][LD] q tile (B, Hq, Lq, D); the out tile at the end
  uint16_t* Ks = Qs + BM * LD;                           // [2][BN][LD] k tiles (B, Hkv, Lk, D)
  uint16_t* Vs = Ks + 2 * BN * LD;                       // [2][BN][LD] v tiles (B, Hkv, Lk, Dv)

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const FwdBlock fb = fwd_block<CAUSAL, BM, BN>(p, d, blockIdx.x);
  const int64_t b = fb.b, h = fb.h, hk = fb.hk, i0 = fb.i0;
  const int nq = fb.nq, nkb = fb.nkb;
  const int D = int(p.D), Dv = int(p.Dv);
  const int wr0 = warp * 16 * MT;  // the warp's first row in the tile

  const uint16_t* qg = static_cast<const uint16_t*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1] + i0 * p.q_stride[2];
  const uint16_t* kg = static_cast<const uint16_t*>(p.k) + b * p.k_stride[0] + hk * p.k_stride[1];
  const uint16_t* vg = static_cast<const uint16_t*>(p.v) + b * p.v_stride[0] + hk * p.v_stride[1];
  auto load_kv = [&](int kb, int buf) {
    const int64_t j0 = int64_t(kb) * BN;
    const int nk = int(imin(BN, p.Lk - j0));
    load_tile<BN, HD, LD, NT>(Ks + buf * BN * LD, kg + j0 * p.k_stride[2], p.k_stride[2], nk, D, d.vec_k, tid);
    load_tile<BN, HD, LD, NT>(Vs + buf * BN * LD, vg + j0 * p.v_stride[2], p.v_stride[2], nk, Dv, d.vec_v, tid);
  };

  load_tile<BM, HD, LD, NT>(Qs, qg, p.q_stride[2], nq, D, d.vec_q, tid);
  if (nkb > 0) load_kv(0, 0);
  cp_async_commit();

  int64_t ri[MT];  // this thread's rows ri[mt], ri[mt] + 8
  uint32_t rkey[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    ri[mt] = i0 + wr0 + mt * 16 + g;
    rkey[mt][0] = rkey[mt][1] = 0u;
    if (d.dropout) {
      rkey[mt][0] = attn_dropout::dropout_row_key(p.seed, p.offset, p.Hq, p.Lq, b, h, ri[mt]);
      rkey[mt][1] = attn_dropout::dropout_row_key(p.seed, p.offset, p.Hq, p.Lq, b, h, ri[mt] + 8);
    }
  }
  const MaskView mv = make_mask_view(p, b, h);

  float o[MT][NO][4];
  float m_run[MT][2];  // running max (log2 units), quad-uniform
  float l_run[MT][2];  // running sum: this thread's columns only (quad-summed at the end)
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int n = 0; n < NO; ++n) o[mt][n][0] = o[mt][n][1] = o[mt][n][2] = o[mt][n][3] = 0.0f;
    m_run[mt][0] = m_run[mt][1] = -INFINITY;
    l_run[mt][0] = l_run[mt][1] = 0.0f;
  }
  uint32_t qf[kCacheQ ? KS : 1][4];

  for (int kb = 0; kb < nkb; ++kb) {
    const int buf = kb & 1;
    const int64_t j0 = int64_t(kb) * BN;
    if (kb + 1 < nkb) load_kv(kb + 1, buf ^ 1);  // prefetch the next key block into the other buffer
    cp_async_commit();
    cp_async_wait<1>();  // everything but the prefetch has landed (Q and this block's K, V)
    __syncthreads();
    const uint16_t* Kb = Ks + buf * BN * LD;
    const uint16_t* Vb = Vs + buf * BN * LD;

    if constexpr (kCacheQ) {
      if (kb == 0) {
#pragma unroll
        for (int kk = 0; kk < KS; ++kk) load_a<LD>(qf[kk], Qs, wr0, kk * 16, lane);
      }
    }

    // S (16 MT x BN per warp) = Q K^T
    float s[MT][NS][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int n = 0; n < NS; ++n) s[mt][n][0] = s[mt][n][1] = s[mt][n][2] = s[mt][n][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) {
      if (!kFull && kk * 16 >= D) break;  // zero columns
      uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        if constexpr (kCacheQ) {
          a[mt][0] = qf[kk][0];
          a[mt][1] = qf[kk][1];
          a[mt][2] = qf[kk][2];
          a[mt][3] = qf[kk][3];
        } else {
          load_a<LD>(a[mt], Qs, wr0 + mt * 16, kk * 16, lane);
        }
      }
#pragma unroll
      for (int n2 = 0; n2 < NS / 2; ++n2) {
        uint32_t bb[4];
        load_b_nk<LD>(bb, Kb, n2 * 16, kk * 16, lane);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          E::mma(s[mt][2 * n2], a[mt], bb[0], bb[1]);
          E::mma(s[mt][2 * n2 + 1], a[mt], bb[2], bb[3]);
        }
      }
    }

    // base-2 logits and masks (per element only where a mask, the causal diagonal or the key tail cuts the block)
    const bool check = j0 + BN > p.Lk || mv.kind != MaskKind::None || (CAUSAL && j0 + BN - 1 > i0 + d.shift);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int n = 0; n < NS; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float x = s[mt][n][e] * d.scale_log2;
          if (check)
            x = masked_logit<CAUSAL>(x, ri[mt] + (e >> 1) * 8, j0 + n * 8 + 2 * t + (e & 1), p.Lq, p.Lk, d.shift,
                                     mv);
          s[mt][n][e] = x;
        }

    // online softmax; a row that has seen only -inf keeps max -inf and subtracts 0 (exp2(-inf) = 0, no NaN)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      float alpha[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float mx = m_run[mt][r];
#pragma unroll
        for (int n = 0; n < NS; ++n)
          mx = fmaxf(mx, fmaxf(s[mt][n][2 * r], s[mt][n][2 * r + 1]));  // NaN scores are skipped
        mx = quad_max(mx);
        const float mu = mx == -INFINITY ? 0.0f : mx;
        alpha[r] = fast_exp2(m_run[mt][r] - mu);
        m_run[mt][r] = mx;
        float sum = 0.0f;
#pragma unroll
        for (int n = 0; n < NS; ++n) {
          s[mt][n][2 * r] = fast_exp2(s[mt][n][2 * r] - mu);
          s[mt][n][2 * r + 1] = fast_exp2(s[mt][n][2 * r + 1] - mu);
          sum += s[mt][n][2 * r] + s[mt][n][2 * r + 1];
        }
        l_run[mt][r] = l_run[mt][r] * alpha[r] + sum;
      }
#pragma unroll
      for (int n = 0; n < NO; ++n) {
        o[mt][n][0] *= alpha[0];
        o[mt][n][1] *= alpha[0];
        o[mt][n][2] *= alpha[1];
        o[mt][n][3] *= alpha[1];
      }
      if (d.dropout) {  // after l: the normalizer sees every key; kept probabilities are scaled by 1 / (1 - p)
#pragma unroll
        for (int n = 0; n < NS; ++n)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const bool keep =
                attn_dropout::dropout_keep(rkey[mt][e >> 1], j0 + n * 8 + 2 * t + (e & 1), d.drop_thr);
            s[mt][n][e] = keep ? s[mt][n][e] * d.inv_keep : 0.0f;
          }
      }
    }

    // O (16 MT x HD per warp) += P V: the S accumulators of n-tiles 2k, 2k + 1 are the A fragment of k-step k
#pragma unroll
    for (int k2 = 0; k2 < BN / 16; ++k2) {
      uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        a[mt][0] = E::pack(s[mt][2 * k2][0], s[mt][2 * k2][1]);
        a[mt][1] = E::pack(s[mt][2 * k2][2], s[mt][2 * k2][3]);
        a[mt][2] = E::pack(s[mt][2 * k2 + 1][0], s[mt][2 * k2 + 1][1]);
        a[mt][3] = E::pack(s[mt][2 * k2 + 1][2], s[mt][2 * k2 + 1][3]);
      }
#pragma unroll
      for (int d2 = 0; d2 < HD / 16; ++d2) {
        if (!kFull && d2 * 16 >= Dv) break;
        uint32_t bb[4];
        load_b_kn<LD>(bb, Vb, k2 * 16, d2 * 16, lane);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          E::mma(o[mt][2 * d2], a[mt], bb[0], bb[1]);
          E::mma(o[mt][2 * d2 + 1], a[mt], bb[2], bb[3]);
        }
      }
    }
    __syncthreads();  // every warp is done with this buffer before the next iteration refills it
  }

  // Epilogue: out = O / l (0 for a row that saw nothing), lse = (m + log2 l) ln 2 (+inf for such a row). Causal: the
  // block's (b, h) are found again rather than kept across the loop (the HD 128 kernel spills on sm_90 otherwise;
  // the non-causal one spills the other way round).
  cp_async_wait<0>();
  __syncthreads();  // (no key block: the Q copy must land before the out tile reuses its memory)
  const FwdBlock fe = CAUSAL ? fwd_block<CAUSAL, BM, BN>(p, d, blockIdx.x) : fb;
  uint16_t* Os = Qs;  // each warp writes only its own rows
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float l = quad_sum(l_run[mt][r]);
      const bool dead = !(l > 0.0f) && !isnan(l);
      inv[r] = dead ? 0.0f : 1.0f / l;
      const int64_t row = ri[mt] + 8 * r;
      if (t == 0 && row < p.Lq) p.lse[fe.bh * p.Lq + row] = dead ? INFINITY : (m_run[mt][r] + log2f(l)) * kLn2;
    }
    const int row0 = wr0 + mt * 16 + g;
#pragma unroll
    for (int n = 0; n < NO; ++n) {
      *reinterpret_cast<uint32_t*>(Os + row0 * LD + n * 8 + 2 * t) =
          E::pack(o[mt][n][0] * inv[0], o[mt][n][1] * inv[0]);
      *reinterpret_cast<uint32_t*>(Os + (row0 + 8) * LD + n * 8 + 2 * t) =
          E::pack(o[mt][n][2] * inv[1], o[mt][n][3] * inv[1]);
    }
  }
  __syncthreads();
  uint16_t* og =
      static_cast<uint16_t*>(p.out) + fe.b * p.out_stride[0] + fe.h * p.out_stride[1] + fe.i0 * p.out_stride[2];
  store_tile<BM, HD, LD, NT>(og, p.out_stride[2], Os, nq, Dv, d.vec_o, tid);
}

// ============================================================================================================
// Backward
// ============================================================================================================
__device__ __forceinline__ float dot8(uint4 a, uint4 b, bool bf16) {
  const uint32_t x[4] = {a.x, a.y, a.z, a.w}, y[4] = {b.x, b.y, b.z, b.w};
  float s = 0.0f;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const uint16_t xl = uint16_t(x[k] & 0xffffu), xh = uint16_t(x[k] >> 16);
    const uint16_t yl = uint16_t(y[k] & 0xffffu), yh = uint16_t(y[k] >> 16);
    s += bf16 ? BF16::to_float(xl) * BF16::to_float(yl) + BF16::to_float(xh) * BF16::to_float(yh)
              : F16::to_float(xl) * F16::to_float(yl) + F16::to_float(xh) * F16::to_float(yh);
  }
  return s;
}

// The exact row statistics of one query row whose lse is too large to hold l2 (one warp, lanes over keys; rare):
// m = max_j x_ij, l2 = log2 sum_j 2^(x_ij - m) (in double), over the keys the row sees.
template <class E>
__device__ void exact_row_stats(const AttnBwdParams& p, const Derived& d, int64_t b, int64_t h, int64_t i, int lane,
                                float* m_out, float* l2_out) {
  const int64_t hk = h / d.group;
  const int64_t jend = p.causal ? imax(0, imin(p.Lk, i + 1 + d.shift)) : p.Lk;  // keys < jend are causally visible
  const uint16_t* qr = static_cast<const uint16_t*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1] + i * p.q_stride[2];
  const uint16_t* kb = static_cast<const uint16_t*>(p.k) + b * p.k_stride[0] + hk * p.k_stride[1];
  const MaskView mv = make_mask_view(p, b, h);
  auto logit = [&](int64_t j) {
    const uint16_t* kr = kb + j * p.k_stride[2];
    float acc = 0.0f;
    for (int64_t c = 0; c < p.D; ++c) acc += E::to_float(qr[c]) * E::to_float(kr[c]);
    float x = acc * d.scale_log2;
    if (mv.kind != MaskKind::None) x = apply_mask(mv, i, j, x);
    return x;
  };
  float m = -INFINITY;
  for (int64_t j = lane; j < jend; j += 32) m = fmaxf(m, logit(j));
  m = warp_max(m);
  double l = 0.0;
  for (int64_t j = lane; j < jend; j += 32) l += exp2(double(logit(j)) - double(m));
  l = warp_sum(l);
  *m_out = m;
  *l2_out = float(log2(l));
}

// One warp per query row r = (b * Hq + h) * Lq + i (8 rows per block):
//   delta[r] = sum_dv dout * out, lse2[r] = lse * log2(e), l2[r] = 0 (exact statistics for rows past kExactRowLse2);
//   dq_acc (when not null: the Hopper backward's fp32 dQ accumulator, attention_utils.cuh dq_acc_floats) zeroed, a
//   contiguous share of it per row's warp (float4 stores; the accumulator is 16-byte aligned: dq_acc_offset).
template <class E>
__global__ void __launch_bounds__(256) attn_bwd_pre_kernel(const AttnBwdParams p, const Derived d,
                                                           float* __restrict__ lse2,   // (B, Hq, Lq)
                                                           float* __restrict__ l2,     // (B, Hq, Lq)
                                                           float* __restrict__ delta,  // (B, Hq, Lq)
                                                           float* __restrict__ dq_acc  // dq_acc_floats or null
) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t row = int64_t(blockIdx.x) * 8 + warp;
  if (row >= p.B * p.Hq * p.Lq) return;
  const int64_t i = row % p.Lq, bh = row / p.Lq, b = bh / p.Hq, h = bh % p.Hq;
  if (dq_acc != nullptr) {
    const int64_t rows = p.B * p.Hq * p.Lq, n4 = dq_acc_floats(p.B * p.Hq, p.Lq, p.D) / 4, per = (n4 + rows - 1) / rows;
    for (int64_t e = row * per + lane; e < imin((row + 1) * per, n4); e += 32)
      reinterpret_cast<float4*>(dq_acc)[e] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  }
  const uint16_t* dor =
      static_cast<const uint16_t*>(p.dout) + b * p.dout_stride[0] + h * p.dout_stride[1] + i * p.dout_stride[2];
  const uint16_t* orow =
      static_cast<const uint16_t*>(p.out) + b * p.out_stride[0] + h * p.out_stride[1] + i * p.out_stride[2];
  constexpr bool kBF16 = std::is_same<E, BF16>::value;
  float acc = 0.0f;
  if (d.vec_do && d.vec_o) {
    for (int64_t c = lane * 8; c < p.Dv; c += 256)
      acc += dot8(*reinterpret_cast<const uint4*>(dor + c), *reinterpret_cast<const uint4*>(orow + c), kBF16);
  } else {
    for (int64_t c = lane; c < p.Dv; c += 32) acc += E::to_float(dor[c]) * E::to_float(orow[c]);
  }
  acc = warp_sum(acc);
  float ls = p.lse[row] * kLog2e, lv = 0.0f;
  if (needs_exact_row_stats(ls)) exact_row_stats<E>(p, d, b, h, i, lane, &ls, &lv);  // warp-uniform branch
  if (lane == 0) {
    lse2[row] = ls;
    l2[row] = lv;
    delta[row] = acc;
  }
}

// dK, dV. Block: BNK = 16 * NW keys [j0, j0 + BNK) of one (b, kv head), output columns [c0, c0 + DC) of dK and dV.
// Warp w owns keys j0 + 16 w .. + 15 (rows of S^T, dP^T, dK, dV); this thread holds keys jr = j0 + 16 w + g and
// jr + 8, query columns 2t, 2t + 1 of each n-tile of S^T. The K and V tiles stay in shared memory for the whole
// block; the (query head, query block) pairs that see the keys stream through a double buffer.
template <class E, int HD, int DC, int BMQ, int NW, bool CAUSAL>
__global__ void __launch_bounds__(NW * 32)
    attn_bwd_dkdv_kernel(const AttnBwdParams p, const Derived d,
                         const float* __restrict__ lse2,  // (B, Hq, Lq) from attn_bwd_pre_kernel
                         const float* __restrict__ l2,    // (B, Hq, Lq)
                         const float* __restrict__ delta  // (B, Hq, Lq)
    ) {
  constexpr int BNK = 16 * NW, NT = NW * 32, LD = HD + kPad;
  constexpr int KS = HD / 16;   // k-steps of S^T = K Q^T and dP^T = V dO^T
  constexpr int NQ = BMQ / 8;   // n-tiles of S^T (queries)
  constexpr int NC = DC / 8;    // n-tiles of the dK / dV chunk
  constexpr int NCH = HD / DC;  // column chunks
  static_assert(NQ * 4 <= 32, "the dropout keep bits of one thread must fit in 32 bits");

  extern __shared__ __align__(16) unsigned char smem_raw[];
  uint16_t* Ks = reinterpret_cast<uint16_t*>(smem_raw);  // [BNK][LD] k (B, Hkv, Lk, D); dK staging at the end
  uint16_t* Vs = Ks + BNK * LD;                          // [BNK][LD] v (B, Hkv, Lk, Dv); dV staging at the end
  uint16_t* Qs = Vs + BNK * LD;                          // [2][BMQ][LD] q (B, Hq, Lq, D)
  uint16_t* Ds = Qs + 2 * BMQ * LD;                      // [2][BMQ][LD] dout (B, Hq, Lq, Dv)
  float* St = reinterpret_cast<float*>(Ds + 2 * BMQ * LD);  // [2][4][BMQ]: lse2, l2, delta, dropout row key bits

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int64_t nkb = (p.Lk + BNK - 1) / BNK, blk = blockIdx.x;
  const int64_t kb = blk % nkb, rest = blk / nkb;
  const int c0 = int(rest % NCH) * DC;
  const int64_t bhk = rest / NCH, b = bhk / p.Hkv, hk = bhk % p.Hkv, G = d.group;
  const int64_t j0 = kb * BNK;
  const int nk = int(imin(BNK, p.Lk - j0));
  const int D = int(p.D), Dv = int(p.Dv);

  load_tile<BNK, HD, LD, NT>(Ks, static_cast<const uint16_t*>(p.k) + b * p.k_stride[0] + hk * p.k_stride[1] +
                                     j0 * p.k_stride[2],
                             p.k_stride[2], nk, D, d.vec_k, tid);
  load_tile<BNK, HD, LD, NT>(Vs, static_cast<const uint16_t*>(p.v) + b * p.v_stride[0] + hk * p.v_stride[1] +
                                     j0 * p.v_stride[2],
                             p.v_stride[2], nk, Dv, d.vec_v, tid);

  // query blocks that see some key of this block: causal, i >= j0 - shift
  const int64_t qb_lo = CAUSAL ? imax(0, j0 - d.shift) / BMQ : 0;
  const int64_t nqb = (p.Lq + BMQ - 1) / BMQ;
  const int64_t nqe = imax(0, nqb - qb_lo);
  const int64_t niter = G * nqe;  // (query head of the group, query block) pairs, head-major

  auto stage = [&](int64_t it, int buf) {
    const int64_t h = hk * G + it / nqe, i0 = (qb_lo + it % nqe) * BMQ;
    const int nq = int(imin(BMQ, p.Lq - i0));
    load_tile<BMQ, HD, LD, NT>(Qs + buf * BMQ * LD,
                               static_cast<const uint16_t*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1] +
                                   i0 * p.q_stride[2],
                               p.q_stride[2], nq, D, d.vec_q, tid);
    load_tile<BMQ, HD, LD, NT>(Ds + buf * BMQ * LD,
                               static_cast<const uint16_t*>(p.dout) + b * p.dout_stride[0] + h * p.dout_stride[1] +
                                   i0 * p.dout_stride[2],
                               p.dout_stride[2], nq, Dv, d.vec_do, tid);
    float* st = St + buf * 4 * BMQ;
    for (int r = tid; r < BMQ; r += NT) {  // rows past Lq: lse +inf (P = 0), delta 0
      const bool ok = r < nq;
      const int64_t row = (b * p.Hq + h) * p.Lq + i0 + r;
      st[r] = ok ? lse2[row] : INFINITY;
      st[BMQ + r] = ok ? l2[row] : 0.0f;
      st[2 * BMQ + r] = ok ? delta[row] : 0.0f;
      st[3 * BMQ + r] = __uint_as_float(
          ok && d.dropout ? attn_dropout::dropout_row_key(p.seed, p.offset, p.Hq, p.Lq, b, h, i0 + r) : 0u);
    }
  };
  if (niter > 0) stage(0, 0);
  cp_async_commit();

  float dk[NC][4], dv[NC][4];
#pragma unroll
  for (int n = 0; n < NC; ++n) {
    dk[n][0] = dk[n][1] = dk[n][2] = dk[n][3] = 0.0f;
    dv[n][0] = dv[n][1] = dv[n][2] = dv[n][3] = 0.0f;
  }
  const int64_t jr = j0 + warp * 16 + g;  // this thread's keys jr, jr + 8
  const uint32_t colh[2] = {attn_dropout::dropout_col(jr), attn_dropout::dropout_col(jr + 8)};

  for (int64_t it = 0; it < niter; ++it) {
    const int buf = int(it & 1);
    if (it + 1 < niter) stage(it + 1, buf ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const int64_t h = hk * G + it / nqe, i0 = (qb_lo + it % nqe) * BMQ;
    const uint16_t* Qb = Qs + buf * BMQ * LD;
    const uint16_t* Db = Ds + buf * BMQ * LD;
    const float* st = St + buf * 4 * BMQ;
    const MaskView mv = make_mask_view(p, b, h);

    // S^T (16 keys x BMQ queries per warp) = K Q^T
    float s[NQ][4];
#pragma unroll
    for (int n = 0; n < NQ; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) {
      if (kk * 16 >= D) break;
      uint32_t a[4];
      load_a<LD>(a, Ks, warp * 16, kk * 16, lane);
#pragma unroll
      for (int n2 = 0; n2 < NQ / 2; ++n2) {
        uint32_t bb[4];
        load_b_nk<LD>(bb, Qb, n2 * 16, kk * 16, lane);
        E::mma(s[2 * n2], a, bb[0], bb[1]);
        E::mma(s[2 * n2 + 1], a, bb[2], bb[3]);
      }
    }
    // P^T = exp2((x - lse2) - l2). Keys >= Lk only feed dK / dV rows that are never stored; query rows >= Lq have
    // lse2 = +inf (P = 0), so per-element checks are needed only for masks and the causal diagonal.
    const bool check = mv.kind != MaskKind::None || (CAUSAL && j0 + BNK - 1 > i0 + d.shift);
#pragma unroll
    for (int n = 0; n < NQ; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int il = n * 8 + 2 * t + (e & 1);
        float x = s[n][e] * d.scale_log2;
        if (check) x = masked_logit<CAUSAL>(x, i0 + il, jr + (e >> 1) * 8, p.Lq, p.Lk, d.shift, mv);
        s[n][e] = fast_exp2((x - st[il]) - st[BMQ + il]);
      }

    // dP^T (16 keys x BMQ queries per warp) = V dO^T
    float dp[NQ][4];
#pragma unroll
    for (int n = 0; n < NQ; ++n) dp[n][0] = dp[n][1] = dp[n][2] = dp[n][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) {
      if (kk * 16 >= Dv) break;
      uint32_t a[4];
      load_a<LD>(a, Vs, warp * 16, kk * 16, lane);
#pragma unroll
      for (int n2 = 0; n2 < NQ / 2; ++n2) {
        uint32_t bb[4];
        load_b_nk<LD>(bb, Db, n2 * 16, kk * 16, lane);
        E::mma(dp[2 * n2], a, bb[0], bb[1]);
        E::mma(dp[2 * n2 + 1], a, bb[2], bb[3]);
      }
    }

    // dropout: bit 4 n + e of `keep` = element (n, e) kept
    uint32_t keep = 0xffffffffu;
    if (d.dropout) {
      keep = 0u;
#pragma unroll
      for (int n = 0; n < NQ; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const uint32_t rk = __float_as_uint(st[3 * BMQ + n * 8 + 2 * t + (e & 1)]);
          if (attn_dropout::mix32(rk ^ colh[e >> 1]) >= d.drop_thr) keep |= 1u << (4 * n + e);
        }
    }
    const float dscale = d.dropout ? d.inv_keep : 1.0f;

    // dV (16 x DC per warp) += P_dropped^T dO[:, c0:c0 + DC]
#pragma unroll
    for (int k2 = 0; k2 < BMQ / 16; ++k2) {
      float pv[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const int n = 2 * k2 + (e >> 2), ee = e & 3;
        pv[e] = (keep >> (4 * n + ee)) & 1u ? s[n][ee] * dscale : 0.0f;
      }
      const uint32_t a[4] = {E::pack(pv[0], pv[1]), E::pack(pv[2], pv[3]), E::pack(pv[4], pv[5]),
                             E::pack(pv[6], pv[7])};
#pragma unroll
      for (int d2 = 0; d2 < DC / 16; ++d2) {
        if (c0 + d2 * 16 >= Dv) break;
        uint32_t bb[4];
        load_b_kn<LD>(bb, Db, k2 * 16, c0 + d2 * 16, lane);
        E::mma(dv[2 * d2], a, bb[0], bb[1]);
        E::mma(dv[2 * d2 + 1], a, bb[2], bb[3]);
      }
    }

    // dS^T = P^T (dP^T_dropped - delta), in place of P^T
#pragma unroll
    for (int n = 0; n < NQ; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int il = n * 8 + 2 * t + (e & 1);
        const float dpv = (keep >> (4 * n + e)) & 1u ? dp[n][e] * dscale : 0.0f;
        s[n][e] = s[n][e] * (dpv - st[2 * BMQ + il]);
      }

    // dK (16 x DC per warp) += dS^T Q[:, c0:c0 + DC]
#pragma unroll
    for (int k2 = 0; k2 < BMQ / 16; ++k2) {
      const uint32_t a[4] = {E::pack(s[2 * k2][0], s[2 * k2][1]), E::pack(s[2 * k2][2], s[2 * k2][3]),
                             E::pack(s[2 * k2 + 1][0], s[2 * k2 + 1][1]), E::pack(s[2 * k2 + 1][2], s[2 * k2 + 1][3])};
#pragma unroll
      for (int d2 = 0; d2 < DC / 16; ++d2) {
        if (c0 + d2 * 16 >= D) break;
        uint32_t bb[4];
        load_b_kn<LD>(bb, Qb, k2 * 16, c0 + d2 * 16, lane);
        E::mma(dk[2 * d2], a, bb[0], bb[1]);
        E::mma(dk[2 * d2 + 1], a, bb[2], bb[3]);
      }
    }
    __syncthreads();  // this buffer is refilled by the next iteration's prefetch
  }

  // Epilogue: dK * scale and dV through shared memory (each warp its own 16 rows of the K / V tiles), then stored.
  cp_async_wait<0>();
  __syncthreads();
#pragma unroll
  for (int n = 0; n < NC; ++n) {
    const int col = n * 8 + 2 * t;
    *reinterpret_cast<uint32_t*>(Ks + (warp * 16 + g) * LD + col) = E::pack(dk[n][0] * p.scale, dk[n][1] * p.scale);
    *reinterpret_cast<uint32_t*>(Ks + (warp * 16 + g + 8) * LD + col) =
        E::pack(dk[n][2] * p.scale, dk[n][3] * p.scale);
    *reinterpret_cast<uint32_t*>(Vs + (warp * 16 + g) * LD + col) = E::pack(dv[n][0], dv[n][1]);
    *reinterpret_cast<uint32_t*>(Vs + (warp * 16 + g + 8) * LD + col) = E::pack(dv[n][2], dv[n][3]);
  }
  __syncthreads();
  uint16_t* dkg = static_cast<uint16_t*>(p.dk) + b * p.dk_stride[0] + hk * p.dk_stride[1] + j0 * p.dk_stride[2] + c0;
  uint16_t* dvg = static_cast<uint16_t*>(p.dv) + b * p.dv_stride[0] + hk * p.dv_stride[1] + j0 * p.dv_stride[2] + c0;
  store_tile<BNK, DC, LD, NT>(dkg, p.dk_stride[2], Ks, nk, D - c0, d.vec_dk, tid);
  store_tile<BNK, DC, LD, NT>(dvg, p.dv_stride[2], Vs, nk, Dv - c0, d.vec_dv, tid);
}

// dQ. Block: BM = 16 * NW query rows [i0, i0 + BM) of one (b, h), output columns [c0, c0 + DC); key blocks of BN
// stream through a double buffer. Warp w owns rows i0 + 16 w .. + 15; this thread rows ri, ri + 8.
template <class E, int HD, int DC, int BN, int NW, bool CAUSAL, bool FULL>
__global__ void __launch_bounds__(NW * 32)
    attn_bwd_dq_kernel(const AttnBwdParams p, const Derived d,
                       const float* __restrict__ lse2,  // (B, Hq, Lq) from attn_bwd_pre_kernel
                       const float* __restrict__ l2,    // (B, Hq, Lq)
                       const float* __restrict__ delta  // (B, Hq, Lq)
    ) {
  constexpr int BM = 16 * NW, NT = NW * 32, LD = HD + kPad;
  constexpr int KS = HD / 16;   // k-steps of S = Q K^T and dP = dO V^T
  constexpr int NS = BN / 8;    // n-tiles of S (keys)
  constexpr int NC = DC / 8;    // n-tiles of the dQ chunk
  constexpr int NCH = HD / DC;  // column chunks

  extern __shared__ __align__(16) unsigned char smem_raw[];
  uint16_t* Qs = reinterpret_cast<uint16_t*>(smem_raw);  // [BM][LD] q (B, Hq, Lq, D); dQ staging at the end
  uint16_t* Ds = Qs + BM * LD;                           // [BM][LD] dout (B, Hq, Lq, Dv)
  uint16_t* Ks = Ds + BM * LD;                           // [2][BN][LD] k (B, Hkv, Lk, D)
  uint16_t* Vs = Ks + 2 * BN * LD;                       // [2][BN][LD] v (B, Hkv, Lk, Dv)

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int64_t BHC = p.B * p.Hq * NCH, nqb = (p.Lq + BM - 1) / BM, blk = blockIdx.x;
  int64_t qb, rest;
  if (CAUSAL) {  // heaviest rows first, in L2 sections of d.sec_q heads (fwd_block's order)
    const GridTile gt = l2_section_tile(blk, nqb, BHC, d.sec_q * NCH);
    qb = nqb - 1 - gt.level;
    rest = gt.head;
  } else {
    qb = blk % nqb;
    rest = blk / nqb;
  }
  const int c0 = int(rest % NCH) * DC;
  const int64_t bh = rest / NCH, b = bh / p.Hq, h = bh % p.Hq, hk = h / d.group;
  const int64_t i0 = qb * BM;
  const int nq = int(imin(BM, p.Lq - i0));
  const int64_t jend = CAUSAL ? imax(0, imin(p.Lk, i0 + nq + d.shift)) : p.Lk;
  const int nkb = int((jend + BN - 1) / BN);
  const int D = int(p.D), Dv = int(p.Dv);

  const uint16_t* kg = static_cast<const uint16_t*>(p.k) + b * p.k_stride[0] + hk * p.k_stride[1];
  const uint16_t* vg = static_cast<const uint16_t*>(p.v) + b * p.v_stride[0] + hk * p.v_stride[1];
  auto load_kv = [&](int kb, int buf) {
    const int64_t j0 = int64_t(kb) * BN;
    const int nk = int(imin(BN, p.Lk - j0));
    load_tile<BN, HD, LD, NT>(Ks + buf * BN * LD, kg + j0 * p.k_stride[2], p.k_stride[2], nk, D, d.vec_k, tid);
    load_tile<BN, HD, LD, NT>(Vs + buf * BN * LD, vg + j0 * p.v_stride[2], p.v_stride[2], nk, Dv, d.vec_v, tid);
  };
  load_tile<BM, HD, LD, NT>(
      Qs, static_cast<const uint16_t*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1] + i0 * p.q_stride[2],
      p.q_stride[2], nq, D, d.vec_q, tid);
  load_tile<BM, HD, LD, NT>(
      Ds, static_cast<const uint16_t*>(p.dout) + b * p.dout_stride[0] + h * p.dout_stride[1] + i0 * p.dout_stride[2],
      p.dout_stride[2], nq, Dv, d.vec_do, tid);
  if (nkb > 0) load_kv(0, 0);
  cp_async_commit();

  const int64_t ri = i0 + warp * 16 + g;
  float ls[2], lv[2], dl[2];
  uint32_t rkey[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {  // rows past Lq: lse +inf (P = 0), delta 0
    const int64_t row = ri + 8 * r;
    const bool ok = row < p.Lq;
    ls[r] = ok ? lse2[bh * p.Lq + row] : INFINITY;
    lv[r] = ok ? l2[bh * p.Lq + row] : 0.0f;
    dl[r] = ok ? delta[bh * p.Lq + row] : 0.0f;
    rkey[r] = ok && d.dropout ? attn_dropout::dropout_row_key(p.seed, p.offset, p.Hq, p.Lq, b, h, row) : 0u;
  }
  const MaskView mv = make_mask_view(p, b, h);

  float dq[NC][4];
#pragma unroll
  for (int n = 0; n < NC; ++n) dq[n][0] = dq[n][1] = dq[n][2] = dq[n][3] = 0.0f;

  for (int kb = 0; kb < nkb; ++kb) {
    const int buf = kb & 1;
    const int64_t j0 = int64_t(kb) * BN;
    if (kb + 1 < nkb) load_kv(kb + 1, buf ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const uint16_t* Kb = Ks + buf * BN * LD;
    const uint16_t* Vb = Vs + buf * BN * LD;

    // S (16 x BN per warp) = Q K^T
    float s[NS][4];
#pragma unroll
    for (int n = 0; n < NS; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) {
      if (!FULL && kk * 16 >= D) break;
      uint32_t a[4];
      load_a<LD>(a, Qs, warp * 16, kk * 16, lane);
#pragma unroll
      for (int n2 = 0; n2 < NS / 2; ++n2) {
        uint32_t bb[4];
        load_b_nk<LD>(bb, Kb, n2 * 16, kk * 16, lane);
        E::mma(s[2 * n2], a, bb[0], bb[1]);
        E::mma(s[2 * n2 + 1], a, bb[2], bb[3]);
      }
    }
    // P = exp2((x - lse2) - l2); keys >= Lk must be hidden here (they would add to dQ)
    const bool check = j0 + BN > p.Lk || mv.kind != MaskKind::None || (CAUSAL && j0 + BN - 1 > i0 + d.shift);
#pragma unroll
    for (int n = 0; n < NS; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = s[n][e] * d.scale_log2;
        if (check) x = masked_logit<CAUSAL>(x, ri + (e >> 1) * 8, j0 + n * 8 + 2 * t + (e & 1), p.Lq, p.Lk, d.shift, mv);
        s[n][e] = fast_exp2((x - ls[e >> 1]) - lv[e >> 1]);
      }

    // dP (16 x BN per warp) = dO V^T
    float dp[NS][4];
#pragma unroll
    for (int n = 0; n < NS; ++n) dp[n][0] = dp[n][1] = dp[n][2] = dp[n][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) {
      if (!FULL && kk * 16 >= Dv) break;
      uint32_t a[4];
      load_a<LD>(a, Ds, warp * 16, kk * 16, lane);
#pragma unroll
      for (int n2 = 0; n2 < NS / 2; ++n2) {
        uint32_t bb[4];
        load_b_nk<LD>(bb, Vb, n2 * 16, kk * 16, lane);
        E::mma(dp[2 * n2], a, bb[0], bb[1]);
        E::mma(dp[2 * n2 + 1], a, bb[2], bb[3]);
      }
    }

    // dS = P (dP_dropped - delta), in place of P
#pragma unroll
    for (int n = 0; n < NS; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float dpv = dp[n][e];
        if (d.dropout) {
          const bool keep = attn_dropout::dropout_keep(rkey[e >> 1], j0 + n * 8 + 2 * t + (e & 1), d.drop_thr);
          dpv = keep ? dpv * d.inv_keep : 0.0f;
        }
        s[n][e] = s[n][e] * (dpv - dl[e >> 1]);
      }

    // dQ (16 x DC per warp) += dS K[:, c0:c0 + DC]
#pragma unroll
    for (int k2 = 0; k2 < BN / 16; ++k2) {
      const uint32_t a[4] = {E::pack(s[2 * k2][0], s[2 * k2][1]), E::pack(s[2 * k2][2], s[2 * k2][3]),
                             E::pack(s[2 * k2 + 1][0], s[2 * k2 + 1][1]), E::pack(s[2 * k2 + 1][2], s[2 * k2 + 1][3])};
#pragma unroll
      for (int d2 = 0; d2 < DC / 16; ++d2) {
        if (!FULL && c0 + d2 * 16 >= D) break;
        uint32_t bb[4];
        load_b_kn<LD>(bb, Kb, k2 * 16, c0 + d2 * 16, lane);
        E::mma(dq[2 * d2], a, bb[0], bb[1]);
        E::mma(dq[2 * d2 + 1], a, bb[2], bb[3]);
      }
    }
    __syncthreads();
  }

  cp_async_wait<0>();
  __syncthreads();
#pragma unroll
  for (int n = 0; n < NC; ++n) {
    const int col = n * 8 + 2 * t;
    *reinterpret_cast<uint32_t*>(Qs + (warp * 16 + g) * LD + col) = E::pack(dq[n][0] * p.scale, dq[n][1] * p.scale);
    *reinterpret_cast<uint32_t*>(Qs + (warp * 16 + g + 8) * LD + col) =
        E::pack(dq[n][2] * p.scale, dq[n][3] * p.scale);
  }
  __syncthreads();
  uint16_t* dqg = static_cast<uint16_t*>(p.dq) + b * p.dq_stride[0] + h * p.dq_stride[1] + i0 * p.dq_stride[2] + c0;
  store_tile<BM, DC, LD, NT>(dqg, p.dq_stride[2], Qs, nq, D - c0, d.vec_dq, tid);
}

// ============================================================================================================
// Host side: derived values, launches, dispatch over (dtype, head-dim bucket, causal)
// ============================================================================================================
namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Rows of (B, H, L, ncols) with these strides can be copied in 16-byte chunks.
bool vec_ok(const void* ptr, const int64_t* s, int64_t ncols) {
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && s[0] % 8 == 0 && s[1] % 8 == 0 && s[2] % 8 == 0 &&
         ncols % 8 == 0;
}

Derived derive(const AttnCommon& p) {
  Derived d;
  d.scale_log2 = p.scale * kLog2e;
  d.dropout = p.dropout_p > 0.0f;
  d.inv_keep = d.dropout ? 1.0f / (1.0f - p.dropout_p) : 1.0f;
  d.drop_thr = attn_dropout::dropout_threshold(p.dropout_p);
  d.shift = p.bottom_right ? p.Lk - p.Lq : 0;
  d.group = p.Hq / p.Hkv;
  d.vec_q = vec_ok(p.q, p.q_stride, p.D);
  d.vec_k = vec_ok(p.k, p.k_stride, p.D);
  d.vec_v = vec_ok(p.v, p.v_stride, p.Dv);
  // L2 sections (l2_section_tile). A causal grid runs its heaviest tiles first, a level of every head at a time, so
  // its running tiles stream the K / V of every head at once (64 heads of 2 MiB at L = 4096, D = 128, bf16: more
  // than an H100's or H200's 50 MiB of L2, each read from DRAM again by every level). Sections of the heads whose
  // data fits 5/8 of the L2 (FA3 sizes its sections for 32 MiB of the H100's 50) keep it there. Non-causal grids
  // run a head's tiles back to back. PYATTN_CUDA_ATTN_L2=0 (or an unknown L2 size): one section of all heads in
  // causal grids, and the Hopper dK / dV grid's former order (heads fastest) in non-causal ones too.
  const char* env = std::getenv("PYATTN_CUDA_ATTN_L2");  // read per call: benchmarks compare both orders
  const bool off = p.l2_bytes <= 0 || (env != nullptr && std::strcmp(env, "0") == 0);
  const int64_t BH = p.B * p.Hq, BHk = p.B * p.Hkv, budget = p.l2_bytes / 8 * 5;
  const int64_t kv_bytes = p.Lk * (p.D + p.Dv) * 2;            // K and V of a kv head (16-bit elements)
  const int64_t qdo_bytes = d.group * p.Lq * (p.D + p.Dv) * 2;  // Q and dO of a kv head's query heads
  if (p.causal) {
    d.sec_q = off ? BH : std::min(BH, std::max<int64_t>(1, budget / kv_bytes) * d.group);
    d.sec_kv = off ? BHk : std::min(BHk, std::max<int64_t>(1, budget / qdo_bytes));
  } else {
    d.sec_kv = off ? BHk : 1;
  }
  return d;
}

int head_dim_bucket(int64_t D, int64_t Dv) {
  const int64_t m = std::max(D, Dv);
  return m <= 64 ? 64 : m <= 128 ? 128 : m <= kAttnMaxHeadDim ? 256 : 0;
}

template <class E, int HD, bool CAUSAL>
cudaError_t run_attn_fwd(const AttnFwdParams& p, const Derived& d, cudaStream_t stream) {
  using T = Tiles<HD>;
  // FULL only where it measured faster (H200, L = 4096: HD 128 fwd 148 -> 185 TFLOP/s; HD 64 145 -> 128, slower)
  constexpr bool kTryFull = HD == 128;
  auto kernel = kTryFull && p.D == HD && p.Dv == HD
                    ? attn_fwd_kernel<E, HD, T::FWD_BN, T::FWD_MT, T::NW, CAUSAL, kTryFull>
                    : attn_fwd_kernel<E, HD, T::FWD_BN, T::FWD_MT, T::NW, CAUSAL, false>;
  cudaError_t err = fit_kernel(kernel, T::fwd_smem);
  if (err != cudaSuccess) return err;
  const int64_t blocks = ceil_div(p.Lq, T::FWD_BM) * p.B * p.Hq;
  kernel<<<unsigned(blocks), T::NW * 32, T::fwd_smem, stream>>>(p, d);
  return cudaGetLastError();
}

// Where the Hopper backward's fp32 dQ accumulator starts in the workspace: after lse2, l2 and delta (rows floats
// each), rounded up to 16 bytes (its bulk reductions and the conversion's float4 loads need that alignment).
int64_t dq_acc_offset(int64_t rows) { return (3 * rows + 3) / 4 * 4; }

template <class E, int HD, bool CAUSAL>
cudaError_t run_attn_bwd(const AttnBwdParams& p, const Derived& d, float* ws, cudaStream_t stream) {
  using T = Tiles<HD>;
  constexpr int NCH = HD / T::DC;
  const int64_t rows = p.B * p.Hq * p.Lq;
  float* lse2 = ws;
  float* l2 = ws + rows;
  float* delta = ws + 2 * rows;
  const Sm90BwdPlan pl = sm90_bwd_plan(p, d);
  float* dq_acc = pl.fused ? ws + dq_acc_offset(rows) : nullptr;  // (attention_bwd_workspace_floats)
  attn_bwd_pre_kernel<E><<<unsigned(ceil_div(rows, 8)), 256, 0, stream>>>(p, d, lse2, l2, delta, dq_acc);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  if (pl.take) return bwd_sm90(p, d, pl, lse2, l2, delta, dq_acc, stream);

  auto dkdv = attn_bwd_dkdv_kernel<E, HD, T::DC, T::DKDV_BMQ, T::NW, CAUSAL>;  // (no FULL: its loops would spill)
  if ((err = fit_kernel(dkdv, T::dkdv_smem)) != cudaSuccess) return err;
  const int64_t dkdv_blocks = ceil_div(p.Lk, 16 * T::NW) * NCH * p.B * p.Hkv;
  dkdv<<<unsigned(dkdv_blocks), T::NW * 32, T::dkdv_smem, stream>>>(p, d, lse2, l2, delta);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;

  const bool full = p.D == HD && p.Dv == HD;  // FULL: see attn_fwd_kernel
  auto dq = full ? attn_bwd_dq_kernel<E, HD, T::DC, T::DQ_BN, T::NW, CAUSAL, true>
                 : attn_bwd_dq_kernel<E, HD, T::DC, T::DQ_BN, T::NW, CAUSAL, false>;
  if ((err = fit_kernel(dq, T::dq_smem)) != cudaSuccess) return err;
  const int64_t dq_blocks = ceil_div(p.Lq, 16 * T::NW) * NCH * p.B * p.Hq;
  dq<<<unsigned(dq_blocks), T::NW * 32, T::dq_smem, stream>>>(p, d, lse2, l2, delta);
  return cudaGetLastError();
}

template <class E, bool CAUSAL>
cudaError_t fwd_hd(const AttnFwdParams& p, const Derived& d, cudaStream_t s) {
  switch (head_dim_bucket(p.D, p.Dv)) {
    case 64: return run_attn_fwd<E, 64, CAUSAL>(p, d, s);
    case 128: return run_attn_fwd<E, 128, CAUSAL>(p, d, s);
    case 256: return run_attn_fwd<E, 256, CAUSAL>(p, d, s);
    default: return cudaErrorInvalidValue;
  }
}

template <class E, bool CAUSAL>
cudaError_t bwd_hd(const AttnBwdParams& p, const Derived& d, float* ws, cudaStream_t s) {
  switch (head_dim_bucket(p.D, p.Dv)) {
    case 64: return run_attn_bwd<E, 64, CAUSAL>(p, d, ws, s);
    case 128: return run_attn_bwd<E, 128, CAUSAL>(p, d, ws, s);
    case 256: return run_attn_bwd<E, 256, CAUSAL>(p, d, ws, s);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace
}  // namespace attn

// ---- entry points (pyattn/cuda_kernels.h) ----

const char* attention_unsupported(const AttnCommon& p) {
  if (p.dtype != DType::F16 && p.dtype != DType::BF16)
    return "the CUDA attention kernels take float16 and bfloat16 inputs only";
  if (p.D > kAttnMaxHeadDim || p.Dv > kAttnMaxHeadDim)
    return "the CUDA attention kernels take head dims up to 256 (q/k and v)";
  if (p.B < 1 || p.Hq < 1 || p.Hkv < 1 || p.Hq % p.Hkv != 0 || p.Lq < 1 || p.Lk < 1 || p.D < 1 || p.Dv < 1)
    return "the CUDA attention kernels need B, Hq, Hkv, Lq, Lk, D, Dv >= 1 and Hkv dividing Hq";
  // grid sizes (one dimension, < 2^31) of every kernel: 64-row blocks, up to 2 column chunks
  const int64_t kMaxGrid = 2147483647;
  const int64_t qblocks = attn::ceil_div(p.Lq, 64) * 2, kblocks = attn::ceil_div(p.Lk, 64) * 2;
  if (qblocks > kMaxGrid / p.B / p.Hq || kblocks > kMaxGrid / p.B / p.Hkv ||
      attn::ceil_div(p.Lq, 8) > kMaxGrid / p.B / p.Hq)
    return "the problem is too large for the CUDA attention kernels' grid (more than 2^31 - 1 blocks)";
  return nullptr;
}

size_t attention_smem_bytes(int64_t D, int64_t Dv, bool backward) {
  switch (attn::head_dim_bucket(D, Dv)) {
    case 64: return backward ? std::max(attn::Tiles<64>::dkdv_smem, attn::Tiles<64>::dq_smem) : attn::Tiles<64>::fwd_smem;
    case 128:
      return backward ? std::max(attn::Tiles<128>::dkdv_smem, attn::Tiles<128>::dq_smem) : attn::Tiles<128>::fwd_smem;
    case 256:
      return backward ? std::max(attn::Tiles<256>::dkdv_smem, attn::Tiles<256>::dq_smem) : attn::Tiles<256>::fwd_smem;
    default: return 0;
  }
}

namespace {
attn::Derived derive_fwd(const AttnFwdParams& p) {
  attn::Derived d = attn::derive(p);
  d.vec_o = attn::vec_ok(p.out, p.out_stride, p.Dv);
  return d;
}
}  // namespace

cudaError_t attention_fwd(const AttnFwdParams& p, cudaStream_t stream) {
  if (attention_unsupported(p) != nullptr) return cudaErrorInvalidValue;
  const attn::Derived d = derive_fwd(p);
  cudaError_t err = cudaSuccess;
  if (attn::fwd_decode(p, d, stream, &err)) return err;
  if (attn::fwd_sm90(p, d, stream, &err)) return err;
  if (p.dtype == DType::F16)
    return p.causal ? attn::fwd_hd<attn::F16, true>(p, d, stream) : attn::fwd_hd<attn::F16, false>(p, d, stream);
  return p.causal ? attn::fwd_hd<attn::BF16, true>(p, d, stream) : attn::fwd_hd<attn::BF16, false>(p, d, stream);
}

AttnFwdWorkspace attention_fwd_workspace(const AttnFwdParams& p) {
  AttnFwdWorkspace w;
  if (attention_unsupported(p) != nullptr) return w;
  const attn::Derived d = derive_fwd(p);
  w.floats = attn::decode_plan(p, d).workspace_floats;  // (attention_fwd takes the decoding path first)
  if (w.floats == 0) {
    const attn::Sm90Plan pl = attn::sm90_plan(p, d);
    w.tile_counter = pl.take && pl.dynamic;
  }
  return w;
}

namespace {
attn::Derived derive_bwd(const AttnBwdParams& p) {
  attn::Derived d = attn::derive(p);
  d.vec_o = attn::vec_ok(p.out, p.out_stride, p.Dv);
  d.vec_do = attn::vec_ok(p.dout, p.dout_stride, p.Dv);
  d.vec_dq = attn::vec_ok(p.dq, p.dq_stride, p.D);
  d.vec_dk = attn::vec_ok(p.dk, p.dk_stride, p.D);
  d.vec_dv = attn::vec_ok(p.dv, p.dv_stride, p.Dv);
  return d;
}
}  // namespace

// lse2, l2, delta (B * Hq * Lq each), then, 16-byte aligned, the Hopper backward's dQ accumulator (B * Hq * Lq * D)
// when it adds dQ in its dK / dV kernel (the same sm90_bwd_plan decision as run_attn_bwd's).
int64_t attention_bwd_workspace_floats(const AttnBwdParams& p) {
  const int64_t rows = p.B * p.Hq * p.Lq;
  if (attention_unsupported(p) != nullptr) return 3 * rows;
  return attn::sm90_bwd_plan(p, derive_bwd(p)).fused
             ? attn::dq_acc_offset(rows) + attn::dq_acc_floats(p.B * p.Hq, p.Lq, p.D)
             : 3 * rows;
}

cudaError_t attention_bwd(const AttnBwdParams& p, float* workspace, cudaStream_t stream) {
  if (attention_unsupported(p) != nullptr || workspace == nullptr) return cudaErrorInvalidValue;
  const attn::Derived d = derive_bwd(p);
  if (p.dtype == DType::F16)
    return p.causal ? attn::bwd_hd<attn::F16, true>(p, d, workspace, stream)
                    : attn::bwd_hd<attn::F16, false>(p, d, workspace, stream);
  return p.causal ? attn::bwd_hd<attn::BF16, true>(p, d, workspace, stream)
                  : attn::bwd_hd<attn::BF16, false>(p, d, workspace, stream);
}

}  // namespace cuda
}  // namespace pyattn
