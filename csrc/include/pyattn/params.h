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
// Attention (scaled dot-product, FlashAttention-style: never an Lq x Lk matrix)
//   s_ij = scale * q_i . k_j  (+ additive mask; -inf where a bool mask is false or causal hides j)
//   out_i = sum_j softmax_j(s_i)_j * keep_ij / (1 - p) * v_j,   lse_i = log sum_j exp(s_ij)  (natural log)
//   Causal: query i sees key j iff j <= i + shift, shift = Lk - Lq when bottom_right (flash-attn), else 0.
//   A row that sees no key (all -inf) gets out 0 and lse +inf; backward then recomputes P = 0 for it.
//   GQA: query head h reads kv head h / (Hq / Hkv). Dropout keep_ij is a hash of (seed, offset, b, h, i, j)
//   (attn_dropout_keep below), the same in forward and backward.
// Tensors are (B, H, L, D) with any b/h/l strides (0 allowed) and stride 1 along D; strides in elements.
// ============================================================================================================

enum class MaskKind : int8_t { None, Bool, Additive };

struct AttnCommon {
  const void* q = nullptr;  // (B, Hq, Lq, D) dtype
  const void* k = nullptr;  // (B, Hkv, Lk, D) dtype
  const void* v = nullptr;  // (B, Hkv, Lk, Dv) dtype
  // (B|1, Hq|1, Lq|1, Lk|1) bool (1 byte, nonzero = keep) or additive (mask_dtype); a broadcast dim has stride 0.
  const void* mask = nullptr;
  int64_t q_stride[3] = {0, 0, 0};  // b, h, l
  int64_t k_stride[3] = {0, 0, 0};
  int64_t v_stride[3] = {0, 0, 0};
  int64_t mask_stride[4] = {0, 0, 0, 0};  // b, h, i, j

  int64_t B = 0, Hq = 0, Hkv = 0, Lq = 0, Lk = 0, D = 0, Dv = 0;  // all >= 1 (empty calls never reach a kernel)
  float scale = 1.0f;
  float dropout_p = 0.0f;  // in [0, 1)
  uint64_t seed = 0, offset = 0;
  bool causal = false;
  bool bottom_right = false;
  MaskKind mask_kind = MaskKind::None;
  DType mask_dtype = DType::F32;  // additive masks: F32 or dtype
  DType dtype = DType::F32;       // q, k, v, out (and dout, dq, dk, dv)
  int num_threads = 1;
  int arch = 0;  // CUDA: the device's compute capability, major * 10 + minor (the bindings fill it; 0: unknown)
  int num_sms = 0;  // CUDA: the device's SM count (the bindings fill it; persistent kernels size their grid by it)
  int64_t l2_bytes = 0;  // CUDA: the device's L2 cache size (the bindings fill it; causal grids group heads by it)
};

struct AttnFwdParams : AttnCommon {
  void* out = nullptr;  // (B, Hq, Lq, Dv) dtype
  int64_t out_stride[3] = {0, 0, 0};
  float* lse = nullptr;  // (B, Hq, Lq) fp32 contiguous
  float* workspace = nullptr;  // CUDA: attention_fwd_workspace(p).floats fp32 (decoding's per-split results), or null
  unsigned* tile_counter = nullptr;  // CUDA: a zeroed counter when attention_fwd_workspace(p).tile_counter, or null
};

struct AttnBwdParams : AttnCommon {
  const void* dout = nullptr;  // (B, Hq, Lq, Dv) dtype
  const void* out = nullptr;   // (B, Hq, Lq, Dv) dtype: the forward's output
  const float* lse = nullptr;  // (B, Hq, Lq) fp32 contiguous: the forward's lse
  void* dq = nullptr;          // (B, Hq, Lq, D) dtype
  void* dk = nullptr;          // (B, Hkv, Lk, D) dtype
  void* dv = nullptr;          // (B, Hkv, Lk, Dv) dtype
  int64_t dout_stride[3] = {0, 0, 0};
  int64_t out_stride[3] = {0, 0, 0};
  int64_t dq_stride[3] = {0, 0, 0};
  int64_t dk_stride[3] = {0, 0, 0};
  int64_t dv_stride[3] = {0, 0, 0};
  // torch.are_deterministic_algorithms_enabled() (the bindings fill it): no atomics, bitwise-repeatable gradients
  bool deterministic = false;
};

// ============================================================================================================
// GRU
// ============================================================================================================
// ---- GRU ----
// One direction of one GRU layer over a time-major sequence (a cell is the same with T = 1). torch's formula
// and gate order r | z | n:
//   gi = W_ih x_t + b_ih,  gh = W_hh h + b_hh                 (both (B, 3H))
//   r = sigmoid(gi_r + gh_r),  z = sigmoid(gi_z + gh_z),  hn = gh_n,  n = tanh(gi_n + r * hn)
//   h' = n + z * (h - n)                                     (= (1 - z) * n + z * h)
// `reverse` consumes x[T-1] first; out[t] is always the state after consuming x[t]. The saved workspace `ws`
// is [r | z | n | hn] per (t, b) row, last dim 4H, fp32 (the op contract of pyattn/ops/gru.py).
// Backward (BPTT), with dh the gradient reaching the state after a step:
//   dn = dh (1 - z), dz = dh (h - n), dn' = dn (1 - n^2), dr' = dn' hn r (1 - r), dz' = dz z (1 - z)
//   dgi = [dr' | dz' | dn'], dgh = [dr' | dz' | dn' r], dh_prev = dgh W_hh + dh z (+ dout of the step before)
//   dx = dGi W_ih, dW_ih = dGi^T X, dW_hh = dGh^T Hprev, db_ih = colsum(dGi), db_hh = colsum(dGh)
// Only fp32 is implemented (dtype must be F32). Strides are in elements; every last dim has stride 1.
struct GRUFwdParams {
  const void* x = nullptr;     // (T, B, I): element (t, b, i) at t * x_t_stride + b * x_b_stride + i
  const void* h0 = nullptr;    // (B, H), row stride h0_row_stride
  const void* w_ih = nullptr;  // (3H, I), row stride w_ih_row_stride
  const void* w_hh = nullptr;  // (3H, H), row stride w_hh_row_stride
  const void* b_ih = nullptr;  // (3H,) contiguous; nullptr: no bias
  const void* b_hh = nullptr;  // (3H,) contiguous; nullptr: no bias
  void* out = nullptr;         // (T, B, H) contiguous
  float* ws = nullptr;         // (T, B, 4H) fp32 contiguous; nullptr: not stored (inference)
  float* workspace = nullptr;  // gru_fwd_workspace_floats(params) fp32 scratch (cpu_kernels.h); never nullptr

  int64_t T = 0, B = 0, I = 0, H = 0;  // all >= 1 (empty inputs never reach the kernel)
  int64_t x_t_stride = 0, x_b_stride = 0;
  int64_t h0_row_stride = 0;
  int64_t w_ih_row_stride = 0, w_hh_row_stride = 0;

  bool reverse = false;
  DType dtype = DType::F32;
  int num_threads = 0;  // threads to use (>= 1; run_items in pyattn/cpu_parallel.h); results never depend on it
};

struct GRUBwdParams {
  const void* dout = nullptr;     // (T, B, H): element (t, b, j) at t * dout_t_stride + b * dout_b_stride + j
  const void* dh_last = nullptr;  // (B, H), row stride dh_last_row_stride; nullptr: zero
  const void* x = nullptr;        // (T, B, I), strides as in GRUFwdParams
  const void* h0 = nullptr;       // (B, H), row stride h0_row_stride
  const void* w_ih = nullptr;     // (3H, I), row stride w_ih_row_stride
  const void* w_hh = nullptr;     // (3H, H), row stride w_hh_row_stride
  const void* out = nullptr;      // (T, B, H) the forward's output, strides out_t_stride, out_b_stride (T >= 2)
  const float* ws = nullptr;      // (T, B, 4H) fp32 contiguous: the forward's [r | z | n | hn]
  void* dx = nullptr;             // (T, B, I) contiguous
  void* dh0 = nullptr;            // (B, H) contiguous
  void* dw_ih = nullptr;          // (3H, I) contiguous; nullptr: weight grads not computed (then all four null)
  void* dw_hh = nullptr;          // (3H, H) contiguous
  void* db_ih = nullptr;          // (3H,) contiguous; nullptr: not computed
  void* db_hh = nullptr;          // (3H,) contiguous; nullptr: not computed
  float* workspace = nullptr;     // gru_bwd_workspace_floats(params) fp32 scratch; never nullptr

  int64_t T = 0, B = 0, I = 0, H = 0;
  int64_t dout_t_stride = 0, dout_b_stride = 0;
  int64_t dh_last_row_stride = 0;
  int64_t x_t_stride = 0, x_b_stride = 0;
  int64_t h0_row_stride = 0;
  int64_t w_ih_row_stride = 0, w_hh_row_stride = 0;
  int64_t out_t_stride = 0, out_b_stride = 0;

  bool reverse = false;
  bool need_weights = false;  // dw_ih/dw_hh (and the bias grads that are non-null) are computed
  DType dtype = DType::F32;
  int num_threads = 0;
};

// CUDA (csrc/cuda/gru.cu): the elementwise part of one step; the bindings run the GEMMs through cuBLAS.
// dtype is F32, F16 or BF16 (storage); all math is fp32. Row strides in elements; every last dim has stride 1.
struct GRUGatesFwdParams {
  const float* gi = nullptr;   // (B, 3H) fp32, row stride gi_row_stride: x W_ih^T (bias NOT added)
  const float* gh = nullptr;   // (B, 3H) fp32, row stride gh_row_stride: h W_hh^T (bias NOT added)
  const void* b_ih = nullptr;  // (3H,) dtype contiguous; nullptr: no bias
  const void* b_hh = nullptr;  // (3H,) dtype contiguous; nullptr: no bias
  const void* h = nullptr;     // (B, H) dtype, row stride h_row_stride: the state before the step
  void* out = nullptr;         // (B, H) dtype, row stride out_row_stride: h' (must not overlap h)
  float* ws = nullptr;         // (B, 4H) fp32, row stride ws_row_stride: [r | z | n | hn]; nullptr: not stored
  int64_t B = 0, H = 0;        // >= 1 each
  int64_t gi_row_stride = 0, gh_row_stride = 0, h_row_stride = 0, out_row_stride = 0, ws_row_stride = 0;
  DType dtype = DType::F32;
};

// d = dh (+ dout): dgi = [dr' | dz' | dn'], dgh = [dr' | dz' | dn' r], dh_direct = d z (formulas above).
struct GRUGatesBwdParams {
  const void* dh = nullptr;    // (B, H) dh_dtype, row stride dh_row_stride: dL/dh' carried from later steps
  const void* dout = nullptr;  // (B, H) dtype, row stride dout_row_stride, added to dh; nullptr: none
  const void* h = nullptr;     // (B, H) dtype, row stride h_row_stride: the state before the step
  const float* ws = nullptr;   // (B, 4H) fp32, row stride ws_row_stride: the forward's [r | z | n | hn]
  float* dgi = nullptr;        // (B, 3H) fp32, row stride dgi_row_stride
  float* dgh = nullptr;        // (B, 3H) fp32, row stride dgh_row_stride
  float* dh_direct = nullptr;  // (B, H) fp32, row stride dh_direct_row_stride (may be the same buffer as dh only
                               // when dh_dtype is F32 and the strides agree: each element is read before written)
  int64_t B = 0, H = 0;        // >= 1 each
  int64_t dh_row_stride = 0, dout_row_stride = 0, h_row_stride = 0, ws_row_stride = 0;
  int64_t dgi_row_stride = 0, dgh_row_stride = 0, dh_direct_row_stride = 0;
  DType dtype = DType::F32;     // dout, h
  DType dh_dtype = DType::F32;  // F32 or dtype
};
// The whole recurrence of one layer direction in one cooperative launch (csrc/cuda/gru.cu, gru_rec_fwd): the
// blocks split the hidden units, each keeps its rows of W_hh in shared memory for all T steps and computes
// gh = h W_hh^T for them, the gates and h'; a grid-wide barrier per step publishes h' to the other blocks. dtype F32,
// F16 or BF16 (storage); W_hh is held and all math done in fp32.
struct GRURecFwdParams {
  const float* gi = nullptr;    // (T, B, 3H) fp32 contiguous: x_t W_ih^T (bias NOT added)
  const void* h0 = nullptr;     // (B, H) dtype, row stride h0_row_stride
  const void* w_hh = nullptr;   // (3H, H) dtype, row stride w_hh_row_stride
  const void* b_ih = nullptr;   // (3H,) dtype contiguous; nullptr: no bias
  const void* b_hh = nullptr;   // (3H,) dtype contiguous; nullptr: no bias
  void* out = nullptr;          // (T, B, H) dtype contiguous; out[t] = the state after consuming x[t]
  float* ws = nullptr;          // (T, B, 4H) fp32 contiguous: [r | z | n | hn]; nullptr: not stored
  unsigned long long* sync = nullptr;  // the grid barrier's counter, 0 at launch (gru_rec_fwd_plan: needs_sync)
  int64_t T = 0, B = 0, H = 0;  // >= 1 each
  int64_t h0_row_stride = 0, w_hh_row_stride = 0;
  bool reverse = false;
  DType dtype = DType::F32;
  int num_sms = 0;            // the device's multiprocessor count
  size_t smem_per_block = 0;  // the device's opt-in shared memory per block, bytes
  int cc_major = 0;           // the device's compute capability, major (thread-block clusters: 9 and newer)
};
// The persistent backward (gru_rec_bwd): every step's gate gradients and dh = dh z + dgh W_hh in one cooperative
// launch; block c owns the same hidden units as in the forward and keeps W_hh's columns j0 .. j0 + nu - 1 in shared
// memory; a grid barrier per step publishes dgh[t] (every block needs all 3H of it). The GEMMs over all steps (dx,
// dW_ih, dW_hh, bias sums) stay in the binding.
struct GRURecBwdParams {
  const void* dout = nullptr;   // (T, B, H) dtype: element (t, b, j) at t * dout_t_stride + b * dout_b_stride + j
  const void* h0 = nullptr;     // (B, H) dtype, row stride h0_row_stride
  const void* out = nullptr;    // (T, B, H) dtype, strides out_t_stride, out_b_stride (only read when T >= 2)
  const float* ws = nullptr;    // (T, B, 4H) fp32 contiguous: the forward's [r | z | n | hn]
  const void* w_hh = nullptr;   // (3H, H) dtype, row stride w_hh_row_stride
  float* dgi = nullptr;         // (T, B, 3H) fp32 contiguous (written): [dr' | dz' | dn']
  float* dgh = nullptr;         // (T, B, 3H) fp32 contiguous (written): [dr' | dz' | dn' r]
  float* dh = nullptr;          // (B, H) fp32 contiguous: dL/dh_T at launch (zeros for none), dL/dh0 at the end
  unsigned long long* sync = nullptr;  // as GRURecFwdParams::sync
  int64_t T = 0, B = 0, H = 0;  // >= 1 each
  int64_t dout_t_stride = 0, dout_b_stride = 0, h0_row_stride = 0, out_t_stride = 0, out_b_stride = 0;
  int64_t w_hh_row_stride = 0;
  bool reverse = false;
  DType dtype = DType::F32;
  int num_sms = 0;
  size_t smem_per_block = 0;
  int cc_major = 0;
};
// One GRU cell step in one launch (csrc/cuda/gru.cu, gru_cell_fwd): x W_ih^T, h W_hh^T and the gates fused, for a
// small batch (gru_cell_fwd_plan). dtype F32, F16 or BF16 (storage); all math fp32. Strides in elements; every last
// dim has stride 1.
struct GRUCellFwdParams {
  const void* x = nullptr;     // (B, I) dtype, row stride x_row_stride
  const void* h = nullptr;     // (B, H) dtype, row stride h_row_stride: the state before the step
  const void* w_ih = nullptr;  // (3H, I) dtype, row stride w_ih_row_stride
  const void* w_hh = nullptr;  // (3H, H) dtype, row stride w_hh_row_stride
  const void* b_ih = nullptr;  // (3H,) dtype contiguous; nullptr: no bias
  const void* b_hh = nullptr;  // (3H,) dtype contiguous; nullptr: no bias
  void* out = nullptr;         // (B, H) dtype contiguous: h' (must not overlap h)
  float* ws = nullptr;         // (B, 4H) fp32 contiguous: [r | z | n | hn]; nullptr: not stored
  int64_t B = 0, I = 0, H = 0;  // B, H >= 1; I >= 0
  int64_t x_row_stride = 0, h_row_stride = 0, w_ih_row_stride = 0, w_hh_row_stride = 0;
  DType dtype = DType::F32;
  int num_sms = 0;            // the device's multiprocessor count
  size_t smem_per_block = 0;  // the device's opt-in shared memory per block, bytes
};
// ---- end GRU ----

}  // namespace pyattn
