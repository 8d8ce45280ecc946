"""Shared by the backends that run ops of pyattn._C (cpp on CPU, cuda on CUDA)."""
from __future__ import annotations

import torch

from .._ext import load_C

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
