"""The torch backend's attention (the oracle for every kernel) against torch's own math in float64.

torch's F.scaled_dot_product_attention runs with the MATH backend in float64 here; where torch has no twin
(bottom-right causal, lse, dropout keep-masks) the reference is compared with hand-built masks and autograd of
a plain torch computation.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import pyattn
from pyattn.backends.torch import causal_keep, dropout_keep_mask
from pyattn.testing import (LAYOUTS, assert_attention_close, assert_close_fp32, attention_low, attention_ref,
                            key_padding_mask, make_qkv)

F64 = torch.float64
TOL64 = dict(atol=1e-10, rtol=1e-9)


@pytest.fixture(autouse=True)
def _fixed_seed():
    """Every test starts from the same global RNG state (tests that draw without a generator stay fixed)."""
    torch.manual_seed(0)


def torch_sdpa(q, k, v, **kw):
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, **kw)


def _grads(out, inputs, dout):
    return torch.autograd.grad(out, inputs, dout)


def _check_vs_torch(q, k, v, dout=None, **kw):
    """pyattn vs torch math, forward and all three grads, float64."""
    out = pyattn.scaled_dot_product_attention(q, k, v, backend="torch", **kw)
    ref = torch_sdpa(q, k, v, **kw)
    torch.testing.assert_close(out, ref, **TOL64)
    dout = torch.randn_like(ref) if dout is None else dout
    for a, b in zip(_grads(out, (q, k, v), dout), _grads(ref, (q, k, v), dout)):
        torch.testing.assert_close(a, b, **TOL64)
    return out


# (Lq, Lk) pairs crossing block boundaries, each with a head dim; all of TESTING.md's head dims appear.
CASES = [((1, 1), 8), ((2, 3), 16), ((15, 17), 32), ((63, 64), 40), ((65, 97), 59), ((1, 239), 64),
         ((239, 1), 80), ((113, 203), 96), ((128, 129), 111), ((200, 257), 128)]


@pytest.mark.parametrize("lens,d", CASES, ids=[f"{a}x{b}-d{d}" for (a, b), d in CASES])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_sdpa_matches_torch_math(lens, d, causal):
    lq, lk = lens
    q, k, v = make_qkv(1, 2, lq, lk, d, dtype=F64, requires_grad=True, seed=lq + lk + d)
    _check_vs_torch(q, k, v, is_causal=causal)


@pytest.mark.parametrize("hq,hkv", [(8, 1), (8, 2), (6, 3), (4, 4)])
def test_gqa_matches_torch(hq, hkv):
    q, k, v = make_qkv(2, hq, 17, 33, 16, hkv=hkv, dtype=F64, requires_grad=True)
    _check_vs_torch(q, k, v, enable_gqa=True, is_causal=True)
    # flash_attn_func: GQA by fewer kv heads, (B, L, H, D) layout
    out = pyattn.flash_attn_func(*(t.transpose(1, 2) for t in (q, k, v)))
    torch.testing.assert_close(out.transpose(1, 2), torch_sdpa(q, k, v, enable_gqa=True), **TOL64)


def test_mqa_by_broadcast_and_value_head_dim():
    # torch broadcasts a single kv head without enable_gqa; value may have its own head dim
    q = torch.randn(2, 4, 9, 16, dtype=F64, requires_grad=True)
    k = torch.randn(2, 1, 11, 16, dtype=F64, requires_grad=True)
    v = torch.randn(2, 1, 11, 24, dtype=F64, requires_grad=True)
    out = _check_vs_torch(q, k, v)
    assert out.shape == (2, 4, 9, 24)


@pytest.mark.parametrize("shape", [(11,), (7, 11), (2, 1, 1, 11), (1, 3, 7, 11), (2, 3, 7, 11), (3, 1, 11),
                                   (2, 1, 7, 1)], ids=str)
@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_broadcast_masks(shape, kind):
    g = torch.Generator().manual_seed(sum(shape))
    q, k, v = make_qkv(2, 3, 7, 11, 32, dtype=F64, requires_grad=True)
    if kind == "bool":
        mask = torch.rand(shape, generator=g) > 0.3
    else:  # float32 additive masks are allowed with any query dtype (torch's rule); -inf entries included
        mask = torch.randn(shape, generator=g).masked_fill(torch.rand(shape, generator=g) < 0.2, -math.inf)
    _check_vs_torch(q, k, v, attn_mask=mask)


def test_expanded_and_key_padding_masks():
    q, k, v = make_qkv(3, 2, 13, 21, 16, dtype=F64, requires_grad=True)
    kpm = key_padding_mask([21, 5, 1], 21)  # (B, 1, 1, Lk)
    _check_vs_torch(q, k, v, attn_mask=kpm)
    _check_vs_torch(q, k, v, attn_mask=kpm.expand(3, 2, 13, 21))  # stride-0 dims
    rowmask = (torch.rand(13, 1) > 0.5).expand(13, 21)  # varies along queries only, stride 0 along keys
    rowmask[0, 0] = True
    _check_vs_torch(q, k, v, attn_mask=rowmask | kpm)
    inputs = pyattn.ops.attention.make_inputs(q, k, v, attn_mask=kpm.expand(3, 2, 13, 21))
    assert inputs.mask.shape == (3, 1, 1, 21) and inputs.mask_pattern == (True, False, False, True)


@pytest.mark.parametrize("lq,lk", [(5, 9), (9, 5), (1, 239), (239, 1), (113, 203), (16, 16)])
def test_causal_alignments_vs_hand_mask(lq, lk):
    q, k, v = make_qkv(2, 2, lq, lk, 16, dtype=F64, requires_grad=True, seed=lq * lk)
    dout = torch.randn(2, 2, lq, 16, dtype=F64)
    i, j = torch.arange(lq)[:, None], torch.arange(lk)[None, :]
    # top-left (torch): query i sees keys j <= i
    out = pyattn.scaled_dot_product_attention(q, k, v, is_causal=True)
    ref = torch_sdpa(q, k, v, attn_mask=j <= i)
    torch.testing.assert_close(out, ref, **TOL64)
    # bottom-right (flash-attn): query i sees keys j <= i + Lk - Lq; rows that see nothing give 0
    keep = j <= i + (lk - lq)
    out, lse = pyattn.flash_attn_func(*(t.transpose(1, 2) for t in (q, k, v)), causal=True, return_lse=True)
    out = out.transpose(1, 2)
    ref = torch_sdpa(q, k, v, attn_mask=keep)
    torch.testing.assert_close(out, ref, **TOL64)
    for a, b in zip(_grads(out, (q, k, v), dout), _grads(ref, (q, k, v), dout)):
        torch.testing.assert_close(a, b, **TOL64)
    assert torch.equal(causal_keep(lq, lk, True, "cpu"), keep)
    dead = ~keep.any(-1)
    assert bool((out[:, :, dead] == 0).all()) and bool((lse[:, :, dead] == math.inf).all())


def test_lse_is_logsumexp_of_scaled_masked_logits():
    q, k, v = make_qkv(2, 3, 19, 23, 40, dtype=F64)
    mask = torch.randn(2, 1, 19, 23, dtype=F64)
    mask[0, 0, 4] = -math.inf  # a fully masked row
    scale = 0.3
    out, lse = attention_ref(q, k, v, mask, scale=scale)
    logits = q @ k.transpose(-1, -2) * scale + mask
    ref = torch.logsumexp(logits, -1)
    ref = torch.where(torch.isneginf(ref), torch.full_like(ref, math.inf), ref)  # the +inf convention
    assert lse.dtype == F64 and lse.shape == (2, 3, 19)
    torch.testing.assert_close(lse, ref, **TOL64)
    # fp32 inputs: lse is fp32, out keeps the input dtype
    out32, lse32 = attention_ref(*(t.float() for t in (q, k, v, mask)), scale=scale, dtype=torch.float32)
    assert lse32.dtype == torch.float32 and out32.dtype == torch.float32
    _, lse_f = pyattn.flash_attn_func(*(t.transpose(1, 2).float() for t in (q, k, v)), return_lse=True)
    assert lse_f.dtype == torch.float32 and lse_f.shape == (2, 3, 19)


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_fully_masked_rows_give_zero_output_and_grads(kind):
    q, k, v = make_qkv(2, 2, 9, 12, 16, hkv=1, dtype=F64, requires_grad=True)
    keep = torch.rand(2, 2, 9, 12, generator=torch.Generator().manual_seed(1)) > 0.4
    keep[..., 0] = True
    keep[0, 1, 3] = False
    keep[1, :, 7] = False
    mask = keep if kind == "bool" else torch.zeros(keep.shape, dtype=F64).masked_fill(~keep, -math.inf)
    out = pyattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    dout = torch.randn_like(out)
    dq, dk, dv = _grads(out, (q, k, v), dout)
    dead = ~keep.any(-1)
    assert bool((out[dead] == 0).all()) and bool((dq[dead] == 0).all())
    assert not out.isnan().any() and not dq.isnan().any()
    # the live rows alone give the same dk/dv: dead rows contribute nothing
    ref = torch_sdpa(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(out, ref, **TOL64)
    rq, rk, rv = _grads(ref, (q, k, v), dout.masked_fill(dead[..., None], 0))
    torch.testing.assert_close(dk, rk, **TOL64)
    torch.testing.assert_close(dv, rv, **TOL64)
    torch.testing.assert_close(dq, rq, **TOL64)


def test_dims_rank_and_batch_broadcast_like_torch():
    g = torch.Generator().manual_seed(3)
    for qs, ks in [
        ((7, 16), (9, 16)),
        ((3, 7, 16), (3, 9, 16)),
        ((2, 3, 2, 7, 16), (2, 3, 2, 9, 16)),
        ((2, 3, 7, 16), (3, 9, 16)),
        ((2, 3, 7, 16), (1, 3, 9, 16)),
        ((1, 3, 7, 16), (2, 3, 9, 16)),
        ((2, 1, 2, 7, 16), (1, 3, 2, 9, 16)),
    ]:
        q = torch.randn(qs, generator=g, dtype=F64, requires_grad=True)
        k = torch.randn(ks, generator=g, dtype=F64, requires_grad=True)
        v = torch.randn(ks, generator=g, dtype=F64, requires_grad=True)
        out = _check_vs_torch(q, k, v, is_causal=True)
        assert out.shape == torch_sdpa(q, k, v).shape
        mask = torch.rand(qs[:-1] + (ks[-2],), generator=g) > 0.2
        _check_vs_torch(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts_bitwise_and_output_layout(layout):
    args = dict(hkv=2, requires_grad=True, seed=5)
    base = make_qkv(2, 4, 37, 37, 59, **args)
    out0 = pyattn.scaled_dot_product_attention(*base, enable_gqa=True, is_causal=True)
    dout = torch.randn_like(out0)
    g0 = _grads(out0, base, dout)
    qkv = make_qkv(2, 4, 37, 37, 59, layout=layout, **args)
    out = pyattn.scaled_dot_product_attention(*qkv, enable_gqa=True, is_causal=True)
    g = _grads(out, qkv, dout)
    if layout == "expanded":  # other values (k, v repeat across the batch): compare with torch instead
        ref = torch_sdpa(*qkv, enable_gqa=True, is_causal=True)
        assert_close_fp32(out, ref)
        for a, b in zip(g, _grads(ref, qkv, dout)):
            assert_close_fp32(a, b, "bwd")
        return
    assert torch.equal(out, out0)  # NaN padding past the logical end is never read
    for a, b in zip(g, g0):
        assert torch.equal(a, b)
    if layout == "blhd":  # output follows q's layout, so flash-style callers get a contiguous (B, L, H, D)
        assert out.transpose(1, 2).is_contiguous()


def test_flash_attn_func_output_contiguous_and_matches_sdpa():
    q, k, v = make_qkv(2, 4, 21, 33, 32, hkv=2, layout="blhd", dtype=F64, requires_grad=True)
    out = pyattn.flash_attn_func(*(t.transpose(1, 2) for t in (q, k, v)), softmax_scale=0.2)
    assert out.shape == (2, 21, 4, 32) and out.is_contiguous()
    ref = torch_sdpa(q, k, v, enable_gqa=True, scale=0.2)
    torch.testing.assert_close(out.transpose(1, 2), ref, **TOL64)


def test_large_logits_stay_finite_and_nan_row_stays_in_row():
    q, k, v = make_qkv(1, 2, 16, 16, 32, dtype=F64, std=25.0)  # logits up to ~1e4
    out = pyattn.scaled_dot_product_attention(q, k, v)
    assert out.isfinite().all()
    torch.testing.assert_close(out, torch_sdpa(q, k, v), **TOL64)
    q2 = q.clone()
    q2[0, 1, 5, 3] = math.nan
    out2 = pyattn.scaled_dot_product_attention(q2, k, v)
    nan_rows = out2.isnan().any(-1)
    assert bool(nan_rows[0, 1, 5]) and int(nan_rows.sum()) == 1
    assert torch.equal(out2[~nan_rows], out[~nan_rows])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_reference_within_policy(dtype):
    # The reference computes half inputs in fp32: it must meet TESTING.md's rule against its own fp64 run.
    q, k, v = make_qkv(2, 4, 65, 97, 64, hkv=2, dtype=dtype)
    mask = key_padding_mask([97, 40], 97)
    dout = torch.randn(2, 4, 65, 64).to(dtype)
    out, _, grads = attention_ref(q, k, v, mask, causal=True, dout=dout, dtype=torch.float32)
    ref, _, rgrads = attention_ref(q, k, v, mask, causal=True, dout=dout)
    low, lgrads = attention_low(q, k, v, mask, causal=True, dout=dout)
    assert_attention_close(out.to(dtype), ref, low, 2)
    for name, a, b, c in zip("qkv", grads, rgrads, lgrads):
        assert_attention_close(a.to(dtype), b, c, 3, name=f"d{name}")


def _recover_seed(manual_seed):
    torch.manual_seed(manual_seed)
    return torch.randint(0, 2**62, (2,), dtype=torch.int64).tolist()


def test_dropout_keep_fraction_and_mask_recovery():
    # q = k = 0 gives P = 1/Lk, v = identity: out[i, j] = keep_ij / (Lk (1 - p)), so the output shows the mask
    b, h, lq, lk, p = 2, 2, 64, 64, 0.3
    q = torch.zeros(b, h, lq, 8, dtype=F64)
    k = torch.zeros(b, h, lk, 8, dtype=F64)
    v = torch.eye(lk, dtype=F64).expand(b, h, lk, lk)
    torch.manual_seed(123)
    out = pyattn.scaled_dot_product_attention(q, k, v, dropout_p=p)
    keep = out * lk * (1 - p)
    assert torch.allclose(keep, keep.round(), atol=1e-9)
    keep = keep.round()
    assert set(keep.unique().tolist()) <= {0.0, 1.0}
    frac = keep.mean().item()
    n = keep.numel()
    assert abs(frac - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n), frac
    seed, offset = _recover_seed(123)
    assert torch.equal(keep.bool(), dropout_keep_mask(seed, offset, (b, h, lq, lk), p, "cpu"))
    # the mask is not the same across heads/batches (drawn per element)
    assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0], keep[1])


def test_dropout_deterministic_under_manual_seed():
    q, k, v = make_qkv(2, 2, 17, 19, 16)
    torch.manual_seed(7)
    a = pyattn.scaled_dot_product_attention(q, k, v, dropout_p=0.2)
    torch.manual_seed(7)
    b = pyattn.scaled_dot_product_attention(q, k, v, dropout_p=0.2)
    c = pyattn.scaled_dot_product_attention(q, k, v, dropout_p=0.2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # no dropout: two forwards are bitwise equal
    assert torch.equal(
        pyattn.scaled_dot_product_attention(q, k, v), pyattn.scaled_dot_product_attention(q, k, v)
    )


@pytest.mark.parametrize("api", ["sdpa", "flash"])
def test_dropout_forward_and_backward_use_the_same_mask(api):
    # autograd of a plain torch computation with the keep-mask the seed defines must give the same out and
    # grads
    p, hq, hkv, lq, lk = 0.25, 4, 2, 13, 29
    q, k, v = make_qkv(2, hq, lq, lk, 16, hkv=hkv, dtype=F64, requires_grad=True)
    mask = key_padding_mask([29, 11], lk)
    torch.manual_seed(99)
    if api == "sdpa":
        out = pyattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, enable_gqa=True)
        keep_c = None
    else:
        out = pyattn.flash_attn_func(*(t.transpose(1, 2) for t in (q, k, v)), dropout_p=p, causal=True)
        out = out.transpose(1, 2)
        mask, keep_c = None, causal_keep(lq, lk, True, "cpu")
    seed, offset = _recover_seed(99)
    keep = dropout_keep_mask(seed, offset, (2, hq, lq, lk), p, "cpu")
    kr, vr = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
    s = q @ kr.transpose(-1, -2) / math.sqrt(16)
    s = s.masked_fill(~(mask if mask is not None else keep_c), -math.inf)
    ref = (torch.softmax(s, -1) * keep / (1 - p)) @ vr
    torch.testing.assert_close(out, ref, **TOL64)
    dout = torch.randn_like(out)
    for a, b in zip(_grads(out, (q, k, v), dout), _grads(ref, (q, k, v), dout)):
        torch.testing.assert_close(a, b, **TOL64)


def test_gradcheck_float64_tiny():
    q, k, v = make_qkv(1, 2, 3, 4, 5, hkv=1, dtype=F64, requires_grad=True)
    # row 1 fully masked
    bool_mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 1, 1]], dtype=torch.bool)
    add_mask = torch.randn(1, 1, 3, 4, dtype=F64)
    sdpa = pyattn.scaled_dot_product_attention
    assert torch.autograd.gradcheck(
        lambda a, b, c: sdpa(a, b, c, attn_mask=bool_mask, enable_gqa=True), (q, k, v)
    )
    assert torch.autograd.gradcheck(
        lambda a, b, c: sdpa(a, b, c, attn_mask=add_mask, enable_gqa=True, scale=0.7), (q, k, v)
    )
    assert torch.autograd.gradcheck(lambda a, b, c: sdpa(a, b, c, is_causal=True, enable_gqa=True), (q, k, v))
    qf, kf, vf = (
        t.detach().transpose(1, 2).requires_grad_() for t in make_qkv(1, 2, 5, 3, 4, hkv=1, dtype=F64)
    )
    assert torch.autograd.gradcheck(
        lambda a, b, c: pyattn.flash_attn_func(a, b, c, causal=True), (qf, kf, vf)
    )
    # an additive mask that requires grad takes the differentiable torch path and gets its gradient
    add_mask.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b, c, m: sdpa(a, b, c, attn_mask=m, enable_gqa=True), (q, k, v, add_mask)
    )


def test_mask_grad_matches_torch():
    q, k, v = make_qkv(2, 2, 7, 9, 8, dtype=F64, requires_grad=True)
    m = torch.randn(2, 1, 7, 9, dtype=F64, requires_grad=True)
    out = pyattn.scaled_dot_product_attention(q, k, v, attn_mask=m)
    ref = torch_sdpa(q, k, v, attn_mask=m)
    torch.testing.assert_close(out, ref, **TOL64)
    dout = torch.randn_like(out)
    for a, b in zip(_grads(out, (q, k, v, m), dout), _grads(ref, (q, k, v, m), dout)):
        torch.testing.assert_close(a, b, **TOL64)


@pytest.mark.parametrize(
    "shape", [(0, 2, 5, 7), (2, 0, 5, 7), (2, 2, 0, 7), (2, 2, 5, 0)], ids=["B0", "H0", "Lq0", "Lk0"]
)
def test_empty_inputs(shape):
    b, h, lq, lk = shape
    q = torch.randn(b, h, lq, 8, requires_grad=True)
    k = torch.randn(b, h, lk, 8, requires_grad=True)
    v = torch.randn(b, h, lk, 8, requires_grad=True)
    out = pyattn.scaled_dot_product_attention(q, k, v, dropout_p=0.1)
    assert out.shape == (b, h, lq, 8) and bool((out == 0).all())
    assert torch.equal(out, torch_sdpa(q, k, v))
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    assert not any(bool(t.any()) for t in (dq, dk, dv))
    o2, lse = pyattn.flash_attn_func(*(t.transpose(1, 2) for t in (q, k, v)), causal=True, return_lse=True)
    assert o2.shape == (b, lq, h, 8) and lse.shape == (b, h, lq) and bool((lse == math.inf).all())


@pytest.mark.parametrize("lq,lk,b", [(4, 0, 1), (0, 4, 1), (4, 4, 0)], ids=["Lk0", "Lq0", "B0"])
def test_empty_inputs_with_a_mask_that_requires_grad(lq, lk, b):
    # Nothing is computed: zero grads for q, k, v and none for the mask, as torch's sdpa gives (the backward once
    # raised "does not differentiate attn_mask" here).
    q = torch.randn(b, 2, lq, 8, requires_grad=True)
    k = torch.randn(b, 2, lk, 8, requires_grad=True)
    v = torch.randn(b, 2, lk, 8, requires_grad=True)
    m = torch.zeros(lq, lk, requires_grad=True)
    out = pyattn.scaled_dot_product_attention(q, k, v, attn_mask=m)
    assert torch.equal(out, torch_sdpa(q, k, v, attn_mask=m))
    grads = torch.autograd.grad(out.sum(), (q, k, v, m), allow_unused=True)
    assert grads[3] is None
    for g, t in zip(grads[:3], (q, k, v)):
        assert g.shape == t.shape and not bool(g.any())


def test_sdpa_under_autocast_casts_as_torch():
    # Inside torch.autocast, torch's SDPA casts floating inputs (float64 excepted) to the region's dtype: mixed
    # fp32 / bf16 q, k, v then work, and the output is bf16.
    q = torch.randn(1, 2, 5, 8)
    mask = torch.randn(5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = pyattn.scaled_dot_product_attention(q.bfloat16(), q, q, attn_mask=mask)
        want = torch_sdpa(q.bfloat16(), q, q, attn_mask=mask)
        assert got.dtype == want.dtype == torch.bfloat16
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
        q64 = q.double()
        assert pyattn.scaled_dot_product_attention(q64, q64, q64).dtype == torch.float64
    assert pyattn.scaled_dot_product_attention(q, q, q).dtype == torch.float32  # outside the region: unchanged
