"""Direct tests of the Triton LayerNorm / RMSNorm launchers (kernels/layernorm.py) against float64 torch math.

Runs through the Triton interpreter on machines without CUDA (TRITON_INTERPRET=1, set before triton is
imported). Every launcher allocation is NaN-filled here (see `_nan_filled_allocations`), so an output
element or scratch slot the kernels fail to write shows up as NaN in the full-tensor comparisons.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from pyattn.kernels import layernorm as ln  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-5

# (atol, rtol) against the float64 oracle, forward and backward.
# fp32: TESTING.md's policy (the interpreter computes exact fp32; the only error is fp32 rounding).
# fp16/bf16: the kernels load the (exactly representable) low-precision inputs, compute in fp32 and round
# once on the store, so the error is at most half an ulp of the output plus fp32 noise. rtol = one ulp of the
# format relative to the value (bf16 2^-8 = 3.9e-3, fp16 2^-10 = 9.8e-4) leaves a 2x margin over the half-ulp
# rounding; atol covers values near zero, where the fp32 noise (~1e-6 of the row scale, and sums of M*N
# products in the backward) dominates the relative bound. dweight/dbias in fp32 keep the fp32 budget.
TOL = {
    torch.float32: {"fwd": (1e-5, 1.3e-6), "bwd": (1e-4, 1e-5)},
    torch.bfloat16: {"fwd": (1e-4, 2.0**-8), "bwd": (1e-3, 2.0**-8)},
    torch.float16: {"fwd": (1e-4, 2.0**-10), "bwd": (1e-3, 2.0**-10)},
}


@pytest.fixture(autouse=True)
def _nan_filled_allocations(monkeypatch):
    """torch.empty returns NaN-filled floating tensors during each test: unwritten outputs become visible."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", nan_empty)


# ---- helpers ----


def _close(out, ref, dtype, kind, what, tol=None):
    atol, rtol = (tol or TOL)[dtype][kind]
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    torch.testing.assert_close(
        out.double(),
        ref.double(),
        atol=atol,
        rtol=rtol,
        equal_nan=True,
        msg=lambda m: f"{what} ({dtype}, {kind}): {m}",
    )


def _param(kind, N, dtype, gen):
    """weight/bias: None, fp32, or the input dtype ('same')."""
    if kind is None:
        return None
    t = torch.randn(N, generator=gen) * 0.5 + 1.0
    return t.to(torch.float32 if kind == "fp32" else dtype).to(DEVICE)


def _reference(x, residual, weight, bias, rms, dy, dres):
    """float64 oracle. Returns dict of y, s, mean, rstd, dx, dweight, dbias."""
    s = x if residual is None else (x + residual)  # rounded to x.dtype, as the kernel's s
    s64 = s.double().detach().requires_grad_(True)
    w64 = None if weight is None else weight.double().detach().requires_grad_(True)
    b64 = None if bias is None else bias.double().detach().requires_grad_(True)
    if rms:
        mean = None
        rstd = torch.rsqrt(s64.pow(2).mean(-1) + EPS)
        xhat = s64 * rstd[:, None]
    else:
        mean = s64.mean(-1)
        rstd = torch.rsqrt((s64 - mean[:, None]).pow(2).mean(-1) + EPS)
        xhat = (s64 - mean[:, None]) * rstd[:, None]
    y = xhat
    if w64 is not None:
        y = y * w64
    if b64 is not None:
        y = y + b64
    out = {"y": y.detach(), "s": s, "mean": None if mean is None else mean.detach(), "rstd": rstd.detach()}
    if dy is not None and s64.numel():
        grads = torch.autograd.grad(y, [t for t in (s64, w64, b64) if t is not None], dy.double())
        dx = grads[0] + (0 if dres is None else dres.double())
        out["dx"] = dx
        out["dweight"] = grads[1] if w64 is not None else None
        out["dbias"] = grads[-1] if b64 is not None else None
    else:
        out["dx"] = torch.zeros(s.shape, dtype=torch.float64, device=s.device)
        out["dweight"] = None if w64 is None else torch.zeros_like(w64).detach()
        out["dbias"] = None if b64 is None else torch.zeros_like(b64).detach()
    return out


def _run_and_check(
    M,
    N,
    dtype,
    rms,
    residual,
    store_residual,
    wkind,
    bias,
    *,
    offset=0.0,
    seed=0,
    x=None,
    check_bwd=True,
    tol=None,
):
    gen = torch.Generator().manual_seed(seed)
    if x is None:
        x = (torch.randn(M, N, generator=gen) * 2 + offset).to(dtype).to(DEVICE)
    r = (torch.randn(M, N, generator=gen)).to(dtype).to(DEVICE) if residual else None
    w = _param(wkind, N, dtype, gen)
    b = _param("fp32" if wkind is None else wkind, N, dtype, gen) if bias else None
    y, ro, mean, rstd = ln.layer_norm_fwd(x, r, w, b, EPS, rms, store_residual)

    dy = torch.randn(M, N, generator=gen).to(dtype).to(DEVICE)
    dres = torch.randn(M, N, generator=gen).to(dtype).to(DEVICE) if (residual and store_residual) else None
    ref = _reference(x, r, w, b, rms, dy, dres)

    # forward
    assert y.dtype == dtype and y.shape == (M, N) and y.is_contiguous()
    _close(y, ref["y"], dtype, "fwd", "y", tol)
    if residual and store_residual:
        assert ro.dtype == dtype and ro.shape == (M, N)
        assert torch.equal(ro, ref["s"]), "residual_out must be x + residual rounded to x.dtype"
    else:
        assert ro.numel() == 0 and ro.dtype == dtype
    assert rstd.dtype == torch.float32 and rstd.shape == (M,)
    _close(rstd, ref["rstd"], torch.float32, "fwd", "rstd")
    if rms:
        assert mean.numel() == 0 and mean.dtype == torch.float32
    else:
        assert mean.dtype == torch.float32 and mean.shape == (M,)
        _close(mean, ref["mean"], torch.float32, "fwd", "mean")

    if not check_bwd:
        return
    s = ref["s"]
    dx, dw, db = ln.layer_norm_bwd(dy, s, w, mean, rstd, dres, rms, b is not None, True)
    assert dx.dtype == dtype and dx.shape == (M, N) and dx.is_contiguous()
    _close(dx, ref["dx"], dtype, "bwd", "dx", tol)
    if w is None:
        assert dw.numel() == 0
    else:
        assert dw.dtype == w.dtype and dw.shape == (N,)
        _close(dw, ref["dweight"], w.dtype, "bwd", "dweight", tol)
    if b is None:
        assert db.numel() == 0
    else:
        assert db.shape == (N,) and db.dtype == (w.dtype if w is not None else dtype)
        _close(db, ref["dbias"], db.dtype, "bwd", "dbias", tol)

    # need_dweight=False: same dx, empty parameter gradients
    dx2, dw2, db2 = ln.layer_norm_bwd(dy, s, w, mean, rstd, dres, rms, b is not None, False)
    assert torch.equal(dx2, dx) and dw2.numel() == 0 and db2.numel() == 0


# ---- sizes ----


@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
@pytest.mark.parametrize("M", [0, 1, 3, 17])
@pytest.mark.parametrize("N", [1, 7, 127, 1000, 1024, 1500])
def test_sizes_fp32(N, M, rms):
    _run_and_check(M, N, torch.float32, rms, residual=True, store_residual=True, wkind="fp32", bias=not rms)


@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hidden_4096(dtype, rms):
    _run_and_check(3, 4096, dtype, rms, residual=True, store_residual=True, wkind="same", bias=not rms)


# Rows wider than the in-register limits: the backward chunks above 4096 columns, the forward above 8192.
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
@pytest.mark.parametrize("N", [5000, 9000])
def test_chunked_rows(N, rms):
    _run_and_check(3, N, torch.float32, rms, residual=True, store_residual=True, wkind="fp32", bias=not rms)


def test_largest_hidden_size():
    _run_and_check(
        2,
        ln.MAX_HIDDEN_SIZE,
        torch.float32,
        False,
        residual=True,
        store_residual=True,
        wkind="fp32",
        bias=True,
    )


@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
@pytest.mark.parametrize("N", [127, 1500])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_sizes(dtype, N, rms):
    _run_and_check(17, N, dtype, rms, residual=True, store_residual=True, wkind="fp32", bias=not rms)


# ---- every feature combination ----

_DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_COMBOS = [
    (dtype, rms, residual, store, wkind, bias)
    for dtype in (torch.float32, torch.bfloat16, torch.float16)
    for rms in (False, True)
    for residual, store in ((False, False), (True, False), (True, True))
    for wkind in ((None, "fp32") if dtype == torch.float32 else (None, "fp32", "same"))  # fp32: same == fp32
    for bias in ((False,) if rms else (False, True))
]


@pytest.mark.parametrize(
    "dtype,rms,residual,store,wkind,bias",
    _COMBOS,
    ids=[
        f"{_DTYPE_IDS[c[0]]}-{'rms' if c[1] else 'ln'}-res{int(c[2])}{int(c[3])}-w{c[4]}-b{int(c[5])}"
        for c in _COMBOS
    ],
)
def test_feature_combinations(dtype, rms, residual, store, wkind, bias):
    _run_and_check(3, 127, dtype, rms, residual, store, wkind, bias, seed=1)


def test_store_residual_without_residual_is_empty():
    x = torch.randn(2, 8, device=DEVICE)
    _, ro, _, _ = ln.layer_norm_fwd(x, None, None, None, EPS, False, True)
    assert ro.numel() == 0 and ro.dtype == x.dtype


# ---- numerics ----


@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_offset_inputs(dtype, rms):
    """+1000 offset: the two-pass variance must not cancel (E[x^2] - E[x]^2 would lose everything).
    fp32: the row mean itself is an fp32 sum of values near 1000, off by about one ulp(1000) = 6.1e-5, and
    every (s - mean) carries that shift: allow 2 ulp(1000) * max(rstd * |w|) (rstd ~ 0.5, |w| < 3 here), ~2e-4
    forward and backward. For scale: torch's own fp32 F.layer_norm is off by 1.2e-4 on such inputs.
    bf16 inputs near 1000 are multiples of 4, so the fp32 sums are exact and the default budget holds."""
    tol = {**TOL, torch.float32: {"fwd": (2e-4, 1.3e-6), "bwd": (2e-4, 1e-5)}}
    _run_and_check(
        5,
        1000,
        dtype,
        rms,
        residual=True,
        store_residual=True,
        wkind="fp32",
        bias=not rms,
        offset=1000.0,
        tol=tol,
    )


@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
@pytest.mark.parametrize("N", [127, 9000])
def test_constant_rows(N, rms):
    """var = 0 (LayerNorm) or all-zero rows (RMSNorm): rstd = 1/sqrt(eps), finite outputs and gradients.
    The constants and N make the fp32 mean exact, so the float64 reference applies unchanged."""
    M = 4
    vals = torch.tensor([0.0, 0.375, -3.25, 1024.0])
    x = vals[:, None].expand(M, N).contiguous().to(DEVICE)
    if rms:
        x[1:] = 0.0
    gen = torch.Generator().manual_seed(3)
    w = _param("fp32", N, torch.float32, gen)
    b = None if rms else _param("fp32", N, torch.float32, gen)
    y, _, mean, rstd = ln.layer_norm_fwd(x, None, w, b, EPS, rms, False)
    dy = torch.randn(M, N, generator=gen).to(DEVICE)
    dx, dw, db = ln.layer_norm_bwd(dy, x, w, mean, rstd, None, rms, b is not None, True)
    for name, t in (("y", y), ("rstd", rstd), ("dx", dx), ("dw", dw)) + (
        (("db", db),) if b is not None else ()
    ):
        assert torch.isfinite(t).all(), f"{name} not finite"
    ref = _reference(x, None, w, b, rms, dy, None)
    _close(y, ref["y"], torch.float32, "fwd", "y")
    _close(rstd, ref["rstd"], torch.float32, "fwd", "rstd")
    # dx = rstd * (...) with rstd = 316: fp32 noise in the row sums is amplified by rstd.
    torch.testing.assert_close(dx.double(), ref["dx"], atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
@pytest.mark.parametrize("N", [127, 5000])
def test_nan_stays_in_its_row(N, rms):
    M = 5
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(M, N, generator=gen).to(DEVICE)
    x[2, N // 2] = float("nan")
    w = _param("fp32", N, torch.float32, gen)
    b = None if rms else _param("fp32", N, torch.float32, gen)
    y, _, mean, rstd = ln.layer_norm_fwd(x, None, w, b, EPS, rms, False)
    dy = torch.randn(M, N, generator=gen).to(DEVICE)
    dx, dw, _ = ln.layer_norm_bwd(dy, x, w, mean, rstd, None, rms, b is not None, True)
    others = [0, 1, 3, 4]
    assert torch.isnan(y[2]).all() and torch.isnan(dx[2]).all() and torch.isnan(rstd[2])
    assert torch.isfinite(y[others]).all() and torch.isfinite(dx[others]).all()
    ref = _reference(x, None, w, b, rms, dy, None)
    _close(y, ref["y"], torch.float32, "fwd", "y")
    _close(dx, ref["dx"], torch.float32, "bwd", "dx")
    # dweight/dbias sum over all rows, so they are NaN like the reference's.
    _close(dw, ref["dweight"], torch.float32, "bwd", "dweight")


# ---- layouts ----


def _padded(t, pad):
    """t as a row-slice of a wider NaN-filled buffer (row stride N + pad)."""
    M, N = t.shape
    buf = torch.full((M, N + pad), float("nan"), dtype=t.dtype, device=t.device)
    buf[:, :N] = t
    view = buf[:, :N]
    assert view.stride() == (N + pad, 1)
    return view


@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("N", [127, 1000, 5000])
def test_strided_rows_nan_padding_bitwise(N, dtype, rms):
    """Row slices of wider NaN-padded buffers give bit-identical results to contiguous inputs."""
    M = 5
    gen = torch.Generator().manual_seed(5)
    x, r, dy, dres = (torch.randn(M, N, generator=gen).to(dtype).to(DEVICE) for _ in range(4))
    w = _param("fp32", N, dtype, gen)
    b = None if rms else _param("fp32", N, dtype, gen)
    out_c = ln.layer_norm_fwd(x, r, w, b, EPS, rms, True)
    out_p = ln.layer_norm_fwd(_padded(x, 3), _padded(r, 17), w, b, EPS, rms, True)
    for name, a, c in zip(("y", "residual_out", "mean", "rstd"), out_c, out_p):
        assert torch.equal(a, c) or (a.numel() == 0 and c.numel() == 0), f"{name} differs with padding"
    s = out_c[1]
    grads_c = ln.layer_norm_bwd(dy, s, w, out_c[2], out_c[3], dres, rms, b is not None, True)
    grads_p = ln.layer_norm_bwd(
        _padded(dy, 5), _padded(s, 1), w, out_c[2], out_c[3], _padded(dres, 9), rms, b is not None, True
    )
    for name, a, c in zip(("dx", "dweight", "dbias"), grads_c, grads_p):
        assert torch.equal(a, c), f"{name} differs with padding"
    assert torch.isfinite(out_c[0]).all() and torch.isfinite(grads_c[0]).all()
    ref = _reference(x, r, w, b, rms, dy, dres)
    _close(out_c[0], ref["y"], dtype, "fwd", "y")
    _close(grads_c[0], ref["dx"], dtype, "bwd", "dx")


def test_non_unit_column_stride_is_copied():
    gen = torch.Generator().manual_seed(6)
    xt = torch.randn(64, 5, generator=gen).to(DEVICE)
    x = xt.t()  # (5, 64), column stride 5
    y, _, _, _ = ln.layer_norm_fwd(x, None, None, None, EPS, False, False)
    y_c, _, _, _ = ln.layer_norm_fwd(x.contiguous(), None, None, None, EPS, False, False)
    assert torch.equal(y, y_c)


# ---- determinism, limits ----


@pytest.mark.parametrize("N", [1000, 5000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dweight_dbias_bitwise_reproducible(dtype, N):
    M = 17
    gen = torch.Generator().manual_seed(7)
    x, dy = (torch.randn(M, N, generator=gen).to(dtype).to(DEVICE) for _ in range(2))
    w = _param("fp32", N, dtype, gen)
    b = _param("fp32", N, dtype, gen)
    _, _, mean, rstd = ln.layer_norm_fwd(x, None, w, b, EPS, False, False)
    first = ln.layer_norm_bwd(dy, x, w, mean, rstd, None, False, True, True)
    second = ln.layer_norm_bwd(dy, x, w, mean, rstd, None, False, True, True)
    for a, c in zip(first, second):
        assert torch.equal(a, c)
    ref = _reference(x, None, w, b, False, dy, None)
    _close(first[1], ref["dweight"], torch.float32, "bwd", "dweight")
    _close(first[2], ref["dbias"], torch.float32, "bwd", "dbias")


def test_hidden_size_above_limit_raises():
    N = ln.MAX_HIDDEN_SIZE + 1
    x = torch.zeros(1, N, device=DEVICE)
    with pytest.raises(ValueError, match=rf"hidden size {N}.*{ln.MAX_HIDDEN_SIZE}"):
        ln.layer_norm_fwd(x, None, None, None, EPS, False, False)
    with pytest.raises(ValueError, match=rf"hidden size {N}.*{ln.MAX_HIDDEN_SIZE}"):
        ln.layer_norm_bwd(x, x, None, torch.zeros(1), torch.ones(1), None, False, False, True)


def test_empty_batch_backward_gives_zero_parameter_grads():
    x = torch.empty(0, 33, device=DEVICE)
    w = torch.ones(33, device=DEVICE)
    y, ro, mean, rstd = ln.layer_norm_fwd(x, x, w, w, EPS, False, True)
    assert y.shape == (0, 33) and ro.shape == (0, 33) and mean.shape == (0,) and rstd.shape == (0,)
    dx, dw, db = ln.layer_norm_bwd(x, x, w, mean, rstd, None, False, True, True)
    zeros = torch.zeros(33, device=DEVICE)
    assert dx.shape == (0, 33) and torch.equal(dw, zeros) and torch.equal(db, zeros)


@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
def test_zero_hidden_size_matches_torch(rms):
    """N == 0: empty outputs, no launch; mean 0 and rstd NaN like torch.native_layer_norm."""
    x = torch.empty(3, 0, device=DEVICE)
    y, ro, mean, rstd = ln.layer_norm_fwd(x, x, None, None, EPS, rms, True)
    assert y.shape == (3, 0) and ro.shape == (3, 0) and rstd.shape == (3,) and torch.isnan(rstd).all()
    if not rms:
        _, ref_mean, ref_rstd = torch.native_layer_norm(x, [0], None, None, EPS)
        assert torch.equal(mean, ref_mean.flatten()) and torch.isnan(ref_rstd).all()
    dx, dw, db = ln.layer_norm_bwd(x, x, None, mean, rstd, None, rms, False, True)
    assert dx.shape == (3, 0) and dw.numel() == 0 and db.numel() == 0


def test_compile_configs_cover_launcher_choices():
    """The offline compile check sees exactly the launch options the launchers use."""
    seen = {
        (c[0].__name__, c[2].get("BLOCK_N"), c[2].get("SINGLE_CHUNK"), c[3], c[4].get("maxnreg"))
        for c in ln.compile_configs(full=True)
    }
    for N in (1, 7, 127, 1000, 1024, 1500, 4096, 5000, 8192, 9000, ln.MAX_HIDDEN_SIZE):
        bf, sf = ln._block_n(N, ln._MAX_FUSED_BLOCK_N_FWD)
        fo = ln._fwd_launch_options(bf)
        assert ("_layer_norm_fwd_kernel", bf, sf, fo["num_warps"], fo["maxnreg"]) in seen
        bb, sb = ln._block_n(N, ln._MAX_FUSED_BLOCK_N_BWD)
        bo = ln._bwd_launch_options(bb)
        assert ("_layer_norm_bwd_kernel", bb, sb, bo["num_warps"], bo["maxnreg"]) in seen
