"""The ``triton`` backend: Triton kernels in pyattn.kernels (kernels/), on CUDA, or on CPU under TRITON_INTERPRET=1."""
from __future__ import annotations

import torch

from .._ext import load_kernels, load_triton, triton_interpreting
from ..dispatch import Backend, register
from ..dispatch.backend import OpCaps
from ..ops.layer_norm import MAX_HIDDEN

_HALF_AND_FLOAT = frozenset({torch.float32, torch.bfloat16, torch.float16})
_DEVICES = frozenset({"cuda", "cpu"})


class TritonBackend(Backend):
    name = "triton"
    description = "Triton kernels (pyattn.kernels); CPU only through the Triton interpreter"
    caps = {
        "layer_norm": OpCaps(devices=_DEVICES, dtypes=_HALF_AND_FLOAT),
        "rms_norm": OpCaps(devices=_DEVICES, dtypes=_HALF_AND_FLOAT),
    }
    _kernel_modules = {"layer_norm": "layernorm", "rms_norm": "layernorm"}

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
        return reasons

    @staticmethod
    def _k(name):
        return load_kernels(name)[0]

    def layer_norm_fwd(self, x, residual, weight, bias, eps, rms, store_residual):
        return self._k("layernorm").layer_norm_fwd(x, residual, weight, bias, eps, rms, store_residual)

    def layer_norm_bwd(self, dy, s, weight, mean, rstd, dresidual_out, rms, has_bias, need_dweight):
        return self._k("layernorm").layer_norm_bwd(dy, s, weight, mean, rstd, dresidual_out, rms, has_bias,
                                                   need_dweight)


register(TritonBackend())
