// Torch-free parameter structs passed from the bindings (csrc/bindings/) to the kernels (csrc/cpu/, csrc/cuda/).
// Only raw pointers, int64 sizes/strides (in ELEMENTS, not bytes), flags and a small dtype enum live here:
// this header must never include a torch/ATen/c10 header. One section per op.
#pragma once

#include <cstdint>

namespace pyattn {

// Element type of a tensor that a kernel reads or writes.
enum class DType : int8_t { F32, F16, BF16 };

// ============================================================================================================
// LayerNorm / RMSNorm (+ fused residual add: "Add & Norm")
//   fwd: s = round_to_dtype(x + residual)  (or s = x),  statistics in fp32 on the rounded s
//        LN : y = (s - mean) * rstd * w + b,  rstd = 1 / sqrt(var(s) + eps)   (biased variance)
//        RMS: y = s * rstd * w,               rstd = 1 / sqrt(mean(s^2) + eps)
//   bwd: xhat = (s - mean) * rstd (RMS: s * rstd), g = dy * w
//        LN : dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
//        RMS: dx = rstd * (g - xhat * mean(g * xhat))
//        dx += dresidual_out;  dweight = sum_rows(dy * xhat);  dbias = sum_rows(dy)
// Rows are the M dimension; the N (normalized) dimension always has element stride 1.
// ============================================================================================================

struct NormFwdParams {
  const void* x = nullptr;         // (M, N) dtype, row stride x_row_stride
  const void* residual = nullptr;  // (M, N) dtype, row stride residual_row_stride; nullptr: none
  const void* weight = nullptr;    // (N,) weight_dtype, contiguous; nullptr: w = 1
  const void* bias = nullptr;      // (N,) bias_dtype, contiguous; nullptr: b = 0 (must be nullptr when rms)
  void* y = nullptr;               // (M, N) dtype, row stride y_row_stride
  void* residual_out = nullptr;    // (M, N) dtype, row stride residual_out_row_stride; nullptr: not stored
  float* mean = nullptr;           // (M,) fp32; nullptr: not stored (always nullptr-able, unused when rms)
  float* rstd = nullptr;           // (M,) fp32; nullptr: not stored

  int64_t M = 0;  // rows
  int64_t N = 0;  // normalized size (>= 1 when M > 0)
  int64_t x_row_stride = 0;
  int64_t residual_row_stride = 0;
  int64_t y_row_stride = 0;
  int64_t residual_out_row_stride = 0;

  float eps = 1e-5f;
  bool rms = false;
  DType dtype = DType::F32;         // x, residual, y, residual_out
  DType weight_dtype = DType::F32;  // F32 or dtype
  DType bias_dtype = DType::F32;    // F32 or dtype
  int num_threads = 0;              // OpenMP threads to use; <= 0: the OpenMP default
};

struct NormBwdParams {
  const void* dy = nullptr;             // (M, N) dtype, row stride dy_row_stride
  const void* s = nullptr;              // (M, N) dtype, row stride s_row_stride: the saved normalized input
  const void* weight = nullptr;         // (N,) weight_dtype, contiguous; nullptr: w = 1
  const float* mean = nullptr;          // (M,) fp32 (ignored when rms)
  const float* rstd = nullptr;          // (M,) fp32
  const void* dresidual_out = nullptr;  // (M, N) dtype, row stride dresidual_out_row_stride; nullptr: none
  void* dx = nullptr;                   // (M, N) dtype, row stride dx_row_stride
  void* dweight = nullptr;              // (N,) dweight_dtype; nullptr: not computed
  void* dbias = nullptr;                // (N,) dbias_dtype; nullptr: not computed (must be nullptr when rms)
  // Optional fp32 scratch for the deterministic dweight/dbias partial sums, at least
  // layer_norm_bwd_workspace_floats(params) floats (see cpu_kernels.h). nullptr: the kernel allocates it.
  float* workspace = nullptr;

  int64_t M = 0;
  int64_t N = 0;
  int64_t dy_row_stride = 0;
  int64_t s_row_stride = 0;
  int64_t dresidual_out_row_stride = 0;
  int64_t dx_row_stride = 0;

  bool rms = false;
  DType dtype = DType::F32;          // dy, s, dresidual_out, dx
  DType weight_dtype = DType::F32;   // F32 or dtype
  DType dweight_dtype = DType::F32;  // F32 or dtype
  DType dbias_dtype = DType::F32;    // F32 or dtype
  int num_threads = 0;               // OpenMP threads to use; <= 0: the OpenMP default
};

// ============================================================================================================
// Attention
// ============================================================================================================

// ============================================================================================================
// GRU
// ============================================================================================================

}  // namespace pyattn
