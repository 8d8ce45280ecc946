// Input checks, output allocation and params filling shared by the attention bindings of every device:
// csrc/bindings/attention.cpp (CPU) and csrc/bindings/cuda/attention.cpp (CUDA). Same checks and messages on both;
// only the device requirement differs (every tensor on q's device, whose type is `dev`).
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "pyattn/params.h"

namespace pyattn {
namespace attn_checks {

using at::Tensor;

inline DType to_dtype(at::ScalarType t, const char* backend) {
  switch (t) {
    case at::kFloat: return DType::F32;
    case at::kBFloat16: return DType::BF16;
    case at::kHalf: return DType::F16;
    default: TORCH_CHECK(false, "pyattn attention (", backend, "): unsupported dtype ", t);
  }
}

// t must live on device `dev` (CPU: any CPU tensor; CUDA: q's device).
inline void check_device(const char* op, const char* name, const Tensor& t, const at::Device& dev) {
  if (dev.is_cpu()) {
    TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor (got device ", t.device(), ")");
  } else {
    TORCH_CHECK(t.device() == dev, op, ": ", name, " must be a ", at::DeviceTypeName(dev.type()),
                " tensor on q's device ", dev, " (got device ", t.device(), ")");
  }
}

// A 4-D tensor on `dev` of dtype dt and the given sizes, returned with stride 1 along its last dim.
inline Tensor check4(const char* op, const char* name, const Tensor& t, at::ScalarType dt, at::IntArrayRef sizes,
                     const at::Device& dev) {
  check_device(op, name, t, dev);
  TORCH_CHECK(t.scalar_type() == dt, op, ": ", name, " must have dtype ", dt, " like q (got ", t.scalar_type(), ")");
  TORCH_CHECK(t.sizes() == sizes, op, ": ", name, " must have shape ", sizes, " (got ", t.sizes(), ")");
  return (t.size(3) > 1 && t.stride(3) != 1) ? t.contiguous() : t;
}

// (B, H, L, D) in the layout of `like`: (B, L, H, D) memory when like's heads lie inside its positions (stride(1) <
// stride(2): flash_attn_func's inputs, the head views of a packed projection), else contiguous. The rule of
// pyattn/ops/attention.py (_is_blhd), so the op takes what a kernel returns without a copy.
inline Tensor empty_like_layout(const Tensor& like, at::IntArrayRef sizes) {
  const bool blhd = like.size(1) > 1 && like.size(2) > 1 && like.stride(1) < like.stride(2);
  if (blhd) return at::empty({sizes[0], sizes[2], sizes[1], sizes[3]}, like.options()).transpose(1, 2);
  return at::empty(sizes, like.options());
}

inline void strides3(const Tensor& t, int64_t* s) {
  for (int d = 0; d < 3; ++d) s[d] = t.size(d) == 1 ? 0 : t.stride(d);
}

struct Sizes {
  int64_t B, Hq, Hkv, Lq, Lk, D, Dv;
};

// Checks q, k, v, mask and fills the common params (p.num_threads = 1: the CPU binding sets its own). Returns q, k, v
// with unit last strides. `dev_type`: the device type the binding serves; every tensor must be on q's device.
inline std::tuple<Tensor, Tensor, Tensor, Tensor, Sizes> fill_common(
    const char* op, const char* backend, at::DeviceType dev_type, AttnCommon& p, const Tensor& q_in,
    const Tensor& k_in, const Tensor& v_in, const std::optional<Tensor>& mask_in, double dropout_p, bool causal,
    bool bottom_right, double scale, int64_t seed, int64_t offset) {
  TORCH_CHECK(q_in.dim() == 4 && k_in.dim() == 4 && v_in.dim() == 4, op,
              ": q, k, v must be 4-D (B, H, L, D) (got shapes ", q_in.sizes(), ", ", k_in.sizes(), ", ",
              v_in.sizes(), ")");
  const at::Device dev = dev_type == at::kCPU ? at::Device(at::kCPU) : q_in.device();
  const at::ScalarType dt = q_in.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, op,
              ": q must have dtype float32, bfloat16 or float16 (got ", dt, "; the torch backend takes the rest)");
  Sizes s{q_in.size(0), q_in.size(1), k_in.size(1), q_in.size(2), k_in.size(2), q_in.size(3), v_in.size(3)};
  TORCH_CHECK(s.Hkv > 0 && s.Hq % s.Hkv == 0, op, ": k's head count ", s.Hkv, " must divide q's ", s.Hq);
  TORCH_CHECK(s.D > 0 && s.Dv > 0, op, ": head dims must be >= 1 (got D = ", s.D, ", Dv = ", s.Dv, ")");
  if (dev_type != at::kCPU) {
    TORCH_CHECK(q_in.device().type() == dev_type, op, ": q must be a ", at::DeviceTypeName(dev_type),
                " tensor (got device ", q_in.device(), ")");
  }
  Tensor q = check4(op, "q", q_in, dt, {s.B, s.Hq, s.Lq, s.D}, dev);
  Tensor k = check4(op, "k", k_in, dt, {s.B, s.Hkv, s.Lk, s.D}, dev);
  Tensor v = check4(op, "v", v_in, dt, {s.B, s.Hkv, s.Lk, s.Dv}, dev);
  TORCH_CHECK(std::isfinite(dropout_p) && dropout_p >= 0.0 && dropout_p < 1.0, op,
              ": dropout_p must be in [0, 1) (got ", dropout_p, ")");
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite (got ", scale, ")");
  Tensor mask;
  p.mask_kind = MaskKind::None;
  if (mask_in.has_value() && mask_in->defined()) {
    mask = *mask_in;
    check_device(op, "mask", mask, dev);
    TORCH_CHECK(mask.dim() == 4, op, ": mask must be 4-D (B|1, Hq|1, Lq|1, Lk|1) (got shape ", mask.sizes(), ")");
    const int64_t full[4] = {s.B, s.Hq, s.Lq, s.Lk};
    for (int d = 0; d < 4; ++d)
      TORCH_CHECK(mask.size(d) == 1 || mask.size(d) == full[d], op, ": mask of shape ", mask.sizes(),
                  " does not broadcast to (", s.B, ", ", s.Hq, ", ", s.Lq, ", ", s.Lk, ")");
    const at::ScalarType mt = mask.scalar_type();
    TORCH_CHECK(mt == at::kBool || mt == at::kFloat || mt == dt, op,
                ": mask must be bool, float32 or q's dtype (got ", mt, ")");
    p.mask_kind = mt == at::kBool ? MaskKind::Bool : MaskKind::Additive;
    p.mask_dtype = mt == at::kBool ? DType::F32 : to_dtype(mt, backend);
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
  p.dtype = to_dtype(dt, backend);
  p.num_threads = 1;
  return {q, k, v, mask, s};
}

// The backward's extra inputs: dout and out shaped like the forward's output, lse (B, Hq, Lq) float32 on `dev`.
// Returns dout, out (unit last strides) and a contiguous lse.
inline std::tuple<Tensor, Tensor, Tensor> check_bwd_inputs(const char* op, const Tensor& dout_in,
                                                           const Tensor& out_in, const Tensor& lse_in,
                                                           at::ScalarType dt, const Sizes& s, const at::Device& dev) {
  Tensor dout = check4(op, "dout", dout_in, dt, {s.B, s.Hq, s.Lq, s.Dv}, dev);
  Tensor out = check4(op, "out", out_in, dt, {s.B, s.Hq, s.Lq, s.Dv}, dev);
  const bool dev_ok = dev.is_cpu() ? lse_in.device().is_cpu() : lse_in.device() == dev;
  TORCH_CHECK(dev_ok && lse_in.scalar_type() == at::kFloat && lse_in.sizes() == at::IntArrayRef({s.B, s.Hq, s.Lq}),
              op, ": lse must be a float32 ", at::DeviceTypeName(dev.type()), " tensor of shape (", s.B, ", ", s.Hq,
              ", ", s.Lq, ") (got ", lse_in.scalar_type(), " ", lse_in.sizes(), " on ", lse_in.device(), ")");
  return {dout, out, lse_in.contiguous()};
}

// out (in q's layout) and lse (fp32, contiguous) allocated, with p's out/lse pointers and strides filled. Returns false
// (nothing to launch) for an empty problem: no query rows, or no key (every row fully masked: out 0, lse +inf).
inline bool alloc_fwd_outputs(AttnFwdParams& p, const Tensor& q, const Sizes& s, Tensor& out, Tensor& lse) {
  out = empty_like_layout(q, {s.B, s.Hq, s.Lq, s.Dv});
  lse = at::empty({s.B, s.Hq, s.Lq}, q.options().dtype(at::kFloat));
  if (s.B * s.Hq * s.Lq == 0) return false;
  if (s.Lk == 0) {
    out.zero_();
    lse.fill_(INFINITY);
    return false;
  }
  p.out = out.data_ptr();
  strides3(out, p.out_stride);
  p.lse = lse.data_ptr<float>();
  return true;
}

// dq, dk, dv allocated in q's / k's / v's layout, with p's dout/out/lse/dq/dk/dv pointers and strides filled.
// Returns false (gradients zeroed, nothing to launch) for an empty problem.
inline bool alloc_bwd_outputs(AttnBwdParams& p, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& dout,
                              const Tensor& out, const Tensor& lse, const Sizes& s, Tensor& dq, Tensor& dk,
                              Tensor& dv) {
  dq = empty_like_layout(q, {s.B, s.Hq, s.Lq, s.D});
  dk = empty_like_layout(k, {s.B, s.Hkv, s.Lk, s.D});
  dv = empty_like_layout(v, {s.B, s.Hkv, s.Lk, s.Dv});
  if (s.B * s.Hq * s.Lq == 0 || s.Lk == 0) {
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return false;
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
  return true;
}

}  // namespace attn_checks
}  // namespace pyattn
