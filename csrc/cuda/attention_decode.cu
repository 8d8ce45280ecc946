// CUDA attention forward for decoding (flash-decoding): a few query rows against many keys. Same contract and
// semantics as attention.cu's forward (causal with both alignments, GQA, lse; a row that sees no key: out 0, lse
// +inf) for the calls decode_plan takes: fp16 / bf16, D == Dv in {64, 128}, no mask, no dropout, 16-byte-aligned
// rows of q, k and v, a kv head's query rows (group x Lq) <= kMaxRows, Lk >= kMinKeys.
//
// attention.cu's kernel runs a block of 128 query rows per (b, query head): for one query row that is B * Hq blocks
// each streaming its kv head's whole K and V (the GQA group's heads read them group times over) with 1 of 128 rows
// doing work. Here (the Triton kernel's split-KV plan, kernels/attention.py):
//   attn_decode_split_kernel, grid (n_splits, Hkv, B), 4 warps: one block takes all R = group * Lq query rows of
//     one kv head (row r: query head hk * group + r / Lq, query r % Lq) against keys [split * chunk, + chunk), so
//     K and V are read once per kv head, and the splits (about four blocks per SM in all) give the grid its
//     parallelism. A warp takes 32 keys at a time, a key per lane: lane l computes the R logits of key j0 + l
//     (its K row, 16-byte loads, against Q in shared memory, pre-scaled by scale log2(e)); then the online softmax
//     per row (max over the warp by shuffles; l kept per lane), and O += P V with O's columns split over the lanes
//     (lane l: columns HD / 32 l ..), each key's p broadcast by a shuffle and its V row read by the whole warp
//     (coalesced). The 4 warps' (m, l, O) are merged in shared memory into the split's result: O / l, m, l.
//   attn_decode_combine_kernel, one block per (b, query head, query row): weights w_s = l_s 2^(m_s - max m),
//     out = sum_s w_s O_s / sum_s w_s, lse = ln 2 (max m + log2 sum_s w_s).
// CUDA cores only (fp32 FMAs): per key a lane does R HD multiply-adds for the logits and the warp R HD for P V,
// against 4 HD bytes of K and V; up to kMaxRows = 8 rows that stays below what the memory system delivers.
// Workspace (the caller's, attention_fwd_workspace): per (b, query head, query row, split) HD + 2 floats.
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "attention_utils.cuh"
#include "pyattn/params.h"

namespace pyattn {
namespace cuda {
namespace attn {
namespace {

constexpr int kWarps = 4, kThreads = 32 * kWarps;
constexpr int64_t kSplitKeys = 32 * kWarps;  // a split's keys are a multiple of this (one pass of the 4 warps)
constexpr int kMaxSplits = 64;
// Blocks per SM the splits aim at: a streaming kernel needs many loads in flight (16 warps an SM); more splits only
// add combining work (a row's O per split).
constexpr int64_t kBlocksPerSm = 4;

// Two 16-bit elements (lo: the lower address) of one 32-bit word -> f[0], f[1]
template <class E>
__device__ __forceinline__ void unpack2(uint32_t w, float* f) {
  f[0] = E::to_float(uint16_t(w & 0xffffu));
  f[1] = E::to_float(uint16_t(w >> 16));
}

// Workspace layout: Opart [rows][HD] (rows = (b Hq + h) Lq + i, then split), Mpart [rows], Lpart [rows].
struct Parts {
  float *o, *m, *l;
};
__host__ __device__ inline Parts parts(float* ws, int64_t nrows, int hd) {
  return Parts{ws, ws + nrows * hd, ws + nrows * hd + nrows};
}

// ROWS: R rounded up to a power of 2 (registers and unrolled loops sized for it; rows >= R stay -inf / 0).
template <class E, int HD, int ROWS>
__global__ void __launch_bounds__(kThreads) attn_decode_split_kernel(const AttnFwdParams p, const Derived d,
                                                                     int64_t chunk, int n_splits) {
  constexpr int DPL = HD / 32;  // O / V columns per lane
  const int split = blockIdx.x, tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t hk = blockIdx.y, b = blockIdx.z;
  const int R = int(d.group * p.Lq);
  __shared__ float4 qs[ROWS][HD / 4];  // Q rows, times scale log2(e)
  __shared__ float red_m[kWarps][ROWS], red_l[kWarps][ROWS];
  __shared__ float red_o[kWarps][ROWS][HD];

  const uint16_t* q = static_cast<const uint16_t*>(p.q) + b * p.q_stride[0];
  for (int e = tid; e < ROWS * HD; e += kThreads) {
    const int r = e / HD, c = e % HD;
    float v = 0.0f;
    if (r < R) {
      const int64_t h = hk * d.group + r / p.Lq, i = r % p.Lq;
      v = E::to_float(q[h * p.q_stride[1] + i * p.q_stride[2] + c]) * d.scale_log2;
    }
    reinterpret_cast<float*>(qs[r])[c] = v;
  }
  __syncthreads();

  const uint16_t* kbase = static_cast<const uint16_t*>(p.k) + b * p.k_stride[0] + hk * p.k_stride[1];
  const uint16_t* vbase = static_cast<const uint16_t*>(p.v) + b * p.v_stride[0] + hk * p.v_stride[1];
  const int64_t j_begin = int64_t(split) * chunk, j_end = imin(p.Lk, j_begin + chunk);
  float m[ROWS], l[ROWS], o[ROWS][DPL];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.0f;
#pragma unroll
    for (int c = 0; c < DPL; ++c) o[r][c] = 0.0f;
  }

  for (int64_t j0 = j_begin + 32 * warp; j0 < j_end; j0 += kSplitKeys) {
    const int64_t j = j0 + lane;
    float s[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) s[r] = 0.0f;
    if (j < j_end) {  // S_rj = q_r . k_j: the lane's K row in 16-byte pieces
      const uint4* krow = reinterpret_cast<const uint4*>(kbase + j * p.k_stride[2]);
#pragma unroll 8
      for (int c8 = 0; c8 < HD / 8; ++c8) {  // (8 loads in flight)
        const uint4 kv = krow[c8];
        float kf[8];
        unpack2<E>(kv.x, kf);
        unpack2<E>(kv.y, kf + 2);
        unpack2<E>(kv.z, kf + 4);
        unpack2<E>(kv.w, kf + 6);
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
          const float4 qa = qs[r][2 * c8], qb = qs[r][2 * c8 + 1];
          float acc = s[r];
          acc = fmaf(qa.x, kf[0], acc);
          acc = fmaf(qa.y, kf[1], acc);
          acc = fmaf(qa.z, kf[2], acc);
          acc = fmaf(qa.w, kf[3], acc);
          acc = fmaf(qb.x, kf[4], acc);
          acc = fmaf(qb.y, kf[5], acc);
          acc = fmaf(qb.z, kf[6], acc);
          s[r] = fmaf(qb.w, kf[7], acc);
        }
      }
    }
    // masks (a key past the split, the causal diagonal), then the online softmax per row; s becomes P
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const int64_t i = r % p.Lq;
      if (j >= j_end || r >= R || (p.causal && j > i + d.shift)) s[r] = -INFINITY;
      const float mx = fmaxf(m[r], warp_max(s[r]));
      const float mu = mx == -INFINITY ? 0.0f : mx;  // (a row that has seen only -inf: subtract 0, no NaN)
      const float alpha = fast_exp2(m[r] - mu);
      s[r] = fast_exp2(s[r] - mu);
      l[r] = fmaf(l[r], alpha, s[r]);
      m[r] = mx;
#pragma unroll
      for (int c = 0; c < DPL; ++c) o[r][c] *= alpha;
    }
    // O += P V: key j0 + kk's p from lane kk, its V row across the warp (lane l: columns DPL l ..), 8 keys' V loads
    // in flight at a time (a key past the split: p = 0 and V taken as 0)
    const int64_t nk = imin(32, j_end - j0);
#pragma unroll 1
    for (int k8 = 0; k8 < 32; k8 += 8) {
      if (k8 >= nk) break;
      float vf[8][DPL];
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        const uint16_t* vrow = vbase + (j0 + k8 + u) * p.v_stride[2] + DPL * lane;
        if (k8 + u >= nk) {
#pragma unroll
          for (int c = 0; c < DPL; ++c) vf[u][c] = 0.0f;
        } else if constexpr (DPL == 4) {
          const uint2 vv = *reinterpret_cast<const uint2*>(vrow);
          unpack2<E>(vv.x, vf[u]);
          unpack2<E>(vv.y, vf[u] + 2);
        } else {
          unpack2<E>(*reinterpret_cast<const uint32_t*>(vrow), vf[u]);
        }
      }
#pragma unroll
      for (int u = 0; u < 8; ++u)
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
          const float pk = __shfl_sync(0xffffffffu, s[r], k8 + u);
#pragma unroll
          for (int c = 0; c < DPL; ++c) o[r][c] = fmaf(pk, vf[u][c], o[r][c]);
        }
    }
  }

  // the warps' (m, l, O) -> the split's result
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const float lw = warp_sum(l[r]);
    if (lane == 0) {
      red_m[warp][r] = m[r];
      red_l[warp][r] = lw;
    }
#pragma unroll
    for (int c = 0; c < DPL; ++c) red_o[warp][r][DPL * lane + c] = o[r][c];
  }
  __syncthreads();
  const int64_t nrows = p.B * p.Hq * p.Lq * n_splits;
  const Parts out = parts(p.workspace, nrows, HD);
  for (int e = tid; e < R * HD; e += kThreads) {
    const int r = e / HD, c = e % HD;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, red_m[w][r]);
    float lsum = 0.0f, acc = 0.0f;
    if (mx != -INFINITY) {
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        const float sc = fast_exp2(red_m[w][r] - mx);
        lsum = fmaf(red_l[w][r], sc, lsum);
        acc = fmaf(red_o[w][r][c], sc, acc);
      }
    }
    const int64_t h = hk * d.group + r / p.Lq, i = r % p.Lq;
    const int64_t row = ((b * p.Hq + h) * p.Lq + i) * n_splits + split;
    out.o[row * HD + c] = lsum > 0.0f ? acc / lsum : 0.0f;
    if (c == 0) {
      out.m[row] = mx;
      out.l[row] = lsum;
    }
  }
}

// One block of HD threads per (b, query head, query row): the splits' results merged; out in q's dtype, lse.
template <class E, int HD>
__global__ void __launch_bounds__(HD) attn_decode_combine_kernel(const AttnFwdParams p, int n_splits) {
  const int64_t row = blockIdx.x, i = row % p.Lq, bh = row / p.Lq, b = bh / p.Hq, h = bh % p.Hq;
  const int c = threadIdx.x;
  const Parts in = parts(p.workspace, p.B * p.Hq * p.Lq * n_splits, HD);
  const int64_t r0 = row * n_splits;
  float mx = -INFINITY;
  for (int s = 0; s < n_splits; ++s) mx = fmaxf(mx, in.m[r0 + s]);
  float wsum = 0.0f, acc = 0.0f;
  if (mx != -INFINITY) {
    for (int s = 0; s < n_splits; ++s) {
      const float w = in.l[r0 + s] * fast_exp2(in.m[r0 + s] - mx);
      wsum += w;
      acc = fmaf(w, in.o[(r0 + s) * HD + c], acc);
    }
  }
  const bool dead = !(wsum > 0.0f);
  uint16_t* o = static_cast<uint16_t*>(p.out) + b * p.out_stride[0] + h * p.out_stride[1] + i * p.out_stride[2];
  o[c] = E::from_float(dead ? 0.0f : acc / wsum);
  if (c == 0) p.lse[row] = dead ? INFINITY : (mx + log2f(wsum)) * kLn2;
}

template <class E, int HD, int ROWS>
cudaError_t launch(const AttnFwdParams& p, const Derived& d, const DecodePlan& pl, cudaStream_t stream) {
  attn_decode_split_kernel<E, HD, ROWS>
      <<<dim3(unsigned(pl.n_splits), unsigned(p.Hkv), unsigned(p.B)), kThreads, 0, stream>>>(p, d, pl.chunk,
                                                                                             pl.n_splits);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  attn_decode_combine_kernel<E, HD><<<unsigned(p.B * p.Hq * p.Lq), HD, 0, stream>>>(p, pl.n_splits);
  return cudaGetLastError();
}

template <class E, int HD>
cudaError_t launch_rows(const AttnFwdParams& p, const Derived& d, const DecodePlan& pl, cudaStream_t stream) {
  const int64_t R = d.group * p.Lq;
  if (R <= 1) return launch<E, HD, 1>(p, d, pl, stream);
  if (R <= 2) return launch<E, HD, 2>(p, d, pl, stream);
  if (R <= 4) return launch<E, HD, 4>(p, d, pl, stream);
  return launch<E, HD, kDecodeMaxRows>(p, d, pl, stream);
}

template <class E>
cudaError_t launch_hd(const AttnFwdParams& p, const Derived& d, const DecodePlan& pl, cudaStream_t stream) {
  return p.D == 64 ? launch_rows<E, 64>(p, d, pl, stream) : launch_rows<E, 128>(p, d, pl, stream);
}

}  // namespace

DecodePlan decode_plan(const AttnFwdParams& p, const Derived& d) {
  DecodePlan pl;
  const char* env = std::getenv("PYATTN_CUDA_ATTN_DECODE");  // "0": off (tests and benchmarks compare the paths)
  if (env != nullptr && std::strcmp(env, "0") == 0) return pl;
  if (!((p.dtype == DType::F16 || p.dtype == DType::BF16) && (p.D == 64 || p.D == 128) && p.Dv == p.D &&
        p.mask_kind == MaskKind::None && !d.dropout && d.vec_q && d.vec_k && d.vec_v &&
        d.group * p.Lq <= kDecodeMaxRows && p.Lk >= kDecodeMinKeys && p.Hkv <= 65535 && p.B <= 65535))
    return pl;  // (grid dims y, z: kv heads, batch)
  // about kBlocksPerSm blocks per SM over the B Hkv kv heads, each split a multiple of kSplitKeys keys
  const int64_t sms = p.num_sms > 0 ? p.num_sms : 1, heads = p.B * p.Hkv;
  int64_t n = (kBlocksPerSm * sms + heads - 1) / heads;
  n = n < kMaxSplits ? n : kMaxSplits;
  const int64_t most = (p.Lk + kSplitKeys - 1) / kSplitKeys;
  n = n < most ? n : most;
  const int64_t per = (p.Lk + n - 1) / n;
  pl.chunk = (per + kSplitKeys - 1) / kSplitKeys * kSplitKeys;
  pl.n_splits = int((p.Lk + pl.chunk - 1) / pl.chunk);
  pl.workspace_floats = p.B * p.Hq * p.Lq * pl.n_splits * (p.Dv + 2);
  return pl;
}

bool fwd_decode(const AttnFwdParams& p, const Derived& d, cudaStream_t stream, cudaError_t* err) {
  const DecodePlan pl = decode_plan(p, d);
  if (pl.n_splits < 1 || p.workspace == nullptr) return false;
  *err = p.dtype == DType::F16 ? launch_hd<F16>(p, d, pl, stream) : launch_hd<BF16>(p, d, pl, stream);
  return true;
}

}  // namespace attn
}  // namespace cuda
}  // namespace pyattn
