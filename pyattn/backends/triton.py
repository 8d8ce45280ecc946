"""The ``triton`` backend: Triton kernels in pyattn.kernels (kernels/), on CUDA, or on CPU under TRITON_INTERPRET=1."""
from __future__ import annotations

import torch

from .._ext import load_kernels, load_triton, triton_interpreting
from ..dispatch import Backend, register
from ..dispatch.backend import OpCaps
from ..ops.layer_norm import MAX_HIDDEN

_HALF_AND_FLOAT = frozenset({torch.float32, torch.bfloat16, torch.float16})
_DEVICES = frozenset({"cuda", "cpu"})
_ATTN_MAX_HEAD_DIM = 256  # = kernels/attention.py MAX_HEAD_DIM (largest BLOCK_D its configurations compile for)
_GRID_YZ_MAX = 65535  # CUDA grid y/z limit: the attention kernels put heads on y and batch on z


class TritonBackend(Backend):
    name = "triton"
    description = "Triton kernels (pyattn.kernels); CPU only through the Triton interpreter"
    caps = {
        "layer_norm": OpCaps(devices=_DEVICES, dtypes=_HALF_AND_FLOAT),
        "rms_norm": OpCaps(devices=_DEVICES, dtypes=_HALF_AND_FLOAT),
        # ---- attention ----
        "attention": OpCaps(devices=_DEVICES, dtypes=_HALF_AND_FLOAT,
                            notes=(f"FlashAttention-2 kernels: head dims 1..{_ATTN_MAX_HEAD_DIM}, GQA/MQA, "
                                   "bool/additive masks, both causal alignments, dropout",)),
        # ---- end attention ----
        # ---- gru ----
        "gru_cell": OpCaps(devices=_DEVICES, dtypes=_HALF_AND_FLOAT,
                           notes=("fused recurrent step (h W_hh^T + gates) and fused gate-gradient kernels",)),
        "gru": OpCaps(devices=_DEVICES, dtypes=_HALF_AND_FLOAT,
                      notes=("one input-projection GEMM, then one fused kernel launch per step forward; one "
                             "gate-gradient launch + one matmul per step backward",)),
        # ---- end gru ----
    }
    _kernel_modules = {"layer_norm": "layernorm", "rms_norm": "layernorm", "attention": "attention",
                       "gru_cell": "gru", "gru": "gru"}

    def availability(self):
        mod, why = load_triton()
        return (mod is not None), why

    def extra_reasons(self, inputs) -> list[str]:
        reasons = []
        if inputs.device.type == "cpu" and not triton_interpreting():
            reasons.append("CPU tensors need the Triton interpreter (TRITON_INTERPRET=1 before import)")
        mod, why = load_kernels(self._kernel_modules[inputs.op])
        if mod is None:
            reasons.append(why)
        if inputs.op in ("layer_norm", "rms_norm") and inputs.hidden > MAX_HIDDEN:
            reasons.append(f"hidden size {inputs.hidden} > {MAX_HIDDEN} (one row must fit on chip)")
        if inputs.op == "attention":
            reasons.extend(self._attention_reasons(inputs))
        if inputs.op in ("gru_cell", "gru"):
            reasons.extend(self._gru_reasons(inputs))
        return reasons

    # ---- attention ----------------------------------------------------------------------------------------
    @staticmethod
    def _attention_reasons(inputs) -> list[str]:
        reasons = []
        d, dv = inputs.head_dim, inputs.v_head_dim
        if d > _ATTN_MAX_HEAD_DIM or dv > _ATTN_MAX_HEAD_DIM:
            reasons.append(f"head dim {max(d, dv)} > {_ATTN_MAX_HEAD_DIM} (q/k and v head dims must each be <= "
                           f"{_ATTN_MAX_HEAD_DIM}: one K/V tile row must fit in registers)")
        if d == 0 or dv == 0:
            reasons.append("head dim 0 (nothing for the kernels to multiply)")
        if inputs.heads > _GRID_YZ_MAX or inputs.batch > _GRID_YZ_MAX:
            reasons.append(f"batch {inputs.batch} or heads {inputs.heads} > {_GRID_YZ_MAX} (CUDA grid y/z limit)")
        if inputs.device.type == "cuda" and torch.cuda.get_device_capability(inputs.device) < (8, 0):
            major, minor = torch.cuda.get_device_capability(inputs.device)
            reasons.append(f"compute capability {major}.{minor} < 8.0 (the attention configurations target sm_80 "
                           "and sm_90; bf16 tensor cores need sm_80)")
        return reasons

    def attention_fwd(self, q, k, v, mask, dropout_p, causal, bottom_right, scale, seed, offset):
        return self._k("attention").attn_fwd(q, k, v, mask, dropout_p, causal, bottom_right, scale, seed, offset)

    def attention_bwd(self, dout, q, k, v, out, lse, mask, dropout_p, causal, bottom_right, scale, seed, offset):
        return self._k("attention").attn_bwd(dout, q, k, v, out, lse, mask, dropout_p, causal, bottom_right, scale,
                                             seed, offset)
    # ---- end attention ------------------------------------------------------------------------------------

    # ---- gru ----------------------------------------------------------------------------------------------
    @staticmethod
    def _gru_reasons(inputs) -> list[str]:
        reasons = []
        if inputs.device.type == "cuda" and inputs.dtype == torch.bfloat16 \
                and torch.cuda.get_device_capability(inputs.device) < (8, 0):
            major, minor = torch.cuda.get_device_capability(inputs.device)
            reasons.append(f"bfloat16 on compute capability {major}.{minor} < 8.0 (the fused step's bf16 tl.dot "
                           "needs sm_80)")
        for name in ("b_ih", "b_hh"):
            b = getattr(inputs, name)
            if b is not None and b.dtype != inputs.dtype:
                reasons.append(f"{name} dtype {b.dtype} differs from the input dtype {inputs.dtype}")
        return reasons

    def gru_cell_fwd(self, x, hx, w_ih, w_hh, b_ih, b_hh, needs_grad):
        return self._k("gru").gru_cell_fwd(x, hx, w_ih, w_hh, b_ih, b_hh, needs_grad)

    def gru_cell_bwd(self, dh, x, hx, w_ih, w_hh, ws, has_b_ih, has_b_hh, need_weights):
        return self._k("gru").gru_cell_bwd(dh, x, hx, w_ih, w_hh, ws, has_b_ih, has_b_hh, need_weights)

    def gru_layer_fwd(self, x, h0, w_ih, w_hh, b_ih, b_hh, reverse, needs_grad):
        return self._k("gru").gru_layer_fwd(x, h0, w_ih, w_hh, b_ih, b_hh, reverse, needs_grad)

    def gru_layer_bwd(self, dout, dh_last, x, h0, w_ih, w_hh, out, ws, has_b_ih, has_b_hh, reverse, need_weights):
        return self._k("gru").gru_layer_bwd(dout, dh_last, x, h0, w_ih, w_hh, out, ws, has_b_ih, has_b_hh, reverse,
                                            need_weights)
    # ---- end gru ------------------------------------------------------------------------------------------

    @staticmethod
    def _k(name):
        return load_kernels(name)[0]

    def layer_norm_fwd(self, x, residual, weight, bias, eps, rms, store_residual):
        return self._k("layernorm").layer_norm_fwd(x, residual, weight, bias, eps, rms, store_residual)

    def layer_norm_bwd(self, dy, s, weight, mean, rstd, dresidual_out, rms, has_bias, need_dweight):
        return self._k("layernorm").layer_norm_bwd(dy, s, weight, mean, rstd, dresidual_out, rms, has_bias,
                                                   need_dweight)


register(TritonBackend())
