// CPU implementations of pyattn::gru_seq_fwd / gru_seq_bwd (one direction of one GRU layer) and
// pyattn::gru_step_fwd / gru_step_bwd (one cell step), schemas in library.cpp: input checks, output and workspace
// allocation, params filling, then the torch-free kernels of csrc/cpu/gru.cpp: float32, float16 and bfloat16 (every
// tensor in the input's dtype; the kernels sum 16-bit products in fp32 and round the results to the dtype).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <tuple>

#include "gru_checks.h"
#include "pyattn/cpu_kernels.h"
#include "pyattn/cpu_workspace.h"
#include "pyattn/params.h"

namespace pyattn {
namespace {

using at::Tensor;
using gru::Grads;

int num_threads() { return at::in_parallel_region() ? 1 : std::max(1, at::get_num_threads()); }

// Checks and NaN-fill helpers shared with the CUDA bindings (csrc/bindings/gru_checks.h).
using gru::check_core;
using gru::check_t;
using gru::check_ws;
using gru::kernel_dtype;
using gru::maybe_nan_fill;
using gru::opt_bias;
using gru::Sizes;

// The kernels' scratch: the calling thread's reusable block (pyattn/cpu_workspace.h: no page faults per call), NaN
// filled under PYATTN_DEBUG_NAN_FILL=1 like the outputs.
float* kernel_scratch(cpu::Workspace& w, int64_t floats) {
  float* p = w.take(size_t(floats));
  if (gru::nan_fill()) std::fill(p, p + floats, std::numeric_limits<float>::quiet_NaN());
  return p;
}

std::tuple<Tensor, Tensor, Tensor> seq_fwd(const char* op, Tensor x, Tensor h0, Tensor w_ih, Tensor w_hh,
                                           const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh,
                                           bool reverse, bool needs_grad, bool keep_last = true) {
  gru::Target tg = gru::cpu_target();
  const Sizes s = check_core(op, x, h0, w_ih, w_hh, "h0", tg);
  Tensor kb_ih, kb_hh;
  const void* pb_ih = opt_bias(op, "bias_ih", b_ih, s.H, kb_ih, tg);
  const void* pb_hh = opt_bias(op, "bias_hh", b_hh, s.H, kb_hh, tg);
  const auto f32 = x.options().dtype(at::kFloat);
  Tensor out = at::empty({s.T, s.B, s.H}, x.options());
  Tensor ws = needs_grad ? at::empty({s.T, s.B, 4 * s.H}, f32) : at::empty({0}, f32);
  if (out.numel() == 0) {  // empty batch/hidden/sequence: nothing to run; out is empty and h_T = h0
    return {out, keep_last ? h0.clone() : Tensor(), ws};
  }

  GRUFwdParams p;
  p.x = x.data_ptr();
  p.h0 = h0.data_ptr();
  p.w_ih = w_ih.data_ptr();
  p.w_hh = w_hh.data_ptr();
  p.b_ih = pb_ih;
  p.b_hh = pb_hh;
  p.out = out.data_ptr();
  p.ws = needs_grad ? ws.data_ptr<float>() : nullptr;
  p.T = s.T;
  p.B = s.B;
  p.I = s.I;
  p.H = s.H;
  p.x_t_stride = x.stride(0);
  p.x_b_stride = x.stride(1);
  p.h0_row_stride = h0.stride(0);
  p.w_ih_row_stride = w_ih.stride(0);
  p.w_hh_row_stride = w_hh.stride(0);
  p.reverse = reverse;
  p.dtype = kernel_dtype(tg.dtype);
  p.num_threads = num_threads();
  maybe_nan_fill({&out, &ws});
  const int64_t floats = cpu::gru_fwd_workspace_floats(p);
  cpu::Workspace workspace(cpu::Workspace::round_floats(size_t(floats)));
  p.workspace = kernel_scratch(workspace, floats);
  cpu::gru_fwd(p);
  return {out, gru::last_state(out, reverse, keep_last), ws};
}

Grads seq_bwd(const char* op, Tensor dout, const std::optional<Tensor>& dh_last, Tensor x, Tensor h0, Tensor w_ih,
              Tensor w_hh, const std::optional<Tensor>& out, Tensor ws, bool has_b_ih, bool has_b_hh, bool reverse,
              bool need_weights) {
  gru::Target tg = gru::cpu_target();
  const Sizes s = check_core(op, x, h0, w_ih, w_hh, "h0", tg);
  dout = check_t(op, "dout", dout, {s.T, s.B, s.H}, tg);
  Tensor dhl;
  if (dh_last.has_value() && dh_last->defined()) dhl = check_t(op, "dh_last", *dh_last, {s.B, s.H}, tg);
  Tensor o;
  if (out.has_value() && out->defined()) o = check_t(op, "out", *out, {s.T, s.B, s.H}, tg);
  const auto wopts = w_ih.options();
  Tensor dx = at::empty({s.T, s.B, s.I}, x.options());
  Tensor dh0 = at::empty({s.B, s.H}, h0.options());
  Tensor dw_ih = need_weights ? at::empty({3 * s.H, s.I}, wopts) : at::empty({0}, wopts);
  Tensor dw_hh = need_weights ? at::empty({3 * s.H, s.H}, wopts) : at::empty({0}, wopts);
  Tensor db_ih = (need_weights && has_b_ih) ? at::empty({3 * s.H}, wopts) : at::empty({0}, wopts);
  Tensor db_hh = (need_weights && has_b_hh) ? at::empty({3 * s.H}, wopts) : at::empty({0}, wopts);
  if (s.T == 0 || s.B == 0 || s.H == 0) {  // empty: the torch backend's answers, no kernel
    dx.zero_();
    if (dhl.defined() && s.T == 0) dh0.copy_(dhl); else dh0.zero_();
    for (Tensor* g : {&dw_ih, &dw_hh, &db_ih, &db_hh}) g->zero_();
    return {dx, dh0, dw_ih, dw_hh, db_ih, db_hh};
  }
  TORCH_CHECK(s.T == 1 || o.defined(), op, ": out (the forward's output) is required when seq_len > 1");
  ws = check_ws(op, ws, {s.T, s.B, 4 * s.H}, tg);

  GRUBwdParams p;
  p.dout = dout.data_ptr();
  p.dh_last = dhl.defined() ? dhl.data_ptr() : nullptr;
  p.x = x.data_ptr();
  p.h0 = h0.data_ptr();
  p.w_ih = w_ih.data_ptr();
  p.w_hh = w_hh.data_ptr();
  p.out = o.defined() ? o.data_ptr() : nullptr;
  p.ws = ws.data_ptr<float>();
  p.dx = dx.data_ptr();
  p.dh0 = dh0.data_ptr();
  if (need_weights) {
    p.dw_ih = dw_ih.data_ptr();
    p.dw_hh = dw_hh.data_ptr();
    p.db_ih = has_b_ih ? db_ih.data_ptr() : nullptr;
    p.db_hh = has_b_hh ? db_hh.data_ptr() : nullptr;
  }
  p.T = s.T;
  p.B = s.B;
  p.I = s.I;
  p.H = s.H;
  p.dout_t_stride = dout.stride(0);
  p.dout_b_stride = dout.stride(1);
  p.dh_last_row_stride = dhl.defined() ? dhl.stride(0) : 0;
  p.x_t_stride = x.stride(0);
  p.x_b_stride = x.stride(1);
  p.h0_row_stride = h0.stride(0);
  p.w_ih_row_stride = w_ih.stride(0);
  p.w_hh_row_stride = w_hh.stride(0);
  p.out_t_stride = o.defined() ? o.stride(0) : 0;
  p.out_b_stride = o.defined() ? o.stride(1) : 0;
  p.reverse = reverse;
  p.need_weights = need_weights;
  p.dtype = kernel_dtype(tg.dtype);
  p.num_threads = num_threads();
  maybe_nan_fill({&dx, &dh0, &dw_ih, &dw_hh, &db_ih, &db_hh});
  const int64_t floats = cpu::gru_bwd_workspace_floats(p);
  cpu::Workspace workspace(cpu::Workspace::round_floats(size_t(floats)));
  p.workspace = kernel_scratch(workspace, floats);
  cpu::gru_bwd(p);
  return {dx, dh0, dw_ih, dw_hh, db_ih, db_hh};
}

std::tuple<Tensor, Tensor, Tensor> gru_seq_fwd_cpu(const Tensor& x, const Tensor& h0, const Tensor& w_ih,
                                                   const Tensor& w_hh, const std::optional<Tensor>& b_ih,
                                                   const std::optional<Tensor>& b_hh, bool reverse, bool needs_grad) {
  return seq_fwd("pyattn::gru_seq_fwd", x, h0, w_ih, w_hh, b_ih, b_hh, reverse, needs_grad);
}

Grads gru_seq_bwd_cpu(const Tensor& dout, const Tensor& dh_last, const Tensor& x, const Tensor& h0,
                      const Tensor& w_ih, const Tensor& w_hh, const Tensor& out, const Tensor& ws, bool has_b_ih,
                      bool has_b_hh, bool reverse, bool need_weights) {
  return seq_bwd("pyattn::gru_seq_bwd", dout, dh_last, x, h0, w_ih, w_hh, out, ws, has_b_ih, has_b_hh, reverse,
                 need_weights);
}

std::tuple<Tensor, Tensor> gru_step_fwd_cpu(const Tensor& x, const Tensor& hx, const Tensor& w_ih,
                                            const Tensor& w_hh, const std::optional<Tensor>& b_ih,
                                            const std::optional<Tensor>& b_hh, bool needs_grad) {
  return gru::step_fwd(seq_fwd, x, hx, w_ih, w_hh, b_ih, b_hh, needs_grad);
}

Grads gru_step_bwd_cpu(const Tensor& dh, const Tensor& x, const Tensor& hx, const Tensor& w_ih, const Tensor& w_hh,
                       const Tensor& ws, bool has_b_ih, bool has_b_hh, bool need_weights) {
  return gru::step_bwd(seq_bwd, dh, x, hx, w_ih, w_hh, ws, has_b_ih, has_b_hh, need_weights);
}

}  // namespace
}  // namespace pyattn

TORCH_LIBRARY_IMPL(pyattn, CPU, m) {
  m.impl("gru_seq_fwd", &pyattn::gru_seq_fwd_cpu);
  m.impl("gru_seq_bwd", &pyattn::gru_seq_bwd_cpu);
  m.impl("gru_step_fwd", &pyattn::gru_step_fwd_cpu);
  m.impl("gru_step_bwd", &pyattn::gru_step_bwd_cpu);
}
