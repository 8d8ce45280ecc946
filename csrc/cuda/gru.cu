// CUDA GRU: the fused elementwise part of one step, forward and backward (torch-free; the bindings in
// csrc/bindings/cuda/gru.cpp run the GEMMs through cuBLAS). Formulas and the workspace contract [r | z | n | hn]:
// the GRU section of pyattn/params.h.
//
// Forward, one launch per step: gi = x W_ih^T and gh = h W_hh^T arrive in fp32 without biases; per (b, j):
//   r = sigmoid(gi_r + b_ir + gh_r + b_hr), z = sigmoid(gi_z + b_iz + gh_z + b_hz), hn = gh_n + b_hn,
//   n = tanh(gi_n + b_in + r hn), h' = n + z (h - n)
// stores h' in the storage dtype and, for training, [r | z | n | hn] in fp32.
// Backward, one launch per step: from d = dh (+ dout) and the saved ws,
//   dgi = [dr' | dz' | dn'], dgh = [dr' | dz' | dn' r], dh_direct = d z  (all fp32).
//
// Storage fp32, fp16 or bf16; math always fp32. Each thread handles VEC = 4, 2 or 1 consecutive hidden units of
// one batch row (VEC chosen at launch from H, the row strides and the pointers' alignment, so any B, H and any
// row stride work), grid-stride over B * H / VEC items with int64 indices.
//
// exp/sigmoid/tanh are written out (Cephes expf / tanhf, a few ulp) with IEEE division (__fdiv_rn), so the
// results do not change when the extension is compiled with --use_fast_math (which would turn expf into
// ex2.approx and tanhf into tanh.approx, about 11 bits).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "launch.cuh"
#include "pyattn/cuda_kernels.h"
#include "pyattn/params.h"

namespace pyattn {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65536;  // the grid-stride loops cover any remainder

// ---- conversions (explicit intrinsics: torch builds with __CUDA_NO_HALF_CONVERSIONS__ and friends) ----
__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// N consecutive elements moved as one aligned access (the launcher guarantees the alignment).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <int N, typename T>
__device__ __forceinline__ void load_f32(const T* ptr, float (&out)[N]) {
  const Pack<T, N> pk = *reinterpret_cast<const Pack<T, N>*>(ptr);
#pragma unroll
  for (int k = 0; k < N; ++k) out[k] = to_f32(pk.v[k]);
}

template <int N, typename T>
__device__ __forceinline__ void store_f32(T* ptr, const float (&in)[N]) {
  Pack<T, N> pk;
#pragma unroll
  for (int k = 0; k < N; ++k) pk.v[k] = from_f32<T>(in[k]);
  *reinterpret_cast<Pack<T, N>*>(ptr) = pk;
}

// ---- math: FMAs, integer ops and IEEE division only ----
// exp(x) for x clamped to [-87, 88] (2^n stays a normal float): Cephes expf, n = round(x log2 e), x - n ln2 in
// two parts, a degree-6 polynomial; about 1 ulp. NaN propagates (the clamp's comparisons are false for NaN).
__device__ __forceinline__ float gru_exp(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float n = rintf(x * 1.44269504088896341f);
  float r = fmaf(-n, 0.693359375f, x);
  r = fmaf(-n, -2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = fmaf(p, r, 1.3981999507e-3f);
  p = fmaf(p, r, 8.3334519073e-3f);
  p = fmaf(p, r, 4.1665795894e-2f);
  p = fmaf(p, r, 1.6666665459e-1f);
  p = fmaf(p, r, 5.0000001201e-1f);
  p = fmaf(p * r, r, r + 1.0f);
  const int e = __float2int_rn(n);  // in [-126, 127] (NaN: 0, and p is NaN anyway)
  return p * __int_as_float((e + 127) << 23);
}

__device__ __forceinline__ float gru_sigmoid(float x) { return __fdiv_rn(1.0f, 1.0f + gru_exp(-x)); }

// Cephes tanhf: |x| < 0.625: x + x^3 P(x^2); else sign(x) (1 - 2 / (exp(2|x|) + 1)). NaN propagates.
__device__ __forceinline__ float gru_tanh(float x) {
  const float ax = fabsf(x);
  if (ax < 0.625f) {
    const float s = x * x;
    float p = -5.70498872745e-3f;
    p = fmaf(p, s, 2.06390887954e-2f);
    p = fmaf(p, s, -5.37397155531e-2f);
    p = fmaf(p, s, 1.33314422036e-1f);
    p = fmaf(p, s, -3.33332819422e-1f);
    return fmaf(p * s, x, x);
  }
  return copysignf(1.0f - __fdiv_rn(2.0f, gru_exp(ax + ax) + 1.0f), x);
}

// ---- the gate math of one (batch row, hidden unit), shared by the per-step and the persistent kernels ----
struct Gates {
  float r, z, n, h;  // h: the new state
};
// x*: the input projection, h*: h W_hh^T, both with their biases; hp: the state before the step
__device__ __forceinline__ Gates gru_gates(float xr, float xz, float xn, float hr, float hz, float hn, float hp) {
  Gates g;
  g.r = gru_sigmoid(xr + hr);
  g.z = gru_sigmoid(xz + hz);
  g.n = gru_tanh(xn + g.r * hn);
  g.h = g.n + g.z * (hp - g.n);
  return g;
}

// The workspace entries [r | z | n | hn] of (row, unit) at w = ws + row 4H + unit
__device__ __forceinline__ void store_ws(float* w, int64_t H, const Gates& g, float hn) {
  w[0] = g.r;
  w[H] = g.z;
  w[2 * H] = g.n;
  w[3 * H] = hn;
}

struct GateGrads {
  float dr, dz, dn, dnr, direct;  // dgi = [dr | dz | dn], dgh = [dr | dz | dnr], direct = d z
};
// d: dL/dh' (carried + dout); hp: the state before the step; r, z, n, hn: the forward's workspace
__device__ __forceinline__ GateGrads gru_gate_grads(float d, float hp, float r, float z, float n, float hn) {
  GateGrads g;
  const float dn_post = d * (1.0f - z);
  const float dz_post = d * (hp - n);
  g.dn = dn_post * (1.0f - n * n);
  g.dr = g.dn * hn * r * (1.0f - r);
  g.dz = dz_post * z * (1.0f - z);
  g.dnr = g.dn * r;
  g.direct = d * z;
  return g;
}

// ---- kernels ----

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) gru_gates_fwd_kernel(const GRUGatesFwdParams p) {
  const T* __restrict__ b_ih = static_cast<const T*>(p.b_ih);    // (3H,) or nullptr
  const T* __restrict__ b_hh = static_cast<const T*>(p.b_hh);    // (3H,) or nullptr
  const T* __restrict__ hprev = static_cast<const T*>(p.h);      // (B, H)
  T* __restrict__ out = static_cast<T*>(p.out);                  // (B, H)
  const float* __restrict__ gi_base = p.gi;                      // (B, 3H)
  const float* __restrict__ gh_base = p.gh;                      // (B, 3H)
  float* __restrict__ ws_base = p.ws;                            // (B, 4H) or nullptr
  const int64_t H = p.H;
  const int64_t per_row = H / VEC;
  const int64_t items = p.B * per_row;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < items; e += step) {
    const int64_t b = e / per_row;
    const int64_t j = (e - b * per_row) * VEC;
    const float* gi = gi_base + b * p.gi_row_stride + j;
    const float* gh = gh_base + b * p.gh_row_stride + j;
    float xr[VEC], xz[VEC], xn[VEC], hr[VEC], hz[VEC], hn[VEC], hp[VEC];
    load_f32<VEC>(gi, xr);
    load_f32<VEC>(gi + H, xz);
    load_f32<VEC>(gi + 2 * H, xn);
    load_f32<VEC>(gh, hr);
    load_f32<VEC>(gh + H, hz);
    load_f32<VEC>(gh + 2 * H, hn);
    load_f32<VEC>(hprev + b * p.h_row_stride + j, hp);
    if (b_ih != nullptr) {
      float br[VEC], bz[VEC], bn[VEC];
      load_f32<VEC>(b_ih + j, br);
      load_f32<VEC>(b_ih + H + j, bz);
      load_f32<VEC>(b_ih + 2 * H + j, bn);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        xr[k] += br[k];
        xz[k] += bz[k];
        xn[k] += bn[k];
      }
    }
    if (b_hh != nullptr) {
      float br[VEC], bz[VEC], bn[VEC];
      load_f32<VEC>(b_hh + j, br);
      load_f32<VEC>(b_hh + H + j, bz);
      load_f32<VEC>(b_hh + 2 * H + j, bn);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        hr[k] += br[k];
        hz[k] += bz[k];
        hn[k] += bn[k];
      }
    }
    float r[VEC], z[VEC], n[VEC], hnew[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const Gates g = gru_gates(xr[k], xz[k], xn[k], hr[k], hz[k], hn[k], hp[k]);
      r[k] = g.r;
      z[k] = g.z;
      n[k] = g.n;
      hnew[k] = g.h;
    }
    store_f32<VEC>(out + b * p.out_row_stride + j, hnew);
    if (ws_base != nullptr) {
      float* w = ws_base + b * p.ws_row_stride + j;
      store_f32<VEC>(w, r);
      store_f32<VEC>(w + H, z);
      store_f32<VEC>(w + 2 * H, n);
      store_f32<VEC>(w + 3 * H, hn);
    }
  }
}

// DH: the carried gradient's storage (float, or T for a cell's dh); HAS_DOUT: add dout (T) to it.
// dh and dh_direct may be the same buffer (each thread reads its elements before writing them): no __restrict__.
template <typename T, typename DH, bool HAS_DOUT, int VEC>
__global__ void __launch_bounds__(kThreads) gru_gates_bwd_kernel(const GRUGatesBwdParams p) {
  const DH* dh_base = static_cast<const DH*>(p.dh);                 // (B, H)
  float* dhd_base = p.dh_direct;                                    // (B, H)
  const T* __restrict__ dout_base = static_cast<const T*>(p.dout);  // (B, H) (HAS_DOUT)
  const T* __restrict__ hprev = static_cast<const T*>(p.h);         // (B, H)
  const float* __restrict__ ws_base = p.ws;                         // (B, 4H)
  float* __restrict__ dgi_base = p.dgi;                             // (B, 3H)
  float* __restrict__ dgh_base = p.dgh;                             // (B, 3H)
  const int64_t H = p.H;
  const int64_t per_row = H / VEC;
  const int64_t items = p.B * per_row;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < items; e += step) {
    const int64_t b = e / per_row;
    const int64_t j = (e - b * per_row) * VEC;
    float d[VEC], hp[VEC], r[VEC], z[VEC], n[VEC], hn[VEC];
    load_f32<VEC>(dh_base + b * p.dh_row_stride + j, d);
    if constexpr (HAS_DOUT) {
      float o[VEC];
      load_f32<VEC>(dout_base + b * p.dout_row_stride + j, o);
#pragma unroll
      for (int k = 0; k < VEC; ++k) d[k] += o[k];
    }
    load_f32<VEC>(hprev + b * p.h_row_stride + j, hp);
    const float* w = ws_base + b * p.ws_row_stride + j;
    load_f32<VEC>(w, r);
    load_f32<VEC>(w + H, z);
    load_f32<VEC>(w + 2 * H, n);
    load_f32<VEC>(w + 3 * H, hn);
    float dr[VEC], dz[VEC], dn[VEC], dnr[VEC], direct[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const GateGrads g = gru_gate_grads(d[k], hp[k], r[k], z[k], n[k], hn[k]);
      dr[k] = g.dr;
      dz[k] = g.dz;
      dn[k] = g.dn;
      dnr[k] = g.dnr;
      direct[k] = g.direct;
    }
    float* gi = dgi_base + b * p.dgi_row_stride + j;
    float* gh = dgh_base + b * p.dgh_row_stride + j;
    store_f32<VEC>(gi, dr);
    store_f32<VEC>(gi + H, dz);
    store_f32<VEC>(gi + 2 * H, dn);
    store_f32<VEC>(gh, dr);
    store_f32<VEC>(gh + H, dz);
    store_f32<VEC>(gh + 2 * H, dnr);
    store_f32<VEC>(dhd_base + b * p.dh_direct_row_stride + j, direct);
  }
}

// ---- the persistent kernels (gru_rec_fwd, gru_rec_bwd) ----
// Every step of one layer direction in one cooperative launch. Block c owns hidden units j0 = c U .. j0 + nu - 1
// and keeps the part of W_hh they need in shared memory, fp32, for all T steps; per step it stages batch rows of the
// vector the recurrence multiplies (through L2: other blocks wrote them), and a work item is (unit u, 4 batch rows):
// a warp's lanes split the dot products' length in float4 steps (lane l: elements 4 l + 128 i), accumulate, reduce
// across lanes (warp_sums), and lane r (< 4) finishes row r. Rows and W_hh parts are zero-padded to a multiple of 4.
//   forward:  Ws [3 nu][HP] = W_hh rows g H + j0 + u (row 3 u + g); Hs [rows][HP] = h (h0 or the previous out);
//             gh = 3 dot products per item, then the gates (gru_gates, as gru_gates_fwd_kernel), out[t]
//             and ws[t]; a grid barrier publishes out[t].
//   backward: Wt [nu][KP] = W_hh column j0 + u (3H long), Ds [nu][B] = dh of the block's units (block-local: one
//             barrier per step; p.dh in at the start, out at the end); per step, phase A: the gate gradients of the
//             block's units (gru_gate_grads, as gru_gates_bwd_kernel) -> dgi[t], dgh[t], dh = d z; a grid barrier
//             publishes dgh[t]; phase B: Gs [rows][KP] = dgh[t], dh += dgh[t] . W_hh[:, j] per item.
// What a step reads that does not depend on the recurrence (the forward's input projection and biases, the
// backward's dout, previous state and workspace) is loaded ahead, a warp's / thread's first item of the next step
// during the grid barrier (load_in, load_a).
// Sizes (rec_plan): a block per SM (at least enough for the W_hh parts to fit shared memory, at most H and what
// the device holds at once); none (the per-step path) when a block would do over kRecFmaPerBlock multiply-adds a
// step. Small layers take the one-block kernels instead (gru_rec_fwd_one_kernel / gru_rec_bwd_one_kernel, below:
// no grid barrier).
constexpr int kRecThreads = 512;
constexpr int kRecWarps = kRecThreads / 32;
constexpr int kRecRows = 4;  // batch rows per work item

struct RecShape {
  int units, batch_rows;
  int64_t kp;  // the dot products' length rounded up to 4 (HP forward, KP backward)
};
struct RecFwdArgs {
  GRURecFwdParams p;
  RecShape s;
};
struct RecBwdArgs {
  GRURecBwdParams p;
  RecShape s;
};

// Barrier n (1, 2, ...) of a cooperative launch over the counter `count` (0 at launch): each block arrives once;
// its last thread waits until all gridDim.x arrivals of barrier n are in (the last thread: it has no loads of its
// own in flight for the fence to wait on, where the forward's lanes 0-3 prefetch). Writes of any block before it
// are visible to loads through L2 (__ldcg) after it (cooperative_groups' grid sync: fence, arrive, acquire-poll,
// fence).
__device__ __forceinline__ void grid_barrier(unsigned long long* count, unsigned long long n) {
#ifdef PYATTN_CUDA_EMU
  (void)count;
  (void)n;
  ::pyattn_emu::grid_sync(__FILE__, __LINE__);
#else
  __syncthreads();
  if (threadIdx.x == blockDim.x - 1) {
    const unsigned long long target = n * gridDim.x;
    __threadfence();
    atomicAdd(count, 1ull);
    unsigned long long seen;
    do {
      asm volatile("ld.acquire.gpu.global.u64 %0, [%1];\n" : "=l"(seen) : "l"(count) : "memory");
    } while (seen < target);
    __threadfence();
  }
  __syncthreads();
#endif
}

// S [nb][kp] fp32 = rows 0 .. nb - 1 of src (row stride `stride`, K valid columns), zeros past K, read through L2.
template <typename T>
__device__ __forceinline__ void stage_rows(float* S, const T* src, int64_t stride, int64_t K, int64_t kp, int nb) {
  for (int64_t e = threadIdx.x; e < nb * kp; e += blockDim.x) {
    const int64_t r = e / kp, k = e - r * kp;
    S[e] = k < K ? to_f32(__ldcg(src + r * stride + k)) : 0.0f;
  }
}

// What the backward's phase A reads of one (batch row, unit) besides dh (gru_rec_bwd_kernel's load_a): dout[t],
// the state before the step and the forward's workspace r, z, n, hn.
struct BwdIn {
  float dout, hp, r, z, n, hn;
};

// BwdIn of (batch row b, unit j) at backward step `step` (the forward's steps, last processed first)
template <typename T>
__device__ __forceinline__ BwdIn load_bwd_in(const GRURecBwdParams& p, int64_t step, int64_t b, int64_t j) {
  const int64_t nsteps = p.T, B = p.B, H = p.H;
  const int64_t t = p.reverse ? step : nsteps - 1 - step;
  const bool first = p.reverse ? t == nsteps - 1 : t == 0;  // the forward's first step started from h0
  const T* hsrc = first ? static_cast<const T*>(p.h0)
                        : static_cast<const T*>(p.out) + (p.reverse ? t + 1 : t - 1) * p.out_t_stride;
  const int64_t hstride = first ? p.h0_row_stride : p.out_b_stride;
  const float* w = p.ws + (t * B + b) * 4 * H + j;  // [r | z | n | hn]
  const T* dout = static_cast<const T*>(p.dout);
  return BwdIn{to_f32(dout[t * p.dout_t_stride + b * p.dout_b_stride + j]), to_f32(hsrc[b * hstride + j]), w[0],
               w[H], w[2 * H], w[3 * H]};
}

// The gate gradients' stores of (row, unit j): dgi = [dr | dz | dn], dgh = [dr | dz | dn r], rows 3H floats
__device__ __forceinline__ void store_gate_grads(const GRURecBwdParams& p, int64_t row, int64_t j, const GateGrads& g) {
  const int64_t H = p.H;
  float* gi = p.dgi + row * 3 * H + j;
  float* gh = p.dgh + row * 3 * H + j;
  gi[0] = g.dr;
  gi[H] = g.dz;
  gi[2 * H] = g.dn;
  gh[0] = g.dr;
  gh[H] = g.dz;
  gh[2 * H] = g.dnr;
}

// A forward work item's inputs besides the dot products (gru_rec_fwd_kernel's load_in): x = the input projection
// + b_ih, bh = b_hh, gates r, z, n.
struct ItemIn {
  float x[3], bh[3];
};

constexpr int pow2_at_least(int n) { return n <= 1 ? 1 : 2 * pow2_at_least((n + 1) / 2); }
constexpr int log2_of(int n) { return n <= 1 ? 0 : 1 + log2_of(n / 2); }

// One halving step of warp_sums: C values left (v[0 .. C)), exchanged with lane ^ m; then the next step.
template <int C, int V>
__device__ __forceinline__ void halve(float (&v)[V], int lane) {
  if constexpr (C > 1) {
    constexpr int m = 16 * C / V;
    const bool upper = (lane & m) != 0;
#pragma unroll
    for (int i = 0; i < C / 2; ++i) {
      const float lo = v[i], hi = v[i + C / 2];
      v[i] = (upper ? hi : lo) + __shfl_xor_sync(0xffffffffu, upper ? lo : hi, m);
    }
    halve<C / 2, V>(v, lane);
  }
}

// The warp sums of V = 2^p values at once: p halving steps (lanes l and l ^ m swap half of what they hold and keep
// the sum of the other half: V / 2 + V / 4 + ... shuffles), then a butterfly over the lanes left. Lane l ends with
// the warp sum of value l >> (5 - p). (A butterfly per value would take 5 V shuffles, and the shuffle unit, one warp
// instruction per clock an SM, is what such small dot products wait on.)
template <int V>
__device__ __forceinline__ float warp_sums(float (&v)[V], int lane) {
  static_assert(V >= 1 && V <= 32 && (V & (V - 1)) == 0, "a power of 2 values");
  halve<V, V>(v, lane);
  float s = v[0];
#pragma unroll
  for (int st = log2_of(V); st < 5; ++st) s += __shfl_xor_sync(0xffffffffu, s, 16 >> st);
  return s;
}

// One work item of a warp: out[g] = W_g . S_r (length 4 nk4) for the G rows W_g (row stride nk4 float4s) and the
// ROWS rows S_r, in lane r (< ROWS). Every lane of the warp must call it.
template <int G, int ROWS>
__device__ __forceinline__ void warp_dots(const float4* w4, const float4* s4, int64_t nk4, int lane, float (&out)[G]) {
  constexpr int V = pow2_at_least(G * ROWS);  // value g ROWS + r (zeros past G ROWS)
  float acc[V];
#pragma unroll
  for (int i = 0; i < V; ++i) acc[i] = 0.0f;
  for (int64_t k = lane; k < nk4; k += 32) {
    float4 wv[G];
#pragma unroll
    for (int g = 0; g < G; ++g) wv[g] = w4[g * nk4 + k];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const float4 sv = s4[r * nk4 + k];
#pragma unroll
      for (int g = 0; g < G; ++g) {
        float& a = acc[g * ROWS + r];
        a = fmaf(wv[g].x, sv.x, a);
        a = fmaf(wv[g].y, sv.y, a);
        a = fmaf(wv[g].z, sv.z, a);
        a = fmaf(wv[g].w, sv.w, a);
      }
    }
  }
  const float sum = warp_sums<V>(acc, lane);
  const int r = lane % ROWS;
#pragma unroll
  for (int g = 0; g < G; ++g) out[g] = __shfl_sync(0xffffffffu, sum, (g * ROWS + r) << (5 - log2_of(V)));
}

// warp_dots for the item's rows (1 to kRecRows; a template each, so that no row is computed for nothing and the
// accumulators stay in registers)
template <int G>
__device__ __forceinline__ void item_dots(const float4* w4, const float4* s4, int64_t nk4, int nrows, int lane,
                                          float (&out)[G]) {
  switch (nrows) {
    case 1:
      warp_dots<G, 1>(w4, s4, nk4, lane, out);
      break;
    case 2:
      warp_dots<G, 2>(w4, s4, nk4, lane, out);
      break;
    case 3:
      warp_dots<G, 3>(w4, s4, nk4, lane, out);
      break;
    default:
      warp_dots<G, 4>(w4, s4, nk4, lane, out);
      break;
  }
}

template <typename T>
__global__ void __launch_bounds__(kRecThreads, 1) gru_rec_fwd_kernel(const RecFwdArgs a) {
  const GRURecFwdParams& p = a.p;
  const int64_t nsteps = p.T, B = p.B, H = p.H, HP = a.s.kp, nk4 = HP / 4;
  const int64_t j0 = int64_t(blockIdx.x) * a.s.units;
  const int nu = int(H - j0 < a.s.units ? H - j0 : a.s.units);  // >= 1 (the plan's grid)
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const T* __restrict__ w_hh = static_cast<const T*>(p.w_hh);
  const T* __restrict__ b_ih = static_cast<const T*>(p.b_ih);
  const T* __restrict__ b_hh = static_cast<const T*>(p.b_hh);
  T* out = static_cast<T*>(p.out);

  extern __shared__ float4 rec_smem[];
  float* Ws = reinterpret_cast<float*>(rec_smem);  // [3 nu][HP]
  float* Hs = Ws + 3 * int64_t(a.s.units) * HP;     // [batch_rows][HP]
  for (int64_t e = threadIdx.x; e < 3 * nu * HP; e += blockDim.x) {
    const int64_t row = e / HP, k = e - row * HP, u = row / 3, g = row - 3 * u;
    Ws[e] = k < H ? to_f32(w_hh[(g * H + j0 + u) * p.w_hh_row_stride + k]) : 0.0f;
  }

  // What a work item's lane r (< its rows) reads besides the dot products: the input projection of its row at step
  // t and both biases of its unit. None of it depends on the recurrence, so it is loaded before it is needed: for a
  // warp's first item of a step (chunk 0, item = warp: the same unit and rows every step) during the previous
  // step's grid barrier, for any other item before its dot products; the latency of the loads then overlaps the wait
  // or the dots instead of following them (one L2 round trip less per step where a warp has one item).
  auto load_in = [&](int64_t t, int64_t b, int64_t j) {
    ItemIn in;
    const float* gi = p.gi + (t * B + b) * 3 * H + j;
    in.x[0] = gi[0];
    in.x[1] = gi[H];
    in.x[2] = gi[2 * H];
    for (int g = 0; g < 3; ++g) {
      in.x[g] += b_ih != nullptr ? to_f32(b_ih[g * H + j]) : 0.0f;
      in.bh[g] = b_hh != nullptr ? to_f32(b_hh[g * H + j]) : 0.0f;
    }
    return in;
  };
  const int nb0 = int(B < a.s.batch_rows ? B : a.s.batch_rows), nsub0 = (nb0 + kRecRows - 1) / kRecRows;
  const int first_sb = (warp % nsub0) * kRecRows;  // the first item's chunk rows first_sb ..
  const int first_rows = warp >= nu * nsub0 ? 0 : nb0 - first_sb < kRecRows ? nb0 - first_sb : kRecRows;  // 0: none
  auto load_first = [&](int64_t step) {  // the inputs of this warp's first item of `step` (this lane's row)
    const int64_t t = p.reverse ? nsteps - 1 - step : step;
    return load_in(t, first_sb + lane, j0 + warp / nsub0);
  };
  ItemIn first{};
  if (lane < first_rows) first = load_first(0);

  for (int64_t step = 0; step < nsteps; ++step) {
    const int64_t t = p.reverse ? nsteps - 1 - step : step;
    // the state this step starts from: h0, or the output of the step processed before (other blocks wrote it)
    const T* hsrc = step == 0 ? static_cast<const T*>(p.h0) : out + (p.reverse ? t + 1 : t - 1) * B * H;
    const int64_t hstride = step == 0 ? p.h0_row_stride : H;
    for (int64_t b0 = 0; b0 < B; b0 += a.s.batch_rows) {
      const int nb = int(B - b0 < a.s.batch_rows ? B - b0 : a.s.batch_rows);
      __syncthreads();  // (the previous chunk's work items are done with Hs; Ws is loaded)
      stage_rows(Hs, hsrc + b0 * hstride, hstride, H, HP, nb);
      __syncthreads();
      const int nsub = (nb + kRecRows - 1) / kRecRows;
      for (int item = warp; item < nu * nsub; item += kRecWarps) {
        const int u = item / nsub, sb = (item - u * nsub) * kRecRows;  // unit j0 + u, chunk rows sb .. sb + 3
        const int nrows = nb - sb < kRecRows ? nb - sb : kRecRows;
        const float4* w4 = reinterpret_cast<const float4*>(Ws + 3 * u * HP);
        const float4* h4 = reinterpret_cast<const float4*>(Hs + sb * HP);
        ItemIn in{};
        if (b0 == 0 && item == warp)
          in = first;
        else if (lane < nrows)
          in = load_in(t, b0 + sb + lane, j0 + u);
        float gh[3];
        item_dots<3>(w4, h4, nk4, nrows, lane, gh);
        if (lane < nrows) {
          const int64_t b = b0 + sb + lane, j = j0 + u, row = t * B + b;
          const float hn = gh[2] + in.bh[2];
          const Gates g = gru_gates(in.x[0], in.x[1], in.x[2], gh[0] + in.bh[0], gh[1] + in.bh[1], hn,
                                    Hs[(sb + lane) * HP + j]);
          out[row * H + j] = from_f32<T>(g.h);
          if (p.ws != nullptr) store_ws(p.ws + row * 4 * H + j, H, g, hn);
        }
      }
    }
    if (step + 1 < nsteps && lane < first_rows) first = load_first(step + 1);  // (in flight during the barrier)
    // out[t] complete everywhere before any block reads it (one block: the next chunk's __syncthreads)
    if (step + 1 < nsteps && gridDim.x > 1) grid_barrier(p.sync, static_cast<unsigned long long>(step + 1));
  }
}

// ---- the one-block forward (gru_rec_fwd_one_kernel) ----
// For a small batch and hidden size (gru_rec_fwd_plan: B H <= kOneMaxItems, W_hh fits one block's shared memory, T >=
// 2) the whole layer direction runs in one block, so a step ends with a __syncthreads instead of a grid barrier (about
// 2.8 us a step on the H200 at B = 1, H = 128, where cuDNN's step takes 0.86): W_hh (fp32, the persistent kernel's
// layout with j0 = 0), both biases, the state h (two buffers: read one, write the other) and the step's input
// projection (two buffers: the next step's is loaded into registers while this step computes, then stored) stay in
// shared memory. A work item is (batch row b, unit u), handled by 8 lanes (4 items a warp at once): lane l8 does the
// dot products' float4 steps l8 + 8 q + 32 i for q = 0..3, each q in its own accumulator, i.e. what lanes l8 + 8 q of
// warp_dots do, adds them as warp_dots' first two halving levels do (lanes 16 apart, then 8) and finishes with
// xor-shuffles 4, 2, 1 inside the 8 lanes: the same sums in the same order, so the results are the persistent kernel's
// bits (and the gates are gru_gates on the same inputs).
constexpr int kOneThreads = 512;
constexpr int kOneItemsPerPass = kOneThreads / 8;
constexpr int kOnePre = 4;                                     // prefetch registers a thread: B 3H <= 4 kOneThreads
constexpr int64_t kOneMaxItems = 512;                          // B H: up to 8 passes a step

// ---- thread-block clusters (sm_90): the one-block kernels on a cluster of C blocks (the backward: below) ----
// Forward: block c of the cluster owns hidden units [c U, c U + nu) (U = ceil(H / C)) and keeps only their W_hh rows,
// input projection and biases; every block keeps all of h. A block writes each new h value into its own buffer and into
// the same place of the other blocks' buffers (distributed shared memory: mapa + st.shared::cluster), and a step ends
// with the cluster barrier (barrier.cluster arrive.release / wait.acquire: the remote writes are visible after it)
// instead of __syncthreads. The emulator runs a one-cluster grid as a cooperative launch (block_smem, grid_sync).
__device__ __forceinline__ unsigned cluster_rank() {
#if defined(PYATTN_CUDA_EMU)
  return blockIdx.x;
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  unsigned r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
  return r;
#else
  return 0;  // (never launched with a cluster below sm_90)
#endif
}

// Every thread of every block of the cluster; orders the blocks' shared-memory writes (local and remote) before it
// against their reads after it.
__device__ __forceinline__ void cluster_barrier() {
#if defined(PYATTN_CUDA_EMU)
  ::pyattn_emu::grid_sync(__FILE__, __LINE__);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
#else
  __trap();
#endif
}

// *local's counterpart in block `rank` of the cluster = v (local: this block's dynamic shared memory)
__device__ __forceinline__ void store_cluster(float* local, unsigned rank, float v) {
#if defined(PYATTN_CUDA_EMU)
  extern __shared__ float4 rec_smem[];
  const ptrdiff_t off = reinterpret_cast<unsigned char*>(local) - reinterpret_cast<unsigned char*>(rec_smem);
  *reinterpret_cast<float*>(::pyattn_emu::block_smem(rank, __FILE__, __LINE__) + off) = v;
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(local));
  unsigned remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(remote) : "r"(a), "r"(rank));
  asm volatile("st.shared::cluster.f32 [%0], %1;\n" ::"r"(remote), "f"(v) : "memory");
#else
  (void)local;
  (void)rank;
  (void)v;
  __trap();
#endif
}

// *local's counterparts in the other C - 1 blocks of the cluster = v
template <int C>
__device__ __forceinline__ void store_cluster_others(float* local, float v) {
  const unsigned self = cluster_rank();
#pragma unroll 1
  for (unsigned r = 0; r < unsigned(C); ++r)
    if (r != self) store_cluster(local, r, v);
}

// C: the blocks of the cluster (1: one block, no cluster instructions).
template <typename T, int C>
__global__ void __launch_bounds__(kOneThreads, 1) gru_rec_fwd_one_kernel(const GRURecFwdParams p) {
  const int64_t nsteps = p.T, B = p.B, H = p.H, HP = (H + 3) / 4 * 4, nk4 = HP / 4;
  const int64_t U = (H + C - 1) / C, j0 = int64_t(C == 1 ? 0 : cluster_rank()) * U;
  const int64_t nu = H - j0 < U ? H - j0 : U;  // >= 1 (the plan: (C - 1) U < H)
  const int64_t G3 = 3 * nu, BG3 = B * G3;     // the block's input projection: B rows of 3 nu
  const int lane = threadIdx.x % 32, l8 = lane % 8, slot = threadIdx.x / 8;  // slot: the item within a pass
  const T* __restrict__ w_hh = static_cast<const T*>(p.w_hh);
  const T* __restrict__ h0 = static_cast<const T*>(p.h0);
  T* out = static_cast<T*>(p.out);

  extern __shared__ float4 rec_smem[];
  // Hs [2][B][HP]: all of h; Ws [3 nu][HP], row 3 u + g = W_hh row g H + j0 + u. In a cluster Hs comes first: the
  // other blocks write into it, at the same offset in every block only if nothing nu long precedes it. (One block
  // keeps W_hh first: the other order took ptxas past the 128 registers of 512 threads, into spills.)
  float* const base = reinterpret_cast<float*>(rec_smem);
  float* Hs = C == 1 ? base + G3 * HP : base;
  float* Ws = C == 1 ? base : base + 2 * B * HP;
  float* Gs = base + G3 * HP + 2 * B * HP;  // (after both) [2][B][3 nu]: the input projection, g nu + u
  float* Bi = Gs + 2 * BG3;                        // [3 nu] b_ih (0 where absent), g nu + u
  float* Bh = Bi + G3;                             // [3 nu] b_hh
  // element e of the block's input projection (row b, gate g, unit u) within a step's B x 3H; 32-bit: e < B 3 nu <=
  // kOnePre kOneThreads and B 3H <= C of that
  auto gi_offset = [&](int64_t e) {
    if constexpr (C == 1) return int(e);  // (all units: contiguous)
    const int g3 = int(G3), n = int(nu), b = int(e) / g3, r = int(e) - b * g3, g = r / n, u = r - g * n;
    return b * 3 * int(H) + g * int(H) + int(j0) + u;
  };
  int pre_off[kOnePre];  // the offsets of this thread's elements of the next step's input projection (-1: none)
#pragma unroll
  for (int i = 0; i < kOnePre; ++i) {
    const int64_t e = threadIdx.x + int64_t(i) * kOneThreads;
    pre_off[i] = e < BG3 ? gi_offset(e) : -1;
  }
  for (int64_t e = threadIdx.x; e < G3 * HP; e += blockDim.x) {
    const int64_t row = e / HP, k = e - row * HP, u = row / 3, g = row - 3 * u;
    Ws[e] = k < H ? to_f32(w_hh[(g * H + j0 + u) * p.w_hh_row_stride + k]) : 0.0f;
  }
  for (int64_t e = threadIdx.x; e < 2 * B * HP; e += blockDim.x) {  // h0 into buffer 0; zero padding in both
    const int64_t r = e / HP, k = e - r * HP;
    Hs[e] = r < B && k < H ? to_f32(h0[r * p.h0_row_stride + k]) : 0.0f;
  }
  const int64_t t0 = p.reverse ? nsteps - 1 : 0;
  for (int64_t e = threadIdx.x; e < BG3; e += blockDim.x) Gs[e] = p.gi[t0 * B * 3 * H + gi_offset(e)];
  for (int64_t e = threadIdx.x; e < G3; e += blockDim.x) {
    const int64_t g = e / nu, j = g * H + j0 + (e - g * nu);
    Bi[e] = p.b_ih != nullptr ? to_f32(static_cast<const T*>(p.b_ih)[j]) : 0.0f;
    Bh[e] = p.b_hh != nullptr ? to_f32(static_cast<const T*>(p.b_hh)[j]) : 0.0f;
  }
  if constexpr (C == 1)
    __syncthreads();
  else
    cluster_barrier();  // (also: every block of the cluster runs before any writes into its shared memory)

  for (int64_t step = 0; step < nsteps; ++step) {
    const int64_t t = p.reverse ? nsteps - 1 - step : step;
    const int cur = int(step & 1);
    const float* hs = Hs + cur * B * HP;
    float* hs_next = Hs + (cur ^ 1) * B * HP;
    const float* gs = Gs + cur * BG3;
    float pre[kOnePre];  // the next step's input projection, in flight while this step computes
    if (step + 1 < nsteps) {
      const float* src = p.gi + (p.reverse ? t - 1 : t + 1) * B * 3 * H;
#pragma unroll
      for (int i = 0; i < kOnePre; ++i) {
        int off = pre_off[i];
        if constexpr (C == 1) {  // (recomputed: 4 registers fewer, which the one-block kernel needs)
          const int64_t e = threadIdx.x + int64_t(i) * kOneThreads;
          off = e < BG3 ? int(e) : -1;
        }
        pre[i] = off >= 0 ? src[off] : 0.0f;
      }
    }
    // passes over the items, warp-uniform (the shuffles need every lane); items past B nu compute for nothing
    for (int64_t base = 0; base < B * nu; base += kOneItemsPerPass) {
      const int64_t item = base + slot;
      const bool live = item < B * nu;
      const int64_t b = live ? item / nu : 0, u = live ? item - b * nu : 0;
      const float4* w4 = reinterpret_cast<const float4*>(Ws + 3 * u * HP);
      const float4* h4 = reinterpret_cast<const float4*>(hs + b * HP);
      float acc[3][4];
#pragma unroll
      for (int g = 0; g < 3; ++g)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[g][q] = 0.0f;
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        for (int64_t k = l8 + 8 * q; k < nk4; k += 32) {
          float4 wv[3];
#pragma unroll
          for (int g = 0; g < 3; ++g) wv[g] = w4[g * nk4 + k];
          const float4 sv = h4[k];
#pragma unroll
          for (int g = 0; g < 3; ++g) {
            float& a = acc[g][q];
            a = fmaf(wv[g].x, sv.x, a);
            a = fmaf(wv[g].y, sv.y, a);
            a = fmaf(wv[g].z, sv.z, a);
            a = fmaf(wv[g].w, sv.w, a);
          }
        }
      }
      float gh[3];
#pragma unroll
      for (int g = 0; g < 3; ++g) {
        float sum = (acc[g][0] + acc[g][2]) + (acc[g][1] + acc[g][3]);  // warp_dots' levels 16 and 8
#pragma unroll
        for (int m = 4; m >= 1; m /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, m);
        gh[g] = sum;
      }
      if (live && l8 == 0) {
        const int64_t row = t * B + b, j = j0 + u;
        const float* gi = gs + b * G3 + u;
        const float hn = gh[2] + Bh[2 * nu + u];
        const Gates g = gru_gates(gi[0] + Bi[u], gi[nu] + Bi[nu + u], gi[2 * nu] + Bi[2 * nu + u], gh[0] + Bh[u],
                                  gh[1] + Bh[nu + u], hn, hs[b * HP + j]);
        const T h = from_f32<T>(g.h);
        out[row * H + j] = h;
        // (the next step reads the state as stored, like the persistent kernel)
        hs_next[b * HP + j] = to_f32(h);
        if constexpr (C > 1) store_cluster_others<C>(hs_next + b * HP + j, to_f32(h));
        if (p.ws != nullptr) store_ws(p.ws + row * 4 * H + j, H, g, hn);
      }
    }
    if (step + 1 < nsteps) {
      float* gs_next = Gs + (cur ^ 1) * BG3;
#pragma unroll
      for (int i = 0; i < kOnePre; ++i) {
        const int64_t e = threadIdx.x + int64_t(i) * kOneThreads;
        if (e < BG3) gs_next[e] = pre[i];
      }
    }
    // h and the input projection of the next step are in place (in every block of the cluster); this step's are free
    if constexpr (C == 1)
      __syncthreads();
    else
      cluster_barrier();
  }
}

template <typename T>
__global__ void __launch_bounds__(kRecThreads, 1) gru_rec_bwd_kernel(const RecBwdArgs a) {
  const GRURecBwdParams& p = a.p;
  const int64_t nsteps = p.T, B = p.B, H = p.H, H3 = 3 * H, KP = a.s.kp, nk4 = KP / 4;
  const int64_t j0 = int64_t(blockIdx.x) * a.s.units;
  const int nu = int(H - j0 < a.s.units ? H - j0 : a.s.units);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const T* __restrict__ w_hh = static_cast<const T*>(p.w_hh);

  extern __shared__ float4 rec_smem[];
  float* Wt = reinterpret_cast<float*>(rec_smem);  // [nu][KP]
  float* Gs = Wt + int64_t(a.s.units) * KP;         // [batch_rows][KP]
  float* Ds = Gs + int64_t(a.s.batch_rows) * KP;    // [nu][B]: dh of the block's units, here for all steps
  for (int64_t e = threadIdx.x; e < nu * KP; e += blockDim.x) {  // (consecutive threads: a row's consecutive units)
    const int64_t k = e / nu, u = e - k * nu;
    Wt[u * KP + k] = k < H3 ? to_f32(w_hh[k * p.w_hh_row_stride + j0 + u]) : 0.0f;
  }
  for (int64_t e = threadIdx.x; e < nu * B; e += blockDim.x) {
    const int64_t b = e / nu, u = e - b * nu;
    Ds[u * B + b] = p.dh[b * H + j0 + u];
  }

  // Phase A's element e (batch row e / nu, unit j0 + e % nu) at a step reads dout, the state before the step and
  // the forward's workspace, none of which depends on the recurrence: a thread's first element of the next step is
  // loaded before this step's grid barrier, so that its latency overlaps the wait and phase B (the barrier's last
  // thread excepted: see grid_barrier). dh stays in shared memory (Ds), so phase A waits on no load of it.
  auto load_a = [&](int64_t step, int64_t e) { return load_bwd_in<T>(p, step, e / nu, j0 + e % nu); };
  const bool prefetch = threadIdx.x < B * nu && threadIdx.x + 1 < blockDim.x;
  BwdIn next{};
  if (prefetch) next = load_a(0, threadIdx.x);

  for (int64_t step = 0; step < nsteps; ++step) {
    const int64_t t = p.reverse ? step : nsteps - 1 - step;
    __syncthreads();  // the previous step's phase B is done with Ds (and the first step: Ds is loaded)
    // phase A: d = dh + dout[t] -> dgi[t], dgh[t] and dh = d z for this block's units
    for (int64_t e = threadIdx.x; e < B * nu; e += blockDim.x) {
      const BwdIn in = prefetch && e == threadIdx.x ? next : load_a(step, e);
      const int64_t b = e / nu, u = e - b * nu, j = j0 + u, row = t * B + b;
      const GateGrads g = gru_gate_grads(Ds[u * B + b] + in.dout, in.hp, in.r, in.z, in.n, in.hn);
      store_gate_grads(p, row, j, g);
      Ds[u * B + b] = g.direct;
    }
    if (prefetch && step + 1 < nsteps) next = load_a(step + 1, threadIdx.x);  // (in flight during the barrier)
    if (gridDim.x > 1) grid_barrier(p.sync, static_cast<unsigned long long>(step + 1));  // dgh[t] complete
    // phase B: dh[b][j] += dgh[t][b] . W_hh[:, j]
    for (int64_t b0 = 0; b0 < B; b0 += a.s.batch_rows) {
      const int nb = int(B - b0 < a.s.batch_rows ? B - b0 : a.s.batch_rows);
      __syncthreads();
      stage_rows(Gs, p.dgh + (t * B + b0) * H3, H3, H3, KP, nb);
      __syncthreads();
      const int nsub = (nb + kRecRows - 1) / kRecRows;
      for (int item = warp; item < nu * nsub; item += kRecWarps) {
        const int u = item / nsub, sb = (item - u * nsub) * kRecRows;
        const int nrows = nb - sb < kRecRows ? nb - sb : kRecRows;
        const float4* w4 = reinterpret_cast<const float4*>(Wt + u * KP);
        const float4* g4 = reinterpret_cast<const float4*>(Gs + sb * KP);
        float v[1];
        item_dots<1>(w4, g4, nk4, nrows, lane, v);
        if (lane < nrows) Ds[u * B + b0 + sb + lane] += v[0];
      }
    }
  }
  __syncthreads();  // dL/dh0 of the block's units out
  for (int64_t e = threadIdx.x; e < nu * B; e += blockDim.x) {
    const int64_t b = e / nu, u = e - b * nu;
    p.dh[b * H + j0 + u] = Ds[u * B + b];
  }
}

// The one-block backward (gru_rec_bwd_one_kernel), the forward's counterpart (gru_rec_bwd_plan: B H <= kOneThreads,
// W_hh^T in one block's shared memory, T >= 2): gru_rec_bwd_kernel's two phases on one block with block barriers only,
// and phase A writes dgh[t] to shared memory as well as to global memory, so phase B reads it there instead of staging
// it back through L2. Phase A: element e = thread (B H <= the block), its inputs for the next step loaded while this
// step's phase B runs. Phase B: a (batch row, unit) item on 8 lanes as in the one-block forward (lanes l8 + 8 q of
// warp_dots, the same two halving levels, xor-shuffles 4, 2, 1), so the persistent backward's bits.
// C: the blocks of the cluster (1: one block). On a cluster, block c owns units [c U, c U + nu) as in the forward: its
// W_hh columns and dh stay local, and phase A writes its dgh[t] entries into every block's Gs (the dot products of
// phase B run over all 3H); Gs is double-buffered by step parity, so one cluster barrier a step (after phase A) and a
// block barrier (after phase B) suffice: a block writing Gs[p] at step s + 1 is past the cluster barrier of step s, so
// every block has finished phase B of step s - 1, the last reader of Gs[p].
template <typename T, int C>
__global__ void __launch_bounds__(kOneThreads, 1) gru_rec_bwd_one_kernel(const GRURecBwdParams p) {
  const int64_t nsteps = p.T, B = p.B, H = p.H, H3 = 3 * H, KP = (H3 + 3) / 4 * 4, nk4 = KP / 4;
  const int64_t U = (H + C - 1) / C, j0 = int64_t(C == 1 ? 0 : cluster_rank()) * U;
  const int64_t nu = H - j0 < U ? H - j0 : U;  // >= 1 (the plan: (C - 1) U < H)
  const int lane = threadIdx.x % 32, l8 = lane % 8, slot = threadIdx.x / 8;
  const T* __restrict__ w_hh = static_cast<const T*>(p.w_hh);

  extern __shared__ float4 rec_smem[];
  // One block: Wt [H][KP] (W_hh column u), Gs [B][KP] (dgh[t], zero padding), Ds [H][B] (dh). A cluster: Gs [2][B][KP]
  // first (the other blocks write into it, at the same offset in every block), then Wt [nu][KP], Ds [nu][B].
  float* const base = reinterpret_cast<float*>(rec_smem);
  constexpr int kGsBuffers = C == 1 ? 1 : 2;
  float* Gs0 = C == 1 ? base + H * KP : base;
  float* Wt = C == 1 ? base : base + kGsBuffers * B * KP;
  float* Ds = base + kGsBuffers * B * KP + nu * KP;  // (after both; nu = H for one block)
  for (int64_t e = threadIdx.x; e < nu * KP; e += blockDim.x) {  // (consecutive threads: a row's consecutive units)
    const int64_t k = e / nu, u = e - k * nu;
    Wt[u * KP + k] = k < H3 ? to_f32(w_hh[k * p.w_hh_row_stride + j0 + u]) : 0.0f;
  }
  for (int64_t e = threadIdx.x; e < kGsBuffers * B * KP; e += blockDim.x) Gs0[e] = 0.0f;
  for (int64_t e = threadIdx.x; e < nu * B; e += blockDim.x) {
    const int64_t b = e / nu, u = e - b * nu;
    Ds[u * B + b] = p.dh[b * H + j0 + u];
  }
  const int64_t e = threadIdx.x;  // this thread's phase A element (B nu <= the block): (row e / nu, unit e % nu)
  const bool mine = e < B * nu;
  BwdIn in{};
  if (mine) in = load_bwd_in<T>(p, 0, e / nu, j0 + e % nu);
  if constexpr (C == 1)
    __syncthreads();
  else
    cluster_barrier();  // (also: every block of the cluster runs before any writes into its shared memory)

  for (int64_t step = 0; step < nsteps; ++step) {
    const int64_t t = p.reverse ? step : nsteps - 1 - step;
    float* Gs = Gs0 + (C == 1 ? 0 : (step & 1) * B * KP);
    // phase A: d = dh + dout[t] -> dgi[t], dgh[t] (global and every block's Gs) and dh = d z
    if (mine) {
      const int64_t b = e / nu, u = e - b * nu, j = j0 + u, row = t * B + b;
      const GateGrads g = gru_gate_grads(Ds[u * B + b] + in.dout, in.hp, in.r, in.z, in.n, in.hn);
      store_gate_grads(p, row, j, g);
      float* gs = Gs + b * KP + j;
      gs[0] = g.dr;
      gs[H] = g.dz;
      gs[2 * H] = g.dnr;
      if constexpr (C > 1) {
        store_cluster_others<C>(gs, g.dr);
        store_cluster_others<C>(gs + H, g.dz);
        store_cluster_others<C>(gs + 2 * H, g.dnr);
      }
      Ds[u * B + b] = g.direct;
      if (step + 1 < nsteps) in = load_bwd_in<T>(p, step + 1, b, j);  // (in flight during phase B)
    }
    if constexpr (C == 1)
      __syncthreads();  // dgh[t] in Gs, dh = d z in Ds
    else
      cluster_barrier();  // (every block's part of dgh[t] in Gs)
    // phase B: dh[b][u] += dgh[t][b] . W_hh[:, j0 + u], warp-uniform passes (items past B nu compute for nothing)
    for (int64_t base_item = 0; base_item < B * nu; base_item += kOneItemsPerPass) {
      const int64_t item = base_item + slot;
      const bool live = item < B * nu;
      const int64_t b = live ? item / nu : 0, u = live ? item - b * nu : 0;
      const float4* w4 = reinterpret_cast<const float4*>(Wt + u * KP);
      const float4* g4 = reinterpret_cast<const float4*>(Gs + b * KP);
      float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        for (int64_t k = l8 + 8 * q; k < nk4; k += 32) {
          const float4 wv = w4[k], sv = g4[k];
          float& a = acc[q];
          a = fmaf(wv.x, sv.x, a);
          a = fmaf(wv.y, sv.y, a);
          a = fmaf(wv.z, sv.z, a);
          a = fmaf(wv.w, sv.w, a);
        }
      }
      float sum = (acc[0] + acc[2]) + (acc[1] + acc[3]);  // warp_dots' levels 16 and 8
#pragma unroll
      for (int m = 4; m >= 1; m /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, m);
      if (live && l8 == 0) Ds[u * B + b] += sum;
    }
    __syncthreads();  // dh complete for the next step's phase A; (one block:) Gs free
  }
  for (int64_t i = threadIdx.x; i < nu * B; i += blockDim.x) {  // dL/dh0
    const int64_t b = i / nu, u = i - b * nu;
    p.dh[b * H + j0 + u] = Ds[u * B + b];
  }
}

// ---- the one-launch cell step (gru_cell_fwd_kernel) ----
// A cell step of a small batch (gru_cell_fwd_plan) in one launch, no cuBLAS: block c owns hidden units j0 = c U ..
// j0 + nu - 1 and takes every batch row, in chunks of CR rows (a multiple of 4): it stages the chunk's rows of x and h
// in shared memory (fp32, Xs [CR][IP], Hs [CR][HP], zero rows past B and zero columns past I / H), then a work item
// (unit u, 4 batch rows) is one warp's: lanes split the dot products' length, VEC elements at a time (lane l:
// elements VEC (l + 32 i)), reading the unit's 3 rows of W_ih and 3 rows of W_hh from global memory (each weight
// read once a chunk, then from L1) against the 4 staged rows of x and of h; the 24 sums (value 4 g + r: gi_g of row
// r for g < 3, gh_(g-3) for g >= 3) are reduced by warp_sums (lane l ends with value l), and lane r (< the item's
// rows) gathers its six and finishes the gates (gru_gates, as gru_gates_fwd_kernel with both biases).
constexpr int kCellThreads = 256;
constexpr int kCellRows = 4;  // batch rows per work item

struct CellArgs {
  GRUCellFwdParams p;
  int units, chunk_rows;
  int64_t ip, hp;  // the staged rows' lengths: I and H rounded up to 4
};

// One staged row piece: VEC elements of row r, column k, of src (row stride `stride`, K valid columns), zeros past K
// and past nb.
template <typename T, int VEC>
__device__ __forceinline__ void load_piece(const T* src, int64_t stride, int64_t K, int nb, int r, int k,
                                           float (&v)[VEC]) {
  if (r < nb && k < K) {
    load_f32<VEC>(src + r * stride + k, v);
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) v[i] = 0.0f;
  }
}

// Xs [rows][ip] and Hs [rows][hp] fp32 = rows 0 .. nb - 1 of x and h, zeros past I / H and past nb, VEC consecutive
// elements a load (VEC 4: the sizes, strides and pointers allow it, ip == I and hp == H). A thread's kStagePieces
// pieces are loaded before any is stored, so that their latencies overlap.
constexpr int kStagePieces = 8;

template <typename T, int VEC>
__device__ __forceinline__ void stage_cell_rows(float* Xs, float* Hs, const GRUCellFwdParams& p, int ip, int hp,
                                                int64_t b0, int nb, int rows) {
  const T* x = static_cast<const T*>(p.x) + b0 * p.x_row_stride;
  const T* h = static_cast<const T*>(p.h) + b0 * p.h_row_stride;
  // pieces: x's, then h's (int: the staged rows fit in shared memory)
  const int xn = ip / VEC, hn = hp / VEC, nx = rows * xn, total = nx + rows * hn, step = int(blockDim.x);
  for (int e0 = int(threadIdx.x); e0 < total; e0 += kStagePieces * step) {
    float v[kStagePieces][VEC];
#pragma unroll
    for (int q = 0; q < kStagePieces; ++q) {
      const int e = e0 + q * step;
      if (e < nx)
        load_piece<T, VEC>(x, p.x_row_stride, p.I, nb, e / xn, (e % xn) * VEC, v[q]);
      else if (e < total)
        load_piece<T, VEC>(h, p.h_row_stride, p.H, nb, (e - nx) / hn, ((e - nx) % hn) * VEC, v[q]);
    }
#pragma unroll
    for (int q = 0; q < kStagePieces; ++q) {
      const int e = e0 + q * step;
      if (e >= total) continue;
      float* dst = e < nx ? Xs + (e / xn) * ip + (e % xn) * VEC : Hs + ((e - nx) / hn) * hp + ((e - nx) % hn) * VEC;
#pragma unroll
      for (int i = 0; i < VEC; ++i) dst[i] = v[q][i];
    }
  }
}

// acc[OFF + 4 g + r] += W_g . S_r over K elements, for the 3 rows W_g = w + g gstride (global, T) and the 4 rows S_r
// = S + r kp (shared, fp32). Every lane of the warp calls it; each adds its own elements.
template <typename T, int VEC, int OFF>
__device__ __forceinline__ void cell_dots(const T* __restrict__ w, int64_t gstride, const float* S, int64_t kp,
                                          int64_t K, int lane, float (&acc)[32]) {
#pragma unroll 2
  for (int64_t k = int64_t(lane) * VEC; k < K; k += 32 * VEC) {
    float wv[3][VEC];
#pragma unroll
    for (int g = 0; g < 3; ++g) load_f32<VEC>(w + g * gstride + k, wv[g]);
#pragma unroll
    for (int r = 0; r < kCellRows; ++r) {
      float sv[VEC];
      if constexpr (VEC == 4) {
        const float4 s4 = *reinterpret_cast<const float4*>(S + r * kp + k);
        sv[0] = s4.x;
        sv[1] = s4.y;
        sv[2] = s4.z;
        sv[3] = s4.w;
      } else {
        sv[0] = S[r * kp + k];
      }
#pragma unroll
      for (int g = 0; g < 3; ++g)
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[OFF + 4 * g + r] = fmaf(wv[g][i], sv[i], acc[OFF + 4 * g + r]);
    }
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kCellThreads, 1) gru_cell_fwd_kernel(const CellArgs a) {
  const GRUCellFwdParams& p = a.p;
  const int64_t B = p.B, I = p.I, H = p.H, IP = a.ip, HP = a.hp;
  const int64_t j0 = int64_t(blockIdx.x) * a.units;
  const int nu = int(H - j0 < a.units ? H - j0 : a.units);  // >= 1 (the plan's grid)
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nwarps = blockDim.x / 32;
  const T* __restrict__ w_ih = static_cast<const T*>(p.w_ih);
  const T* __restrict__ w_hh = static_cast<const T*>(p.w_hh);
  const T* __restrict__ b_ih = static_cast<const T*>(p.b_ih);
  const T* __restrict__ b_hh = static_cast<const T*>(p.b_hh);
  T* __restrict__ out = static_cast<T*>(p.out);

  extern __shared__ float4 cell_smem[];
  float* Xs = reinterpret_cast<float*>(cell_smem);  // [CR][IP]
  float* Hs = Xs + a.chunk_rows * IP;               // [CR][HP]
  for (int64_t b0 = 0; b0 < B; b0 += a.chunk_rows) {
    const int nb = int(B - b0 < a.chunk_rows ? B - b0 : a.chunk_rows);
    const int rows = (nb + kCellRows - 1) / kCellRows * kCellRows, nsub = rows / kCellRows;
    __syncthreads();  // (the previous chunk's items are done with Xs and Hs)
    stage_cell_rows<T, VEC>(Xs, Hs, p, int(IP), int(HP), b0, nb, rows);
    __syncthreads();
    for (int item = warp; item < nu * nsub; item += nwarps) {
      const int u = item / nsub, sb = (item - u * nsub) * kCellRows;  // unit j0 + u, chunk rows sb .. sb + 3
      const int64_t j = j0 + u;
      const bool live = lane < kCellRows && sb + lane < nb;  // lane r finishes chunk row sb + r
      float bi[3] = {0.0f, 0.0f, 0.0f}, bh[3] = {0.0f, 0.0f, 0.0f};
      if (live) {  // (loaded ahead of the dot products, so that their latency overlaps them)
#pragma unroll
        for (int g = 0; g < 3; ++g) {
          if (b_ih != nullptr) bi[g] = to_f32(b_ih[g * H + j]);
          if (b_hh != nullptr) bh[g] = to_f32(b_hh[g * H + j]);
        }
      }
      float acc[32];
#pragma unroll
      for (int i = 0; i < 32; ++i) acc[i] = 0.0f;
      cell_dots<T, VEC, 0>(w_ih + j * p.w_ih_row_stride, H * p.w_ih_row_stride, Xs + sb * IP, IP, I, lane, acc);
      cell_dots<T, VEC, 12>(w_hh + j * p.w_hh_row_stride, H * p.w_hh_row_stride, Hs + sb * HP, HP, H, lane, acc);
      const float sum = warp_sums<32>(acc, lane);
      const int r = lane % kCellRows;
      float d[6];  // gi_r, gi_z, gi_n, gh_r, gh_z, gh_n of row r
#pragma unroll
      for (int g = 0; g < 6; ++g) d[g] = __shfl_sync(0xffffffffu, sum, 4 * g + r);
      if (live) {
        const int64_t b = b0 + sb + r;
        const float hn = d[5] + bh[2];
        const Gates gt = gru_gates(d[0] + bi[0], d[1] + bi[1], d[2] + bi[2], d[3] + bh[0], d[4] + bh[1], hn,
                                   Hs[(sb + r) * HP + j]);
        out[b * H + j] = from_f32<T>(gt.h);
        if (p.ws != nullptr) store_ws(p.ws + b * 4 * H + j, H, gt, hn);
      }
    }
  }
}

// ---- launchers ----

bool aligned(const void* ptr, int64_t bytes) {
  return ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % static_cast<uintptr_t>(bytes) == 0;
}

// A row stride only matters when there is a second row.
bool stride_ok(int64_t stride, int64_t B, int vec) { return B == 1 || stride % vec == 0; }

struct Launch {
  dim3 grid, block;
};

Launch launch_dims(int64_t items) {
  const int64_t threads = items >= kThreads ? kThreads : ((items + 31) / 32) * 32;
  int64_t blocks = (items + threads - 1) / threads;
  if (blocks > kMaxBlocks) blocks = kMaxBlocks;
  return {dim3(static_cast<unsigned>(blocks)), dim3(static_cast<unsigned>(threads))};
}

int fwd_vec(const GRUGatesFwdParams& p, int64_t elem) {
  for (int v = 4; v > 1; v /= 2) {
    if (p.H % v != 0) continue;
    if (!stride_ok(p.gi_row_stride, p.B, v) || !stride_ok(p.gh_row_stride, p.B, v) ||
        !stride_ok(p.h_row_stride, p.B, v) || !stride_ok(p.out_row_stride, p.B, v) ||
        (p.ws != nullptr && !stride_ok(p.ws_row_stride, p.B, v)))
      continue;
    if (!aligned(p.gi, 4 * v) || !aligned(p.gh, 4 * v) || !aligned(p.ws, 4 * v) || !aligned(p.b_ih, elem * v) ||
        !aligned(p.b_hh, elem * v) || !aligned(p.h, elem * v) || !aligned(p.out, elem * v))
      continue;
    return v;
  }
  return 1;
}

int bwd_vec(const GRUGatesBwdParams& p, int64_t elem, int64_t dh_elem) {
  for (int v = 4; v > 1; v /= 2) {
    if (p.H % v != 0) continue;
    if (!stride_ok(p.dh_row_stride, p.B, v) || !stride_ok(p.h_row_stride, p.B, v) ||
        !stride_ok(p.ws_row_stride, p.B, v) || !stride_ok(p.dgi_row_stride, p.B, v) ||
        !stride_ok(p.dgh_row_stride, p.B, v) || !stride_ok(p.dh_direct_row_stride, p.B, v) ||
        (p.dout != nullptr && !stride_ok(p.dout_row_stride, p.B, v)))
      continue;
    if (!aligned(p.dh, dh_elem * v) || !aligned(p.dout, elem * v) || !aligned(p.h, elem * v) ||
        !aligned(p.ws, 4 * v) || !aligned(p.dgi, 4 * v) || !aligned(p.dgh, 4 * v) || !aligned(p.dh_direct, 4 * v))
      continue;
    return v;
  }
  return 1;
}

template <typename T>
void launch_fwd(const GRUGatesFwdParams& p, cudaStream_t stream) {
  const int vec = fwd_vec(p, sizeof(T));
  const Launch l = launch_dims(p.B * (p.H / vec));
  switch (vec) {
    case 4:
      gru_gates_fwd_kernel<T, 4><<<l.grid, l.block, 0, stream>>>(p);
      break;
    case 2:
      gru_gates_fwd_kernel<T, 2><<<l.grid, l.block, 0, stream>>>(p);
      break;
    default:
      gru_gates_fwd_kernel<T, 1><<<l.grid, l.block, 0, stream>>>(p);
      break;
  }
}

template <typename T, typename DH, bool HAS_DOUT>
void launch_bwd_v(const GRUGatesBwdParams& p, cudaStream_t stream) {
  const int vec = bwd_vec(p, sizeof(T), sizeof(DH));
  const Launch l = launch_dims(p.B * (p.H / vec));
  switch (vec) {
    case 4:
      gru_gates_bwd_kernel<T, DH, HAS_DOUT, 4><<<l.grid, l.block, 0, stream>>>(p);
      break;
    case 2:
      gru_gates_bwd_kernel<T, DH, HAS_DOUT, 2><<<l.grid, l.block, 0, stream>>>(p);
      break;
    default:
      gru_gates_bwd_kernel<T, DH, HAS_DOUT, 1><<<l.grid, l.block, 0, stream>>>(p);
      break;
  }
}

template <typename T>
void launch_bwd(const GRUGatesBwdParams& p, cudaStream_t stream) {
  const bool dout = p.dout != nullptr;
  if (p.dh_dtype == DType::F32) {
    if (dout)
      launch_bwd_v<T, float, true>(p, stream);
    else
      launch_bwd_v<T, float, false>(p, stream);
  } else {
    if (dout)
      launch_bwd_v<T, T, true>(p, stream);
    else
      launch_bwd_v<T, T, false>(p, stream);
  }
}


// ---- the persistent kernels: plan and launch ----
constexpr size_t kRecSmemCap = 220 * 1024;  // at most (H100: 227 KB per block, A100: 163 KB: p.smem_per_block)
constexpr int64_t kRecFmaPerBlock = int64_t(1) << 17;  // per block and step: the most the persistent path takes

template <typename T>
struct RecFwdKernel {
  static constexpr void (*fn)(const RecFwdArgs) = gru_rec_fwd_kernel<T>;
};
template <typename T>
struct RecBwdKernel {
  static constexpr void (*fn)(const RecBwdArgs) = gru_rec_bwd_kernel<T>;
};
template <typename T>
struct OneFwdKernel {
  static constexpr void (*fn)(const GRURecFwdParams) = gru_rec_fwd_one_kernel<T, 1>;
};
constexpr int kClusterBlocks = 8;  // the portable maximum cluster size
template <typename T>
struct ClusterFwdKernel {
  static constexpr void (*fn)(const GRURecFwdParams) = gru_rec_fwd_one_kernel<T, kClusterBlocks>;
};
template <typename T>
struct OneBwdKernel {
  static constexpr void (*fn)(const GRURecBwdParams) = gru_rec_bwd_one_kernel<T, 1>;
};
template <typename T>
struct ClusterBwdKernel {
  static constexpr void (*fn)(const GRURecBwdParams) = gru_rec_bwd_one_kernel<T, kClusterBlocks>;
};

// KernelOf's instance for the storage dtype
template <template <typename> class KernelOf>
auto rec_kernel(DType dtype) {
  return dtype == DType::F16 ? KernelOf<__half>::fn
                             : dtype == DType::BF16 ? KernelOf<__nv_bfloat16>::fn : KernelOf<float>::fn;
}

// unit_bytes: the W_hh part of one hidden unit; row_bytes: one staged batch row (both fp32, padded to 4).
template <template <typename> class KernelOf>
GRURecPlan rec_plan(int64_t B, int64_t H, int num_sms, size_t smem_per_block, DType dtype, int64_t unit_bytes,
                    int64_t row_bytes) {
  GRURecPlan plan;
  if (B < 1 || H < 1 || num_sms < 1) return plan;
  const char* env = std::getenv("PYATTN_CUDA_GRU_BLOCKS");
  const long forced = env != nullptr ? std::strtol(env, nullptr, 10) : -1;
  if (forced == 0) return plan;
  const int64_t cap = int64_t(smem_per_block < kRecSmemCap ? smem_per_block : kRecSmemCap);
  // batch rows staged at once: all of them when they take at most a quarter of the budget
  int64_t rows = (B + kRecRows - 1) / kRecRows * kRecRows;
  const int64_t max_rows = cap / 4 / row_bytes / kRecRows * kRecRows;
  if (rows > max_rows) rows = max_rows < kRecRows ? kRecRows : max_rows;
  const int64_t max_units = (cap - rows * row_bytes) / unit_bytes;
  if (max_units < 1) return plan;
  const int64_t min_blocks = (H + max_units - 1) / max_units;
  // a block per SM (the H200's grids: 132 blocks took 2.8 us a step at B = 1, H = 128, one block 8.8, and the
  // barrier cost the same at 16 and 132 blocks), unless that leaves a block more than kRecFmaPerBlock
  // multiply-adds a step: then the per-step path's tensor-core GEMM is faster (B = 64, H = 1024: 35 vs 90 us)
  if (forced < 0 && B * 3 * H * H > kRecFmaPerBlock * num_sms) return plan;
  int64_t blocks = forced > 0 ? forced : num_sms;
  if (blocks < min_blocks) blocks = min_blocks;
  if (blocks > H) blocks = H;
  int64_t units = (H + blocks - 1) / blocks;
  size_t smem = size_t(units * unit_bytes + rows * row_bytes);
  int per_sm = 0;
  const cudaError_t err = fit_kernel(rec_kernel<KernelOf>(dtype), smem, kRecThreads, &per_sm);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();  // (cleared: the binding falls back to the per-step kernels)
    return plan;
  }
  const int64_t resident = int64_t(per_sm) * num_sms;
  if (blocks > resident) {  // fewer, fuller blocks, if their parts of W_hh still fit
    if (resident < min_blocks) return plan;
    units = (H + resident - 1) / resident;
    smem = size_t(units * unit_bytes + rows * row_bytes);
    if (fit_kernel(rec_kernel<KernelOf>(dtype), smem) != cudaSuccess) {  // (the larger blocks' limit)
      (void)cudaGetLastError();
      return plan;
    }
  }
  plan.units = int(units);
  plan.blocks = int((H + units - 1) / units);
  plan.batch_rows = int(rows);
  plan.smem = smem;
  plan.needs_sync = plan.blocks > 1;
  return plan;
}

// Whether a one-block kernel may take a call of T steps and B H items (at most max_items): T >= 2 steps to spread
// the W_hh load over, PYATTN_CUDA_GRU_BLOCKS unset (a forced grid), and PYATTN_CUDA_GRU_ONE_BLOCK=1, or unset where
// the kernel is on by default (the backward's; the one-block forward measured slower than the grid's: H200, B = 1,
// H = 128, T = 200, fp32 3.49 vs 2.93 us a step, benchmarks/results/nvidia-h200/gpu-gru-grids.log, run H);
// PYATTN_CUDA_GRU_ONE_BLOCK=0 turns both off.
bool one_block_allowed(int64_t T, int64_t items, int64_t max_items, bool by_default) {
  const char* env = std::getenv("PYATTN_CUDA_GRU_ONE_BLOCK");
  if (std::getenv("PYATTN_CUDA_GRU_BLOCKS") != nullptr) return false;
  const bool on = env == nullptr ? by_default : std::strcmp(env, "1") == 0;
  return on && T >= 2 && items <= max_items;
}

// The one-block plan of KernelOf when its shared memory fits (220 KB or the device's opt-in limit), else blocks 0.
template <template <typename> class KernelOf>
GRURecPlan one_block_plan(DType dtype, size_t smem, size_t smem_per_block, int64_t H, int64_t B) {
  GRURecPlan plan;
  const size_t cap = smem_per_block < kRecSmemCap ? smem_per_block : kRecSmemCap;
  if (smem > cap) return plan;
  if (fit_kernel(rec_kernel<KernelOf>(dtype), smem, kOneThreads) != cudaSuccess) {
    (void)cudaGetLastError();  // (cleared: the grid's plan next)
    return plan;
  }
  plan.blocks = 1;
  plan.units = int(H);
  plan.batch_rows = int(B);
  plan.smem = smem;
  plan.one_block = true;
  return plan;
}

int64_t round4(int64_t n) { return (n + 3) / 4 * 4; }

// The cluster kernels (gru_rec_fwd_one_kernel / gru_rec_bwd_one_kernel <T, kClusterBlocks>): where `by_default` (the
// inference forward) on compute capability 9.x, or with PYATTN_CUDA_GRU_CLUSTER=1 (=0: never) on 9 and newer;
// T >= 2, no forced grid, every block of the cluster with at least one unit: the units a block, else 0. Measured on the
// H100 (gpu-gru-grids.log, B = 1, T = 200, I = 64, H = 128, ms a sequence, fp32 / bf16): inference forward 0.507 /
// 0.505 against the grid's 0.609 / 0.598 (cuDNN 0.171 / 3.12); a training step with both cluster kernels 1.284 /
// 2.142 against the defaults' (grid forward, one-block backward) 1.181 / 1.286, so training keeps them opt-in.
int64_t cluster_units(int64_t T, int64_t H, int cc_major, bool by_default) {
  const char* env = std::getenv("PYATTN_CUDA_GRU_CLUSTER");
  const bool on = env == nullptr ? by_default && cc_major == 9 : std::strcmp(env, "1") == 0;  // (measured: Hopper)
  if (!on || std::getenv("PYATTN_CUDA_GRU_BLOCKS") != nullptr) return 0;
  const int64_t C = kClusterBlocks, U = (H + C - 1) / C;
  return T >= 2 && cc_major >= 9 && (C - 1) * U < H ? U : 0;
}

// KernelOf's cluster plan with `smem` bytes a block (blocks 0 when it does not fit)
template <template <typename> class KernelOf>
GRURecPlan cluster_plan(DType dtype, size_t smem, size_t smem_per_block, int64_t U, int64_t B) {
  GRURecPlan plan = one_block_plan<KernelOf>(dtype, smem, smem_per_block, U, B);
  if (!plan.one_block) return plan;
  plan.blocks = kClusterBlocks;
  plan.cluster = kClusterBlocks;
  return plan;
}

// The forward's: a block's items and prefetched input projection within the one-block kernel's limits.
GRURecPlan cluster_fwd_plan(const GRURecFwdParams& p) {
  const int64_t U = cluster_units(p.T, p.H, p.cc_major, p.ws == nullptr), hp = round4(p.H);
  if (U < 1 || p.B * U > kOneMaxItems || p.B * 3 * U > int64_t(kOnePre) * kOneThreads) return GRURecPlan();
  const size_t smem = size_t(3 * U * hp + 2 * p.B * hp + 2 * p.B * 3 * U + 6 * U) * 4;
  return cluster_plan<ClusterFwdKernel>(p.dtype, smem, p.smem_per_block, U, p.B);
}

// The backward's: a block's B U phase-A elements within its threads; Gs (two buffers), W_hh's columns and dh.
GRURecPlan cluster_bwd_plan(const GRURecBwdParams& p) {
  const int64_t U = cluster_units(p.T, p.H, p.cc_major, false), kp = round4(3 * p.H);
  if (U < 1 || p.B * U > kOneThreads) return GRURecPlan();
  const size_t smem = size_t(2 * p.B * kp + U * kp + U * p.B) * 4;
  return cluster_plan<ClusterBwdKernel>(p.dtype, smem, p.smem_per_block, U, p.B);
}

// ---- the one-launch cell step: plan and launch ----
// The default limit of B (I + H), fp32 / 16-bit: above it the sequence path (cuBLAS + the persistent kernel) is
// faster. Measured on the H100 (benchmarks/results/nvidia-h100-80gb-hbm3/gpu-gru-cell-paths.log, I = H, us a step,
// cell / sequence path): fp32 H = 256 B = 64 23.6 / 39.4, B = 128 40.4 / 39.6; H = 1024 B = 16 43.5 / 51.7, B = 32
// 68.5 / 49.0; bf16 H = 256 B = 32 20.3 / 21.8, B = 64 33.3 / 33.1; H = 1024 B = 8 29.3 / 35.1, B = 16 47.6 / 31.3.
// The kernel's time grows about linearly in B (I + H) (a warp item reads its unit's weight rows for 4 batch rows; 8
// warps a block), steeper for 16-bit weights than for fp32 ones; the sequence path's much less.
constexpr int64_t kCellMaxWorkF32 = 32768, kCellMaxWork16 = 16384;
constexpr size_t kCellSmemCap = 96 * 1024;    // the staged rows' shared memory, at most

template <typename T>
struct CellKernels {
  static constexpr void (*vec4)(const CellArgs) = gru_cell_fwd_kernel<T, 4>;
  static constexpr void (*vec1)(const CellArgs) = gru_cell_fwd_kernel<T, 1>;
};

template <typename T>
auto cell_kernel_t(int vec) {
  return vec == 4 ? CellKernels<T>::vec4 : CellKernels<T>::vec1;
}

auto cell_kernel(DType dtype, int vec) {
  return dtype == DType::F16 ? cell_kernel_t<__half>(vec)
                             : dtype == DType::BF16 ? cell_kernel_t<__nv_bfloat16>(vec) : cell_kernel_t<float>(vec);
}

// 4 elements a load when the sizes, row strides and pointers allow it for x, h and both weights
int cell_vec(const GRUCellFwdParams& p, int64_t elem) {
  const bool sizes = p.I % 4 == 0 && p.H % 4 == 0;
  const bool strides = stride_ok(p.x_row_stride, p.B, 4) && stride_ok(p.h_row_stride, p.B, 4) &&
                       p.w_ih_row_stride % 4 == 0 && p.w_hh_row_stride % 4 == 0;
  const bool ptrs = aligned(p.x, 4 * elem) && aligned(p.h, 4 * elem) && aligned(p.w_ih, 4 * elem) &&
                    aligned(p.w_hh, 4 * elem);
  return sizes && strides && ptrs ? 4 : 1;
}

// KernelOf's instance for the dtype over the plan's blocks: a cooperative launch when they meet at a grid barrier
// (it needs them co-resident), else a plain one (a cell step, a one-block grid, the one-block kernels: the cheaper
// launch on the host).
template <template <typename> class KernelOf, class Args>
cudaError_t rec_launch(DType dtype, const Args& a, const GRURecPlan& plan, cudaStream_t stream) {
  const auto kernel = rec_kernel<KernelOf>(dtype);
  if (plan.cluster > 1) {  // one cluster of plan.cluster blocks
#ifdef PYATTN_CUDA_EMU       // (the emulator's stand-in for a cluster: a cooperative launch, its blocks alive at once)
    void* args[] = {const_cast<Args*>(&a)};
    const cudaError_t err = cudaLaunchCooperativeKernel(kernel, dim3(unsigned(plan.blocks)), dim3(kOneThreads), args,
                                                        plan.smem, stream);
#else
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = unsigned(plan.cluster);
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(unsigned(plan.blocks));
    cfg.blockDim = dim3(kOneThreads);
    cfg.dynamicSmemBytes = plan.smem;
    cfg.stream = stream;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    const cudaError_t err = cudaLaunchKernelEx(&cfg, kernel, a);
#endif
    const cudaError_t last = cudaGetLastError();
    return err != cudaSuccess ? err : last;
  }
  if (!plan.needs_sync) {
    kernel<<<unsigned(plan.blocks), plan.one_block ? kOneThreads : kRecThreads, plan.smem, stream>>>(a);
    return cudaGetLastError();
  }
  void* args[] = {const_cast<Args*>(&a)};
  const cudaError_t err =
      cudaLaunchCooperativeKernel(kernel, dim3(unsigned(plan.blocks)), dim3(kRecThreads), args, plan.smem, stream);
  const cudaError_t last = cudaGetLastError();  // (also clears what the launch recorded)
  return err != cudaSuccess ? err : last;
}

}  // namespace

cudaError_t gru_gates_fwd(const GRUGatesFwdParams& p, cudaStream_t stream) {
  if (p.B <= 0 || p.H <= 0) return cudaSuccess;
  switch (p.dtype) {
    case DType::F32:
      launch_fwd<float>(p, stream);
      break;
    case DType::F16:
      launch_fwd<__half>(p, stream);
      break;
    case DType::BF16:
      launch_fwd<__nv_bfloat16>(p, stream);
      break;
  }
  return cudaGetLastError();
}

cudaError_t gru_gates_bwd(const GRUGatesBwdParams& p, cudaStream_t stream) {
  if (p.B <= 0 || p.H <= 0) return cudaSuccess;
  switch (p.dtype) {
    case DType::F32:
      launch_bwd<float>(p, stream);
      break;
    case DType::F16:
      launch_bwd<__half>(p, stream);
      break;
    case DType::BF16:
      launch_bwd<__nv_bfloat16>(p, stream);
      break;
  }
  return cudaGetLastError();
}


GRURecPlan gru_rec_fwd_plan(const GRURecFwdParams& p, bool allow_cluster) {
  if (p.T < 1) return GRURecPlan();
  const int64_t hp = round4(p.H);
  const GRURecPlan cluster = allow_cluster ? cluster_fwd_plan(p) : GRURecPlan();
  if (cluster.cluster > 1) return cluster;
  // the one-block forward: B 3H within its prefetch registers, W_hh + two buffers of h and of the input projection
  // + both biases in shared memory
  if (one_block_allowed(p.T, p.B * p.H, kOneMaxItems, false) && p.B * 3 * p.H <= int64_t(kOnePre) * kOneThreads) {
    const size_t smem = size_t(3 * p.H * hp + 2 * p.B * hp + 2 * p.B * 3 * p.H + 6 * p.H) * 4;
    const GRURecPlan one = one_block_plan<OneFwdKernel>(p.dtype, smem, p.smem_per_block, p.H, p.B);
    if (one.one_block) return one;
  }
  GRURecPlan plan = rec_plan<RecFwdKernel>(p.B, p.H, p.num_sms, p.smem_per_block, p.dtype, 3 * hp * 4, hp * 4);
  plan.needs_sync = plan.needs_sync && p.T > 1;  // (the barriers are between steps: a cell has none)
  return plan;
}

cudaError_t gru_rec_fwd(const GRURecFwdParams& p, const GRURecPlan& plan, cudaStream_t stream) {
  if (plan.blocks < 1) return cudaErrorInvalidValue;
  if (plan.cluster > 1) return rec_launch<ClusterFwdKernel>(p.dtype, p, plan, stream);
  if (plan.one_block) return rec_launch<OneFwdKernel>(p.dtype, p, plan, stream);
  return rec_launch<RecFwdKernel>(p.dtype, RecFwdArgs{p, RecShape{plan.units, plan.batch_rows, round4(p.H)}}, plan,
                                  stream);
}

GRURecPlan gru_rec_bwd_plan(const GRURecBwdParams& p, bool allow_cluster) {
  if (p.T < 1) return GRURecPlan();
  const GRURecPlan cluster = allow_cluster ? cluster_bwd_plan(p) : GRURecPlan();
  if (cluster.cluster > 1) return cluster;
  const int64_t kp = round4(3 * p.H);  // a unit: its W_hh column and its dh of every batch row (Ds)
  if (one_block_allowed(p.T, p.B * p.H, kOneThreads, true)) {
    const size_t smem = size_t(p.H * kp + p.B * kp + p.H * p.B) * 4;  // Wt, Gs, Ds
    const GRURecPlan one = one_block_plan<OneBwdKernel>(p.dtype, smem, p.smem_per_block, p.H, p.B);
    if (one.one_block) return one;
  }
  return rec_plan<RecBwdKernel>(p.B, p.H, p.num_sms, p.smem_per_block, p.dtype, (kp + p.B) * 4, kp * 4);
}

cudaError_t gru_rec_bwd(const GRURecBwdParams& p, const GRURecPlan& plan, cudaStream_t stream) {
  if (plan.blocks < 1) return cudaErrorInvalidValue;
  if (plan.cluster > 1) return rec_launch<ClusterBwdKernel>(p.dtype, p, plan, stream);
  if (plan.one_block) return rec_launch<OneBwdKernel>(p.dtype, p, plan, stream);
  return rec_launch<RecBwdKernel>(p.dtype, RecBwdArgs{p, RecShape{plan.units, plan.batch_rows, round4(3 * p.H)}},
                                  plan, stream);
}

GRUCellPlan gru_cell_fwd_plan(const GRUCellFwdParams& p) {
  GRUCellPlan plan;
  if (p.B < 1 || p.H < 1 || p.I < 0 || p.num_sms < 1) return plan;
  const char* env = std::getenv("PYATTN_CUDA_GRU_CELL");
  if (env != nullptr && std::strcmp(env, "0") == 0) return plan;
  const bool forced = env != nullptr && std::strcmp(env, "1") == 0;
  if (!forced && p.B * (p.I + p.H) > (p.dtype == DType::F32 ? kCellMaxWorkF32 : kCellMaxWork16)) return plan;
  const int vec = cell_vec(p, p.dtype == DType::F32 ? 4 : 2);
  const int64_t ip = round4(p.I), hp = round4(p.H), row_bytes = (ip + hp) * 4;
  const int64_t cap = int64_t(p.smem_per_block < kCellSmemCap ? p.smem_per_block : kCellSmemCap);
  int64_t rows = round4(p.B);
  const int64_t max_rows = cap / row_bytes / kCellRows * kCellRows;
  if (max_rows < kCellRows) return plan;
  if (rows > max_rows) rows = max_rows;
  // a block per SM over the units (weights stream from every SM), as many warps as a chunk has items (at most 8)
  const int64_t units = (p.H + p.num_sms - 1) / p.num_sms, items = units * (rows / kCellRows);
  const size_t smem = size_t(rows * row_bytes);
  if (fit_kernel(cell_kernel(p.dtype, vec), smem) != cudaSuccess) {
    (void)cudaGetLastError();  // (cleared: the binding takes the sequence path)
    return plan;
  }
  plan.units = int(units);
  plan.blocks = int((p.H + units - 1) / units);
  plan.warps = int(items < kCellThreads / 32 ? items : kCellThreads / 32);
  plan.chunk_rows = int(rows);
  plan.vec = vec;
  plan.smem = smem;
  return plan;
}

cudaError_t gru_cell_fwd(const GRUCellFwdParams& p, const GRUCellPlan& plan, cudaStream_t stream) {
  if (plan.blocks < 1) return cudaErrorInvalidValue;
  const CellArgs a{p, plan.units, plan.chunk_rows, plan.vec == 4 ? p.I : round4(p.I),
                   plan.vec == 4 ? p.H : round4(p.H)};
  const auto kernel = cell_kernel(p.dtype, plan.vec);
  kernel<<<unsigned(plan.blocks), unsigned(32 * plan.warps), plan.smem, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace pyattn
