// CPU implementations of pyattn::layer_norm_fwd / pyattn::layer_norm_bwd (schemas in library.cpp): input checks,
// output allocation and params filling (norm_checks.h, shared with the CUDA bindings in cuda/layer_norm.cpp), then
// the torch-free kernels of csrc/cpu/layer_norm.cpp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "norm_checks.h"
#include "pyattn/cpu_kernels.h"
#include "pyattn/params.h"

namespace pyattn {
namespace {

using at::Tensor;

int num_threads() { return at::in_parallel_region() ? 1 : at::get_num_threads(); }

std::tuple<Tensor, Tensor, Tensor, Tensor> layer_norm_fwd_cpu(const Tensor& x, const std::optional<Tensor>& residual,
                                                              const std::optional<Tensor>& weight,
                                                              const std::optional<Tensor>& bias, double eps, bool rms,
                                                              bool store_residual) {
  norm::check_fwd(x, residual, weight, bias, eps, rms, at::kCPU);
  const norm::FwdOutputs o = norm::alloc_fwd(x, norm::present(residual), rms, store_residual);
  if (x.size(0) == 0) return o.as_tuple();
  NormFwdParams p = norm::fwd_params(x, residual, weight, bias, eps, rms, store_residual, o);
  p.num_threads = num_threads();
  cpu::layer_norm_fwd(p);
  return o.as_tuple();
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_bwd_cpu(const Tensor& dy, const Tensor& s,
                                                      const std::optional<Tensor>& weight, const Tensor& mean,
                                                      const Tensor& rstd, const std::optional<Tensor>& dresidual_out,
                                                      bool rms, bool has_bias, bool need_dweight) {
  const norm::BwdInputs in = norm::check_bwd(dy, s, weight, mean, rstd, dresidual_out, rms, has_bias, at::kCPU);
  const norm::BwdOutputs o = norm::alloc_bwd(s, weight, has_bias, need_dweight);
  if (norm::bwd_is_empty(s, o)) return o.as_tuple();
  NormBwdParams p = norm::bwd_params(in, s, weight, mean, rstd, rms, o);
  p.num_threads = num_threads();
  Tensor workspace;
  const int64_t ws = cpu::layer_norm_bwd_workspace_floats(p);
  if (ws > 0) {
    workspace = at::empty({ws}, s.options().dtype(at::kFloat));
    p.workspace = workspace.data_ptr<float>();
  }
  cpu::layer_norm_bwd(p);
  return o.as_tuple();
}

}  // namespace
}  // namespace pyattn

TORCH_LIBRARY_IMPL(pyattn, CPU, m) {
  m.impl("layer_norm_fwd", &pyattn::layer_norm_fwd_cpu);
  m.impl("layer_norm_bwd", &pyattn::layer_norm_bwd_cpu);
}
