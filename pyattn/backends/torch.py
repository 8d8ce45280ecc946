"""The pure-PyTorch reference backend: runs anywhere, is the fallback for every op, and is the test oracle.

It computes in float32 (float64 for float64 inputs) and follows each kernel's contract exactly, including
rounding points (e.g. the fused residual is rounded to the input dtype before normalising, like ``x + r``).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..dispatch import Backend, register
from ..dispatch.backend import OpCaps

_FLOATS = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
_ANY = frozenset({"cpu", "cuda", "meta", "mps", "xpu"})


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- attention helpers (module level: tests and the differentiable mask path use them too) -----------------

def causal_keep(q_len: int, k_len: int, bottom_right: bool, device) -> Tensor:
    """(Lq, Lk) bool, True = query i may see key j: j <= i (top-left, torch) or j <= i + Lk - Lq
    (bottom-right, flash-attn). With bottom-right and Lq > Lk the first Lq - Lk query rows see no key at all.
    """
    shift = (k_len - q_len) if bottom_right else 0
    i = torch.arange(q_len, device=device)[:, None]
    j = torch.arange(k_len, device=device)[None, :]
    return j <= i + shift


def _mix_seed(seed: int, offset: int) -> int:
    return (int(seed) * 0x9E3779B97F4A7C15 + int(offset)) & 0xFFFF_FFFF_FFFF_FFFF


def dropout_keep_mask(seed: int, offset: int, shape, p: float, device) -> Tensor:
    """The torch backend's dropout keep-mask (True = kept), a pure function of (seed, offset): a
    torch.Generator on ``device`` seeded from them draws a uniform tensor of ``shape`` (B, Hq, Lq, Lk); an
    element is kept when u >= p. Forward and backward call this with the same (seed, offset), so they see the
    same mask."""
    dev = torch.device(device)
    g = torch.Generator(device=dev)
    g.manual_seed(_mix_seed(seed, offset))
    return torch.rand(tuple(shape), generator=g, device=dev, dtype=torch.float32) >= p


def attention_logits(
    q: Tensor,
    k: Tensor,
    mask: Optional[Tensor],
    causal: bool,
    bottom_right: bool,
    scale: float,
    acc: torch.dtype,
) -> Tensor:
    """scale * q k^T with masks applied, in ``acc``: (B, Hq, Lq, Lk). GQA by repeat_interleave (fine for the
    oracle). Bool mask: False -> -inf (so NaN/inf logits at masked positions are dropped, as kernels do);
    float mask: added."""
    hq, hkv = q.shape[1], k.shape[1]
    kf = k.to(acc)
    if hq != hkv:
        kf = kf.repeat_interleave(hq // hkv, dim=1)
    s = torch.matmul(q.to(acc), kf.transpose(-1, -2)) * scale
    if mask is not None:
        if mask.dtype == torch.bool:
            s = s.masked_fill(~mask, -math.inf)
        else:
            s = s + mask.to(acc)
    if causal:
        s = s.masked_fill(~causal_keep(q.shape[2], k.shape[2], bottom_right, q.device), -math.inf)
    return s


def attention_lse(s: Tensor) -> Tensor:
    """Row log-sum-exp of logits (B, H, Lq, Lk) -> (B, H, Lq). Rows whose logits are all -inf (fully masked)
    get +inf, flash-attn's convention: exp(s - lse) is then 0 for the whole row, so backward recomputes P = 0.
    Differentiable (the max is detached and the empty rows' log(0) is kept out of the graph)."""
    m = s.detach().amax(-1, keepdim=True)
    dead = m == -math.inf
    m = torch.where(dead, torch.zeros_like(m), m)
    total = torch.exp(s - m).sum(-1, keepdim=True)
    lse = m + torch.log(torch.where(dead, torch.ones_like(total), total))
    return torch.where(dead, torch.full_like(lse, math.inf), lse).squeeze(-1)


def attention_probs(s: Tensor, lse: Tensor) -> Tensor:
    """softmax(s) along the keys, 0 on rows with lse = +inf (they saw no key). Computed by softmax, not as
    exp(s - lse): when every logit of a row is hugely negative (an additive mask of finfo.min on all keys),
    fp32/fp64 cannot hold log(sum) next to the huge max, and exp(s - lse) would not give the uniform
    distribution back."""
    dead = (lse == math.inf)[..., None]
    return torch.softmax(s.masked_fill(dead, 0.0), -1).masked_fill(dead, 0.0)


def attention_math(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Optional[Tensor],
    dropout_p: float,
    causal: bool,
    bottom_right: bool,
    scale: float,
    seed: int = 0,
    offset: int = 0,
) -> tuple[Tensor, Tensor]:
    """The reference forward as plain differentiable torch ops, in fp32 (fp64 for fp64 inputs).

    q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv), Lk > 0. Returns (out (B, Hq, Lq, Dv) in ``acc``,
    lse (B, Hq, Lq) in ``acc``). Used under no_grad by ``TorchBackend.attention_fwd`` and with autograd
    when an additive mask requires grad."""
    acc = _acc(q.dtype)
    s = attention_logits(q, k, mask, causal, bottom_right, scale, acc)
    lse = attention_lse(s)
    p = attention_probs(s, lse)
    if dropout_p > 0:
        keep = dropout_keep_mask(seed, offset, p.shape, dropout_p, q.device)
        p = p.masked_fill(~keep, 0) * (1.0 / (1.0 - dropout_p))
    vf = v.to(acc)
    if q.shape[1] != v.shape[1]:
        vf = vf.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    return torch.matmul(p, vf), lse


# ---- GRU helpers -------------------------------------------------------------------------------------------


def _linear(x: Tensor, w: Tensor, b: Optional[Tensor], acc: torch.dtype) -> Tensor:
    y = torch.matmul(x.to(acc), w.to(acc).t())
    return y if b is None else y + b.to(acc)


def _gru_gates(gi: Tensor, h: Tensor, w_hh: Tensor, b_hh: Optional[Tensor], acc: torch.dtype):
    """One step from the input projection gi = W_ih x + b_ih (.., 3H) and h (.., H) in ``acc``.
    Returns (h_new, r, z, n, hn) with hn = W_hn h + b_hn (what backward needs)."""
    hsz = h.shape[-1]
    gh = _linear(h, w_hh, b_hh, acc)
    r = torch.sigmoid(gi[..., :hsz] + gh[..., :hsz])
    z = torch.sigmoid(gi[..., hsz : 2 * hsz] + gh[..., hsz : 2 * hsz])
    hn = gh[..., 2 * hsz :]
    n = torch.tanh(gi[..., 2 * hsz :] + r * hn)
    return n + z * (h - n), r, z, n, hn  # = (1 - z) * n + z * h


def _gru_step_bwd(dh: Tensor, h_prev: Tensor, ws: Tensor):
    """Backward of one step given dL/dh_new and the saved [r | z | n | hn]: returns (dgi, dgh,
    dh_prev_direct), the gradients of the input projection, of the hidden projection (both (.., 3H)) and
    dh_new * z."""
    hsz = h_prev.shape[-1]
    r, z, n, hn = (ws[..., i * hsz : (i + 1) * hsz] for i in range(4))
    dn = dh * (1 - z)
    dz = dh * (h_prev - n)
    dn_pre = dn * (1 - n * n)
    dr_pre = dn_pre * hn * r * (1 - r)
    dz_pre = dz * z * (1 - z)
    dgi = torch.cat([dr_pre, dz_pre, dn_pre], -1)
    dgh = torch.cat([dr_pre, dz_pre, dn_pre * r], -1)
    return dgi, dgh, dh * z




class TorchBackend(Backend):
    name = "torch"
    description = "pure PyTorch reference (fallback and test oracle)"
    caps = {op: OpCaps(devices=_ANY, dtypes=_FLOATS)
            for op in ("layer_norm", "rms_norm", "attention", "gru_cell", "gru")}

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


    # ---- Attention -----------------------------------------------------------------------------------------
    # q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv), any strides; mask None, bool (True = keep) or
    # additive, shaped (B|1, Hq|1, Lq|1, Lk|1). Lk > 0 and B*Hq*Lq > 0 (the op handles empty inputs before
    # dispatch). Returns out (B, Hq, Lq, Dv) in q.dtype and lse (B, Hq, Lq) in fp32 (fp64 for fp64), +inf on
    # fully masked rows.
    def attention_fwd(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        mask: Optional[Tensor],
        dropout_p: float,
        causal: bool,
        bottom_right: bool,
        scale: float,
        seed: int,
        offset: int,
    ):
        with torch.no_grad():
            out, lse = attention_math(q, k, v, mask, dropout_p, causal, bottom_right, scale, seed, offset)
        return out.to(q.dtype), lse

    def attention_bwd(
        self,
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
        seed: int,
        offset: int,
    ):
        """Recomputes P = exp(S - lse) from q, k and the forward's lse (as kernels do) and returns dq, dk, dv,
        with dk/dv summed over each GQA group back to Hkv heads. ``out`` is unused here: the row term D_i =
        sum_j P_ij dP_ij is computed from P itself (exact; kernels may use rowsum(dout * out))."""
        acc = _acc(q.dtype)
        b, hq, lq, d = q.shape
        hkv, lk = k.shape[1], k.shape[2]
        group = hq // hkv
        with torch.no_grad():
            s = attention_logits(q, k, mask, causal, bottom_right, scale, acc)
            p = attention_probs(s, lse.to(acc))  # fully masked rows: lse = +inf -> p = 0
            del s
            do = dout.to(acc)
            vf = v.to(acc)
            if group > 1:
                vf = vf.repeat_interleave(group, dim=1)
            dp = torch.matmul(do, vf.transpose(-1, -2))  # dL/d(dropped P)
            if dropout_p > 0:
                keep = dropout_keep_mask(seed, offset, p.shape, dropout_p, q.device)
                inv = 1.0 / (1.0 - dropout_p)
                dp = dp.masked_fill(~keep, 0) * inv
                pd = p.masked_fill(~keep, 0) * inv
            else:
                pd = p
            dv = torch.matmul(pd.transpose(-1, -2), do)
            del pd
            ds = p * (dp - (p * dp).sum(-1, keepdim=True))
            del p, dp
            kf = k.to(acc)
            if group > 1:
                kf = kf.repeat_interleave(group, dim=1)
            dq = torch.matmul(ds, kf) * scale
            dk = torch.matmul(ds.transpose(-1, -2), q.to(acc)) * scale
            if group > 1:
                dk = dk.view(b, hkv, group, lk, d).sum(2)
                dv = dv.view(b, hkv, group, lk, dv.shape[-1]).sum(2)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)

    # ---- GRU -----------------------------------------------------------------------------------------------
    # Gate order r | z | n (torch's). The saved workspace ``ws`` is part of the op contract (any backend's
    # backward must read any backend's forward workspace): [r | z | n | hn] with hn = W_hn h + b_hn, last dim
    # 4H, in fp32 (fp64 for fp64 inputs); an empty tensor when grads are not needed.
    def gru_cell_fwd(
        self,
        x: Tensor,
        hx: Tensor,
        w_ih: Tensor,
        w_hh: Tensor,
        b_ih: Optional[Tensor],
        b_hh: Optional[Tensor],
        needs_grad: bool,
    ):
        """x (B, I), hx (B, H) -> h_new (B, H) in x.dtype, ws (B, 4H) or empty."""
        acc = _acc(x.dtype)
        with torch.no_grad():
            gi = _linear(x, w_ih, b_ih, acc)
            h_new, r, z, n, hn = _gru_gates(gi, hx.to(acc), w_hh, b_hh, acc)
            ws = torch.cat([r, z, n, hn], -1) if needs_grad else x.new_empty(0, dtype=acc)
        return h_new.to(x.dtype), ws

    def gru_cell_bwd(
        self,
        dh: Tensor,
        x: Tensor,
        hx: Tensor,
        w_ih: Tensor,
        w_hh: Tensor,
        ws: Tensor,
        has_b_ih: bool,
        has_b_hh: bool,
        need_weights: bool,
    ):
        """-> dx (B, I), dhx (B, H), dw_ih (3H, I), dw_hh (3H, H), db_ih (3H), db_hh (3H); the weight grads
        are empty when not ``need_weights``, a bias grad is empty when that bias is absent."""
        acc = _acc(x.dtype)
        with torch.no_grad():
            dgi, dgh, dh_direct = _gru_step_bwd(dh.to(acc), hx.to(acc), ws)
            dx = torch.matmul(dgi, w_ih.to(acc))
            dhx = torch.matmul(dgh, w_hh.to(acc)) + dh_direct
            dw_ih, dw_hh, db_ih, db_hh = self._gru_weight_grads(
                dgi, dgh, x.to(acc), hx.to(acc), w_ih, has_b_ih, has_b_hh, need_weights
            )
        return dx.to(x.dtype), dhx.to(hx.dtype), dw_ih, dw_hh, db_ih, db_hh

    @staticmethod
    def _gru_weight_grads(dgi, dgh, xs, hs, w, has_b_ih, has_b_hh, need_weights):
        """Weight grads from per-row gate grads (N, 3H) and the matching inputs (N, I) / previous states (N,
        H)."""
        wdt = w.dtype
        if not need_weights:  # four distinct empty tensors: custom op outputs must not alias each other
            return tuple(w.new_empty(0) for _ in range(4))
        dw_ih = torch.matmul(dgi.t(), xs).to(wdt)
        dw_hh = torch.matmul(dgh.t(), hs).to(wdt)
        db_ih = dgi.sum(0).to(wdt) if has_b_ih else w.new_empty(0)
        db_hh = dgh.sum(0).to(wdt) if has_b_hh else w.new_empty(0)
        return dw_ih, dw_hh, db_ih, db_hh

    def gru_layer_fwd(
        self,
        x: Tensor,
        h0: Tensor,
        w_ih: Tensor,
        w_hh: Tensor,
        b_ih: Optional[Tensor],
        b_hh: Optional[Tensor],
        reverse: bool,
        needs_grad: bool,
    ):
        """One direction of one layer. x (T, B, I) time-major, h0 (B, H) -> out (T, B, H), h_T (B, H) (both
        x.dtype), ws (T, B, 4H) or empty. ``reverse`` consumes x[T-1] first; out[t] is always the state after
        consuming x[t]. The input projection for all steps is one matmul; the state is rounded to x.dtype
        between steps (it is what ``out`` stores and backward reads back), so a layer equals T calls of
        gru_cell exactly."""
        acc = _acc(x.dtype)
        t_len, bsz, isz = x.shape
        hsz = w_hh.shape[1]
        with torch.no_grad():
            gi = _linear(x.reshape(t_len * bsz, isz), w_ih, b_ih, acc).view(t_len, bsz, 3 * hsz)
            out = x.new_empty(t_len, bsz, hsz)
            ws = x.new_empty((t_len, bsz, 4 * hsz) if needs_grad else (0,), dtype=acc)
            h = h0.to(acc)
            for t in range(t_len - 1, -1, -1) if reverse else range(t_len):
                h_new, r, z, n, hn = _gru_gates(gi[t], h, w_hh, b_hh, acc)
                out[t] = h_new
                h = out[t].to(acc)
                if needs_grad:
                    torch.cat([r, z, n, hn], -1, out=ws[t])
            h_last = h.to(x.dtype, copy=True) if t_len > 0 else h0.clone()  # never aliases out or h0
        return out, h_last, ws

    def gru_layer_bwd(
        self,
        dout: Tensor,
        dh_last: Tensor,
        x: Tensor,
        h0: Tensor,
        w_ih: Tensor,
        w_hh: Tensor,
        out: Tensor,
        ws: Tensor,
        has_b_ih: bool,
        has_b_hh: bool,
        reverse: bool,
        need_weights: bool,
    ):
        """Hand-written BPTT (mirrors what kernels do): walks the steps backwards collecting the gate grads,
        then dx, dW_ih, dW_hh and the bias grads are one matmul / sum each. -> dx, dh0, dw_ih, dw_hh, db_ih,
        db_hh."""
        acc = _acc(x.dtype)
        t_len, bsz, isz = x.shape
        hsz = w_hh.shape[1]
        with torch.no_grad():
            # h_prev[t]: the state step t started from (out of the step before it in processing order, or h0)
            if reverse:
                h_prev = torch.cat([out[1:], h0[None]], 0)[:t_len].to(acc)
            else:
                h_prev = torch.cat([h0[None], out[:-1]], 0)[:t_len].to(acc)
            dgi_all = x.new_empty(t_len, bsz, 3 * hsz, dtype=acc)
            dgh_all = x.new_empty(t_len, bsz, 3 * hsz, dtype=acc)
            whh = w_hh.to(acc)
            dh = dh_last.to(acc, copy=True)  # T == 0: the output must not alias the input
            for t in range(t_len) if reverse else range(t_len - 1, -1, -1):
                dh = dh + dout[t].to(acc)
                dgi, dgh, dh_direct = _gru_step_bwd(dh, h_prev[t], ws[t])
                dgi_all[t] = dgi
                dgh_all[t] = dgh
                dh = torch.matmul(dgh, whh) + dh_direct
            n = t_len * bsz
            dx = torch.matmul(dgi_all.view(n, 3 * hsz), w_ih.to(acc)).view(t_len, bsz, isz)
            weights = self._gru_weight_grads(
                dgi_all.view(n, 3 * hsz),
                dgh_all.view(n, 3 * hsz),
                x.reshape(n, isz).to(acc),
                h_prev.reshape(n, hsz),
                w_ih,
                has_b_ih,
                has_b_hh,
                need_weights,
            )
        return (dx.to(x.dtype), dh.to(h0.dtype), *weights)


register(TorchBackend())
