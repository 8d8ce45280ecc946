"""Scaled dot-product attention: inputs, validation, custom ops, autograd, public functions.

Public entry points (re-exported by pyattn.functional):

* ``scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)``:
  torch's semantics and error texts: (..., H, L, D) inputs of any rank >= 2 (batch dims broadcast like
  torch's, through stride-0 views), top-left causal, bool mask True = keep, float mask added to the logits,
  fully masked rows give 0 (torch >= 2.5).
* ``flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, return_lse)``: flash-attn's convention: (B, L,
  H, D) inputs (seen as (B, H, L, D) transpose *views*, no copy), bottom-right causal when Lq != Lk (query i
  sees keys j <= i + Lk - Lq), GQA/MQA by fewer kv heads, optionally also returning the log-sum-exp (B, H,
  Lq).

Conventions shared by every backend (the op contract):

* q, k, v reach a backend in (B, H, L, D) layout with ``stride(-1) == 1`` (copied only when that is not so;
  any other strides, including 0 from broadcasting, are passed through). The output has q's layout: (B, L, H,
  D) memory when q is a transposed view of a contiguous (B, L, H, D) tensor (what flash_attn_func passes),
  else contiguous. dq/dk/dv follow q/k/v the same way; dout is handed to backends with out's strides.
* mask: None, bool (True = keep) or additive (float32 or q's dtype), 4-D (B|1, Hq|1, Lq|1, Lk|1): a dim that
  was broadcast (size 1 or stride 0) is size 1, so ``AttentionInputs.mask_pattern`` says along which dims it
  varies; its last dim has stride 1 unless it is size 1.
* GQA: Hkv divides Hq; query head h uses kv head h // (Hq // Hkv). Kernels must not materialise repeated K/V.
* lse: natural-log log-sum-exp of the scaled, masked logits, (B, Hq, Lq), float32 (float64 for float64 inputs,
  the oracle). A fully masked row (every logit -inf, or Lk == 0) has lse = +inf and output 0 (flash-attn's
  convention: backward's exp(s - lse) then recomputes P = 0, so its gradients are 0 too). lse is not
  differentiable.
* Dropout (p in [0, 1)): the public functions draw ``rng = [seed, offset]`` (int64, CPU) from torch's default
  generator, so ``torch.manual_seed`` makes a call reproducible; kept probabilities are scaled by 1 / (1 - p).
  The keep-mask is a deterministic function of (seed, offset) *within a backend* (the torch backend:
  ``pyattn.backends.torch.dropout_keep_mask``), so the forward returns ``rng_state = [seed, offset, backend
  id]`` and the backward runs on the same backend.
* Empty inputs (B, H or Lq == 0: empty output; Lk == 0: zero output, lse +inf) never reach a backend.
* Gradients flow to q, k and v, never through the custom ops to the mask. An additive mask that requires grad
  is computed by a differentiable pure-torch path (``pyattn.backends.torch.attention_math``) so it gets its
  gradient; forcing any other backend for such a call raises.
"""
from __future__ import annotations

import array
import math
import numbers
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import Tensor

from ..dispatch import OpInputs, backend_request, select
from ..dispatch.registry import _BACKENDS, _requested
from ._common import Op, autocast_lower_precision, dtype_name

_TORCH_DTYPE_NAMES = {
    torch.float32: "float",
    torch.float64: "double",
    torch.float16: "c10::Half",
    torch.bfloat16: "c10::BFloat16",
    torch.int64: "long int",
    torch.int32: "int",
    torch.bool: "bool",
    torch.int16: "short int",
    torch.int8: "signed char",
    torch.uint8: "unsigned char",
}


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """The lse dtype: float32, except float64 for float64 inputs (the oracle)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tname(dtype: torch.dtype) -> str:
    """A dtype as torch's C++ error texts print it (float, double, c10::Half, long int, ...)."""
    return _TORCH_DTYPE_NAMES.get(dtype, dtype_name(dtype))


def _mask_kind(mask: Optional[Tensor]) -> str:
    return "none" if mask is None else ("bool" if mask.dtype == torch.bool else "additive")


def _mask_pattern(mask: Optional[Tensor]) -> Optional[tuple]:
    return None if mask is None else tuple(s != 1 for s in mask.shape)


def _decoding(lq: int, group: int, lk: int) -> bool:
    """At most 8 query rows per kv head (Lq x group) over at least 256 keys: a decoding step, the shape
    csrc/cuda/attention_decode.cu's split-KV kernel takes (decode_plan's kDecodeMaxRows / kDecodeMinKeys)."""
    return lq * group <= 8 and lk >= 256


def _causal_alignment(causal: bool, bottom_right: bool, lq: int, lk: int) -> str:
    if not causal:
        return "none"
    return "bottom_right" if (bottom_right and lq != lk) else "top_left"


@dataclass
class AttentionInputs(OpInputs):
    q: Tensor  # (B, Hq, Lq, D)
    k: Tensor  # (B, Hkv, Lk, D)
    v: Tensor  # (B, Hkv, Lk, Dv)
    mask: Optional[Tensor]  # (B|1, Hq|1, Lq|1, Lk|1): bool (True = keep) or additive
    dropout_p: float
    causal: bool
    bottom_right: bool  # causal alignment: False = top-left (torch), True = bottom-right (flash-attn)
    scale: float
    needs_grad: bool = False

    op: ClassVar[str] = "attention"

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def batch(self) -> int:
        return self.q.shape[0]

    @property
    def heads(self) -> int:
        return self.q.shape[1]

    @property
    def kv_heads(self) -> int:
        return self.k.shape[1]

    @property
    def group(self) -> int:
        """GQA ratio Hq // Hkv (1: plain multi-head attention)."""
        return self.q.shape[1] // max(self.k.shape[1], 1)

    @property
    def q_len(self) -> int:
        return self.q.shape[2]

    @property
    def k_len(self) -> int:
        return self.k.shape[2]

    @property
    def head_dim(self) -> int:
        return self.q.shape[3]

    @property
    def decoding(self) -> bool:
        """A decoding step (_decoding)."""
        return _decoding(self.q.shape[2], self.group, self.k.shape[2])

    @property
    def v_head_dim(self) -> int:
        return self.v.shape[3]

    @property
    def mask_kind(self) -> str:
        return _mask_kind(self.mask)

    @property
    def mask_pattern(self) -> Optional[tuple]:
        """For each of (B, H, Lq, Lk): does the mask vary along it (True) or is it broadcast (False)."""
        return _mask_pattern(self.mask)

    @property
    def causal_alignment(self) -> str:
        """'none', 'top_left' or 'bottom_right' (the two coincide when Lq == Lk, reported as 'top_left')."""
        return _causal_alignment(self.causal, self.bottom_right, self.q_len, self.k_len)

    def nothing_to_compute(self) -> bool:
        b, h, lq, d = self.q.shape
        return b * h * lq == 0 or self.k.shape[2] == 0 or d == 0 or self.v.shape[3] == 0

    def signature(self) -> tuple:
        # runs on every call: the properties' values from one read of each shape (a .shape makes a new torch.Size)
        q, mask = self.q, self.mask
        _, hq, lq, d = q.shape
        hk, lk = self.k.shape[1:3]
        return (
            q.device.type,
            q.dtype,
            d,
            self.v.shape[3],
            _causal_alignment(self.causal, self.bottom_right, lq, lk),
            _mask_kind(mask),
            None if mask is None else mask.dtype,
            _mask_pattern(mask),
            self.dropout_p > 0,
            hq // max(hk, 1),
            self.needs_grad,
            lq >= 128,  # (a backend's preference may depend on these three: Backend.preferred_for)
            _decoding(lq, hq // max(hk, 1), lk),
            self.scale > 0,
        )

    def describe(self) -> dict:
        return {
            "q": tuple(self.q.shape),
            "k": tuple(self.k.shape),
            "v": tuple(self.v.shape),
            "dtype": dtype_name(self.dtype),
            "head_dim": self.head_dim,
            **({"v_head_dim": self.v_head_dim} if self.v_head_dim != self.head_dim else {}),
            "causal": self.causal_alignment,
            "mask": self.mask_kind,
            **(
                {"mask_shape": tuple(self.mask.shape), "mask_dtype": dtype_name(self.mask.dtype)}
                if self.mask is not None
                else {}
            ),
            "dropout_p": self.dropout_p,
            "gqa_group": self.group,
            "scale": self.scale,
            "needs_grad": self.needs_grad,
        }


# ---- validation --------------------------------------------------------------------------------------------


def _check_common(q, k, v, dropout_p, scale, names=("query", "key", "value")) -> None:
    """Checks shared by both public functions, in torch's order and with its texts where torch has one."""
    if not (isinstance(q, Tensor) and isinstance(k, Tensor) and isinstance(v, Tensor)):
        for name, t in zip(names, (q, k, v)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    a, b, c = names
    if not (q.dtype == k.dtype == v.dtype):
        raise RuntimeError(
            f"Expected {a}, {b}, and {c} to have the same dtype, but got {a}.dtype: {_tname(q.dtype)} "
            f"{b}.dtype: {_tname(k.dtype)} and {c}.dtype: {_tname(v.dtype)} instead."
        )
    if not (q.device == k.device == v.device):
        raise RuntimeError(
            f"Expected {a}, {b}, and {c} to have the same device type, but got {a}.device: "
            f"{q.device} {b}.device: {k.device} and {c}.device: {v.device} instead."
        )
    if not q.is_floating_point():
        raise RuntimeError(
            f"pyattn attention: expected floating point {a}, {b} and {c}, but got "
            f"{dtype_name(q.dtype)} (float16, bfloat16, float32 or float64)"
        )
    if not (type(dropout_p) is float or isinstance(dropout_p, numbers.Real)):
        if not (isinstance(dropout_p, Tensor) and dropout_p.dim() == 0 and not dropout_p.is_complex()):
            raise TypeError(f"dropout_p must be a float, got {type(dropout_p).__name__}")
        dropout_p = float(dropout_p)  # a 0-d tensor, as torch takes it
    if not (0.0 <= dropout_p <= 1.0):
        raise RuntimeError(f"dropout probability has to be between 0 and 1, but got {dropout_p}")
    if dropout_p == 1.0:
        raise RuntimeError(
            "pyattn attention: dropout probability 1.0 is not supported (it would drop every "
            "attention weight); use dropout_p in [0, 1)"
        )
    if scale is not None and (not isinstance(scale, numbers.Real) or not math.isfinite(scale)):
        raise ValueError(
            f"pyattn attention: scale must be a finite number (or None for 1/sqrt(head_dim)), got {scale!r}"
        )


def _check_dims(q, k, v, names, seq: int = -2) -> None:
    """Head dims of q and k equal, sequence lengths (dim ``seq``) of k and v equal; the texts show the shapes as
    passed."""
    a, b, c = names
    if q.shape[-1] != k.shape[-1]:
        raise RuntimeError(
            f"Expected {a} and {b} to have the same head dimension (last dim), but got "
            f"{a}.size(-1): {q.shape[-1]} and {b}.size(-1): {k.shape[-1]}"
        )
    if k.shape[seq] != v.shape[seq]:
        raise RuntimeError(
            f"Expected {b} and {c} to have the same sequence length, but got {b} of shape "
            f"{list(k.shape)} and {c} of shape {list(v.shape)}"
        )


def _check_mask(mask, q, target: tuple) -> None:
    if not isinstance(mask, Tensor):
        raise TypeError(f"attn_mask must be a Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool and mask.dtype != torch.float32 and mask.dtype != q.dtype:
        raise RuntimeError(
            f"Expected attn_mask dtype to be bool or float or to match query dtype, but got "
            f"attn_mask.dtype: {_tname(mask.dtype)} and  query.dtype: {_tname(q.dtype)} instead."
        )
    if mask.device != q.device:
        raise RuntimeError(
            f"Expected attn_mask to be on the same device as query, but got attn_mask.device: "
            f"{mask.device} and query.device: {q.device}"
        )
    ok = mask.dim() <= len(target) and all(
        ms == 1 or ms == ts for ms, ts in zip(reversed(mask.shape), reversed(target))
    )
    if not ok:
        raise RuntimeError(
            f"attn_mask of shape {list(mask.shape)} cannot be broadcast to the attention weights' "
            f"shape {list(target)} (batch..., heads, query length, key length)"
        )


def _unit_last(t: Tensor) -> Tensor:
    """Kernels need stride(-1) == 1; copy only when a tensor lacks it."""
    return t if (t.stride(-1) == 1 or t.shape[-1] <= 1) else t.contiguous()  # (the common case first)


def _canonical_mask(mask: Tensor, batch: tuple, b: int) -> Tensor:
    """A mask broadcastable to batch + (H, Lq, Lk) -> 4-D (B|1, H|1, Lq|1, Lk|1), views where possible."""
    full = len(batch) + 3
    mask = mask[(None,) * (full - mask.dim())]
    mbatch = tuple(mask.shape[: len(batch)])
    if all(s == 1 for s in mbatch):
        mask = mask.reshape((1,) + tuple(mask.shape[len(batch) :]))
    else:
        mask = mask.expand(tuple(batch) + tuple(mask.shape[len(batch) :])).reshape(
            (b,) + tuple(mask.shape[len(batch) :])
        )
    return _drop_broadcast(mask)


def _drop_broadcast(mask: Tensor) -> Tensor:
    """A 4-D mask with each dim broadcast by expand (stride 0) narrowed to size 1, and a unit last stride."""
    for d in range(4):
        if mask.shape[d] > 1 and mask.stride(d) == 0:
            mask = mask.narrow(d, 0, 1)
    return _unit_last(mask)


def _default_scale(scale, d: int) -> float:
    return float(scale) if scale is not None else (1.0 / math.sqrt(d) if d > 0 else 1.0)


def _needs_grad(q: Tensor, k: Tensor, v: Tensor) -> bool:
    return torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)


def _broadcast(sizes, what: str) -> int:
    vals = {s for s in sizes if s != 1}
    if len(vals) > 1:
        raise RuntimeError(what)
    return vals.pop() if vals else 1


def _flatten_batch(t: Tensor, shape: tuple, b: int) -> Tensor:
    """t broadcast to ``shape`` (*batch, H, L, D) and viewed as (b, H, L, D); t itself when it already is."""
    if len(shape) == 4 and t.shape == shape:
        return t
    return t[(None,) * (len(shape) - t.dim())].expand(shape).reshape((b,) + shape[-3:])


def _prepare_sdpa_4d(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """_prepare_sdpa for the common call, 4-D query / key / value with one batch size, key and value heads equal
    to the query's, 1 (broadcast) or, with enable_gqa, dividing them, and a 4-D mask or none: the same result
    without the general path's broadcasting (~9 -> ~3 us a call). None for any other call, including every
    inconsistent one, whose error the general path raises."""
    if not (isinstance(query, Tensor) and isinstance(key, Tensor) and isinstance(value, Tensor)):
        return None
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        return None
    if attn_mask is not None and (is_causal or not isinstance(attn_mask, Tensor) or attn_mask.dim() != 4):
        return None
    b, hq, lq, d = query.shape
    bk, hk, lk, dk = key.shape
    bv, hv, lv, dv = value.shape
    if bk != b or bv != b or dk != d or lv != lk or hv != hk or hk == 0:
        return None
    if hk != hq and hk != 1 and not (enable_gqa and hq % hk == 0):
        return None
    _check_common(query, key, value, dropout_p, scale, ("query", "key", "value"))
    mask = None
    if attn_mask is not None:
        _check_mask(attn_mask, query, (b, hq, lq, lk))
        mask = _drop_broadcast(attn_mask)
    inputs = AttentionInputs(_unit_last(query), _unit_last(key), _unit_last(value), mask, float(dropout_p),
                             bool(is_causal), False, _default_scale(scale, d), _needs_grad(query, key, value))
    return inputs, (b, hq, lq, dv)


def _prepare_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """Validate torch-style arguments -> (AttentionInputs in (B, H, L, D) form, output shape)."""
    fast = _prepare_sdpa_4d(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if fast is not None:
        return fast
    return _prepare_sdpa_general(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)


def _prepare_sdpa_general(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """_prepare_sdpa for any rank >= 2 with broadcast batch dims (and every error message)."""
    names = ("query", "key", "value")
    _check_common(query, key, value, dropout_p, scale, names)
    if query.dim() < 2 or key.dim() < 2 or value.dim() < 2:
        raise RuntimeError(
            f"Expected query, key, and value to all be  at least 2 dimensional, but got query.dim: "
            f"{query.dim()} key.dim: {key.dim()} and value.dim: {value.dim()} instead."
        )
    if attn_mask is not None and is_causal:
        raise RuntimeError(
            "_scaled_dot_product_attention: Explicit attn_mask should not be set when is_causal=True"
        )
    _check_dims(query, key, value, names)
    rank = max(query.dim(), key.dim(), value.dim())
    r = max(rank, 3)
    qs, ks, vs = ((1,) * (r - t.dim()) + tuple(t.shape) for t in (query, key, value))  # (*batch, H, L, D)
    nb = r - 3
    try:
        batch = tuple(_broadcast(sz, "") for sz in zip(qs[:nb], ks[:nb], vs[:nb]))
    except RuntimeError:
        raise RuntimeError(
            f"Expected query, key and value batch dimensions to be broadcastable, but got query of "
            f"shape {list(query.shape)}, key {list(key.shape)} and value {list(value.shape)}"
        ) from None
    hq, hk, hv = qs[-3], ks[-3], vs[-3]
    if enable_gqa:
        if hk != hv or (hq % hk != 0 if hk > 0 else hq != 0):
            raise RuntimeError(
                f"Number of heads in key and value must divide the number of heads in query (query "
                f"has {hq} heads, key {hk}, value {hv}; key and value need the same number)"
            )
        h, hkv = hq, hk
    else:
        h = _broadcast(
            (hq, hk, hv),
            f"The size of tensor a ({hq}) must match the size of tensor b "
            f"({hk if hk != hq else hv}) at non-singleton dimension 1 (query has {hq} heads, "
            f"key {hk}, value {hv}; pass enable_gqa=True for grouped-query attention)",
        )
        hkv = 1 if (hk == 1 and hv == 1) else h  # k/v broadcast over all heads = MQA: no expand needed
    lq, lk, d, dv = qs[-2], ks[-2], qs[-1], vs[-1]
    b = math.prod(batch)
    q = _flatten_batch(query, batch + (h, lq, d), b)
    k = _flatten_batch(key, batch + (hkv, lk, d), b)
    v = _flatten_batch(value, batch + (hkv, lk, dv), b)
    mask = None
    if attn_mask is not None:
        _check_mask(attn_mask, query, batch + (h, lq, lk))
        mask = _canonical_mask(attn_mask, batch, b)
    inputs = AttentionInputs(
        _unit_last(q),
        _unit_last(k),
        _unit_last(v),
        mask,
        float(dropout_p),
        bool(is_causal),
        False,
        _default_scale(scale, d),
        _needs_grad(query, key, value),
    )
    out_shape = (lq, dv) if rank == 2 else batch + (h, lq, dv)
    return inputs, out_shape


def _prepare_flash(q, k, v, dropout_p, softmax_scale, causal) -> AttentionInputs:
    names = ("q", "k", "v")
    _check_common(q, k, v, dropout_p, softmax_scale, names)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise RuntimeError(
            f"flash_attn_func expects q, k, v of shape (batch, seqlen, nheads, headdim), but got "
            f"q.dim: {q.dim()} k.dim: {k.dim()} and v.dim: {v.dim()}"
        )
    _check_dims(q, k, v, names, seq=1)
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise RuntimeError(
            f"Expected q, k and v to have the same batch size, but got q of shape {list(q.shape)}, "
            f"k {list(k.shape)} and v {list(v.shape)}"
        )
    hq, hk, hv = q.shape[2], k.shape[2], v.shape[2]
    if hk != hv or (hq % hk != 0 if hk > 0 else hq != 0):
        raise RuntimeError(
            f"Number of heads in key/value must divide number of heads in query (q has {hq} heads, "
            f"k {hk}, v {hv}; k and v need the same number)"
        )
    return AttentionInputs(
        _unit_last(q.transpose(1, 2)),
        _unit_last(k.transpose(1, 2)),
        _unit_last(v.transpose(1, 2)),
        None,
        float(dropout_p),
        bool(causal),
        True,
        _default_scale(softmax_scale, q.shape[-1]),
        _needs_grad(q, k, v),
    )


def _check_canonical(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor]) -> None:
    """The op-level contract, re-checked because torch.ops.pyattn.attention_fwd can be called directly."""
    qs, ks, vs = q.shape, k.shape, v.shape  # (each .shape makes a new torch.Size: read once, this runs every call)
    if len(qs) != 4 or len(ks) != 4 or len(vs) != 4:
        raise RuntimeError(
            f"pyattn::attention_fwd expects 4-D (B, H, L, D) q, k, v, got {list(qs)}, {list(ks)}, {list(vs)}"
        )
    b, hq, lq, d = qs
    bk, hk, lk, dk = ks
    bv, hv, lv, _ = vs
    if bk != b or bv != b or dk != d or hv != hk or lv != lk or (hq % hk != 0 if hk > 0 else hq != 0):
        raise RuntimeError(
            f"pyattn::attention_fwd: inconsistent shapes q {list(qs)}, k {list(ks)}, "
            f"v {list(vs)} (need k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv), Hkv dividing Hq)"
        )
    if mask is not None:
        target = (b, hq, lq, lk)
        if mask.dim() != 4 or any(ms != 1 and ms != ts for ms, ts in zip(mask.shape, target)):
            raise RuntimeError(
                f"pyattn::attention_fwd: mask of shape {list(mask.shape)} is not 4-D broadcastable "
                f"to {list(target)}"
            )


# ---- layouts -----------------------------------------------------------------------------------------------


def _is_blhd(t: Tensor) -> bool:
    """A (B, H, L, D) tensor whose memory runs (B, L, H, D): heads inside positions, as flash_attn_func passes
    them and as pyattn.nn.MultiheadAttention's head views of its projections are. Outputs and gradients then
    take (B, L, H, D) memory too, so merging the heads back is a view. Read from the strides (runs every call)."""
    b, h, length, d = t.shape
    if h <= 1 or length <= 1:
        return False
    st = t.stride()
    return st[1] < st[2]


def _layout_strides(ref: Tensor, shape) -> tuple:
    """Strides of a (B, H, L, D) tensor of ``shape`` in ref's layout: (B, L, H, D) memory when ref is such a
    view, else contiguous."""
    b, h, length, d = shape
    if _is_blhd(ref):
        return (length * h * d, d, h * d, 1)
    return (h * length * d, length * d, d, 1)


def _empty_like_layout(ref: Tensor, shape) -> Tensor:
    """An empty (B, H, L, D) tensor of ref's dtype in ref's layout (see _layout_strides)."""
    return ref.new_empty_strided(tuple(shape), _layout_strides(ref, shape))


def _in_layout(result: Tensor, ref: Tensor) -> Tensor:
    """``result`` (B, H, L, D) with exactly the strides and dtype _empty_like_layout(ref, ...) gives (what the fake
    impls promise torch.compile), copied only when a backend returned another layout or dtype."""
    if result.dtype == ref.dtype and result.stride() == _layout_strides(ref, result.shape):
        return result
    return _empty_like_layout(ref, result.shape).copy_(result)


def _backend_id(name: str) -> int:
    return list(_BACKENDS).index(name)


def _backend_name(i: int) -> str:
    return list(_BACKENDS)[i]


def _rng_state(seed: int, offset: int, backend_id: int) -> Tensor:
    """The forward's rng_state output, int64 [seed, offset, backend id] on CPU: made from an int64 array's buffer
    (1.0 us on CPU) instead of torch.tensor of a list (2.8 us; every forward call makes one)."""
    return torch.frombuffer(array.array("q", (seed, offset, backend_id)), dtype=torch.int64)


def _seed_offset(rng: Optional[Tensor]) -> tuple[int, int]:
    if rng is None:
        return 0, 0
    vals = rng.tolist()
    return int(vals[0]), int(vals[1]) if len(vals) > 1 else 0


# ---- ops: custom ops for torch.compile, a direct path for plain eager calls (_common.Op). Selection happens
# inside, at run time. ----------------------------------------------------------------------------------


def _attention_fwd_impl(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Optional[Tensor],
    dropout_p: float,
    causal: bool,
    bottom_right: bool,
    scale: float,
    rng: Optional[Tensor],
    needs_grad: bool,
    backend: Optional[str],
) -> tuple[Tensor, Tensor, Tensor]:
    """q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv), mask (B|1, Hq|1, Lq|1, Lk|1) or None,
    rng: int64 [seed, offset] (used when dropout_p > 0) -> out (B, Hq, Lq, Dv) in q's layout, lse (B, Hq, Lq)
    fp32 (fp64 for fp64), rng_state int64 [seed, offset, backend id (-1: no backend ran)] on CPU."""
    _check_canonical(q, k, v, mask)
    b, h, lq, _ = q.shape
    lk, dv = k.shape[2], v.shape[3]
    seed, offset = _seed_offset(rng) if dropout_p > 0 else (0, 0)
    lse_dtype = stat_dtype(q.dtype)
    if b * h * lq == 0 or lk == 0:  # nothing to compute: no kernel runs
        out = _empty_like_layout(q, (b, h, lq, dv)).zero_()
        lse = q.new_empty((b, h, lq), dtype=lse_dtype).fill_(math.inf)
        return out, lse, _rng_state(seed, offset, -1)
    inputs = AttentionInputs(q, k, v, mask, dropout_p, causal, bottom_right, scale, needs_grad)
    be = select(inputs, backend)
    o, lse = be.attention_fwd(q, k, v, mask, dropout_p, causal, bottom_right, scale, seed, offset)
    if lse.dtype != lse_dtype or not lse.is_contiguous():
        lse = lse.to(lse_dtype, memory_format=torch.contiguous_format)
    state = _rng_state(seed, offset, _backend_id(be.name))
    return _in_layout(o, q), lse, state


def _attention_fwd_fake(q, k, v, mask, dropout_p, causal, bottom_right, scale, rng, needs_grad, backend):
    b, h, lq, _ = q.shape
    out = _empty_like_layout(q, (b, h, lq, v.shape[3]))
    return out, q.new_empty((b, h, lq), dtype=stat_dtype(q.dtype)), torch.empty(3, dtype=torch.int64)


def _attention_bwd_impl(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    mask: Optional[Tensor],
    dropout_p: float,
    causal: bool,
    bottom_right: bool,
    scale: float,
    rng_state: Tensor,
    backend: Optional[str],
) -> tuple[Tensor, Tensor, Tensor]:
    """Recomputes from q, k, v, out, lse, dout -> dq, dk, dv in q's, k's, v's layouts (dk/dv with Hkv heads).
    With dropout the backward runs on the backend named in rng_state (the forward's): keep-masks are per
    backend."""
    _check_canonical(q, k, v, mask)
    b, h, lq, _ = q.shape
    if b * h * lq == 0 or k.shape[2] == 0:
        return tuple(_empty_like_layout(t, t.shape).zero_() for t in (q, k, v))
    seed, offset, bid = (int(x) for x in rng_state.tolist())
    inputs = AttentionInputs(q, k, v, mask, dropout_p, causal, bottom_right, scale, True)
    if dropout_p > 0 and bid >= 0:
        be = select(inputs, _backend_name(bid))
    else:
        be = select(inputs, backend)
    gq, gk, gv = be.attention_bwd(
        dout, q, k, v, out, lse, mask, dropout_p, causal, bottom_right, scale, seed, offset
    )
    return _in_layout(gq, q), _in_layout(gk, k), _in_layout(gv, v)


def _attention_bwd_fake(dout, q, k, v, out, lse, mask, dropout_p, causal, bottom_right, scale, rng_state, backend):
    return _empty_like_layout(q, q.shape), _empty_like_layout(k, k.shape), _empty_like_layout(v, v.shape)


_attention_bwd = Op("pyattn::attention_bwd", _attention_bwd_impl, _attention_bwd_fake)


def _setup_context(ctx, inputs, output):
    q, k, v, mask, dropout_p, causal, bottom_right, scale, rng, needs_grad, backend = inputs
    out, lse, rng_state = output
    ctx.mark_non_differentiable(lse, rng_state)
    ctx.set_materialize_grads(False)  # no zero tensors for lse / rng_state per call
    ctx.save_for_backward(q, k, v, out, lse, mask, rng_state)
    ctx.meta = (dropout_p, causal, bottom_right, scale, backend_request(backend))


def _backward(ctx, dout, dlse, drng):
    q, k, v, out, lse, mask, rng_state = ctx.saved_tensors
    dropout_p, causal, bottom_right, scale, backend = ctx.meta
    if ctx.needs_input_grad[3]:
        raise RuntimeError(
            "pyattn::attention_fwd does not differentiate attn_mask; call pyattn's public functions, "
            "which compute a mask that requires grad through a differentiable torch path"
        )
    if dout is None:  # only lse was used (it is not differentiable)
        return (None,) * 11
    if dout.stride() != out.stride():  # e.g. the stride-0 grad of out.sum(): hand backends out's layout
        dout = torch.empty_like(out).copy_(dout)
    dq, dk, dv = _attention_bwd(
        dout, q, k, v, out, lse, mask, dropout_p, causal, bottom_right, scale, rng_state, backend
    )
    need = ctx.needs_input_grad
    return (
        dq if need[0] else None,
        dk if need[1] else None,
        dv if need[2] else None,
        None,
        None,
        None,
        None,
        None,
        None,
        None,
        None,
    )


_attention_fwd = Op("pyattn::attention_fwd", _attention_fwd_impl, _attention_fwd_fake, _setup_context, _backward)


# ---- public functions --------------------------------------------------------------------------------------


def _run(inputs: AttentionInputs, backend: Optional[str]) -> tuple[Tensor, Tensor]:
    """-> out (B, H, Lq, Dv), lse (B, H, Lq)."""
    rng = torch.randint(0, 2**62, (2,), dtype=torch.int64) if inputs.dropout_p > 0 else None
    q, k, v, mask = inputs.q, inputs.k, inputs.v, inputs.mask
    empty = q.shape[0] * q.shape[1] * q.shape[2] == 0 or k.shape[2] == 0
    if mask is not None and mask.requires_grad and torch.is_grad_enabled() and not empty:
        # (Dynamo cannot trace use_backend()'s ContextVar: under torch.compile only backend= and the env var count)
        name, source = _requested(backend, context=not torch.compiler.is_compiling())
        if name is not None and name != "torch":
            raise RuntimeError(
                f"pyattn attention: attn_mask requires grad, which only the torch backend computes, "
                f"but backend {name!r} is forced by {source}"
            )
        from ..backends.torch import attention_math

        seed, offset = _seed_offset(rng)
        out, lse = attention_math(
            q, k, v, mask, inputs.dropout_p, inputs.causal, inputs.bottom_right, inputs.scale, seed, offset
        )
        return out.to(q.dtype), lse.detach()
    if empty and mask is not None:
        mask = mask.detach()  # nothing is computed: no grad reaches the mask (torch's sdpa gives None too)
    out, lse, _ = _attention_fwd(
        q,
        k,
        v,
        mask,
        inputs.dropout_p,
        inputs.causal,
        inputs.bottom_right,
        inputs.scale,
        rng,
        inputs.needs_grad,
        backend,
    )
    return out, lse


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    *,
    backend: Optional[str] = None,
) -> Tensor:
    """``torch.nn.functional.scaled_dot_product_attention`` semantics: query (..., Hq, Lq, D), key (..., Hkv,
    Lk, D), value (..., Hkv, Lk, Dv), any rank >= 2, batch dims broadcast -> (..., Hq, Lq, Dv). ``attn_mask``:
    bool (True = take part) or float (added to the logits), broadcastable to (..., Hq, Lq, Lk); ``is_causal``:
    top-left causal mask. Fully masked rows give 0. Dropout draws its seed from torch's default generator.
    Inside torch.autocast, floating inputs are cast to the region's dtype first, as torch's SDPA is."""
    query, key, value, attn_mask = autocast_lower_precision(query, key, value, attn_mask)
    inputs, out_shape = _prepare_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    out, _ = _run(inputs, backend)
    return out.reshape(out_shape)


def flash_attn_func(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    *,
    return_lse: bool = False,
    backend: Optional[str] = None,
):
    """flash-attn's ``flash_attn_func``: q (B, Lq, Hq, D), k (B, Lk, Hkv, D), v (B, Lk, Hkv, Dv) -> out
    (B, Lq, Hq, Dv) (contiguous for contiguous q), and with ``return_lse`` also lse (B, Hq, Lq) float32
    (float64 for float64 inputs; natural log, +inf on rows that see no key; not differentiable). ``causal`` is
    bottom-right aligned: query i sees keys j <= i + Lk - Lq."""
    inputs = _prepare_flash(q, k, v, dropout_p, softmax_scale, causal)
    out, lse = _run(inputs, backend)
    out = out.transpose(1, 2)
    return (out, lse) if return_lse else out


def make_inputs(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, **_
) -> AttentionInputs:
    """The AttentionInputs a ``scaled_dot_product_attention`` call would dispatch on (for pyattn.explain)."""
    return _prepare_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)[0]
