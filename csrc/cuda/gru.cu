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
      r[k] = gru_sigmoid(xr[k] + hr[k]);
      z[k] = gru_sigmoid(xz[k] + hz[k]);
      n[k] = gru_tanh(xn[k] + r[k] * hn[k]);
      hnew[k] = n[k] + z[k] * (hp[k] - n[k]);
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
      const float dn_post = d[k] * (1.0f - z[k]);
      const float dz_post = d[k] * (hp[k] - n[k]);
      dn[k] = dn_post * (1.0f - n[k] * n[k]);
      dr[k] = dn[k] * hn[k] * r[k] * (1.0f - r[k]);
      dz[k] = dz_post * z[k] * (1.0f - z[k]);
      dnr[k] = dn[k] * r[k];
      direct[k] = d[k] * z[k];
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

}  // namespace cuda
}  // namespace pyattn
