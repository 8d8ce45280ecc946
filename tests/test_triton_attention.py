"""The triton attention kernels (kernels/attention.py), forced with backend="triton" through the public functions,
against the float64 oracle (the torch backend in float64, pyattn.testing.attention_ref).

On machines without CUDA this runs the Triton interpreter (TRITON_INTERPRET=1, set by conftest.py). The
interpreter is slow, so shapes stay small (L <= 129, few heads) while still crossing the interpreter block
sizes (kernels.attention.INTERPRET_CONFIG: BLOCK_M=32, BLOCK_N=16) with odd lengths.
Tolerances: TESTING.md's policy (fp32: assert_close_fp32; fp16/bf16: assert_attention_close, 2x forward /
3x backward the error of ``attention_low``), unless a test's comment says why it needs more.
"""
import math
import os

import pytest
import torch

import pyattn
from pyattn.backends.torch import causal_keep
from pyattn.dispatch import BackendNotSupported
from pyattn.ops.attention import _attention_bwd, _attention_fwd
from pyattn.testing import (assert_attention_close, assert_close_fp32, attention_low, attention_ref,
                            check_exact_rows, key_padding_mask, make_qkv)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
if DEV == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("triton on CPU needs TRITON_INTERPRET=1 (conftest.py sets it)", allow_module_level=True)
_ok, _why = pyattn.dispatch.get_backend("triton").availability()
if not _ok:
    pytest.skip(f"triton backend unavailable: {_why}", allow_module_level=True)

from pyattn.kernels import attention as K  # noqa: E402  (needs triton)

F32, F64 = torch.float32, torch.float64


# ---- helpers -----------------------------------------------------------------------------------------------


def triton_attention(q, k, v, mask=None, causal=False, bottom_right=False, dropout_p=0.0, lse=False):
    """(B, H, L, D) views in, (B, H, Lq, Dv) out, through a public function with backend="triton":
    flash_attn_func for bottom-right causal (its convention), scaled_dot_product_attention otherwise."""
    if bottom_right:
        assert mask is None
        res = pyattn.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p,
                                     causal=causal, return_lse=lse, backend="triton")
        return (res[0].transpose(1, 2), res[1]) if lse else res.transpose(1, 2)
    out = pyattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal,
                                              enable_gqa=q.shape[1] != k.shape[1], backend="triton")
    return out


def _mask4(mask):
    return None if mask is None else mask[(None,) * (4 - mask.dim())]


def check_fp32(q, k, v, mask=None, causal=False, bottom_right=False, seed=0):
    """Forward (and lse for flash_attn_func) and the three grads vs the float64 oracle, fp32 policy."""
    res = triton_attention(q, k, v, mask, causal, bottom_right, lse=bottom_right)
    out, lse = res if bottom_right else (res, None)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.device)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref, ref_lse, ref_grads = attention_ref(q, k, v, _mask4(mask), causal=causal, bottom_right=bottom_right,
                                            dout=dout)
    assert out.dtype == q.dtype and out.shape == ref.shape
    assert_close_fp32(out, ref, "fwd", msg=lambda m: "out: " + m)
    if lse is not None:
        assert_close_fp32(lse, ref_lse, "fwd", msg=lambda m: "lse: " + m)
    for name, g, r in zip("qkv", grads, ref_grads):
        assert g.shape == r.shape and g.dtype == q.dtype
        assert_close_fp32(g, r, "bwd", msg=lambda m, name=name: f"d{name}: " + m)
    return out, grads


# ---- odd lengths, cross pairs, head dims (fp32) -------------------------------------------------------------

# Each (Lq, Lk) with one head dim; together every length of the brief and every head dim 8..128 appears.
CASES = [((1, 1), 8), ((2, 2), 16), ((15, 15), 32), ((17, 17), 40), ((63, 63), 59), ((65, 65), 64),
         ((97, 97), 80), ((113, 113), 96), ((129, 129), 111), ((1, 39), 128), ((39, 1), 64), ((113, 71), 32),
         ((17, 129), 59)]


@pytest.mark.parametrize("lens,d", CASES, ids=[f"{a}x{b}-d{d}" for (a, b), d in CASES])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_lengths_and_head_dims(lens, d, causal):
    lq, lk = lens
    q, k, v = make_qkv(1, 2, lq, lk, d, device=DEV, requires_grad=True, seed=lq * 7 + lk + d)
    check_fp32(q, k, v, causal=causal)


@pytest.mark.parametrize("lq,lk,hkv", [(17, 40, 2), (40, 17, 1), (33, 33, 4), (65, 30, 2)])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_flash_attn_func_bottom_right_gqa(lq, lk, hkv, causal):
    # (B, L, H, D) memory (blhd views), bottom-right causal when Lq != Lk, GQA by fewer kv heads, lse returned.
    q, k, v = make_qkv(2, 4, lq, lk, 32, hkv=hkv, device=DEV, layout="blhd", requires_grad=True, seed=lq + lk)
    check_fp32(q, k, v, causal=causal, bottom_right=True)


@pytest.mark.parametrize("hkv", [2, 1], ids=["gqa", "mqa"])
def test_sdpa_gqa_top_left_causal(hkv):
    q, k, v = make_qkv(2, 4, 29, 45, 16, hkv=hkv, device=DEV, requires_grad=True, seed=hkv)
    check_fp32(q, k, v, causal=True)


def test_value_head_dim_differs():
    q, k, v = make_qkv(1, 2, 23, 37, 16, dv=40, device=DEV, requires_grad=True)
    out, _ = check_fp32(q, k, v, causal=True)
    assert out.shape == (1, 2, 23, 40)


# ---- masks ---------------------------------------------------------------------------------------------------

MASK_SHAPES = [(37,), (19, 37), "key_padding", (1, 2, 19, 37), (2, 2, 19, 37), (2, 1, 19, 1)]


@pytest.mark.parametrize("shape", MASK_SHAPES, ids=str)
@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_masks_broadcast(shape, kind):
    g = torch.Generator().manual_seed(len(str(shape)))
    q, k, v = make_qkv(2, 2, 19, 37, 16, device=DEV, requires_grad=True, seed=3)
    if shape == "key_padding":  # (B, 1, 1, Lk): keys past each batch's length are padding
        keep = key_padding_mask([37, 20], 37)
    else:
        keep = torch.rand(shape, generator=g) > (0.3 if shape[-1] > 1 else 0.2)
    if kind == "bool":
        mask = keep
    else:  # additive: random values, -inf where keep is False
        mask = torch.randn(keep.shape, generator=g).masked_fill(~keep, -math.inf)
    check_fp32(q, k, v, mask=mask.to(DEV))


def test_additive_mask_in_half_dtype_and_causal_with_mask():
    # The op takes a mask and causal together (the public functions do not); bottom-right, GQA, bf16 mask.
    q, k, v = make_qkv(2, 4, 21, 34, 24, hkv=2, dtype=torch.bfloat16, device=DEV, seed=5)
    mask = torch.randn(2, 1, 21, 34, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16).to(DEV)
    scale = 24 ** -0.5
    out, lse, state = _attention_fwd(q, k, v, mask, 0.0, True, True, scale, None, False, "triton")
    ref, ref_lse = attention_ref(q, k, v, mask, causal=True, bottom_right=True)
    low = attention_low(q, k, v, mask, causal=True, bottom_right=True)
    assert_attention_close(out, ref, low, 2)
    assert_close_fp32(lse, ref_lse, "fwd")  # lse is fp32 math on bf16-exact inputs


def test_fully_masked_rows_give_zero_output_and_grads():
    q, k, v = make_qkv(2, 2, 19, 37, 16, device=DEV, requires_grad=True, seed=9)
    keep = torch.rand(2, 2, 19, 37, generator=torch.Generator().manual_seed(9)) > 0.3
    keep[0, 1, 3] = False
    keep[1, :, 18] = False
    for mask in (keep, torch.zeros(keep.shape).masked_fill(~keep, -math.inf)):
        out, (dq, dk, dv) = check_fp32(q, k, v, mask=mask.to(DEV))
        for t in (out, dq):
            assert torch.equal(t[0, 1, 3], torch.zeros_like(t[0, 1, 3]))
            assert torch.equal(t[1, :, 18], torch.zeros_like(t[1, :, 18]))
    # bottom-right causal with Lq > Lk: the first Lq - Lk query rows see no key: out 0, lse +inf, dq 0
    q, k, v = make_qkv(1, 2, 40, 17, 16, device=DEV, layout="blhd", requires_grad=True, seed=10)
    out, lse = triton_attention(q, k, v, causal=True, bottom_right=True, lse=True)
    (dq,) = torch.autograd.grad(out, (q,), torch.randn_like(out))
    assert torch.equal(out[:, :, :23], torch.zeros_like(out[:, :, :23]))
    assert torch.equal(dq[:, :, :23], torch.zeros_like(dq[:, :, :23]))
    assert bool((lse[:, :, :23] == math.inf).all()) and bool(lse[:, :, 23:].isfinite().all())


# The dK/dV kernel leaves keys >= Lk unmasked (their rows are never stored): exp2(0 - lse2) overflows there on rows
# of hugely negative lse2, in rows of the tile that are dropped (the interpreter's numpy warns).
_DROPPED_ROW_WARNINGS = (pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning"),
                         pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning"))


@_DROPPED_ROW_WARNINGS[0]
@_DROPPED_ROW_WARNINGS[1]
@pytest.mark.parametrize("case,causal", [("finfo.min", False), ("finfo.min", True), ("-1e9", False), ("-1e9", True),
                                         ("-1e5", False), ("+tied", False), ("-tied", True)])
def test_exact_rows_backward(case, causal):
    """Rows whose lse2 = m + log2(l) rounds to m in fp32 (|lse2| past EXACT_ROW_LSE2): rows of one huge additive
    mask value on every key (uniform softmax) and fp32 logits of +-1e8 tied over the keys. exp2(t - lse2) alone
    gives P = 1 instead of 1 / l there (before the fix: dq off by 17, dv by 2.7 here); the preprocess kernel recomputes
    those rows' m and l2 = log2(l) (additive masks and fp32 inputs: EXACT_ROWS)."""
    check_exact_rows("triton", case, causal, device=DEV)


@pytest.mark.parametrize("dtype", [F32, torch.float16], ids=str)
def test_logits_near_1e4_stay_finite(dtype):
    q, k, v = make_qkv(1, 2, 33, 47, 32, dtype=dtype, device=DEV, seed=11)
    s = torch.matmul(q.double(), k.double().transpose(-1, -2))
    scale = 1e4 / s.abs().max().item()  # the largest logit is 1e4 in magnitude
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = pyattn.scaled_dot_product_attention(q, k, v, scale=scale, backend="triton")
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref, _, ref_grads = attention_ref(q, k, v, scale=scale, dout=dout)
    assert bool(out.isfinite().all()) and all(bool(g.isfinite().all()) for g in grads)
    if dtype == F32:
        # Logits of size 1e4 carry fp32 rounding of 1e4 * 2^-24 ~ 6e-4 each, so P (and what depends on it)
        # has a relative error of that order instead of TESTING.md's 1e-5 (measured: 4e-4 of max|ref| for dv,
        # 3e-5 for dq / dk, 1e-5 for out): compare against 2e-3 of each tensor's largest reference value.
        for t, r in zip((out, *grads), (ref, *ref_grads)):
            torch.testing.assert_close(t.double(), r, atol=2e-3 * max(1.0, r.abs().max().item()), rtol=0)
    else:
        low, low_grads = attention_low(q, k, v, scale=scale, dout=dout)
        assert_attention_close(out, ref, low, 2)
        for g, r, lo in zip(grads, ref_grads, low_grads):
            assert_attention_close(g, r, lo, 3)


@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")  # the interpreter's numpy max
def test_nan_in_one_query_row_stays_in_that_row():
    q, k, v = make_qkv(1, 2, 37, 29, 16, device=DEV, seed=12)
    q[0, 1, 5] = math.nan
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = pyattn.scaled_dot_product_attention(q, k, v, backend="triton")
    nan_rows = out.isnan().any(-1)
    expect = torch.zeros_like(nan_rows)
    expect[0, 1, 5] = True
    assert torch.equal(nan_rows, expect) and bool(out[0, 1, 5].isnan().all())
    dout = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    ref, _, (rq, rk, rv) = attention_ref(q, k, v, dout=dout)
    assert_close_fp32(out, ref)  # NaN pattern included
    assert torch.equal(dq.isnan().any(-1), expect)  # dq: only that row
    assert_close_fp32(dq, rq, "bwd")
    assert_close_fp32(dk, rk, "bwd")  # head 1's dk/dv are NaN in the oracle too (sums over the NaN row)
    assert_close_fp32(dv, rv, "bwd")
    assert bool(dk[:, 0].isfinite().all()) and bool(dv[:, 0].isfinite().all())


# ---- dropout ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_keep_fraction_and_mask_properties(p):
    shape = (2, 2, 64, 96)
    keep = K.dropout_keep_mask(1234, 5678, shape, p, DEV)
    n = keep.numel()
    frac = keep.float().mean().item()
    assert abs(frac - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n), frac  # 5 sigma of a binomial
    per_head = keep.float().mean((-1, -2))
    assert bool((per_head - (1 - p)).abs().max() < 5 * math.sqrt(p * (1 - p) / (64 * 96)))
    assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0, 0], keep[1, 0])
    assert torch.equal(keep, K.dropout_keep_mask(1234, 5678, shape, p, DEV))  # a function of (seed, offset)
    assert not torch.equal(keep, K.dropout_keep_mask(1234, 5679, shape, p, DEV))
    assert not torch.equal(keep, K.dropout_keep_mask(1235, 5678, shape, p, DEV))


def test_dropout_deterministic_given_manual_seed():
    q, k, v = make_qkv(2, 4, 25, 31, 16, hkv=2, device=DEV, requires_grad=True, seed=13)

    def run(seed, grads=True):
        torch.manual_seed(seed)
        out = pyattn.scaled_dot_product_attention(q, k, v, dropout_p=0.3, enable_gqa=True, backend="triton")
        return (out, *torch.autograd.grad(out, (q, k, v), torch.ones_like(out))) if grads else (out.detach(),)

    first, second, other = run(7), run(7), run(8, grads=False)
    for a, b in zip(first, second):
        assert torch.equal(a, b)  # bitwise: forward and (atomic-free) backward
    assert not torch.equal(first[0], other[0])


DROPOUT_CASES = {
    "plain": dict(b=2, lq=29, lk=33),
    "causal-br-gqa": dict(causal=True, bottom_right=True, hkv=2, lq=45, lk=30),
    "mask-causal": dict(causal=True, mask="additive"),
    "bool-mask-mqa": dict(mask="bool", hkv=1),
}


@pytest.mark.parametrize("case", list(DROPOUT_CASES), ids=list(DROPOUT_CASES))
def test_dropout_forward_backward_consistent_with_keep_mask(case):
    """Kernel forward and backward (through autograd of the custom op, routed back to the triton backend) vs a
    float64 computation that uses the kernel's own keep-mask (dropout_keep_mask): fp32 policy."""
    c = DROPOUT_CASES[case]
    b, lq, lk, hq, hkv, p = c.get("b", 1), c.get("lq", 37), c.get("lk", 41), 4, c.get("hkv", 4), 0.25
    q, k, v = make_qkv(b, hq, lq, lk, 24, hkv=hkv, device=DEV, requires_grad=True, seed=14)
    g = torch.Generator().manual_seed(14)
    mask = None
    if c.get("mask") == "bool":
        mask = (torch.rand(b, 1, lq, lk, generator=g) > 0.2).to(DEV)
    elif c.get("mask") == "additive":
        mask = torch.randn(1, hq, lq, lk, generator=g).to(DEV)
    causal, br, scale = c.get("causal", False), c.get("bottom_right", False), 0.3
    seed, offset = 2**40 + 17, 3 * 2**33 + 5  # both past 2^32: the Philox counter and key are 64-bit
    rng = torch.tensor([seed, offset])
    out, lse, state = _attention_fwd(q, k, v, mask, p, causal, br, scale, rng, True, "triton")
    assert state[2].item() == list(pyattn.dispatch.registry._BACKENDS).index("triton")
    dout = torch.randn(out.shape, generator=g).to(DEV)
    grads = torch.autograd.grad(out, (q, k, v), dout)

    keep = K.dropout_keep_mask(seed, offset, (b, hq, lq, lk), p, DEV)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    with torch.enable_grad():
        kr, vr = (t.repeat_interleave(hq // hkv, 1) for t in (k64, v64))
        s = torch.matmul(q64, kr.transpose(-1, -2)) * scale
        if mask is not None:
            s = s.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else s + mask.double()
        if causal:
            s = s.masked_fill(~causal_keep(lq, lk, br, DEV), -math.inf)
        dead = (s == -math.inf).all(-1, keepdim=True)  # rows that see no key: P = 0 (no NaN in autograd)
        prob = torch.softmax(s.masked_fill(dead, 0.0), -1).masked_fill(dead, 0.0)
        ref = torch.matmul(prob * keep / (1 - p), vr)
        ref_grads = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    assert 0.6 < keep.float().mean().item() < 0.9
    assert_close_fp32(out, ref, "fwd")
    for name, a, r in zip("qkv", grads, ref_grads):
        assert_close_fp32(a, r, "bwd", msg=lambda m, name=name: f"d{name}: " + m)


# ---- split-KV forward (decoding) -----------------------------------------------------------------------------------


@pytest.fixture
def split_kv(monkeypatch):
    """Lets small shapes take attn_fwd's split-KV path (kernels.attention.SPLIT_KV_*) and records the number of
    splits of each call that takes it."""
    monkeypatch.setattr(K, "SPLIT_KV_MIN_KEYS", 1)
    monkeypatch.setattr(K, "SPLIT_KV_MIN_CHUNK", 16)
    splits, real = [], K._attn_fwd_split_kv

    def spy(q, k, v, *args):
        splits.append(K._split_kv_shape(q.shape[0], k.shape[1], k.shape[2], q.device, 16)[0])
        return real(q, k, v, *args)

    monkeypatch.setattr(K, "_attn_fwd_split_kv", spy)
    return splits


# (B, Hq, Hkv, Lq, Lk, D, Dv): GQA groups of 4, 4 and 2 query heads packed with 1-3 query rows, odd lengths and head
# dims, D != Dv, one split with a single key block
DECODE_CASES = [(1, 8, 2, 1, 100, 64, 64), (2, 4, 1, 2, 77, 40, 24), (1, 6, 3, 3, 129, 16, 16), (1, 2, 1, 1, 5, 32, 32)]


@pytest.mark.parametrize("case", DECODE_CASES, ids=["gqa4-1row", "mqa-2rows", "gqa2-3rows", "5keys"])
@pytest.mark.parametrize("causal,bottom_right", [(False, False), (True, True), (True, False)],
                         ids=["full", "causal-bottom-right", "causal-top-left"])
def test_split_kv_forward(split_kv, case, causal, bottom_right):
    """A few query rows against many keys (decoding) take the split-KV forward (a kv head's query group in one
    program, the keys in splits, a combining kernel): out, lse and the grads (the regular backward on its out and
    lse) against the float64 oracle. Top-left causal leaves the later splits of a one-row query nothing to see."""
    b, hq, hkv, lq, lk, d, dv = case
    layout = "blhd" if bottom_right else "contiguous"
    q, k, v = make_qkv(b, hq, lq, lk, d, hkv=hkv, dv=dv, device=DEV, layout=layout, requires_grad=True, seed=lk + d)
    check_fp32(q, k, v, causal=causal, bottom_right=bottom_right)
    assert split_kv and (lk < 32 or max(split_kv) > 1), split_kv


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_split_kv_forward_half(split_kv, dtype):
    q, k, v = make_qkv(2, 8, 1, 97, 64, hkv=2, dtype=dtype, device=DEV, requires_grad=True, seed=3)
    out = triton_attention(q, k, v)
    ref, _ = attention_ref(q, k, v)
    low = attention_low(q, k, v)
    assert out.dtype == dtype and max(split_kv) > 1
    assert_attention_close(out, ref, low, 2)


@_DROPPED_ROW_WARNINGS[0]
@pytest.mark.parametrize("kind", ["key-padding", "additive-per-head", "bool-per-row-dead"])
def test_split_kv_forward_masks(split_kv, kind):
    """Masks in the split-KV forward (a gather per (q head, query) row): a bool key-padding mask (B, 1, 1, Lk), an
    additive mask per head and query with -inf entries (and a finfo.min row: each split keeps its max and sum
    apart, since m + log2(l) loses log2(l) at |m| ~ 3e38), and a bool mask hiding every key from some
    rows (out 0, lse +inf, zero grads) and all but the first split's keys from others."""
    b, hq, hkv, lq, lk, d = 2, 6, 2, 2, 90, 32
    q, k, v = make_qkv(b, hq, lq, lk, d, hkv=hkv, device=DEV, requires_grad=True, seed=lk)
    g = torch.Generator().manual_seed(9)
    if kind == "key-padding":
        mask = key_padding_mask([lk, 37], lk, device=DEV)
    elif kind == "additive-per-head":
        mask = torch.randn(1, hq, lq, lk, generator=g).to(DEV)
        mask[0, 1, 0, 10:] = float("-inf")
        # a row of finfo.min everywhere (uniform softmax; its backward recomputes the row's statistics)
        huge = mask.clone()
        huge[0, 2, 1, :] = torch.finfo(torch.float32).min
        check_fp32(q, k, v, mask=huge)
        out, lse = _attention_fwd(q, k, v, huge, 0.0, False, False, d ** -0.5, None, False, "triton")[:2]
        with pytest.MonkeyPatch.context() as mp:  # lse as the regular forward's (which clamps the mask to -2e38)
            mp.setattr(K, "SPLIT_KV_MIN_KEYS", 10**9)
            assert_close_fp32(lse, _attention_fwd(q, k, v, huge, 0.0, False, False, d ** -0.5, None, False,
                                                  "triton")[1], "fwd")
    else:
        mask = torch.rand(b, hq, lq, lk, generator=g).to(DEV) > 0.3
        mask[0, 3, 1, :] = False
        mask[1, 0, 0, 20:] = False
    check_fp32(q, k, v, mask=mask)
    assert split_kv and max(split_kv) > 1


def test_split_kv_not_taken_with_dropout_or_big_groups(split_kv, monkeypatch):
    """The split path takes no dropout, nor query groups larger than SPLIT_KV_MAX_ROWS rows; nor fewer keys than
    SPLIT_KV_MIN_KEYS (the regular forward is faster there)."""
    q, k, v = make_qkv(1, 4, 2, 40, 16, hkv=2, device=DEV, seed=5)
    triton_attention(q, k, v, dropout_p=0.3)
    monkeypatch.setattr(K, "SPLIT_KV_MAX_ROWS", 3)
    triton_attention(q, k, v)
    assert split_kv == []
    monkeypatch.setattr(K, "SPLIT_KV_MAX_ROWS", 4)
    triton_attention(q, k, v)
    monkeypatch.setattr(K, "SPLIT_KV_MIN_KEYS", 41)
    triton_attention(q, k, v)
    assert len(split_kv) == 1
    # fp32 on a GPU keeps the regular forward (the split kernel's fp32 tiles spill); the interpreter takes it
    monkeypatch.setattr(K, "SPLIT_KV_MIN_KEYS", 1)
    assert K._takes_split_kv(q, 2, 40, 0.0)
    monkeypatch.setattr(K, "_interpreting", lambda: False)
    assert not K._takes_split_kv(q, 2, 40, 0.0) and K._takes_split_kv(q.half(), 2, 40, 0.0)


# ---- fp16 / bf16: TESTING.md's 2x / 3x rule against `low` -------------------------------------------------------

HALF_CASES = [dict(lq=65, lk=97, d=64), dict(lq=113, lk=113, d=40, causal=True),
              dict(lq=33, lk=47, d=80, hkv=1, causal=True, bottom_right=True)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", range(len(HALF_CASES)), ids=["full", "causal", "mqa-bottom-right"])
def test_half_precision_rule(dtype, case):
    c = HALF_CASES[case]
    causal, br = c.get("causal", False), c.get("bottom_right", False)
    layout = "blhd" if br else "contiguous"
    q, k, v = make_qkv(1, 2, c["lq"], c["lk"], c["d"], hkv=c.get("hkv", 2), dtype=dtype, device=DEV, layout=layout,
                       requires_grad=True, seed=case)
    out = triton_attention(q, k, v, causal=causal, bottom_right=br)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(case)).to(dtype).to(DEV)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref, _, ref_grads = attention_ref(q, k, v, causal=causal, bottom_right=br, dout=dout)
    low, low_grads = attention_low(q, k, v, causal=causal, bottom_right=br, dout=dout)
    assert out.dtype == dtype
    assert_attention_close(out, ref, low, 2)
    for name, g, r, lo in zip("qkv", grads, ref_grads, low_grads):
        assert g.dtype == dtype
        assert_attention_close(g, r, lo, 3, name=f"d{name}")


# ---- layouts, no hidden copies, NaN padding ---------------------------------------------------------------------


def test_layouts_bit_identical_and_no_copies(monkeypatch):
    seen = []
    real = K.attn_fwd

    def spy(q, k, v, *args):
        seen.append(tuple(t.untyped_storage().data_ptr() for t in (q, k, v)))
        return real(q, k, v, *args)

    monkeypatch.setattr(K, "attn_fwd", spy)

    def run(layout):
        q, k, v = make_qkv(2, 4, 29, 29, 24, hkv=2, device=DEV, layout=layout, requires_grad=True, seed=15)
        out = pyattn.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, backend="triton")
        grads = torch.autograd.grad(out, (q, k, v), torch.linspace(-1, 1, out.numel()).view(out.shape).to(DEV))
        return (q, k, v), (out, *grads)

    _, base = run("contiguous")
    for layout in ("blhd", "packed", "nan_padded", "strided"):
        (q, k, v), res = run(layout)
        for a, b in zip(res, base):
            assert torch.equal(a, b), layout  # same values -> bit-identical results (no NaN read past the end)
        if layout != "strided":  # strided last dims are copied by the op (kernels need unit stride)
            assert seen[-1] == tuple(t.untyped_storage().data_ptr() for t in (q, k, v)), layout
    q, k, v = make_qkv(2, 4, 29, 29, 24, hkv=2, device=DEV, layout="expanded", requires_grad=True, seed=15)
    assert k.stride(0) == 0
    check_fp32(q, k, v, causal=True)
    assert seen[-1][1] == k.untyped_storage().data_ptr()  # the stride-0 batch was not materialised


def test_nan_padded_mask_bit_identical():
    q, k, v = make_qkv(2, 2, 19, 37, 16, device=DEV, seed=16)
    mask = torch.randn(2, 1, 19, 37, generator=torch.Generator().manual_seed(16)).to(DEV)
    padded = torch.full((2, 1, 23, 45), math.nan, device=DEV)
    padded[:, :, :19, :37] = mask
    a = pyattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend="triton")
    b = pyattn.scaled_dot_product_attention(q, k, v, attn_mask=padded[:, :, :19, :37], backend="triton")
    assert torch.equal(a, b)


def test_empty_inputs_do_not_launch(monkeypatch):
    def boom(*a, **kw):
        raise AssertionError("a kernel was launched for an empty problem")

    monkeypatch.setattr(K, "attn_fwd", boom)
    monkeypatch.setattr(K, "attn_bwd", boom)
    for b, lq, lk in ((0, 5, 7), (2, 0, 7), (2, 5, 0)):
        q, k, v = make_qkv(b, 2, lq, lk, 8, device=DEV, requires_grad=True)
        out = pyattn.scaled_dot_product_attention(q, k, v, backend="triton")
        assert out.shape == (b, 2, lq, 8) and bool((out == 0).all())
        grads = torch.autograd.grad(out.sum(), (q, k, v), allow_unused=True)
        assert all(g is None or bool((g == 0).all()) for g in grads)
    # the launchers themselves also return without a launch
    q, k, v = make_qkv(2, 2, 5, 0, 8, device=DEV)
    monkeypatch.undo()
    out, lse = K.attn_fwd(q, k, v, None, 0.0, False, False, 0.5, 0, 0)
    assert bool((out == 0).all()) and bool((lse == math.inf).all())


def test_refusals_have_reasons():
    q, k, v = make_qkv(1, 2, 5, 7, 264, device=DEV)
    with pytest.raises(BackendNotSupported, match="head dim 264 > 256"):
        pyattn.scaled_dot_product_attention(q, k, v, backend="triton")
    q, k, v = make_qkv(1, 2, 5, 7, 8, dtype=F64, device=DEV)
    with pytest.raises(BackendNotSupported, match="dtype float64 not supported"):
        pyattn.scaled_dot_product_attention(q, k, v, backend="triton")
    # D = 256 is accepted (forward only here: the interpreter is slow)
    q, k, v = make_qkv(1, 1, 5, 7, 256, device=DEV)
    assert_close_fp32(pyattn.scaled_dot_product_attention(q, k, v, backend="triton"), attention_ref(q, k, v)[0])


def test_unequal_interpreter_blocks(monkeypatch):
    # BLOCK_M < BLOCK_N (the GPU tables have both orders): causal skipping and diagonal blocks still exact.
    monkeypatch.setattr(K, "INTERPRET_CONFIG", {"BLOCK_M": 16, "BLOCK_N": 32})
    for br in (False, True):
        q, k, v = make_qkv(1, 2, 50, 37, 16, device=DEV, layout="blhd", requires_grad=True, seed=17)
        check_fp32(q, k, v, causal=True, bottom_right=br)


# ---- custom ops, torch.compile ---------------------------------------------------------------------------------


def test_opcheck_with_triton_backend():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 8, generator=g).to(DEV).requires_grad_()
    k = torch.randn(2, 2, 7, 8, generator=g).to(DEV).requires_grad_()
    v = torch.randn(2, 2, 7, 6, generator=g).to(DEV).requires_grad_()
    bool_mask = (torch.rand(2, 1, 5, 7, generator=g) > 0.3).to(DEV)
    # One sample with everything (GQA, Dv != D, bool mask, bottom-right causal, dropout): opcheck runs the op
    # many times and the interpreter is slow.
    samples = [(q, k, v, bool_mask, 0.2, True, True, 0.3, torch.tensor([3, 4]), True, "triton")]
    for args in samples:
        torch.library.opcheck(_attention_fwd.op, args)
        out, lse, state = _attention_fwd(*args)
        qq, kk, vv = (t.detach() for t in args[:3])
        torch.library.opcheck(
            _attention_bwd.op,
            (torch.randn(out.shape, generator=g).to(DEV), qq, kk, vv, out.detach(), lse, *args[3:8], state, "triton"),
        )


def test_torch_compile_fullgraph_aot_eager():
    q, k, v = make_qkv(1, 4, 19, 23, 16, hkv=2, device=DEV, requires_grad=True, seed=18)

    def fn(q, k, v):
        return pyattn.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, backend="triton")

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref = fn(q, k, v)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    assert torch.equal(out, ref)
    for a, b in zip(grads, ref_grads):
        assert torch.equal(a, b)


# ---- autotune tables vs the compile check -----------------------------------------------------------------------


def test_every_selectable_config_is_compile_checked():
    """Whatever the GPU launcher can pick (per arch, dtype width, head-dim bucket, heavy or not, after pruning by
    the bucketed lengths) is among the configurations scripts/compile_triton.py compiles (compile_configs()) for
    that arch."""
    names = {"fwd": "_attn_fwd_kernel", "dq": "_attn_bwd_dq_kernel", "dkdv": "_attn_bwd_dkdv_kernel"}
    checked = set()
    for fn, _, c, warps, *options in K.compile_configs():
        if fn.__name__ in names.values():  # the autotuned kernels
            for arch in options[0]["archs"]:
                checked.add((arch, fn.__name__, c["BLOCK_M"], c["BLOCK_N"], warps, options[0]["num_stages"],
                             options[0].get("maxnreg")))
    for arch in (80, 90):
        for kind in names:
            for bits in ("16", "32"):
                for d_bucket in (64, 128, 256):
                    for heavy in (False, True):
                        for lq, lk in ((1, 1), (16, 4096), (300, 17), (2**20, 2**20)):
                            tuner = K._autotuned(kind, arch, bits, d_bucket, heavy, K._len_bucket(lq),
                                                 K._len_bucket(lk), True)
                            assert tuner.configs, (kind, arch, bits, d_bucket, heavy, lq, lk)
                            for cfg in tuner.configs:
                                key = (arch, names[kind], cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"],
                                       cfg.num_warps, cfg.num_stages, cfg.maxnreg)
                                assert key in checked, key
    assert K._d_bucket(16, 16) == 64 and K._d_bucket(128, 64) == 128 and K._d_bucket(16, 256) == 256


# The forward's first fp32 and bf16 configurations of compile_configs(), compiled for sm_90a as on a GPU (no
# interpreter) -> how many mul.rn.f32 their PTX has.
_LOGITS_PTX = r"""
import os, sys
sys.path[:0] = [sys.argv[1], os.path.join(sys.argv[1], "scripts")]
import compile_triton as C  # (drops TRITON_INTERPRET: compiles for real)
import triton
from triton.backends.compiler import GPUTarget
import kernels.attention as K
for dt in ("*fp32", "*bf16"):
    fn, sig, consts, warps, *_ = cfg = next(c for c in K.compile_configs()
                                            if c[0].__name__ == "_attn_fwd_kernel" and c[1]["Q"] == dt)
    opts = dict(C._options(cfg), num_warps=warps)
    opts.pop("archs", None)
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=C._attrs(fn, sig, True))
    print(dt, triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts).asm["ptx"].count("mul.rn.f32"))
"""


def test_fp32_logits_are_rounded_before_the_softmax_in_gpu_code():
    """On a GPU the compiler fused t = (q k^T) * qk_scale into the softmax's t - m (one FMA: the unrounded product
    minus the rounded max), which broke fp32 rows of tied logits on the H200 (check_exact_rows "+tied"); the
    interpreter does not fuse, so this checks the compiled code: the fp32 forward rounds its logits with mul.rn.f32
    (kernels/attention.py _logits), the bf16 forward keeps the fused form."""
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, "-c", _LOGITS_PTX, repo], env=env, capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    counts = dict(line.split() for line in p.stdout.splitlines())
    assert int(counts["*fp32"]) > 0 and int(counts["*bf16"]) == 0, counts


def test_gpu_launch_path_through_the_autotuner(monkeypatch):
    """The launchers' GPU branch (bucketed key -> pruned config list -> triton.autotune -> grid from META), run
    under the interpreter with one configuration per list (a single-config autotuner does not benchmark) and
    fp32 inputs (UPCAST is off on that branch)."""
    one = {key: [(16, 32, 4, 1, 255)] for key in K._F32}  # maxnreg: the fifth field reaches triton.Config
    monkeypatch.setattr(K, "_F32", one)
    monkeypatch.setattr(K, "_interpreting", lambda: False)
    monkeypatch.setattr(K, "_arch", lambda device: 90)
    K._autotuned.cache_clear()
    try:
        q, k, v = make_qkv(1, 4, 23, 37, 16, hkv=2, device=DEV, requires_grad=True, seed=19)
        check_fp32(q, k, v, causal=True)
        assert K._autotuned.cache_info().currsize == 3  # fwd, dkdv, dq went through autotuners
        assert K._autotuned("fwd", 90, "32", 64, False, 16, 16, True).configs[0].maxnreg == 255
    finally:
        K._autotuned.cache_clear()


@pytest.mark.parametrize("layout", ["contiguous", "blhd", "packed", "lbhd"])
def test_output_allocation_follows_the_op_layout_rule(layout):
    """The Triton wrapper allocates outputs and grads in the layout the op promises (_layout_strides), so the op
    never copies them: the same rule as the C++ bindings (tests/test_cpp_attention.py test_op_outputs_need_no_copy)."""
    from pyattn.ops.attention import _layout_strides

    if layout == "lbhd":  # torch.nn.MultiheadAttention's heads: (L, B, H, D) memory
        q = torch.randn(40, 2, 4, 16).permute(1, 2, 0, 3)
    else:
        q = make_qkv(2, 4, 40, 40, 16, layout=layout, seed=22)[0]
    for shape in (q.shape, (2, 4, 40, 24)):
        assert K._new_like(q, shape).stride() == _layout_strides(q, shape)
