// The schemas of every C++ op in pyattn._C, in one place: defined for torch.ops.pyattn by library.cpp, and for
// torch.ops.pyattn_emu by the CUDA emulator build (csrc/emu/library.cpp). Kernels are registered per dispatch key next
// to their bindings (TORCH_LIBRARY_IMPL(pyattn, CPU|CUDA, m)); fake (meta) implementations for torch.compile live in
// pyattn/backends/cpp.py.
#pragma once

#include <torch/library.h>

namespace pyattn {

inline void define_schemas(torch::Library& m) {
  // LayerNorm / RMSNorm with an optional fused residual (Add & Norm). x: (M, N), last dim contiguous.
  m.def("layer_norm_fwd(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, float eps, bool rms, "
        "bool store_residual) -> (Tensor y, Tensor residual_out, Tensor mean, Tensor rstd)");
  m.def("layer_norm_bwd(Tensor dy, Tensor s, Tensor? weight, Tensor mean, Tensor rstd, Tensor? dresidual_out, "
        "bool rms, bool has_bias, bool need_dweight) -> (Tensor dx, Tensor dweight, Tensor dbias)");
  // Attention (kernels: csrc/bindings/attention.cpp; contract: the Attention section of pyattn/params.h).
  // q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv), mask (B|1, Hq|1, Lq|1, Lk|1) bool (True = keep) or
  // additive -> out (B, Hq, Lq, Dv) in q's layout, lse (B, Hq, Lq) float32 (natural log; +inf for rows that see no key).
  m.def("attn_fwd(Tensor q, Tensor k, Tensor v, Tensor? mask, float dropout_p, bool causal, bool bottom_right, "
        "float scale, int seed, int offset) -> (Tensor out, Tensor lse)");
  m.def("attn_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? mask, float dropout_p, "
        "bool causal, bool bottom_right, float scale, int seed, int offset) -> (Tensor dq, Tensor dk, Tensor dv)");
  // The dropout keep-mask (B, H, Lq, Lk) bool the CPU attention kernels apply for (seed, offset, p).
  m.def("attn_dropout_keep(int seed, int offset, int batch, int heads, int q_len, int k_len, float p) -> Tensor");
  // ---- GRU ---- (kernels: csrc/bindings/gru.cpp; argument lists mirror the torch backend's gru_* methods)
  // One direction of one layer, x (T, B, I) time-major, h0 (B, H) -> out (T, B, H), h_last (B, H), ws (T, B, 4H)
  // float32 [r | z | n | hn] (empty unless needs_grad).
  m.def("gru_seq_fwd(Tensor x, Tensor h0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, bool reverse, "
        "bool needs_grad) -> (Tensor out, Tensor h_last, Tensor ws)");
  m.def("gru_seq_bwd(Tensor dout, Tensor dh_last, Tensor x, Tensor h0, Tensor w_ih, Tensor w_hh, Tensor out, "
        "Tensor ws, bool has_b_ih, bool has_b_hh, bool reverse, bool need_weights) -> (Tensor dx, Tensor dh0, "
        "Tensor dw_ih, Tensor dw_hh, Tensor db_ih, Tensor db_hh)");
  // One cell step: x (B, I), hx (B, H) -> h (B, H), ws (B, 4H) (empty unless needs_grad).
  m.def("gru_step_fwd(Tensor x, Tensor hx, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, bool needs_grad) "
        "-> (Tensor h, Tensor ws)");
  m.def("gru_step_bwd(Tensor dh, Tensor x, Tensor hx, Tensor w_ih, Tensor w_hh, Tensor ws, bool has_b_ih, "
        "bool has_b_hh, bool need_weights) -> (Tensor dx, Tensor dhx, Tensor dw_ih, Tensor dw_hh, Tensor db_ih, "
        "Tensor db_hh)");
  // ---- end GRU ----
}

}  // namespace pyattn
