"""The C++ CPU LayerNorm/RMSNorm kernels (csrc/cpu/layer_norm.cpp), called directly through
torch.ops.pyattn.layer_norm_fwd / layer_norm_bwd (schemas in csrc/bindings/library.cpp).

Oracle: the same math in float64 (autograd for the backward) from the kernel's own inputs; fp32 uses TESTING.md's
tolerances, bf16/fp16 the per-dtype table of pyattn.testing.TOL (both explained there).
"""
from __future__ import annotations

import os

import pytest
import torch

from pyattn._ext import load_C
from pyattn.testing import assert_close_fp32, assert_tol

# Development hook: PYATTN_TEST_OPS_LIB=<a library defining torch.ops.pyattn> (with PYATTN_DISABLE_EXT=1) tests a
# locally built copy of the kernels instead of the installed pyattn._C.
_LIB = os.environ.get("PYATTN_TEST_OPS_LIB")
if _LIB:
    torch.ops.load_library(_LIB)
    _AVAILABLE, _WHY = True, ""
else:
    _mod, _WHY = load_C()
    _AVAILABLE = _mod is not None
pytestmark = pytest.mark.skipif(not _AVAILABLE, reason=f"pyattn._C is not available: {_WHY}")

HIDDEN = [1, 7, 127, 1000, 1023, 1024, 1500, 4096]
ROWS = [1, 3, 33]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def fwd(x, residual=None, weight=None, bias=None, eps=1e-5, rms=False, store_residual=False):
    return torch.ops.pyattn.layer_norm_fwd(x, residual, weight, bias, eps, rms, store_residual)


def bwd(dy, s, weight, mean, rstd, dresidual_out=None, rms=False, has_bias=False, need_dweight=True):
    return torch.ops.pyattn.layer_norm_bwd(dy, s, weight, mean, rstd, dresidual_out, rms, has_bias, need_dweight)


def ref_norm(s, weight, bias, eps, rms):
    """float64 LayerNorm/RMSNorm of s (M, N): (y, mean, rstd), differentiable."""
    s = s.double()
    if rms:
        mean = None
        rstd = torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps)
        xhat = s * rstd
    else:
        mean = s.mean(-1, keepdim=True)
        rstd = torch.rsqrt((s - mean).pow(2).mean(-1, keepdim=True) + eps)
        xhat = (s - mean) * rstd
    y = xhat
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y, mean, rstd


def check(out, ref, dtype, kind, what):
    if dtype == torch.float32:
        assert_close_fp32(out, ref, kind, msg=lambda m: f"{what}: {m}")
    else:
        assert_tol(out, ref, "layer_norm", dtype, kind, msg=lambda m: f"{what}: {m}")


def make(m, n, dtype, offset=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, n, generator=g) + offset).to(dtype)


def params(n, dtype, weight=True, bias=True, seed=1):
    g = torch.Generator().manual_seed(seed)
    w = (1 + 0.5 * torch.randn(n, generator=g)).to(dtype) if weight else None
    b = (0.5 * torch.randn(n, generator=g)).to(dtype) if bias else None
    return w, b


# ---------------------------------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", HIDDEN)
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
def test_forward_matches_fp64(dtype, n, rms):
    for m in ROWS:
        for with_res in (False, True):
            x = make(m, n, dtype)
            r = make(m, n, dtype, seed=2) if with_res else None
            w, b = params(n, dtype, bias=not rms)
            y, s_out, mean, rstd = fwd(x, r, w, b, 1e-5, rms, store_residual=True)
            s = x + r if with_res else x  # torch's unfused add, rounded to dtype
            if with_res:
                assert torch.equal(s_out, s), "residual_out must equal torch's x + residual bit for bit"
            else:
                assert s_out.shape == (0,) and s_out.dtype == dtype
            yr, mr, rr = ref_norm(s, None if w is None else w.double(), None if b is None else b.double(), 1e-5, rms)
            what = f"{dtype} m={m} n={n} rms={rms} residual={with_res}"
            assert y.shape == (m, n) and y.dtype == dtype and y.is_contiguous()
            check(y, yr, dtype, "fwd", "y " + what)
            # statistics are fp32 whatever the input dtype, computed from the rounded s
            assert rstd.dtype == torch.float32 and rstd.shape == (m,)
            torch.testing.assert_close(rstd.double(), rr.squeeze(-1), atol=0, rtol=4e-6)
            if rms:
                assert mean.shape == (0,) and mean.dtype == torch.float32
            else:
                assert mean.dtype == torch.float32 and mean.shape == (m,)
                # mean is rounded to fp32: half an ulp of |mean|, plus summation error
                torch.testing.assert_close(mean.double(), mr.squeeze(-1), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("n", [7, 1000, 1024, 4096])
def test_forward_offset_1000_stays_accurate(n):
    # x = 1000 + randn: a one-pass E[x^2] - E[x]^2 would lose ~all digits in fp32; the corrected two-pass variance
    # keeps the fp32 forward within TESTING.md's strict tolerance.
    for rms in (False, True):
        x = make(33, n, torch.float32, offset=1000.0)
        r = make(33, n, torch.float32, seed=3)
        w, b = params(n, torch.float32, bias=not rms)
        y, s, mean, rstd = fwd(x, r, w, b, 1e-5, rms, True)
        yr, mr, rr = ref_norm(s, w.double(), None if b is None else b.double(), 1e-5, rms)
        assert_close_fp32(y, yr, "fwd")
        torch.testing.assert_close(rstd.double(), rr.squeeze(-1), atol=0, rtol=4e-6)
        if not rms:
            # fp32 can hold 1000 + mean only to 2^-14 = 6.1e-5: half an ulp
            torch.testing.assert_close(mean.double(), mr.squeeze(-1), atol=3.1e-5, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_constant_rows(dtype):
    n = 1000
    x = torch.full((3, n), 7.25, dtype=dtype)
    x[1] = -1000.5
    x[2] = 0
    w, b = params(n, dtype)
    for eps in (1e-5, 1e-2):
        y, _, mean, rstd = fwd(x, None, w, b, eps)
        assert torch.equal(mean, x[:, 0].float())
        torch.testing.assert_close(rstd, torch.full((3,), eps ** -0.5), atol=0, rtol=1e-6)
        # y = b exactly up to rounding: (s - mean) is exactly 0
        check(y, b.double().expand(3, n), dtype, "fwd", f"constant rows eps={eps}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_row_stays_in_its_row(dtype):
    m, n = 33, 1024
    x = make(m, n, dtype)
    w, b = params(n, dtype)
    clean = fwd(x, None, w, b)
    x[5, 17] = float("nan")
    x[9, 1023] = float("inf")
    y, _, mean, rstd = fwd(x, None, w, b)
    for row in (5, 9):
        assert y[row].isnan().all(), f"row {row} with a NaN/inf must be NaN"
    others = [i for i in range(m) if i not in (5, 9)]
    assert torch.equal(y[others], clean[0][others])
    assert torch.equal(rstd[others], clean[3][others])
    dy = make(m, n, dtype, seed=4)
    dx, dw, db = bwd(dy, x, w, mean, rstd, None, False, True, True)
    dx_clean = bwd(dy, x.nan_to_num(0.0), w, clean[2], clean[3], None, False, True, True)[0]
    assert dx[5].isnan().all() and dx[9].isnan().all()
    assert torch.equal(dx[others], dx_clean[others])


def nan_padded_rows(t, pad=13):
    """Same values as t (M, N), as a view into a NaN-filled buffer with row stride N + pad."""
    buf = torch.full((t.shape[0], t.shape[1] + pad), float("nan"), dtype=t.dtype)
    buf[:, : t.shape[1]] = t
    return buf[:, : t.shape[1]]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [7, 127, 1024, 1500])
def test_strided_nan_padded_rows_bitwise_equal(dtype, n):
    m = 33
    x, r, dy, dres = (make(m, n, dtype, seed=k) for k in range(4))
    w, b = params(n, dtype)
    xp, rp, dyp, dresp = (nan_padded_rows(t, pad=5 + k) for k, t in enumerate((x, r, dy, dres)))
    assert xp.stride(0) != n
    for rms in (False, True):
        bb = None if rms else b
        out = fwd(x, r, w, bb, 1e-5, rms, True)
        outp = fwd(xp, rp, w, bb, 1e-5, rms, True)
        for a, c in zip(out, outp):
            assert torch.equal(a, c)
        s, mean, rstd = out[1], out[2], out[3]
        sp = nan_padded_rows(s, pad=3)
        g = bwd(dy, s, w, mean, rstd, dres, rms, not rms, True)
        gp = bwd(dyp, sp, w, mean, rstd, dresp, rms, not rms, True)
        for a, c in zip(g, gp):
            assert torch.equal(a, c)
        assert not g[0].isnan().any()


# ---------------------------------------------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------------------------------------------
def ref_grads(s, dy, w, b, eps, rms, dres=None):
    sd = s.double().requires_grad_()
    wd = w.double().requires_grad_() if w is not None else None
    bd = b.double().requires_grad_() if b is not None else None
    y, _, _ = ref_norm(sd, wd, bd, eps, rms)
    y.backward(dy.double())
    dx = sd.grad + (dres.double() if dres is not None else 0)
    return dx, (wd.grad if wd is not None else None), (bd.grad if bd is not None else None)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", HIDDEN)
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
def test_backward_matches_fp64(dtype, n, rms):
    for m in ROWS:
        for affine in (True, False):
            x = make(m, n, dtype)
            w, b = params(n, dtype, weight=affine, bias=affine and not rms)
            _, _, mean, rstd = fwd(x, None, w, b, 1e-5, rms)
            dy = make(m, n, dtype, seed=5)
            dres = make(m, n, dtype, seed=6) if affine else None
            dx, dw, db = bwd(dy, x, w, mean, rstd, dres, rms, b is not None, True)
            rdx, rdw, rdb = ref_grads(x, dy, w, b, 1e-5, rms, dres)
            what = f"{dtype} m={m} n={n} rms={rms} affine={affine}"
            assert dx.shape == (m, n) and dx.dtype == dtype
            check(dx, rdx, dtype, "bwd", "dx " + what)
            if affine:
                assert dw.dtype == dtype and dw.shape == (n,)
                check(dw, rdw, dtype, "bwd", "dweight " + what)
            else:
                assert dw.shape == (0,)
            if b is not None:
                check(db, rdb, dtype, "bwd", "dbias " + what)
            else:
                assert db.shape == (0,)


def test_backward_offset_1000():
    # The backward uses the saved fp32 mean, which can only hold 1000 + mean to half an ulp (3.05e-5): xhat is then
    # off by up to 3.05e-5 * rstd per element, so dweight = sum_rows(dy * xhat) is off by up to
    # 3.05e-5 * rstd * sum_rows |dy|; atol below is that bound (rstd ~ 1, sum |dy| over 33 rows < 40).
    n = 1024
    x = make(33, n, torch.float32, offset=1000.0)
    w, b = params(n, torch.float32)
    _, _, mean, rstd = fwd(x, None, w, b)
    dy = make(33, n, torch.float32, seed=7)
    dx, dw, db = bwd(dy, x, w, mean, rstd, None, False, True, True)
    rdx, rdw, rdb = ref_grads(x, dy, w, b, 1e-5, False)
    assert_close_fp32(dx, rdx, "bwd")
    bound = 3.05e-5 * rstd.max().item() * dy.abs().sum(0).max().item()
    torch.testing.assert_close(dw.double(), rdw, atol=bound, rtol=1e-5)
    assert_close_fp32(db, rdb, "bwd")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_input_fp32_weight(dtype):
    m, n = 33, 1000
    x, r = make(m, n, dtype), make(m, n, dtype, seed=2)
    w, b = params(n, torch.float32)
    for rms in (False, True):
        bb = None if rms else b
        y, s, mean, rstd = fwd(x, r, w, bb, 1e-5, rms, True)
        assert y.dtype == dtype and s.dtype == dtype
        yr, _, _ = ref_norm(x + r, w.double(), None if bb is None else bb.double(), 1e-5, rms)
        check(y, yr, dtype, "fwd", f"y rms={rms}")
        dy = make(m, n, dtype, seed=3)
        dx, dw, db = bwd(dy, s, w, mean, rstd, None, rms, not rms, True)
        assert dw.dtype == torch.float32 and dx.dtype == dtype
        rdx, rdw, rdb = ref_grads(s, dy, w, bb, 1e-5, rms)
        check(dx, rdx, dtype, "bwd", f"dx rms={rms}")
        # dweight is accumulated in fp32 from half inputs: only the inputs' rounding, no output rounding
        check(dw, rdw, dtype, "bwd", f"dweight rms={rms}")
        if not rms:
            assert db.dtype == torch.float32
            check(db, rdb, dtype, "bwd", "dbias")


def test_backward_any_gradient_layout():
    # dy and dresidual_out come from autograd in any layout (expanded ones, transposed views): copied if needed
    m, n = 9, 130
    x = make(m, n, torch.float32)
    w, b = params(n, torch.float32)
    _, _, mean, rstd = fwd(x, None, w, b)
    dense = torch.ones(m, n)
    ref = bwd(dense, x, w, mean, rstd, dense, False, True, True)
    for dy in (torch.ones(1, 1).expand(m, n), torch.ones(n, m).t(), torch.ones(1, n).expand(m, n)):
        got = bwd(dy, x, w, mean, rstd, dy, False, True, True)
        for a, c in zip(ref, got):
            assert torch.equal(a, c)


def test_backward_noncontiguous_dy_and_no_dweight():
    m, n = 33, 1024
    x = make(m, n, torch.float32)
    w, b = params(n, torch.float32)
    _, _, mean, rstd = fwd(x, None, w, b)
    dy_full = make(m, 2 * n, torch.float32, seed=8)
    dy = dy_full[:, ::1][:, n:]  # row stride 2n
    assert not dy.is_contiguous()
    dx, dw, db = bwd(dy, x, w, mean, rstd, None, False, True, False)
    assert dw.shape == (0,) and db.shape == (0,)
    rdx, _, _ = ref_grads(x, dy, w, b, 1e-5, False)
    assert_close_fp32(dx, rdx, "bwd")
    dx2, _, _ = bwd(dy.contiguous(), x, w, mean, rstd, None, False, True, True)
    assert torch.equal(dx, dx2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dweight_dbias_bitwise_reproducible_across_threads(dtype):
    m, n = 1000, 1024  # large enough to run in parallel
    x = make(m, n, dtype)
    w, b = params(n, dtype)
    dy = make(m, n, dtype, seed=9)
    _, _, mean, rstd = fwd(x, None, w, b)
    old = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3, 1, 2):
            torch.set_num_threads(threads)
            for _ in range(2):
                results.append(bwd(dy, x, w, mean, rstd, None, False, True, True))
            results.append(tuple(fwd(x, None, w, b)))
    finally:
        torch.set_num_threads(old)
    bwds = [r for r in results if len(r) == 3]
    fwds = [r for r in results if len(r) == 4]
    for r in bwds[1:]:
        for a, c in zip(bwds[0], r):
            assert torch.equal(a, c)
    for r in fwds[1:]:
        for a, c in zip(fwds[0], r):
            assert torch.equal(a, c)


def test_large_hidden_and_many_rows():
    # rows longer than L1/L2 and a row count that is not a multiple of the dweight chunking
    for m, n in ((5, 70000), (1037, 257)):
        x = make(m, n, torch.float32)
        w, b = params(n, torch.float32)
        y, _, mean, rstd = fwd(x, None, w, b)
        yr, _, _ = ref_norm(x, w.double(), b.double(), 1e-5, False)
        assert_close_fp32(y, yr, "fwd")
        dy = make(m, n, torch.float32, seed=10)
        dx, dw, db = bwd(dy, x, w, mean, rstd, None, False, True, True)
        rdx, rdw, rdb = ref_grads(x, dy, w, b, 1e-5, False)
        assert_close_fp32(dx, rdx, "bwd")
        # dweight sums m products: TESTING.md's atol 1e-4 for m <= ~100, scaled with sqrt(m) beyond that
        atol = 1e-4 * max(1.0, (m / 100) ** 0.5)
        torch.testing.assert_close(dw.double(), rdw, atol=atol, rtol=1e-5)
        torch.testing.assert_close(db.double(), rdb, atol=atol, rtol=1e-5)


_STREAM_SCRIPT = r"""
import os, sys, torch
lib = os.environ.get("PYATTN_TEST_OPS_LIB")
if lib:
    torch.ops.load_library(lib)
else:
    import pyattn._C  # noqa: F401
inputs = torch.load(sys.argv[1])
out = [torch.ops.pyattn.layer_norm_fwd(*args) for args in inputs]
torch.save(out, sys.argv[2])
"""


def test_streaming_stores_give_identical_results(tmp_path):
    # Large forwards write their outputs with non-temporal stores (csrc/cpu/layer_norm.cpp, stream_bytes());
    # PYATTN_LN_STREAM_BYTES=0 forces that path in a child process: the results must be the same bits.
    import subprocess
    import sys

    inputs = []
    for dtype in DTYPES:
        for n in (1000, 1024, 1500):
            x, r = make(40, n, dtype), make(40, n, dtype, seed=2)
            w, b = params(n, dtype)
            inputs += [(x, r, w, b, 1e-5, False, True), (x, r, w, None, 1e-5, True, False),
                       (x, None, w, b, 1e-5, False, False), (nan_padded_rows(x), r, w, b, 1e-5, False, True)]
    torch.save(inputs, tmp_path / "in.pt")
    script = tmp_path / "child.py"
    script.write_text(_STREAM_SCRIPT)
    env = dict(os.environ, PYATTN_LN_STREAM_BYTES="0")
    subprocess.run([sys.executable, str(script), str(tmp_path / "in.pt"), str(tmp_path / "out.pt")], env=env,
                   check=True, timeout=300)
    streamed = torch.load(tmp_path / "out.pt")
    for args, got in zip(inputs, streamed):
        for a, c in zip(fwd(*args), got):
            assert torch.equal(a, c)


# ---------------------------------------------------------------------------------------------------------------
# empty input, opcheck, bad input
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_empty_rows(dtype):
    n = 64
    x = torch.empty(0, n, dtype=dtype)
    w, b = params(n, dtype)
    y, s, mean, rstd = fwd(x, x, w, b, 1e-5, False, True)
    assert y.shape == (0, n) and s.shape == (0, n) and mean.shape == (0,) and rstd.shape == (0,)
    dx, dw, db = bwd(x, x, w, mean, rstd, None, False, True, True)
    assert dx.shape == (0, n)
    assert torch.equal(dw, torch.zeros(n, dtype=dtype)) and torch.equal(db, torch.zeros(n, dtype=dtype))
    dx, dw, db = bwd(x, x, None, mean, rstd, None, False, False, True)
    assert dw.shape == (0,) and db.shape == (0,)


@pytest.mark.skipif(bool(_LIB), reason="opcheck needs pyattn's fake impls, registered with the installed pyattn._C")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(dtype):
    import pyattn.backends.cpp  # noqa: F401  (registers the fake impls)

    m, n = 5, 33
    x, r = make(m, n, dtype), make(m, n, dtype, seed=2)
    w, b = params(n, dtype)
    torch.library.opcheck(torch.ops.pyattn.layer_norm_fwd.default, (x, r, w, b, 1e-5, False, True))
    torch.library.opcheck(torch.ops.pyattn.layer_norm_fwd.default, (x, None, w, None, 1e-6, True, False))
    _, s, mean, rstd = fwd(x, r, w, b, 1e-5, False, True)
    dy = make(m, n, dtype, seed=3)
    torch.library.opcheck(torch.ops.pyattn.layer_norm_bwd.default, (dy, s, w, mean, rstd, dy, False, True, True))
    torch.library.opcheck(torch.ops.pyattn.layer_norm_bwd.default, (dy, s, None, mean, rstd, None, False, False, False))


def _bad_fwd_cases():
    x = torch.randn(4, 8)
    w = torch.randn(8)
    return [
        ("x must be 2-D", lambda: fwd(torch.randn(8), None, w)),
        ("x must have dtype float32, bfloat16 or float16", lambda: fwd(x.double(), None, w.double())),
        ("x must have dtype float32, bfloat16 or float16", lambda: fwd(x.int(), None, None)),
        ("x must have stride 1", lambda: fwd(torch.randn(8, 4).t(), None, w)),
        ("x must have a non-empty last dimension", lambda: fwd(torch.randn(4, 0), None, None)),
        ("residual must have shape", lambda: fwd(x, torch.randn(4, 9), w)),
        ("residual must have dtype", lambda: fwd(x, torch.randn(4, 8, dtype=torch.bfloat16), w)),
        ("residual must have stride 1", lambda: fwd(x, torch.randn(8, 4).t(), w)),
        ("weight must have shape", lambda: fwd(x, None, torch.randn(7))),
        ("weight must have dtype float32 or", lambda: fwd(x, None, w.half())),
        ("weight must be contiguous", lambda: fwd(x, None, torch.randn(16)[::2])),
        ("bias must have shape", lambda: fwd(x, None, w, torch.randn(2, 4))),
        ("bias must be None when rms", lambda: fwd(x, None, w, w, 1e-5, True)),
        ("eps must be a finite number", lambda: fwd(x, None, w, None, -1.0)),
        ("eps must be a finite number", lambda: fwd(x, None, w, None, float("nan"))),
    ]


@pytest.mark.parametrize("case", range(len(_bad_fwd_cases())))
def test_bad_forward_input_raises(case):
    match, call = _bad_fwd_cases()[case]
    with pytest.raises(RuntimeError, match=match):
        call()
    # the process stays usable
    assert fwd(torch.ones(2, 3), None, None)[0].shape == (2, 3)


def _bad_bwd_cases():
    x = torch.randn(4, 8)
    w = torch.randn(8)
    _, _, mean, rstd = fwd(x, None, w)
    return [
        ("dy must have shape", lambda: bwd(torch.randn(4, 9), x, w, mean, rstd)),
        ("dy must have dtype", lambda: bwd(x.half(), x, w, mean, rstd)),
        ("s must be 2-D", lambda: bwd(x, x[0], w, mean, rstd)),
        ("s must have dtype float32, bfloat16 or float16", lambda: bwd(x.double(), x.double(), None, mean, rstd)),
        ("weight must have shape", lambda: bwd(x, x, torch.randn(9), mean, rstd)),
        ("mean must have shape", lambda: bwd(x, x, w, mean[:2], rstd)),
        ("mean must have dtype float32", lambda: bwd(x, x, w, mean.double(), rstd)),
        ("rstd must have shape", lambda: bwd(x, x, w, mean, rstd[:3])),
        ("rstd must have dtype float32", lambda: bwd(x, x, w, mean, rstd.half())),
        ("dresidual_out must have shape", lambda: bwd(x, x, w, mean, rstd, torch.randn(3, 8))),
        ("has_bias must be False when rms", lambda: bwd(x, x, w, mean, rstd, None, True, True)),
    ]


@pytest.mark.parametrize("case", range(len(_bad_bwd_cases())))
def test_bad_backward_input_raises(case):
    match, call = _bad_bwd_cases()[case]
    with pytest.raises(RuntimeError, match=match):
        call()
