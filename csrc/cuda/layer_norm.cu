// LayerNorm / RMSNorm (+ fused residual add, "Add & Norm") CUDA kernels, forward and backward.
// Torch-free: the contract is the LayerNorm section of pyattn/params.h, the numerics those of
// csrc/cpu/layer_norm.cpp. Launchers are declared in pyattn/cuda_kernels.h.
//
// STATUS: tested on an H200 (tests/test_gpu.py, scripts/gpu_sanitize.sh) in the first GPU session (run 1, a6ae797).
// The register kernels were restructured afterwards without a GPU (loads of a row issued together, VEC a template
// parameter; see docs/design.md): emulator-tested and compiled without spills, not yet timed.
//
// Layout of the work
//   A row of N elements is handled by TPR threads ("a row group": part of a warp, a warp, or a whole block of up to
//   512 threads); a block holds RPB row groups. Thread `lane` of a row group owns the 16-byte vectors
//   v = lane, lane + TPR, lane + 2 TPR, ... (coalesced: consecutive lanes read consecutive 16-byte pieces), at most
//   EPT elements (EPT / V vectors, V = 16 / sizeof(T)). The configuration is the smallest one whose TPR * EPT
//   covers N; the row then lives in registers (packed in T) between the passes, so it is read from memory once.
//   Rows longer than the largest configuration (N > 8192 forward and backward) take a "looped" kernel: one
//   block of 256 threads per row that re-reads the row from memory (L2) in each pass, 4 vectors a thread at a
//   time. Any N >= 1 works (N < 2^31).
//   When a pointer is not 16-byte aligned or a row stride is not a multiple of V, the same kernels load and store
//   element by element (VEC = false); results are identical.
//
// Forward (per row), exactly the CPU kernel's algorithm:
//   pass 1  s = round_to_dtype(x + residual) (stored to residual_out when asked), sum(s) [RMS: sum(s^2)]
//   pass 2  corrected two-pass variance: m1 = sum / N, d = s - m1, c = mean(d), var = max(mean(d^2) - c^2, 0)
//           (s - m1 is exact when s is close to m1, so inputs offset by +1000 keep full accuracy)
//   pass 3  y = ((s - m1) * rstd - c * rstd) * w + b   [RMS: y = s * rstd * w]
//   rstd = 1 / sqrt(var + eps) to fp32 precision (rstd_of) and sum / N with an FMA-corrected quotient (div_n),
//   both accurate under --use_fast_math. Sums: per-thread sequential, then a butterfly over the warp and a fixed-order
//   sum over the warps of the row group, so results are deterministic run to run.
// Backward (per row): xhat = (s - mean) * rstd [RMS: s * rstd], g = dy * w; a = mean(g) [LN only],
//   b = mean(g * xhat); dx = (g - (xhat * b + a)) * rstd (+ dresidual_out).
// dweight / dbias, deterministic without atomics: the rows are cut into chunks that depend only on (M, N)
//   (bwd_plan below); each row group handles one chunk and keeps fp32 partial sums of dy * xhat and dy for the
//   columns it owns in registers, written once to workspace[chunk, :]; then ln_bwd_reduce_kernel sums the chunks
//   of each column as a fixed tree (one level per 128 chunks). The looped path computes the same partials with a
//   column kernel (ln_bwd_colsum_kernel) that re-reads dy and s.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "pyattn/cuda_kernels.h"
#include "pyattn/params.h"

namespace pyattn {
namespace cuda {
namespace {

// ------------------------------------------------------------------------------------------------------------
// Element types and 16-byte vectors. Conversions go through the intrinsics only: torch's build defines
// __CUDA_NO_HALF_CONVERSIONS__ / __CUDA_NO_BFLOAT16_CONVERSIONS__ / __CUDA_NO_HALF_OPERATORS__.
// ------------------------------------------------------------------------------------------------------------
template <class T>
struct Vec;
template <>
struct Vec<float> {
  static constexpr int kN = 4;
};
template <>
struct Vec<__half> {
  static constexpr int kN = 8;
};
template <>
struct Vec<__nv_bfloat16> {
  static constexpr int kN = 8;
};

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <class T>
__device__ __forceinline__ float round_to(float v) { return to_f32(from_f32<T>(v)); }

// Two 16-bit values packed in a 32-bit word (low half first in memory) <-> fp32.
__device__ __forceinline__ void unpack2(uint32_t w, float& lo, float& hi, const __half*) {
  lo = __half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xffffu)));
  hi = __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16)));
}
__device__ __forceinline__ void unpack2(uint32_t w, float& lo, float& hi, const __nv_bfloat16*) {
  lo = __uint_as_float(w << 16);  // bf16 is the top half of an fp32: exact
  hi = __uint_as_float(w & 0xffff0000u);
}
__device__ __forceinline__ uint32_t pack2(float lo, float hi, const __half*) {
  return static_cast<uint32_t>(__half_as_ushort(__float2half_rn(lo))) |
         (static_cast<uint32_t>(__half_as_ushort(__float2half_rn(hi))) << 16);
}
__device__ __forceinline__ uint32_t pack2(float lo, float hi, const __nv_bfloat16*) {
  return static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(lo))) |
         (static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(hi))) << 16);
}

__device__ __forceinline__ void unpack16(const uint4& u, float (&v)[4], const float*) {
  v[0] = __uint_as_float(u.x);
  v[1] = __uint_as_float(u.y);
  v[2] = __uint_as_float(u.z);
  v[3] = __uint_as_float(u.w);
}
template <class H>
__device__ __forceinline__ void unpack16(const uint4& u, float (&v)[8], const H* tag) {
  unpack2(u.x, v[0], v[1], tag);
  unpack2(u.y, v[2], v[3], tag);
  unpack2(u.z, v[4], v[5], tag);
  unpack2(u.w, v[6], v[7], tag);
}
__device__ __forceinline__ uint4 pack16(const float (&v)[4], const float*) {
  return make_uint4(__float_as_uint(v[0]), __float_as_uint(v[1]), __float_as_uint(v[2]), __float_as_uint(v[3]));
}
template <class H>
__device__ __forceinline__ uint4 pack16(const float (&v)[8], const H* tag) {
  return make_uint4(pack2(v[0], v[1], tag), pack2(v[2], v[3], tag), pack2(v[4], v[5], tag), pack2(v[6], v[7], tag));
}

// Elements [j, j + V) of a row in their storage format, packed in 16 bytes (fp32: 4 floats; 16-bit types: 8 values);
// 0 for elements at or past n. One 16-byte load when `vec` and the vector is whole (`vec` guarantees 16-byte
// alignment of row + j), element loads otherwise. Kernels keep rows in this packed form in registers: 16-bit rows
// take half the registers of fp32 copies, and nothing is lost (every value kept is representable in T).
template <class T>
__device__ __forceinline__ uint4 load_raw(const T* row, int64_t j, int64_t n, bool vec) {
  constexpr int V = Vec<T>::kN;
  if (vec && j + V <= n) return *reinterpret_cast<const uint4*>(row + j);
  float v[V];
#pragma unroll
  for (int e = 0; e < V; ++e) v[e] = (j + e < n) ? to_f32(row[j + e]) : 0.f;
  return pack16(v, row);
}

template <class T>
__device__ __forceinline__ void store_raw(T* row, int64_t j, int64_t n, bool vec, const uint4& u) {
  constexpr int V = Vec<T>::kN;
  if (vec && j + V <= n) {
    *reinterpret_cast<uint4*>(row + j) = u;
  } else {
    float v[V];
    unpack16(u, v, static_cast<const T*>(row));
#pragma unroll
    for (int e = 0; e < V; ++e)
      if (j + e < n) row[j + e] = from_f32<T>(v[e]);
  }
}

// The same as fp32 values.
template <class T>
__device__ __forceinline__ void load_vec(const T* row, int64_t j, int64_t n, bool vec, float (&v)[Vec<T>::kN]) {
  unpack16(load_raw(row, j, n, vec), v, row);
}

// ------------------------------------------------------------------------------------------------------------
// Sums over a row group of TPR threads (TPR a power of two, 4..512), NV values at once. Every thread of the group
// gets the same bits: a butterfly inside the warp (lane i and lane i ^ off add the same two numbers), then the
// warps' partials summed in a fixed order from shared memory. Must be reached by every thread of the block.
// ------------------------------------------------------------------------------------------------------------
constexpr int group_sum_smem_floats(int tpr, int rpb, int nv) { return tpr > 32 ? rpb * (tpr / 32) * nv : 1; }

template <int TPR, int RPB, int NV>
__device__ __forceinline__ void group_sum(float (&v)[NV], float* smem, int group, int lane) {
  constexpr int kWidth = TPR < 32 ? TPR : 32;
#pragma unroll
  for (int off = kWidth / 2; off > 0; off >>= 1) {
#pragma unroll
    for (int i = 0; i < NV; ++i) v[i] += __shfl_xor_sync(0xffffffffu, v[i], off);
  }
  if constexpr (TPR > 32) {
    constexpr int kWarps = TPR / 32;
    float* s = smem + group * kWarps * NV;
    if (lane % 32 == 0) {
#pragma unroll
      for (int i = 0; i < NV; ++i) s[(lane / 32) * NV + i] = v[i];
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      float a = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) a += s[w * NV + i];
      v[i] = a;
    }
    __syncthreads();  // smem is reused by the next sum
  } else {
    (void)smem;
    (void)group;
    (void)lane;
  }
}

// Backward's g = dy * w, rounded: an explicit round-to-nearest multiply, which nvcc never fuses. Otherwise it makes
// dy * w - (xhat * b + a) one FMA, subtracting mean(g) of the rounded products from the exact one: rstd times their
// rounding difference where dx is 0 (N = 1: dx = rstd (g - g)).
__device__ __forceinline__ float rounded_g(float dy, float w) { return __fmul_rn(dy, w); }

// 1 / sqrt(v + eps) to fp32 precision without the division/sqrt slow-path subroutines (their calls made ptxas
// spill around them): the MUFU.RSQ estimate, then one Newton step in double (error ~ 2^-44 relative, far below
// half an fp32 ulp, so the result matches the CPU kernel's 1.0 / std::sqrt(double(v) + eps) except in rare ties).
// v + eps == 0 gives inf, inf gives 0 and NaN stays NaN, like the CPU kernel; a sum below 2^-126 (only possible
// with eps == 0) flushes to zero in the estimate and gives inf where the CPU gives a huge finite number.
__device__ __forceinline__ float rstd_of(float v, float eps) {
  const double vd = static_cast<double>(v) + static_cast<double>(eps);
  const float est = rsqrtf(static_cast<float>(vd));
  if (!(est > 0.f) || isinf(est)) return est;  // 0 (v + eps = inf), inf (0), NaN
  const double y = est;
  return static_cast<float>(y * fma(-0.5 * vd * y, y, 1.5));
}

// a / n from inv_n = 1 / n (computed on the host, IEEE): q = a * inv_n, then one FMA correction step. The result
// is the correctly rounded quotient whenever that is representable (constant rows: sum / N == the value exactly)
// and within one ulp otherwise; no slow-path subroutine (__fdiv_rn has one). An infinite sum (an inf element, or
// squares past 3.4e38) stays infinite: the correction would be inf - inf = NaN, and rstd_of(inf) must give 0.
__device__ __forceinline__ float div_n(float a, float n, float inv_n) {
  const float q = a * inv_n;
  if (isinf(q)) return q;
  return fmaf(fmaf(-q, n, a), inv_n, q);
}

// max(v, 0) that keeps NaN (like the CPU kernel's std::max(v, 0.f)); fmaxf would turn NaN into 0.
__device__ __forceinline__ float nonneg(float v) { return v < 0.f ? 0.f : v; }

// A row's statistics from its group-reduced sum (sum(s) for LN, sum(s^2) for RMS), shared by the register and the
// looped forwards. LN: m1 = sum / N, then moments(m1, q) gathers q = (sum(d), sum(d^2)) of d = s - m1 over the row
// (group-reduced), c = mean(d), var = mean(d^2) - c^2 (corrected two-pass). RMS: rstd from mean(s^2), m1 = c = 0.
template <bool RMS, class Moments>
__device__ __forceinline__ void row_stats(float sum, float fN, float inv_n, float eps, Moments moments, float& m1,
                                          float& c, float& rstd) {
  m1 = 0.f;
  c = 0.f;
  if constexpr (RMS) {
    rstd = rstd_of(div_n(sum, fN, inv_n), eps);
  } else {
    m1 = div_n(sum, fN, inv_n);
    float q[2] = {0.f, 0.f};
    moments(m1, q);
    c = div_n(q[0], fN, inv_n);
    rstd = rstd_of(nonneg(div_n(q[1], fN, inv_n) - c * c), eps);
  }
}

// ------------------------------------------------------------------------------------------------------------
// A thread's share of a row in the register kernels: VPT 16-byte vectors, vector k at elements
// j_k = (k * TPR + lane) * V (consecutive lanes read consecutive 16 bytes). Rows there have at most 8192 elements,
// so offsets inside a row are int. With VEC every whole vector is one 16-byte load and all of them are issued back
// to back before any is used: one memory round trip a row. (Each load behind its own branch on a run-time flag, as
// this file had before, kept one load in flight: a row took VPT round trips.) A vector cut by the row's end, and
// every vector without VEC, takes element loads after those. Zeros past n; n = 0 loads nothing.
// ------------------------------------------------------------------------------------------------------------
template <class T, int TPR, int VPT, bool VEC>
__device__ __forceinline__ void load_row(const T* row, int lane, int n, uint4 (&r)[VPT]) {
  constexpr int V = Vec<T>::kN;
#pragma unroll
  for (int k = 0; k < VPT; ++k) {
    const int j = (k * TPR + lane) * V;
    r[k] = make_uint4(0u, 0u, 0u, 0u);
    if (VEC && j + V <= n) r[k] = *reinterpret_cast<const uint4*>(row + j);
  }
#pragma unroll
  for (int k = 0; k < VPT; ++k) {
    const int j = (k * TPR + lane) * V;
    if (j < n && (!VEC || j + V > n)) r[k] = load_raw(row, j, n, false);
  }
}

// The same for an fp32 parameter with 16-bit rows: a vector of V = 8 columns is two float4 loads.
template <int TPR, int VPT, int V, bool VEC>
__device__ __forceinline__ void load_f32_row(const float* q, int lane, int n, float (&v)[VPT][V]) {
#pragma unroll
  for (int k = 0; k < VPT; ++k) {
#pragma unroll
    for (int h = 0; h < V; h += 4) {
      const int j = (k * TPR + lane) * V + h;
      float4 f = make_float4(0.f, 0.f, 0.f, 0.f);
      if (VEC && j + 4 <= n) f = *reinterpret_cast<const float4*>(q + j);
      v[k][h] = f.x;
      v[k][h + 1] = f.y;
      v[k][h + 2] = f.z;
      v[k][h + 3] = f.w;
    }
  }
#pragma unroll
  for (int k = 0; k < VPT; ++k) {
#pragma unroll
    for (int h = 0; h < V; h += 4) {
      const int j = (k * TPR + lane) * V + h;
      if (j < n && (!VEC || j + 4 > n)) {
#pragma unroll
        for (int e = 0; e < 4; ++e) v[k][h + e] = (j + e < n) ? q[j + e] : 0.f;
      }
    }
  }
}

// A (N,) parameter vector (weight or bias, dtype F32 or T) at this thread's columns c0 + j_k (n: the row's length),
// as fp32; `fill` when absent. The dtype is looked at once for all VPT vectors, so their loads go out together too.
template <class T, int TPR, int VPT, bool VEC>
__device__ __forceinline__ void load_param_row(const void* p, DType dt, float fill, int c0, int lane, int n,
                                               float (&v)[VPT][Vec<T>::kN]) {
  constexpr int V = Vec<T>::kN;
  if (p == nullptr) {
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
#pragma unroll
      for (int e = 0; e < V; ++e) v[k][e] = fill;
    }
  } else if (dt == DType::F32) {
    load_f32_row<TPR, VPT, V, VEC>(static_cast<const float*>(p) + c0, lane, n - c0, v);
  } else {
    uint4 raw[VPT];
    load_row<T, TPR, VPT, VEC>(static_cast<const T*>(p) + c0, lane, n - c0, raw);
#pragma unroll
    for (int k = 0; k < VPT; ++k) unpack16(raw[k], v[k], static_cast<const T*>(nullptr));
  }
}

// s = x (+ residual, the sum rounded to T) at the row piece [c0, c0 + TPR * V * K) of row `row`, packed (load_row's
// layout; n: the elements of the piece in the row, zeros past them).
template <class T, int TPR, int K, bool VEC>
__device__ __forceinline__ void load_s(const NormFwdParams& p, int64_t row, int c0, int lane, int n, uint4 (&s)[K]) {
  constexpr int V = Vec<T>::kN;
  load_row<T, TPR, K, VEC>(static_cast<const T*>(p.x) + row * p.x_row_stride + c0, lane, n, s);
  if (p.residual == nullptr) return;
  uint4 r[K];
  load_row<T, TPR, K, VEC>(static_cast<const T*>(p.residual) + row * p.residual_row_stride + c0, lane, n, r);
  const T* tag = nullptr;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    float a[V], b[V];
    unpack16(s[k], a, tag);
    unpack16(r[k], b, tag);
#pragma unroll
    for (int e = 0; e < V; ++e) a[e] += b[e];
    s[k] = pack16(a, tag);  // (0 + 0 past n)
  }
}

// Pass 1's end, on a row piece load_s gave: residual_out = s where asked (stored only with a residual), and this
// thread's part of sum(s) (RMSNorm: sum(s^2); zeros past n add nothing).
template <class T, bool RMS, int TPR, int K, bool VEC>
__device__ __forceinline__ float store_s_and_sum(const NormFwdParams& p, int64_t row, int c0, int lane, int n,
                                                 const uint4 (&s)[K]) {
  constexpr int V = Vec<T>::kN;
  if (p.residual != nullptr && p.residual_out != nullptr) {
    T* ro = static_cast<T*>(p.residual_out) + row * p.residual_out_row_stride + c0;
#pragma unroll
    for (int k = 0; k < K; ++k) store_raw(ro, (k * TPR + lane) * V, n, VEC, s[k]);
  }
  float acc = 0.f;
  const T* tag = nullptr;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    float v[V];
    unpack16(s[k], v, tag);
#pragma unroll
    for (int e = 0; e < V; ++e) acc += RMS ? v[e] * v[e] : v[e];
  }
  return acc;
}

// Adds this thread's part of sum(s - m1) and sum((s - m1)^2) over a row piece (load_s's layout; n: the elements of
// the piece in the row; padding is masked, not subtracted).
template <class T, int TPR, int K>
__device__ __forceinline__ void add_moments(const uint4 (&s)[K], float m1, int lane, int n, float (&q)[2]) {
  constexpr int V = Vec<T>::kN;
  const T* tag = nullptr;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int valid = n - (k * TPR + lane) * V;  // elements of vector k in the row (one int, not V flags)
    float v[V];
    unpack16(s[k], v, tag);
#pragma unroll
    for (int e = 0; e < V; ++e) {
      if (e < valid) {
        const float d = v[e] - m1;
        q[0] += d;
        q[1] += d * d;
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------------------
// Forward, row in registers. Weight and bias are loaded (L1 / L2 hits after the first rows) when the statistics
// are known: kept in registers across the row's sums they would cost occupancy.
// ------------------------------------------------------------------------------------------------------------
// 768 threads an SM at least (85 registers a thread): with one row's loads in flight per thread, the bytes in flight
// per SM follow from the threads it holds. Left free, ptxas took about 72-105 registers (2 blocks of 256 threads);
// 1024 threads (64 registers) spill.
constexpr int kFwdMinThreadsPerSm = 768;

template <class T, bool RMS, int TPR, int RPB, int EPT, bool VEC>
__global__ void __launch_bounds__(TPR * RPB, kFwdMinThreadsPerSm / (TPR * RPB))
    ln_fwd_kernel(const NormFwdParams p, const float inv_n) {
  constexpr int V = Vec<T>::kN;
  constexpr int VPT = EPT / V;
  static_assert(EPT % V == 0 && VPT >= 1, "EPT must be a multiple of the vector width");
  __shared__ float smem[group_sum_smem_floats(TPR, RPB, 2)];

  const int lane = static_cast<int>(threadIdx.x) % TPR;
  const int group = static_cast<int>(threadIdx.x) / TPR;
  const int64_t M = p.M;
  const int N = static_cast<int>(p.N);  // <= TPR * EPT (fwd_dispatch)
  const float fN = static_cast<float>(N);
  const T* tag = nullptr;

  // The loop bound is uniform over the block (every thread reaches every group_sum); a row group past M loads and
  // stores nothing (n = 0) but joins the sums.
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * RPB; base < M;
       base += static_cast<int64_t>(gridDim.x) * RPB) {
    const int64_t row = base + group;
    const int n = row < M ? N : 0;
    uint4 sr[VPT];  // the row's s, packed in T (see load_raw)
    load_s<T, TPR, VPT, VEC>(p, row, 0, lane, n, sr);
    float acc[1] = {store_s_and_sum<T, RMS, TPR, VPT, VEC>(p, row, 0, lane, n, sr)};
    group_sum<TPR, RPB, 1>(acc, smem, group, lane);

    float m1, c, rstd;
    row_stats<RMS>(acc[0], fN, inv_n, p.eps, [&](float mean1, float (&q)[2]) {
      add_moments<T, TPR, VPT>(sr, mean1, lane, n, q);
      group_sum<TPR, RPB, 2>(q, smem, group, lane);
    }, m1, c, rstd);
    if (n > 0 && lane == 0) {
      if (!RMS && p.mean != nullptr) p.mean[row] = m1 + c;
      if (p.rstd != nullptr) p.rstd[row] = rstd;
    }
    const float ncr = -c * rstd;
    T* yr = static_cast<T*>(p.y) + row * p.y_row_stride;
    constexpr int G = VPT >= 2 ? VPT / 2 : 1;  // vectors a step: weight and bias for G vectors in registers at once
#pragma unroll
    for (int k0 = 0; k0 < VPT; k0 += G) {
      const int c0 = k0 * TPR * V;
      float w[G][V], b[G][V];
      load_param_row<T, TPR, G, VEC>(p.weight, p.weight_dtype, 1.f, c0, lane, n, w);
      if constexpr (!RMS) load_param_row<T, TPR, G, VEC>(p.bias, p.bias_dtype, 0.f, c0, lane, n, b);
#pragma unroll
      for (int kk = 0; kk < G; ++kk) {
        const int k = k0 + kk;
        float v[V], out[V];
        unpack16(sr[k], v, tag);
#pragma unroll
        for (int e = 0; e < V; ++e) {
          if constexpr (RMS) {
            out[e] = v[e] * rstd * w[kk][e];
          } else {
            out[e] = fmaf(fmaf(v[e] - m1, rstd, ncr), w[kk][e], b[kk][e]);
          }
        }
        store_raw(yr, (k * TPR + lane) * V, n, VEC, pack16(out, tag));
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------------------
// Forward, looped: one block of TPR threads per row, the row re-read in each pass (any N; the launcher takes it
// for N > 8192 only). Each pass walks the row in pieces of kLoopVecs vectors a thread, loaded together
// (load_row at an offset): kLoopVecs memory round trips in flight instead of one.
// ------------------------------------------------------------------------------------------------------------
constexpr int kLoopVecs = 4;
// Blocks of the looped kernels an SM is asked to hold (at 256 threads: <= 128 registers). Without it ptxas chose
// 64 registers and spilled for the fp16 RMSNorm forward.
constexpr int kLoopedBlocksPerSm = 2;

// s for the piece of row `row` at elements [c0, c0 + TPR * V * kLoopVecs): residual_out when it was stored (by this
// same thread, in pass 1), else x (+ residual, rounded to T).
template <class T, int TPR, bool VEC>
__device__ __forceinline__ void fwd_load_s(const NormFwdParams& p, int64_t row, int c0, int lane, int n,
                                           uint4 (&sr)[kLoopVecs]) {
  if (p.residual != nullptr && p.residual_out != nullptr) {
    load_row<T, TPR, kLoopVecs, VEC>(static_cast<const T*>(p.residual_out) + row * p.residual_out_row_stride + c0,
                                     lane, n, sr);
  } else {
    load_s<T, TPR, kLoopVecs, VEC>(p, row, c0, lane, n, sr);
  }
}

// VEC: 16-byte accesses (a template parameter: one code path, no run-time branch between the loads).
template <class T, bool RMS, int TPR, bool VEC>
__global__ void __launch_bounds__(TPR, kLoopedBlocksPerSm) ln_fwd_looped_kernel(const NormFwdParams p, const float inv_n) {
  constexpr int V = Vec<T>::kN;
  constexpr int kPiece = TPR * V * kLoopVecs;  // elements a pass handles at a time
  __shared__ float smem[group_sum_smem_floats(TPR, 1, 2)];
  const int lane = static_cast<int>(threadIdx.x);
  const int N = static_cast<int>(p.N);  // < 2^31 (layer_norm_fwd / _bwd refuse longer rows)
  const float fN = static_cast<float>(N);
  const T* tag = nullptr;

  // One row per block: the launcher never needs more than 2^31 - 1 blocks here (N > 8192 and M >= 2^31 would be
  // more than 2^44 elements). (A grid-stride loop over rows made ptxas spill two loop-invariant registers.)
  const int64_t row = blockIdx.x;
  float acc[1] = {0.f};
  for (int c0 = 0; c0 < N; c0 += kPiece) {
    uint4 sr[kLoopVecs];
    load_s<T, TPR, kLoopVecs, VEC>(p, row, c0, lane, N - c0, sr);
    acc[0] += store_s_and_sum<T, RMS, TPR, kLoopVecs, VEC>(p, row, c0, lane, N - c0, sr);
  }
  group_sum<TPR, 1, 1>(acc, smem, 0, lane);

  float m1, c, rstd;
  row_stats<RMS>(acc[0], fN, inv_n, p.eps, [&](float mean1, float (&q)[2]) {
    for (int c0 = 0; c0 < N; c0 += kPiece) {
      uint4 sr[kLoopVecs];
      fwd_load_s<T, TPR, VEC>(p, row, c0, lane, N - c0, sr);
      add_moments<T, TPR, kLoopVecs>(sr, mean1, lane, N - c0, q);
    }
    group_sum<TPR, 1, 2>(q, smem, 0, lane);
  }, m1, c, rstd);
  if (lane == 0) {
    if (!RMS && p.mean != nullptr) p.mean[row] = m1 + c;
    if (p.rstd != nullptr) p.rstd[row] = rstd;
  }
  const float ncr = -c * rstd;
  T* yr = static_cast<T*>(p.y) + row * p.y_row_stride;
  for (int c0 = 0; c0 < N; c0 += kPiece) {
    uint4 sr[kLoopVecs];
    fwd_load_s<T, TPR, VEC>(p, row, c0, lane, N - c0, sr);
    float w[kLoopVecs][V], b[kLoopVecs][V];
    load_param_row<T, TPR, kLoopVecs, VEC>(p.weight, p.weight_dtype, 1.f, c0, lane, N, w);
    if constexpr (!RMS) load_param_row<T, TPR, kLoopVecs, VEC>(p.bias, p.bias_dtype, 0.f, c0, lane, N, b);
#pragma unroll
    for (int k = 0; k < kLoopVecs; ++k) {
      float v[V], out[V];
      unpack16(sr[k], v, tag);
#pragma unroll
      for (int e = 0; e < V; ++e) {
        if constexpr (RMS) {
          out[e] = v[e] * rstd * w[k][e];
        } else {
          out[e] = fmaf(fmaf(v[e] - m1, rstd, ncr), w[k][e], b[k][e]);
        }
      }
      store_raw(yr + c0, (k * TPR + lane) * V, N - c0, VEC, pack16(out, tag));
    }
  }
}

// ------------------------------------------------------------------------------------------------------------
// Backward, row in registers. Row group `chunk` handles rows [chunk * rows_per_chunk, ... + rows_per_chunk) and,
// when dw_part != nullptr, writes its partial sums to dw_part / db_part [chunk, :]. A row's s, dy and weight loads
// go out together (the weight: L1 / L2 hits after the first rows), and so do its dresidual_out loads after the sums.
// Pass 1 turns dy into g = dy * w, all that pass 2 needs of either: the weight is dead after pass 1.
// ------------------------------------------------------------------------------------------------------------
template <class T, bool RMS, int TPR, int RPB, int EPT, bool VEC>
__global__ void __launch_bounds__(TPR * RPB)
    ln_bwd_kernel(const NormBwdParams p, const float inv_n, const int64_t rows_per_chunk, const int64_t nchunks,
                  float* __restrict__ dw_part, float* __restrict__ db_part) {
  constexpr int V = Vec<T>::kN;
  constexpr int VPT = EPT / V;
  static_assert(EPT % V == 0 && VPT >= 1, "EPT must be a multiple of the vector width");
  __shared__ float smem[group_sum_smem_floats(TPR, RPB, 2)];

  const int lane = static_cast<int>(threadIdx.x) % TPR;
  const int group = static_cast<int>(threadIdx.x) / TPR;
  const int64_t M = p.M;
  const int N = static_cast<int>(p.N);  // <= TPR * EPT (bwd_plan)
  const int64_t chunk = static_cast<int64_t>(blockIdx.x) * RPB + group;
  const bool chunk_ok = chunk < nchunks;
  const bool partial = dw_part != nullptr;
  const bool has_dres = p.dresidual_out != nullptr;
  const int64_t block_first_row = static_cast<int64_t>(blockIdx.x) * RPB * rows_per_chunk;
  const T* tag = nullptr;

  float dwp[VPT][V], dbp[VPT][V];
#pragma unroll
  for (int k = 0; k < VPT; ++k) {
#pragma unroll
    for (int e = 0; e < V; ++e) dwp[k][e] = dbp[k][e] = 0.f;
  }

  for (int64_t i = 0; i < rows_per_chunk; ++i) {
    if (block_first_row + i >= M) break;  // uniform over the block: no row group of this block has row i left
    const int64_t row = chunk * rows_per_chunk + i;
    const int n = chunk_ok && row < M ? N : 0;
    const float mean = (n > 0 && !RMS) ? p.mean[row] : 0.f;
    const float rstd = n > 0 ? p.rstd[row] : 0.f;
    uint4 sr[VPT], dyr[VPT];  // the row's s and dy, packed in T (see load_raw)
    load_row<T, TPR, VPT, VEC>(static_cast<const T*>(p.s) + row * p.s_row_stride, lane, n, sr);
    load_row<T, TPR, VPT, VEC>(static_cast<const T*>(p.dy) + row * p.dy_row_stride, lane, n, dyr);
    float g[VPT][V];  // the weight, then g = dy * w
    load_param_row<T, TPR, VPT, VEC>(p.weight, p.weight_dtype, 1.f, 0, lane, n, g);
    float sums[2] = {0.f, 0.f};
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int valid = n - (k * TPR + lane) * V;  // elements of vector k in the row (e < valid: fewer live flags)
      float sv[V], dy[V];
      unpack16(sr[k], sv, tag);
      unpack16(dyr[k], dy, tag);
#pragma unroll
      for (int e = 0; e < V; ++e) {
        g[k][e] = rounded_g(dy[e], g[k][e]);
        if (e < valid) {  // masked: xhat of a padding element may be inf when rstd is
          const float xh = RMS ? sv[e] * rstd : (sv[e] - mean) * rstd;
          if (!RMS) sums[0] += g[k][e];
          sums[1] += g[k][e] * xh;
          if (partial) {
            dwp[k][e] += dy[e] * xh;
            if (!RMS) dbp[k][e] += dy[e];
          }
        }
      }
    }
    group_sum<TPR, RPB, 2>(sums, smem, group, lane);
    const float a = RMS ? 0.f : sums[0] * inv_n;
    const float b = sums[1] * inv_n;
    uint4 drr[VPT];  // dresidual_out, packed; zeros without it
    const T* dres = static_cast<const T*>(p.dresidual_out);
    load_row<T, TPR, VPT, VEC>(has_dres ? dres + row * p.dresidual_out_row_stride : dres, lane, has_dres ? n : 0, drr);
    T* dxr = static_cast<T*>(p.dx) + row * p.dx_row_stride;
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      float sv[V], dr[V], dx[V];
      unpack16(sr[k], sv, tag);
      unpack16(drr[k], dr, tag);  // zeros without dresidual_out
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const float xh = RMS ? sv[e] * rstd : (sv[e] - mean) * rstd;
        dx[e] = (g[k][e] - fmaf(xh, b, a)) * rstd + dr[e];
      }
      store_raw(dxr, (k * TPR + lane) * V, n, VEC, pack16(dx, tag));
    }
  }

  if (partial && chunk_ok) {
    float* dwr = dw_part + chunk * N;
    float* dbr = db_part + chunk * N;
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int j = (k * TPR + lane) * V;
#pragma unroll
      for (int e = 0; e < V; ++e) {
        if (j + e < N) {
          dwr[j + e] = dwp[k][e];
          dbr[j + e] = dbp[k][e];
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------------------
// Backward, looped: dx only, one block of TPR threads per row (any N; taken for N > 8192), both passes in pieces of
// kLoopVecs vectors a thread loaded together (see ln_fwd_looped_kernel). dweight/dbias: ln_bwd_colsum_kernel.
// ------------------------------------------------------------------------------------------------------------
template <class T, bool RMS, int TPR, bool VEC>
__global__ void __launch_bounds__(TPR, kLoopedBlocksPerSm) ln_bwd_looped_kernel(const NormBwdParams p, const float inv_n) {
  constexpr int V = Vec<T>::kN;
  constexpr int kPiece = TPR * V * kLoopVecs;
  __shared__ float smem[group_sum_smem_floats(TPR, 1, 2)];
  const int lane = static_cast<int>(threadIdx.x);
  const int N = static_cast<int>(p.N);  // < 2^31 (layer_norm_fwd / _bwd refuse longer rows)
  const T* tag = nullptr;

  // One row per block: the launcher never needs more than 2^31 - 1 blocks here (N > 8192 and M >= 2^31 would be
  // more than 2^44 elements). (A grid-stride loop over rows made ptxas spill two loop-invariant registers.)
  const int64_t row = blockIdx.x;
  const float mean = RMS ? 0.f : p.mean[row];
  const float rstd = p.rstd[row];
  const T* s_row = static_cast<const T*>(p.s) + row * p.s_row_stride;
  const T* dy_row = static_cast<const T*>(p.dy) + row * p.dy_row_stride;
  float sums[2] = {0.f, 0.f};
  for (int c0 = 0; c0 < N; c0 += kPiece) {
    uint4 sr[kLoopVecs], dyr[kLoopVecs];
    float w[kLoopVecs][V];
    load_row<T, TPR, kLoopVecs, VEC>(s_row + c0, lane, N - c0, sr);
    load_row<T, TPR, kLoopVecs, VEC>(dy_row + c0, lane, N - c0, dyr);
    load_param_row<T, TPR, kLoopVecs, VEC>(p.weight, p.weight_dtype, 1.f, c0, lane, N, w);
#pragma unroll
    for (int k = 0; k < kLoopVecs; ++k) {
      const int valid = N - c0 - (k * TPR + lane) * V;
      float sv[V], dy[V];
      unpack16(sr[k], sv, tag);
      unpack16(dyr[k], dy, tag);
#pragma unroll
      for (int e = 0; e < V; ++e) {
        if (e < valid) {
          const float xh = RMS ? sv[e] * rstd : (sv[e] - mean) * rstd;
          const float g = rounded_g(dy[e], w[k][e]);
          if (!RMS) sums[0] += g;
          sums[1] += g * xh;
        }
      }
    }
  }
  group_sum<TPR, 1, 2>(sums, smem, 0, lane);
  const float a = RMS ? 0.f : sums[0] * inv_n;
  const float b = sums[1] * inv_n;
  const bool has_dres = p.dresidual_out != nullptr;
  const T* dres = static_cast<const T*>(p.dresidual_out);
  const T* dres_row = has_dres ? dres + row * p.dresidual_out_row_stride : dres;
  T* dx_row = static_cast<T*>(p.dx) + row * p.dx_row_stride;
  for (int c0 = 0; c0 < N; c0 += kPiece) {
    uint4 sr[kLoopVecs], dyr[kLoopVecs], drr[kLoopVecs];
    float w[kLoopVecs][V];
    load_row<T, TPR, kLoopVecs, VEC>(s_row + c0, lane, N - c0, sr);
    load_row<T, TPR, kLoopVecs, VEC>(dy_row + c0, lane, N - c0, dyr);
    load_row<T, TPR, kLoopVecs, VEC>(has_dres ? dres_row + c0 : dres_row, lane, has_dres ? N - c0 : 0, drr);
    load_param_row<T, TPR, kLoopVecs, VEC>(p.weight, p.weight_dtype, 1.f, c0, lane, N, w);
#pragma unroll
    for (int k = 0; k < kLoopVecs; ++k) {
      float sv[V], dy[V], dr[V], dx[V];
      unpack16(sr[k], sv, tag);
      unpack16(dyr[k], dy, tag);
      unpack16(drr[k], dr, tag);  // zeros without dresidual_out
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const float xh = RMS ? sv[e] * rstd : (sv[e] - mean) * rstd;
        dx[e] = (rounded_g(dy[e], w[k][e]) - fmaf(xh, b, a)) * rstd + dr[e];
      }
      store_raw(dx_row + c0, (k * TPR + lane) * V, N - c0, VEC, pack16(dx, tag));
    }
  }
}

// Partial column sums of dy * xhat and dy over the rows of chunk blockIdx.y, for the vectors of columns
// cv = blockIdx.x * 32 + threadIdx.x; the 8 thread rows (threadIdx.y) take every 8th row of the chunk and are summed
// in a fixed order. Writes dw_part / db_part [chunk, :].
constexpr int kColX = 32, kColY = 8;

template <class T, bool RMS>
__global__ void __launch_bounds__(kColX * kColY)
    ln_bwd_colsum_kernel(const NormBwdParams p, const bool vec, const int64_t rows_per_chunk,
                         float* __restrict__ dw_part, float* __restrict__ db_part) {
  constexpr int V = Vec<T>::kN;
  __shared__ float sdw[kColY][kColX * V + 1];
  __shared__ float sdb[kColY][kColX * V + 1];
  const int tx = static_cast<int>(threadIdx.x), ty = static_cast<int>(threadIdx.y);
  const int64_t M = p.M, N = p.N;
  const int64_t chunk = blockIdx.y;
  const int64_t j = (static_cast<int64_t>(blockIdx.x) * kColX + tx) * V;
  const int64_t r0 = chunk * rows_per_chunk;
  const int64_t r1 = r0 + rows_per_chunk < M ? r0 + rows_per_chunk : M;
  float dw[V], db[V];
#pragma unroll
  for (int e = 0; e < V; ++e) dw[e] = db[e] = 0.f;
  if (j < N) {
    for (int64_t row = r0 + ty; row < r1; row += kColY) {
      const float mean = RMS ? 0.f : p.mean[row];
      const float rstd = p.rstd[row];
      float sv[V], dy[V];
      load_vec(static_cast<const T*>(p.s) + row * p.s_row_stride, j, N, vec, sv);
      load_vec(static_cast<const T*>(p.dy) + row * p.dy_row_stride, j, N, vec, dy);
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const float xh = RMS ? sv[e] * rstd : (sv[e] - mean) * rstd;
        dw[e] += dy[e] * xh;
        db[e] += dy[e];
      }
    }
  }
#pragma unroll
  for (int e = 0; e < V; ++e) {
    sdw[ty][tx * V + e] = dw[e];
    sdb[ty][tx * V + e] = db[e];
  }
  __syncthreads();
  // Thread (tx, ty) finishes columns c = ty * kColX + tx, ty * kColX + tx + kColX * kColY, ... of the block's
  // kColX * V columns: a fixed-order sum over the 8 thread rows.
  for (int c = ty * kColX + tx; c < kColX * V; c += kColX * kColY) {
    const int64_t col = static_cast<int64_t>(blockIdx.x) * kColX * V + c;
    if (col < N) {
      float a = 0.f, b = 0.f;
#pragma unroll
      for (int y = 0; y < kColY; ++y) {
        a += sdw[y][c];
        b += sdb[y][c];
      }
      dw_part[chunk * N + col] = a;
      db_part[chunk * N + col] = b;
    }
  }
}

// dweight / dbias = the sum over chunks of the partials, as a fixed tree (the same for a given number of chunks, so
// bitwise reproducible) whose levels are launches of ln_bwd_reduce_kernel: block (blockIdx.x: 32 columns,
// blockIdx.y: a group of kReduceGroup consecutive rows k of the level, blockIdx.z: 0 dweight / 1 dbias). Row k of a
// level is row k * stride of the workspace. Thread row ty sums rows k0 + ty, k0 + ty + 8, ... of its group in order,
// then thread row 0 sums the 8 results in order and writes the total either to the output (the last level, a single
// group) or back into the group's first row k0 * stride, which only this block reads, and only before the barrier:
// the next level reads rows 0, kReduceGroup, 2 kReduceGroup, ... of this one. Every thread does at most 16 loads.
// No rows (M == 0) writes zeros.
constexpr int kReduceGroup = 128;

__device__ __forceinline__ void store_as(void* out, DType dt, int64_t j, float v) {
  switch (dt) {
    case DType::F32: static_cast<float*>(out)[j] = v; break;
    case DType::F16: static_cast<__half*>(out)[j] = __float2half_rn(v); break;
    case DType::BF16: static_cast<__nv_bfloat16*>(out)[j] = __float2bfloat16_rn(v); break;
  }
}

__global__ void __launch_bounds__(kColX * kColY)
    ln_bwd_reduce_kernel(float* dw_part, float* db_part, const int64_t count, const int64_t stride, const int64_t N,
                         const bool last, void* dweight, const DType dweight_dtype, void* dbias,
                         const DType dbias_dtype) {
  __shared__ float sm[kColY][kColX + 1];
  const bool is_db = blockIdx.z == 1;
  void* out = is_db ? dbias : dweight;
  if (out == nullptr) return;  // uniform over the block
  float* part = is_db ? db_part : dw_part;
  const int tx = static_cast<int>(threadIdx.x), ty = static_cast<int>(threadIdx.y);
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kColX + tx;
  const int64_t k0 = static_cast<int64_t>(blockIdx.y) * kReduceGroup;
  const int64_t k1 = k0 + kReduceGroup < count ? k0 + kReduceGroup : count;
  float acc = 0.f;
  if (j < N) {
#pragma unroll 4
    for (int64_t k = k0 + ty; k < k1; k += kColY) acc += part[k * stride * N + j];
  }
  sm[ty][tx] = acc;
  __syncthreads();
  if (ty == 0 && j < N) {
    float total = 0.f;
#pragma unroll
    for (int y = 0; y < kColY; ++y) total += sm[y][tx];
    if (last) {
      store_as(out, is_db ? dbias_dtype : dweight_dtype, j, total);
    } else {
      part[k0 * stride * N + j] = total;
    }
  }
}

// ------------------------------------------------------------------------------------------------------------
// Host side: configurations, plans, launches.
// ------------------------------------------------------------------------------------------------------------
constexpr int kLoopedThreads = 256;  // 4 vectors a thread in flight (kLoopVecs) at up to ~128 registers: 2 blocks an SM
constexpr int64_t kMaxGrid = 0x7fffffff;

// Forward configurations (TPR, RPB, EPT), smallest capacity TPR * EPT first; N above the last: looped kernel.
struct Cfg {
  int tpr, rpb, ept;
};
// At most 16 elements a thread: each row's loads are in flight together, so their registers are held at once
// (forward: the row, then weight and bias as fp32; backward: s and dy packed, the weight and two fp32 partial sums
// all along). Rows above 8192 elements take the looped kernels.
constexpr Cfg kFwdCfgs[] = {{8, 16, 8},   {32, 4, 8},   {32, 4, 16},  {64, 2, 16},
                            {128, 1, 16}, {256, 1, 16}, {512, 1, 16}};
constexpr Cfg kBwdCfgs[] = {{8, 16, 8},   {32, 4, 8},   {32, 4, 16},  {64, 2, 16},
                            {128, 1, 16}, {256, 1, 16}, {512, 1, 16}};
constexpr int kNumFwdCfgs = sizeof(kFwdCfgs) / sizeof(Cfg);
constexpr int kNumBwdCfgs = sizeof(kBwdCfgs) / sizeof(Cfg);

// The first of cfgs[0 .. count) that holds N elements; -1: none (looped kernel).
int pick_cfg(const Cfg* cfgs, int count, int64_t N) {
  for (int i = 0; i < count; ++i)
    if (N <= static_cast<int64_t>(cfgs[i].tpr) * cfgs[i].ept) return i;
  return -1;
}

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline float host_inv_n(int64_t n) { return 1.0f / static_cast<float>(n); }  // host: IEEE division
inline bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }
// 16-byte vector access is valid for every row of a tensor: base aligned, row stride a multiple of V elements.
inline bool rows_vec_ok(const void* ptr, int64_t row_stride, int64_t M, int V) {
  return ptr == nullptr || (aligned16(ptr) && (M <= 1 || row_stride % V == 0));
}

// The partition of rows into chunks for dweight/dbias: depends only on (M, N) and whether partial sums are needed,
// so results are bitwise reproducible for a shape on any GPU. A row group takes its chunk's rows one after another,
// so a chunk costs about rows x one row's latency, while each chunk adds 2 N floats of partial sums written and read
// back: many short chunks while the row groups still fit on the GPU at once, longer ones past that. The H200 (run 1,
// kMinChunkRows 16, kTargetWarps 4096) timed the bf16 backward at M = 4096 slower for N = 1024 (0.107 ms, 256 chunks
// of 16 rows) than for N = 4096 (0.079 ms, also 256 of 16): the 16-row chains set both. Now N = 1024 takes 1024
// chunks of 4 rows (64-thread row groups, 8 an SM at ~120 registers: all resident on 132 SMs), N = 4096
// still 256 of 16 (256-thread groups, 2 an SM). Chosen from that model, not yet timed.
constexpr int64_t kMinChunkRows = 4;         // rows per chunk at least (bounds the partial-sum traffic)
constexpr int64_t kTargetWarps = 2048;       // row groups in flight, counted in warps (~16 an SM on 132 SMs)
constexpr int64_t kMaxColsumChunks = 1024;   // chunks of the looped path's column kernel
constexpr int64_t kMaxWorkspaceFloats = int64_t(1) << 24;  // 64 MiB of partial sums at most

struct BwdPlan {
  int cfg = -1;  // index into kBwdCfgs; -1: looped
  bool partial = false;
  int64_t rows_per_chunk = 1;
  int64_t nchunks = 0;
};

BwdPlan bwd_plan(const NormBwdParams& p) {
  BwdPlan pl;
  const int64_t M = p.M, N = p.N;
  pl.cfg = pick_cfg(kBwdCfgs, kNumBwdCfgs, N);
  pl.partial = p.dweight != nullptr || (!p.rms && p.dbias != nullptr);
  if (M <= 0) return pl;
  int64_t max_chunks;
  if (pl.cfg >= 0) {
    const int tpr = kBwdCfgs[pl.cfg].tpr;
    max_chunks = kTargetWarps * 32 / tpr;
  } else {
    max_chunks = kMaxColsumChunks;
  }
  if (pl.partial) {
    const int64_t ws_chunks = kMaxWorkspaceFloats / (2 * N);
    max_chunks = max_chunks < ws_chunks ? max_chunks : ws_chunks;
    if (max_chunks < 1) max_chunks = 1;
  }
  const int64_t min_rows = pl.partial ? kMinChunkRows : 1;
  const int64_t want = cdiv(M, max_chunks);
  pl.rows_per_chunk = want > min_rows ? want : min_rows;
  pl.nchunks = cdiv(M, pl.rows_per_chunk);
  return pl;
}

#define PYATTN_RETURN_IF_LAUNCH_ERROR()              \
  do {                                               \
    const cudaError_t err_ = cudaGetLastError();     \
    if (err_ != cudaSuccess) return err_;            \
  } while (0)

template <class T, bool RMS, int TPR, int RPB, int EPT>
cudaError_t launch_fwd(const NormFwdParams& p, bool vec, cudaStream_t stream) {
  const int64_t rows = cdiv(p.M, RPB);
  const unsigned blocks = static_cast<unsigned>(rows < kMaxGrid ? rows : kMaxGrid);
  if (vec) {
    ln_fwd_kernel<T, RMS, TPR, RPB, EPT, true><<<blocks, TPR * RPB, 0, stream>>>(p, host_inv_n(p.N));
  } else {
    ln_fwd_kernel<T, RMS, TPR, RPB, EPT, false><<<blocks, TPR * RPB, 0, stream>>>(p, host_inv_n(p.N));
  }
  PYATTN_RETURN_IF_LAUNCH_ERROR();
  return cudaSuccess;
}

template <class T, bool RMS>
cudaError_t fwd_dispatch(const NormFwdParams& p, cudaStream_t stream) {
  constexpr int V = Vec<T>::kN;
  const bool vec = rows_vec_ok(p.x, p.x_row_stride, p.M, V) && rows_vec_ok(p.residual, p.residual_row_stride, p.M, V) &&
                   rows_vec_ok(p.y, p.y_row_stride, p.M, V) &&
                   rows_vec_ok(p.residual_out, p.residual_out_row_stride, p.M, V) &&
                   (p.weight == nullptr || aligned16(p.weight)) && (p.bias == nullptr || aligned16(p.bias));
  switch (pick_cfg(kFwdCfgs, kNumFwdCfgs, p.N)) {
#define PYATTN_FWD_CASE(i) \
  case i: return launch_fwd<T, RMS, kFwdCfgs[i].tpr, kFwdCfgs[i].rpb, kFwdCfgs[i].ept>(p, vec, stream);
    PYATTN_FWD_CASE(0)
    PYATTN_FWD_CASE(1)
    PYATTN_FWD_CASE(2)
    PYATTN_FWD_CASE(3)
    PYATTN_FWD_CASE(4)
    PYATTN_FWD_CASE(5)
    PYATTN_FWD_CASE(6)
#undef PYATTN_FWD_CASE
    default: {
      if (p.M > kMaxGrid) return cudaErrorInvalidValue;  // one block per row (see the kernel)
      const unsigned blocks = static_cast<unsigned>(p.M);
      if (vec) {
        ln_fwd_looped_kernel<T, RMS, kLoopedThreads, true><<<blocks, kLoopedThreads, 0, stream>>>(p, host_inv_n(p.N));
      } else {
        ln_fwd_looped_kernel<T, RMS, kLoopedThreads, false><<<blocks, kLoopedThreads, 0, stream>>>(p, host_inv_n(p.N));
      }
      PYATTN_RETURN_IF_LAUNCH_ERROR();
      return cudaSuccess;
    }
  }
}
static_assert(kNumFwdCfgs == 7, "the cases of fwd_dispatch must cover kFwdCfgs");

template <class T, bool RMS, int TPR, int RPB, int EPT>
cudaError_t launch_bwd(const NormBwdParams& p, const BwdPlan& pl, bool vec, float* dw_part, float* db_part,
                       cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>(cdiv(pl.nchunks, RPB));  // <= kTargetWarps * 32 / TPR / RPB: small
  if (vec) {
    ln_bwd_kernel<T, RMS, TPR, RPB, EPT, true><<<blocks, TPR * RPB, 0, stream>>>(
        p, host_inv_n(p.N), pl.rows_per_chunk, pl.nchunks, dw_part, db_part);
  } else {
    ln_bwd_kernel<T, RMS, TPR, RPB, EPT, false><<<blocks, TPR * RPB, 0, stream>>>(
        p, host_inv_n(p.N), pl.rows_per_chunk, pl.nchunks, dw_part, db_part);
  }
  PYATTN_RETURN_IF_LAUNCH_ERROR();
  return cudaSuccess;
}

template <class T, bool RMS>
cudaError_t bwd_dispatch(const NormBwdParams& p, cudaStream_t stream) {
  constexpr int V = Vec<T>::kN;
  const BwdPlan pl = bwd_plan(p);
  float* dw_part = nullptr;
  float* db_part = nullptr;
  if (pl.partial && pl.nchunks > 0) {
    if (p.workspace == nullptr) return cudaErrorInvalidValue;  // the bindings allocate it
    dw_part = p.workspace;
    db_part = p.workspace + pl.nchunks * p.N;
  }
  if (p.M > 0) {
    const bool vec = rows_vec_ok(p.dy, p.dy_row_stride, p.M, V) && rows_vec_ok(p.s, p.s_row_stride, p.M, V) &&
                     rows_vec_ok(p.dresidual_out, p.dresidual_out_row_stride, p.M, V) &&
                     rows_vec_ok(p.dx, p.dx_row_stride, p.M, V) && (p.weight == nullptr || aligned16(p.weight));
    cudaError_t err = cudaSuccess;
    switch (pl.cfg) {
#define PYATTN_BWD_CASE(i)                                                                                    \
  case i:                                                                                                     \
    err = launch_bwd<T, RMS, kBwdCfgs[i].tpr, kBwdCfgs[i].rpb, kBwdCfgs[i].ept>(p, pl, vec, dw_part, db_part, \
                                                                                 stream);                     \
    break;
      PYATTN_BWD_CASE(0)
      PYATTN_BWD_CASE(1)
      PYATTN_BWD_CASE(2)
      PYATTN_BWD_CASE(3)
      PYATTN_BWD_CASE(4)
      PYATTN_BWD_CASE(5)
      PYATTN_BWD_CASE(6)
#undef PYATTN_BWD_CASE
      default: {
        if (p.M > kMaxGrid) return cudaErrorInvalidValue;  // one block per row (see the kernel)
        const unsigned blocks = static_cast<unsigned>(p.M);
        if (vec) {
          ln_bwd_looped_kernel<T, RMS, kLoopedThreads, true><<<blocks, kLoopedThreads, 0, stream>>>(p, host_inv_n(p.N));
        } else {
          ln_bwd_looped_kernel<T, RMS, kLoopedThreads, false><<<blocks, kLoopedThreads, 0, stream>>>(p, host_inv_n(p.N));
        }
        PYATTN_RETURN_IF_LAUNCH_ERROR();
        if (pl.partial) {
          const dim3 grid(static_cast<unsigned>(cdiv(p.N, int64_t(kColX) * V)), static_cast<unsigned>(pl.nchunks));
          ln_bwd_colsum_kernel<T, RMS>
              <<<grid, dim3(kColX, kColY), 0, stream>>>(p, vec, pl.rows_per_chunk, dw_part, db_part);
          PYATTN_RETURN_IF_LAUNCH_ERROR();
        }
      }
    }
    if (err != cudaSuccess) return err;
  }
  if (pl.partial) {  // the fixed reduction tree over chunks (see ln_bwd_reduce_kernel)
    void* dbias = p.rms ? nullptr : p.dbias;
    const unsigned col_blocks = static_cast<unsigned>(cdiv(p.N, kColX));
    int64_t count = pl.nchunks, stride = 1;
    while (count > kReduceGroup) {
      const dim3 grid(col_blocks, static_cast<unsigned>(cdiv(count, kReduceGroup)), 2);
      ln_bwd_reduce_kernel<<<grid, dim3(kColX, kColY), 0, stream>>>(
          dw_part, db_part, count, stride, p.N, false, p.dweight, p.dweight_dtype, dbias, p.dbias_dtype);
      PYATTN_RETURN_IF_LAUNCH_ERROR();
      stride *= kReduceGroup;
      count = cdiv(count, kReduceGroup);
    }
    ln_bwd_reduce_kernel<<<dim3(col_blocks, 1, 2), dim3(kColX, kColY), 0, stream>>>(
        dw_part, db_part, count, stride, p.N, true, p.dweight, p.dweight_dtype, dbias, p.dbias_dtype);
    PYATTN_RETURN_IF_LAUNCH_ERROR();
  }
  return cudaSuccess;
}
static_assert(kNumBwdCfgs == 7, "the cases of bwd_dispatch must cover kBwdCfgs");

template <class T>
cudaError_t fwd_rms(const NormFwdParams& p, cudaStream_t stream) {
  return p.rms ? fwd_dispatch<T, true>(p, stream) : fwd_dispatch<T, false>(p, stream);
}
template <class T>
cudaError_t bwd_rms(const NormBwdParams& p, cudaStream_t stream) {
  return p.rms ? bwd_dispatch<T, true>(p, stream) : bwd_dispatch<T, false>(p, stream);
}

}  // namespace

cudaError_t layer_norm_fwd(const NormFwdParams& p, cudaStream_t stream) {
  if (p.M <= 0) return cudaSuccess;
  if (p.N <= 0 || p.N > INT32_MAX) return cudaErrorInvalidValue;  // (offsets inside a row are int)
  switch (p.dtype) {
    case DType::F32: return fwd_rms<float>(p, stream);
    case DType::F16: return fwd_rms<__half>(p, stream);
    case DType::BF16: return fwd_rms<__nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t layer_norm_bwd(const NormBwdParams& p, cudaStream_t stream) {
  if (p.N <= 0 || p.N > INT32_MAX) return cudaErrorInvalidValue;  // (offsets inside a row are int)
  switch (p.dtype) {
    case DType::F32: return bwd_rms<float>(p, stream);
    case DType::F16: return bwd_rms<__half>(p, stream);
    case DType::BF16: return bwd_rms<__nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

int64_t layer_norm_bwd_workspace_floats(const NormBwdParams& p) {
  const BwdPlan pl = bwd_plan(p);
  return pl.partial ? 2 * pl.nchunks * p.N : 0;
}

}  // namespace cuda
}  // namespace pyattn
