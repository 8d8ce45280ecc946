// Attention CPU kernels: FlashAttention-2 forward and backward, torch-free (contract: the Attention section of
// pyattn/params.h). Memory is O(L): no Lq x Lk matrix is ever formed, only BN x BM tiles.
//
// Layout: every tile is TRANSPOSED, keys x queries: the queries of a block lie along the SIMD lanes (BM = QV * NB
// lanes), the keys along rows. Then
//   * S^T = K Q^T is a GEMM whose A operand is K's rows as stored (scalar broadcasts) and whose B operand is the
//     query block packed once per block as Q^T (D x BM), pre-scaled by scale * log2(e) (softmax in base 2);
//   * softmax statistics (row max, row sum of each query) are lane-wise vector max/add down the rows: no
//     horizontal reductions;
//   * O^T (Dv x BM) += V^T P^T reads V's rows as stored (broadcasts) and P^T as computed; O is transposed back once
//     at the end of the block.
// So K and V are never packed or copied (fp32 inputs; 16-bit inputs are widened to fp32 once per call, except bf16
// on AVX512_BF16 CPUs, which runs on bf16 pairs: see BF16PairOps).
// Forward work items: (batch, query head, query block), heaviest causal blocks first.
// Backward (FA2): work items (batch, kv head, chunk of key blocks); for each key block, loop over the GQA group's
// query heads and the query blocks that see it: S^T and P^T = exp2(S^T - lse) again, dP^T = V dO^T, dV += P^T dO,
// dS^T = P^T (dP^T - delta), dK += dS^T Q, dQ_partial(chunk) += dS K. dQ partials of the chunks are summed in order.
// Every sum runs in a fixed order whatever the thread count: results are deterministic.
// GEMMs: one register-tiled micro-kernel, C (MR x NV*NB) (=|+=|= C*scale +) A (MR x K, element (i, k) at
// a[i * ars + k * aks], broadcast) x B (K x NV*NB, row k at b + k * ldb), tail lanes masked.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "pyattn/attn_dropout.h"
#include "pyattn/attn_exact_rows.h"
#include "pyattn/cpu_kernels.h"
#include "pyattn/cpu_parallel.h"
#include "pyattn/cpu_simd.h"
#include "pyattn/cpu_util.h"
#include "pyattn/cpu_workspace.h"
#include "pyattn/params.h"

namespace pyattn {
namespace cpu {
namespace {

using namespace simd;

constexpr int QV = 4;         // lane vectors per query block
constexpr int BM = QV * NB;   // queries per block (64 with AVX-512)
constexpr int BN = 64;        // keys per block
constexpr int64_t kMinBwdItems = 16;  // backward: split the keys into chunks until there are this many items
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kInf = std::numeric_limits<float>::infinity();

// ------------------------------------------------------------------------------------------------------------
// GEMM micro-kernel and driver
// ------------------------------------------------------------------------------------------------------------
// The element types of a GEMM: F32Ops / BF16PairOps (pyattn/cpu_simd.h).

// c_i = (acc ? c_i * cscale : 0) + sum_k a(i, k) b_k for i < MR, or without acc c_i = cscale * sum_k a(i, k) b_k;
// b_k and c_i are NV vectors; the last vector holds `nlast` valid lanes unless FULL. cscale (NV vectors) may be
// nullptr (= 1).
template <class Ops, int MR, int NV, bool FULL>
void micro_kernel(const typename Ops::E* __restrict a, int64_t ars, int64_t aks, int64_t K,
                  const typename Ops::E* __restrict bw, int64_t ldb, int nlast, float* __restrict c, int64_t ldc,
                  const float* cscale, bool acc) {
  const float* b = reinterpret_cast<const float*>(bw);
  auto load = [&](const float* p, int q) { return (FULL || q < NV - 1) ? vld(p) : vldn(p, nlast); };
  V t[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int q = 0; q < NV; ++q) {
      if (!acc) {
        t[i][q] = vzero();
      } else {
        t[i][q] = load(c + i * ldc + q * NB, q);
        if (cscale != nullptr) t[i][q] = vmul(t[i][q], vld(cscale + q * NB));
      }
    }
  const typename Ops::E* ap[MR];
  for (int i = 0; i < MR; ++i) ap[i] = a + i * ars;
  for (int64_t k = 0; k < K; ++k) {
    V w[NV];
    for (int q = 0; q < NV; ++q) w[q] = load(b + k * ldb + q * NB, q);
    for (int i = 0; i < MR; ++i) {
      const V s = Ops::bcast(ap[i] + k * aks);
      for (int q = 0; q < NV; ++q) t[i][q] = Ops::fma(s, w[q], t[i][q]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int q = 0; q < NV; ++q) {
      if (!acc && cscale != nullptr) t[i][q] = vmul(t[i][q], vld(cscale + q * NB));
      if (FULL || q < NV - 1)
        vst(c + i * ldc + q * NB, t[i][q]);
      else
        vstn(c + i * ldc + q * NB, t[i][q], nlast);
    }
}

template <class Ops>
struct KernelTable {
  using E = typename Ops::E;
  using Fn = void (*)(const E*, int64_t, int64_t, int64_t, const E*, int64_t, int, float*, int64_t, const float*,
                      bool);
  Fn k[MRMAX + 1][QV + 1][2] = {};
  template <int MR, int NV>
  void fill_row() {
    k[MR][NV][0] = &micro_kernel<Ops, MR, NV, false>;
    k[MR][NV][1] = &micro_kernel<Ops, MR, NV, true>;
    if constexpr (NV > 1) fill_row<MR, NV - 1>();
  }
  template <int MR>
  void fill() {
    fill_row<MR, QV>();
    if constexpr (MR > 1) fill<MR - 1>();
  }
  KernelTable() { fill<MRMAX>(); }
};
template <class Ops>
const KernelTable<Ops> kTable;

inline int rows_for(int nv) { return std::min(MRMAX, ACC_MAX / nv); }

// C (M x N) (=|+=|= C * cscale +) A (M x K) B (K x N): A(i, k) = a[i * ars + k * aks], B(k, n) = b[k * ldb + n],
// C(i, n) = c[i * ldc + n]; cscale[n] scales C's old value with acc, the product without (nullptr: 1). N is split
// into panels of QV vectors.
// With BF16PairOps, K counts pairs and a, b, ars, aks, ldb count words.
template <class Ops = F32Ops>
void gemm(int64_t M, int64_t N, int64_t K, const typename Ops::E* a, int64_t ars, int64_t aks,
          const typename Ops::E* b, int64_t ldb, float* c, int64_t ldc, const float* cscale, bool acc) {
  for (int64_t n0 = 0; n0 < N; n0 += QV * NB) {
    const int nn = int(std::min<int64_t>(QV * NB, N - n0));
    const int nv = (nn + NB - 1) / NB;
    const int nlast = nn - (nv - 1) * NB;
    const bool full = nlast == NB;
    // Rows in balanced chunks of at most rows_for(nv): 64 = 9 x 6 + 2 x 5 rather than 10 x 6 + 4. Measured here
    // (AVX-512), the 4 x 4-vector kernel runs at ~60% of the 5- and 6-row ones (too few independent FMA chains).
    const int64_t nch = ceil_div(M, int64_t(rows_for(nv)));
    for (int64_t ch = 0, m0 = 0; ch < nch; ++ch) {
      const int m = int(M / nch + (ch < M % nch ? 1 : 0));
      kTable<Ops>.k[m][nv][full](a + m0 * ars, ars, aks, K, b + n0, ldb, nlast, c + m0 * ldc + n0, ldc,
                                 cscale == nullptr ? nullptr : cscale + n0, acc);
      m0 += m;
    }
  }
}

// ------------------------------------------------------------------------------------------------------------
// Element access, dropout hash, masks
// ------------------------------------------------------------------------------------------------------------
template <class T>
inline float ld(const void* p, int64_t i) {
  return to_f32(static_cast<const T*>(p)[i]);
}

// The keep hash (splitmix64 / mix32 row key, column hash, threshold) is shared with the CUDA kernels.
using attn_dropout::dropout_col;
using attn_dropout::dropout_row_key;
using attn_dropout::dropout_threshold;
using attn_dropout::mix32;

// Multiplies a transposed tile (nk rows of keys j0.., BM lanes of queries) by keep / (1 - p), in place.
void apply_dropout(const uint32_t* keys, int64_t j0, int nk, uint32_t thr, float inv, float* t) {
  for (int j = 0; j < nk; ++j) {
    const uint32_t cj = dropout_col(j0 + j);
    float* row = t + j * BM;
    for (int i = 0; i < BM; ++i) row[i] = mix32(keys[i] ^ cj) >= thr ? row[i] * inv : 0.0f;
  }
}

void dropout_keys(const AttnCommon& p, int64_t b, int64_t h, int64_t i0, int nq, uint32_t* keys) {
  for (int i = 0; i < BM; ++i) keys[i] = i < nq ? dropout_row_key(p.seed, p.offset, p.Hq, p.Lq, b, h, i0 + i) : 0u;
}

// Log2-domain additive mask value: m * log2(e), with finite values kept finite (finfo.min * log2(e) would overflow
// to -inf and turn a row of "very negative" logits, which softmax treats as uniform, into a dead row). The lse of
// such a row then reads -FLT_MAX * ln 2 (-2.36e38) instead of finfo.min: hugely negative either way.
inline float mask_log2(float m) {
  const float v = m * kLog2e;
  return (std::isinf(v) && !std::isinf(m)) ? std::copysign(std::numeric_limits<float>::max(), v) : v;
}

// Merges a mask stored one row per query, contiguous along the keys, into the key-major tile st (nq <= BM queries
// along the lanes, nk <= BN keys along the rows): NB queries at a time, conv(i, row) writes query i's nk mask values
// as floats into a query-major buffer, whose NB x NB blocks are transposed in registers and merged lane-wise,
// st_lanes = merge(st_lanes, mask_lanes). (Adding the rows straight into the transposed tile is a scalar
// read-modify-write per element: about a quarter of the forward's time with a full (L, L) mask, measured.)
template <class Conv, class Merge>
void merge_mask_rows(int nq, int nk, float* st, Conv conv, Merge merge) {
  alignas(64) float rows[NB * BN] = {};  // NB queries x BN keys; keys past nk stay 0, rows past nq are never stored
  alignas(64) float blk[NB * NB];        // one transposed block: NB keys x NB queries
  for (int q0 = 0; q0 < nq; q0 += NB) {
    const int nl = std::min(NB, nq - q0);
    for (int i = 0; i < nl; ++i) conv(q0 + i, rows + i * BN);
    for (int j0 = 0; j0 < nk; j0 += NB) {
      transpose_nb(rows + j0, BN, blk, NB);
      for (int j = 0; j < std::min(NB, nk - j0); ++j) {
        float* s = st + (j0 + j) * BM + q0;
        vstn(s, merge(vldn(s, nl), vld(blk + j * NB)), nl);
      }
    }
  }
}

// mask_log2 lane-wise (the same bits): ±inf stays ±inf, a finite value whose product overflows becomes ±FLT_MAX.
inline V vmask_log2(V m) {
  constexpr float kMax = std::numeric_limits<float>::max();
  const V v = vmul(m, vset(kLog2e));
  V r = vselect_lt(v, -kMax, vset(-kMax), v);                  // -inf -> -FLT_MAX
  r = vselect_lt(vsub(vzero(), v), -kMax, vset(kMax), r);      // +inf -> FLT_MAX
  r = vselect_lt(m, -kMax, v, r);                              // unless m itself is -inf
  return vselect_lt(vsub(vzero(), m), -kMax, v, r);            // or +inf
}

// The two ways a converted mask lane joins a score lane: added (additive masks, log2 units), or -inf where the
// mask lane reads -1 (bool masks converted to 0 kept / -1 hidden).
inline V merge_add(V s, V m) { return vadd(s, m); }
inline V merge_keep(V s, V m) { return vselect_lt(m, -0.5f, vset(-kInf), s); }

// A mask stored one row per query, contiguous along the keys (si != 0, sj == 1): calls f(conv, merge) with the
// conversion conv(i, row), which writes query i0 + i's nk values from key j0 on as floats into row (room for BN;
// additive masks in log2 units, bool masks as 0 / -1), and the merge that applies them.
template <class F>
void with_row_mask(const AttnCommon& p, const char* base, int64_t i0, int64_t j0, int nk, F f) {
  const int64_t si = p.mask_stride[2];
  if (p.mask_kind == MaskKind::Bool) {
    const uint8_t* m = reinterpret_cast<const uint8_t*>(base);
    f([&](int i, float* row) {
      const uint8_t* mi = m + (i0 + i) * si + j0;
      for (int j = 0; j < nk; ++j) row[j] = mi[j] ? 0.0f : -1.0f;
    }, merge_keep);
  } else if (p.mask_dtype == DType::F32) {
    const float* m = reinterpret_cast<const float*>(base);
    f([&](int i, float* row) {
      const float* mi = m + (i0 + i) * si + j0;
      for (int j = 0; j < nk; j += NB) vst(row + j, vmask_log2(vldn(mi + j, nk - j)));
    }, merge_add);
  } else {
    const auto half = [&](auto* m) {
      f([&, m](int i, float* row) {
        const auto* mi = m + (i0 + i) * si + j0;
        for (int j = 0; j < nk; ++j) row[j] = to_f32(mi[j]);
        for (int j = 0; j < nk; j += NB) vst(row + j, vmask_log2(vld(row + j)));
      }, merge_add);
    };
    if (p.mask_dtype == DType::BF16) half(reinterpret_cast<const bf16_t*>(base));
    else half(reinterpret_cast<const f16_t*>(base));
  }
}

// Is the mask stored one row per query, contiguous along the keys (with_row_mask's layout)?
inline bool row_mask(const AttnCommon& p) {
  return p.mask_kind != MaskKind::None && p.mask_stride[2] != 0 && p.mask_stride[3] == 1;
}

// Element (b, h) of the mask: its first byte.
inline const char* mask_base(const AttnCommon& p, int64_t b, int64_t h) {
  const int64_t esize = p.mask_kind == MaskKind::Bool ? 1 : (p.mask_dtype == DType::F32 ? 4 : 2);
  return static_cast<const char*>(p.mask) + (b * p.mask_stride[0] + h * p.mask_stride[1]) * esize;
}

// Any other mask layout, element by element into the transposed tile (a key-padding mask, si == 0, is one value
// per key: converted once, applied to the whole row).
template <class MT>
void add_mask_t(const AttnCommon& p, const char* base, int64_t i0, int nq, int64_t j0, int nk, float* st) {
  const int64_t si = p.mask_stride[2], sj = p.mask_stride[3];
  const MT* m = reinterpret_cast<const MT*>(base);
  for (int j = 0; j < nk; ++j) {
    const MT* mj = m + (j0 + j) * sj + i0 * si;
    float* row = st + j * BM;
    if (si == 0) {
      const float v = mask_log2(to_f32(mj[0]));
      for (int i = 0; i < nq; ++i) row[i] += v;
    } else {
      for (int i = 0; i < nq; ++i) row[i] += mask_log2(to_f32(mj[i * si]));
    }
  }
}

// The causal diagonal of a transposed tile: query i0 + i sees key j0 + j iff j0 + j <= i0 + i + shift, so lanes
// i < j0 + j - shift - i0 of row j become -inf.
void apply_causal(const AttnCommon& p, int64_t i0, int64_t j0, int nk, float* st) {
  const int64_t shift = p.bottom_right ? p.Lk - p.Lq : 0;
  for (int j = 0; j < nk; ++j) {
    const int64_t t = std::min<int64_t>(BM, std::max<int64_t>(0, j0 + j - shift - i0));
    float* row = st + j * BM;
    for (int64_t i = 0; i < t; ++i) row[i] = -kInf;
  }
}

// Applies the attention mask and the causal diagonal to a transposed log2-domain tile st (nk <= BN keys from j0 x
// BM queries from i0; lanes >= nq are left alone).
void apply_masks(const AttnCommon& p, int64_t b, int64_t h, int64_t i0, int nq, int64_t j0, int nk, float* st) {
  if (p.mask_kind != MaskKind::None) {
    const char* base = mask_base(p, b, h);
    if (row_mask(p) && nq > 1) {
      with_row_mask(p, base, i0, j0, nk, [&](auto conv, auto merge) { merge_mask_rows(nq, nk, st, conv, merge); });
    } else if (p.mask_kind == MaskKind::Bool) {
      const int64_t si = p.mask_stride[2], sj = p.mask_stride[3];
      const uint8_t* m = reinterpret_cast<const uint8_t*>(base);
      for (int j = 0; j < nk; ++j) {
        const uint8_t* mj = m + (j0 + j) * sj + i0 * si;
        float* row = st + j * BM;
        if (si == 0) {  // the same flag for every query (a key-padding mask): the key is in or out for all
          if (!mj[0]) std::fill(row, row + nq, -kInf);
        } else {
          for (int i = 0; i < nq; ++i)
            if (!mj[i * si]) row[i] = -kInf;
        }
      }
    } else if (p.mask_dtype == DType::F32) {
      add_mask_t<float>(p, base, i0, nq, j0, nk, st);
    } else if (p.mask_dtype == DType::BF16) {
      add_mask_t<bf16_t>(p, base, i0, nq, j0, nk, st);
    } else {
      add_mask_t<f16_t>(p, base, i0, nq, j0, nk, st);
    }
  }
  if (p.causal) apply_causal(p, i0, j0, nk, st);
}

// Does the causal diagonal cut through the tile (some query of [i0, i0 + nq) must not see some key of [j0, j0 + nk))?
inline bool causal_cut(const AttnCommon& p, int64_t i0, int64_t j0, int nk) {
  const int64_t shift = p.bottom_right ? p.Lk - p.Lq : 0;
  return p.causal && j0 + nk - 1 > i0 + shift;
}
// Keys [0, key_end) can be seen by some query of the block starting at i0 with nq rows.
inline int64_t key_end(const AttnCommon& p, int64_t i0, int nq) {
  if (!p.causal) return p.Lk;
  const int64_t shift = p.bottom_right ? p.Lk - p.Lq : 0;
  return std::max<int64_t>(0, std::min<int64_t>(p.Lk, i0 + nq + shift));
}

// Causal diagonal tiles, in finer steps than whole tiles: the key rows are taken NB at a time, and a group of rows
// computes only the lane vectors from the first one holding a query that sees the group's first key (lo) onward;
// consecutive groups with equal lo merge. Column q of S^T / P^T is then valid in rows [0, rows[q]) only (the
// rest of the tile is never read). A tile the diagonal does not cut is one group: rows [0, nk), lo = 0.
// Only the nv = ceil(nq / NB) lane vectors that hold queries are computed at all (a block of 32 queries, e.g. the
// whole of a 32-token sequence, costs half a block of 64): lanes from nv * NB on are never written nor read.
struct RowGroups {
  int n = 0, nv = QV;
  int r0[BN / NB + 1] = {}, lo[BN / NB] = {};  // group g: rows [r0[g], r0[g + 1]) x lane vectors [lo[g], nv)
  int rows[QV] = {};
};
RowGroups row_groups(const AttnCommon& p, int64_t i0, int nq, int64_t j0, int nk) {
  RowGroups rg;
  rg.nv = (nq + NB - 1) / NB;
  if (!causal_cut(p, i0, j0, nk)) {
    rg.n = 1;
    rg.r0[1] = nk;
    for (int q = 0; q < rg.nv; ++q) rg.rows[q] = nk;
    return rg;
  }
  const int64_t shift = p.bottom_right ? p.Lk - p.Lq : 0;
  for (int r = 0; r < nk; r += NB) {
    // lanes below i0 + first cannot see key j0 + r; first < nq since j0 + r < key_end(p, i0, nq)
    const int64_t first = std::max<int64_t>(0, j0 + r - shift - i0);
    const int lo = int(first / NB);
    if (rg.n == 0 || rg.lo[rg.n - 1] != lo) {
      rg.r0[rg.n] = r;
      rg.lo[rg.n++] = lo;
    }
  }
  rg.r0[rg.n] = nk;
  for (int q = 0, g = 0; q < rg.nv; ++q) {
    while (g < rg.n && rg.lo[g] <= q) ++g;
    rg.rows[q] = rg.r0[g];
  }
  return rg;
}

// C (nk x BM, row stride BM) = A B, group by group: each group's rows [r0, r1) x lane vectors [lo, nv) only. A: the
// tile's nk rows of K (or V), row stride `as`, unit column stride; B: a K x BM panel (Q^T or dO^T), row stride BM.
template <class Ops = F32Ops>
void gemm_groups(const RowGroups& rg, int64_t K, const typename Ops::E* a, int64_t as, const typename Ops::E* b,
                 float* c, const float* scale = nullptr) {  // scale: BM lanes multiplying the product, or nullptr
  for (int g = 0; g < rg.n; ++g) {
    const int r0 = rg.r0[g], lo = rg.lo[g];
    gemm<Ops>(rg.r0[g + 1] - r0, (rg.nv - lo) * NB, K, a + r0 * as, as, 1, b + lo * NB, BM, c + r0 * BM + lo * NB,
              BM, scale == nullptr ? nullptr : scale + lo * NB, false);
  }
}

// acc (nk x N, row stride N) += T X, group by group: T is a tile (nk x BM, row stride BM) of which group g holds
// rows [r0, r1) x query columns [lo * NB, nq); X: the block's query rows (row i at x + i * xs, N columns).
// With BF16PairOps: T as bf16 words along the queries (row stride BM / 2 words), X as pairs of query rows (pair
// row t at x + t * xs words); the queries are taken in pairs, so T's lanes past nq must read 0.
template <class Ops = F32Ops>
void gemm_groups_acc(const RowGroups& rg, int nq, int64_t N, const typename Ops::E* t, const typename Ops::E* x,
                     int64_t xs, float* acc) {
  constexpr int P = Ops::kPer;
  for (int g = 0; g < rg.n; ++g) {
    const int r0 = rg.r0[g], c0 = rg.lo[g] * NB;
    if (nq > c0)
      gemm<Ops>(rg.r0[g + 1] - r0, N, (nq - c0 + P - 1) / P, t + (r0 * BM + c0) / P, BM / P, 1, x + c0 / P * xs, xs,
                acc + r0 * N, N, nullptr, true);
  }
}

// ------------------------------------------------------------------------------------------------------------
// fp32 views of K and V (16-bit inputs are widened once per call, in parallel over (b, kv head))
// ------------------------------------------------------------------------------------------------------------
struct F32View {
  const float* p = nullptr;
  int64_t sb = 0, sh = 0, sl = 0;
  const float* at(int64_t b, int64_t h, int64_t l) const { return p + b * sb + h * sh + l * sl; }
};

template <class T>
F32View widen(const void* src, const int64_t* st, int64_t B, int64_t H, int64_t L, int64_t D, int nth, float* dst) {
  if constexpr (std::is_same<T, float>::value) {
    return F32View{static_cast<const float*>(src), st[0], st[1], st[2]};
  } else {
    run_items(nth, B * H, [&](int64_t g, int) {
      const int64_t b = g / H, h = g % H;
      const T* s = static_cast<const T*>(src) + b * st[0] + h * st[1];
      float* d = dst + g * L * D;
      for (int64_t l = 0; l < L; ++l) row_to_f32(s + l * st[2], d + l * D, D);
    });
    return F32View{dst, H * L * D, L * D, D};
  }
}

// Floats widen<T> needs from a Workspace for a (B, H, L, D) input: none for fp32 (read in place).
template <class T>
size_t widen_floats(int64_t B, int64_t H, int64_t L, int64_t D) {
  return std::is_same<T, float>::value ? 0 : Workspace::round_floats(size_t(B * H * L * D));
}

// Threads to use: one for small problems, where a parallel region costs more than it saves (results never depend on it).
constexpr double kMinParallelWork = double(1 << 21);  // multiply-adds of the (unmasked) problem
int threads_for(const AttnCommon& p) {
  const double work = double(p.B) * double(p.Hq) * double(p.Lq) * double(p.Lk) * double(p.D + p.Dv);
  return work < kMinParallelWork ? 1 : std::max(1, p.num_threads);
}

// A query block's rows transposed and scaled (Q^T, dO^T): qt[d * BM + i] = q[i][d] * c (row i at qs + i * sq), zero
// for lanes i >= nq.
// fp32 rows are transposed NB x NB in registers, the rest element by element.
template <class T>
void pack_qt(const T* qs, int64_t sq, int nq, int64_t D, float c, float* qt) {
  int64_t d0 = 0;
  if constexpr (std::is_same<T, float>::value) {
    for (; d0 + NB <= D; d0 += NB) {
      int i = 0;
      for (; i + NB <= nq; i += NB) transpose_nb(qs + i * sq + d0, sq, qt + d0 * BM + i, BM);
      for (int64_t d = d0; d < d0 + NB; ++d)
        for (int k = i; k < BM; ++k) qt[d * BM + k] = k < nq ? qs[k * sq + d] : 0.0f;
      for (int64_t d = d0; d < d0 + NB; ++d)
        for (int q = 0; q < QV; ++q) vst(qt + d * BM + q * NB, vmul(vld(qt + d * BM + q * NB), vset(c)));
    }
  }
  for (int64_t d = d0; d < D; ++d)
    for (int i = 0; i < BM; ++i) qt[d * BM + i] = i < nq ? to_f32(qs[i * sq + d]) * c : 0.0f;
}

// out[i][dv] = O^T[dv][i] * inv[i] for i < nq (row i at os + i * so); scales O^T in place. fp32 rows: NB x NB
// register transposes.
template <class T>
void unpack_ot(float* ot, const float* inv, int nq, int64_t Dv, T* os, int64_t so) {
  for (int64_t d = 0; d < Dv; ++d)
    for (int q = 0; q < QV; ++q) vst(ot + d * BM + q * NB, vmul(vld(ot + d * BM + q * NB), vld(inv + q * NB)));
  int64_t d0 = 0;
  int i0 = 0;
  if constexpr (std::is_same<T, float>::value) {
    for (; i0 + NB <= nq; i0 += NB)
      for (d0 = 0; d0 + NB <= Dv; d0 += NB) transpose_nb(ot + d0 * BM + i0, BM, os + i0 * so + d0, so);
    for (int i = 0; i < i0; ++i)  // the last Dv % NB columns of those rows
      for (int64_t d = d0; d < Dv; ++d) os[i * so + d] = ot[d * BM + i];
  }
  for (int i = i0; i < nq; ++i)
    for (int64_t d = 0; d < Dv; ++d) os[i * so + d] = from_f32<T>(ot[d * BM + i]);
}

// Per-thread scratch (OpenMP's threads live for the process).
float* scratch(size_t floats) {
  thread_local std::vector<float> buf;
  if (buf.size() < floats) buf.resize(floats);
  return buf.data();
}

// ------------------------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------------------------
#if PYATTN_CPU_BF16_DOT
// bf16 attention on vdpbf16ps (BF16PairOps), packing helpers. Forward: S^T = K Q^T with K's rows read in place as
// words of two bf16 along D and Q^T packed as pairs (D / 2 x BM words), scaled by scale * log2(e) in fp32 as the
// GEMM stores it; O^T += V^T P^T with V packed once per call as pairs along the keys and P^T rounded to bf16 pairs
// (as GPU kernels feed P to the tensor cores). Products are exact and summed in fp32. Taken for bf16 inputs with an
// even head dim and K rows on 4-byte boundaries (the backward: V's too); bwd_impl says how its products pair up.
inline uint32_t bf16_pair(const bf16_t* x) {
  uint32_t w;
  std::memcpy(&w, x, sizeof(w));
  return w;
}
// Can K (and, with_v, V) be read in place as words along the head dim: an even head dim, 4-byte aligned rows?
bool bf16_pairs_ok(const AttnCommon& p, bool with_v) {
  const auto words = [](const void* x, const int64_t* st, int64_t d) {
    return d % 2 == 0 && reinterpret_cast<uintptr_t>(x) % 4 == 0 && st[0] % 2 == 0 && st[1] % 2 == 0 && st[2] % 2 == 0;
  };
  return words(p.k, p.k_stride, p.D) && (!with_v || words(p.v, p.v_stride, p.Dv));
}
// K's (V's) rows of (b, kv head hk) from key j0 on, as words (row stride: k_stride[2] / 2 words).
inline const uint32_t* k_words(const AttnCommon& p, int64_t b, int64_t hk, int64_t j0) {
  return reinterpret_cast<const uint32_t*>(static_cast<const bf16_t*>(p.k) + b * p.k_stride[0] + hk * p.k_stride[1] +
                                           j0 * p.k_stride[2]);
}
inline const uint32_t* v_words(const AttnCommon& p, int64_t b, int64_t hk, int64_t j0) {
  return reinterpret_cast<const uint32_t*>(static_cast<const bf16_t*>(p.v) + b * p.v_stride[0] + hk * p.v_stride[1] +
                                           j0 * p.v_stride[2]);
}
// qp[pr * BM + i] = (q[i][2 pr], q[i][2 pr + 1]) for i < nq, 0 past nq (row i at qs + i * sq).
void pack_q_pairs(const bf16_t* qs, int64_t sq, int nq, int64_t D, uint32_t* qp) {
  for (int64_t pr = 0; pr < D / 2; ++pr)
    for (int i = 0; i < BM; ++i) qp[pr * BM + i] = i < nq ? bf16_pair(qs + i * sq + 2 * pr) : 0u;
}
// xp[t * N + n] = (x[2 t][n], x[2 t + 1][n]) for t < npairs, rows past `rows` as 0 (row i at xs + i * sx): pairs
// of key rows (K, V) or of a query block's rows (Q, dO).
void pack_row_pairs(const bf16_t* xs, int64_t sx, int64_t rows, int64_t npairs, int64_t N, uint32_t* xp) {
  for (int64_t t = 0; t < npairs; ++t)
    for (int64_t n = 0; n < N; ++n) {
      const uint32_t lo = 2 * t < rows ? xs[2 * t * sx + n].bits : 0u;
      const uint32_t hi = 2 * t + 1 < rows ? xs[(2 * t + 1) * sx + n].bits : 0u;
      xp[t * N + n] = lo | (hi << 16);
    }
}
// K or V (B, H, L, N) as pairs of key rows, once per call: (L + 1) / 2 pair rows of N words per (batch, head).
void pack_key_pairs(const void* x, const int64_t* st, int64_t B, int64_t H, int64_t L, int64_t N, int nth,
                    uint32_t* xp) {
  const int64_t npr = (L + 1) / 2;
  run_items(nth, B * H, [&](int64_t g, int) {
    pack_row_pairs(static_cast<const bf16_t*>(x) + g / H * st[0] + g % H * st[1], st[2], L, npr, N, xp + g * npr * N);
  });
}
// Rows [0, nk) of a tile (row stride BM), lane vectors [0, nv), as bf16 words along the lanes (row stride BM / 2
// words), lanes >= nq as 0: T for gemm_groups_acc<BF16PairOps>.
void pack_rows_bf16(const float* t, int nk, int nv, int nq, uint32_t* tw) {
  for (int r = 0; r < nk; ++r)
    for (int q = 0; q < nv; ++q)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(tw + r * (BM / 2) + q * (NB / 2)),
                          (__m256i)_mm512_cvtneps_pbh(vldn(t + r * BM + q * NB, nq - q * NB)));
}
// P^T (or dS^T) rows (2 pr, 2 pr + 1) -> pair row pr of pp, lane vectors [0, nv): bf16 round-to-nearest-even; row nk
// (past the tile) reads as 0.
void pack_p_pairs(const float* st, int nk, int nv, uint32_t* pp) {
  const auto bf = [](const float* x) { return _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(vld(x))); };
  for (int r = 0; r < nk; r += 2)
    for (int q = 0; q < nv; ++q) {
      const __m512i hi = r + 1 < nk ? bf(st + (r + 1) * BM + q * NB) : _mm512_setzero_si512();
      const __m512i lo = bf(st + r * BM + q * NB);
      _mm512_storeu_si512(pp + (r / 2) * BM + q * NB, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
    }
}
#endif

// Few query rows (decoding with a KV cache: Lq <= 4), where a query block would waste all lanes but one. A work item
// takes a slice of the G x Lq rows that share one kv head (G = Hq / Hkv query heads: GQA / MQA) and walks the keys
// in blocks of BN: the block's K and V rows are fetched once (16-bit inputs converted to fp32 here, block by block,
// so K and V are never widened as a whole) and stay in cache while each row of the slice computes, vectorized
// along D, its scores s_j = q . k_j, its online softmax and out += p_j v_j. GQA decoding so reads K and V once per
// kv head instead of once per query head. Each row's arithmetic is the same whatever the slicing: results do not
// depend on the thread count. Same masks, dropout hash and outputs as the block path.
constexpr int64_t kRowPathMaxLq = 4;

// A block of nk rows of K or V (row j at src + j * sl), as fp32 rows of `width` floats: fp32 inputs in place.
template <class T>
const float* rows_f32(const T* src, int64_t sl, int nk, int64_t width, float* buf, int64_t& stride) {
  if constexpr (std::is_same<T, float>::value) {
    stride = sl;
    return src;
  } else {
    for (int j = 0; j < nk; ++j) row_to_f32(src + j * sl, buf + j * width, width);
    stride = width;
    return buf;
  }
}

// a[0 : NV * NB) = a * alpha + sum_j p[j] v_j[0 : NV * NB) (v_j at v + j * vsl), keys in order: NV independent
// FMA chains (four left the FMA units half idle at Dv = 128: each chain waits on its previous FMA's latency).
template <int NV>
void pv_rows(float* a, const float* v, int64_t vsl, const float* p, int nk, float alpha) {
  V o[NV];
  for (int q = 0; q < NV; ++q) o[q] = vmul(vld(a + q * NB), vset(alpha));
  for (int j = 0; j < nk; ++j) {
    const V pj = vset(p[j]);
    for (int q = 0; q < NV; ++q) o[q] = vfma(pj, vld(v + j * vsl + q * NB), o[q]);
  }
  for (int q = 0; q < NV; ++q) vst(a + q * NB, o[q]);
}

template <class T>
void fwd_rows(const AttnFwdParams& p, int64_t b, int64_t hk, int64_t r0, int64_t r1) {
  const int64_t D = p.D, Dv = p.Dv, G = p.Hq / p.Hkv, R = r1 - r0;
  const int64_t Dp = ceil_div(D, NB) * NB, Dvp = ceil_div(Dv, NB) * NB;
  float* qr = scratch(size_t(R * (Dp + Dvp + 3) + BN * (BM + 1 + D + Dv)));
  float* acc = qr + R * Dp;                 // R x Dvp output accumulators
  float* ms = acc + R * Dvp;                // R running maxima (log2 units)
  float* ls = ms + R;                       // R running sums
  uint32_t* keys = reinterpret_cast<uint32_t*>(ls + R);  // R dropout row keys
  float* st = ls + 2 * R;                   // scores of one row: lane 0 of a BN x BM tile (apply_masks' layout)
  float* sc = st + BN * BM;                 // the same scores, contiguous, then probabilities
  float* kbuf = sc + BN;                    // a block of K (nk x D) and V (nk x Dv) rows, 16-bit inputs only
  float* vbuf = kbuf + BN * D;
  const float c = p.scale * kLog2e;
  const bool dropout = p.dropout_p > 0.0f;
  const uint32_t thr = dropout_threshold(p.dropout_p);
  const float inv_keep = dropout ? 1.0f / (1.0f - p.dropout_p) : 1.0f;
  auto head = [&](int64_t r) { return hk * G + (r0 + r) / p.Lq; };
  auto row = [&](int64_t r) { return (r0 + r) % p.Lq; };
  // bf16 on AVX512_BF16 (pairs): q . k_j on vdpbf16ps against K's rows in place (no conversion of K), the query
  // kept as bf16 pairs (unscaled: the sum is multiplied by scale * log2(e)).
  bool pairs = false;
#if PYATTN_CPU_BF16_DOT
  if constexpr (std::is_same<T, bf16_t>::value) pairs = bf16_pairs_ok(p, false);
#endif
  int64_t jend = 0;
  for (int64_t r = 0; r < R; ++r) {
    const int64_t h = head(r), i = row(r);
    const T* qs = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1] + i * p.q_stride[2];
    if (pairs)  // D / 2 words, then zeros
      for (int64_t d = 0; d < Dp; ++d) {
        uint32_t w = 0;
        if (2 * d < D) std::memcpy(&w, qs + 2 * d, sizeof(w));
        std::memcpy(qr + r * Dp + d, &w, sizeof(w));
      }
    else
      for (int64_t d = 0; d < Dp; ++d) qr[r * Dp + d] = d < D ? to_f32(qs[d]) * c : 0.0f;
    std::fill(acc + r * Dvp, acc + (r + 1) * Dvp, 0.0f);
    ms[r] = -kInf;
    ls[r] = 0.0f;
    keys[r] = dropout ? dropout_row_key(p.seed, p.offset, p.Hq, p.Lq, b, h, i) : 0u;
    jend = std::max(jend, key_end(p, i, 1));
  }
  const T* kh = static_cast<const T*>(p.k) + b * p.k_stride[0] + hk * p.k_stride[1];
  const T* vh = static_cast<const T*>(p.v) + b * p.v_stride[0] + hk * p.v_stride[1];
  for (int64_t j0 = 0; j0 < jend; j0 += BN) {
    const int nb = int(std::min<int64_t>(BN, jend - j0));
    int64_t ksl = 0, vsl = 0;
    const float* kb = pairs ? nullptr : rows_f32(kh + j0 * p.k_stride[2], p.k_stride[2], nb, D, kbuf, ksl);
    const float* vb = rows_f32(vh + j0 * p.v_stride[2], p.v_stride[2], nb, Dv, vbuf, vsl);
    for (int64_t r = 0; r < R; ++r) {
      const int64_t h = head(r), i = row(r);
      const int nk = int(std::min<int64_t>(nb, key_end(p, i, 1) - j0));
      if (nk <= 0) continue;
      const float* q = qr + r * Dp;
#if PYATTN_CPU_BF16_DOT
      if (pairs) {
        const int64_t D2 = D / 2;
        for (int j = 0; j < nk; ++j) {
          const float* kj = reinterpret_cast<const float*>(k_words(p, b, hk, j0 + j));  // D / 2 words as floats
          V t = vzero();
          for (int64_t d = 0; d < D2; d += NB)
            t = BF16PairOps::fma(vld(q + d), vldn(kj + d, int(std::min<int64_t>(NB, D2 - d))), t);
          st[j * BM] = vhsum(t) * c;
        }
      }
#endif
      for (int j = 0; j < nk && !pairs; ++j) {
        const float* kj = kb + j * ksl;
        V t = vzero();
        for (int64_t d = 0; d < D; d += NB) t = vfma(vld(q + d), vldn(kj + d, int(std::min<int64_t>(NB, D - d))), t);
        st[j * BM] = vhsum(t);
      }
      if (p.mask_kind != MaskKind::None || causal_cut(p, i, j0, nk)) apply_masks(p, b, h, i, 1, j0, nk, st);
      float mx = ms[r];
      for (int j = 0; j < nk; ++j) {
        sc[j] = st[j * BM];
        mx = std::max(mx, sc[j]);  // NaN scores are skipped here and propagate through exp2 below
      }
      const float m_use = mx == -kInf ? 0.0f : mx;
      float sum = 0.0f;
      for (int j = 0; j < nk; j += NB) {
        const int n = std::min(NB, nk - j);
        const V e = vexp2(vsub(vldn(sc + j, n), vset(m_use)));
        vstn(sc + j, e, n);
      }
      for (int j = 0; j < nk; ++j) sum += sc[j];
      const float alpha = std::exp2(ms[r] - m_use);
      ls[r] = ls[r] * alpha + sum;
      ms[r] = mx;
      if (dropout)
        for (int j = 0; j < nk; ++j) sc[j] = mix32(keys[r] ^ dropout_col(j0 + j)) >= thr ? sc[j] * inv_keep : 0.0f;
      // out += p V: eight, then four vectors of Dv at a time (independent FMA chains down the keys), then the rest
      float* a = acc + r * Dvp;
      int64_t d = 0;
      for (; d + 8 * NB <= Dv; d += 8 * NB) pv_rows<8>(a + d, vb + d, vsl, sc, nk, alpha);
      for (; d + 4 * NB <= Dv; d += 4 * NB) pv_rows<4>(a + d, vb + d, vsl, sc, nk, alpha);
      for (; d < Dv; d += NB) {
        const int n = int(std::min<int64_t>(NB, Dv - d));
        V o = vmul(vld(a + d), vset(alpha));
        for (int j = 0; j < nk; ++j) o = vfma(vset(sc[j]), vldn(vb + j * vsl + d, n), o);
        vst(a + d, o);
      }
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    const int64_t h = head(r), i = row(r);
    const bool dead = !(ls[r] > 0.0f) && !std::isnan(ls[r]);
    const float inv = dead ? 0.0f : 1.0f / ls[r];
    T* orow = static_cast<T*>(p.out) + b * p.out_stride[0] + h * p.out_stride[1] + i * p.out_stride[2];
    for (int64_t d = 0; d < Dv; ++d) orow[d] = from_f32<T>(acc[r * Dvp + d] * inv);
    p.lse[(b * p.Hq + h) * p.Lq + i] = dead ? kInf : (ms[r] + std::log2(ls[r])) * kLn2;
  }
}

template <class T>
void fwd_impl(const AttnFwdParams& p) {
  const int nth = threads_for(p);
  if (p.Lq <= kRowPathMaxLq) {
    // (b, kv head, slice of its G * Lq rows): slices only when there are too few (b, kv head) pairs to feed the
    // threads (each slice reads the kv head's K and V again)
    if (p.B * p.Hkv == 0) return;
    const int64_t rows = (p.Hq / p.Hkv) * p.Lq;
    const int64_t ns = std::min(rows, ceil_div(int64_t(4) * nth, p.B * p.Hkv));
    run_items(nth, p.B * p.Hkv * ns, [&](int64_t g, int) {
      const int64_t bk = g / ns, sl = g % ns;
      fwd_rows<T>(p, bk / p.Hkv, bk % p.Hkv, rows * sl / ns, rows * (sl + 1) / ns);
    });
    return;
  }
  bool pairs = false;  // the bf16 pair path (PYATTN_CPU_BF16_DOT): K read in place, V packed as pairs
#if PYATTN_CPU_BF16_DOT
  if constexpr (std::is_same<T, bf16_t>::value) pairs = bf16_pairs_ok(p, false);
#endif
  const int64_t npr = (p.Lk + 1) / 2;  // key pairs of a (batch, kv head)
  const size_t nk = pairs ? 0 : widen_floats<T>(p.B, p.Hkv, p.Lk, p.D);
  const size_t nv = pairs ? Workspace::round_floats(size_t(p.B * p.Hkv * npr * p.Dv))
                          : widen_floats<T>(p.B, p.Hkv, p.Lk, p.Dv);
  Workspace ws(nk + nv);
  const F32View K = pairs ? F32View{}
                          : widen<T>(p.k, p.k_stride, p.B, p.Hkv, p.Lk, p.D, nth, nk ? ws.take(nk) : nullptr);
  const F32View Vv = pairs ? F32View{}
                           : widen<T>(p.v, p.v_stride, p.B, p.Hkv, p.Lk, p.Dv, nth, nv ? ws.take(nv) : nullptr);
  [[maybe_unused]] uint32_t* vpairs = pairs ? reinterpret_cast<uint32_t*>(ws.take(nv)) : nullptr;
#if PYATTN_CPU_BF16_DOT
  if (pairs) pack_key_pairs(p.v, p.v_stride, p.B, p.Hkv, p.Lk, p.Dv, nth, vpairs);
#endif
  const int64_t D = p.D, Dv = p.Dv, G = p.Hq / p.Hkv;
  const int64_t nqb = ceil_div(p.Lq, BM);
  const float c = p.scale * kLog2e;
  const bool dropout = p.dropout_p > 0.0f;
  const uint32_t thr = dropout_threshold(p.dropout_p);
  const float inv_keep = dropout ? 1.0f / (1.0f - p.dropout_p) : 1.0f;

  // Items (b, h, query block), the blocks innermost (a head's K and V stay in cache from block to block), except
  // when a mask has a row per query shared by the heads: then the heads are innermost, so that a block's mask rows
  // (BM x Lk) are read from memory once, not once per head (a (B, 1, L, L) fp32 mask at L = 2048 is 16 MB).
  const bool heads_inner = p.mask_kind != MaskKind::None && p.mask_stride[1] == 0 && p.mask_stride[2] != 0;
  run_items(nth, p.B * p.Hq * nqb, [&](int64_t g, int) {
    const int64_t r = heads_inner ? g / p.Hq % nqb : g % nqb;
    const int64_t qb = p.causal ? nqb - 1 - r : r;  // causal: the blocks with most keys first
    const int64_t b = g / (p.Hq * nqb), h = heads_inner ? g % p.Hq : g / nqb % p.Hq, hk = h / G;
    const int64_t i0 = qb * BM;
    const int nq = int(std::min<int64_t>(BM, p.Lq - i0));
    float* qt = scratch(size_t((D + Dv + BN + 2 * QV * NB + BN / 2) * BM + BM));
    float* ot = qt + D * BM;          // O^T (Dv x BM)
    float* st = ot + Dv * BM;         // S^T / P^T (BN x BM)
    float* m = st + BN * BM;          // running max (log2 units), per lane
    float* l = m + BM;                // running sum, per lane
    uint32_t* keys = reinterpret_cast<uint32_t*>(l + BM);
    [[maybe_unused]] uint32_t* pp = keys + BM;  // pair path: P^T as bf16 pairs (BN / 2 x BM words)
    alignas(64) float cs[BM];         // pair path: scale * log2(e) in every lane, applied to S^T by the GEMM
    std::fill(cs, cs + BM, c);

    // Q^T, pre-scaled: qt[d][i] = q[i][d] * scale * log2(e), zero past nq (pair path: unscaled pairs).
    const T* qs = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1] + i0 * p.q_stride[2];
#if PYATTN_CPU_BF16_DOT
    if constexpr (std::is_same<T, bf16_t>::value) {
      if (pairs) pack_q_pairs(qs, p.q_stride[2], nq, D, reinterpret_cast<uint32_t*>(qt));
    }
#endif
    if (!pairs) pack_qt(qs, p.q_stride[2], nq, D, c, qt);
    std::fill(ot, ot + Dv * BM, 0.0f);
    for (int q = 0; q < QV; ++q) {
      vst(m + q * NB, vset(-kInf));
      vst(l + q * NB, vzero());
    }
    if (dropout) dropout_keys(p, b, h, i0, nq, keys);

    const int64_t jend = key_end(p, i0, nq);
    for (int64_t j0 = 0; j0 < jend; j0 += BN) {
      const int nk = int(std::min<int64_t>(BN, jend - j0));
      const RowGroups rg = row_groups(p, i0, nq, j0, nk);
#if PYATTN_CPU_BF16_DOT
      if (pairs) {  // S^T = (K Q^T on bf16 pairs) * scale * log2(e)
        gemm_groups<BF16PairOps>(rg, D / 2, k_words(p, b, hk, j0), p.k_stride[2] / 2,
                                 reinterpret_cast<const uint32_t*>(qt), st, cs);
      }
#endif
      if (!pairs) gemm_groups(rg, D, K.at(b, hk, j0), K.sl, qt, st);  // S^T (nk x BM) = K[j0:j0+nk] Q^T
      if (p.mask_kind != MaskKind::None || causal_cut(p, i0, j0, nk)) apply_masks(p, b, h, i0, nq, j0, nk, st);
      // online softmax down the rows [0, rows[q]) of each lane vector q, lane-wise
      alignas(64) float alpha[BM];
      for (int q = 0; q < rg.nv; ++q) {
        const int n = rg.rows[q];
        const float* col = st + q * NB;
        const V m_old = vld(m + q * NB);
        V mx0 = m_old, mx1 = m_old, mx2 = m_old, mx3 = m_old;  // four chains: vmax latency would bound one
        int j = 0;
        for (; j + 4 <= n; j += 4) {
          mx0 = vmax(vld(col + j * BM), mx0);
          mx1 = vmax(vld(col + (j + 1) * BM), mx1);
          mx2 = vmax(vld(col + (j + 2) * BM), mx2);
          mx3 = vmax(vld(col + (j + 3) * BM), mx3);
        }
        for (; j < n; ++j) mx0 = vmax(vld(col + j * BM), mx0);
        const V mx = vmax(vmax(mx0, mx1), vmax(mx2, mx3));  // NaN scores never win a vmax: skipped here
        // a row that has seen only -inf so far keeps max -inf; subtract 0 then (exp2(-inf) = 0, no NaN)
        const V m_use = vselect_lt(mx, -std::numeric_limits<float>::max(), vzero(), mx);
        V sum = vzero();
        for (j = 0; j < n; ++j) {
          const V e = vexp2(vsub(vld(col + j * BM), m_use));
          vst(st + j * BM + q * NB, e);
          sum = vadd(sum, e);
        }
        const V a = vexp2(vsub(m_old, m_use));
        vst(alpha + q * NB, a);
        vst(l + q * NB, vfma(vld(l + q * NB), a, sum));
        vst(m + q * NB, mx);
      }
      if (dropout) apply_dropout(keys, j0, nk, thr, inv_keep, st);
      // O^T = O^T * alpha + V[j0:j0+nk]^T P^T, group by group (the first group holds every lane vector that
      // saw a key of this tile; the others' alpha is 1, or 0 on a still-zero column)
#if PYATTN_CPU_BF16_DOT
      if (pairs) {  // pairs of P^T rows on vdpbf16ps; a group's odd last row (a tile cut at an odd key) in fp32
        pack_p_pairs(st, nk, rg.nv, pp);
        const uint32_t* vw = vpairs + ((b * p.Hkv + hk) * npr + j0 / 2) * Dv;
        for (int g = 0; g < rg.n; ++g) {
          const int r0 = rg.r0[g], r1 = rg.r0[g + 1], lo = rg.lo[g], n2 = (r1 - r0) / 2;
          gemm<BF16PairOps>(Dv, (rg.nv - lo) * NB, n2, vw + r0 / 2 * Dv, 1, Dv, pp + r0 / 2 * BM + lo * NB, BM,
                            ot + lo * NB, BM, g == 0 ? alpha + lo * NB : nullptr, true);
          if (r0 + 2 * n2 < r1) {
            const bf16_t* vj = static_cast<const bf16_t*>(p.v) + b * p.v_stride[0] + hk * p.v_stride[1] +
                               (j0 + r1 - 1) * p.v_stride[2];
            const float* pj = st + (r1 - 1) * BM;
            for (int64_t d = 0; d < Dv; ++d)
              for (int q = lo; q < rg.nv; ++q)
                vst(ot + d * BM + q * NB, vfma(vset(to_f32(vj[d])), vld(pj + q * NB), vld(ot + d * BM + q * NB)));
          }
        }
      }
#endif
      for (int g = 0; g < rg.n && !pairs; ++g) {
        const int r0 = rg.r0[g], lo = rg.lo[g];
        gemm(Dv, (rg.nv - lo) * NB, rg.r0[g + 1] - r0, Vv.at(b, hk, j0 + r0), 1, Vv.sl, st + r0 * BM + lo * NB, BM,
             ot + lo * NB, BM, g == 0 ? alpha + lo * NB : nullptr, true);
      }
    }

    // out[i][dv] = O^T[dv][i] / l[i]; lse = (m + log2 l) ln 2; a row that saw nothing: 0 and +inf
    T* os = static_cast<T*>(p.out) + b * p.out_stride[0] + h * p.out_stride[1] + i0 * p.out_stride[2];
    float* lse = p.lse + (b * p.Hq + h) * p.Lq + i0;
    alignas(64) float inv[BM];
    for (int i = 0; i < BM; ++i) {
      const bool dead = !(l[i] > 0.0f) && !std::isnan(l[i]);
      inv[i] = dead ? 0.0f : 1.0f / l[i];
      if (i < nq) lse[i] = dead ? kInf : (m[i] + std::log2(l[i])) * kLn2;
    }
    unpack_ot(ot, inv, nq, Dv, os, p.out_stride[2]);
  });
}

// ------------------------------------------------------------------------------------------------------------
// Backward
// ------------------------------------------------------------------------------------------------------------
// A row whose logits are all hugely negative (e.g. an additive mask of -1e9 or finfo.min on every key: softmax is
// uniform there) has an lse so large in magnitude that fp32 cannot hold log2(sum) next to it, so exp2(S - lse) would
// not give P back. For such rows (needs_exact_row_stats, pyattn/attn_exact_rows.h) the backward recomputes the
// row's max m and l2 = log2(sum 2^(S - m)) and uses P = exp2((S - m) - l2).

// One query row, scalar: qt_col[d * BM] is the row's pre-scaled query; writes m into *m_out and l2 into *l2_out.
// score(j) gives the row's S for key j with the bits of the backward's S GEMM.
template <class Score>
void exact_row_stats(const AttnCommon& p, int64_t b, int64_t h, int64_t i, Score score, float* m_out,
                     float* l2_out) {
  const int64_t jend = key_end(p, i, 1);
  std::vector<float> s(size_t(std::max<int64_t>(jend, 1)));
  alignas(64) float tile[BM];
  float m = -kInf;
  for (int64_t j = 0; j < jend; ++j) {
    std::fill(tile, tile + BM, 0.0f);
    tile[0] = score(j);
    apply_masks(p, b, h, i, 1, j, 1, tile);  // the same masks, on a 1 x 1 tile
    s[size_t(j)] = tile[0];
    m = std::max(m, tile[0]);
  }
  double l = 0.0;
  for (int64_t j = 0; j < jend; ++j) l += std::exp2(double(s[size_t(j)]) - double(m));
  *m_out = m;
  *l2_out = float(std::log2(l));
}

// Backward: a mask stored one row per query (row_mask) is converted once per call into tiles laid out as st
// (key-major BN x BM: log2 units for additive masks, 0 / -1 for bool ones, 0 in lanes past a block's queries), ordered
// [mask element][key block][query block], so that phase 2's walk down a key block's column of tiles reads one
// contiguous stream and merges it lane-wise. Read in place instead, every tile was 64 rows 4 Lk bytes apart,
// converted and transposed again for each head sharing the mask: B = 1, H = 8, L = 2048, D = 64 with a (1, 1, L, L)
// fp32 mask took 129 ms against 113.5 ms without a mask (measured). The tiles hold the same values as apply_masks
// merges, so P and the gradients have the same bits either way. Tiles that would take more than
// kMaskTileMaxBytes (PYATTN_CPU_MASK_TILE_BYTES overrides it, read per call: for tests) are not made: the mask is
// then read in place.
constexpr size_t kMaskTileMaxBytes = size_t(512) << 20;

struct MaskTiles {
  float* t = nullptr;                       // nullptr: read the mask in place
  int64_t nqb = 0, nkb = 0, sb = 0, sh = 0;  // sb, sh: tiles per batch / head step (0: the mask broadcasts there)
  float* at(int64_t b, int64_t h, int64_t qb, int64_t kb) const {
    return t + size_t((b * sb + h * sh + kb * nqb + qb) * BN * BM);
  }
};

// The tiles' strides for p, with the floats they need (0 when the mask is not made into tiles).
MaskTiles mask_tile_layout(const AttnCommon& p, size_t* floats) {
  MaskTiles mt;
  *floats = 0;
  const int64_t masks = (p.mask_stride[0] != 0 ? p.B : 1) * (p.mask_stride[1] != 0 ? p.Hq : 1);
  if (!row_mask(p) || p.mask_kind == MaskKind::Bool || masks == p.B * p.Hq) return mt;
  mt.nqb = ceil_div(p.Lq, BM);
  mt.nkb = ceil_div(p.Lk, BN);
  const int64_t per_mask = mt.nqb * mt.nkb;
  mt.sh = p.mask_stride[1] != 0 ? per_mask : 0;
  mt.sb = p.mask_stride[0] != 0 ? per_mask * (p.mask_stride[1] != 0 ? p.Hq : 1) : 0;
  const size_t n = size_t(masks * per_mask) * BN * BM;
  const char* e = std::getenv("PYATTN_CPU_MASK_TILE_BYTES");
  const size_t cap = e != nullptr ? size_t(std::strtoull(e, nullptr, 10)) : kMaskTileMaxBytes;
  if (n * sizeof(float) <= cap) *floats = n;
  return mt;
}

// Fills the tiles (mt.t set, from the workspace): work items are (mask element, query block), each reading its
// block's mask rows front to back.
void fill_mask_tiles(const AttnCommon& p, const MaskTiles& mt, int nth) {
  const int64_t nb = p.mask_stride[0] != 0 ? p.B : 1, nh = p.mask_stride[1] != 0 ? p.Hq : 1;
  run_items(nth, nb * nh * mt.nqb, [&](int64_t g, int) {
    const int64_t qb = g % mt.nqb, b = g / mt.nqb / nh, h = g / mt.nqb % nh, i0 = qb * BM;
    const int nq = int(std::min<int64_t>(BM, p.Lq - i0));
    const char* base = mask_base(p, b, h);
    for (int64_t kb = 0; kb < mt.nkb; ++kb) {
      const int64_t j0 = kb * BN;
      const int nk = int(std::min<int64_t>(BN, p.Lk - j0));
      float* tile = mt.at(b, h, qb, kb);
      if (nq < BM) std::fill(tile, tile + BN * BM, 0.0f);  // the lanes past the queries (rows past nk are not read)
      with_row_mask(p, base, i0, j0, nk, [&](auto conv, auto) {
        merge_mask_rows(nq, nk, tile, conv, [](V, V m) { return m; });
      });
    }
  });
}

// apply_masks with the mask from its tile: lane vectors [0, nv) of rows [0, nk).
void apply_masks_tiled(const AttnCommon& p, const float* tile, int64_t i0, int nv, int64_t j0, int nk, float* st) {
  const auto merge = [&](auto op) {
    for (int j = 0; j < nk; ++j)
      for (int q = 0; q < nv; ++q) {
        const int o = j * BM + q * NB;
        vst(st + o, op(vld(st + o), vld(tile + o)));
      }
  };
  if (p.mask_kind == MaskKind::Bool)
    merge(merge_keep);
  else
    merge(merge_add);
  if (p.causal) apply_causal(p, i0, j0, nk, st);
}

template <class T>
void bwd_impl(const AttnBwdParams& p) {
  const int nth = threads_for(p);
  const int64_t B = p.B, Hq = p.Hq, Hkv = p.Hkv, Lq = p.Lq, Lk = p.Lk, D = p.D, Dv = p.Dv, G = Hq / Hkv;
  const int64_t nqb = ceil_div(Lq, BM), nkb = ceil_div(Lk, BN), Lqp = nqb * BM;
  const float c = p.scale * kLog2e;
  const bool dropout = p.dropout_p > 0.0f;
  const uint32_t thr = dropout_threshold(p.dropout_p);
  const float inv_keep = dropout ? 1.0f / (1.0f - p.dropout_p) : 1.0f;
  const int64_t shift = p.bottom_right ? Lk - Lq : 0;
  // Phase 2 splits the keys of each (b, kv head) into nch chunks when those pairs are too few to feed several
  // threads; each chunk accumulates its own dQ partial. nch depends on the sizes only (never on the thread count),
  // so dq's summation order, and its bits, are fixed.
  int64_t nch = 1;
  while (B * Hkv * nch < kMinBwdItems && nch < nkb) nch *= 2;
  nch = std::min(nch, nkb);

  // bf16 on AVX512_BF16 (pairs): all five products on bf16 pairs. S^T = K Q^T and dP^T = V dO^T as in the forward
  // (K and V read in place, the Q^T / dO^T panels packed as pairs, unscaled); dV += P^T dO and dK += dS^T Q with
  // P^T / dS^T rounded to bf16 along the queries against dO / Q packed as pairs of query rows; dQ += dS K with dS^T
  // rounded to pairs of keys against K packed as pairs of key rows. Nothing is widened then.
  bool pairs = false;
#if PYATTN_CPU_BF16_DOT
  if constexpr (std::is_same<T, bf16_t>::value) pairs = bf16_pairs_ok(p, true);
#endif
  alignas(64) float cs[BM];  // pairs: scale * log2(e) in every lane, applied to S^T by the GEMM
  std::fill(cs, cs + BM, c);
  const int64_t npr = (Lk + 1) / 2;  // key pairs of a (batch, kv head)

  // Temporaries, all from one workspace: fp32 K, V (16-bit inputs), the Q^T / dO^T panels, lse2, delta, l2, fp32
  // Q and dO (16-bit inputs), the dQ partials, the mask tiles (see MaskTiles). Pairs instead of the fp32 copies:
  // K as pairs of key rows, Q and dO as pairs of query rows (padded to whole query blocks).
  const bool half = !std::is_same<T, float>::value;
  const size_t nk = pairs ? size_t(B * Hkv * npr * D) : widen_floats<T>(B, Hkv, Lk, D);
  const size_t nv = pairs ? 0 : widen_floats<T>(B, Hkv, Lk, Dv);
  const size_t n_qt = size_t(B * Hq * Lqp * D), n_dot = size_t(B * Hq * Lqp * Dv), n_row = size_t(B * Hq * Lqp);
  const size_t n_q = pairs ? size_t(B * Hq * Lqp / 2 * D) : half ? size_t(B * Hq * Lq * D) : 0;
  const size_t n_do = pairs ? size_t(B * Hq * Lqp / 2 * Dv) : half ? size_t(B * Hq * Lq * Dv) : 0;
  const size_t n_dq = size_t(nch * B * Hq * Lq * D);
  size_t n_tiles = 0;
  MaskTiles tiles = mask_tile_layout(p, &n_tiles);
  auto r = Workspace::round_floats;
  Workspace ws(r(nk) + nv + r(n_qt) + r(n_dot) + 3 * r(n_row) + r(n_q) + r(n_do) + r(n_dq) + r(n_tiles));
  const F32View K = pairs ? F32View{} : widen<T>(p.k, p.k_stride, B, Hkv, Lk, D, nth, nk ? ws.take(nk) : nullptr);
  const F32View Vv = pairs ? F32View{} : widen<T>(p.v, p.v_stride, B, Hkv, Lk, Dv, nth, nv ? ws.take(nv) : nullptr);
  [[maybe_unused]] uint32_t* kpairs = pairs ? reinterpret_cast<uint32_t*>(ws.take(nk)) : nullptr;
#if PYATTN_CPU_BF16_DOT
  if (pairs) pack_key_pairs(p.k, p.k_stride, B, Hkv, Lk, D, nth, kpairs);
#endif

  // Phase 1, per (b, h, query block): Q^T and dO^T panels (D x BM, Dv x BM), fp32 rows of Q and dO (16-bit inputs),
  // lse in log2 units (+inf past Lq: P = 0 there) and delta = rowsum(dO * O) (0 past Lq). P = exp2((S - lse2) - l2)
  // with l2 = 0, except for rows whose lse is too large to hold l2 (see exact_row_stats).
  float* qt = ws.take(n_qt);
  float* dot = ws.take(n_dot);
  float* lse2 = ws.take(n_row);
  float* delta = ws.take(n_row);
  float* l2 = ws.take_zeroed(n_row);
  float* qbuf = half ? ws.take(n_q) : nullptr;
  float* dobuf = half ? ws.take(n_do) : nullptr;
  float* dqp = ws.take_zeroed(n_dq);
  if (n_tiles != 0) {
    tiles.t = ws.take(n_tiles);
    fill_mask_tiles(p, tiles, nth);
  }
  run_items(nth, B * Hq * nqb, [&](int64_t g, int) {
    const int64_t bh = g / nqb, qb = g % nqb, b = bh / Hq, h = bh % Hq, i0 = qb * BM;
    const int nq = int(std::min<int64_t>(BM, Lq - i0));
    const T* qs = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1] + i0 * p.q_stride[2];
    const T* ds = static_cast<const T*>(p.dout) + b * p.dout_stride[0] + h * p.dout_stride[1] + i0 * p.dout_stride[2];
    const T* os = static_cast<const T*>(p.out) + b * p.out_stride[0] + h * p.out_stride[1] + i0 * p.out_stride[2];
    float* qtp = qt + (bh * Lqp + i0) * D;  // panel qb of head bh: D x BM
    float* dtp = dot + (bh * Lqp + i0) * Dv;
#if PYATTN_CPU_BF16_DOT
    if constexpr (std::is_same<T, bf16_t>::value) {
      if (pairs) {
        pack_q_pairs(qs, p.q_stride[2], nq, D, reinterpret_cast<uint32_t*>(qtp));
        pack_q_pairs(ds, p.dout_stride[2], nq, Dv, reinterpret_cast<uint32_t*>(dtp));
      }
    }
#endif
    if (!pairs) {
      pack_qt(qs, p.q_stride[2], nq, D, c, qtp);
      pack_qt(ds, p.dout_stride[2], nq, Dv, 1.0f, dtp);
    }
    for (int i = 0; i < BM; ++i) {
      float dl = 0.0f;
      if (i < nq)
        for (int64_t d = 0; d < Dv; ++d) dl += to_f32(ds[i * p.dout_stride[2] + d]) * to_f32(os[i * p.out_stride[2] + d]);
      delta[size_t(bh * Lqp + i0 + i)] = dl;
      lse2[size_t(bh * Lqp + i0 + i)] = i < nq ? p.lse[bh * Lq + i0 + i] * kLog2e : kInf;
    }
    for (int i = 0; i < nq; ++i) {
      const size_t r = size_t(bh * Lqp + i0 + i);
      if (!needs_exact_row_stats(lse2[r])) continue;
      const int64_t hk = h / G;
      const float* qcol = qtp + i;
#if PYATTN_CPU_BF16_DOT
      if (pairs) {  // one lane of the S GEMM: the same bits
        exact_row_stats(p, b, h, i0 + i, [&](int64_t j) {
          float sj;
          gemm<BF16PairOps>(1, 1, D / 2, k_words(p, b, hk, j), 0, 1, reinterpret_cast<const uint32_t*>(qcol), BM,
                            &sj, 1, cs, false);
          return sj;
        }, &lse2[r], &l2[r]);
        continue;
      }
#endif
      exact_row_stats(p, b, h, i0 + i, [&](int64_t j) {
        const float* kj = K.at(b, hk, j);
        float acc = 0.0f;
        for (int64_t d = 0; d < D; ++d) acc = std::fma(qcol[d * BM], kj[d], acc);  // as micro_kernel: bit-equal
        return acc;
      }, &lse2[r], &l2[r]);
    }
#if PYATTN_CPU_BF16_DOT
    if constexpr (std::is_same<T, bf16_t>::value) {
      if (pairs) {
        pack_row_pairs(qs, p.q_stride[2], nq, BM / 2, D, reinterpret_cast<uint32_t*>(qbuf) + (bh * Lqp + i0) / 2 * D);
        pack_row_pairs(ds, p.dout_stride[2], nq, BM / 2, Dv,
                       reinterpret_cast<uint32_t*>(dobuf) + (bh * Lqp + i0) / 2 * Dv);
      }
    }
#endif
    if constexpr (!std::is_same<T, float>::value) {
      if (!pairs)
        for (int i = 0; i < nq; ++i) {
          row_to_f32(qs + i * p.q_stride[2], qbuf + (bh * Lq + i0 + i) * D, D);
          row_to_f32(ds + i * p.dout_stride[2], dobuf + (bh * Lq + i0 + i) * Dv, Dv);
        }
    }
  });
  const F32View Q = half ? F32View{qbuf, Hq * Lq * D, Lq * D, D}
                         : F32View{static_cast<const float*>(p.q), p.q_stride[0], p.q_stride[1], p.q_stride[2]};
  const F32View dO = half ? F32View{dobuf, Hq * Lq * Dv, Lq * Dv, Dv}
                          : F32View{static_cast<const float*>(p.dout), p.dout_stride[0], p.dout_stride[1],
                                    p.dout_stride[2]};

  // Phase 2: (b, kv head, chunk of key blocks), each chunk into its own dQ partial.
  run_items(nth, B * Hkv * nch, [&](int64_t g, int) {
    const int64_t ch = g % nch, bk = g / nch, b = bk / Hkv, hk = bk % Hkv;
    float* st = scratch(size_t(4 * BN * BM + BN * (D + Dv) + BM));
    float* dpt = st + BN * BM;      // dP^T, then dS^T
    float* pdt = dpt + BN * BM;     // P^T after dropout
    float* dka = pdt + BN * BM;     // dK accumulator (nk x D)
    float* dva = dka + BN * D;      // dV accumulator (nk x Dv)
    uint32_t* keys = reinterpret_cast<uint32_t*>(dva + BN * Dv);
    [[maybe_unused]] uint32_t* tw = keys + BM;  // pairs: P^T or dS^T as bf16 words along the queries (BN x BM / 2)
    [[maybe_unused]] uint32_t* dsp = tw + BN * BM / 2;  // pairs: dS^T as pairs of key rows (BN / 2 x BM)
    float* dq_part = dqp + ch * B * Hq * Lq * D;
    for (int64_t kb = nkb * ch / nch; kb < nkb * (ch + 1) / nch; ++kb) {
      const int64_t j0 = kb * BN;
      const int nk = int(std::min<int64_t>(BN, Lk - j0));
      std::fill(dka, dka + nk * D, 0.0f);
      std::fill(dva, dva + nk * Dv, 0.0f);
      // causal: query i sees key j0 iff i >= j0 - shift
      const int64_t qb_lo = p.causal ? std::max<int64_t>(0, j0 - shift) / BM : 0;
      for (int64_t h = hk * G; h < (hk + 1) * G; ++h) {
        const int64_t bh = b * Hq + h;
        for (int64_t qb = qb_lo; qb < nqb; ++qb) {
          const int64_t i0 = qb * BM;
          const int nq = int(std::min<int64_t>(BM, Lq - i0));
          const float* qtp = qt + (bh * Lqp + i0) * D;
          const float* dtp = dot + (bh * Lqp + i0) * Dv;
          const float* lsep = lse2 + bh * Lqp + i0;
          const float* dlp = delta + bh * Lqp + i0;
          // The causal diagonal: row groups as in the forward (group g: key rows [r0, r1) x lane vectors [lo, nv));
          // what a group does not compute is masked (P = 0 there) and its dS is set to 0.
          const RowGroups rg = row_groups(p, i0, nq, j0, nk);
#if PYATTN_CPU_BF16_DOT
          if (pairs)
            gemm_groups<BF16PairOps>(rg, D / 2, k_words(p, b, hk, j0), p.k_stride[2] / 2,
                                     reinterpret_cast<const uint32_t*>(qtp), st, cs);
          else
#endif
            gemm_groups(rg, D, K.at(b, hk, j0), K.sl, qtp, st);  // S^T = K Q^T
          if (tiles.t != nullptr)
            apply_masks_tiled(p, tiles.at(b, h, qb, kb), i0, rg.nv, j0, nk, st);
          else if (p.mask_kind != MaskKind::None || causal_cut(p, i0, j0, nk))
            apply_masks(p, b, h, i0, nq, j0, nk, st);
          const float* l2p = l2 + bh * Lqp + i0;
          for (int j = 0; j < nk; ++j)  // P^T = exp2((S^T - lse) - l2)
            for (int q = 0; q < rg.nv; ++q) {
              const V x = vsub(vsub(vld(st + j * BM + q * NB), vld(lsep + q * NB)), vld(l2p + q * NB));
              vst(st + j * BM + q * NB, vexp2(x));
            }
#if PYATTN_CPU_BF16_DOT
          if (pairs)
            gemm_groups<BF16PairOps>(rg, Dv / 2, v_words(p, b, hk, j0), p.v_stride[2] / 2,
                                     reinterpret_cast<const uint32_t*>(dtp), dpt);
          else
#endif
            gemm_groups(rg, Dv, Vv.at(b, hk, j0), Vv.sl, dtp, dpt);  // dP^T = V dO^T
          const float* pd = st;
          if (dropout) {
            dropout_keys(p, b, h, i0, nq, keys);
            std::memcpy(pdt, st, sizeof(float) * size_t(nk * BM));
            apply_dropout(keys, j0, nk, thr, inv_keep, pdt);
            apply_dropout(keys, j0, nk, thr, inv_keep, dpt);
            pd = pdt;
          }
          // dV += P^T dO  (rows: keys; lanes: dv; k: queries from the group's first lane vector on)
#if PYATTN_CPU_BF16_DOT
          if (pairs) {
            pack_rows_bf16(pd, nk, rg.nv, nq, tw);
            const uint32_t* dop = reinterpret_cast<const uint32_t*>(dobuf) + (bh * Lqp + i0) / 2 * Dv;
            gemm_groups_acc<BF16PairOps>(rg, nq, Dv, tw, dop, Dv, dva);
          } else
#endif
            gemm_groups_acc(rg, nq, Dv, pd, dO.at(b, h, i0), dO.sl, dva);
          for (int g = 0; g < rg.n; ++g)  // dS^T = P^T (dP^T - delta); 0 where the group computed nothing
            for (int j = rg.r0[g]; j < rg.r0[g + 1]; ++j)
              for (int q = 0; q < rg.nv; ++q) {
                const int o = j * BM + q * NB;
                vst(dpt + o, q < rg.lo[g] ? vzero() : vmul(vld(st + o), vsub(vld(dpt + o), vld(dlp + q * NB))));
              }
          // dK += dS^T Q ; dQ += dS K
#if PYATTN_CPU_BF16_DOT
          if (pairs) {
            pack_rows_bf16(dpt, nk, rg.nv, nq, tw);
            const uint32_t* qp = reinterpret_cast<const uint32_t*>(qbuf) + (bh * Lqp + i0) / 2 * D;
            gemm_groups_acc<BF16PairOps>(rg, nq, D, tw, qp, D, dka);
            pack_p_pairs(dpt, nk, rg.nv, dsp);
            gemm<BF16PairOps>(nq, D, (nk + 1) / 2, dsp, 1, BM, kpairs + ((b * Hkv + hk) * npr + j0 / 2) * D, D,
                              dq_part + (bh * Lq + i0) * D, D, nullptr, true);
          } else
#endif
          {
            gemm_groups_acc(rg, nq, D, dpt, Q.at(b, h, i0), Q.sl, dka);
            gemm(nq, D, nk, dpt, 1, BM, K.at(b, hk, j0), K.sl, dq_part + (bh * Lq + i0) * D, D, nullptr, true);
          }
        }
      }
      T* dk = static_cast<T*>(p.dk) + b * p.dk_stride[0] + hk * p.dk_stride[1] + j0 * p.dk_stride[2];
      T* dv = static_cast<T*>(p.dv) + b * p.dv_stride[0] + hk * p.dv_stride[1] + j0 * p.dv_stride[2];
      for (int j = 0; j < nk; ++j) {
        for (int64_t d = 0; d < D; ++d) dk[j * p.dk_stride[2] + d] = from_f32<T>(dka[j * D + d] * p.scale);
        for (int64_t d = 0; d < Dv; ++d) dv[j * p.dv_stride[2] + d] = from_f32<T>(dva[j * Dv + d]);
      }
    }
  });

  // Phase 3: dq = scale * sum over chunks (in order), NB columns at a time (lane-wise: the same additions).
  run_items(nth, B * Hq, [&](int64_t bh, int) {
    const int64_t b = bh / Hq, h = bh % Hq;
    T* dq = static_cast<T*>(p.dq) + b * p.dq_stride[0] + h * p.dq_stride[1];
    const V vscale = vset(p.scale);
    alignas(64) float tmp[NB];
    for (int64_t i = 0; i < Lq; ++i)
      for (int64_t d = 0; d < D; d += NB) {
        const int n = int(std::min<int64_t>(NB, D - d));
        V s = vzero();
        for (int64_t ch = 0; ch < nch; ++ch) s = vadd(s, vldn(dqp + ((ch * B * Hq + bh) * Lq + i) * D + d, n));
        s = vmul(s, vscale);
        T* out = dq + i * p.dq_stride[2] + d;
        if constexpr (std::is_same<T, float>::value) {
          vstn(out, s, n);
        } else {
          vst(tmp, s);
          for (int k = 0; k < n; ++k) out[k] = from_f32<T>(tmp[k]);
        }
      }
  });
}

}  // namespace

bool attn_dropout_keep(uint64_t seed, uint64_t offset, int64_t Hq, int64_t Lq, int64_t b, int64_t h, int64_t i,
                       int64_t j, float p) {
  return mix32(dropout_row_key(seed, offset, Hq, Lq, b, h, i) ^ dropout_col(j)) >= dropout_threshold(p);
}

void attention_fwd(const AttnFwdParams& p) {
  switch (p.dtype) {
    case DType::F32: return fwd_impl<float>(p);
    case DType::BF16: return fwd_impl<bf16_t>(p);
    case DType::F16: return fwd_impl<f16_t>(p);
  }
}

void attention_bwd(const AttnBwdParams& p) {
  switch (p.dtype) {
    case DType::F32: return bwd_impl<float>(p);
    case DType::BF16: return bwd_impl<bf16_t>(p);
    case DType::F16: return bwd_impl<f16_t>(p);
  }
}

}  // namespace cpu
}  // namespace pyattn
