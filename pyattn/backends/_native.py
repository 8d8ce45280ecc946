"""Shared by the backends that run ops of pyattn._C (cpp on CPU, cuda on CUDA)."""
from __future__ import annotations

import torch

from .._ext import load_C
from ..dispatch import Backend

# The C++ op behind each dispatcher op, and the one whose kernel must be registered for the backend to take it.
NATIVE_OPS = {
    "layer_norm": "layer_norm_fwd",
    "rms_norm": "layer_norm_fwd",
    "attention": "attn_fwd",
    "gru_cell": "gru_step_fwd",  # GRU
    "gru": "gru_seq_fwd",  # GRU
}


def has_kernel(native_op: str, dispatch_key: str) -> bool:
    mod, _ = load_C()
    if mod is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"pyattn::{native_op}", dispatch_key)


def missing_kernel_reason(op: str, dispatch_key: str) -> list[str]:
    native = NATIVE_OPS.get(op)
    if native is None or not has_kernel(native, dispatch_key):
        return [f"pyattn._C has no {dispatch_key} kernel for {op} (not implemented in this build)"]
    return []


class _Ops:
    """torch.ops.pyattn.<name>.default, looked up on first use and kept: the attribute chain through torch.ops costs
    more per call (0.8 us of a 13 us gru_cell call on CPU) than calling the overload itself."""

    def __getattr__(self, name: str):
        op = getattr(torch.ops.pyattn, name).default
        setattr(self, name, op)
        return op


_ops = _Ops()


class NativeBackend(Backend):
    """The op methods of the backends that run pyattn._C's ops (same signatures and returns as
    TorchBackend's): torch.ops.pyattn.* dispatches on the tensors' device to the CPU kernels (cpp backend,
    csrc/bindings/*.cpp) or the CUDA ones (cuda backend, csrc/bindings/cuda/*.cpp)."""

    def layer_norm_fwd(self, x, residual, weight, bias, eps, rms, store_residual):
        return tuple(_ops.layer_norm_fwd(x, residual, weight, bias, eps, rms, store_residual))

    def layer_norm_bwd(self, dy, s, weight, mean, rstd, dresidual_out, rms, has_bias, need_dweight):
        return tuple(_ops.layer_norm_bwd(dy, s, weight, mean, rstd, dresidual_out, rms, has_bias, need_dweight))

    def attention_fwd(self, q, k, v, mask, dropout_p, causal, bottom_right, scale, seed, offset):
        return tuple(_ops.attn_fwd(q, k, v, mask, dropout_p, causal, bottom_right, scale, seed, offset))

    def attention_bwd(self, dout, q, k, v, out, lse, mask, dropout_p, causal, bottom_right, scale, seed, offset):
        return tuple(_ops.attn_bwd(dout, q, k, v, out, lse, mask, dropout_p, causal, bottom_right, scale, seed,
                                   offset))

    # ---- GRU ----
    def gru_cell_fwd(self, x, hx, w_ih, w_hh, b_ih, b_hh, needs_grad):
        return tuple(_ops.gru_step_fwd(x, hx, w_ih, w_hh, b_ih, b_hh, needs_grad))

    def gru_cell_bwd(self, dh, x, hx, w_ih, w_hh, ws, has_b_ih, has_b_hh, need_weights):
        return tuple(_ops.gru_step_bwd(dh, x, hx, w_ih, w_hh, ws, has_b_ih, has_b_hh, need_weights))

    def gru_layer_fwd(self, x, h0, w_ih, w_hh, b_ih, b_hh, reverse, needs_grad):
        return tuple(_ops.gru_seq_fwd(x, h0, w_ih, w_hh, b_ih, b_hh, reverse, needs_grad))

    def gru_layer_bwd(self, dout, dh_last, x, h0, w_ih, w_hh, out, ws, has_b_ih, has_b_hh, reverse, need_weights):
        return tuple(_ops.gru_seq_bwd(dout, dh_last, x, h0, w_ih, w_hh, out, ws, has_b_ih, has_b_hh, reverse,
                                      need_weights))
    # ---- end GRU ----
