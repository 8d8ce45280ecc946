"""The C++ CPU attention kernels (csrc/cpu/attention.cpp through torch.ops.pyattn.attn_fwd / attn_bwd), forced with
backend="cpp" through the public functions, against the float64 oracle (the torch backend in float64,
pyattn.testing.attention_ref): the suites of tests/test_triton_attention.py, adapted to this kernel.

The kernel tiles queries in blocks of BM = 64 (QV * NB lanes with AVX-512) and keys in blocks of BN = 64, and its
backward splits the key blocks of a (batch, kv head) into chunks when B * Hkv is small. It is fast, so shapes cross
those blocks (lengths 1, 2, 63, 64, 65, 127, 128, 129, 200, 257, 1000; Lq != Lk both ways) and head dims go from 1
to 300 (no head-dim limit), D != Dv.
Tolerances: TESTING.md's policy (fp32: assert_close_fp32; fp16/bf16: assert_attention_close, 2x forward / 3x
backward the error of ``attention_low``), unless a test's comment says why it needs more.
"""
import math
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import pyattn
from pyattn.backends.torch import causal_keep
from pyattn.dispatch import BackendNotSupported, get_backend
from pyattn.ops.attention import _attention_bwd, _attention_fwd, make_inputs
from pyattn.testing import (assert_attention_close, assert_close_fp32, attention_low, attention_ref,
                            check_exact_rows, key_padding_mask, make_qkv)


def _cpp_reason():
    ok, why = get_backend("cpp").availability()
    if not ok:
        return why
    from pyattn.backends._native import has_kernel

    if not hasattr(torch.ops.pyattn, "attn_fwd") or not has_kernel("attn_fwd", "CPU"):
        return "pyattn._C was built without the attention kernels (torch.ops.pyattn.attn_fwd)"
    return None


if _cpp_reason() is not None:
    pytest.skip(f"cpp backend unavailable: {_cpp_reason()}", allow_module_level=True)

from pyattn.backends import cpp as C  # noqa: E402  (needs pyattn._C)

F32, F64, F16, BF16 = torch.float32, torch.float64, torch.float16, torch.bfloat16
FMIN = torch.finfo(torch.float32).min


# ---- helpers -----------------------------------------------------------------------------------------------


def cpp_attention(q, k, v, mask=None, causal=False, bottom_right=False, dropout_p=0.0, lse=False, scale=None):
    """(B, H, L, D) views in, (B, H, Lq, Dv) out, through a public function with backend="cpp": flash_attn_func
    for bottom-right causal (its convention), scaled_dot_product_attention otherwise."""
    if bottom_right:
        assert mask is None
        res = pyattn.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p,
                                     softmax_scale=scale, causal=causal, return_lse=lse, backend="cpp")
        return (res[0].transpose(1, 2), res[1]) if lse else res.transpose(1, 2)
    return pyattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal,
                                               scale=scale, enable_gqa=q.shape[1] != k.shape[1], backend="cpp")


def _mask4(mask):
    return None if mask is None else mask[(None,) * (4 - mask.dim())]


def _dout(shape, seed, dtype=F32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def check_fp32(q, k, v, mask=None, causal=False, bottom_right=False, seed=0):
    """Forward (and lse for flash_attn_func) and the three grads vs the float64 oracle, fp32 policy."""
    res = cpp_attention(q, k, v, mask, causal, bottom_right, lse=bottom_right)
    out, lse = res if bottom_right else (res, None)
    dout = _dout(out.shape, seed)
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


class _Spy:
    """Records the storage pointers of (q, k, v) reaching CppBackend.attention_fwd and counts fwd / bwd calls."""

    def __init__(self, monkeypatch):
        self.fwd_ptrs, self.bwd_calls = [], 0
        real_fwd, real_bwd = C.CppBackend.attention_fwd, C.CppBackend.attention_bwd

        def fwd(be, q, k, v, *args):
            self.fwd_ptrs.append(tuple(t.untyped_storage().data_ptr() for t in (q, k, v)))
            return real_fwd(be, q, k, v, *args)

        def bwd(be, *args):
            self.bwd_calls += 1
            return real_bwd(be, *args)

        monkeypatch.setattr(C.CppBackend, "attention_fwd", fwd)
        monkeypatch.setattr(C.CppBackend, "attention_bwd", bwd)


# ---- odd lengths crossing BM = BN = 64, cross pairs, head dims 1..300, D != Dv (fp32) ---------------------------

# ((Lq, Lk), D, Dv): every length of the brief and every head dim 1..300 appears; Dv != D in half the cases.
CASES = [((1, 1), 1, 1), ((2, 2), 3, 5), ((63, 63), 16, 16), ((64, 64), 59, 33), ((65, 65), 64, 64),
         ((127, 127), 80, 80), ((128, 128), 128, 64), ((129, 129), 130, 130), ((200, 200), 256, 256),
         ((257, 257), 300, 17), ((1, 257), 64, 64), ((257, 1), 64, 48), ((63, 129), 59, 59), ((129, 63), 16, 80),
         ((200, 65), 128, 128), ((65, 200), 80, 3), ((2, 128), 3, 3), ((128, 2), 1, 7), ((64, 127), 256, 130)]
MODES = {"full": (False, False), "causal-tl": (True, False), "causal-br": (True, True)}
_LEN_PARAMS = [pytest.param(c, m, id=f"{c[0][0]}x{c[0][1]}-d{c[1]}-dv{c[2]}-{m}")
               for c in CASES for m in MODES if not (m == "causal-br" and c[0][0] == c[0][1])]  # br == tl there


@pytest.mark.parametrize("case,mode", _LEN_PARAMS)
def test_lengths_and_head_dims(case, mode):
    (lq, lk), d, dv = case
    causal, br = MODES[mode]
    q, k, v = make_qkv(1, 2, lq, lk, d, dv=dv, layout="blhd" if br else "contiguous", requires_grad=True,
                       seed=lq * 7 + lk + d)
    out, _ = check_fp32(q, k, v, causal=causal, bottom_right=br)
    assert out.shape == (1, 2, lq, dv)


@pytest.mark.parametrize("lq,lk,hkv", [(70, 200, 2), (200, 70, 1), (129, 129, 4), (257, 65, 2), (1, 130, 1)])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_flash_attn_func_bottom_right_gqa(lq, lk, hkv, causal):
    # (B, L, H, D) memory (blhd views), bottom-right causal when Lq != Lk, GQA / MQA by fewer kv heads, lse returned.
    q, k, v = make_qkv(2, 4, lq, lk, 32, hkv=hkv, layout="blhd", requires_grad=True, seed=lq + lk)
    check_fp32(q, k, v, causal=causal, bottom_right=True)


@pytest.mark.parametrize("hkv", [2, 1], ids=["gqa", "mqa"])
@pytest.mark.parametrize("lq,lk", [(129, 200), (200, 129)])
def test_sdpa_gqa_top_left_causal(hkv, lq, lk):
    q, k, v = make_qkv(2, 4, lq, lk, 16, dv=24, hkv=hkv, requires_grad=True, seed=hkv)
    check_fp32(q, k, v, causal=True)


def test_sdpa_mqa_by_broadcast_heads_and_batch_dims():
    # torch-style inputs: 5-D with a broadcast batch dim and k/v with one head (MQA through broadcasting).
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 3, 4, 65, 16, generator=g).requires_grad_()
    k = torch.randn(1, 3, 1, 130, 16, generator=g).requires_grad_()
    v = torch.randn(2, 1, 1, 130, 8, generator=g).requires_grad_()
    out = pyattn.scaled_dot_product_attention(q, k, v, is_causal=True, backend="cpp")
    dout = _dout(out.shape, 4)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    qq, kk, vv = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True)
    ref_grads = torch.autograd.grad(ref, (qq, kk, vv), dout.double())
    assert out.shape == (2, 3, 4, 65, 8)
    assert_close_fp32(out, ref)
    for g_, r in zip(grads, ref_grads):
        assert_close_fp32(g_, r, "bwd")


@pytest.mark.parametrize("hq,hkv,lq,lk,causal", [(1, 1, 70, 1000, False), (2, 1, 70, 1000, True),
                                                  (4, 1, 129, 1000, False), (1, 1, 1000, 1000, True)],
                         ids=["mha", "gqa-causal", "mqa", "square-causal"])
def test_backward_key_chunking(hq, hkv, lq, lk, causal):
    # B * Hkv = 1 and Lk = 1000 (16 key blocks): the backward splits the key blocks of the one (batch, kv head)
    # into chunks with separate dQ partials, summed at the end.
    q, k, v = make_qkv(1, hq, lq, lk, 40, dv=24, hkv=hkv, requires_grad=True, seed=lq + hq)
    check_fp32(q, k, v, causal=causal)


# ---- masks -------------------------------------------------------------------------------------------------------

MB, MH, MLQ, MLK = 2, 3, 70, 130  # the mask tests' sizes: query and key lengths cross the 64 blocks
# Every combination of broadcast dims of a 4-D mask (1 = broadcast), then lower-rank and key-padding shapes.
MASK_SHAPES = [(b, h, i, j) for b in (1, MB) for h in (1, MH) for i in (1, MLQ) for j in (1, MLK)]
MASK_SHAPES += [(MLK,), (MLQ, MLK), (MH, 1, MLK), "key_padding"]


def _random_mask(shape, kind, seed):
    g = torch.Generator().manual_seed(seed)
    if shape == "key_padding":  # (B, 1, 1, Lk): keys past each batch's length are padding
        keep = key_padding_mask([MLK, 67], MLK)
    else:
        keep = torch.rand(shape, generator=g) > (0.3 if shape[-1] > 1 else 0.2)
    if kind == "bool":
        return keep
    return torch.randn(keep.shape, generator=g).masked_fill(~keep, -math.inf)  # additive, -inf where dropped


@pytest.mark.parametrize("shape", MASK_SHAPES, ids=lambda s: "x".join(map(str, s)) if isinstance(s, tuple) else s)
@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_masks_broadcast(shape, kind):
    q, k, v = make_qkv(MB, MH, MLQ, MLK, 16, requires_grad=True, seed=3)
    mask = _random_mask(shape, kind, seed=len(str(shape)))
    check_fp32(q, k, v, mask=mask)


def test_mask_broadcast_is_not_copied(monkeypatch):
    # A (1, 1, Lq, Lk) mask expanded to (B, H, Lq, Lk) (stride 0) reaches the kernel as the same storage.
    q, k, v = make_qkv(MB, MH, MLQ, MLK, 16, seed=3)
    base = _random_mask((1, 1, MLQ, MLK), "additive", seed=1)
    spy_ptrs = []
    real_fwd = C.CppBackend.attention_fwd

    def fwd(be, q, k, v, mask, *args):
        spy_ptrs.append((mask.untyped_storage().data_ptr(), tuple(mask.shape)))
        return real_fwd(be, q, k, v, mask, *args)

    monkeypatch.setattr(C.CppBackend, "attention_fwd", fwd)
    a = pyattn.scaled_dot_product_attention(q, k, v, attn_mask=base.expand(MB, MH, MLQ, MLK), backend="cpp")
    assert spy_ptrs[-1] == (base.untyped_storage().data_ptr(), (1, 1, MLQ, MLK))
    b = pyattn.scaled_dot_product_attention(q, k, v, attn_mask=base.expand(MB, MH, MLQ, MLK).contiguous(),
                                            backend="cpp")
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype,mask_dtype", [(BF16, BF16), (F16, F16), (BF16, F32), (F16, F32)], ids=str)
def test_additive_mask_in_half_dtype_and_causal_with_mask(dtype, mask_dtype):
    # The op takes a mask and causal together (the public functions do not); bottom-right, GQA, additive masks in
    # q's half dtype or float32, with -inf entries; forward (+ lse) and backward through the custom op's autograd.
    q, k, v = make_qkv(2, 4, 70, 130, 24, hkv=2, dtype=dtype, requires_grad=True, seed=5)
    g = torch.Generator().manual_seed(5)
    mask = torch.randn(2, 1, 70, 130, generator=g).masked_fill(torch.rand(2, 1, 70, 130, generator=g) < 0.2,
                                                                 -math.inf).to(mask_dtype)
    scale = 24 ** -0.5
    out, lse, state = _attention_fwd(q, k, v, mask, 0.0, True, True, scale, None, True, "cpp")
    assert state[2].item() == list(pyattn.dispatch.registry._BACKENDS).index("cpp")
    dout = _dout(out.shape, 5, dtype)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref, ref_lse, ref_grads = attention_ref(q, k, v, mask, causal=True, bottom_right=True, scale=scale, dout=dout)
    low, low_grads = attention_low(q, k, v, mask.to(dtype), causal=True, bottom_right=True, scale=scale, dout=dout)
    assert out.dtype == dtype
    assert_attention_close(out, ref, low, 2)
    assert_close_fp32(lse, ref_lse, "fwd")  # lse is fp32 math on half-exact inputs
    for name, gr, r, lo in zip("qkv", grads, ref_grads, low_grads):
        assert gr.dtype == dtype
        assert_attention_close(gr, r, lo, 3, name=f"d{name}")


@pytest.mark.parametrize("case", ["fp32-129", "fp32-padded-gqa", "bf16-causal-br", "fp16-f32mask-batch"])
def test_backward_mask_tiles_bit_identical(monkeypatch, case):
    # The backward converts an additive mask stored one row per query and shared by heads or batches into tiles
    # once per call (MaskTiles, csrc/cpu/attention.cpp); PYATTN_CPU_MASK_TILE_BYTES=0 makes it read the mask in
    # place, as the forward does. Both must give the same bits: the tiles hold the values apply_masks merges. Cases:
    # a last query block of one row (Lq = 129), +-inf / finfo.min / 1e38 / -1e30 entries (the log2 clamp), a mask
    # with padded rows (row stride 140, NaN past Lk), GQA, half masks, causal with a mask, a mask shared by batches.
    g = torch.Generator().manual_seed(31)
    dtype, mask_dtype, causal = F32, F32, False
    if case == "fp32-129":
        q, k, v = make_qkv(1, 3, 129, 130, 16, requires_grad=True, seed=31)
        mask = torch.randn(1, 1, 129, 130, generator=g)
    elif case == "fp32-padded-gqa":
        q, k, v = make_qkv(2, 4, 70, 130, 24, hkv=2, requires_grad=True, seed=32)
        mask = torch.full((2, 1, 70, 140), math.nan)[..., :130]
        mask.copy_(torch.randn(2, 1, 70, 130, generator=g))
    elif case == "bf16-causal-br":
        dtype, mask_dtype, causal = BF16, BF16, True
        q, k, v = make_qkv(2, 4, 70, 130, 24, hkv=2, dtype=dtype, requires_grad=True, seed=33)
        mask = torch.randn(2, 1, 70, 130, generator=g)
    else:
        dtype = F16
        q, k, v = make_qkv(3, 2, 65, 200, 16, dtype=dtype, requires_grad=True, seed=34)
        mask = torch.randn(1, 2, 65, 200, generator=g)
    flat = mask.select(0, 0).select(0, 0)
    flat[3, 5], flat[4, 7], flat[5, 9], flat[6, 11], flat[7, :] = -math.inf, FMIN, 1e38, -1e30, -1e30
    flat[8, ::3] = -math.inf
    mask = mask.to(mask_dtype)
    scale = q.shape[-1] ** -0.5
    dout = _dout((q.shape[0], q.shape[1], q.shape[2], v.shape[-1]), 31, dtype)

    def grads():
        out, _, _ = _attention_fwd(q, k, v, mask, 0.0, causal, causal, scale, None, True, "cpp")
        return torch.autograd.grad(out, (q, k, v), dout)

    tiled = grads()
    monkeypatch.setenv("PYATTN_CPU_MASK_TILE_BYTES", "0")
    in_place = grads()
    for name, a, b in zip("qkv", tiled, in_place):
        assert torch.equal(a, b), f"d{name} differs between the mask tiles and the mask read in place"
        assert not a.isnan().any(), f"d{name} has NaN"


def test_fully_masked_rows_give_zero_output_and_grads():
    q, k, v = make_qkv(2, 2, 70, 130, 16, requires_grad=True, seed=9)
    keep = torch.rand(2, 2, 70, 130, generator=torch.Generator().manual_seed(9)) > 0.3
    keep[0, 1, 3] = False
    keep[1, :, 69] = False  # the last row of the second query block
    keep[0, 0, 64] = False  # the first row of the second query block
    for mask in (keep, torch.zeros(keep.shape).masked_fill(~keep, -math.inf)):
        out, (dq, dk, dv) = check_fp32(q, k, v, mask=mask)
        for t in (out, dq):
            for row in (t[0, 1, 3], t[1, :, 69], t[0, 0, 64]):
                assert torch.equal(row, torch.zeros_like(row))
        _, lse = torch.ops.pyattn.attn_fwd(q.detach(), k.detach(), v.detach(), mask, 0.0, False, False, 0.25, 0, 0)
        dead = ~keep.any(-1)
        assert bool((lse[dead] == math.inf).all()) and bool(lse[~dead].isfinite().all())
    # a fully masked key column: its dk and dv are 0
    keep2 = keep.clone()
    keep2[:, :, :, 100] = False
    _, (dq, dk, dv) = check_fp32(q, k, v, mask=keep2)
    assert bool((dk[:, :, 100] == 0).all()) and bool((dv[:, :, 100] == 0).all())
    # bottom-right causal with Lq > Lk: the first Lq - Lk query rows see no key: out 0, lse +inf, dq 0
    q, k, v = make_qkv(1, 2, 200, 65, 16, layout="blhd", requires_grad=True, seed=10)
    out, lse = cpp_attention(q, k, v, causal=True, bottom_right=True, lse=True)
    (dq,) = torch.autograd.grad(out, (q,), torch.randn_like(out))
    assert torch.equal(out[:, :, :135], torch.zeros_like(out[:, :, :135]))
    assert torch.equal(dq[:, :, :135], torch.zeros_like(dq[:, :, :135]))
    assert bool((lse[:, :, :135] == math.inf).all()) and bool(lse[:, :, 135:].isfinite().all())


def _very_negative_case(whole_rows):
    """fp32 q, k, v and an additive mask where some rows have finfo(float32).min logits: whole rows (every key
    finfo.min, or finfo.min and -inf) or only part of a row (the rest ordinary values)."""
    q, k, v = make_qkv(1, 2, 70, 130, 16, requires_grad=True, seed=21)
    mask = torch.randn(1, 2, 70, 130, generator=torch.Generator().manual_seed(21))
    if whole_rows:
        mask[0, 0, 1] = FMIN  # every key finfo.min
        mask[0, 1, 66, :70] = FMIN  # finfo.min on the first key block and a bit more, -inf elsewhere
        mask[0, 1, 66, 70:] = -math.inf
    else:
        mask[0, 0, 1, :100] = FMIN  # finfo.min on most keys (both key blocks), ordinary values on the rest
        mask[0, 1, 66, 3::2] = FMIN
        mask[0, 1, 5, 64:] = -math.inf
        mask[0, 1, 5, :64] = FMIN
        mask[0, 1, 5, 10] = 0.0
    return q, k, v, mask


def _torch_sdpa_f64(q, k, v, mask, dout):
    """torch's own F.scaled_dot_product_attention in float64, math backend forced, with autograd: the oracle for
    rows of finfo.min logits. The math backend differentiates through softmax's output (uniform on such rows);
    torch's CPU flash backend, like any kernel that recomputes P = exp(s - lse), gets P = 1 instead of 1 / n there,
    because lse = finfo.min + log(n) rounds to finfo.min."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qq, kk, vv = (t.detach().double().requires_grad_() for t in (q, k, v))
    with sdpa_kernel([SDPBackend.MATH]):
        ref = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask.double())
    return ref, torch.autograd.grad(ref, (qq, kk, vv), dout.double())


def test_very_negative_mask_rows_give_uniform_softmax():
    # A row whose every logit is finfo(float32).min (+ small): torch's softmax is uniform over those keys (the
    # logits are equal after rounding), not 0. Compared with torch's own F.scaled_dot_product_attention in float64
    # (math backend), and with mean(v).
    q, k, v, mask = _very_negative_case(whole_rows=True)
    out = pyattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend="cpp")
    ref, _ = _torch_sdpa_f64(q, k, v, mask, torch.zeros(out.shape))
    assert_close_fp32(out, ref)
    assert_close_fp32(out[0, 0, 1], v[0, 0].double().mean(0))  # uniform over all 130 keys
    assert_close_fp32(out[0, 1, 66], v[0, 1, :70].double().mean(0))  # uniform over the finfo.min keys
    for dtype in (BF16, F16):  # half inputs with a float32 finfo.min mask
        qh, kh, vh = (t.detach().to(dtype) for t in (q, k, v))
        outh = pyattn.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, backend="cpp")
        refh, _ = _torch_sdpa_f64(qh, kh, vh, mask, torch.zeros(out.shape))
        lowh = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask)  # torch's math in the half dtype
        assert_attention_close(outh, refh, lowh, 2)


def test_very_negative_mask_partial_rows_fwd_bwd():
    # finfo.min on part of a row only: those keys get P = 0, the rest a normal softmax (both oracles agree here).
    q, k, v, mask = _very_negative_case(whole_rows=False)
    out, (dq, dk, dv) = check_fp32(q, k, v, mask=mask)
    ref, ref_grads = _torch_sdpa_f64(q, k, v, mask, _dout(out.shape, 0))
    assert_close_fp32(out, ref)
    for g_, r in zip((dq, dk, dv), ref_grads):
        assert_close_fp32(g_, r, "bwd")


@pytest.mark.parametrize("case,causal", [("finfo.min", True), ("-1e9", False), ("-1e9", True), ("-1e5", False),
                                         ("+tied", False), ("-tied", True)])
def test_exact_rows_backward(case, causal):
    """Rows whose lse2 = m + log2(l) rounds to m in fp32 (pyattn/attn_exact_rows.h): one huge additive mask value
    on every key (uniform softmax; before the limit moved from -1e30 to 2^14, -1e9 rows got P = 1: dq off by ~20) and
    fp32 logits of +-1e8 tied over the keys."""
    check_exact_rows("cpp", case, causal)


def test_very_negative_mask_rows_backward():
    q, k, v, mask = _very_negative_case(whole_rows=True)
    out = pyattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend="cpp")
    dout = _dout(out.shape, 22)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    _, ref_grads = _torch_sdpa_f64(q, k, v, mask, dout)
    for name, g_, r in zip("qkv", grads, ref_grads):
        assert_close_fp32(g_, r, "bwd", msg=lambda m, name=name: f"d{name}: " + m)
    # The lse of such a row is finfo.min + log(n), i.e. finfo.min in fp32. The kernel works in base 2, where
    # finfo.min * log2(e) is out of range and is clamped to -FLT_MAX: its lse comes out as -FLT_MAX * ln 2
    # (-2.36e38), still hugely negative (documented in csrc/cpu/attention.cpp, mask_log2).
    _, lse = torch.ops.pyattn.attn_fwd(q.detach(), k.detach(), v.detach(), mask, 0.0, False, False, 0.25, 0, 0)
    for val in (lse[0, 0, 1].item(), lse[0, 1, 66].item()):
        assert FMIN <= val <= FMIN * math.log(2) * 0.999, val


@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=str)
def test_logits_near_1e4_stay_finite(dtype):
    q, k, v = make_qkv(1, 2, 70, 130, 32, dtype=dtype, seed=11)
    s = torch.matmul(q.double(), k.double().transpose(-1, -2))
    scale = 1e4 / s.abs().max().item()  # the largest logit is 1e4 in magnitude
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = pyattn.scaled_dot_product_attention(q, k, v, scale=scale, backend="cpp")
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref, _, ref_grads = attention_ref(q, k, v, scale=scale, dout=dout)
    assert bool(out.isfinite().all()) and all(bool(g.isfinite().all()) for g in grads)
    if dtype == F32:
        # Logits of size 1e4 carry fp32 rounding of 1e4 * 2^-24 ~ 6e-4 each, so P (and what depends on it) has a
        # relative error of that order instead of TESTING.md's 1e-5: compare against 2e-3 of each tensor's largest
        # reference value (the Triton suite's budget for the same reason).
        for t, r in zip((out, *grads), (ref, *ref_grads)):
            torch.testing.assert_close(t.double(), r, atol=2e-3 * max(1.0, r.abs().max().item()), rtol=0)
    else:
        low, low_grads = attention_low(q, k, v, scale=scale, dout=dout)
        assert_attention_close(out, ref, low, 2)
        assert_attention_close(grads[2], ref_grads[2], low_grads[2], 3, name="dv")
        # dq and dk: the backward takes delta = rowsum(dO * O) from the stored output, rounded to fp16/bf16 (the
        # FlashAttention convention; there is no fp32 output to use). With logits of 1e4 the softmax is nearly
        # one-hot, so dS = P (dP - delta) cancels and the scale (~300 here) amplifies that rounding: dq/dk differ
        # from the float64 oracle by a relative RMS of ~0.1 (fp16) / ~0.03 (bf16), measured, while `low` is off
        # by ~10. Compare them with TESTING.md's rule against the float64 computation that uses that same rounded
        # output for delta (measured relative RMS ~8e-4).
        q64, k64, v64, do64 = (t.detach().double() for t in (q, k, v, dout))
        prob = torch.softmax(torch.matmul(q64, k64.transpose(-1, -2)) * scale, -1)
        ds = prob * (torch.matmul(do64, v64.transpose(-1, -2)) - (do64 * out.detach().double()).sum(-1, keepdim=True))
        model = (torch.matmul(ds, k64) * scale, torch.matmul(ds.transpose(-1, -2), q64) * scale)
        for name, g, r, lo in zip("qk", grads, model, low_grads):
            assert_attention_close(g, r, lo, 3, name=f"d{name}")


@pytest.mark.parametrize("row", [5, 64, 69], ids=lambda r: f"row{r}")
def test_nan_in_one_query_row_stays_in_that_row(row):
    q, k, v = make_qkv(1, 2, 70, 130, 16, seed=12)
    q[0, 1, row] = math.nan
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = pyattn.scaled_dot_product_attention(q, k, v, backend="cpp")
    nan_rows = out.isnan().any(-1)
    expect = torch.zeros_like(nan_rows)
    expect[0, 1, row] = True
    assert torch.equal(nan_rows, expect) and bool(out[0, 1, row].isnan().all())
    dout = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    ref, _, (rq, rk, rv) = attention_ref(q, k, v, dout=dout)
    assert_close_fp32(out, ref)  # NaN pattern included
    assert torch.equal(dq.isnan().any(-1), expect)  # dq: only that row
    assert_close_fp32(dq, rq, "bwd")
    assert_close_fp32(dk, rk, "bwd")  # head 1's dk/dv are NaN in the oracle too (sums over the NaN row)
    assert_close_fp32(dv, rv, "bwd")
    assert bool(dk[:, 0].isfinite().all()) and bool(dv[:, 0].isfinite().all())


# ---- dropout -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_keep_fraction_and_mask_properties(p):
    shape = (2, 2, 129, 200)
    keep = C.dropout_keep_mask(1234, 5678, shape, p)
    assert keep.dtype == torch.bool and keep.shape == shape
    n = keep.numel()
    frac = keep.float().mean().item()
    assert abs(frac - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n), frac  # 5 sigma of a binomial
    per_head = keep.float().mean((-1, -2))
    assert bool((per_head - (1 - p)).abs().max() < 5 * math.sqrt(p * (1 - p) / (129 * 200)))
    # rows and columns: neither whole rows nor whole columns share one decision
    per_row, per_col = keep.float().mean(-1), keep.float().mean(-2)
    assert bool((per_row - (1 - p)).abs().max() < 6 * math.sqrt(p * (1 - p) / 200) + 1e-9)
    assert bool((per_col - (1 - p)).abs().max() < 6 * math.sqrt(p * (1 - p) / 129) + 1e-9)
    assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0, 0], keep[1, 0])
    assert not torch.equal(keep[0, 0, 0], keep[0, 0, 1])
    assert torch.equal(keep, C.dropout_keep_mask(1234, 5678, shape, p))  # a function of (seed, offset)
    assert not torch.equal(keep, C.dropout_keep_mask(1234, 5679, shape, p))
    assert not torch.equal(keep, C.dropout_keep_mask(1235, 5678, shape, p))
    big = 2**40 + 17  # seeds past 2^32: the high bits matter
    assert not torch.equal(C.dropout_keep_mask(big, 5678, shape, p), C.dropout_keep_mask(big + 2**33, 5678, shape, p))
    assert not torch.equal(C.dropout_keep_mask(7, 2**35, shape, p), C.dropout_keep_mask(7, 2**36, shape, p))


def test_dropout_deterministic_given_manual_seed():
    q, k, v = make_qkv(2, 4, 129, 70, 16, hkv=2, requires_grad=True, seed=13)

    def run(seed, grads=True):
        torch.manual_seed(seed)
        out = pyattn.scaled_dot_product_attention(q, k, v, dropout_p=0.3, enable_gqa=True, backend="cpp")
        return (out, *torch.autograd.grad(out, (q, k, v), torch.ones_like(out))) if grads else (out.detach(),)

    first, second, other = run(7), run(7), run(8, grads=False)
    for a, b in zip(first, second):
        assert torch.equal(a, b)  # bitwise: forward and backward
    assert not torch.equal(first[0], other[0])
    no_drop = pyattn.scaled_dot_product_attention(q, k, v, enable_gqa=True, backend="cpp")
    assert not torch.equal(first[0], no_drop)


DROPOUT_CASES = {
    "plain": dict(b=2, lq=129, lk=70),
    "causal-br-gqa": dict(causal=True, bottom_right=True, hkv=2, lq=200, lk=65),
    "causal-tl-lk-longer": dict(causal=True, lq=65, lk=200),
    "mask-causal": dict(causal=True, mask="additive"),
    "bool-mask-mqa": dict(mask="bool", hkv=1),
    "chunked-bwd": dict(hq=1, hkv=1, lq=70, lk=1000),
}


@pytest.mark.parametrize("case", list(DROPOUT_CASES), ids=list(DROPOUT_CASES))
def test_dropout_forward_backward_consistent_with_keep_mask(case):
    """Kernel forward and backward (through autograd of the custom op, routed back to the cpp backend) vs a float64
    computation that uses the kernel's own keep-mask (pyattn.backends.cpp.dropout_keep_mask): fp32 policy."""
    c = DROPOUT_CASES[case]
    b, lq, lk, hq, hkv, p = c.get("b", 1), c.get("lq", 129), c.get("lk", 130), c.get("hq", 4), c.get("hkv", 4), 0.25
    q, k, v = make_qkv(b, hq, lq, lk, 24, dv=20, hkv=hkv, requires_grad=True, seed=14)
    g = torch.Generator().manual_seed(14)
    mask = None
    if c.get("mask") == "bool":
        mask = torch.rand(b, 1, lq, lk, generator=g) > 0.2
    elif c.get("mask") == "additive":
        mask = torch.randn(1, hq, lq, lk, generator=g)
    causal, br, scale = c.get("causal", False), c.get("bottom_right", False), 0.3
    seed, offset = 2**40 + 17, 3 * 2**33 + 5  # both past 2^32
    rng = torch.tensor([seed, offset])
    out, lse, state = _attention_fwd(q, k, v, mask, p, causal, br, scale, rng, True, "cpp")
    assert state.tolist() == [seed, offset, list(pyattn.dispatch.registry._BACKENDS).index("cpp")]
    dout = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad(out, (q, k, v), dout)

    keep = C.dropout_keep_mask(seed, offset, (b, hq, lq, lk), p)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    with torch.enable_grad():
        kr, vr = (t.repeat_interleave(hq // hkv, 1) for t in (k64, v64))
        s = torch.matmul(q64, kr.transpose(-1, -2)) * scale
        if mask is not None:
            s = s.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else s + mask.double()
        if causal:
            s = s.masked_fill(~causal_keep(lq, lk, br, "cpu"), -math.inf)
        dead = (s == -math.inf).all(-1, keepdim=True)  # rows that see no key: P = 0 (no NaN in autograd)
        prob = torch.softmax(s.masked_fill(dead, 0.0), -1).masked_fill(dead, 0.0)
        ref = torch.matmul(prob * keep / (1 - p), vr)
        ref_grads = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    assert 0.7 < keep.float().mean().item() < 0.8
    assert_close_fp32(out, ref, "fwd")
    # lse does not see dropout: the oracle's lse without dropout
    _, ref_lse = attention_ref(q, k, v, mask, causal=causal, bottom_right=br, scale=scale)
    assert_close_fp32(lse, ref_lse, "fwd")
    for name, a, r in zip("qkv", grads, ref_grads):
        assert_close_fp32(a, r, "bwd", msg=lambda m, name=name: f"d{name}: " + m)


# ---- fp16 / bf16: TESTING.md's 2x / 3x rule against `low` ---------------------------------------------------------

HALF_CASES = {
    "full": dict(lq=129, lk=200, d=64),
    "causal": dict(lq=257, lk=257, d=80, dv=48, causal=True),
    "mqa-bottom-right": dict(lq=65, lk=130, d=128, hkv=1, causal=True, bottom_right=True),
    "d300-chunked": dict(lq=63, lk=1000, d=300, dv=16, b=1, h=1, hkv=1),
    "mask-bool": dict(lq=70, lk=127, d=59, mask=True),
}


@pytest.mark.parametrize("dtype", [F16, BF16], ids=str)
@pytest.mark.parametrize("case", list(HALF_CASES), ids=list(HALF_CASES))
def test_half_precision_rule(dtype, case):
    c = HALF_CASES[case]
    causal, br = c.get("causal", False), c.get("bottom_right", False)
    layout = "blhd" if br else "contiguous"
    q, k, v = make_qkv(c.get("b", 2), c.get("h", 2), c["lq"], c["lk"], c["d"], dv=c.get("dv"), hkv=c.get("hkv", 2),
                       dtype=dtype, layout=layout, requires_grad=True, seed=len(case))
    mask = None
    if c.get("mask"):
        mask = torch.rand(2, 1, c["lq"], c["lk"], generator=torch.Generator().manual_seed(3)) > 0.3
        mask[0, 0, 7] = False  # a fully masked row
    out = cpp_attention(q, k, v, mask=mask, causal=causal, bottom_right=br)
    dout = _dout(out.shape, len(case), dtype)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref, _, ref_grads = attention_ref(q, k, v, _mask4(mask), causal=causal, bottom_right=br, dout=dout)
    low, low_grads = attention_low(q, k, v, _mask4(mask), causal=causal, bottom_right=br, dout=dout)
    assert out.dtype == dtype
    assert_attention_close(out, ref, low, 2)
    for name, g, r, lo in zip("qkv", grads, ref_grads, low_grads):
        assert g.dtype == dtype
        assert_attention_close(g, r, lo, 3, name=f"d{name}")


def test_bf16_pair_forward_edges():
    # bf16 forwards run on vdpbf16ps where the CPU has AVX512_BF16 (pairs of keys and of head-dim entries; see
    # csrc/cpu/attention.cpp, PYATTN_CPU_BF16_DOT), else through fp32 like fp16. (1) A causal tile cut at an odd
    # key (bottom-right, Lk = Lq + 1: query block 0 sees keys [0, 65)) takes its odd last key row in fp32: an inf
    # in the first key it must not see (v[65]) may not reach it (0 * inf in a pair would be NaN). (2) K rows that
    # are not on 4-byte boundaries (an odd storage offset) and an odd head dim take the fp32 path: both against the
    # oracle.
    q, k, v = make_qkv(1, 2, 100, 101, 64, layout="blhd", dtype=BF16, seed=41)
    v2 = v.clone()
    v2[:, :, 65] = math.inf
    a = cpp_attention(q, k, v, causal=True, bottom_right=True)
    b = cpp_attention(q, k, v2, causal=True, bottom_right=True)
    assert torch.equal(a[:, :, :64], b[:, :, :64])  # block 0 never reads key 65
    assert not b[:, :, 64].isfinite().all()         # query 64 sees it
    for d, offset in ((64, 1), (63, 0)):
        q, k, v = make_qkv(2, 3, 70, 131, d, hkv=1, dtype=BF16, seed=42 + d)
        buf = torch.empty(k.numel() + offset, dtype=BF16)
        ko = buf[offset:].view(k.shape).copy_(k)
        out = pyattn.scaled_dot_product_attention(q, ko, v, is_causal=True, enable_gqa=True, backend="cpp")
        ref = attention_ref(q, k, v, causal=True)[0]
        assert_attention_close(out, ref, attention_low(q, k, v, causal=True), 2)


@pytest.mark.parametrize("case", ["-1e9", "finfo.min", "+tied"])
def test_bf16_exact_rows_backward(case):
    # Rows whose lse cannot hold log2(l) (attn_exact_rows.h) with bf16 inputs: where the bf16 backward runs S on
    # pairs, the exact rows' statistics must come from the same GEMM (a one-lane call). A huge additive mask on
    # every key of rows whose q is 0, and (as check_exact_rows' "+tied") logits of ~1e8 tied over all keys, exact in
    # bf16 and in any summation order (q = c 2^24, k = 1): there a wrong S for the statistics is off by far more
    # than the tolerance. Against the float64 oracle.
    from pyattn.testing import put_huge_mask_rows

    if case == "+tied":
        _, _, v = make_qkv(1, 2, 20, 24, 16, dtype=BF16, seed=4)
        k = torch.ones(1, 2, 24, 16, dtype=BF16)
        q = (2.0**24 * (torch.arange(20) % 4 + 1.0))[:, None].expand(1, 2, 20, 16).to(BF16).contiguous()
        mask = None
    else:
        q, k, v = make_qkv(2, 2, 70, 130, 16, dtype=BF16, seed=23)
        mask = torch.randn(2, 2, 70, 130, generator=torch.Generator().manual_seed(23))
        put_huge_mask_rows(q, mask, -1e9 if case == "-1e9" else FMIN)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = pyattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend="cpp")
    dout = _dout(out.shape, 23, BF16)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref, _, ref_grads = attention_ref(q, k, v, mask, dout=dout)
    low, low_grads = attention_low(q, k, v, mask, dout=dout)
    assert_attention_close(out, ref, low, 2)
    for name, g_, r, lo in zip("qkv", grads, ref_grads, low_grads):
        if case == "+tied" and name == "q":  # dq = scale sum_j dS_ij k_j (k = 1) cancels to ~1e-17 in the oracle;
            assert g_.abs().max().item() <= 1e-2  # bf16 keeps ~1e-3 of it (delta from the bf16 output): no scale to
            continue                             # measure a relative error against
        assert_attention_close(g_, r, lo, 3, name=f"d{name}")


BF16_PAIR_CASES = {
    "dropout-causal-br-gqa": dict(b=2, hq=4, hkv=2, lq=129, lk=131, d=24, dv=20, causal=True, p=0.2),
    "mask-chunked": dict(b=1, hq=1, hkv=1, lq=70, lk=1000, d=40, dv=24, mask=True),
    "odd-lengths": dict(b=1, hq=2, hkv=2, lq=65, lk=67, d=64, dv=64),
}


@pytest.mark.parametrize("case", list(BF16_PAIR_CASES), ids=list(BF16_PAIR_CASES))
def test_bf16_pairs_backward_threads_and_fp32(case):
    # The bf16 backward on pairs (all five products; csrc/cpu/attention.cpp, bwd_impl): bitwise the same on 1 and
    # 2 threads, and within bf16 rounding (P, dS rounded to bf16; 2% of the largest entry) of the fp32 kernel run
    # on the same values upcast, with the same dropout keep-mask (same seed): odd query and key counts (pairs
    # padded at both ends), GQA, bottom-right causal, dropout, a shared additive mask with the keys in chunks.
    c = BF16_PAIR_CASES[case]
    q, k, v = make_qkv(c["b"], c["hq"], c["lq"], c["lk"], c["d"], dv=c["dv"], hkv=c["hkv"], dtype=BF16, seed=50)
    mask = None
    if c.get("mask"):
        mask = torch.randn(1, 1, c["lq"], c["lk"], generator=torch.Generator().manual_seed(50))
    dout = _dout((c["b"], c["hq"], c["lq"], c["dv"]), 50, BF16)
    causal = c.get("causal", False)

    def run(nt, dtype):
        qq, kk, vv = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
        old = torch.get_num_threads()
        torch.set_num_threads(nt)
        try:
            rng = torch.tensor([2**40 + 3, 7])
            out, _, _ = _attention_fwd(qq, kk, vv, mask, c.get("p", 0.0), causal, causal, 0.3, rng, True, "cpp")
            grads = torch.autograd.grad(out, (qq, kk, vv), dout.to(dtype))
        finally:
            torch.set_num_threads(old)
        return (out.detach(), *grads)

    two, one, ref = run(2, BF16), run(1, BF16), run(2, F32)
    for name, a, b, r in zip(("out", "dq", "dk", "dv"), two, one, ref):
        assert torch.equal(a, b), f"{name} differs between 1 and 2 threads"
        err = (a.float() - r).abs().max().item()
        assert err <= 2e-2 * r.abs().max().item(), f"{name}: max error {err:.3g} against the fp32 kernel"


# ---- layouts, no hidden copies, NaN padding ----------------------------------------------------------------------


@pytest.mark.parametrize("lq,lk", [(129, 129), (65, 200)])
def test_layouts_bit_identical_and_no_copies(monkeypatch, lq, lk):
    spy = _Spy(monkeypatch)

    def run(layout):
        q, k, v = make_qkv(2, 4, lq, lk, 24, hkv=2, layout=layout, requires_grad=True, seed=15)
        out = pyattn.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, backend="cpp")
        grads = torch.autograd.grad(out, (q, k, v), torch.linspace(-1, 1, out.numel()).view(out.shape))
        return (q, k, v), (out, *grads)

    _, base = run("contiguous")
    for layout in ("blhd", "packed", "nan_padded", "strided"):
        (q, k, v), res = run(layout)
        for a, b in zip(res, base):
            assert torch.equal(a, b), layout  # same values -> bit-identical results (no NaN read past the end)
        if layout != "strided":  # strided last dims are copied by the op (kernels need unit stride)
            assert spy.fwd_ptrs[-1] == tuple(t.untyped_storage().data_ptr() for t in (q, k, v)), layout
    assert spy.bwd_calls == 5
    q, k, v = make_qkv(2, 4, lq, lk, 24, hkv=2, layout="expanded", requires_grad=True, seed=15)
    assert k.stride(0) == 0
    check_fp32(q, k, v, causal=True)
    assert spy.fwd_ptrs[-1][1:] == (k.untyped_storage().data_ptr(), v.untyped_storage().data_ptr())  # not copied


def test_blhd_output_layout_and_op_strides():
    # flash_attn_func's (B, L, H, D) inputs give (B, L, H, D) outputs and grads straight from the C++ op.
    q, k, v = make_qkv(2, 4, 65, 70, 16, hkv=2, layout="blhd", seed=20)
    out, lse = torch.ops.pyattn.attn_fwd(q, k, v, None, 0.0, True, True, 0.25, 0, 0)
    assert out.transpose(1, 2).is_contiguous() and lse.is_contiguous() and lse.dtype == F32
    dq, dk, dv = torch.ops.pyattn.attn_bwd(torch.randn_like(out), q, k, v, out, lse, None, 0.0, True, True, 0.25, 0, 0)
    for g_, t in zip((dq, dk, dv), (q, k, v)):
        assert g_.shape == t.shape and g_.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("layout", ["contiguous", "blhd", "packed", "lbhd"])
def test_op_outputs_need_no_copy(layout):
    """The C++ op allocates out, dq, dk, dv in the layout the Python op promises (_layout_strides: (B, L, H, D) memory
    when the input's heads lie inside its positions), so _in_layout never copies what the kernel returned. "lbhd" is
    the (L, B, H, D) memory of torch.nn.MultiheadAttention's heads (pyattn.patch_torch)."""
    from pyattn.ops.attention import _layout_strides

    if layout == "lbhd":
        q, k, v = (torch.randn(40, 2, 4, 16).permute(1, 2, 0, 3) for _ in range(3))
    else:
        q, k, v = make_qkv(2, 4, 40, 40, 16, layout=layout, seed=21)
    out, lse = torch.ops.pyattn.attn_fwd(q, k, v, None, 0.0, True, False, 0.25, 0, 0)
    assert out.stride() == _layout_strides(q, out.shape)
    grads = torch.ops.pyattn.attn_bwd(torch.randn_like(out), q, k, v, out, lse, None, 0.0, True, False, 0.25, 0, 0)
    for g_, t in zip(grads, (q, k, v)):
        assert g_.stride() == _layout_strides(t, g_.shape)


def test_nan_padded_mask_bit_identical():
    q, k, v = make_qkv(2, 2, 70, 130, 16, seed=16)
    mask = torch.randn(2, 1, 70, 130, generator=torch.Generator().manual_seed(16))
    padded = torch.full((2, 1, 75, 140), math.nan)
    padded[:, :, :70, :130] = mask
    a = pyattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend="cpp")
    b = pyattn.scaled_dot_product_attention(q, k, v, attn_mask=padded[:, :, :70, :130], backend="cpp")
    assert torch.equal(a, b)
    bmask = mask > 0
    bpad = torch.zeros((2, 1, 75, 140), dtype=torch.bool)  # row stride 140 != 130: ignoring it reads other rows
    bpad[:, :, :70, :130] = bmask
    bpad[:, :, 70:] = True
    a = pyattn.scaled_dot_product_attention(q, k, v, attn_mask=bmask, backend="cpp")
    b = pyattn.scaled_dot_product_attention(q, k, v, attn_mask=bpad[:, :, :70, :130], backend="cpp")
    assert torch.equal(a, b)


def test_empty_inputs_do_not_launch(monkeypatch):
    def boom(*a, **kw):
        raise AssertionError("a kernel was launched for an empty problem")

    monkeypatch.setattr(C.CppBackend, "attention_fwd", boom)
    monkeypatch.setattr(C.CppBackend, "attention_bwd", boom)
    for b, h, lq, lk in ((0, 2, 5, 7), (2, 0, 5, 7), (2, 2, 0, 7), (2, 2, 5, 0)):
        q, k, v = make_qkv(b, h, lq, lk, 8, requires_grad=True)
        out = pyattn.scaled_dot_product_attention(q, k, v, backend="cpp")
        assert out.shape == (b, h, lq, 8) and bool((out == 0).all())
        grads = torch.autograd.grad(out.sum(), (q, k, v), allow_unused=True)
        assert all(g is None or bool((g == 0).all()) for g in grads)
    monkeypatch.undo()
    # the C++ ops themselves also return correct empty / zero results
    q, k, v = make_qkv(2, 2, 5, 0, 8)
    out, lse = torch.ops.pyattn.attn_fwd(q, k, v, None, 0.0, False, False, 0.5, 0, 0)
    assert out.shape == (2, 2, 5, 8) and bool((out == 0).all()) and bool((lse == math.inf).all())
    dq, dk, dv = torch.ops.pyattn.attn_bwd(torch.ones_like(out), q, k, v, out, lse, None, 0.0, False, False, 0.5, 0, 0)
    assert bool((dq == 0).all()) and dk.shape == k.shape and dv.shape == v.shape
    q, k, v = make_qkv(0, 2, 5, 7, 8)
    out, lse = torch.ops.pyattn.attn_fwd(q, k, v, None, 0.0, False, False, 0.5, 0, 0)
    assert out.shape == (0, 2, 5, 8) and lse.shape == (0, 2, 5)


def test_refusals_have_reasons(monkeypatch):
    monkeypatch.delenv("PYATTN_BACKEND", raising=False)
    q, k, v = make_qkv(1, 2, 5, 7, 8, dtype=F64)
    with pytest.raises(BackendNotSupported, match="dtype float64 not supported"):
        pyattn.scaled_dot_product_attention(q, k, v, backend="cpp")
    with pytest.raises(BackendNotSupported, match="dtype float64 not supported"):
        pyattn.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), backend="cpp")
    # unforced, float64 falls back to the torch backend; fp32 picks cpp
    torch.testing.assert_close(pyattn.scaled_dot_product_attention(q, k, v), attention_ref(q, k, v)[0])
    inputs = make_inputs(q.float(), k.float(), v.float())
    assert pyattn.dispatch.select(inputs).name == "cpp"  # the first choice for CPU tensors
    # a mask that requires grad is only differentiated by the torch backend
    mask = torch.zeros(5, 7, requires_grad=True)
    with pytest.raises(RuntimeError, match="only the torch backend computes"):
        pyattn.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, backend="cpp")
    # D = 300 is accepted (no head-dim limit)
    q, k, v = make_qkv(1, 1, 5, 7, 300)
    assert_close_fp32(pyattn.scaled_dot_product_attention(q, k, v, backend="cpp"), attention_ref(q, k, v)[0])


def test_cpp_op_checks_and_recovery():
    # The C++ op's own checks (reachable through torch.ops.pyattn directly): clear messages, inputs untouched, and
    # the next valid call works.
    q, k, v = make_qkv(1, 2, 5, 7, 8)
    copies = [t.clone() for t in (q, k, v)]
    fwd = torch.ops.pyattn.attn_fwd
    with pytest.raises(RuntimeError, match="q must have dtype float32, bfloat16 or float16"):
        fwd(q.double(), k.double(), v.double(), None, 0.0, False, False, 0.5, 0, 0)
    with pytest.raises(RuntimeError, match="k must have dtype"):
        fwd(q, k.half(), v, None, 0.0, False, False, 0.5, 0, 0)
    with pytest.raises(RuntimeError, match="must divide"):
        fwd(q, torch.randn(1, 3, 7, 8), torch.randn(1, 3, 7, 8), None, 0.0, False, False, 0.5, 0, 0)
    with pytest.raises(RuntimeError, match="does not broadcast"):
        fwd(q, k, v, torch.ones(1, 1, 5, 6, dtype=torch.bool), 0.0, False, False, 0.5, 0, 0)
    with pytest.raises(RuntimeError, match="mask must be bool, float32 or q's dtype"):
        fwd(q, k, v, torch.ones(1, 1, 5, 7, dtype=F16), 0.0, False, False, 0.5, 0, 0)
    with pytest.raises(RuntimeError, match=r"dropout_p must be in \[0, 1\)"):
        fwd(q, k, v, None, 1.0, False, False, 0.5, 0, 0)
    with pytest.raises(RuntimeError, match="scale must be finite"):
        fwd(q, k, v, None, 0.0, False, False, math.inf, 0, 0)
    with pytest.raises(RuntimeError, match="4-D"):
        fwd(q[0], k[0], v[0], None, 0.0, False, False, 0.5, 0, 0)
    for t, c in zip((q, k, v), copies):
        assert torch.equal(t, c)
    assert_close_fp32(fwd(q, k, v, None, 0.0, False, False, 0.5, 0, 0)[0], attention_ref(q, k, v, scale=0.5)[0])


# ---- determinism (also across thread counts) ---------------------------------------------------------------------

THREAD_CASES = {
    # B * Hkv = 8: the backward does not split key blocks at 1 or 2 threads
    "many-heads": dict(b=2, hq=8, hkv=4, lq=129, lk=200, mask=True),
    # B * Hkv = 2, Lk = 1000 (16 key blocks of 64, 8 of 128): the backward splits them into chunks, how many
    # depending on the thread count
    "few-heads": dict(b=1, hq=4, hkv=2, lq=129, lk=1000),
    # B = Hkv = 1 and Lk = 1000 (16 key blocks): chunked backward
    "chunked": dict(b=1, hq=2, hkv=1, lq=70, lk=1000),
}


def _run_with_threads(nt, c, dropout_p=0.0):
    q, k, v = make_qkv(c["b"], c["hq"], c["lq"], c["lk"], 40, dv=24, hkv=c["hkv"], requires_grad=True, seed=30)
    mask = None
    if c.get("mask"):
        mask = torch.randn(c["b"], 1, c["lq"], c["lk"], generator=torch.Generator().manual_seed(30))
    old = torch.get_num_threads()
    torch.set_num_threads(nt)
    try:
        torch.manual_seed(31)
        out = pyattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=c.get("causal", False),
                                                  dropout_p=dropout_p, enable_gqa=True, backend="cpp")
        grads = torch.autograd.grad(out, (q, k, v), _dout(out.shape, 31))
    finally:
        torch.set_num_threads(old)
    assert torch.get_num_threads() == old
    return (out.detach(), *grads)


@pytest.mark.parametrize("case", list(THREAD_CASES), ids=list(THREAD_CASES))
@pytest.mark.parametrize("dropout_p", [0.0, 0.2], ids=["no-dropout", "dropout"])
def test_bitwise_deterministic_repeats_and_threads_out_dk_dv(case, dropout_p):
    c = THREAD_CASES[case]
    two = _run_with_threads(2, c, dropout_p)
    again = _run_with_threads(2, c, dropout_p)
    one = _run_with_threads(1, c, dropout_p)
    for name, a, b in zip(("out", "dq", "dk", "dv"), two, again):
        assert torch.equal(a, b), f"{name} differs between two runs at 2 threads"
    for name, a, b in zip(("out", "dq", "dk", "dv"), two, one):
        assert torch.equal(a, b), f"{name} differs between 1 and 2 threads"


@pytest.mark.parametrize("case", ["few-heads", "chunked"])
def test_bitwise_deterministic_threads_dq_chunked(case):
    c = THREAD_CASES[case]
    one, two = _run_with_threads(1, c), _run_with_threads(2, c)
    assert torch.equal(one[1], two[1]), f"dq max diff {(one[1] - two[1]).abs().max().item():.3g}"


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_workspace_reuse_after_nan_and_larger_calls(dtype):
    """The kernels' temporaries come from a per-thread workspace that is reused across calls (csrc/cpu/workspace.cpp):
    a call after a larger one whose inputs were NaN (which leaves NaN panels, partial dQ, l2 rows, widened K/V in
    that workspace) must give the same bits as before, i.e. no temporary is read before this call writes it."""
    def run(lq, lk, fill=None):
        q, k, v = make_qkv(2, 3, lq, lk, 40, dtype=dtype, seed=lq + lk)
        if fill is not None:
            for t in (q, k, v):
                t.fill_(fill)
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        out = pyattn.scaled_dot_product_attention(q, k, v, backend="cpp")
        return (out.detach(), *torch.autograd.grad(out, (q, k, v), _dout(out.shape, lq)))

    before = run(70, 90)
    run(300, 260, fill=float("nan"))
    after = run(70, 90)
    for name, a, b in zip(("out", "dq", "dk", "dv"), before, after):
        assert not a.isnan().any(), name
        assert torch.equal(a, b), f"{name} differs after the workspace held NaN from a larger call"

# ---- custom ops, torch.compile, modules --------------------------------------------------------------------------


def test_opcheck_cpp_ops():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 70, 8, generator=g)
    k = torch.randn(2, 2, 65, 8, generator=g)
    v = torch.randn(2, 2, 65, 6, generator=g)
    bool_mask = torch.rand(2, 1, 70, 65, generator=g) > 0.3
    add_mask = torch.randn(1, 4, 1, 65, generator=g)
    qb, kb, vb = make_qkv(1, 2, 70, 65, 8, layout="blhd", seed=1)
    ke = k[:1].expand(2, -1, -1, -1)
    samples = [
        (q, k, v, bool_mask, 0.2, True, True, 0.3, 2**40 + 3, 4),  # GQA, Dv != D, bool mask, br causal, dropout
        (q, k, v, add_mask, 0.0, True, False, 0.3, 0, 0),
        (qb, kb, vb, None, 0.0, False, False, 0.5, 0, 0),  # blhd layout: outputs follow it
        (q.to(BF16), ke.to(BF16), v.to(BF16), None, 0.0, False, False, 0.5, 0, 0),  # stride-0 batch, bf16
    ]
    for args in samples:
        torch.library.opcheck(torch.ops.pyattn.attn_fwd.default, args)
        out, lse = torch.ops.pyattn.attn_fwd(*args)
        dout = torch.randn(out.shape, generator=g).to(out.dtype)
        torch.library.opcheck(torch.ops.pyattn.attn_bwd.default, (dout, *args[:3], out, lse, *args[3:]))


def test_opcheck_python_ops_with_cpp_backend():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 70, 8, generator=g).requires_grad_()
    k = torch.randn(2, 2, 65, 8, generator=g).requires_grad_()
    v = torch.randn(2, 2, 65, 6, generator=g).requires_grad_()
    bool_mask = torch.rand(2, 1, 70, 65, generator=g) > 0.3
    samples = [(q, k, v, bool_mask, 0.2, True, True, 0.3, torch.tensor([3, 4]), True, "cpp"),
               (q, k, v, None, 0.0, False, False, 0.3, None, True, "cpp")]
    for args in samples:
        torch.library.opcheck(_attention_fwd.op, args)
        out, lse, state = _attention_fwd(*args)
        qq, kk, vv = (t.detach() for t in args[:3])
        torch.library.opcheck(
            _attention_bwd.op,
            (torch.randn(out.shape, generator=g), qq, kk, vv, out.detach(), lse, *args[3:8], state, "cpp"),
        )


def test_torch_compile_fullgraph_aot_eager(monkeypatch):
    spy = _Spy(monkeypatch)
    q, k, v = make_qkv(1, 4, 70, 130, 16, hkv=2, requires_grad=True, seed=18)

    def fn(q, k, v):
        return pyattn.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, backend="cpp")

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    assert len(spy.fwd_ptrs) == 1 and spy.bwd_calls == 1  # the compiled graph ran the cpp kernels
    ref = fn(q, k, v)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    assert torch.equal(out, ref)
    for a, b in zip(grads, ref_grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kw", [dict(), dict(batch_first=True, kdim=8, vdim=12), dict(add_bias_kv=True)],
                         ids=["default", "batch_first-kdim-vdim", "bias_kv"])
def test_nn_multihead_attention_on_cpp(monkeypatch, kw):
    import warnings

    spy = _Spy(monkeypatch)
    e, h, lq, lk, b = 32, 4, 70, 130, 2
    torch.manual_seed(0)
    theirs = torch.nn.MultiheadAttention(e, h, **kw)
    ours = pyattn.nn.MultiheadAttention(e, h, **kw)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    kd, vd = kw.get("kdim", e), kw.get("vdim", e)
    q, k, v = torch.randn(lq, b, e), torch.randn(lk, b, kd), torch.randn(lk, b, vd)
    if kw.get("batch_first"):
        q, k, v = (t.transpose(0, 1).contiguous() for t in (q, k, v))
    kpm = torch.zeros(b, lk, dtype=torch.bool)
    kpm[0, -70:] = True
    masks = [dict(), dict(key_padding_mask=kpm), dict(attn_mask=torch.randn(lq, lk))]
    with warnings.catch_warnings(), pyattn.use_backend("cpp"):
        warnings.simplefilter("ignore")  # torch warns about mixed mask types; the result is still defined
        for m in masks:
            n = len(spy.fwd_ptrs)
            a, _ = ours(q, k, v, need_weights=False, **m)
            bb, _ = theirs(q, k, v, need_weights=False, **m)
            assert len(spy.fwd_ptrs) == n + 1  # ran on the cpp kernel
            torch.testing.assert_close(a, bb, atol=1e-5, rtol=1.3e-6)
        w = torch.linspace(-1, 1, a.numel()).view(a.shape)
        g1 = torch.autograd.grad((a * w).sum(), list(ours.parameters()))
        g2 = torch.autograd.grad((bb * w).sum(), list(theirs.parameters()))
    assert spy.bwd_calls == 1
    for x, y in zip(g1, g2):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-5)


# ---- memory: O(L), never an L x L matrix -------------------------------------------------------------------------

_MEM_SCRIPT = textwrap.dedent("""
    import re, torch, pyattn
    def peak_kb():  # VmHWM: the process's peak resident set, which C++ allocations count towards too
        return int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
    L = 16384
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, L, 64, generator=g) for _ in range(3))
    small = pyattn.scaled_dot_product_attention(q[:, :, :300], k[:, :, :300], v[:, :, :300], backend="cpp")  # warm-up
    before = peak_kb()
    out = pyattn.scaled_dot_product_attention(q, k, v, backend="cpp")
    grew = peak_kb() - before
    assert bool(out.isfinite().all())
    ref = torch.softmax(q[0, 0, :50] @ k[0, 0].T / 8.0, -1) @ v[0, 0]  # a few rows, checked against torch
    assert torch.allclose(out[0, 0, :50], ref, atol=1e-5, rtol=1e-4)
    before = peak_kb()
    control = torch.ones(2048, 8192)  # positive control: a 64 MiB tensor does show up in VmHWM
    control_grew = peak_kb() - before
    print(grew, control_grew)
""")


def test_forward_memory_is_linear_at_16k():
    # Peak RSS growth of a fresh process during one forward at L = 16384 (B = H = 1, D = 64, fp32): an L x L fp32
    # matrix would be 1 GiB; q, k, v, out are 4 MiB each. tracemalloc cannot see C++ allocations, so read VmHWM.
    res = subprocess.run([sys.executable, "-c", _MEM_SCRIPT], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    grew_kb, control_kb = (int(x) for x in res.stdout.split("\n")[-2].split())
    assert control_kb > 60 * 1024, f"VmHWM does not see a 64 MiB allocation (grew {control_kb} kB)"
    assert grew_kb < 64 * 1024, f"forward at L = 16384 grew the peak RSS by {grew_kb / 1024:.1f} MiB"


# ---- the few-rows forward path (Lq <= 4: decoding with a KV cache) -----------------------------------------------


@pytest.mark.parametrize("lq", [1, 3, 4, 5], ids=lambda n: f"lq{n}")  # 5: the block path, for contrast
@pytest.mark.parametrize("kind", ["none", "bool", "additive", "causal-br", "dropout"])
@pytest.mark.parametrize("dv", [24, 200])  # 200: out += p V's 8-, 4- and 1-vector loops (AVX-512; AVX2 8 and 1)
def test_few_query_rows_path(lq, kind, dv):
    """Lq <= 4 runs a separate forward (csrc/cpu/attention.cpp, fwd_rows: SIMD along D):
    outputs and lse vs the float64 oracle, and the backward (block path) consistent with it."""
    q, k, v = make_qkv(2, 4, lq, 150, 40, dv=dv, hkv=2, requires_grad=True, seed=30 + lq)
    g = torch.Generator().manual_seed(lq)
    mask, causal, br, p = None, False, False, 0.0
    if kind == "bool":
        mask = torch.rand(2, 1, lq, 150, generator=g) > 0.3
        mask[0, 0, 0] = False  # a fully masked row: out 0, lse +inf
    elif kind == "additive":
        mask = torch.randn(1, 4, lq, 150, generator=g).masked_fill(torch.rand(1, 4, lq, 150, generator=g) < 0.2,
                                                                   -math.inf)
    elif kind == "causal-br":
        causal, br = True, True
    elif kind == "dropout":
        p = 0.3
    seed, offset = 2**35 + 1, 7
    out, lse, _ = _attention_fwd(q, k, v, mask, p, causal, br, 0.3, torch.tensor([seed, offset]), True, "cpp")
    dout = _dout(out.shape, lq)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    with torch.enable_grad():
        kr, vr = (t.repeat_interleave(2, 1) for t in (k64, v64))
        s = torch.matmul(q64, kr.transpose(-1, -2)) * 0.3
        if mask is not None:
            s = s.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else s + mask.double()
        if causal:
            s = s.masked_fill(~causal_keep(lq, 150, br, "cpu"), -math.inf)
        dead = (s == -math.inf).all(-1, keepdim=True)
        prob = torch.softmax(s.masked_fill(dead, 0.0), -1).masked_fill(dead, 0.0)
        if p > 0:
            keep = C.dropout_keep_mask(seed, offset, (2, 4, lq, 150), p)
            prob = prob * keep / (1 - p)
        ref = torch.matmul(prob, vr)
        ref_grads = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
        ref_lse = torch.logsumexp(s, -1).masked_fill(dead.squeeze(-1), math.inf)
    assert_close_fp32(out, ref, "fwd")
    assert_close_fp32(lse, ref_lse, "fwd", msg=lambda m: "lse: " + m)
    for name, a, r in zip("qkv", grads, ref_grads):
        assert_close_fp32(a, r, "bwd", msg=lambda m, name=name: f"d{name}: " + m)
    if kind == "bool":
        assert torch.equal(out[0, :2, 0], torch.zeros_like(out[0, :2, 0])) and bool((lse[0, :2, 0] == math.inf).all())


@pytest.mark.parametrize("dtype", [F16, BF16], ids=str)
@pytest.mark.parametrize("lq,d,causal,mask", [(1, 64, False, False), (3, 200, True, False), (2, 59, False, True)],
                         ids=["d64", "d200-causal", "d59-mask"])
def test_few_query_rows_half(dtype, lq, d, causal, mask):
    # bf16 rows on AVX512_BF16 take q . k on vdpbf16ps against K in place (D / 2 words: 100 at D = 200, a masked
    # tail of the 16-word vectors); an odd D (59) the widened path.
    q, k, v = make_qkv(1, 4, lq, 300, d, hkv=1, dtype=dtype, seed=40)
    m = torch.randn(1, 1, lq, 300, generator=torch.Generator().manual_seed(40)) if mask else None
    out = pyattn.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=causal, enable_gqa=True, backend="cpp")
    ref = attention_ref(q, k, v, m, causal=causal)[0]
    low = attention_low(q, k, v, m, causal=causal)
    assert_attention_close(out, ref, low, 2, name="out")


@pytest.mark.parametrize("dtype", [torch.float32, BF16], ids=str)
@pytest.mark.parametrize("lq", [1, 3])
def test_few_query_rows_share_kv_across_the_group(dtype, lq):
    """The decoding path takes each kv head's G x Lq rows together (sliced when there are few kv heads): MQA with
    12 query heads, K/V as a window of a longer preallocated cache (the KV-cache layout: row stride > D), 16-bit K/V
    converted block by block. Outputs vs the oracle, and bitwise the same on 1 and 2 threads (slicing differs)."""
    g = torch.Generator().manual_seed(50 + lq)
    q = torch.randn(2, 12, lq, 32, generator=g).to(dtype)
    cache_k = torch.randn(2, 1, 1300, 32, generator=g).to(dtype)
    cache_v = torch.randn(2, 1, 1300, 48, generator=g).to(dtype)
    k, v = cache_k[:, :, :1131], cache_v[:, :, :1131]  # the filled part of the cache: a strided view
    # (big enough for the kernel to use both threads: 2 x 12 x lq x 1131 x 80 multiply-adds > 2^21)
    outs = []
    for threads in (1, 2):
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            outs.append(pyattn.scaled_dot_product_attention(q, k, v, enable_gqa=True, is_causal=lq > 1,
                                                            backend="cpp"))
        finally:
            torch.set_num_threads(old)
    assert torch.equal(outs[0], outs[1])
    kr, vr = (t.expand(2, 12, 1131, t.shape[-1]) for t in (k, v))
    ref = attention_ref(q, kr, vr, causal=lq > 1)[0]
    if dtype == torch.float32:
        assert_close_fp32(outs[0], ref, "fwd")
    else:
        assert_attention_close(outs[0], ref, attention_low(q, kr, vr, causal=lq > 1), 2, name="out")
