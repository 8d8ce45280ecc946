"""The ``cpp`` backend: C++ CPU kernels in pyattn._C (csrc/cpu), called through torch.ops.pyattn."""
from __future__ import annotations

import torch

from .._ext import load_C
from ..dispatch import register
from ..dispatch.backend import OpCaps
from ..ops.layer_norm import fake_norm_bwd, fake_norm_fwd
from ._native import NativeBackend, missing_kernel_reason

_HALF_AND_FLOAT = frozenset({torch.float32, torch.bfloat16, torch.float16})


class CppBackend(NativeBackend):
    name = "cpp"
    description = "C++ CPU kernels (pyattn._C, OpenMP + SIMD)"
    caps = {
        "layer_norm": OpCaps(devices=frozenset({"cpu"}), dtypes=_HALF_AND_FLOAT),
        "rms_norm": OpCaps(devices=frozenset({"cpu"}), dtypes=_HALF_AND_FLOAT),
        "attention": OpCaps(devices=frozenset({"cpu"}), dtypes=_HALF_AND_FLOAT,
                            notes=("FlashAttention-2 on CPU (csrc/cpu/attention.cpp): O(L) memory, any head dim, "
                                   "GQA, masks, both causal alignments, dropout",)),
        # ---- GRU ---- fp32, fp16, bf16: 16-bit operands are widened to fp32 in the kernels (csrc/cpu/gru.cpp), the
        # state rounded to the dtype after every step.
        "gru_cell": OpCaps(devices=frozenset({"cpu"}), dtypes=_HALF_AND_FLOAT,
                           notes=("fused C++ cell, AVX-512/AVX2 GEMM; fp16/bf16 computed in fp32",)),
        "gru": OpCaps(devices=frozenset({"cpu"}), dtypes=_HALF_AND_FLOAT,
                      notes=("hoisted input GEMM + fused recurrence, C++ BPTT; fp16/bf16 computed in fp32",)),
        # ---- end GRU ----
    }

    def availability(self):
        mod, why = load_C()
        return (mod is not None), why

    def extra_reasons(self, inputs) -> list[str]:
        return missing_kernel_reason(inputs.op, "CPU")


def _register_fakes() -> None:
    """Fake (meta) implementations of the C++ ops, so torch.compile and opcheck can trace them."""
    if load_C()[0] is None:
        return

    @torch.library.register_fake("pyattn::layer_norm_fwd")
    def _(x, residual, weight, bias, eps, rms, store_residual):
        return fake_norm_fwd(x, residual, rms, store_residual)  # the kernels take no float64: stats are fp32

    @torch.library.register_fake("pyattn::layer_norm_bwd")
    def _(dy, s, weight, mean, rstd, dresidual_out, rms, has_bias, need_dweight):
        return fake_norm_bwd(s, weight, has_bias, need_dweight)


def dropout_keep_mask(seed: int, offset: int, shape, p: float, device=None) -> torch.Tensor:
    """The keep-mask (B, Hq, Lq, Lk) bool (True = kept) the cpp attention kernels apply for (seed, offset, p): a hash
    of (seed, offset, b, h, i, j), the same in forward and backward."""
    b, h, lq, lk = (int(x) for x in shape)
    return torch.ops.pyattn.attn_dropout_keep(seed, offset, b, h, lq, lk, p)


def _register_attention_fakes() -> None:
    if load_C()[0] is None or not hasattr(torch.ops.pyattn, "attn_fwd"):
        return

    def like_layout(t, shape):
        b, h, length, d = shape
        if not t.is_contiguous() and t.transpose(1, 2).is_contiguous():
            return t.new_empty((b, length, h, d)).transpose(1, 2)
        return t.new_empty(shape)

    @torch.library.register_fake("pyattn::attn_fwd")
    def _(q, k, v, mask, dropout_p, causal, bottom_right, scale, seed, offset):
        b, h, lq, _ = q.shape
        return like_layout(q, (b, h, lq, v.shape[3])), q.new_empty((b, h, lq), dtype=torch.float32)

    @torch.library.register_fake("pyattn::attn_bwd")
    def _(dout, q, k, v, out, lse, mask, dropout_p, causal, bottom_right, scale, seed, offset):
        return like_layout(q, q.shape), like_layout(k, k.shape), like_layout(v, v.shape)


# ---- GRU ----
def _register_gru_fakes() -> None:
    """Fakes of the GRU C++ ops (skipped when pyattn._C is missing or was built before they existed; the backend
    then refuses GRU with the missing-kernel reason)."""
    if load_C()[0] is None or not hasattr(torch.ops.pyattn, "gru_seq_fwd"):
        return

    def _gru_wgrads(w_ih, w_hh, has_b_ih, has_b_hh, need_weights):
        g3 = w_hh.shape[0]
        if not need_weights:
            return tuple(w_ih.new_empty(0) for _ in range(4))
        return (w_ih.new_empty(w_ih.shape), w_hh.new_empty(w_hh.shape), w_ih.new_empty(g3 if has_b_ih else 0),
                w_ih.new_empty(g3 if has_b_hh else 0))

    @torch.library.register_fake("pyattn::gru_seq_fwd")
    def _(x, h0, w_ih, w_hh, b_ih, b_hh, reverse, needs_grad):
        t, b, h = x.shape[0], x.shape[1], w_hh.shape[1]
        ws = x.new_empty((t, b, 4 * h) if needs_grad else (0,), dtype=torch.float32)
        return x.new_empty((t, b, h)), h0.new_empty((b, h)), ws

    @torch.library.register_fake("pyattn::gru_seq_bwd")
    def _(dout, dh_last, x, h0, w_ih, w_hh, out, ws, has_b_ih, has_b_hh, reverse, need_weights):
        return (x.new_empty(x.shape), h0.new_empty(h0.shape),
                *_gru_wgrads(w_ih, w_hh, has_b_ih, has_b_hh, need_weights))

    @torch.library.register_fake("pyattn::gru_step_fwd")
    def _(x, hx, w_ih, w_hh, b_ih, b_hh, needs_grad):
        b, h = x.shape[0], w_hh.shape[1]
        ws = x.new_empty((b, 4 * h) if needs_grad else (0,), dtype=torch.float32)
        return x.new_empty((b, h)), ws

    @torch.library.register_fake("pyattn::gru_step_bwd")
    def _(dh, x, hx, w_ih, w_hh, ws, has_b_ih, has_b_hh, need_weights):
        return (x.new_empty(x.shape), hx.new_empty(hx.shape),
                *_gru_wgrads(w_ih, w_hh, has_b_ih, has_b_hh, need_weights))
# ---- end GRU ----


_register_fakes()
_register_attention_fakes()
_register_gru_fakes()  # GRU
register(CppBackend())
