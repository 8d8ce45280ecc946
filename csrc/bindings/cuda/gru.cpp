// CUDA implementations of pyattn::gru_seq_fwd / gru_seq_bwd (one direction of one GRU layer) and
// pyattn::gru_step_fwd / gru_step_bwd (one cell step), schemas in ../library.cpp. Same checks and error texts as the
// CPU bindings (../gru_checks.h), but float32, float16 and bfloat16 are taken (every tensor in the input's dtype, on
// its device). The GEMMs run through cuBLAS (at::mm / addmm, fp32 outputs: fp16/bf16 operands with fp32
// accumulation, never rounded to the input dtype), the gate math in the fused kernels of csrc/cuda/gru.cu:
//   forward:  one step (a cell, T = 1) of a small batch: one launch (gru_cell_fwd: both projections and the gates);
//             else gi = X W_ih^T for all steps (one GEMM), then every step in one cooperative launch (gru_rec_fwd: the
//             blocks keep W_hh's rows in shared memory, gh = h W_hh^T and the gates fused, a grid barrier per step)
//             when those rows fit, else per step gh = h W_hh^T (one GEMM) + one fused launch (r, z, n, h', ws;
//             both biases added there);
//   backward: every step in one cooperative launch when W_hh's columns fit (gru_rec_bwd: gate gradients, then
//             dh_prev = dh z + dgh W_hh, a grid barrier per step), else per step (reverse processing order) one
//             fused launch (dgi, dgh, dh z) + one addmm (dh_prev = dh z + dgh W_hh, in place); then dx = dGi W_ih,
//             dW_ih = dGi^T X, dW_hh = dGh^T Hprev and the bias grads are one GEMM / column sum each over all
//             T * B rows.
// fp32 GEMMs follow torch's TF32 setting (torch.backends.cuda.matmul.allow_tf32, off by default).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <type_traits>

#include "../gru_checks.h"
#include "../cuda_device.h"
#include "pyattn/cuda_kernels.h"
#include "pyattn/params.h"

namespace pyattn {
namespace {

using at::Tensor;
using gru::Grads;
using gru::check_core;
using gru::check_t;
using gru::check_ws;
using gru::kernel_dtype;
using gru::maybe_nan_fill;
using gru::opt_bias;
using gru::Sizes;

// a (M, K) @ b (K, N) -> fp32: fp32 operands as they are, fp16/bf16 through cuBLAS with fp32 output.
#ifdef PYATTN_CUDA_EMU  // CPU torch has no mm.dtype: the same exact products of 16-bit values, summed in fp32
Tensor mm_f32(const Tensor& a, const Tensor& b) { return at::mm(a.to(at::kFloat), b.to(at::kFloat)); }
void mm_f32_out(Tensor& out, const Tensor& a, const Tensor& b) { at::mm_out(out, a.to(at::kFloat), b.to(at::kFloat)); }
#else
Tensor mm_f32(const Tensor& a, const Tensor& b) {
  return a.scalar_type() == at::kFloat ? at::mm(a, b) : at::mm(a, b, at::kFloat);
}
void mm_f32_out(Tensor& out, const Tensor& a, const Tensor& b) {
  if (a.scalar_type() == at::kFloat)
    at::mm_out(out, a, b);
  else
    at::mm_out(out, a, b, at::kFloat);
}
#endif

// Row t of a (T, rows, cols) tensor with unit last stride, as a raw pointer.
void* row_ptr(const Tensor& t, int64_t i) {
  return static_cast<char*>(t.data_ptr()) + i * t.stride(0) * static_cast<int64_t>(t.element_size());
}

// The device facts the persistent kernels' plan reads (GRURecFwdParams / GRURecBwdParams).
template <class P>
void fill_device(P& p, const Tensor& x) {
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(x.device().index());
  p.num_sms = prop->multiProcessorCount;
  p.smem_per_block = prop->sharedMemPerBlockOptin;
  if constexpr (!std::is_same_v<P, GRUCellFwdParams>) p.cc_major = prop->major;
}

// The grid barrier's zeroed counter when the plan needs one (kept alive by `keep` until the launch is enqueued; the
// caching allocator keeps it for the stream), else nullptr.
unsigned long long* sync_counter(const cuda::GRURecPlan& plan, const Tensor& like, Tensor& keep) {
  if (!plan.needs_sync) return nullptr;
  keep = at::zeros({1}, like.options().dtype(at::kLong));
  return reinterpret_cast<unsigned long long*>(keep.data_ptr<int64_t>());
}

// One step (x (1, B, I)) in one launch (gru_cell_fwd) when its plan takes the call; false: nothing was run.
bool cell_step(const Tensor& x, const Tensor& h0, const Tensor& w_ih, const Tensor& w_hh, const void* b_ih,
               const void* b_hh, Tensor& out, Tensor* ws, int64_t I, const gru::Target& tg, cudaStream_t stream) {
  GRUCellFwdParams p;
  p.x = x.data_ptr();
  p.h = h0.data_ptr();
  p.w_ih = w_ih.data_ptr();
  p.w_hh = w_hh.data_ptr();
  p.b_ih = b_ih;
  p.b_hh = b_hh;
  p.out = out.data_ptr();
  p.ws = ws != nullptr ? ws->data_ptr<float>() : nullptr;
  p.B = h0.size(0);
  p.I = I;
  p.H = h0.size(1);
  p.x_row_stride = x.stride(1);
  p.h_row_stride = h0.stride(0);
  p.w_ih_row_stride = w_ih.stride(0);
  p.w_hh_row_stride = w_hh.stride(0);
  p.dtype = kernel_dtype(tg.dtype);
  fill_device(p, x);
  const cuda::GRUCellPlan plan = cuda::gru_cell_fwd_plan(p);
  if (plan.blocks < 1) return false;
  C10_CUDA_CHECK(cuda::gru_cell_fwd(p, plan, stream));
  return true;
}

std::tuple<Tensor, Tensor, Tensor> seq_fwd(const char* op, Tensor x, Tensor h0, Tensor w_ih, Tensor w_hh,
                                           const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh,
                                           bool reverse, bool needs_grad, bool keep_last = true) {
  gru::Target tg = gru::cuda_target();
  const Sizes s = check_core(op, x, h0, w_ih, w_hh, "h0", tg);
  Tensor kb_ih, kb_hh;
  const void* pb_ih = opt_bias(op, "bias_ih", b_ih, s.H, kb_ih, tg);
  const void* pb_hh = opt_bias(op, "bias_hh", b_hh, s.H, kb_hh, tg);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto f32 = x.options().dtype(at::kFloat);
  Tensor out = at::empty({s.T, s.B, s.H}, x.options());
  Tensor ws = needs_grad ? at::empty({s.T, s.B, 4 * s.H}, f32) : at::empty({0}, f32);
  if (out.numel() == 0) {  // empty batch/hidden/sequence: nothing to run; out is empty and h_T = h0
    return {out, keep_last ? h0.clone() : Tensor(), ws};
  }
  maybe_nan_fill({&out, &ws});

  const int64_t T = s.T, B = s.B, H = s.H;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // a cell step (or a one-step layer) of a small batch: one launch
  if (T == 1 && cell_step(x, h0, w_ih, w_hh, pb_ih, pb_hh, out, needs_grad ? &ws : nullptr, s.I, tg, stream)) {
    return {out, gru::last_state(out, reverse, keep_last), ws};
  }
  // Input projection of every step: one GEMM, (T * B, I) x (I, 3H) -> fp32, biases added by the gate kernel.
  Tensor gi = s.I == 0 ? at::zeros({T * B, 3 * H}, f32) : mm_f32(x.reshape({T * B, s.I}), w_ih.t());

  // every step in one cooperative launch when W_hh's rows fit the blocks' shared memory (gru_rec_fwd_plan)
  GRURecFwdParams rp;
  rp.gi = gi.data_ptr<float>();
  rp.h0 = h0.data_ptr();
  rp.w_hh = w_hh.data_ptr();
  rp.b_ih = pb_ih;
  rp.b_hh = pb_hh;
  rp.out = out.data_ptr();
  rp.ws = needs_grad ? ws.data_ptr<float>() : nullptr;
  rp.T = T;
  rp.B = B;
  rp.H = H;
  rp.h0_row_stride = h0.stride(0);
  rp.w_hh_row_stride = w_hh.stride(0);
  rp.reverse = reverse;
  rp.dtype = kernel_dtype(tg.dtype);
  fill_device(rp, x);
  for (const bool allow_cluster : {true, false}) {
    const cuda::GRURecPlan plan = cuda::gru_rec_fwd_plan(rp, allow_cluster);
    if (plan.blocks < 1) break;
    Tensor count;
    rp.sync = sync_counter(plan, x, count);
    const cudaError_t err = cuda::gru_rec_fwd(rp, plan, stream);
    if (plan.cluster > 1 && err != cudaSuccess) continue;  // (no room for the cluster now: the plan without it)
    if (err != cudaErrorCooperativeLaunchTooLarge) {
      C10_CUDA_CHECK(err);
      return {out, gru::last_state(out, reverse, keep_last), ws};
    }
    break;  // (fewer blocks fit at once than the occupancy query said, e.g. an MPS client's share: the per-step path)
  }

  // else one GEMM and one fused launch per step
  Tensor gh = at::empty({B, 3 * H}, f32);  // h W_hh^T of the current step
  maybe_nan_fill({&gh});
  const Tensor w_hh_t = w_hh.t();  // (H, 3H) view
  GRUGatesFwdParams p;
  p.gh = gh.data_ptr<float>();
  p.b_ih = pb_ih;
  p.b_hh = pb_hh;
  p.B = B;
  p.H = H;
  p.gi_row_stride = 3 * H;
  p.gh_row_stride = 3 * H;
  p.out_row_stride = out.stride(1);
  p.ws_row_stride = 4 * H;
  p.dtype = kernel_dtype(tg.dtype);
  for (int64_t k = 0; k < T; ++k) {
    const int64_t t = reverse ? T - 1 - k : k;
    // the state this step starts from: the previous step's output (in processing order), or h0
    const Tensor h = k == 0 ? h0 : out.select(0, reverse ? t + 1 : t - 1);
    mm_f32_out(gh, h, w_hh_t);
    p.gi = gi.data_ptr<float>() + t * B * 3 * H;
    p.h = h.data_ptr();
    p.h_row_stride = h.stride(0);
    p.out = row_ptr(out, t);
    p.ws = needs_grad ? ws.data_ptr<float>() + t * B * 4 * H : nullptr;
    C10_CUDA_CHECK(cuda::gru_gates_fwd(p, stream));
  }
  return {out, gru::last_state(out, reverse, keep_last), ws};
}

// The backward's per-step path: one fused gate launch and one GEMM (dh_prev = dh z + dgh W_hh, in place) per step.
void run_bwd_steps(const Tensor& dout, const Tensor& h0, const Tensor& o, const Tensor& ws, const Tensor& whh,
                   Tensor& dgi, Tensor& dgh, Tensor& dh, bool carried, bool reverse, DType dtype,
                   cudaStream_t stream) {
  const int64_t T = dout.size(0), B = dout.size(1), H = dout.size(2);
  GRUGatesBwdParams p;
  p.ws_row_stride = 4 * H;
  p.dgi_row_stride = 3 * H;
  p.dgh_row_stride = 3 * H;
  p.dh_direct = dh.data_ptr<float>();
  p.dh_direct_row_stride = H;
  p.B = B;
  p.H = H;
  p.dtype = dtype;
  for (int64_t k = 0; k < T; ++k) {
    const int64_t t = reverse ? k : T - 1 - k;  // processing order, backwards
    const bool first = reverse ? t == T - 1 : t == 0;  // the first step of the forward pass starts from h0
    const Tensor hp = first ? h0 : o.select(0, reverse ? t + 1 : t - 1);
    if (k == 0 && !carried) {  // nothing carried yet: d = dout[t] directly (no zero-filled buffer)
      p.dh = row_ptr(dout, t);
      p.dh_row_stride = dout.stride(1);
      p.dh_dtype = p.dtype;
      p.dout = nullptr;
      p.dout_row_stride = 0;
    } else {
      p.dh = dh.data_ptr<float>();
      p.dh_row_stride = H;
      p.dh_dtype = DType::F32;
      p.dout = row_ptr(dout, t);
      p.dout_row_stride = dout.stride(1);
    }
    p.h = hp.data_ptr();
    p.h_row_stride = hp.stride(0);
    p.ws = ws.data_ptr<float>() + t * B * 4 * H;
    p.dgi = dgi.data_ptr<float>() + t * B * 3 * H;
    p.dgh = dgh.data_ptr<float>() + t * B * 3 * H;
    C10_CUDA_CHECK(cuda::gru_gates_bwd(p, stream));
    dh.addmm_(dgh.select(0, t), whh);  // dh_prev = dh z + dgh W_hh
  }
}

Grads seq_bwd(const char* op, Tensor dout, const std::optional<Tensor>& dh_last, Tensor x, Tensor h0, Tensor w_ih,
              Tensor w_hh, const std::optional<Tensor>& out, Tensor ws, bool has_b_ih, bool has_b_hh, bool reverse,
              bool need_weights) {
  gru::Target tg = gru::cuda_target();
  const Sizes s = check_core(op, x, h0, w_ih, w_hh, "h0", tg);
  dout = check_t(op, "dout", dout, {s.T, s.B, s.H}, tg);
  Tensor dhl;
  if (dh_last.has_value() && dh_last->defined()) dhl = check_t(op, "dh_last", *dh_last, {s.B, s.H}, tg);
  Tensor o;
  if (out.has_value() && out->defined()) o = check_t(op, "out", *out, {s.T, s.B, s.H}, tg);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto wopts = w_ih.options();
  if (s.T == 0 || s.B == 0 || s.H == 0) {  // empty: the torch backend's answers, no kernel
    Tensor dx = at::zeros({s.T, s.B, s.I}, x.options());
    Tensor dh0 = (dhl.defined() && s.T == 0) ? dhl.clone(at::MemoryFormat::Contiguous)
                                             : at::zeros({s.B, s.H}, h0.options());
    Tensor dw_ih = need_weights ? at::zeros({3 * s.H, s.I}, wopts) : at::empty({0}, wopts);
    Tensor dw_hh = need_weights ? at::zeros({3 * s.H, s.H}, wopts) : at::empty({0}, wopts);
    Tensor db_ih = (need_weights && has_b_ih) ? at::zeros({3 * s.H}, wopts) : at::empty({0}, wopts);
    Tensor db_hh = (need_weights && has_b_hh) ? at::zeros({3 * s.H}, wopts) : at::empty({0}, wopts);
    return {dx, dh0, dw_ih, dw_hh, db_ih, db_hh};
  }
  TORCH_CHECK(s.T == 1 || o.defined(), op, ": out (the forward's output) is required when seq_len > 1");
  ws = check_ws(op, ws, {s.T, s.B, 4 * s.H}, tg);

  const int64_t T = s.T, B = s.B, I = s.I, H = s.H;
  const auto f32 = x.options().dtype(at::kFloat);
  Tensor dgi = at::empty({T, B, 3 * H}, f32);  // gate grads of every step, rows as in x
  Tensor dgh = at::empty({T, B, 3 * H}, f32);
  Tensor dh = at::empty({B, H}, f32);  // carried dL/dh (fp32): in place, d -> d z -> d z + dgh W_hh = dh_prev
  maybe_nan_fill({&dgi, &dgh, &dh});
  const bool carried = dhl.defined();
  if (carried) dh.copy_(dhl);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  // every step in one cooperative launch when W_hh's columns fit the blocks' shared memory (gru_rec_bwd_plan)
  GRURecBwdParams rp;
  rp.dout = dout.data_ptr();
  rp.h0 = h0.data_ptr();
  rp.out = o.defined() ? o.data_ptr() : nullptr;
  rp.ws = ws.data_ptr<float>();
  rp.w_hh = w_hh.data_ptr();
  rp.dgi = dgi.data_ptr<float>();
  rp.dgh = dgh.data_ptr<float>();
  rp.dh = dh.data_ptr<float>();
  rp.T = T;
  rp.B = B;
  rp.H = H;
  rp.dout_t_stride = dout.stride(0);
  rp.dout_b_stride = dout.stride(1);
  rp.h0_row_stride = h0.stride(0);
  rp.out_t_stride = o.defined() ? o.stride(0) : 0;
  rp.out_b_stride = o.defined() ? o.stride(1) : 0;
  rp.w_hh_row_stride = w_hh.stride(0);
  rp.reverse = reverse;
  rp.dtype = kernel_dtype(tg.dtype);
  fill_device(rp, x);
  bool done = false;
  for (const bool allow_cluster : {true, false}) {
    const cuda::GRURecPlan plan = cuda::gru_rec_bwd_plan(rp, allow_cluster);
    if (plan.blocks < 1) break;
    if (!carried) dh.zero_();
    Tensor count;
    rp.sync = sync_counter(plan, x, count);
    const cudaError_t err = cuda::gru_rec_bwd(rp, plan, stream);
    if (plan.cluster > 1 && err != cudaSuccess) continue;  // (no room for the cluster now: the plan without it)
    done = err != cudaErrorCooperativeLaunchTooLarge;  // (else nothing ran: the per-step path, as the forward)
    if (done) C10_CUDA_CHECK(err);
    break;
  }
  if (!done)
    run_bwd_steps(dout, h0, o, ws, w_hh.to(at::kFloat), dgi, dgh, dh, carried, reverse, kernel_dtype(tg.dtype),
                  stream);

  const Tensor dgi2 = dgi.view({T * B, 3 * H});
  const Tensor dgh2 = dgh.view({T * B, 3 * H});
  Tensor dx = at::mm(dgi2, w_ih.to(at::kFloat)).view({T, B, I}).to(x.scalar_type());
  Tensor dh0 = dh.to(h0.scalar_type());
  Tensor dw_ih, dw_hh, db_ih, db_hh;
  if (need_weights) {
    // the state each step started from, rows matching dgh: h0 for the first step of the forward pass, else the
    // output of the step processed before it
    Tensor hprev;
    if (T == 1)
      hprev = h0;
    else if (reverse)
      hprev = at::cat({o.slice(0, 1, T), h0.unsqueeze(0)}, 0);
    else
      hprev = at::cat({h0.unsqueeze(0), o.slice(0, 0, T - 1)}, 0);
    dw_ih = at::mm(dgi2.t(), x.reshape({T * B, I}).to(at::kFloat)).to(w_ih.scalar_type());
    dw_hh = at::mm(dgh2.t(), hprev.reshape({T * B, H}).to(at::kFloat)).to(w_hh.scalar_type());
    db_ih = has_b_ih ? dgi2.sum(0).to(w_ih.scalar_type()) : at::empty({0}, wopts);
    db_hh = has_b_hh ? dgh2.sum(0).to(w_ih.scalar_type()) : at::empty({0}, wopts);
  } else {
    dw_ih = at::empty({0}, wopts);
    dw_hh = at::empty({0}, wopts);
    db_ih = at::empty({0}, wopts);
    db_hh = at::empty({0}, wopts);
  }
  return {dx, dh0, dw_ih, dw_hh, db_ih, db_hh};
}

std::tuple<Tensor, Tensor, Tensor> gru_seq_fwd_cuda(const Tensor& x, const Tensor& h0, const Tensor& w_ih,
                                                    const Tensor& w_hh, const std::optional<Tensor>& b_ih,
                                                    const std::optional<Tensor>& b_hh, bool reverse,
                                                    bool needs_grad) {
  return seq_fwd("pyattn::gru_seq_fwd", x, h0, w_ih, w_hh, b_ih, b_hh, reverse, needs_grad);
}

Grads gru_seq_bwd_cuda(const Tensor& dout, const Tensor& dh_last, const Tensor& x, const Tensor& h0,
                       const Tensor& w_ih, const Tensor& w_hh, const Tensor& out, const Tensor& ws, bool has_b_ih,
                       bool has_b_hh, bool reverse, bool need_weights) {
  return seq_bwd("pyattn::gru_seq_bwd", dout, dh_last, x, h0, w_ih, w_hh, out, ws, has_b_ih, has_b_hh, reverse,
                 need_weights);
}

std::tuple<Tensor, Tensor> gru_step_fwd_cuda(const Tensor& x, const Tensor& hx, const Tensor& w_ih,
                                             const Tensor& w_hh, const std::optional<Tensor>& b_ih,
                                             const std::optional<Tensor>& b_hh, bool needs_grad) {
  return gru::step_fwd(seq_fwd, x, hx, w_ih, w_hh, b_ih, b_hh, needs_grad);
}

Grads gru_step_bwd_cuda(const Tensor& dh, const Tensor& x, const Tensor& hx, const Tensor& w_ih, const Tensor& w_hh,
                        const Tensor& ws, bool has_b_ih, bool has_b_hh, bool need_weights) {
  return gru::step_bwd(seq_bwd, dh, x, hx, w_ih, w_hh, ws, has_b_ih, has_b_hh, need_weights);
}

}  // namespace
}  // namespace pyattn

PYATTN_CUDA_IMPL(m) {
  m.impl("gru_seq_fwd", &pyattn::gru_seq_fwd_cuda);
  m.impl("gru_seq_bwd", &pyattn::gru_seq_bwd_cuda);
  m.impl("gru_step_fwd", &pyattn::gru_step_fwd_cuda);
  m.impl("gru_step_bwd", &pyattn::gru_step_bwd_cuda);
}
