// Shared by the CPU (layer_norm.cpp) and CUDA (cuda/layer_norm.cpp) bindings of pyattn::layer_norm_fwd /
// pyattn::layer_norm_bwd: input checks with the same messages on both devices, output allocation and params
// filling. Only the kernel call (and, for CUDA, the device guard and stream) differs between the two.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "pyattn/params.h"

namespace pyattn {
namespace norm {

using at::Tensor;

inline bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

inline DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::F32;
    case at::kBFloat16: return DType::BF16;
    case at::kHalf: return DType::F16;
    default: TORCH_CHECK(false, "pyattn: unsupported dtype ", t);
  }
}

inline bool present(const std::optional<Tensor>& t) { return t.has_value() && t->defined(); }

// `t` is on device `dev` (the device of the op's main input). CPU: "must be a CPU tensor"; CUDA: "must be a CUDA
// tensor", then "on the same device as <main input>".
inline void check_device(const char* op, const char* name, const Tensor& t, const at::Device& dev, const char* main) {
  if (dev.is_cpu()) {
    TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor (got device ", t.device(), ")");
  } else {
    TORCH_CHECK(t.device().is_cuda(), op, ": ", name, " must be a CUDA tensor (got device ", t.device(), ")");
    TORCH_CHECK(t.device() == dev, op, ": ", name, " must be on the same device as ", main, " (", dev,
                ") (got device ", t.device(), ")");
  }
}

// (M, N) tensor with dtype `dt`; element stride 1 along N unless `any_stride`.
inline void check_rows(const char* op, const char* name, const Tensor& t, at::ScalarType dt, const char* like,
                       int64_t M, int64_t N, const at::Device& dev, bool any_stride = false) {
  check_device(op, name, t, dev, like);
  TORCH_CHECK(t.dim() == 2 && t.size(0) == M && t.size(1) == N, op, ": ", name, " must have shape (", M, ", ", N,
              ") (got ", t.sizes(), ")");
  TORCH_CHECK(t.scalar_type() == dt, op, ": ", name, " must have dtype ", dt, " like ", like, " (got ",
              t.scalar_type(), ")");
  TORCH_CHECK(any_stride || N <= 1 || t.stride(1) == 1, op, ": ", name,
              " must have stride 1 along its last dimension (got strides ", t.strides(), ")");
}

// (N,) contiguous tensor, dtype float32 or `dt`.
inline void check_param(const char* op, const char* name, const Tensor& t, at::ScalarType dt, int64_t N,
                        const at::Device& dev, const char* main) {
  check_device(op, name, t, dev, main);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == N, op, ": ", name, " must have shape (", N, ",) (got ", t.sizes(), ")");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == dt, op, ": ", name,
              " must have dtype float32 or ", dt, " (got ", t.scalar_type(), ")");
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous (got strides ", t.strides(), ")");
}

// (M,) contiguous float32 tensor.
inline void check_stat(const char* op, const char* name, const Tensor& t, int64_t M, const at::Device& dev,
                       const char* main) {
  check_device(op, name, t, dev, main);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == M, op, ": ", name, " must have shape (", M, ",) (got ", t.sizes(), ")");
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must have dtype float32 (got ", t.scalar_type(), ")");
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous (got strides ", t.strides(), ")");
}

// The main input (x of the forward, s of the backward): on a `device_type` device, 2-D, a supported dtype,
// non-empty rows.
inline void check_main(const char* op, const char* name, const Tensor& t, at::DeviceType device_type) {
  if (device_type == at::kCPU) {
    TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor (got device ", t.device(), ")");
  } else {
    TORCH_CHECK(t.device().is_cuda(), op, ": ", name, " must be a CUDA tensor (got device ", t.device(), ")");
  }
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D (M, N) (got shape ", t.sizes(), ")");
  TORCH_CHECK(is_supported_dtype(t.scalar_type()), op, ": ", name,
              " must have dtype float32, bfloat16 or float16 (got ", t.scalar_type(),
              "; other dtypes go through the torch backend)");
  TORCH_CHECK(t.size(1) >= 1, op, ": ", name, " must have a non-empty last dimension (got shape ", t.sizes(), ")");
}

// Gradients arrive in whatever layout autograd made (e.g. expanded, stride 0): those with a last-dim stride other
// than 1 are copied; rows may have any stride.
inline Tensor unit_last_stride(const Tensor& t) { return t.size(1) <= 1 || t.stride(1) == 1 ? t : t.contiguous(); }

// ---- forward ----------------------------------------------------------------------------------------------
constexpr const char* kFwdOp = "pyattn::layer_norm_fwd";

struct FwdOutputs {
  Tensor y, residual_out, mean, rstd;
  std::tuple<Tensor, Tensor, Tensor, Tensor> as_tuple() const { return {y, residual_out, mean, rstd}; }
};

// Checks every argument of layer_norm_fwd (x on a `device_type` device, the others on x's device).
inline void check_fwd(const Tensor& x, const std::optional<Tensor>& residual, const std::optional<Tensor>& weight,
                      const std::optional<Tensor>& bias, double eps, bool rms, at::DeviceType device_type) {
  const char* op = kFwdOp;
  check_main(op, "x", x, device_type);
  const int64_t M = x.size(0), N = x.size(1);
  const at::ScalarType dt = x.scalar_type();
  const at::Device dev = x.device();
  check_rows(op, "x", x, dt, "x", M, N, dev);
  if (present(residual)) check_rows(op, "residual", *residual, dt, "x", M, N, dev);
  if (present(weight)) check_param(op, "weight", *weight, dt, N, dev, "x");
  if (present(bias)) check_param(op, "bias", *bias, dt, N, dev, "x");
  TORCH_CHECK(!(rms && present(bias)), op, ": bias must be None when rms=True");
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, op, ": eps must be a finite number >= 0 (got ", eps, ")");
}

// Allocates the outputs (on x's device) of a checked call.
inline FwdOutputs alloc_fwd(const Tensor& x, bool has_residual, bool rms, bool store_residual) {
  const int64_t M = x.size(0), N = x.size(1);
  const auto f32 = x.options().dtype(at::kFloat);
  FwdOutputs o;
  o.y = at::empty({M, N}, x.options());
  o.residual_out = (has_residual && store_residual) ? at::empty({M, N}, x.options()) : at::empty({0}, x.options());
  o.mean = rms ? at::empty({0}, f32) : at::empty({M}, f32);
  o.rstd = at::empty({M}, f32);
  return o;
}

// The kernel parameters of a checked call with outputs from alloc_fwd (num_threads left at 0).
inline NormFwdParams fwd_params(const Tensor& x, const std::optional<Tensor>& residual,
                                const std::optional<Tensor>& weight, const std::optional<Tensor>& bias, double eps,
                                bool rms, bool store_residual, const FwdOutputs& o) {
  const bool has_res = present(residual), has_w = present(weight), has_b = present(bias);
  NormFwdParams p;
  p.x = x.data_ptr();
  p.residual = has_res ? residual->data_ptr() : nullptr;
  p.weight = has_w ? weight->data_ptr() : nullptr;
  p.bias = has_b ? bias->data_ptr() : nullptr;
  p.y = o.y.data_ptr();
  p.residual_out = (has_res && store_residual) ? o.residual_out.data_ptr() : nullptr;
  p.mean = rms ? nullptr : o.mean.data_ptr<float>();
  p.rstd = o.rstd.data_ptr<float>();
  p.M = x.size(0);
  p.N = x.size(1);
  p.x_row_stride = x.stride(0);
  p.residual_row_stride = has_res ? residual->stride(0) : 0;
  p.y_row_stride = o.y.stride(0);
  p.residual_out_row_stride = p.residual_out ? o.residual_out.stride(0) : 0;
  p.eps = static_cast<float>(eps);
  p.rms = rms;
  p.dtype = to_dtype(x.scalar_type());
  p.weight_dtype = has_w ? to_dtype(weight->scalar_type()) : DType::F32;
  p.bias_dtype = has_b ? to_dtype(bias->scalar_type()) : DType::F32;
  return p;
}

// ---- backward ---------------------------------------------------------------------------------------------
constexpr const char* kBwdOp = "pyattn::layer_norm_bwd";

// The gradients with a unit last stride (copied when not): what the kernels read.
struct BwdInputs {
  Tensor dy, dresidual_out;  // dresidual_out undefined when absent
};

// Checks every argument of layer_norm_bwd (s on a `device_type` device, the others on s's device).
inline BwdInputs check_bwd(const Tensor& dy, const Tensor& s, const std::optional<Tensor>& weight,
                           const Tensor& mean, const Tensor& rstd, const std::optional<Tensor>& dresidual_out,
                           bool rms, bool has_bias, at::DeviceType device_type) {
  const char* op = kBwdOp;
  check_main(op, "s", s, device_type);
  const int64_t M = s.size(0), N = s.size(1);
  const at::ScalarType dt = s.scalar_type();
  const at::Device dev = s.device();
  check_rows(op, "s", s, dt, "s", M, N, dev);
  check_rows(op, "dy", dy, dt, "s", M, N, dev, /*any_stride=*/true);
  BwdInputs in;
  in.dy = unit_last_stride(dy);
  if (present(weight)) check_param(op, "weight", *weight, dt, N, dev, "s");
  if (present(dresidual_out)) {
    check_rows(op, "dresidual_out", *dresidual_out, dt, "s", M, N, dev, /*any_stride=*/true);
    in.dresidual_out = unit_last_stride(*dresidual_out);
  }
  if (!rms) check_stat(op, "mean", mean, M, dev, "s");
  check_stat(op, "rstd", rstd, M, dev, "s");
  TORCH_CHECK(!(rms && has_bias), op, ": has_bias must be False when rms=True");
  return in;
}

struct BwdOutputs {
  Tensor dx, dweight, dbias;
  std::tuple<Tensor, Tensor, Tensor> as_tuple() const { return {dx, dweight, dbias}; }
};

// dweight has weight's dtype; dbias too (s's dtype when there is no weight). Empty when not wanted.
inline BwdOutputs alloc_bwd(const Tensor& s, const std::optional<Tensor>& weight, bool has_bias, bool need_dweight) {
  const int64_t M = s.size(0), N = s.size(1);
  const at::ScalarType pdt = present(weight) ? weight->scalar_type() : s.scalar_type();
  const auto popts = s.options().dtype(pdt);
  const bool want_dw = need_dweight && present(weight), want_db = need_dweight && has_bias;
  BwdOutputs o;
  o.dx = at::empty({M, N}, s.options());
  o.dweight = want_dw ? at::empty({N}, popts) : at::empty({0}, popts);
  o.dbias = want_db ? at::empty({N}, popts) : at::empty({0}, popts);
  return o;
}

// True when a checked call has nothing to compute (no rows and no parameter gradients).
inline bool bwd_is_empty(const Tensor& s, const BwdOutputs& o) {
  return s.size(0) == 0 && o.dweight.numel() == 0 && o.dbias.numel() == 0;
}

// The kernel parameters of a checked call (workspace and num_threads left for the caller).
inline NormBwdParams bwd_params(const BwdInputs& in, const Tensor& s, const std::optional<Tensor>& weight,
                                const Tensor& mean, const Tensor& rstd, bool rms, const BwdOutputs& o) {
  const bool has_w = present(weight), has_dres = in.dresidual_out.defined();
  NormBwdParams p;
  p.dy = in.dy.data_ptr();
  p.s = s.data_ptr();
  p.weight = has_w ? weight->data_ptr() : nullptr;
  p.mean = rms ? nullptr : mean.data_ptr<float>();
  p.rstd = rstd.data_ptr<float>();
  p.dresidual_out = has_dres ? in.dresidual_out.data_ptr() : nullptr;
  p.dx = o.dx.data_ptr();
  p.dweight = o.dweight.numel() > 0 ? o.dweight.data_ptr() : nullptr;
  p.dbias = o.dbias.numel() > 0 ? o.dbias.data_ptr() : nullptr;
  p.M = s.size(0);
  p.N = s.size(1);
  p.dy_row_stride = in.dy.stride(0);
  p.s_row_stride = s.stride(0);
  p.dresidual_out_row_stride = has_dres ? in.dresidual_out.stride(0) : 0;
  p.dx_row_stride = o.dx.stride(0);
  p.rms = rms;
  p.dtype = to_dtype(s.scalar_type());
  p.weight_dtype = has_w ? to_dtype(weight->scalar_type()) : DType::F32;
  p.dweight_dtype = to_dtype(o.dweight.scalar_type());
  p.dbias_dtype = to_dtype(o.dbias.scalar_type());
  return p;
}

}  // namespace norm
}  // namespace pyattn
