// Input checks and small helpers shared by the GRU bindings: csrc/bindings/gru.cpp (CPU kernels, float32) and
// csrc/bindings/cuda/gru.cpp (CUDA kernels, float32/float16/bfloat16). Torch-aware; header-only.
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>
#include <initializer_list>
#include <limits>
#include <optional>
#include <tuple>

#include "cuda_device.h"
#include "pyattn/params.h"

namespace pyattn {
namespace gru {

using at::Tensor;

// PYATTN_DEBUG_NAN_FILL=1 (read on every call; for tests): outputs, the saved workspace and the kernels' scratch are
// filled with NaN before the kernel runs, so an element the kernel fails to write, or scratch it reads before
// writing, shows up as NaN in the results.
inline bool nan_fill() {
  const char* e = std::getenv("PYATTN_DEBUG_NAN_FILL");
  return e != nullptr && e[0] == '1';
}
inline void maybe_nan_fill(std::initializer_list<Tensor*> ts) {
  if (!nan_fill()) return;
  for (Tensor* t : ts)
    if (t->numel() > 0) t->fill_(std::numeric_limits<double>::quiet_NaN());
}

// What the kernels behind a binding take: every tensor on the input's device (CPU for the CPU bindings) with the
// input's dtype (float32, float16 or bfloat16); check_core fills `device` (CUDA) and `dtype` from the input.
struct Target {
  bool cuda = false;
  at::Device device = at::Device(at::kCPU);
  at::ScalarType dtype = at::kFloat;
};
inline Target cpu_target() { return Target{}; }
inline Target cuda_target() {
  Target t;
  t.cuda = true;
  return t;
}

inline const char* dtype_text(at::ScalarType s) {
  switch (s) {
    case at::kFloat:
      return "float32";
    case at::kHalf:
      return "float16";
    case at::kBFloat16:
      return "bfloat16";
    case at::kDouble:
      return "float64";
    default:
      return c10::toString(s);
  }
}

// The kernels' DType of a dtype check_core admitted.
inline DType kernel_dtype(at::ScalarType s) {
  switch (s) {
    case at::kHalf:
      return DType::F16;
    case at::kBFloat16:
      return DType::BF16;
    default:
      return DType::F32;  // check_core admits float32, float16 and bfloat16 only
  }
}

// A tensor with the given sizes, on the target's device and dtype; returned with stride 1 along its last dim
// (copied when not so).
inline Tensor check_t(const char* op, const char* name, const Tensor& t, at::IntArrayRef sizes, const Target& tg) {
  TORCH_CHECK(t.defined(), op, ": ", name, " must be a tensor");
  if (!tg.cuda) {
    TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor (got device ", t.device(), ")");
  } else {
    TORCH_CHECK(t.device() == tg.device, op, ": ", name, " must be a CUDA tensor on the input's device ", tg.device,
                " (got device ", t.device(), ")");
  }
  TORCH_CHECK(t.scalar_type() == tg.dtype, op, ": ", name, " must have dtype ", dtype_text(tg.dtype),
              " (the input's dtype; got ", dtype_text(t.scalar_type()), ")");
  TORCH_CHECK(t.sizes() == sizes, op, ": ", name, " must have shape ", sizes, " (got ", t.sizes(), ")");
  if (t.dim() > 0 && t.size(-1) > 1 && t.stride(-1) != 1) return t.contiguous();
  return t;
}

// ws: (rows..., 4H) float32 on the target's device; made contiguous.
inline Tensor check_ws(const char* op, const Tensor& ws, at::IntArrayRef sizes, const Target& tg) {
  if (!tg.cuda) {
    TORCH_CHECK(ws.device().is_cpu(), op, ": ws must be a CPU tensor (got device ", ws.device(), ")");
  } else {
    TORCH_CHECK(ws.device() == tg.device, op, ": ws must be a CUDA tensor on the input's device ", tg.device,
                " (got device ", ws.device(), ")");
  }
  TORCH_CHECK(ws.scalar_type() == at::kFloat, op, ": ws must have dtype float32 (got ", ws.scalar_type(), ")");
  TORCH_CHECK(ws.sizes() == sizes, op, ": ws must have shape ", sizes,
              " (the forward's [r | z | n | hn] workspace, saved with needs_grad=True; got ", ws.sizes(), ")");
  return ws.contiguous();
}

struct Sizes {
  int64_t T, B, I, H;
};

// x (T, B, I), h (B, H), w_ih (3H, I), w_hh (3H, H): checks and returns the sizes. H comes from w_hh. A CUDA target
// takes its device and dtype from x here.
inline Sizes check_core(const char* op, Tensor& x, Tensor& h, Tensor& w_ih, Tensor& w_hh, const char* hname,
                        Target& tg) {
  TORCH_CHECK(w_hh.dim() == 2, op, ": weight_hh must be 2-D (3 * hidden_size, hidden_size) (got shape ",
              w_hh.sizes(), ")");
  const int64_t H = w_hh.size(1);
  TORCH_CHECK(w_hh.size(0) == 3 * H, op, ": weight_hh must have shape (3 * hidden_size, hidden_size) = (", 3 * H,
              ", ", H, ") (got ", w_hh.sizes(), ")");
  TORCH_CHECK(x.dim() == 3, op, ": input must be 3-D (seq_len, batch, input_size) (got shape ", x.sizes(), ")");
  if (tg.cuda) {
    TORCH_CHECK(on_cuda_device(x), op, ": input must be a CUDA tensor (got device ", x.device(), ")");
    tg.device = x.device();
  } else {
    TORCH_CHECK(x.device().is_cpu(), op, ": input must be a CPU tensor (got device ", x.device(), ")");
  }
  const at::ScalarType s = x.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kHalf || s == at::kBFloat16, op,
              ": input must have dtype float32, float16 or bfloat16 (got ", dtype_text(s), "; the ",
              tg.cuda ? "cuda" : "cpp", " GRU kernels implement these, other dtypes go through the torch backend)");
  tg.dtype = s;
  const int64_t T = x.size(0), B = x.size(1), I = x.size(2);
  x = check_t(op, "input", x, {T, B, I}, tg);
  h = check_t(op, hname, h, {B, H}, tg);
  w_ih = check_t(op, "weight_ih", w_ih, {3 * H, I}, tg);
  w_hh = check_t(op, "weight_hh", w_hh, {3 * H, H}, tg);
  return {T, B, I, H};
}

// An optional bias (3H,): nullptr when absent, else its (contiguous, kept alive in `keep`) data.
inline const void* opt_bias(const char* op, const char* name, const std::optional<Tensor>& b, int64_t H, Tensor& keep,
                            const Target& tg) {
  if (!b.has_value() || !b->defined()) return nullptr;
  keep = check_t(op, name, *b, {3 * H}, tg).contiguous();
  return keep.data_ptr();
}

// A sequence op's h_T: a copy of out's last step in processing order; undefined when !keep (the step ops, whose state
// is out[0], skip the copy).
inline Tensor last_state(const Tensor& out, bool reverse, bool keep) {
  return keep ? out.select(0, reverse ? 0 : out.size(0) - 1).clone() : Tensor();
}

// dx, dh0, dw_ih, dw_hh, db_ih, db_hh
using Grads = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

// The step ops of both bindings: one cell step is a one-step sequence of the binding's seq_fwd / seq_bwd.
template <class SeqFwd>
std::tuple<Tensor, Tensor> step_fwd(SeqFwd seq_fwd, const Tensor& x, const Tensor& hx, const Tensor& w_ih,
                                    const Tensor& w_hh, const std::optional<Tensor>& b_ih,
                                    const std::optional<Tensor>& b_hh, bool needs_grad) {
  constexpr const char* op = "pyattn::gru_step_fwd";
  TORCH_CHECK(x.dim() == 2, op, ": input must be 2-D (batch, input_size) (got shape ", x.sizes(), ")");
  TORCH_CHECK(hx.dim() == 2, op, ": hx must be 2-D (batch, hidden_size) (got shape ", hx.sizes(), ")");
  // (keep_last false: the step's state is out[0]; no copy of it as h_last)
  auto [out, h_last, ws] = seq_fwd(op, x.unsqueeze(0), hx, w_ih, w_hh, b_ih, b_hh, false, needs_grad, false);
  return {out.squeeze(0), needs_grad ? ws.squeeze(0) : ws};
}

template <class SeqBwd>
Grads step_bwd(SeqBwd seq_bwd, const Tensor& dh, const Tensor& x, const Tensor& hx, const Tensor& w_ih,
               const Tensor& w_hh, const Tensor& ws, bool has_b_ih, bool has_b_hh, bool need_weights) {
  constexpr const char* op = "pyattn::gru_step_bwd";
  TORCH_CHECK(x.dim() == 2, op, ": input must be 2-D (batch, input_size) (got shape ", x.sizes(), ")");
  TORCH_CHECK(dh.dim() == 2, op, ": dh must be 2-D (batch, hidden_size) (got shape ", dh.sizes(), ")");
  TORCH_CHECK(ws.dim() == 2, op, ": ws must be 2-D (batch, 4 * hidden_size) (got shape ", ws.sizes(), ")");
  Grads g = seq_bwd(op, dh.unsqueeze(0), std::nullopt, x.unsqueeze(0), hx, w_ih, w_hh, std::nullopt,
                    ws.unsqueeze(0), has_b_ih, has_b_hh, false, need_weights);
  std::get<0>(g) = std::get<0>(g).squeeze(0);
  return g;
}

}  // namespace gru
}  // namespace pyattn
