// CPU implementations of pyattn::layer_norm_fwd / pyattn::layer_norm_bwd (schemas in library.cpp):
// input checks, output allocation, params filling, then the torch-free kernels of csrc/cpu/layer_norm.cpp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

#include "pyattn/cpu_kernels.h"
#include "pyattn/params.h"

namespace pyattn {
namespace {

using at::Tensor;

bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::F32;
    case at::kBFloat16: return DType::BF16;
    case at::kHalf: return DType::F16;
    default: TORCH_CHECK(false, "pyattn: unsupported dtype ", t);
  }
}

int num_threads() { return at::in_parallel_region() ? 1 : at::get_num_threads(); }

// (M, N) tensor on CPU with dtype `dt`; element stride 1 along N unless `any_stride`.
void check_rows(const char* op, const char* name, const Tensor& t, at::ScalarType dt, const char* like, int64_t M,
                int64_t N, bool any_stride = false) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor (got device ", t.device(), ")");
  TORCH_CHECK(t.dim() == 2 && t.size(0) == M && t.size(1) == N, op, ": ", name, " must have shape (", M, ", ", N,
              ") (got ", t.sizes(), ")");
  TORCH_CHECK(t.scalar_type() == dt, op, ": ", name, " must have dtype ", dt, " like ", like, " (got ",
              t.scalar_type(), ")");
  TORCH_CHECK(any_stride || N <= 1 || t.stride(1) == 1, op, ": ", name,
              " must have stride 1 along its last dimension (got strides ", t.strides(), ")");
}

// (N,) contiguous CPU tensor, dtype float32 or `dt`.
void check_param(const char* op, const char* name, const Tensor& t, at::ScalarType dt, int64_t N) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor (got device ", t.device(), ")");
  TORCH_CHECK(t.dim() == 1 && t.size(0) == N, op, ": ", name, " must have shape (", N, ",) (got ", t.sizes(), ")");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == dt, op, ": ", name,
              " must have dtype float32 or ", dt, " (got ", t.scalar_type(), ")");
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous (got strides ", t.strides(), ")");
}

// (M,) contiguous float32 CPU tensor.
void check_stat(const char* op, const char* name, const Tensor& t, int64_t M) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor (got device ", t.device(), ")");
  TORCH_CHECK(t.dim() == 1 && t.size(0) == M, op, ": ", name, " must have shape (", M, ",) (got ", t.sizes(), ")");
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must have dtype float32 (got ", t.scalar_type(), ")");
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous (got strides ", t.strides(), ")");
}

std::tuple<Tensor, Tensor, Tensor, Tensor> layer_norm_fwd_cpu(const Tensor& x, const std::optional<Tensor>& residual,
                                                              const std::optional<Tensor>& weight,
                                                              const std::optional<Tensor>& bias, double eps, bool rms,
                                                              bool store_residual) {
  constexpr const char* op = "pyattn::layer_norm_fwd";
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be a CPU tensor (got device ", x.device(), ")");
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D (M, N) (got shape ", x.sizes(), ")");
  TORCH_CHECK(is_supported_dtype(x.scalar_type()), op, ": x must have dtype float32, bfloat16 or float16 (got ",
              x.scalar_type(), "; other dtypes go through the torch backend)");
  const int64_t M = x.size(0), N = x.size(1);
  TORCH_CHECK(N >= 1, op, ": x must have a non-empty last dimension (got shape ", x.sizes(), ")");
  const at::ScalarType dt = x.scalar_type();
  check_rows(op, "x", x, dt, "x", M, N);
  const bool has_res = residual.has_value() && residual->defined();
  const bool has_w = weight.has_value() && weight->defined();
  const bool has_b = bias.has_value() && bias->defined();
  if (has_res) check_rows(op, "residual", *residual, dt, "x", M, N);
  if (has_w) check_param(op, "weight", *weight, dt, N);
  if (has_b) check_param(op, "bias", *bias, dt, N);
  TORCH_CHECK(!(rms && has_b), op, ": bias must be None when rms=True");
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, op, ": eps must be a finite number >= 0 (got ", eps, ")");

  const auto f32 = x.options().dtype(at::kFloat);
  Tensor y = at::empty({M, N}, x.options());
  Tensor residual_out = (has_res && store_residual) ? at::empty({M, N}, x.options()) : at::empty({0}, x.options());
  Tensor mean = rms ? at::empty({0}, f32) : at::empty({M}, f32);
  Tensor rstd = at::empty({M}, f32);
  if (M == 0) return {y, residual_out, mean, rstd};

  NormFwdParams p;
  p.x = x.data_ptr();
  p.residual = has_res ? residual->data_ptr() : nullptr;
  p.weight = has_w ? weight->data_ptr() : nullptr;
  p.bias = has_b ? bias->data_ptr() : nullptr;
  p.y = y.data_ptr();
  p.residual_out = (has_res && store_residual) ? residual_out.data_ptr() : nullptr;
  p.mean = rms ? nullptr : mean.data_ptr<float>();
  p.rstd = rstd.data_ptr<float>();
  p.M = M;
  p.N = N;
  p.x_row_stride = x.stride(0);
  p.residual_row_stride = has_res ? residual->stride(0) : 0;
  p.y_row_stride = y.stride(0);
  p.residual_out_row_stride = p.residual_out ? residual_out.stride(0) : 0;
  p.eps = static_cast<float>(eps);
  p.rms = rms;
  p.dtype = to_dtype(dt);
  p.weight_dtype = has_w ? to_dtype(weight->scalar_type()) : DType::F32;
  p.bias_dtype = has_b ? to_dtype(bias->scalar_type()) : DType::F32;
  p.num_threads = num_threads();
  cpu::layer_norm_fwd(p);
  return {y, residual_out, mean, rstd};
}

// Gradients arrive in whatever layout autograd made (e.g. expanded, stride 0): those with a last-dim stride other
// than 1 are copied; rows may have any stride.
Tensor unit_last_stride(const Tensor& t) { return t.size(1) <= 1 || t.stride(1) == 1 ? t : t.contiguous(); }

std::tuple<Tensor, Tensor, Tensor> layer_norm_bwd_cpu(const Tensor& dy_in, const Tensor& s,
                                                      const std::optional<Tensor>& weight, const Tensor& mean,
                                                      const Tensor& rstd, const std::optional<Tensor>& dresidual_out,
                                                      bool rms, bool has_bias, bool need_dweight) {
  constexpr const char* op = "pyattn::layer_norm_bwd";
  TORCH_CHECK(s.device().is_cpu(), op, ": s must be a CPU tensor (got device ", s.device(), ")");
  TORCH_CHECK(s.dim() == 2, op, ": s must be 2-D (M, N) (got shape ", s.sizes(), ")");
  TORCH_CHECK(is_supported_dtype(s.scalar_type()), op, ": s must have dtype float32, bfloat16 or float16 (got ",
              s.scalar_type(), "; other dtypes go through the torch backend)");
  const int64_t M = s.size(0), N = s.size(1);
  TORCH_CHECK(N >= 1, op, ": s must have a non-empty last dimension (got shape ", s.sizes(), ")");
  const at::ScalarType dt = s.scalar_type();
  check_rows(op, "s", s, dt, "s", M, N);
  check_rows(op, "dy", dy_in, dt, "s", M, N, /*any_stride=*/true);
  const Tensor dy = unit_last_stride(dy_in);
  const bool has_w = weight.has_value() && weight->defined();
  const bool has_dres = dresidual_out.has_value() && dresidual_out->defined();
  if (has_w) check_param(op, "weight", *weight, dt, N);
  Tensor dres;
  if (has_dres) {
    check_rows(op, "dresidual_out", *dresidual_out, dt, "s", M, N, /*any_stride=*/true);
    dres = unit_last_stride(*dresidual_out);
  }
  if (!rms) check_stat(op, "mean", mean, M);
  check_stat(op, "rstd", rstd, M);
  TORCH_CHECK(!(rms && has_bias), op, ": has_bias must be False when rms=True");

  // dweight has weight's dtype; dbias too (s's dtype when there is no weight).
  const at::ScalarType pdt = has_w ? weight->scalar_type() : dt;
  const auto popts = s.options().dtype(pdt);
  const bool want_dw = need_dweight && has_w, want_db = need_dweight && has_bias;
  Tensor dx = at::empty({M, N}, s.options());
  Tensor dweight = want_dw ? at::empty({N}, popts) : at::empty({0}, popts);
  Tensor dbias = want_db ? at::empty({N}, popts) : at::empty({0}, popts);
  if (M == 0 && !want_dw && !want_db) return {dx, dweight, dbias};

  NormBwdParams p;
  p.dy = dy.data_ptr();
  p.s = s.data_ptr();
  p.weight = has_w ? weight->data_ptr() : nullptr;
  p.mean = rms ? nullptr : mean.data_ptr<float>();
  p.rstd = rstd.data_ptr<float>();
  p.dresidual_out = has_dres ? dres.data_ptr() : nullptr;
  p.dx = dx.data_ptr();
  p.dweight = want_dw ? dweight.data_ptr() : nullptr;
  p.dbias = want_db ? dbias.data_ptr() : nullptr;
  p.M = M;
  p.N = N;
  p.dy_row_stride = dy.stride(0);
  p.s_row_stride = s.stride(0);
  p.dresidual_out_row_stride = has_dres ? dres.stride(0) : 0;
  p.dx_row_stride = dx.stride(0);
  p.rms = rms;
  p.dtype = to_dtype(dt);
  p.weight_dtype = has_w ? to_dtype(weight->scalar_type()) : DType::F32;
  p.dweight_dtype = to_dtype(pdt);
  p.dbias_dtype = to_dtype(pdt);
  p.num_threads = num_threads();
  Tensor workspace;
  const int64_t ws = cpu::layer_norm_bwd_workspace_floats(p);
  if (ws > 0) {
    workspace = at::empty({ws}, s.options().dtype(at::kFloat));
    p.workspace = workspace.data_ptr<float>();
  }
  cpu::layer_norm_bwd(p);
  return {dx, dweight, dbias};
}

}  // namespace
}  // namespace pyattn

TORCH_LIBRARY_IMPL(pyattn, CPU, m) {
  m.impl("layer_norm_fwd", &pyattn::layer_norm_fwd_cpu);
  m.impl("layer_norm_bwd", &pyattn::layer_norm_bwd_cpu);
}
