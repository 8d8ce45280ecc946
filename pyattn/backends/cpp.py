"""The ``cpp`` backend: C++ CPU kernels in pyattn._C (csrc/cpu), called through torch.ops.pyattn."""
from __future__ import annotations

import torch

from .._ext import load_C
from ..dispatch import Backend, register
from ..dispatch.backend import OpCaps
from ..ops.layer_norm import MAX_HIDDEN  # noqa: F401  (cpp takes any hidden size)
from ._native import missing_kernel_reason

_HALF_AND_FLOAT = frozenset({torch.float32, torch.bfloat16, torch.float16})


class CppBackend(Backend):
    name = "cpp"
    description = "C++ CPU kernels (pyattn._C, OpenMP + SIMD)"
    caps = {
        "layer_norm": OpCaps(devices=frozenset({"cpu"}), dtypes=_HALF_AND_FLOAT),
        "rms_norm": OpCaps(devices=frozenset({"cpu"}), dtypes=_HALF_AND_FLOAT),
    }

    def availability(self):
        mod, why = load_C()
        return (mod is not None), why

    def extra_reasons(self, inputs) -> list[str]:
        return missing_kernel_reason(inputs.op, "CPU")

    def layer_norm_fwd(self, x, residual, weight, bias, eps, rms, store_residual):
        return torch.ops.pyattn.layer_norm_fwd(x, residual, weight, bias, eps, rms, store_residual)

    def layer_norm_bwd(self, dy, s, weight, mean, rstd, dresidual_out, rms, has_bias, need_dweight):
        return torch.ops.pyattn.layer_norm_bwd(dy, s, weight, mean, rstd, dresidual_out, rms, has_bias, need_dweight)


def _register_fakes() -> None:
    """Fake (meta) implementations of the C++ ops, so torch.compile and opcheck can trace them."""
    if load_C()[0] is None:
        return

    @torch.library.register_fake("pyattn::layer_norm_fwd")
    def _(x, residual, weight, bias, eps, rms, store_residual):
        m = x.shape[0]
        s = x.new_empty(x.shape) if (store_residual and residual is not None) else x.new_empty(0)
        f32 = torch.float32
        return x.new_empty(x.shape), s, x.new_empty(0 if rms else m, dtype=f32), x.new_empty(m, dtype=f32)

    @torch.library.register_fake("pyattn::layer_norm_bwd")
    def _(dy, s, weight, mean, rstd, dresidual_out, rms, has_bias, need_dweight):
        n = s.shape[-1]
        wdt = weight.dtype if weight is not None else s.dtype
        dw = s.new_empty(n if (need_dweight and weight is not None) else 0, dtype=wdt)
        db = s.new_empty(n if (need_dweight and has_bias) else 0, dtype=wdt)
        return s.new_empty(s.shape), dw, db


_register_fakes()
register(CppBackend())
