"""pyattn.layer_norm / rms_norm (+ fused residual) on every CPU backend against a float64 oracle.

Oracle: the torch backend on float64 inputs (itself checked against torch.nn.functional in float64 below).
"""
import pytest
import torch
import torch.nn.functional as F

import pyattn
from conftest import backend_params

# (atol, rtol) against the fp64 oracle, forward / backward. fp32: TESTING.md's policy. Half types: one rounding
# of the output (bf16 ulp 2^-8 = 3.9e-3, fp16 2^-11 = 4.9e-4 relative) on values of size ~3 (|xhat| <= ~4), plus
# the rounding of x + r before normalising; backward sums N products of rounded values, hence the larger atol.
TOL = {
    torch.float32: ((1e-5, 1.3e-6), (1e-4, 1e-5)),
    torch.bfloat16: ((2e-2, 1e-2), (5e-2, 2e-2)),
    torch.float16: ((4e-3, 2e-3), (1e-2, 4e-3)),
}
LN = backend_params("layer_norm")


def _oracle(x, w, b, r, eps, rms):
    """Float64 reference with the kernels' rounding point: the residual sum is rounded to x.dtype first."""
    s = x if r is None else (x + r)
    s64 = s.double()
    w64 = None if w is None else w.double()
    if rms:
        return F.rms_norm(s64, (x.shape[-1],), w64, eps), s
    b64 = None if b is None else b.double()
    return F.layer_norm(s64, (x.shape[-1],), w64, b64, eps), s


def _close(out, ref, dtype, bwd=False):
    atol, rtol = TOL[dtype][1 if bwd else 0]
    torch.testing.assert_close(out.double(), ref.double(), atol=atol, rtol=rtol, equal_nan=True)


def _sizes(backend):
    # The Triton interpreter runs programs one by one: fewer rows there.
    return [(0, 7), (1, 1), (3, 127), (5, 1000), (2, 1023), (4, 1024), (3, 1500)] + \
           ([(2, 4096)] if backend != "triton" else [])


@pytest.mark.parametrize("backend", LN)
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_forward_backward_shapes(backend, rms, dtype):
    g = torch.Generator().manual_seed(0)
    for m, n in _sizes(backend):
        x = torch.randn(m, n, generator=g).to(dtype).requires_grad_()
        r = torch.randn(m, n, generator=g).to(dtype).requires_grad_()
        w = (torch.randn(n, generator=g) * 0.5 + 1).requires_grad_()  # fp32 weights on half inputs
        b = None if rms else torch.randn(n, generator=g).requires_grad_()
        fn = pyattn.rms_norm if rms else pyattn.layer_norm
        args = (x, (n,), w) if rms else (x, (n,), w, b)
        y, s = fn(*args, 1e-5, residual=r, return_residual=True, backend=backend)
        ref, s_ref = _oracle(x.detach(), w.detach(), None if b is None else b.detach(), r.detach(), 1e-5, rms)
        assert y.dtype == dtype and y.shape == x.shape
        _close(y, ref, dtype)
        assert torch.equal(s, s_ref)  # the sum is rounded exactly like x + r
        dy, ds = torch.randn(m, n, generator=g).to(dtype), torch.randn(m, n, generator=g).to(dtype)
        grads = torch.autograd.grad((y, s), [x, r, w] + ([b] if b is not None else []), (dy, ds), allow_unused=True)
        x64, r64, w64 = (t.detach().double().requires_grad_() for t in (x, r, w))
        b64 = None if b is None else b.detach().double().requires_grad_()
        s64 = x64 + r64
        y64 = F.rms_norm(s64, (n,), w64, 1e-5) if rms else F.layer_norm(s64, (n,), w64, b64, 1e-5)
        ref_grads = torch.autograd.grad((y64, s64), [x64, r64, w64] + ([b64] if b64 is not None else []),
                                        (dy.double(), ds.double()))
        for got, want in zip(grads, ref_grads):
            # weight grads sum over rows: scale the tolerance with the row count
            _close(got, want, dtype if got.shape == x.shape else torch.float32 if dtype == torch.float32 else dtype,
                   bwd=True)


@pytest.mark.parametrize("backend", LN)
def test_offset_and_constant_rows(backend):
    """+1000 offsets stay accurate (no E[x^2] - E[x]^2 cancellation); constant rows give finite output (= bias)."""
    n = 1000
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, n, generator=g) * 0.1 + 1000.0
    x[1] = 3.0
    w, b = torch.randn(n, generator=g), torch.randn(n, generator=g)
    y = pyattn.layer_norm(x, (n,), w, b, backend=backend)
    ref = F.layer_norm(x.double(), (n,), w.double(), b.double())
    # fp32 inputs near 1000 carry an absolute error of 6e-5 each (ulp(1000)/2): x-mean in fp32 has relative error
    # ~ 6e-5 / 0.1 = 6e-4 of the deviation itself, so compare with that bound, not the generic 1e-5.
    torch.testing.assert_close(y.double(), ref, atol=2e-3, rtol=1e-3)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y[1], b)


@pytest.mark.parametrize("backend", LN)
def test_single_element_rows_give_bias_and_zero_input_grad(backend):
    """normalized_shape (1,): y = bias and dx = 0 exactly (torch's result), even at rstd = 1 / sqrt(eps) = 1000,
    where dx = rstd (g - mean(g)) shows any disagreement between the two passes' g = dy w (the CPU kernel's
    pass 2 once had GCC fuse dy * w - mean(g) into an FMA: 2e-5 instead of 0)."""
    g = torch.Generator().manual_seed(4)
    x, r = torch.randn(33, 1, generator=g).requires_grad_(), torch.randn(33, 1, generator=g)
    w, b = torch.randn(1, generator=g).requires_grad_(), torch.randn(1, generator=g).requires_grad_()
    for res in (None, r + 100.0):
        y = pyattn.layer_norm(x, (1,), w, b, 1e-6, residual=res, backend=backend)
        assert torch.equal(y, b.detach().expand(33, 1))
        dx, dw, db = torch.autograd.grad(y, (x, w, b), torch.randn(33, 1, generator=g))
        assert torch.equal(dx, torch.zeros_like(dx)) and torch.equal(dw, torch.zeros_like(dw))


@pytest.mark.parametrize("backend", LN)
def test_nan_row_isolated_and_padding(backend):
    n = 127
    wide = torch.full((5, 160), float("nan"))
    x = wide[:, :n]  # row stride 160, NaN past the logical end of each row
    x.copy_(torch.randn(5, n))
    x[2, 5] = float("nan")
    w, b = torch.randn(n), torch.randn(n)
    y = pyattn.layer_norm(x, (n,), w, b, backend=backend)
    assert torch.isnan(y[2]).all() and torch.isfinite(y[[0, 1, 3, 4]]).all()
    y_dense = pyattn.layer_norm(x.contiguous(), (n,), w, b, backend=backend)
    assert torch.equal(y.nan_to_num(7.0), y_dense.nan_to_num(7.0))


@pytest.mark.parametrize("backend", LN)
def test_layouts(backend):
    """Transposed views, 3-D inputs with sliced leading dims, expanded rows, and multi-dim normalized_shape."""
    base = torch.randn(6, 4, 33)
    w, b = torch.randn(33), torch.randn(33)
    for x in (base[::2], base.transpose(0, 1), base[:, 1:3], torch.randn(1, 33).expand(5, 33)):
        y = pyattn.layer_norm(x, (33,), w, b, backend=backend)
        torch.testing.assert_close(y, F.layer_norm(x, (33,), w, b), atol=1e-5, rtol=1.3e-6)
    x = torch.randn(3, 4, 5, 6)
    w2, b2 = torch.randn(5, 6), torch.randn(5, 6)
    y = pyattn.layer_norm(x, (5, 6), w2, b2, backend=backend)
    torch.testing.assert_close(y, F.layer_norm(x, (5, 6), w2, b2), atol=1e-5, rtol=1.3e-6)
    x_t = torch.randn(8, 16).t()  # last dim strided: copied, still right
    torch.testing.assert_close(pyattn.rms_norm(x_t, (8,), backend=backend), F.rms_norm(x_t, (8,)),
                               atol=1e-5, rtol=1.3e-6)


@pytest.mark.parametrize("backend", LN)
def test_affine_variants_and_eps(backend):
    x = torch.randn(3, 64)
    for w, b in ((None, None), (torch.randn(64), None), (None, torch.randn(64))):
        for eps in (1e-5, 1e-2):
            torch.testing.assert_close(pyattn.layer_norm(x, 64, w, b, eps, backend=backend),
                                       F.layer_norm(x, (64,), w, b, eps), atol=1e-5, rtol=1.3e-6)
    torch.testing.assert_close(pyattn.rms_norm(x, [64], None, backend=backend), F.rms_norm(x, [64]),
                               atol=1e-5, rtol=1.3e-6)


@pytest.mark.parametrize("backend", LN)
def test_weight_grads_bitwise_reproducible(backend):
    torch.use_deterministic_algorithms(True)
    try:
        x = torch.randn(37, 300, requires_grad=True)
        w, b = torch.randn(300, requires_grad=True), torch.randn(300, requires_grad=True)
        dy = torch.randn(37, 300)
        out = []
        for _ in range(2):
            y = pyattn.layer_norm(x, (300,), w, b, backend=backend)
            out.append(torch.autograd.grad(y, (x, w, b), dy))
        for a, c in zip(*out):
            assert torch.equal(a, c)
    finally:
        torch.use_deterministic_algorithms(False)


def test_gradcheck():
    """float64 gradcheck runs on the torch backend (the kernels take fp32/bf16/fp16; their backward is checked
    against float64 autograd in test_forward_backward_shapes)."""
    backend = "torch"
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    r = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, r, w, b: pyattn.layer_norm(x, (7,), w, b, residual=r, return_residual=True, backend=backend),
        (x, r, w, b))
    assert torch.autograd.gradcheck(lambda x, w: pyattn.rms_norm(x, (7,), w, backend=backend), (x, w))


def test_torch_backend_matches_torch_functional_fp64():
    x = torch.randn(4, 9, dtype=torch.float64)
    w, b = torch.randn(9, dtype=torch.float64), torch.randn(9, dtype=torch.float64)
    torch.testing.assert_close(pyattn.layer_norm(x, (9,), w, b, backend="torch"), F.layer_norm(x, (9,), w, b),
                               atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(pyattn.rms_norm(x, (9,), w, backend="torch"), F.rms_norm(x, (9,), w),
                               atol=1e-12, rtol=1e-12)


def test_empty_batch():
    for backend in ("torch", "cpp"):
        x = torch.randn(0, 5, 16, requires_grad=True)
        w = torch.ones(16, requires_grad=True)
        y = pyattn.layer_norm(x, (16,), w, backend=backend)
        assert y.shape == (0, 5, 16)
        gx, gw = torch.autograd.grad(y.sum(), (x, w))
        assert gx.shape == x.shape and torch.equal(gw, torch.zeros(16))


@pytest.mark.parametrize("backend", LN)
def test_empty_inputs_of_any_layout_give_empty_outputs(backend):
    # No element to normalise: no kernel runs, whatever the layout or the forced backend (an empty tensor's
    # .contiguous() keeps a non-unit last stride, which the kernels' checks refuse), and the weight's grad is 0.
    cases = [(torch.randn(0, 34)[:, ::2], (17,)), (torch.randn(3, 0), (0,)), (torch.randn(2, 0, 4), (0, 4))]
    for x, shape in cases:
        x.requires_grad_(True)
        w = torch.ones(shape, requires_grad=True)
        for rms in (False, True):
            fn = pyattn.rms_norm if rms else pyattn.layer_norm
            y = fn(x, shape, w, backend=backend)
            assert y.shape == x.shape
            gx, gw = torch.autograd.grad(y.sum(), (x, w))
            assert gx.shape == x.shape and torch.equal(gw, torch.zeros(shape))
        r = torch.randn(*x.shape[:-1], x.shape[-1] * 2)[..., ::2]
        y, s = pyattn.layer_norm(x, shape, w, residual=r, return_residual=True, backend=backend)
        assert y.shape == s.shape == x.shape


@pytest.mark.parametrize("backend", LN)
def test_strided_and_expanded_weight_and_bias(backend):
    # 1-D parameters of any layout (a step slice, an expanded scalar) are taken as torch takes them; the grads
    # reach the original tensors.
    torch.manual_seed(0)
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    wsrc = torch.randn(16, dtype=torch.float64, requires_grad=True)
    bsrc = torch.randn(1, dtype=torch.float64, requires_grad=True)
    xf = x.detach().float().requires_grad_(True)
    for rms in (False, True):
        w, b = wsrc[::2], bsrc.expand(8)
        if rms:
            got = pyattn.rms_norm(xf, (8,), w.float(), 1e-6, backend=backend)
            ref = F.rms_norm(x, (8,), w, 1e-6)
        else:
            got = pyattn.layer_norm(xf, (8,), w.float(), b.float(), backend=backend)
            ref = F.layer_norm(x, (8,), w, b)
        _close(got, ref, torch.float32)
        gw, = torch.autograd.grad(got.sum(), (wsrc,))
        rw, = torch.autograd.grad(ref.sum(), (wsrc,))
        _close(gw, rw, torch.float32, bwd=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_rms_norm_default_eps_is_torchs(dtype):
    # eps=None: torch computes with the epsilon of its compute type (float32's for half inputs, not
    # finfo(bfloat16).eps = 7.8e-3, which on rows with mean(x^2) near 1e-4 shrinks the output ~8x).
    x = (torch.randn(3, 8) * 0.01).to(dtype)
    ref = torch.nn.RMSNorm(8, dtype=dtype)
    mod = pyattn.nn.RMSNorm(8, dtype=dtype)
    assert mod.eps is None and ref.eps is None
    for got in (mod(x), pyattn.rms_norm(x, (8,))):
        torch.testing.assert_close(got, ref(x), atol=0, rtol=1e-2 if dtype in (torch.bfloat16, torch.float16) else
                                   1e-5)


def test_residual_of_another_dtype_promotes_as_x_plus_r():
    # LN(x + r) with x fp32 and r bf16 (a residual stream next to a sub-layer's output under torch.autocast):
    # torch's `x + r` promotes to fp32, and so does the fused op (it raised a dtype error before).
    x = torch.randn(4, 16, requires_grad=True)
    r = torch.randn(4, 16).bfloat16().requires_grad_(True)
    y, s = pyattn.layer_norm(x, (16,), residual=r, return_residual=True)
    assert y.dtype == s.dtype == torch.float32
    torch.testing.assert_close(y, F.layer_norm(x + r, (16,)))
    torch.testing.assert_close(s, x + r)
    gr, = torch.autograd.grad(y.sum() + s.sum(), r)
    assert gr.dtype == torch.bfloat16
    with pytest.raises(RuntimeError, match="residual to have the input's dtype"):
        pyattn.layer_norm(x, (16,), residual=torch.ones(4, 16, dtype=torch.int32))


@pytest.mark.parametrize("backend", LN)
def test_fp32_bias_without_weight_gets_an_fp32_accurate_grad(backend):
    # 16-bit input, fp32 bias, no weight: dbias = sum of dy over rows, accumulated and returned in fp32 (the
    # kernels gave it in the input's dtype without a weight: 7e-3 off at 64 fp16 rows).
    g = torch.Generator().manual_seed(0)
    x, dy = (torch.randn(64, 32, generator=g).half() for _ in range(2))
    b = torch.randn(32, generator=g).requires_grad_(True)
    y = pyattn.layer_norm(x, (32,), None, b, backend=backend)
    assert torch.equal(y, pyattn.layer_norm(x, (32,), torch.ones(32), b.detach(), backend=backend))
    db, = torch.autograd.grad(y, b, dy)
    assert db.dtype == torch.float32
    torch.testing.assert_close(db.double(), dy.double().sum(0), atol=1e-5, rtol=1e-6)
