// CUDA implementations of pyattn::layer_norm_fwd / pyattn::layer_norm_bwd (schemas in ../library.cpp): the same
// checks, messages, outputs and params as the CPU bindings (../norm_checks.h), then the torch-free launchers of
// csrc/cuda/layer_norm.cu on the current stream of the input's device.
// NOT YET RUN ON A GPU: compiled, linked and registered offline only (scripts/build_cuda_ext.sh).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdlib>
#include <limits>
#include <optional>
#include <tuple>

#include "../norm_checks.h"
#include "../cuda_device.h"
#include "pyattn/cuda_kernels.h"
#include "pyattn/params.h"

namespace pyattn {
namespace {

using at::Tensor;

// PYATTN_DEBUG_NAN_FILL=1 (read on every call; for tests, as in the GRU bindings): outputs and the partial-sum
// workspace are filled with NaN before the kernels run, so an element a kernel fails to write, or scratch it reads
// before writing, shows up as NaN in the results.
bool nan_fill() {
  const char* e = std::getenv("PYATTN_DEBUG_NAN_FILL");
  return e != nullptr && e[0] == '1';
}
void nan_fill_all(std::initializer_list<const Tensor*> ts) {
  for (const Tensor* t : ts)
    if (t->defined() && t->numel() > 0) t->fill_(std::numeric_limits<double>::quiet_NaN());
}

std::tuple<Tensor, Tensor, Tensor, Tensor> layer_norm_fwd_cuda(const Tensor& x, const std::optional<Tensor>& residual,
                                                               const std::optional<Tensor>& weight,
                                                               const std::optional<Tensor>& bias, double eps,
                                                               bool rms, bool store_residual) {
  norm::check_fwd(x, residual, weight, bias, eps, rms, kCudaDevice);
  const c10::cuda::CUDAGuard guard(x.device());
  const norm::FwdOutputs o = norm::alloc_fwd(x, norm::present(residual), rms, store_residual);
  if (x.size(0) == 0) return o.as_tuple();
  if (nan_fill()) nan_fill_all({&o.y, &o.residual_out, &o.mean, &o.rstd});
  const NormFwdParams p = norm::fwd_params(x, residual, weight, bias, eps, rms, store_residual, o);
  C10_CUDA_CHECK(cuda::layer_norm_fwd(p, at::cuda::getCurrentCUDAStream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return o.as_tuple();
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_bwd_cuda(const Tensor& dy, const Tensor& s,
                                                       const std::optional<Tensor>& weight, const Tensor& mean,
                                                       const Tensor& rstd, const std::optional<Tensor>& dresidual_out,
                                                       bool rms, bool has_bias, bool need_dweight) {
  // check_bwd may copy dy / dresidual_out (unit last stride): on s's device, hence the guard first.
  TORCH_CHECK(on_cuda_device(s), norm::kBwdOp, ": s must be a CUDA tensor (got device ", s.device(), ")");
  const c10::cuda::CUDAGuard guard(s.device());
  const norm::BwdInputs in = norm::check_bwd(dy, s, weight, mean, rstd, dresidual_out, rms, has_bias, kCudaDevice);
  const norm::BwdOutputs o = norm::alloc_bwd(s, weight, has_bias, need_dweight);
  if (norm::bwd_is_empty(s, o)) return o.as_tuple();
  NormBwdParams p = norm::bwd_params(in, s, weight, mean, rstd, rms, o);
  // Partial sums for the deterministic dweight/dbias; from the caching allocator, ordered on the current stream.
  Tensor workspace;
  const int64_t ws = cuda::layer_norm_bwd_workspace_floats(p);
  if (ws > 0) {
    workspace = at::empty({ws}, s.options().dtype(at::kFloat));
    p.workspace = workspace.data_ptr<float>();
  }
  if (nan_fill()) nan_fill_all({&o.dx, &o.dweight, &o.dbias, &workspace});
  C10_CUDA_CHECK(cuda::layer_norm_bwd(p, at::cuda::getCurrentCUDAStream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return o.as_tuple();
}

}  // namespace
}  // namespace pyattn

PYATTN_CUDA_IMPL(m) {
  m.impl("layer_norm_fwd", &pyattn::layer_norm_fwd_cuda);
  m.impl("layer_norm_bwd", &pyattn::layer_norm_bwd_cuda);
}
