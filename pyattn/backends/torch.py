"""The pure-PyTorch reference backend: runs anywhere, is the fallback for every op, and is the test oracle.

It computes in float32 (float64 for float64 inputs) and follows each kernel's contract exactly, including
rounding points (e.g. the fused residual is rounded to the input dtype before normalising, like ``x + r``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..dispatch import Backend, register
from ..dispatch.backend import OpCaps

_FLOATS = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
_ANY = frozenset({"cpu", "cuda", "meta", "mps", "xpu"})


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class TorchBackend(Backend):
    name = "torch"
    description = "pure PyTorch reference (fallback and test oracle)"
    caps = {op: OpCaps(devices=_ANY, dtypes=_FLOATS)
            for op in ("layer_norm", "rms_norm")}

    def not_supported_reasons(self, inputs) -> list[str]:
        if inputs.op not in self.caps:
            return [f"torch backend does not implement {inputs.op}"]
        return []  # the reference takes every valid input

    # ---- LayerNorm / RMSNorm ------------------------------------------------------------------------------
    def layer_norm_fwd(self, x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor],
                       bias: Optional[Tensor], eps: float, rms: bool, store_residual: bool):
        s = x if residual is None else x + residual  # rounded to x.dtype, as the kernels do
        acc = _acc(x.dtype)
        sf = s.to(acc)
        if rms:
            rstd = torch.rsqrt(sf.square().mean(-1) + eps)
            xhat = sf * rstd[:, None]
            mean = torch.empty(0, dtype=acc, device=x.device)
        else:
            mean = sf.mean(-1)
            d = sf - mean[:, None]
            rstd = torch.rsqrt(d.square().mean(-1) + eps)
            xhat = d * rstd[:, None]
        y = xhat
        if weight is not None:
            y = y * weight.to(acc)
        if bias is not None:
            y = y + bias.to(acc)
        s_out = s.clone() if (store_residual and residual is not None) else x.new_empty(0)
        return y.to(x.dtype), s_out, mean, rstd  # stats in fp32 (fp64 for fp64 inputs)

    def layer_norm_bwd(self, dy: Tensor, s: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor,
                       dresidual_out: Optional[Tensor], rms: bool, has_bias: bool, need_dweight: bool):
        acc = _acc(s.dtype)
        sf, dyf, rstd_ = s.to(acc), dy.to(acc), rstd.to(acc)[:, None]
        xhat = sf * rstd_ if rms else (sf - mean.to(acc)[:, None]) * rstd_
        g = dyf * weight.to(acc) if weight is not None else dyf
        n = s.shape[-1]
        c2 = (g * xhat).sum(-1, keepdim=True) / n
        if rms:
            dx = rstd_ * (g - xhat * c2)
        else:
            c1 = g.sum(-1, keepdim=True) / n
            dx = rstd_ * (g - c1 - xhat * c2)
        if dresidual_out is not None:
            dx = dx + dresidual_out.to(acc)
        wdt = weight.dtype if weight is not None else s.dtype
        dw = (dyf * xhat).sum(0).to(wdt) if (need_dweight and weight is not None) else s.new_empty(0, dtype=wdt)
        db = dyf.sum(0).to(wdt) if (need_dweight and has_bias) else s.new_empty(0, dtype=wdt)
        return dx.to(s.dtype), dw, db


register(TorchBackend())
