// CPU implementations of pyattn::attn_fwd / attn_bwd / attn_dropout_keep (schemas in library.cpp): input checks,
// output allocation (in q's / k's / v's layout), params filling, then the torch-free kernels of
// csrc/cpu/attention.cpp. Inputs keep their strides (0 included); only a last dim with stride != 1 is copied.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "attention_checks.h"
#include "pyattn/cpu_kernels.h"
#include "pyattn/params.h"

namespace pyattn {
namespace {

using at::Tensor;

int num_threads() { return at::in_parallel_region() ? 1 : std::max(1, at::get_num_threads()); }

using attn_checks::check_bwd_inputs;

// Checks (csrc/bindings/attention_checks.h, shared with the CUDA binding) and the CPU thread count.
template <class P>
auto fill_common(const char* op, P& p, const Tensor& q, const Tensor& k, const Tensor& v,
                 const std::optional<Tensor>& mask, double dropout_p, bool causal, bool bottom_right, double scale,
                 int64_t seed, int64_t offset) {
  auto r = attn_checks::fill_common(op, "cpp", at::kCPU, p, q, k, v, mask, dropout_p, causal, bottom_right, scale,
                                    seed, offset);
  p.num_threads = num_threads();
  return r;
}

std::tuple<Tensor, Tensor> attn_fwd_cpu(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
                                        const std::optional<Tensor>& mask, double dropout_p, bool causal,
                                        bool bottom_right, double scale, int64_t seed, int64_t offset) {
  AttnFwdParams p;
  auto [q, k, v, m, s] = fill_common("pyattn::attn_fwd", p, q_in, k_in, v_in, mask, dropout_p, causal, bottom_right,
                                     scale, seed, offset);
  Tensor out, lse;
  if (!attn_checks::alloc_fwd_outputs(p, q, s, out, lse)) return {out, lse};
  cpu::attention_fwd(p);
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> attn_bwd_cpu(const Tensor& dout_in, const Tensor& q_in, const Tensor& k_in,
                                                const Tensor& v_in, const Tensor& out_in, const Tensor& lse_in,
                                                const std::optional<Tensor>& mask, double dropout_p, bool causal,
                                                bool bottom_right, double scale, int64_t seed, int64_t offset) {
  constexpr const char* op = "pyattn::attn_bwd";
  AttnBwdParams p;
  auto [q, k, v, m, s] =
      fill_common(op, p, q_in, k_in, v_in, mask, dropout_p, causal, bottom_right, scale, seed, offset);
  auto [dout, out, lse] = check_bwd_inputs(op, dout_in, out_in, lse_in, q.scalar_type(), s, at::Device(at::kCPU));
  Tensor dq, dk, dv;
  if (!attn_checks::alloc_bwd_outputs(p, q, k, v, dout, out, lse, s, dq, dk, dv)) return {dq, dk, dv};
  cpu::attention_bwd(p);
  return {dq, dk, dv};
}

// The keep-mask (B, H, Lq, Lk) bool that attn_fwd / attn_bwd apply for (seed, offset, p): for tests and debugging.
Tensor attn_dropout_keep_cpu(int64_t seed, int64_t offset, int64_t B, int64_t H, int64_t Lq, int64_t Lk, double p) {
  TORCH_CHECK(B >= 0 && H >= 0 && Lq >= 0 && Lk >= 0, "pyattn::attn_dropout_keep: sizes must be >= 0");
  TORCH_CHECK(p >= 0.0 && p < 1.0, "pyattn::attn_dropout_keep: p must be in [0, 1) (got ", p, ")");
  Tensor keep = at::empty({B, H, Lq, Lk}, at::TensorOptions().dtype(at::kBool));
  bool* k = keep.data_ptr<bool>();
  at::parallel_for(0, B * H * Lq, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t i = r % Lq, h = (r / Lq) % H, b = r / (Lq * H);
      for (int64_t j = 0; j < Lk; ++j)
        k[r * Lk + j] = cpu::attn_dropout_keep(uint64_t(seed), uint64_t(offset), H, Lq, b, h, i, j, float(p));
    }
  });
  return keep;
}

}  // namespace
}  // namespace pyattn

TORCH_LIBRARY_IMPL(pyattn, CPU, m) {
  m.impl("attn_fwd", &pyattn::attn_fwd_cpu);
  m.impl("attn_bwd", &pyattn::attn_bwd_cpu);
}

TORCH_LIBRARY_IMPL(pyattn, CompositeExplicitAutograd, m) {
  m.impl("attn_dropout_keep", &pyattn::attn_dropout_keep_cpu);
}
