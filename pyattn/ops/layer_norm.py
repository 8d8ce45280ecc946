"""LayerNorm / RMSNorm with an optional fused residual (Add & Norm): inputs, validation, custom ops, autograd.

out = norm(x + residual) * weight + bias, optionally also returning s = x + residual for pre-norm stacks.
Public entry points: ``layer_norm`` and ``rms_norm`` (re-exported by pyattn.functional).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from ..dispatch import OpInputs, backend_request, select
from ._common import Op, check_same_device, dtype_name

def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """mean/rstd are float32, except float64 for float64 inputs (the oracle)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


MAX_HIDDEN = 65536  # the largest row the Triton and CUDA kernels hold on chip; torch/cpp take any


@dataclass
class NormInputs(OpInputs):
    x: Tensor  # (M, N), last dim contiguous
    residual: Optional[Tensor]
    weight: Optional[Tensor]
    bias: Optional[Tensor]
    eps: float
    rms: bool
    backward: bool = False  # the backward's call (its own selection: CudaBackend.preferred_for)

    @property
    def op(self) -> str:
        return "rms_norm" if self.rms else "layer_norm"

    @property
    def device(self) -> torch.device:
        return self.x.device

    @property
    def dtype(self) -> torch.dtype:
        return self.x.dtype

    @property
    def hidden(self) -> int:
        return self.x.shape[-1]

    @property
    def weight_dtype(self) -> Optional[torch.dtype]:
        return None if self.weight is None else self.weight.dtype

    def nothing_to_compute(self) -> bool:
        return self.x.numel() == 0  # no rows, or rows of no element

    def signature(self) -> tuple:
        return (self.x.device.type, self.x.dtype, self.hidden, self.weight_dtype, self.bias is not None,
                self.residual is not None, self.backward)

    def describe(self) -> dict:
        return {"shape": tuple(self.x.shape), "dtype": dtype_name(self.x.dtype), "hidden": self.hidden,
                "weight": dtype_name(self.weight_dtype) if self.weight is not None else None,
                "bias": self.bias is not None, "residual": self.residual is not None, "backward": self.backward}


def _normalize_shape(normalized_shape) -> tuple[int, ...]:
    kind = type(normalized_shape)
    if kind is int:  # the common forms first: n, (n,), [n], torch.Size([n])
        return (normalized_shape,)
    if (kind is tuple or kind is list or kind is torch.Size) and len(normalized_shape) == 1 \
            and type(normalized_shape[0]) is int:
        return (normalized_shape[0],)
    if isinstance(normalized_shape, numbers.Integral):
        return (int(normalized_shape),)
    return tuple(int(s) for s in normalized_shape)


def _validate(x: Tensor, normalized_shape, weight, bias, eps, residual, rms: bool) -> tuple[int, ...]:
    shape = _normalize_shape(normalized_shape)
    if len(shape) == 0:
        raise RuntimeError("Expected normalized_shape to be at least 1-dimensional, i.e., containing at least one "
                           f"element, but got normalized_shape = {list(shape)}")
    if not isinstance(x, Tensor):
        raise TypeError(f"input must be a Tensor, got {type(x).__name__}")
    if x.dim() < len(shape) or tuple(x.shape[x.dim() - len(shape):]) != shape:
        star = "*" if rms else "*, "
        raise RuntimeError(f"Given normalized_shape={list(shape)}, expected input with shape [{star}"
                           f"{', '.join(map(str, shape))}], but got input of size{list(x.shape)}")
    if not x.is_floating_point():  # (torch raises NotImplementedError, a RuntimeError, for integer inputs)
        raise NotImplementedError(f"{'rms_norm' if rms else 'layer_norm'}: expected a floating point input, got "
                                  f"{dtype_name(x.dtype)}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        if tuple(p.shape) != shape:
            raise RuntimeError(f"Expected {name} to be of same shape as normalized_shape, but got {name} of shape "
                               f"{list(p.shape)} and normalized_shape = {list(shape)}")
        if p.dtype != x.dtype and p.dtype != torch.float32:
            also = "" if x.dtype == torch.float32 else " or float32"
            raise RuntimeError(f"expected {name} dtype to be {dtype_name(x.dtype)} (the input's){also}, "
                               f"got {dtype_name(p.dtype)}")
    if residual is not None:
        if tuple(residual.shape) != tuple(x.shape):
            raise RuntimeError(f"Expected residual to have the input's shape {list(x.shape)}, got "
                               f"{list(residual.shape)}")
        if residual.dtype != x.dtype:
            raise RuntimeError(f"Expected residual to have the input's dtype {dtype_name(x.dtype)}, got "
                               f"{dtype_name(residual.dtype)}")
    dev = x.device
    if any(t is not None and t.device != dev for t in (weight, bias, residual)):
        check_same_device(input=x, weight=weight, bias=bias, residual=residual)  # raises, naming the tensors
    if not (type(eps) is float and 0.0 < eps < math.inf) and (
            not isinstance(eps, numbers.Real) or not math.isfinite(eps) or eps <= 0):
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    return shape


def _rows(t: Optional[Tensor], n: int, nd: int) -> Optional[Tensor]:
    """View (..., *normalized_shape) (nd dims, n elements) as (M, N) with a unit last stride, copying only when no
    such view exists."""
    if t is None:
        return None
    if t.dim() == 2 and t.shape[1] == n and (n <= 1 or t.stride(1) == 1):  # already rows (runs every call)
        return t
    t2 = t.reshape(-1 if n > 0 else math.prod(t.shape[:t.dim() - nd]), n)  # (-1 is ambiguous for n = 0)
    return t2 if t2.stride(-1) == 1 or t2.shape[-1] <= 1 else t2.contiguous()


def _param(p: Optional[Tensor], n: int) -> Optional[Tensor]:
    """weight / bias as the contiguous (N,) vector the kernels take (a copy only for another layout)."""
    if p is None or (p.dim() == 1 and p.is_contiguous()):
        return p
    return p.reshape(n).contiguous()


def rms_eps(dtype: torch.dtype) -> float:
    """rms_norm's eps=None: what torch computes with (its docs say finfo(input.dtype).eps, but ATen takes the
    epsilon of the type it computes in: float32 for float16 / bfloat16 inputs, 1.2e-7 rather than 7.8e-3 for
    bf16), so pyattn.nn.RMSNorm stays a drop-in twin of torch.nn.RMSNorm on half inputs."""
    return torch.finfo(stat_dtype(dtype)).eps


# ---- ops: custom ops for torch.compile, a direct path for plain eager calls (_common.Op). Selection inside. ----

def _norm_fwd_impl(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
              rms: bool, store_residual: bool, backend: Optional[str]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    inputs = NormInputs(x, residual, weight, bias, eps, rms)
    return select(inputs, backend).layer_norm_fwd(x, residual, weight, bias, eps, rms, store_residual)


def fake_norm_fwd(x, residual, rms: bool, store_residual: bool):
    """Outputs of a norm forward, shapes and dtypes only (the fake impl of every norm forward op, C++ ones too)."""
    m = x.shape[0]
    s = x.new_empty(x.shape) if (store_residual and residual is not None) else x.new_empty(0)
    stat = stat_dtype(x.dtype)
    return x.new_empty(x.shape), s, x.new_empty(0 if rms else m, dtype=stat), x.new_empty(m, dtype=stat)


def fake_norm_bwd(s, weight, has_bias: bool, need_dweight: bool):
    """Outputs of a norm backward, shapes and dtypes only."""
    n = s.shape[-1]
    wdt = weight.dtype if weight is not None else s.dtype
    dw = s.new_empty(n if (need_dweight and weight is not None) else 0, dtype=wdt)
    db = s.new_empty(n if (need_dweight and has_bias) else 0, dtype=wdt)
    return s.new_empty(s.shape), dw, db


def _norm_fwd_fake(x, residual, weight, bias, eps, rms, store_residual, backend):
    return fake_norm_fwd(x, residual, rms, store_residual)


def _norm_bwd_impl(dy: Tensor, s: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor,
              dresidual_out: Optional[Tensor], eps: float, rms: bool, has_bias: bool, need_dweight: bool,
              backend: Optional[str]) -> tuple[Tensor, Tensor, Tensor]:
    inputs = NormInputs(s, None, weight, None, eps, rms, backward=True)
    return select(inputs, backend).layer_norm_bwd(dy, s, weight, mean, rstd, dresidual_out, rms, has_bias,
                                                  need_dweight)


def _norm_bwd_fake(dy, s, weight, mean, rstd, dresidual_out, eps, rms, has_bias, need_dweight, backend):
    return fake_norm_bwd(s, weight, has_bias, need_dweight)


_norm_bwd = Op("pyattn::norm_bwd", _norm_bwd_impl, _norm_bwd_fake)


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, eps, rms, store_residual, backend = inputs
    _, s, mean, rstd = output
    saved_s = s if residual is not None else x
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)  # unused outputs' grads stay None (no zero tensors made per call)
    ctx.save_for_backward(saved_s, weight, mean, rstd)
    ctx.meta = (eps, rms, bias is not None, residual is not None, store_residual, backend_request(backend))


def _backward(ctx, dy, ds, dmean, drstd):
    s, weight, mean, rstd = ctx.saved_tensors
    eps, rms, has_bias, has_residual, store_residual, backend = ctx.meta
    need_x, need_r, need_w, need_b = (ctx.needs_input_grad[i] for i in range(4))
    if has_residual and not store_residual:
        raise RuntimeError("pyattn.layer_norm: backward through a fused residual needs store_residual=True "
                           "(the public functions set it whenever grad is enabled)")
    dres = ds if (has_residual and ds is not None and ds.numel() > 0) else None
    if dy is None:  # only s = x + residual was used
        dy = torch.zeros_like(s)
    dx, dw, db = _norm_bwd(dy, s, weight, mean, rstd, dres, eps, rms, has_bias, need_w or need_b, backend)
    return (dx if need_x else None, dx if need_r else None, dw if need_w else None, db if need_b else None,
            None, None, None, None)


_norm_fwd = Op("pyattn::norm_fwd", _norm_fwd_impl, _norm_fwd_fake, _setup_context, _backward)


def _norm(input, normalized_shape, weight, bias, eps, residual, return_residual, backend, rms):
    if (isinstance(input, Tensor) and isinstance(residual, Tensor) and residual.dtype != input.dtype
            and input.is_floating_point() and residual.is_floating_point()):
        # input + residual in torch's promoted dtype, as `x + r` then the norm gives (e.g. an fp32 residual stream
        # plus a bf16 sub-layer output under torch.autocast)
        dt = torch.promote_types(input.dtype, residual.dtype)
        input, residual = input.to(dt), residual.to(dt)
    shape = _validate(input, normalized_shape, weight, bias, eps, residual, rms)
    n = math.prod(shape)
    x2 = _rows(input, n, len(shape))
    r2 = _rows(residual, n, len(shape))
    if weight is None and bias is not None and bias.dtype != input.dtype:
        # the backends give dbias in the weight's dtype (s's without a weight): a weight of ones keeps an fp32 bias's
        # gradient fp32-accurate next to 16-bit inputs (y is unchanged: a product by 1 is exact)
        weight = torch.ones(shape, dtype=bias.dtype, device=bias.device)
    w = _param(weight, n)
    b = _param(bias, n)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (input, residual, weight, bias))
    store = residual is not None and (return_residual or grad)
    y, s, _, _ = _norm_fwd(x2, r2, w, b, float(eps), rms, store, backend)
    if y.shape != input.shape:
        y = y.view(input.shape)
    if return_residual:
        return y, (s.view(input.shape) if residual is not None else input)
    return y


def layer_norm(input: Tensor, normalized_shape: Union[int, Sequence[int]], weight: Optional[Tensor] = None,
               bias: Optional[Tensor] = None, eps: float = 1e-5, *, residual: Optional[Tensor] = None,
               return_residual: bool = False, backend: Optional[str] = None):
    """``F.layer_norm`` semantics; with ``residual``: LN(input + residual) (Add & Norm), and with
    ``return_residual=True`` also ``input + residual`` (the un-normalised sum, for pre-norm stacks)."""
    return _norm(input, normalized_shape, weight, bias, eps, residual, return_residual, backend, rms=False)


def rms_norm(input: Tensor, normalized_shape: Union[int, Sequence[int]], weight: Optional[Tensor] = None,
             eps: Optional[float] = None, *, residual: Optional[Tensor] = None, return_residual: bool = False,
             backend: Optional[str] = None):
    """``F.rms_norm`` semantics (eps=None: the epsilon torch uses, that of the compute dtype: float32's for
    float16 / bfloat16 inputs, see rms_eps), with the same residual options."""
    if eps is None:
        eps = rms_eps(input.dtype) if isinstance(input, Tensor) and input.is_floating_point() else 1e-6
    return _norm(input, normalized_shape, weight, None, eps, residual, return_residual, backend, rms=True)


def make_inputs(input, normalized_shape, weight=None, bias=None, eps=1e-5, *, residual=None, rms=False, **_):
    """The NormInputs a call would dispatch on (for pyattn.explain)."""
    if rms and eps is None:
        eps = rms_eps(input.dtype)
    shape = _validate(input, normalized_shape, weight, bias, eps, residual, rms)
    n = math.prod(shape)
    return NormInputs(_rows(input, n, len(shape)), _rows(residual, n, len(shape)), weight, bias, float(eps), rms)
