"""Shared by tests and benchmarks: input makers, reference runners and the tolerance policy (TESTING.md).

* ``make_qkv`` builds attention inputs in the layouts every backend must handle, with the same values for the
  same seed whatever the layout (except ``"expanded"``), so layout tests can compare bit for bit.
* ``nan_padded`` returns a view of a larger NaN-filled buffer: any read past the logical end shows up as NaN.
* ``attention_ref`` runs the ``torch`` backend in float64 (the oracle); ``attention_low`` runs the same math
  in the input dtype with the operation order perturbed; ``assert_attention_close`` applies TESTING.md's rule
  to both.
* ``TOL`` holds the per-dtype (atol, rtol) tables for LayerNorm and GRU; ``assert_close_fp32`` the fp32
  policy.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

# ---- tolerance policy --------------------------------------------------------------------------------------

FP32_FWD = (1e-5, 1.3e-6)  # (atol, rtol): CPU kernels and the Triton interpreter compute exact fp32
FP32_BWD = (1e-4, 1e-5)  # backward sums many products: looser atol

# TOL[op][dtype] = ((atol, rtol) forward, (atol, rtol) backward), against the float64 oracle.
TOL = {
    "layer_norm": {
        # fp32: TESTING.md's policy.
        torch.float32: ((1e-5, 1.3e-6), (1e-4, 1e-5)),
        # bf16: one rounding of the output (ulp 2^-8 = 3.9e-3 relative) on values up to ~4 (|xhat| <= ~4),
        # plus the rounding of x + residual before normalising; backward sums N products of rounded values.
        torch.bfloat16: ((2e-2, 1e-2), (5e-2, 2e-2)),
        # fp16: as bf16 with ulp 2^-11 = 4.9e-4 relative.
        torch.float16: ((4e-3, 2e-3), (1e-2, 4e-3)),
        torch.float64: ((1e-12, 1e-12), (1e-11, 1e-11)),  # the oracle against torch's own float64 ops
    },
    "gru": {
        # Backward atol is relative: it is multiplied by max(1, max|ref|) of the tensor compared, because
        # weight grads are sums over T * B rows whose size grows with them (|dW| ~ 80 at T = 200). Budgets
        # below were measured on T up to 1000, H up to 1000 (the torch backend run in the dtype vs float64
        # from unrounded inputs, an upper bound) and given a 3-10x margin.
        # fp32: TESTING.md's policy; the recurrence is contractive for torch's U(-1/sqrt(H), 1/sqrt(H)) init,
        # so the state's error stays at a few ulps (measured 2e-7 forward, 3e-7 relative backward).
        torch.float32: ((1e-5, 1.3e-6), (1e-4, 1e-5)),
        # bf16: the state is rounded to bf16 each step (ulp 2^-8 = 3.9e-3 on |h| <= 1); measured 3.3e-3
        # forward (rtol 1e-2) and 1.4e-2 relative backward (rtol 2e-2).
        torch.bfloat16: ((1e-2, 1e-2), (5e-2, 2e-2)),
        # fp16: as bf16 with ulp 2^-11 = 4.9e-4; measured 3.5e-4 forward (rtol 2e-3), 3.7e-4 relative
        # backward.
        torch.float16: ((2e-3, 2e-3), (4e-3, 1e-2)),
        torch.float64: ((1e-12, 1e-12), (1e-11, 1e-11)),  # the oracle against torch.nn.GRU in float64
    },
}


def assert_close_fp32(out: Tensor, ref: Tensor, kind: str = "fwd", msg: Optional[str] = None) -> None:
    """TESTING.md's fp32 rule: atol 1e-5 / rtol 1.3e-6 forward, atol 1e-4 / rtol 1e-5 backward (NaNs must
    match)."""
    atol, rtol = {"fwd": FP32_FWD, "bwd": FP32_BWD}[kind]
    torch.testing.assert_close(out.double(), ref.double(), atol=atol, rtol=rtol, equal_nan=True, msg=msg)


def assert_tol(out: Tensor, ref: Tensor, op: str, dtype: torch.dtype, kind: str = "fwd",
               msg: Optional[str] = None) -> None:
    """Compare with TOL[op][dtype] (forward or backward entry); GRU backward atol scales with max(1,
    max|ref|)."""
    atol, rtol = TOL[op][dtype][0 if kind == "fwd" else 1]
    if op == "gru" and kind != "fwd" and ref.numel() > 0:
        atol *= max(1.0, ref.detach().abs().nan_to_num(0, 0, 0).max().item())
    torch.testing.assert_close(out.double(), ref.double(), atol=atol, rtol=rtol, equal_nan=True, msg=msg)


def assert_attention_close(out: Tensor, ref: Tensor, low: Tensor, factor: float, floor: float = 1e-3,
                           name: str = "out") -> None:
    """TESTING.md's attention rule: NaN/inf patterns equal; max|out - ref| <= factor * max|low - ref| + floor
    (F = 2 forward, 3 backward); relative RMS error sqrt(mean((out - ref)^2) / mean(ref^2)) < 5e-3."""
    assert out.shape == ref.shape == low.shape, f"{name}: shapes {out.shape}, {ref.shape}, {low.shape}"
    o, r, lo = out.double(), ref.double(), low.double()
    assert torch.equal(o.isnan(), r.isnan()), f"{name}: NaN pattern differs from the reference"
    assert torch.equal(o.isposinf(), r.isposinf()) and torch.equal(o.isneginf(), r.isneginf()), \
        f"{name}: inf pattern differs from the reference"
    fin = r.isfinite()
    if not bool(fin.any()):
        return
    err = (o - r)[fin].abs().max().item()
    low_err = (lo - r)[fin & lo.isfinite()].abs().max().item() if bool((fin & lo.isfinite()).any()) else 0.0
    bound = factor * low_err + floor
    assert err <= bound, (
        f"{name}: max|out - ref| = {err:.3g} > {factor} * {low_err:.3g} + {floor} = {bound:.3g}"
    )
    ref_rms = r[fin].square().mean().sqrt().item()
    rms = (o - r)[fin].square().mean().sqrt().item()
    if ref_rms > 0:
        assert rms / ref_rms < 5e-3, f"{name}: relative RMS error {rms / ref_rms:.3g} >= 5e-3"
    else:
        assert rms <= floor, f"{name}: RMS error {rms:.3g} on an all-zero reference"


# ---- input makers ------------------------------------------------------------------------------------------


def nan_padded(t: Tensor, pad_last: int = 7, pad_rows: int = 3, requires_grad: bool = False) -> Tensor:
    """A view with ``t``'s values into a larger NaN-filled buffer (``pad_last`` extra columns in the last dim
    and ``pad_rows`` extra rows in dim -2): reading past the logical end gives NaN. With ``requires_grad`` the
    buffer is the leaf and the view is returned (take grads with torch.autograd.grad on the view)."""
    t = t.detach()
    if t.dim() == 0:
        return t.clone()
    if t.dim() == 1:
        buf = torch.full((t.shape[0] + pad_last,), math.nan, dtype=t.dtype, device=t.device)
        buf[: t.shape[0]] = t
        if requires_grad:
            buf.requires_grad_()
        return buf[: t.shape[0]]
    shape = tuple(t.shape[:-2]) + (t.shape[-2] + pad_rows, t.shape[-1] + pad_last)
    buf = torch.full(shape, math.nan, dtype=t.dtype, device=t.device)
    buf[..., : t.shape[-2], : t.shape[-1]] = t
    if requires_grad:
        buf.requires_grad_()
    return buf[..., : t.shape[-2], : t.shape[-1]]


LAYOUTS = ("contiguous", "blhd", "packed", "nan_padded", "strided", "expanded")


def make_qkv(
    b: int,
    hq: int,
    lq: int,
    lk: int,
    d: int,
    *,
    hkv: Optional[int] = None,
    dv: Optional[int] = None,
    dtype: torch.dtype = torch.float32,
    device="cpu",
    layout: str = "contiguous",
    requires_grad: bool = False,
    seed: int = 0,
    std: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """q (b, hq, lq, d), k (b, hkv, lk, d), v (b, hkv, lk, dv) in (B, H, L, D) logical shape, in one of
    ``LAYOUTS``:

    * ``contiguous``: contiguous (B, H, L, D) tensors;
    * ``blhd``: transposed views of contiguous (B, L, H, D) tensors (what flash_attn_func / MHA pass);
    * ``packed``: slices of one packed buffer (B, L, Hq + 2 Hkv, D) when lq == lk and dv == d (q separate and
      a packed (B, Lk, 2 Hkv, D) kv buffer otherwise);
    * ``nan_padded``: views into NaN-filled larger buffers (``nan_padded``);
    * ``strided``: last dim strided (every other element of a 2x wider buffer);
    * ``expanded``: k and v broadcast over the batch with stride 0 (their values repeat across the batch).

    Values are drawn in float32 from ``seed`` (scaled by ``std``) and rounded to ``dtype``; all layouts but
    ``expanded`` give equal values. With ``requires_grad`` the underlying buffers are leaves and the returned
    views are not: take grads with ``torch.autograd.grad(out, (q, k, v))``.
    """
    hkv = hq if hkv is None else hkv
    dv = d if dv is None else dv
    g = torch.Generator().manual_seed(seed)
    base = [torch.randn(s, generator=g) * std for s in ((b, hq, lq, d), (b, hkv, lk, d), (b, hkv, lk, dv))]
    base = [t.to(dtype=dtype, device=device) for t in base]

    def leaf(t):
        return t.requires_grad_() if requires_grad else t

    if layout == "contiguous":
        return tuple(leaf(t.contiguous()) for t in base)
    if layout == "blhd":
        return tuple(leaf(t.transpose(1, 2).contiguous()).transpose(1, 2) for t in base)
    if layout == "nan_padded":
        return tuple(nan_padded(t, requires_grad=requires_grad) for t in base)
    if layout == "strided":
        out = []
        for t in base:
            buf = torch.full(t.shape[:-1] + (2 * t.shape[-1],), math.nan, dtype=dtype, device=device)
            buf[..., ::2] = t
            out.append(leaf(buf)[..., ::2])
        return tuple(out)
    if layout == "expanded":
        q = leaf(base[0])
        k1, v1 = (leaf(t[:1].contiguous()) for t in base[1:])
        return q, k1.expand(b, -1, -1, -1), v1.expand(b, -1, -1, -1)
    if layout == "packed":
        q, k, v = (t.transpose(1, 2) for t in base)  # (B, L, H, D)
        if lq == lk and dv == d:
            buf = leaf(torch.cat([q, k, v], 2).contiguous())
            return (
                buf[:, :, :hq].transpose(1, 2),
                buf[:, :, hq : hq + hkv].transpose(1, 2),
                buf[:, :, hq + hkv :].transpose(1, 2),
            )
        qb = leaf(q.contiguous())
        if dv == d:
            kv = leaf(torch.cat([k, v], 2).contiguous())
            return qb.transpose(1, 2), kv[:, :, :hkv].transpose(1, 2), kv[:, :, hkv:].transpose(1, 2)
        return qb.transpose(1, 2), leaf(k.contiguous()).transpose(1, 2), leaf(v.contiguous()).transpose(1, 2)
    raise ValueError(f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")


def key_padding_mask(lengths, lk: int, device="cpu") -> Tensor:
    """Bool (B, 1, 1, Lk) mask, True for the first lengths[b] keys of batch b (a key padding mask)."""
    lengths = torch.as_tensor(lengths, device=device)
    return (torch.arange(lk, device=device)[None, :] < lengths[:, None])[:, None, None, :]


def check_exact_rows(backend: str, case: str, causal: bool = False, device="cpu") -> None:
    """Attention rows whose lse cannot hold log2(l) in fp32 (csrc/include/pyattn/attn_exact_rows.h), forward and
    backward of ``backend`` (the op, fp32) against the float64 oracle (assert_close_fp32). ``case``:
    "finfo.min" / "-1e9" / "-1e5": two rows with that additive mask on every key they see (their queries 0, so the
    logits are exactly equal in any precision: softmax uniform), beside a row with it on all keys but one (an
    ordinary row); causal: bottom-right (Lq 70 < Lk 130). "+tied" / "-tied": no mask, fp32 logits of +-1e8 .. 4e8
    (log2 units; powers of two, exact in any summation order) tied over all keys (equal keys): P = 1 / Lk, where
    lse2 = m + log2(Lk) rounds to a multiple of 8. exp2(t - lse2) alone is off on all of those rows (1 instead of
    1 / l on the masked ones)."""
    from .ops.attention import _attention_bwd, _attention_fwd

    if case.endswith("tied"):
        sign = 1.0 if case[0] == "+" else -1.0
        _, _, v = make_qkv(1, 2, 20, 24, 16, device=device, seed=4)
        k = torch.ones(1, 2, 24, 16, device=device)  # small k: dq = scale sum_j dS_ij k_j cancels to 0 (rounding)
        c = torch.arange(20, device=device) % 4 + 1.0  # q . k = c 2^28: t = c 2^28 / 4 * log2(e) ~ 1e8 c
        q = (sign * 2.0**24 * c)[:, None].expand(1, 2, 20, 16).contiguous()
        mask = None
    else:
        big = {"finfo.min": torch.finfo(torch.float32).min, "-1e9": -1e9, "-1e5": -1e5}[case]
        q, k, v = make_qkv(2, 2, 70, 130, 16, seed=21)
        mask = torch.randn(2, 2, 70, 130, generator=torch.Generator().manual_seed(21))
        put_huge_mask_rows(q, mask, big)
        mask[0, 1, 40, :64] = big  # all keys of row 40 but one: P = 1 on that key (an ordinary row)
        mask[0, 1, 40, 10] = 0.0
        mask[0, 1, 40, 64:] = -math.inf
        q, k, v, mask = (t.to(device) for t in (q, k, v, mask))
    scale = q.shape[-1] ** -0.5
    out, lse, state = _attention_fwd(q, k, v, mask, 0.0, causal, True, scale, None, True, backend)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(device)
    grads = _attention_bwd(dout, q, k, v, out, lse, mask, 0.0, causal, True, scale, state, backend)
    ref, _, ref_grads = attention_ref(q, k, v, mask, causal=causal, bottom_right=True, scale=scale, dout=dout)
    for name, t, r in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads)):
        assert_close_fp32(t, r, "fwd" if name == "out" else "bwd", msg=lambda m, name=name: f"{name}: " + m)


def put_huge_mask_rows(q: Tensor, mask: Tensor, big: float) -> None:
    """In place: give two query rows an additive ``big`` (-1e9, finfo(float32).min, ...) on every key they see, row
    1 of (batch 0, head 0) on all keys, row Lq - 4 of (last batch, last head) on the first 40% (-inf on the rest),
    and zero those rows of q (leaf or not), so that their logits are exactly equal in any precision: softmax is
    uniform there, and the float64 oracle rounds them as fp32 does. ``mask`` is additive, (B|1, Hq|1, Lq, Lk);
    where it broadcasts, every batch / head gets those rows. Such rows' lse cannot hold log2(l) in fp32: the
    backward must recompute their statistics (csrc/include/pyattn/attn_exact_rows.h)."""
    lq, lk = q.shape[2], mask.shape[3]
    cut = max(1, lk * 2 // 5)
    mask[0, 0, 1] = big
    mask[-1, -1, lq - 4, :cut] = big
    mask[-1, -1, lq - 4, cut:] = -math.inf
    every = slice(None)
    with torch.no_grad():
        q[0 if mask.shape[0] > 1 else every, 0 if mask.shape[1] > 1 else every, 1] = 0
        q[-1 if mask.shape[0] > 1 else every, -1 if mask.shape[1] > 1 else every, lq - 4] = 0


# ---- reference runners -------------------------------------------------------------------------------------


def attention_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Optional[Tensor] = None,
    *,
    causal: bool = False,
    bottom_right: bool = False,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    seed: int = 0,
    offset: int = 0,
    dout: Optional[Tensor] = None,
    dtype: torch.dtype = torch.float64,
):
    """The oracle: the ``torch`` backend (forced) on inputs cast to ``dtype`` (float64 by default).

    q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv) in canonical layout; mask 4-D broadcastable to (B,
    Hq, Lq, Lk). Dropout uses the torch backend's keep-mask for (seed, offset). Returns (out, lse), and with
    ``dout`` (out, lse, (dq, dk, dv)), all in ``dtype`` (lse in float32 unless dtype is float64)."""
    from .ops.attention import _attention_bwd, _attention_fwd

    qf, kf, vf = (t.detach().to(dtype) for t in (q, k, v))
    m = None
    if mask is not None:
        m = mask.detach()
        if m.dtype != torch.bool:
            m = m.to(dtype)
        m = m[(None,) * (4 - m.dim())]
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] > 0 else 1.0
    rng = torch.tensor([seed, offset], dtype=torch.int64)
    with torch.no_grad():
        out, lse, state = _attention_fwd(
            qf,
            kf,
            vf,
            m,
            float(dropout_p),
            causal,
            bottom_right,
            float(scale),
            rng,
            dout is not None,
            "torch",
        )
        if dout is None:
            return out, lse
        grads = _attention_bwd(
            dout.detach().to(dtype),
            qf,
            kf,
            vf,
            out,
            lse,
            m,
            float(dropout_p),
            causal,
            bottom_right,
            float(scale),
            state,
            "torch",
        )
    return out, lse, grads


def attention_low(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Optional[Tensor] = None,
    *,
    causal: bool = False,
    bottom_right: bool = False,
    scale: Optional[float] = None,
    dout: Optional[Tensor] = None,
):
    """The same math in the input dtype with the operation order perturbed (scale folded into k, logits and P
    @ V in the input dtype, softmax in float32 rounded to the input dtype): the ``low`` of TESTING.md's rule.
    No dropout. Returns out, and with ``dout`` (out, (dq, dk, dv)) through autograd, in the input dtype."""
    from .backends.torch import causal_keep

    dt = q.dtype
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] > 0 else 1.0
    qq, kk, vv = (t.detach().clone().requires_grad_(dout is not None) for t in (q, k, v))
    with torch.enable_grad():
        hq, hkv = q.shape[1], k.shape[1]
        kr = kk.repeat_interleave(hq // hkv, 1) if hq != hkv else kk
        vr = vv.repeat_interleave(hq // hkv, 1) if hq != hkv else vv
        s = torch.matmul(qq, (kr * scale).transpose(-1, -2))
        if mask is not None:
            s = s.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else s + mask.to(dt)
        if causal:
            s = s.masked_fill(~causal_keep(q.shape[2], k.shape[2], bottom_right, q.device), -math.inf)
        sf = s.float()
        dead = (sf == -math.inf).all(-1, keepdim=True)
        p = torch.softmax(sf.masked_fill(dead, 0), -1).masked_fill(dead, 0).to(dt)
        out = torch.matmul(p, vr)
        if dout is None:
            return out.detach()
        grads = torch.autograd.grad(out, (qq, kk, vv), dout.to(dt))
    return out.detach(), grads


def attention_dropout_ref(q: Tensor, k: Tensor, v: Tensor, keep: Tensor, p: float, scale: float, causal: bool,
                          bottom_right: bool, dout: Tensor, dtype: torch.dtype):
    """out = (softmax(q k^T scale) * keep / (1 - p)) v and its grads (dq, dk, dv) through autograd, in ``dtype`` on
    q's device, for a given keep-mask (B, Hq, Lq, Lk) bool; GQA by repeating k / v; rows that see no key give 0."""
    from pyattn.backends.torch import causal_keep

    qq, kk, vv = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    with torch.enable_grad():
        g = q.shape[1] // k.shape[1]
        kr, vr = kk.repeat_interleave(g, 1), vv.repeat_interleave(g, 1)
        s = torch.matmul(qq, kr.transpose(-1, -2)) * scale
        if causal:
            s = s.masked_fill(~causal_keep(q.shape[2], k.shape[2], bottom_right, q.device), -math.inf)
        dead = (s == -math.inf).all(-1, keepdim=True)
        prob = torch.softmax(s.float().masked_fill(dead, 0.0), -1).masked_fill(dead, 0.0).to(dtype)
        out = torch.matmul(prob * keep.to(q.device, dtype) / (1 - p), vr)
        grads = torch.autograd.grad(out, (qq, kk, vv), dout.to(dtype))
    return out.detach(), grads


def norm_ref(s: Tensor, w: Tensor, b: Optional[Tensor], eps: float, rms: bool, dy: Tensor, ds: Tensor):
    """float64 LayerNorm (or RMSNorm) of s (M, N) and its grads: (y, (ds_total, dweight[, dbias])), where ds_total
    adds ``ds`` (the gradient of a returned residual sum s = x + r) to the norm's own input gradient."""
    import torch.nn.functional as F

    s64 = s.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    b64 = None if b is None else b.detach().double().requires_grad_()
    n = s.shape[-1]
    with torch.enable_grad():
        y64 = F.rms_norm(s64, (n,), w64, eps) if rms else F.layer_norm(s64, (n,), w64, b64, eps)
        grads = torch.autograd.grad(y64, [s64, w64] + ([b64] if b64 is not None else []), dy.double())
    return y64.detach(), (grads[0] + ds.double(), *grads[1:])


def nan_padded_rows(t: Tensor, pad: int, shift: int) -> Tensor:
    """A copy of the (M, N) tensor t whose rows have stride N + pad and whose first element sits ``shift`` elements
    past an allocation's start; NaN everywhere else in the allocation."""
    m, n = t.shape
    buf = torch.full((shift + m * (n + pad),), float("nan"), device=t.device, dtype=t.dtype)
    out = buf[shift:].view(m, n + pad)[:, :n]
    out.copy_(t)
    return out


# ---- GRU on PackedSequence ------------------------------------------------------------------------------------

# Unsorted, with ties and a length-1 sequence. Sorted: 7 7 5 5 3 2 1, so batch 7 6 5 4 4 2 2 over time: 5 runs of
# equal batch, (7, 1 step) (6, 1) (5, 1) (4, 2) (2, 2). Calls per layer direction for a merge_rows of 0: 5; 2: 3
# (7 6 5 padded, 4, 2); inf: 1.
PACKED_LENGTHS = (7, 3, 7, 1, 5, 2, 5)
PACKED_CALLS = {0: 5, 2: 3, math.inf: 1}


def check_packed_gru(backend: Optional[str], device="cpu", lengths=PACKED_LENGTHS, enforce_sorted: bool = False,
                     with_h0: bool = True, isz: int = 6, hsz: int = 9, merge_rows: Optional[float] = None,
                     **cfg) -> int:
    """pyattn.nn.GRU(isz, hsz, **cfg) on a PackedSequence of ``lengths`` (fp32, on ``device``, ``backend`` forced,
    the packed plan's merge_rows if given, else the device's default) against torch.nn.GRU in float64 with the same
    weights: the packed output, h_n and the gradients of the sequences, h0 and every parameter, under TOL["gru"].
    Returns the number of gru_layer calls."""
    from torch.nn.utils.rnn import pack_sequence

    from .dispatch import use_backend
    from .nn import GRU
    from .nn import rnn as rnn_mod
    from .nn._packed import PackedPlan

    mod = GRU(isz, hsz, **cfg).to(device).eval()
    twin = torch.nn.GRU(isz, hsz, **cfg).double().to(device)  # train mode: cuDNN's RNN backward refuses eval
    twin.dropout = 0.0  # ... so its dropout off instead (mod's is off in eval)
    twin.load_state_dict({k: v.double() for k, v in mod.state_dict().items()}, strict=True)
    g = torch.Generator().manual_seed(len(lengths))
    seqs = [torch.randn(n, isz, generator=g).to(device).requires_grad_() for n in lengths]
    dirs = 2 if cfg.get("bidirectional") else 1
    h0 = torch.randn(cfg.get("num_layers", 1) * dirs, len(lengths), hsz, generator=g).to(device)
    h0 = h0.requires_grad_() if with_h0 else None
    seqs64 = [s.detach().double().requires_grad_() for s in seqs]
    h064 = h0.detach().double().requires_grad_() if with_h0 else None
    if enforce_sorted:
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        seqs, seqs64 = [seqs[i] for i in order], [seqs64[i] for i in order]
    calls = []
    inner = rnn_mod.gru_layer

    def counting(*args, **kwargs):
        calls.append(1)
        return inner(*args, **kwargs)

    rnn_mod.gru_layer = counting
    default_merge = PackedPlan.__dict__["merge_rows_for"]  # (the staticmethod itself, restored below)
    if merge_rows is not None:
        PackedPlan.merge_rows_for = staticmethod(lambda _device: merge_rows)
    try:
        with use_backend(backend):
            out, hn = mod(pack_sequence(seqs, enforce_sorted=enforce_sorted), h0)
            ref_out, ref_hn = twin(pack_sequence(seqs64, enforce_sorted=enforce_sorted), h064)
            assert torch.equal(out.batch_sizes, ref_out.batch_sizes)
            for name in ("sorted_indices", "unsorted_indices"):
                a, b = getattr(out, name), getattr(ref_out, name)
                assert (a is None and b is None) or torch.equal(a, b), name
            assert_tol(out.data, ref_out.data, "gru", torch.float32, "fwd", msg=lambda m: f"output: {m}")
            assert_tol(hn, ref_hn, "gru", torch.float32, "fwd", msg=lambda m: f"h_n: {m}")
            dout = torch.randn(out.data.shape, generator=g).to(device)
            dhn = torch.randn(hn.shape, generator=g).to(device)
            wrt = seqs + ([h0] if with_h0 else []) + list(mod.parameters())
            grads = torch.autograd.grad((out.data * dout).sum() + (hn * dhn).sum(), wrt)
    finally:
        rnn_mod.gru_layer = inner
        PackedPlan.merge_rows_for = default_merge
    r_wrt = seqs64 + ([h064] if with_h0 else []) + list(twin.parameters())
    r_grads = torch.autograd.grad((ref_out.data * dout.double()).sum() + (ref_hn * dhn.double()).sum(), r_wrt)
    for i, (a, b) in enumerate(zip(grads, r_grads)):
        assert_tol(a, b, "gru", torch.float32, "bwd", msg=lambda m, i=i: f"grad {i}: {m}")
    return len(calls)
