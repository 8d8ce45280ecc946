// CPU implementations of pyattn::attn_fwd / attn_bwd / attn_dropout_keep (schemas in library.cpp): input checks,
// output allocation (in q's / k's / v's layout), params filling, then the torch-free kernels of
// csrc/cpu/attention.cpp. Inputs keep their strides (0 included); only a last dim with stride != 1 is copied.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "pyattn/cpu_kernels.h"
#include "pyattn/params.h"

namespace pyattn {
namespace {

using at::Tensor;

int num_threads() { return at::in_parallel_region() ? 1 : std::max(1, at::get_num_threads()); }

DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::F32;
    case at::kBFloat16: return DType::BF16;
    case at::kHalf: return DType::F16;
    default: TORCH_CHECK(false, "pyattn attention (cpp): unsupported dtype ", t);
  }
}

// A 4-D CPU tensor of dtype dt and the given sizes, returned with stride 1 along its last dim.
Tensor check4(const char* op, const char* name, const Tensor& t, at::ScalarType dt, at::IntArrayRef sizes) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor (got device ", t.device(), ")");
  TORCH_CHECK(t.scalar_type() == dt, op, ": ", name, " must have dtype ", dt, " like q (got ", t.scalar_type(), ")");
  TORCH_CHECK(t.sizes() == sizes, op, ": ", name, " must have shape ", sizes, " (got ", t.sizes(), ")");
  return (t.size(3) > 1 && t.stride(3) != 1) ? t.contiguous() : t;
}

// (B, H, L, D) in the layout of `like`: a (B, L, H, D) transposed view when like is one, else contiguous.
Tensor empty_like_layout(const Tensor& like, at::IntArrayRef sizes) {
  const bool blhd = !like.is_contiguous() && like.transpose(1, 2).is_contiguous();
  if (blhd) return at::empty({sizes[0], sizes[2], sizes[1], sizes[3]}, like.options()).transpose(1, 2);
  return at::empty(sizes, like.options());
}

void strides3(const Tensor& t, int64_t* s) {
  for (int d = 0; d < 3; ++d) s[d] = t.size(d) == 1 ? 0 : t.stride(d);
}

struct Sizes {
  int64_t B, Hq, Hkv, Lq, Lk, D, Dv;
};

// Checks q, k, v, mask and fills the common params. Returns q, k, v with unit last strides.
std::tuple<Tensor, Tensor, Tensor, Tensor, Sizes> fill_common(const char* op, AttnCommon& p, const Tensor& q_in,
                                                                const Tensor& k_in, const Tensor& v_in,
                                                                const std::optional<Tensor>& mask_in,
                                                                double dropout_p, bool causal, bool bottom_right,
                                                                double scale, int64_t seed, int64_t offset) {
  TORCH_CHECK(q_in.dim() == 4 && k_in.dim() == 4 && v_in.dim() == 4, op,
              ": q, k, v must be 4-D (B, H, L, D) (got shapes ", q_in.sizes(), ", ", k_in.sizes(), ", ",
              v_in.sizes(), ")");
  const at::ScalarType dt = q_in.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, op,
              ": q must have dtype float32, bfloat16 or float16 (got ", dt, "; the torch backend takes the rest)");
  Sizes s{q_in.size(0), q_in.size(1), k_in.size(1), q_in.size(2), k_in.size(2), q_in.size(3), v_in.size(3)};
  TORCH_CHECK(s.Hkv > 0 && s.Hq % s.Hkv == 0, op, ": k's head count ", s.Hkv, " must divide q's ", s.Hq);
  TORCH_CHECK(s.D > 0 && s.Dv > 0, op, ": head dims must be >= 1 (got D = ", s.D, ", Dv = ", s.Dv, ")");
  Tensor q = check4(op, "q", q_in, dt, {s.B, s.Hq, s.Lq, s.D});
  Tensor k = check4(op, "k", k_in, dt, {s.B, s.Hkv, s.Lk, s.D});
  Tensor v = check4(op, "v", v_in, dt, {s.B, s.Hkv, s.Lk, s.Dv});
  TORCH_CHECK(std::isfinite(dropout_p) && dropout_p >= 0.0 && dropout_p < 1.0, op,
              ": dropout_p must be in [0, 1) (got ", dropout_p, ")");
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite (got ", scale, ")");
  Tensor mask;
  p.mask_kind = MaskKind::None;
  if (mask_in.has_value() && mask_in->defined()) {
    mask = *mask_in;
    TORCH_CHECK(mask.device().is_cpu(), op, ": mask must be a CPU tensor (got device ", mask.device(), ")");
    TORCH_CHECK(mask.dim() == 4, op, ": mask must be 4-D (B|1, Hq|1, Lq|1, Lk|1) (got shape ", mask.sizes(), ")");
    const int64_t full[4] = {s.B, s.Hq, s.Lq, s.Lk};
    for (int d = 0; d < 4; ++d)
      TORCH_CHECK(mask.size(d) == 1 || mask.size(d) == full[d], op, ": mask of shape ", mask.sizes(),
                  " does not broadcast to (", s.B, ", ", s.Hq, ", ", s.Lq, ", ", s.Lk, ")");
    const at::ScalarType mt = mask.scalar_type();
    TORCH_CHECK(mt == at::kBool || mt == at::kFloat || mt == dt, op,
                ": mask must be bool, float32 or q's dtype (got ", mt, ")");
    p.mask_kind = mt == at::kBool ? MaskKind::Bool : MaskKind::Additive;
    p.mask_dtype = mt == at::kBool ? DType::F32 : to_dtype(mt);
    p.mask = mask.data_ptr();
    for (int d = 0; d < 4; ++d) p.mask_stride[d] = mask.size(d) == 1 ? 0 : mask.stride(d);
  }
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  strides3(q, p.q_stride);
  strides3(k, p.k_stride);
  strides3(v, p.v_stride);
  p.B = s.B;
  p.Hq = s.Hq;
  p.Hkv = s.Hkv;
  p.Lq = s.Lq;
  p.Lk = s.Lk;
  p.D = s.D;
  p.Dv = s.Dv;
  p.scale = static_cast<float>(scale);
  p.dropout_p = static_cast<float>(dropout_p);
  p.seed = static_cast<uint64_t>(seed);
  p.offset = static_cast<uint64_t>(offset);
  p.causal = causal;
  p.bottom_right = bottom_right;
  p.dtype = to_dtype(dt);
  p.num_threads = num_threads();
  return {q, k, v, mask, s};
}

std::tuple<Tensor, Tensor> attn_fwd_cpu(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
                                        const std::optional<Tensor>& mask, double dropout_p, bool causal,
                                        bool bottom_right, double scale, int64_t seed, int64_t offset) {
  AttnFwdParams p;
  auto [q, k, v, m, s] = fill_common("pyattn::attn_fwd", p, q_in, k_in, v_in, mask, dropout_p, causal, bottom_right,
                                     scale, seed, offset);
  Tensor out = empty_like_layout(q, {s.B, s.Hq, s.Lq, s.Dv});
  Tensor lse = at::empty({s.B, s.Hq, s.Lq}, q.options().dtype(at::kFloat));
  if (s.B * s.Hq * s.Lq == 0) return {out, lse};
  if (s.Lk == 0) {  // no key: every row is fully masked
    out.zero_();
    lse.fill_(INFINITY);
    return {out, lse};
  }
  p.out = out.data_ptr();
  strides3(out, p.out_stride);
  p.lse = lse.data_ptr<float>();
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
  const at::ScalarType dt = q.scalar_type();
  Tensor dout = check4(op, "dout", dout_in, dt, {s.B, s.Hq, s.Lq, s.Dv});
  Tensor out = check4(op, "out", out_in, dt, {s.B, s.Hq, s.Lq, s.Dv});
  TORCH_CHECK(lse_in.device().is_cpu() && lse_in.scalar_type() == at::kFloat &&
                  lse_in.sizes() == at::IntArrayRef({s.B, s.Hq, s.Lq}),
              op, ": lse must be a float32 CPU tensor of shape (", s.B, ", ", s.Hq, ", ", s.Lq, ") (got ",
              lse_in.scalar_type(), " ", lse_in.sizes(), " on ", lse_in.device(), ")");
  Tensor lse = lse_in.contiguous();
  Tensor dq = empty_like_layout(q, {s.B, s.Hq, s.Lq, s.D});
  Tensor dk = empty_like_layout(k, {s.B, s.Hkv, s.Lk, s.D});
  Tensor dv = empty_like_layout(v, {s.B, s.Hkv, s.Lk, s.Dv});
  if (s.B * s.Hq * s.Lq == 0 || s.Lk == 0) {
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  p.dout = dout.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  strides3(dout, p.dout_stride);
  strides3(out, p.out_stride);
  strides3(dq, p.dq_stride);
  strides3(dk, p.dk_stride);
  strides3(dv, p.dv_stride);
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
