"""Triton FlashAttention-2: scaled dot-product attention forward and backward (pyattn's "triton" backend).

Layout of this file: jit helpers, the kernels (forward; split-KV forward and its combining kernel, for decoding;
backward preprocess, dK/dV, dQ), a dropout keep-mask debug kernel, the launchers ``attn_fwd`` / ``attn_bwd`` (same
arguments and results as the torch backend's ``attention_fwd`` / ``attention_bwd``), autotune tables, and
``compile_configs()`` for scripts/compile_triton.py.

Math (per (batch, q head) and query row i; kv head = q head // group, never materialised per q head):
    s_ij = scale * q_i . k_j  (+ additive mask; -inf where a bool mask is False, causal hides j, or j >= Lk)
    The kernels work in base 2: t_ij = s_ij * log2(e) (log2(e) folded into the scale), p = exp2(t - m).
    Forward (online softmax, fp32): m_i = running max, l_i = running sum of exp2(t - m_i), acc = sum p v.
        out_i = acc / l_i (times 1 / (1 - p_drop) with dropout), lse_i = ln(2) * (m_i + log2(l_i)):
        natural-log, fp32, +inf with out_i = 0 for a row that sees no key (l_i = 0).
    Backward: delta_i = rowsum(dout_i * out_i); P = exp2(t - lse2) recomputed (0 on +inf rows), lse2 =
        lse * log2(e). Exact rows: where |lse2| > EXACT_ROW_LSE2 (2^14), lse cannot hold log2(l) next to m in
        fp32 (an additive mask of -1e9 or finfo.min on every key: P is uniform there, and exp2(t - lse2) would
        give 1, not 1 / l). The preprocess kernel recomputes such a row's m and l2 = log2(l) from the keys; then
        P = 2^-l2 exp2(t - m), and it puts the factor 2^-l2 into the row's dout and delta (a copy of dout): the
        other kernels run unchanged with lse2 = m. Only with an additive mask or fp32 inputs (EXACT_ROWS: 16-bit
        inputs without an additive mask would need logits beyond +-11000, where their own rounding is as large);
        the cpp and cuda backends recompute the same rows (csrc/include/pyattn/attn_exact_rows.h).
        dP = dout v^T (dropped entries 0, kept ones / (1 - p_drop)); dS = P * (dP - delta);
        dV = P_dropped^T dout, dK = scale * dS^T q, dQ = scale * dS k.
    Causal: query i sees key j iff j <= i + shift, shift = Lk - Lq for bottom-right (flash-attn), else 0
        (torch). Blocks that no row sees are skipped. Forward and dQ test causality and j < Lk only on the
        diagonal / tail blocks; dK/dV tests causality on each block it visits (a second, unchecked loop in its
        per-head loop made every useful configuration spill registers).
    Split-KV forward (attn_fwd's choice for a few query rows against >= SPLIT_KV_MIN_KEYS keys, no dropout): one
        program per (split of the keys, kv head, batch) holds the kv head's whole query group as its rows (each
        K/V block read once for the group; masks gathered per row), writes its rows' out normalised by its own
        sum, m and l; a second kernel weighs the splits by l 2^(m - max): the same out and lse.
    Dropout: uniforms from Philox (tl.rand4x) keyed by seed; keys j..j+3 (j % 4 == 0) of row i share the
        int64 counter offset + ((b * Hq + h) * Lq + i) * Lk + j, one uniform each; kept iff u >= p. Forward and
        backward regenerate the same mask in any tile shape (``dropout_keep_mask`` materialises it).
    dK/dV of a kv head sum over its group's q heads inside one program, in a fixed order: no atomics, the
    backward is deterministic.

Strides: any (the last dim of q, k, v, out, dout must have stride 1; launchers copy only tensors that lack it),
batch/head offsets in int64, row offsets through an int64 scalar start plus small in-block offsets.
Interpreter (TRITON_INTERPRET=1): bf16/fp16 dots and arithmetic are unreliable there, so UPCAST loads every
tile as fp32 (GPU: native fp16/bf16 tensor-core dots with fp32 accumulation; fp32 inputs: IEEE fp32 dots).

Standalone: imports only torch, triton and the standard library (no pyattn imports).
"""

import functools
import math
import os

import torch
import triton
import triton.language as tl

MAX_HEAD_DIM = 256  # largest head dim (of q/k and of v) the kernels take
LOG2E = 1.4426950408889634
_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(0.6931471805599453)
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MASK_NONE, _MASK_BOOL, _MASK_ADD = 0, 1, 2


# Backward rows whose |lse| in log2 units exceeds this get exact statistics (see the module docstring): fp32's
# spacing there is 2^-9, past it log2(l) starts to go missing from lse. Ordinary logits stay far below it.
EXACT_ROW_LSE2 = 16384.0
_EXACT_ROW_LSE2 = tl.constexpr(EXACT_ROW_LSE2)


def _pre_blocks(block_d: int, block_dv: int) -> tuple:
    """Backward preprocess: rows per program (up to 32, 2048 elements per tile of out, dout and q) and keys per tile
    of the rare exact-row pass (16: few registers, so that the common path keeps its occupancy), spill-free."""
    return max(16, min(32, 2048 // max(block_d, block_dv))), 16


# The one configuration used under the interpreter (multi-config autotuning needs a GPU). BLOCK_M != BLOCK_N
# on purpose: the causal block arithmetic is exercised with unequal blocks. Tests may patch it.
INTERPRET_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 16}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# _logits rounds fp32 logits with inline PTX: NVIDIA GPUs only (the interpreter has no inline asm, and numpy does
# not fuse; a ROCm build of torch would hand Triton AMD targets)
_ROUND_LOGITS = tl.constexpr(not _interpreting() and torch.version.hip is None)


# --------------------------------------------------------------------------------------------------
# jit helpers
# --------------------------------------------------------------------------------------------------


@triton.jit
def _load_rows(base, start, stride, n_rows, offs_r, offs_c, N_COLS: tl.constexpr, UPCAST: tl.constexpr):
    """Rows [start, start + len(offs_r)) x columns offs_c of a (rows, N_COLS) matrix with row stride `stride`
    and unit column stride; rows >= n_rows and columns >= N_COLS read as 0. `start` is widened to int64."""
    ptrs = base + tl.cast(start, tl.int64) * stride + offs_r[:, None] * stride + offs_c[None, :]
    ok = ((start + offs_r) < n_rows)[:, None] & (offs_c < N_COLS)[None, :]
    t = tl.load(ptrs, mask=ok, other=0.0)
    if UPCAST:
        t = t.to(tl.float32)
    return t


@triton.jit
def _dot(a, b):
    """a @ b in fp32; fp32 operands use exact IEEE products (no TF32), fp16/bf16 ones tensor cores."""
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _dot_acc(a, b, acc):
    """acc + a @ b, as _dot."""
    return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit
def _logits(a, b, qk_scale):
    """Base-2 logits (a @ b) * qk_scale. fp32 inputs on the GPU: the product rounded to fp32 (mul.rn), so that the
    compiler cannot fuse it into a later t - m (an FMA subtracts m, itself rounded, from the unrounded product: on
    logits of 1e8 that leaves up to half an ulp, 2^4, where tied logits must give exactly 0, and exp2 of it is off
    by 2^16). 16-bit inputs keep the FMA (their accuracy is the tolerance's, not fp32's)."""
    s = _dot(a, b)
    if _ROUND_LOGITS and a.dtype == tl.float32:  # (inline PTX: LLVM turns libdevice's mul_rn into a fusible fmul)
        return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=f,f,f", [s, qk_scale], dtype=tl.float32,
                                         is_pure=True, pack=1)
    return s * qk_scale


@triton.jit
def _apply_mask_values(t, mv, MASK_KIND: tl.constexpr):
    """Loaded mask values mv (broadcastable to t) applied to base-2 logits t: bool (MASK_KIND 1, True = keep) -inf
    where False; additive (2) + mv log2(e), finite values clamped so that * log2(e) cannot overflow to -inf
    (finfo.min masks stay finite, as in torch); -inf stays -inf."""
    if MASK_KIND == 1:
        t = tl.where(mv != 0, t, float("-inf"))
    else:
        add = mv.to(tl.float32)
        add = tl.where(add == float("-inf"), add, tl.maximum(add, -2.0e38))
        t = t + add * _LOG2E
    return t


@triton.jit
def _softmax_step(t, m_i, l_i):
    """One key block of the online softmax in base 2: -> p = exp2(t - m_new), alpha = exp2(m_i - m_new) (the rescale
    of what the rows held), l_i updated, m_new. A row with no visible key yet keeps m = -inf and gets p = 0 (no
    NaN)."""
    m_new = tl.maximum(m_i, tl.max(t, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(t - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    return p, alpha, l_i * alpha + tl.sum(p, 1), m_new


@triton.jit
def _mask_scores(t, Mask, stride_mm, m0, n0, lm, ln, Lq, Lk, causal_shift, CHECK: tl.constexpr,
                 CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, MASK_Q: tl.constexpr, MASK_K: tl.constexpr):
    """Apply the masks to a tile of base-2 logits `t` for query rows m0 + lm and keys n0 + ln, where lm / ln
    are the in-tile offsets shaped to broadcast against t (either orientation). Mask points at this (batch,
    head); it varies along queries when MASK_Q (row stride stride_mm) and along keys when MASK_K (stride 1):
    a key-padding mask is a vector load, a per-(batch, head) mask a scalar. CHECK: also hide keys j >= Lk and
    (CAUSAL) keys j > i + causal_shift."""
    qi = m0 + lm
    kj = n0 + ln
    if MASK_KIND != 0:
        if MASK_Q and MASK_K:
            mv = tl.load(Mask + tl.cast(m0, tl.int64) * stride_mm + n0 + lm * stride_mm + ln,
                         mask=(qi < Lq) & (kj < Lk), other=0)
        elif MASK_K:
            mv = tl.load(Mask + n0 + ln, mask=kj < Lk, other=0)
        elif MASK_Q:
            mv = tl.load(Mask + tl.cast(m0, tl.int64) * stride_mm + lm * stride_mm, mask=qi < Lq, other=0)
        else:
            mv = tl.load(Mask)
        t = _apply_mask_values(t, mv, MASK_KIND)
    if CHECK:
        ok = kj < Lk
        if CAUSAL:
            ok = ok & (kj <= qi + causal_shift)
        t = tl.where(ok, t, float("-inf"))
    return t


@triton.jit
def _dropout_keep(seed, rng_base, m0, n0, Lk, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(BLOCK_M, BLOCK_N) keep-mask (True = kept) for query rows m0.. and keys n0.. (n0 a multiple of 4) of one
    (batch, head), rng_base = offset + (b * Hq + h) * Lq * Lk (int64). One Philox call (4 uniforms) serves 4
    consecutive keys: the group of keys j..j+3 in row i (j % 4 == 0) uses counter rng_base + i * Lk + j, unique
    per group. The same element gets the same value in every kernel and tile shape."""
    ctr = rng_base + tl.cast(m0, tl.int64) * Lk + n0
    ctr = ctr + (tl.arange(0, BLOCK_M)[:, None] * Lk + tl.arange(0, BLOCK_N // 4)[None, :] * 4)
    u0, u1, u2, u3 = tl.rand4x(seed, ctr)
    u = tl.interleave(tl.interleave(u0, u2), tl.interleave(u1, u3))  # keys 4c + (0, 1, 2, 3) <- u0..u3
    return u >= dropout_p


@triton.jit
def _key_range(m0, Lk, causal_shift, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """Key blocks for query rows [m0, m0 + BLOCK_M): [0, mid) is fully visible and in bounds (no checks),
    [mid, hi) needs the causal / bounds checks; keys >= hi are seen by no row of the block."""
    if CAUSAL:
        hi = tl.minimum(tl.maximum(m0 + BLOCK_M + causal_shift, 0), Lk)
        mid = tl.minimum(tl.maximum(m0 + causal_shift + 1, 0), Lk) // BLOCK_N * BLOCK_N
    else:
        hi = Lk + m0 * 0
        mid = Lk // BLOCK_N * BLOCK_N + m0 * 0
    return mid, hi


# --------------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------------


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, K, V, Mask, stride_kn, stride_vn, stride_mm, m0, lo, hi,
               Lq, Lk, causal_shift, qk_scale, dropout_p, seed, rng_base, offs_m, offs_n, offs_d, offs_dv,
               D: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               CHECK: tl.constexpr, CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, MASK_Q: tl.constexpr,
               MASK_K: tl.constexpr, HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr):
    for n0 in range(lo, hi, BLOCK_N):
        k = _load_rows(K, n0, stride_kn, Lk, offs_n, offs_d, D, UPCAST)  # (BLOCK_N, BLOCK_D)
        t = _logits(q, tl.trans(k), qk_scale)  # (BLOCK_M, BLOCK_N), base-2 logits
        t = _mask_scores(t, Mask, stride_mm, m0, n0, offs_m[:, None], offs_n[None, :], Lq, Lk, causal_shift,
                         CHECK, CAUSAL, MASK_KIND, MASK_Q, MASK_K)
        p, alpha, l_i, m_i = _softmax_step(t, m_i, l_i)
        if HAS_DROPOUT:
            p = tl.where(_dropout_keep(seed, rng_base, m0, n0, Lk, dropout_p, BLOCK_M, BLOCK_N), p, 0.0)
        v = _load_rows(V, n0, stride_vn, Lk, offs_n, offs_dv, DV, UPCAST)  # (BLOCK_N, BLOCK_DV)
        acc = _dot_acc(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q,  # (B, Hq, Lq, D), strides (stride_qb, stride_qh, stride_qm, 1)
    K,  # (B, Hkv, Lk, D), strides (stride_kb, stride_kh, stride_kn, 1)
    V,  # (B, Hkv, Lk, DV), strides (stride_vb, stride_vh, stride_vn, 1)
    Mask,  # (B|1, Hq|1, Lq|1, Lk|1) bool or additive, strides (stride_mb, stride_mh, stride_mm, 1), 0 on
    #        broadcast dims (dummy when MASK_KIND == 0)
    Out,  # (B, Hq, Lq, DV), strides (stride_ob, stride_oh, stride_om, 1)
    Lse,  # (B, Hq, Lq) fp32, contiguous
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_mb, stride_mh, stride_mm,
    stride_ob, stride_oh, stride_om,
    H,  # q heads
    GROUP,  # q heads per kv head
    Lq, Lk,
    causal_shift,  # query i sees keys j <= i + causal_shift (when CAUSAL)
    qk_scale,  # softmax scale * log2(e)
    dropout_p, seed, rng_offset,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, MASK_Q: tl.constexpr, MASK_K: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr,
):
    # Grid: (cdiv(Lq, BLOCK_M), Hq, B); one program = BLOCK_M query rows of one (batch, head).
    m0 = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    kvh = (h // GROUP).to(tl.int64)
    h = h.to(tl.int64)
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + kvh * stride_kh
    V += b * stride_vb + kvh * stride_vh
    Mask += b * stride_mb + h * stride_mh
    Out += b * stride_ob + h * stride_oh
    row0 = (b * H + h) * Lq  # this (batch, head)'s first row in Lse
    rng_base = rng_offset + row0 * Lk

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _load_rows(Q, m0, stride_qm, Lq, offs_m, offs_d, D, UPCAST)  # (BLOCK_M, BLOCK_D)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    mid, hi = _key_range(m0, Lk, causal_shift, BLOCK_M, BLOCK_N, CAUSAL)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, Mask, stride_kn, stride_vn, stride_mm, m0, 0, mid, Lq, Lk,
                               causal_shift, qk_scale, dropout_p, seed, rng_base, offs_m, offs_n, offs_d, offs_dv,
                               D, DV, BLOCK_M, BLOCK_N, False, CAUSAL, MASK_KIND, MASK_Q, MASK_K, HAS_DROPOUT,
                               UPCAST)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, Mask, stride_kn, stride_vn, stride_mm, m0, mid, hi, Lq, Lk,
                               causal_shift, qk_scale, dropout_p, seed, rng_base, offs_m, offs_n, offs_d, offs_dv,
                               D, DV, BLOCK_M, BLOCK_N, True, CAUSAL, MASK_KIND, MASK_Q, MASK_K, HAS_DROPOUT,
                               UPCAST)

    dead = l_i == 0.0  # the row saw no key: out 0, lse +inf
    out_scale = 1.0
    if HAS_DROPOUT:
        out_scale = 1.0 / (1.0 - dropout_p)
    acc = acc * (out_scale / tl.where(dead, 1.0, l_i))[:, None]
    lse = tl.where(dead, float("inf"), (m_i + tl.math.log2(tl.where(dead, 1.0, l_i))) * _LN2)
    rows = m0 + offs_m
    o_ptrs = Out + tl.cast(m0, tl.int64) * stride_om + offs_m[:, None] * stride_om + offs_dv[None, :]
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=(rows < Lq)[:, None] & (offs_dv < DV)[None, :])
    tl.store(Lse + row0 + rows, lse, mask=rows < Lq)


# --------------------------------------------------------------------------------------------------
# Forward for a few query rows against many keys: split-KV (flash-decoding), GQA groups packed
# --------------------------------------------------------------------------------------------------


@triton.jit
def _attn_decode_split_kernel(
    Q,  # (B, Hq, Lq, D), strides (stride_qb, stride_qh, stride_qm, 1)
    K,  # (B, Hkv, Lk, D), strides (stride_kb, stride_kh, stride_kn, 1)
    V,  # (B, Hkv, Lk, DV), strides (stride_vb, stride_vh, stride_vn, 1)
    Mask,  # (B|1, Hq|1, Lq|1, Lk|1) bool or additive, strides (stride_mb, stride_mh, stride_mm, stride_mk), 0 on
    #        broadcast dims (dummy when MASK_KIND == 0)
    Opart,  # (B, Hq, Lq, n_splits, DV) fp32, contiguous: each split's out, normalised by its own sum
    Mpart, Lpart,  # (B, Hq, Lq, n_splits) fp32, contiguous: each split's row max m (base 2; -inf: saw no key) and
    #               sum l (kept apart: m + log2(l) would lose log2(l) next to a finfo.min mask's |m| ~ 3e38)
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_mb, stride_mh, stride_mm, stride_mk,
    H,  # q heads
    GROUP,  # q heads per kv head
    Lq, Lk,
    causal_shift,  # query i sees keys j <= i + causal_shift (when CAUSAL)
    qk_scale,  # softmax scale * log2(e)
    chunk,  # keys per split (a multiple of BLOCK_N)
    n_splits,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
    UPCAST: tl.constexpr,
):
    # Grid: (n_splits, Hkv, B); one program = the GROUP * Lq query rows of one kv head's group (row r: q head
    # kvh * GROUP + r // Lq, query r % Lq; BLOCK_M >= GROUP * Lq), keys [split * chunk, (split + 1) * chunk):
    # each key block is read once for the whole group, and the splits give the grid its parallelism.
    split = tl.program_id(0)
    kvh = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows_ok = offs_m < GROUP * Lq
    hh = kvh * GROUP + offs_m // Lq  # (BLOCK_M,) q head of each row
    qi = offs_m % Lq  # (BLOCK_M,) query index of each row
    q = tl.load(Q + b * stride_qb + hh[:, None] * stride_qh + qi[:, None] * stride_qm + offs_d[None, :],
                mask=rows_ok[:, None] & (offs_d < D)[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
    if UPCAST:
        q = q.to(tl.float32)
    K += b * stride_kb + kvh * stride_kh
    V += b * stride_vb + kvh * stride_vh
    m_rows = Mask + b * stride_mb + hh[:, None] * stride_mh + qi[:, None] * stride_mm  # (BLOCK_M, 1)

    lo = split * chunk
    hi = tl.minimum(lo + chunk, Lk)
    if CAUSAL:  # keys past what the last query row sees are seen by none
        hi = tl.minimum(hi, tl.maximum(Lq + causal_shift, 0))
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        k = _load_rows(K, n0, stride_kn, Lk, offs_n, offs_d, D, UPCAST)  # (BLOCK_N, BLOCK_D)
        t = _logits(q, tl.trans(k), qk_scale)  # (BLOCK_M, BLOCK_N), base-2 logits
        keys = n0 + offs_n
        keep = (keys < hi)[None, :]
        if CAUSAL:
            keep = keep & (keys[None, :] <= qi[:, None] + causal_shift)
        if MASK_KIND != 0:  # a gather: the rows are (q head, query) pairs
            mv = tl.load(m_rows + keys[None, :].to(tl.int64) * stride_mk, mask=rows_ok[:, None] & keep, other=0)
            t = _apply_mask_values(t, mv, MASK_KIND)
        t = tl.where(keep, t, float("-inf"))
        p, alpha, l_i, m_i = _softmax_step(t, m_i, l_i)
        v = _load_rows(V, n0, stride_vn, Lk, offs_n, offs_dv, DV, UPCAST)  # (BLOCK_N, BLOCK_DV)
        acc = _dot_acc(p.to(v.dtype), v, acc * alpha[:, None])

    dead = l_i == 0.0
    acc = acc / tl.where(dead, 1.0, l_i)[:, None]
    prow = ((b * H + hh) * Lq + qi) * n_splits + split  # (BLOCK_M,) row of Mpart / Lpart
    tl.store(Opart + prow[:, None] * DV + offs_dv[None, :], acc, mask=rows_ok[:, None] & (offs_dv < DV)[None, :])
    tl.store(Mpart + prow, tl.where(dead, float("-inf"), m_i), mask=rows_ok)
    tl.store(Lpart + prow, l_i, mask=rows_ok)


@triton.jit
def _attn_decode_combine_kernel(
    Opart, Mpart, Lpart,  # as _attn_decode_split_kernel wrote them
    Out,  # (B, Hq, Lq, DV), strides (stride_ob, stride_oh, stride_om, 1)
    Lse,  # (B, Hq, Lq) fp32, contiguous
    stride_ob, stride_oh, stride_om,
    H, Lq, n_splits,
    DV: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # Grid: (Lq, Hq, B); one program = one query row: out = sum_s w_s out_s / sum_s w_s, w_s = l_s 2^(m_s - max),
    # lse = ln 2 (max + log2 sum_s w_s); a row no split saw anything of: out 0, lse +inf.
    i = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    row = (b * H + h) * Lq + i
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    s_ok = offs_s < n_splits
    m = tl.load(Mpart + row * n_splits + offs_s, mask=s_ok, other=float("-inf"))
    l_s = tl.load(Lpart + row * n_splits + offs_s, mask=s_ok, other=0.0)
    mx = tl.max(m, 0)
    dead = mx == float("-inf")
    w = l_s * tl.math.exp2(m - tl.where(dead, 0.0, mx))  # (BLOCK_S,), 0 for splits that saw nothing
    total = tl.sum(w, 0)
    o = tl.load(Opart + (row * n_splits + offs_s)[:, None] * DV + offs_dv[None, :],
                mask=s_ok[:, None] & (offs_dv < DV)[None, :], other=0.0)  # (BLOCK_S, BLOCK_DV)
    out = tl.sum(o * w[:, None], 0) / tl.where(dead, 1.0, total)
    lse = tl.where(dead, float("inf"), (mx + tl.math.log2(tl.where(dead, 1.0, total))) * _LN2)
    tl.store(Out + b * stride_ob + h * stride_oh + i * stride_om + offs_dv, out.to(Out.dtype.element_ty),
             mask=offs_dv < DV)
    tl.store(Lse + row, lse)


# --------------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------------


@triton.jit
def _exact_row_stats(lse2, q, K, Mask, stride_kn, stride_mm, m0, Lq, Lk, causal_shift, qk_scale, offs_m, offs_n,
                     offs_d, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                     MASK_KIND: tl.constexpr, MASK_Q: tl.constexpr, MASK_K: tl.constexpr, UPCAST: tl.constexpr):
    """-> (lse2, l2) of query rows [m0, m0 + BLOCK_M): lse2 and 0 as given, except on rows with finite
    |lse2| > EXACT_ROW_LSE2 (an additive mask of -1e9 or finfo.min on every key): their max m and
    l2 = log2(sum 2^(t - m)), recomputed from the keys (the forward's online softmax without V)."""
    exact = (tl.abs(lse2) > _EXACT_ROW_LSE2) & (lse2 != float("inf"))
    l2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    if tl.max(exact.to(tl.int32), 0) > 0:  # rare: a whole pass over the keys
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        hi = _key_range(m0, Lk, causal_shift, BLOCK_M, BLOCK_N, CAUSAL)[1]
        for n0 in range(0, hi, BLOCK_N):
            k = _load_rows(K, n0, stride_kn, Lk, offs_n, offs_d, D, UPCAST)  # (BLOCK_N, BLOCK_D)
            t = _logits(q, tl.trans(k), qk_scale)
            t = _mask_scores(t, Mask, stride_mm, m0, n0, offs_m[:, None], offs_n[None, :], Lq, Lk, causal_shift,
                             True, CAUSAL, MASK_KIND, MASK_Q, MASK_K)
            l_i, m_i = _softmax_step(t, m_i, l_i)[2:]
        lse2 = tl.where(exact, m_i, lse2)
        l2 = tl.where(exact, tl.math.log2(tl.where(exact, l_i, 1.0)), 0.0)
    return lse2, l2


@triton.jit
def _attn_bwd_preprocess_kernel(
    Q,  # (B, Hq, Lq, D), strides (stride_qb, stride_qh, stride_qm, 1); read only when EXACT_ROWS
    K,  # (B, Hkv, Lk, D), strides (stride_kb, stride_kh, stride_kn, 1); read only when EXACT_ROWS
    Mask,  # as in the dQ kernel (dummy when MASK_KIND == 0)
    Out,  # (B, Hq, Lq, DV), strides (stride_ob, stride_oh, stride_om, 1)
    DO,  # (B, Hq, Lq, DV), strides (stride_dob, stride_doh, stride_dom, 1)
    Lse,  # (B, Hq, Lq) fp32, contiguous: the forward's (natural log)
    Lse2,  # (B, Hq, Lq) fp32, contiguous, out: lse * log2(e), or the row's max m on exact rows
    Delta,  # (B, Hq, Lq) fp32, contiguous, out: rowsum(dout * out), times 2^-l2 on exact rows
    DOS,  # (B, Hq, Lq, DV) contiguous, out when EXACT_ROWS: dout, times 2^-l2 on exact rows
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_mb, stride_mh, stride_mm,
    stride_ob, stride_oh, stride_om,
    stride_dob, stride_doh, stride_dom,
    H, GROUP, Lq, Lk, causal_shift, qk_scale,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, MASK_Q: tl.constexpr, MASK_K: tl.constexpr,
    EXACT_ROWS: tl.constexpr, UPCAST: tl.constexpr,
):
    # Grid: (cdiv(Lq, BLOCK_M), Hq, B). On an exact row P = 2^-l2 2^(t - m): the factor 2^-l2 goes into the row's
    # dout and delta (DOS, Delta), which the dK/dV and dQ kernels read with lse2 = m: dV = P^T dout and
    # dS = P (dout v^T - delta) come out the same, and their loops need no second row statistic.
    m0 = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    kvh = (h // GROUP).to(tl.int64)
    h = h.to(tl.int64)
    row0 = (b * H + h) * Lq
    offs_m = tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows = m0 + offs_m
    o = _load_rows(Out + b * stride_ob + h * stride_oh, m0, stride_om, Lq, offs_m, offs_dv, DV, True)
    do = _load_rows(DO + b * stride_dob + h * stride_doh, m0, stride_dom, Lq, offs_m, offs_dv, DV, True)
    delta = tl.sum(o * do, 1)
    lse2 = tl.load(Lse + row0 + rows, mask=rows < Lq, other=float("inf")) * _LOG2E
    if EXACT_ROWS:
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        q = _load_rows(Q + b * stride_qb + h * stride_qh, m0, stride_qm, Lq, offs_m, offs_d, D, UPCAST)
        lse2, l2 = _exact_row_stats(lse2, q, K + b * stride_kb + kvh * stride_kh, Mask + b * stride_mb + h * stride_mh,
                                    stride_kn, stride_mm, m0, Lq, Lk, causal_shift, qk_scale, offs_m, offs_n, offs_d,
                                    D, BLOCK_M, BLOCK_N, CAUSAL, MASK_KIND, MASK_Q, MASK_K, UPCAST)
        c = tl.math.exp2(-l2)  # 1 on ordinary rows
        delta = delta * c
        dos_ptrs = DOS + (row0 + m0) * DV + offs_m[:, None] * DV + offs_dv[None, :]
        tl.store(dos_ptrs, (do * c[:, None]).to(DOS.dtype.element_ty),
                 mask=(rows < Lq)[:, None] & (offs_dv < DV)[None, :])
    tl.store(Delta + row0 + rows, delta, mask=rows < Lq)
    tl.store(Lse2 + row0 + rows, lse2, mask=rows < Lq)


@triton.jit
def _dkdv_inner(dk, dv, k, v, Q, DO, Lse2, Delta, Mask, stride_qm, stride_dom, stride_mm, n0, lo, hi,
                Lq, Lk, causal_shift, qk_scale, dropout_p, seed, rng_base, offs_m, offs_n, offs_d, offs_dv,
                D: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                CHECK: tl.constexpr, CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, MASK_Q: tl.constexpr,
                MASK_K: tl.constexpr, HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr):
    # Transposed tiles (keys x queries): k / v are the MMA's left operands, no register transposes of P.
    for m0 in range(lo, hi, BLOCK_M):
        rows = m0 + offs_m
        q = _load_rows(Q, m0, stride_qm, Lq, offs_m, offs_d, D, UPCAST)  # (BLOCK_M, BLOCK_D)
        do = _load_rows(DO, m0, stride_dom, Lq, offs_m, offs_dv, DV, UPCAST)  # (BLOCK_M, BLOCK_DV)
        lse2 = tl.load(Lse2 + rows, mask=rows < Lq, other=float("inf"))  # rows >= Lq: P = 0
        delta = tl.load(Delta + rows, mask=rows < Lq, other=0.0)
        t = _logits(k, tl.trans(q), qk_scale)  # (BLOCK_N, BLOCK_M)
        t = _mask_scores(t, Mask, stride_mm, m0, n0, offs_m[None, :], offs_n[:, None], Lq, Lk, causal_shift,
                         CHECK, CAUSAL, MASK_KIND, MASK_Q, MASK_K)
        p = tl.math.exp2(t - lse2[None, :])  # P^T
        dp = _dot(v, tl.trans(do))  # dP^T (of dropped P)
        if HAS_DROPOUT:
            keep = tl.trans(_dropout_keep(seed, rng_base, m0, n0, Lk, dropout_p, BLOCK_M, BLOCK_N))
            inv = 1.0 / (1.0 - dropout_p)
            dv = _dot_acc(tl.where(keep, p * inv, 0.0).to(do.dtype), do, dv)
            dp = tl.where(keep, dp * inv, 0.0)
        else:
            dv = _dot_acc(p.to(do.dtype), do, dv)
        ds = p * (dp - delta[None, :])  # dS^T
        dk = _dot_acc(ds.to(q.dtype), q, dk)
    return dk, dv


@triton.jit
def _dkdv_head(dk, dv, k, v, Q, DO, Lse2, Delta, Mask, b, h, stride_qb, stride_qh, stride_qm, stride_dob,
               stride_doh, stride_dom, stride_mb, stride_mh, stride_mm, n0, lo, hi, H, Lq, Lk, causal_shift,
               qk_scale, dropout_p, seed, rng_offset, offs_m, offs_n, offs_d, offs_dv, D: tl.constexpr,
               DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHECK: tl.constexpr,
               CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, MASK_Q: tl.constexpr, MASK_K: tl.constexpr,
               HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr):
    """Add q head h's contribution over query rows [lo, hi) to this key block's dk, dv."""
    row0 = (b * H + h) * Lq
    return _dkdv_inner(dk, dv, k, v, Q + b * stride_qb + h * stride_qh, DO + b * stride_dob + h * stride_doh,
                       Lse2 + row0, Delta + row0, Mask + b * stride_mb + h * stride_mh, stride_qm,
                       stride_dom, stride_mm, n0, lo, hi, Lq, Lk, causal_shift, qk_scale, dropout_p, seed,
                       rng_offset + row0 * Lk, offs_m, offs_n, offs_d, offs_dv, D, DV, BLOCK_M, BLOCK_N, CHECK,
                       CAUSAL, MASK_KIND, MASK_Q, MASK_K, HAS_DROPOUT, UPCAST)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q,  # (B, Hq, Lq, D), strides (stride_qb, stride_qh, stride_qm, 1)
    K,  # (B, Hkv, Lk, D), strides (stride_kb, stride_kh, stride_kn, 1)
    V,  # (B, Hkv, Lk, DV), strides (stride_vb, stride_vh, stride_vn, 1)
    Mask,  # (B|1, Hq|1, Lq|1, Lk|1) bool or additive, strides (stride_mb, stride_mh, stride_mm, 1), 0 on
    #        broadcast dims (dummy when MASK_KIND == 0)
    DO,  # (B, Hq, Lq, DV), strides (stride_dob, stride_doh, stride_dom, 1)
    Lse2,  # (B, Hq, Lq) fp32, contiguous: from the preprocess kernel (log2 units; +inf on rows that see no key)
    Delta,  # (B, Hq, Lq) fp32, contiguous
    DK,  # (B, Hkv, Lk, D), strides (stride_dkb, stride_dkh, stride_dkn, 1)
    DV,  # (B, Hkv, Lk, DV), strides (stride_dvb, stride_dvh, stride_dvn, 1)
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_mb, stride_mh, stride_mm,
    stride_dob, stride_doh, stride_dom,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    H, GROUP, Lq, Lk, causal_shift, qk_scale, sm_scale, dropout_p, seed, rng_offset,
    D: tl.constexpr, DV_: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, MASK_Q: tl.constexpr, MASK_K: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr,
):
    # Grid: (cdiv(Lk, BLOCK_N), Hkv, B); one program = BLOCK_N keys of one (batch, kv head), summed over the
    # GROUP q heads that share them.
    n0 = tl.program_id(0) * BLOCK_N
    kvh = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = _load_rows(K + b * stride_kb + kvh * stride_kh, n0, stride_kn, Lk, offs_n, offs_d, D, UPCAST)
    v = _load_rows(V + b * stride_vb + kvh * stride_vh, n0, stride_vn, Lk, offs_n, offs_dv, DV_, UPCAST)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)

    # Query rows >= lo see part of this key block (causal: the first rows that see any of it, rounded down to a
    # block). One inner loop per head, checking causality on every block when CAUSAL: a second (unchecked) loop
    # in the same outer loop costs so many registers that every useful configuration spills. Without CAUSAL no
    # check is needed here: keys >= Lk only produce dk/dv rows that are never stored, and query rows >= Lq
    # read lse2 = +inf (P = 0).
    if CAUSAL:
        lo = tl.maximum(n0 - causal_shift, 0) // BLOCK_M * BLOCK_M
    else:
        lo = n0 * 0
    for g in range(0, GROUP):
        dk, dv = _dkdv_head(dk, dv, k, v, Q, DO, Lse2, Delta, Mask, b, kvh * GROUP + g, stride_qb, stride_qh,
                            stride_qm, stride_dob, stride_doh, stride_dom, stride_mb, stride_mh, stride_mm, n0, lo,
                            Lq, H, Lq, Lk, causal_shift, qk_scale, dropout_p, seed, rng_offset, offs_m, offs_n,
                            offs_d, offs_dv, D, DV_, BLOCK_M, BLOCK_N, CAUSAL, CAUSAL, MASK_KIND, MASK_Q, MASK_K,
                            HAS_DROPOUT, UPCAST)

    rows = n0 + offs_n
    dk_ptrs = DK + b * stride_dkb + kvh * stride_dkh + tl.cast(n0, tl.int64) * stride_dkn
    dv_ptrs = DV + b * stride_dvb + kvh * stride_dvh + tl.cast(n0, tl.int64) * stride_dvn
    tl.store(dk_ptrs + offs_n[:, None] * stride_dkn + offs_d[None, :], (dk * sm_scale).to(DK.dtype.element_ty),
             mask=(rows < Lk)[:, None] & (offs_d < D)[None, :])
    tl.store(dv_ptrs + offs_n[:, None] * stride_dvn + offs_dv[None, :], dv.to(DV.dtype.element_ty),
             mask=(rows < Lk)[:, None] & (offs_dv < DV_)[None, :])


@triton.jit
def _dq_inner(dq, q, do, lse2, delta, K, V, Mask, stride_kn, stride_vn, stride_mm, m0, lo, hi,
              Lq, Lk, causal_shift, qk_scale, dropout_p, seed, rng_base, offs_m, offs_n, offs_d, offs_dv,
              D: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              CHECK: tl.constexpr, CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, MASK_Q: tl.constexpr,
              MASK_K: tl.constexpr, HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr):
    for n0 in range(lo, hi, BLOCK_N):
        k = _load_rows(K, n0, stride_kn, Lk, offs_n, offs_d, D, UPCAST)  # (BLOCK_N, BLOCK_D)
        v = _load_rows(V, n0, stride_vn, Lk, offs_n, offs_dv, DV, UPCAST)  # (BLOCK_N, BLOCK_DV)
        t = _logits(q, tl.trans(k), qk_scale)
        t = _mask_scores(t, Mask, stride_mm, m0, n0, offs_m[:, None], offs_n[None, :], Lq, Lk, causal_shift,
                         CHECK, CAUSAL, MASK_KIND, MASK_Q, MASK_K)
        p = tl.math.exp2(t - lse2[:, None])
        dp = _dot(do, tl.trans(v))
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, rng_base, m0, n0, Lk, dropout_p, BLOCK_M, BLOCK_N)
            dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
        ds = p * (dp - delta[:, None])
        dq = _dot_acc(ds.to(k.dtype), k, dq)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q,  # (B, Hq, Lq, D), strides (stride_qb, stride_qh, stride_qm, 1)
    K,  # (B, Hkv, Lk, D), strides (stride_kb, stride_kh, stride_kn, 1)
    V,  # (B, Hkv, Lk, DV), strides (stride_vb, stride_vh, stride_vn, 1)
    Mask,  # (B|1, Hq|1, Lq|1, Lk|1) bool or additive, strides (stride_mb, stride_mh, stride_mm, 1), 0 on
    #        broadcast dims (dummy when MASK_KIND == 0)
    DO,  # (B, Hq, Lq, DV), strides (stride_dob, stride_doh, stride_dom, 1)
    Lse2,  # (B, Hq, Lq) fp32, contiguous: from the preprocess kernel (log2 units)
    Delta,  # (B, Hq, Lq) fp32, contiguous
    DQ,  # (B, Hq, Lq, D), strides (stride_dqb, stride_dqh, stride_dqm, 1)
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_mb, stride_mh, stride_mm,
    stride_dob, stride_doh, stride_dom,
    stride_dqb, stride_dqh, stride_dqm,
    H, GROUP, Lq, Lk, causal_shift, qk_scale, sm_scale, dropout_p, seed, rng_offset,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, MASK_Q: tl.constexpr, MASK_K: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr,
):
    # Grid: (cdiv(Lq, BLOCK_M), Hq, B); one program = BLOCK_M query rows of one (batch, head).
    m0 = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    kvh = (h // GROUP).to(tl.int64)
    h = h.to(tl.int64)
    K += b * stride_kb + kvh * stride_kh
    V += b * stride_vb + kvh * stride_vh
    Mask += b * stride_mb + h * stride_mh
    row0 = (b * H + h) * Lq
    rng_base = rng_offset + row0 * Lk

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows = m0 + offs_m
    q = _load_rows(Q + b * stride_qb + h * stride_qh, m0, stride_qm, Lq, offs_m, offs_d, D, UPCAST)
    do = _load_rows(DO + b * stride_dob + h * stride_doh, m0, stride_dom, Lq, offs_m, offs_dv, DV, UPCAST)
    lse2 = tl.load(Lse2 + row0 + rows, mask=rows < Lq, other=float("inf"))
    delta = tl.load(Delta + row0 + rows, mask=rows < Lq, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    mid, hi = _key_range(m0, Lk, causal_shift, BLOCK_M, BLOCK_N, CAUSAL)
    dq = _dq_inner(dq, q, do, lse2, delta, K, V, Mask, stride_kn, stride_vn, stride_mm, m0, 0, mid, Lq, Lk,
                   causal_shift, qk_scale, dropout_p, seed, rng_base, offs_m, offs_n, offs_d, offs_dv, D, DV,
                   BLOCK_M, BLOCK_N, False, CAUSAL, MASK_KIND, MASK_Q, MASK_K, HAS_DROPOUT, UPCAST)
    dq = _dq_inner(dq, q, do, lse2, delta, K, V, Mask, stride_kn, stride_vn, stride_mm, m0, mid, hi, Lq, Lk,
                   causal_shift, qk_scale, dropout_p, seed, rng_base, offs_m, offs_n, offs_d, offs_dv, D, DV,
                   BLOCK_M, BLOCK_N, True, CAUSAL, MASK_KIND, MASK_Q, MASK_K, HAS_DROPOUT, UPCAST)

    dq_ptrs = DQ + b * stride_dqb + h * stride_dqh + tl.cast(m0, tl.int64) * stride_dqm
    tl.store(dq_ptrs + offs_m[:, None] * stride_dqm + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=(rows < Lq)[:, None] & (offs_d < D)[None, :])


# --------------------------------------------------------------------------------------------------
# Dropout keep-mask (debug / tests)
# --------------------------------------------------------------------------------------------------


@triton.jit
def _attn_dropout_mask_kernel(
    Keep,  # (B, Hq, Lq, Lk) int8 out, contiguous
    H, Lq, Lk, dropout_p, seed, rng_offset,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Grid: (cdiv(Lq, BLOCK_M), Hq, B). The same _dropout_keep the attention kernels call.
    m0 = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    row0 = (b * H + h) * Lq
    qi = (m0 + tl.arange(0, BLOCK_M))[:, None]
    for n0 in range(0, Lk, BLOCK_N):
        kj = (n0 + tl.arange(0, BLOCK_N))[None, :]
        keep = _dropout_keep(seed, rng_offset + row0 * Lk, m0, n0, Lk, dropout_p, BLOCK_M, BLOCK_N)
        tl.store(Keep + (row0 + qi) * Lk + kj, keep.to(tl.int8), mask=(qi < Lq) & (kj < Lk))


def dropout_keep_mask(seed: int, offset: int, shape, p: float, device="cpu") -> torch.Tensor:
    """The keep-mask (True = kept) the attention kernels use for (seed, offset) and a (B, Hq, Lq, Lk) problem,
    materialised by the kernels' own Philox helper. For tests and small shapes."""
    b, h, lq, lk = (int(s) for s in shape)
    keep = torch.zeros((b, h, lq, lk), dtype=torch.int8, device=device)
    if keep.numel() == 0:
        return keep.bool()
    with _device_guard(keep):
        _attn_dropout_mask_kernel[(triton.cdiv(lq, 32), h, b)](keep, h, lq, lk, float(p), int(seed), int(offset),
                                                                BLOCK_M=32, BLOCK_N=64)
    return keep.bool()


# --------------------------------------------------------------------------------------------------
# Autotuning: per-arch configuration lists, bucketed keys
# --------------------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, num_warps, num_stages[, maxnreg]): BLOCK_M is the query tile and BLOCK_N the key tile in every
# kernel (dK/dV: a program owns BLOCK_N keys and iterates over BLOCK_M query rows). Lists are keyed by arch family
# and (kernel, element bits "16" | "32", head-dim bucket = max(BLOCK_D, BLOCK_DV, 64), heavy), heavy = dropout or a
# mask that varies along both queries and keys (a (BLOCK_M, BLOCK_N) mask tile and the Philox state take ~100
# registers a thread; key-padding and per-row masks are vector loads and count as light). fp32 inputs (IEEE
# dots, a correctness path) use one small list for both. Every entry compiles without spills or stack frame for the
# arch whose table lists it (both for _F32) with *every* flag combination of its class (scripts/compile_triton.py
# --full, ptxas 12.9 as bundled with Triton 3.9; CI compiles the heaviest combination). ptxas picks its own
# register budget when the PTX has no .maxnreg, and for some entries it stops far below the register file and
# spills (dq fp32 D=64 at 64 registers); a fifth field, maxnreg = 255, lifts that for the entries that need it
# (heavy and fp32 ones only: the plain-class entries timed on the H200 are unchanged). The choice among the entries
# is the autotuner's, per bucketed key. These are compile-checked starting points: retune on hardware.
_F32 = {
    ("fwd", 64): [(16, 16, 4, 1)], ("fwd", 128): [(16, 32, 8, 2)], ("fwd", 256): [(16, 32, 8, 1)],
    ("dq", 64): [(16, 16, 8, 2)], ("dq", 128): [(16, 32, 8, 2)], ("dq", 256): [(16, 16, 4, 1)],
    ("dkdv", 64): [(16, 16, 8, 1, 255)], ("dkdv", 128): [(16, 16, 8, 1, 255)], ("dkdv", 256): [(16, 16, 8, 1, 255)],
}
_CONFIGS = {
    90: {  # H100 / H200: 8-warp 128-row tiles (wgmma) first
        ("fwd", 64, False): [(128, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3)],
        ("fwd", 128, False): [(128, 64, 8, 1), (128, 32, 8, 3), (64, 64, 4, 3)],
        ("fwd", 256, False): [(64, 64, 8, 2), (64, 32, 8, 2), (32, 32, 4, 2)],
        ("fwd", 64, True): [(128, 32, 8, 2), (64, 64, 4, 2)],
        ("fwd", 128, True): [(64, 32, 8, 2), (128, 16, 8, 2), (64, 32, 4, 2)],
        ("fwd", 256, True): [(64, 16, 8, 2), (32, 16, 4, 2)],
        ("dq", 64, False): [(128, 64, 8, 3), (64, 64, 4, 3)],
        ("dq", 128, False): [(128, 32, 8, 2), (64, 64, 4, 2)],
        ("dq", 256, False): [(32, 32, 4, 2), (64, 16, 4, 2)],
        ("dq", 64, True): [(64, 32, 4, 2), (32, 32, 4, 2)],
        ("dq", 128, True): [(64, 32, 8, 2), (32, 32, 4, 2)],
        ("dq", 256, True): [(32, 32, 4, 2), (32, 16, 4, 2)],
        ("dkdv", 64, False): [(32, 128, 8, 3), (32, 64, 8, 3)],
        ("dkdv", 128, False): [(16, 128, 8, 2), (32, 64, 8, 2)],
        ("dkdv", 256, False): [(32, 32, 8, 2)],
        ("dkdv", 64, True): [(32, 32, 4, 2, 255)],
        ("dkdv", 128, True): [(32, 32, 8, 2)],
        ("dkdv", 256, True): [(16, 32, 8, 1), (32, 16, 8, 2)],
    },
    80: {  # A100 and the other sm_8x: configurations with register headroom on sm_80 first
        ("fwd", 64, False): [(128, 64, 8, 3), (64, 64, 4, 3)],
        ("fwd", 128, False): [(128, 32, 8, 3), (64, 32, 4, 3), (64, 64, 8, 3)],
        ("fwd", 256, False): [(64, 32, 8, 2), (32, 32, 4, 2)],
        ("fwd", 64, True): [(64, 32, 4, 2)],
        ("fwd", 128, True): [(64, 32, 4, 2), (64, 32, 8, 2)],
        ("fwd", 256, True): [(32, 32, 8, 2), (64, 16, 8, 2)],
        ("dq", 64, False): [(128, 64, 8, 3), (64, 64, 8, 3), (64, 32, 4, 3)],
        ("dq", 128, False): [(128, 32, 8, 2), (64, 32, 4, 2), (32, 64, 4, 2)],
        ("dq", 256, False): [(32, 32, 4, 2)],
        ("dq", 64, True): [(32, 32, 4, 2)],
        ("dq", 128, True): [(32, 32, 4, 2), (64, 32, 8, 2)],
        ("dq", 256, True): [(32, 16, 4, 2), (32, 32, 4, 2)],
        ("dkdv", 64, False): [(32, 64, 8, 3)],
        ("dkdv", 128, False): [(32, 64, 8, 2), (32, 32, 8, 2)],
        ("dkdv", 256, False): [(32, 32, 8, 2)],
        ("dkdv", 64, True): [(32, 32, 8, 2, 255)],
        ("dkdv", 128, True): [(16, 32, 8, 2), (32, 16, 8, 2)],
        ("dkdv", 256, True): [(16, 32, 8, 2)],
    },
}
_KERNELS = {"fwd": _attn_fwd_kernel, "dkdv": _attn_bwd_dkdv_kernel, "dq": _attn_bwd_dq_kernel}
_LEN_BUCKET_CAP = 8192


def _arch(device: torch.device) -> int:
    major, _ = torch.cuda.get_device_capability(device)
    return 90 if major >= 9 else 80


def _d_bucket(block_d: int, block_dv: int) -> int:
    return max(64, block_d, block_dv)


def _len_bucket(n: int) -> int:
    return min(triton.next_power_of_2(max(n, 1)), _LEN_BUCKET_CAP)


def _config_list(kind: str, arch: int, bits: str, d_bucket: int, heavy: bool):
    return _F32[(kind, d_bucket)] if bits == "32" else _CONFIGS[arch][(kind, d_bucket, heavy)]


@functools.lru_cache(maxsize=None)
def _autotuned(kind: str, arch: int, bits: str, d_bucket: int, heavy: bool, lq_bucket: int, lk_bucket: int,
               causal: bool):
    """One autotuner per bucketed key: (kernel, arch, dtype width, head-dim bucket, heavy, next_power_of_2(Lq)
    and next_power_of_2(Lk) capped at _LEN_BUCKET_CAP, causal); within it Triton's autotuner keys on the
    remaining constexprs and the tensor dtypes. Tiles longer than the bucketed lengths are pruned (the smallest
    configuration always stays)."""
    configs = _config_list(kind, arch, bits, d_bucket, heavy)
    keep = [c for c in configs if c[0] <= max(lq_bucket, 16) and c[1] <= max(lk_bucket, 16)]
    keep = keep or [min(configs, key=lambda c: c[0] * c[1])]
    return triton.autotune(
        configs=[triton.Config({"BLOCK_M": c[0], "BLOCK_N": c[1]}, num_warps=c[2], num_stages=c[3],
                               maxnreg=c[4] if len(c) > 4 else None) for c in keep],
        key=["MASK_KIND", "MASK_Q", "MASK_K", "HAS_DROPOUT", "D", "BLOCK_DV"],
    )(_KERNELS[kind])


def _launch(kind: str, grid_fn, ref: torch.Tensor, lq: int, lk: int, args, consts):
    """Run kernel `kind`: the one INTERPRET_CONFIG under the interpreter, else the autotuner for the key."""
    if _interpreting():
        cfg = dict(INTERPRET_CONFIG)
        _KERNELS[kind][grid_fn(cfg)](*args, **consts, **cfg)
        return
    bits = "32" if ref.dtype == torch.float32 else "16"
    heavy = consts["HAS_DROPOUT"] or (consts["MASK_Q"] and consts["MASK_K"])
    fn = _autotuned(kind, _arch(ref.device), bits, _d_bucket(consts["BLOCK_D"], consts["BLOCK_DV"]), heavy,
                    _len_bucket(lq), _len_bucket(lk), consts["CAUSAL"])
    fn[grid_fn](*args, **consts)


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------


class _NoDeviceGuard:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _device_guard(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else _NoDeviceGuard()


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if (t.shape[-1] <= 1 or t.stride(-1) == 1) else t.contiguous()


def _is_blhd(t: torch.Tensor) -> bool:
    """Heads inside positions (stride(1) < stride(2)): the rule of pyattn/ops/attention.py's _is_blhd."""
    return t.shape[1] > 1 and t.shape[2] > 1 and t.stride(1) < t.stride(2)


def _new_like(ref: torch.Tensor, shape) -> torch.Tensor:
    """An empty (B, H, L, D) tensor in ref's layout: (B, L, H, D) memory when ref's heads lie inside its positions
    (flash_attn_func's inputs, a packed projection's head views), else contiguous: the layout pyattn's op
    returns, so no copy follows."""
    b, h, n, d = shape
    if _is_blhd(ref):
        return ref.new_empty((b, n, h, d)).transpose(1, 2)
    return ref.new_empty((b, h, n, d))


def _check(q, k, v, mask):
    if q.dtype not in _SUPPORTED_DTYPES or not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"pyattn Triton attention: q, k, v must share one of fp16/bf16/fp32, got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("pyattn Triton attention: expected 4-D (B, H, L, D) q, k, v")
    b, hq, _, d = q.shape
    if k.shape[0] != b or v.shape[0] != b or k.shape[3] != d or v.shape[1:3] != k.shape[1:3] \
            or k.shape[1] == 0 or hq % k.shape[1]:
        raise ValueError(f"pyattn Triton attention: inconsistent shapes q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if not (1 <= d <= MAX_HEAD_DIM and 1 <= v.shape[3] <= MAX_HEAD_DIM):
        raise ValueError(f"pyattn Triton attention: head dims must be in [1, {MAX_HEAD_DIM}], got q/k {d}, "
                         f"v {v.shape[3]}")
    if mask is not None and mask.dim() != 4:
        raise ValueError(f"pyattn Triton attention: mask must be 4-D, got shape {tuple(mask.shape)}")


def _mask_args(mask, q):
    """(mask tensor or dummy, its (batch, head, query) strides with 0 on size-1 dims, constexprs MASK_KIND,
    MASK_Q (varies along queries), MASK_K (varies along keys; then its key stride must be 1))."""
    if mask is None:
        return q, (0, 0, 0), {"MASK_KIND": _MASK_NONE, "MASK_Q": False, "MASK_K": False}
    if mask.shape[3] > 1 and mask.stride(3) != 1:  # not pyattn's canonical form: copy
        mask = mask.contiguous()
    strides = tuple(0 if mask.shape[i] == 1 else mask.stride(i) for i in range(3))
    kind = _MASK_BOOL if mask.dtype == torch.bool else _MASK_ADD
    return mask, strides, {"MASK_KIND": kind, "MASK_Q": mask.shape[2] > 1, "MASK_K": mask.shape[3] > 1}


def _common_consts(q, v, causal, mask_consts, dropout_p):
    d, dv = q.shape[3], v.shape[3]
    return {"D": d, "BLOCK_D": max(16, triton.next_power_of_2(d)), "BLOCK_DV": max(16, triton.next_power_of_2(dv)),
            "CAUSAL": bool(causal), **mask_consts, "HAS_DROPOUT": dropout_p > 0, "UPCAST": _interpreting()}


# Split-KV forward (flash-decoding), which attn_fwd takes for decoding-like calls: a kv head's group of query rows
# fits one tile (GROUP * Lq <= SPLIT_KV_MAX_ROWS), no dropout, at least SPLIT_KV_MIN_KEYS keys, fp16 / bf16
# (fp32's FMA dots spill these tiles on a GPU: fp32 keeps the regular forward there; the interpreter, where the
# tests run the kernel's logic in fp32, takes it for every dtype). The
# regular forward runs one program per (batch, q head) and query block: for one query row that is B * Hq programs,
# each streaming its kv head's whole K and V (GROUP times over per kv head, and too few programs for the GPU at
# small B). Here one program takes a kv head's whole group against one split of the keys (K and V read once), the
# splits fill the GPU (about 2 programs per SM), and a second kernel combines the splits' results through their
# log-sum-exps. Tests patch the two thresholds to reach it with small shapes.
SPLIT_KV_MAX_ROWS = 32
SPLIT_KV_MIN_KEYS = 1024
SPLIT_KV_MIN_CHUNK = 256  # keys per split at least
_SPLIT_KV_MAX_SPLITS = 64


def _takes_split_kv(q, hkv: int, lk: int, dropout_p: float) -> bool:
    """attn_fwd's choice of the split-KV forward (the conditions above)."""
    return (dropout_p == 0 and (q.shape[1] // hkv) * q.shape[2] <= SPLIT_KV_MAX_ROWS
            and lk >= SPLIT_KV_MIN_KEYS and (q.dtype != torch.float32 or _interpreting()))


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _split_kv_block_n(block_m: int, block_d: int) -> int:
    """Keys per block of the split-KV kernel on a GPU: 64 for 16 rows up to head dim 128, else 32 (compile check:
    larger tiles spill, a mask's gathered pointer tile included)."""
    return 64 if block_m <= 16 and block_d <= 128 else 32


def _split_kv_shape(b: int, hkv: int, lk: int, device: torch.device, block_n: int):
    """(n_splits, chunk): about two programs per SM over the B * Hkv groups, each split a multiple of block_n keys
    and at least SPLIT_KV_MIN_CHUNK (the interpreter counts 4 SMs)."""
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 4
    want = -(-2 * sms // (b * hkv))
    n = max(1, min(want, _SPLIT_KV_MAX_SPLITS, lk // max(SPLIT_KV_MIN_CHUNK, 1)))
    per = -(-lk // n)
    chunk = -(-per // block_n) * block_n
    return -(-lk // chunk), chunk


def _attn_fwd_split_kv(q, k, v, mask, out, lse, causal: bool, shift: int, scale: float):
    """attn_fwd's split-KV path: fills out and lse (q, k, v with unit last stride; mask as attn_fwd's; no
    dropout)."""
    b, hq, lq, d = q.shape
    hkv, lk, dv = k.shape[1], k.shape[2], v.shape[3]
    group = hq // hkv
    block_d, block_dv = max(16, triton.next_power_of_2(d)), max(16, triton.next_power_of_2(dv))
    block_m = max(16, triton.next_power_of_2(group * lq))
    if _interpreting():
        block_n, opts = 16, {}
    else:
        block_n = _split_kv_block_n(block_m, max(block_d, block_dv))
        opts = {"num_warps": 4, "num_stages": 3 if _arch(q.device) >= 90 else 2}
    n_splits, chunk = _split_kv_shape(b, hkv, lk, q.device, block_n)
    opart = torch.empty((b, hq, lq, n_splits, dv), dtype=torch.float32, device=q.device)
    mpart, lpart = torch.empty((2, b, hq, lq, n_splits), dtype=torch.float32, device=q.device)
    mask_t, ms, mask_consts = _mask_args(mask, q)
    mk = 1 if mask_consts["MASK_K"] else 0
    with _device_guard(q):
        _attn_decode_split_kernel[(n_splits, hkv, b)](
            q, k, v, mask_t, opart, mpart, lpart, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *ms, mk, hq, group,
            lq, lk, shift, float(scale) * LOG2E, chunk, n_splits, D=d, DV=dv, BLOCK_D=block_d, BLOCK_DV=block_dv,
            BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=bool(causal),
            MASK_KIND=mask_consts["MASK_KIND"], UPCAST=_interpreting(), **opts)
        _attn_decode_combine_kernel[(lq, hq, b)](
            opart, mpart, lpart, out, lse, *out.stride()[:3], hq, lq, n_splits, DV=dv, BLOCK_DV=block_dv,
            BLOCK_S=max(2, triton.next_power_of_2(n_splits)))


def attn_fwd(q, k, v, mask, dropout_p: float, causal: bool, bottom_right: bool, scale: float, seed: int,
             offset: int):
    """q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv) with Hkv | Hq, fp16/bf16/fp32, any strides (last
    stride 1, else copied); mask None, bool (True = keep) or additive, (B|1, Hq|1, Lq|1, Lk|1). bottom_right:
    causal alignment j <= i + Lk - Lq (flash-attn) instead of j <= i (torch). Dropout (p in [0, 1)) from
    (seed, offset). Returns out (B, Hq, Lq, Dv) in q's dtype and layout ((B, L, H, D) memory for such views),
    lse (B, Hq, Lq) fp32 (natural log; +inf with out = 0 on rows that see no key)."""
    _check(q, k, v, mask)
    b, hq, lq, d = q.shape
    hkv, lk, dv = k.shape[1], k.shape[2], v.shape[3]
    out = _new_like(q, (b, hq, lq, dv))
    lse = torch.empty((b, hq, lq), dtype=torch.float32, device=q.device)
    if b * hq * lq == 0:
        return out, lse
    if lk == 0:  # no key: out 0, lse +inf, no launch
        return out.zero_(), lse.fill_(math.inf)
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    shift = (lk - lq) if (causal and bottom_right) else 0
    if _takes_split_kv(q, hkv, lk, dropout_p):
        _attn_fwd_split_kv(q, k, v, mask, out, lse, causal, shift, scale)
        return out, lse
    mask_t, ms, mask_consts = _mask_args(mask, q)
    consts = _common_consts(q, v, causal, mask_consts, dropout_p)
    args = (q, k, v, mask_t, out, lse, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *ms, *out.stride()[:3],
            hq, hq // hkv, lq, lk, shift, float(scale) * LOG2E, float(dropout_p), int(seed), int(offset))
    with _device_guard(q):
        _launch("fwd", lambda c: (triton.cdiv(lq, c["BLOCK_M"]), hq, b), q, lq, lk, args,
                {**consts, "DV": dv})
    return out, lse


def attn_bwd(dout, q, k, v, out, lse, mask, dropout_p: float, causal: bool, bottom_right: bool, scale: float,
             seed: int, offset: int):
    """Backward of attn_fwd (same q, k, v, mask, flags, scale, seed, offset; out and lse from it; dout shaped
    like out). Returns dq, dk, dv in q's, k's, v's dtype and layout (dk/dv with Hkv heads: each kv head's
    gradient sums its GQA group's q heads in a fixed order; deterministic, no atomics)."""
    _check(q, k, v, mask)
    b, hq, lq, d = q.shape
    hkv, lk, dvd = k.shape[1], k.shape[2], v.shape[3]
    dq, dk, dv = _new_like(q, q.shape), _new_like(k, k.shape), _new_like(v, v.shape)
    if b * hq * lq == 0 or lk == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    q, k, v, out, dout = (_unit_last(t) for t in (q, k, v, out, dout))
    lse = lse.to(torch.float32).contiguous()
    mask_t, ms, mask_consts = _mask_args(mask, q)
    shift = (lk - lq) if (causal and bottom_right) else 0
    consts = _common_consts(q, v, causal, mask_consts, dropout_p)
    # Exact statistics for rows whose lse is too large to hold log2(l) (module docstring): where an additive mask
    # can put them there, or fp32 inputs ask for fp32 accuracy. Their factor 2^-l2 goes into a copy of dout.
    exact = mask_consts["MASK_KIND"] == _MASK_ADD or q.dtype == torch.float32
    lse2, delta = torch.empty((2, b, hq, lq), dtype=torch.float32, device=q.device).unbind(0)
    dos = torch.empty((b, hq, lq, dvd), dtype=dout.dtype, device=q.device) if exact else dout
    common = (hq, hq // hkv, lq, lk, shift, float(scale) * LOG2E, float(scale), float(dropout_p), int(seed),
              int(offset))
    with _device_guard(q):
        pre_m, pre_n = _pre_blocks(consts["BLOCK_D"], consts["BLOCK_DV"])
        pre_consts = {name: consts[name] for name in ("D", "BLOCK_D", "BLOCK_DV", "CAUSAL", "MASK_KIND", "MASK_Q",
                                                      "MASK_K", "UPCAST")}
        _attn_bwd_preprocess_kernel[(triton.cdiv(lq, pre_m), hq, b)](
            q, k, mask_t, out, dout, lse, lse2, delta, dos, *q.stride()[:3], *k.stride()[:3], *ms,
            *out.stride()[:3], *dout.stride()[:3], hq, hq // hkv, lq, lk, shift, float(scale) * LOG2E,
            DV=dvd, BLOCK_M=pre_m, BLOCK_N=pre_n, EXACT_ROWS=exact, **pre_consts)
        dout = dos
        args = (q, k, v, mask_t, dout, lse2, delta, dk, dv, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
                *ms, *dout.stride()[:3], *dk.stride()[:3], *dv.stride()[:3], *common)
        _launch("dkdv", lambda c: (triton.cdiv(lk, c["BLOCK_N"]), hkv, b), q, lq, lk, args,
                {**consts, "DV_": dvd})
        args = (q, k, v, mask_t, dout, lse2, delta, dq, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
                *ms, *dout.stride()[:3], *dq.stride()[:3], *common)
        _launch("dq", lambda c: (triton.cdiv(lq, c["BLOCK_M"]), hq, b), q, lq, lk, args,
                {**consts, "DV": dvd})
    return dq, dk, dv


# --------------------------------------------------------------------------------------------------
# Offline compile check (scripts/compile_triton.py)
# --------------------------------------------------------------------------------------------------

def _signature(kernel, t: str, mask_t: str) -> dict:
    """Argument types of a forward / backward kernel (not the split-KV ones) for element type t ("fp16", ...) and
    mask pointer type."""
    names = kernel.arg_names
    tensors = names[:next(i for i, name in enumerate(names) if name.startswith("stride_"))]  # pointers come first
    ptr = {"Q": t, "K": t, "V": t, "Mask": mask_t, "Out": t, "DO": t, "DOS": t, "DQ": t, "DK": t, "DV": t}
    sig = {name: f"*{ptr.get(name, 'fp32')}" for name in tensors}  # Lse, Lse2, Delta: fp32
    for name in kernel.arg_names:
        if name.startswith("stride_") or name in ("H", "GROUP", "Lq", "Lk", "causal_shift"):
            sig[name] = "i32"
    sig.update(qk_scale="fp32", sm_scale="fp32", dropout_p="fp32", seed="i64", rng_offset="i64")
    return {name: sig[name] for name in names if name in sig}


def _flag_sets(heavy: bool, full: bool):
    """(CAUSAL, MASK_KIND, MASK_Q, MASK_K, HAS_DROPOUT) combinations of a class: the heaviest one (causal,
    additive fp32 mask tile or key-padding vector, dropout when heavy), or with full=True every combination."""
    if not full:
        return [(True, _MASK_ADD, heavy, True, heavy)]
    out = []
    for causal in (False, True):
        for mask_kind in (_MASK_NONE, _MASK_BOOL, _MASK_ADD):
            shapes = [(False, False)] if mask_kind == _MASK_NONE else [(False, True), (True, False), (True, True)]
            for mq, mk in shapes:
                for dropout in (False, True):
                    if (dropout or (mq and mk)) == heavy:
                        out.append((causal, mask_kind, mq, mk, dropout))
    return out


def _split_kv_compile_configs(full: bool):
    """The split-KV kernels as _attn_fwd_split_kv launches them: bf16 (fp16 too with full=True) at head dims 64, 128
    and 256, BLOCK_M 16 and 32 (a group of one to 32 query rows), causal, an fp32 additive mask (full=True: every
    mask kind), both stage counts; the combining kernel for up to 64 splits."""
    configs = []
    for t in ("bf16", "fp16") if full else ("bf16",):
        for d in (64, 128, 256):
            for block_m in (16, 32):
                block_n = _split_kv_block_n(block_m, d)
                for mask_kind in (_MASK_NONE, _MASK_BOOL, _MASK_ADD) if full else (_MASK_ADD,):
                    mask_t = {_MASK_NONE: t, _MASK_BOOL: "i1", _MASK_ADD: "fp32"}[mask_kind]
                    sig = {"Q": f"*{t}", "K": f"*{t}", "V": f"*{t}", "Mask": f"*{mask_t}", "Opart": "*fp32",
                           "Mpart": "*fp32", "Lpart": "*fp32"}
                    for name in _attn_decode_split_kernel.arg_names:
                        if name.startswith("stride_") or name in ("H", "GROUP", "Lq", "Lk", "causal_shift", "chunk",
                                                                  "n_splits"):
                            sig[name] = "i32"
                    sig["qk_scale"] = "fp32"
                    sig = {name: sig[name] for name in _attn_decode_split_kernel.arg_names if name in sig}
                    consts = {"D": d, "DV": d, "BLOCK_D": d, "BLOCK_DV": d, "BLOCK_M": block_m, "BLOCK_N": block_n,
                              "CAUSAL": True, "MASK_KIND": mask_kind, "UPCAST": False}
                    sig.update({k: "constexpr" for k in consts})
                    for stages in (2, 3):
                        configs.append((_attn_decode_split_kernel, sig, consts, 4, {"num_stages": stages}))
    for block_dv in (64, 128, 256):
        sig = {"Opart": "*fp32", "Mpart": "*fp32", "Lpart": "*fp32", "Out": "*bf16", "Lse": "*fp32", "stride_ob": "i32",
               "stride_oh": "i32", "stride_om": "i32", "H": "i32", "Lq": "i32", "n_splits": "i32"}
        consts = {"DV": block_dv, "BLOCK_DV": block_dv, "BLOCK_S": 64}
        sig.update({k: "constexpr" for k in consts})
        configs.append((_attn_decode_combine_kernel, sig, consts, 4))
    return configs


def compile_configs(full: bool = False):
    """Configurations for scripts/compile_triton.py: (kernel_fn, signature, constexprs, num_warps, options).

    Every (BLOCK_M, BLOCK_N, num_warps, num_stages) that _CONFIGS or _F32 can pick, at the largest head dim of
    its bucket, with the heaviest flags of its class (see _flag_sets); bf16 for the 16-bit tables (fp16 has the
    same register needs), fp32 for _F32. The script compiles an entry of an arch table for the archs whose table
    lists it (sm_80 for _CONFIGS[80], sm_90a for _CONFIGS[90]: _arch() launches nothing else there) and _F32's
    for both. full=True: every flag combination of the class, plus fp16 and a non-power-of-2 head dim (heaviest
    flags). Plus the backward preprocess kernel and the split-KV kernels (_split_kv_compile_configs).
    """
    entries = {}  # (kind, d_bucket, heavy, dtype, config) -> archs that launch it
    for arch, table in _CONFIGS.items():
        for (kind, bucket, heavy), cfgs in table.items():
            for c in cfgs:
                entries.setdefault((kind, bucket, heavy, "bf16", c), set()).add(arch)
    for (kind, bucket), cfgs in _F32.items():
        for heavy in ((False, True) if full else (True,)):
            entries.update({(kind, bucket, heavy, "fp32", c): set(_CONFIGS) for c in cfgs})
    jobs = [(e, e[1], flags) for e in sorted(entries) for flags in _flag_sets(e[2], full)]
    if full:  # fp16 and a non-power-of-2 head dim (masked columns), heaviest flags
        jobs += [((kind, bucket, heavy, t2, c), d2, _flag_sets(heavy, False)[0])
                 for kind, bucket, heavy, t, c in sorted(entries) if t == "bf16"
                 for t2, d2 in (("fp16", bucket), ("bf16", {64: 40, 128: 96, 256: 192}[bucket]))]
    configs = []
    for entry, d, flags in jobs:
        kind, bucket, heavy, t, (bm, bn, warps, stages, *maxnreg) = entry
        archs = tuple(sorted(entries[entry[:3] + ("bf16" if t == "fp16" else t,) + entry[4:]]))
        causal, mask_kind, mq, mk, dropout = flags
        mask_t = {_MASK_NONE: t, _MASK_BOOL: "i1", _MASK_ADD: "fp32"}[mask_kind]
        sig = _signature(_KERNELS[kind], t, mask_t)
        block_d = max(16, triton.next_power_of_2(d))
        consts = {"D": d, ("DV_" if kind == "dkdv" else "DV"): d, "BLOCK_D": block_d, "BLOCK_DV": block_d,
                  "BLOCK_M": bm, "BLOCK_N": bn, "CAUSAL": causal, "MASK_KIND": mask_kind, "MASK_Q": mq, "MASK_K": mk,
                  "HAS_DROPOUT": dropout, "UPCAST": False}
        sig.update({k: "constexpr" for k in consts})
        options = {"num_stages": stages, "archs": archs, **({"maxnreg": maxnreg[0]} if maxnreg else {})}
        configs.append((_KERNELS[kind], sig, consts, warps, options))
    configs += _split_kv_compile_configs(full)
    configs += _preprocess_compile_configs(full)
    return configs


def _preprocess_compile_configs(full: bool):
    """The backward preprocess kernel per head dim (q's and v's the same): without exact rows (bf16, no mask), and
    with them (bf16 / fp32, causal, a full additive mask tile)."""
    configs = []
    for d in (16, 32, 64, 128, 256) if full else (64, 256):
        block_m, block_n = _pre_blocks(d, d)
        for t, exact in (("bf16", False), ("bf16", True), ("fp32", True)):
            mask_t = "fp32" if exact else t
            sig = _signature(_attn_bwd_preprocess_kernel, t, mask_t)
            consts = {"D": d, "DV": d, "BLOCK_D": d, "BLOCK_DV": d, "BLOCK_M": block_m, "BLOCK_N": block_n,
                      "CAUSAL": exact, "MASK_KIND": _MASK_ADD if exact else _MASK_NONE, "MASK_Q": exact,
                      "MASK_K": exact, "EXACT_ROWS": exact, "UPCAST": False}
            sig.update({k: "constexpr" for k in consts})
            configs.append((_attn_bwd_preprocess_kernel, sig, consts, 4))
    return configs
