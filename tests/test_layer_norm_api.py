"""LayerNorm API: torch's error texts, drop-in modules, custom ops (opcheck) and torch.compile."""
import pytest
import torch

import pyattn
from conftest import backend_params


def test_validation_errors_match_torch():
    x = torch.randn(2, 3)
    with pytest.raises(RuntimeError, match=r"Given normalized_shape=\[4\], expected input with shape \[\*, 4\], "
                                           r"but got input of size\[2, 3\]"):
        pyattn.layer_norm(x, (4,))
    with pytest.raises(RuntimeError, match=r"Expected weight to be of same shape as normalized_shape, but got "
                                           r"weight of shape \[4\] and normalized_shape = \[3\]"):
        pyattn.layer_norm(x, (3,), torch.ones(4))
    with pytest.raises(RuntimeError, match=r"Expected bias to be of same shape"):
        pyattn.layer_norm(x, (3,), None, torch.ones(4))
    with pytest.raises(RuntimeError, match=r"expected input with shape \[\*4\]"):
        pyattn.rms_norm(x, (4,))
    with pytest.raises(RuntimeError, match="at least 1-dimensional"):
        pyattn.layer_norm(x, ())
    with pytest.raises(NotImplementedError, match="expected a floating point input, got int32"):  # torch's type
        pyattn.layer_norm(x.int(), (3,))
    with pytest.raises(RuntimeError, match="expected weight dtype to be float32 .* got float64"):
        pyattn.layer_norm(x, (3,), torch.ones(3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"Expected residual to have the input's shape \[2, 3\], got \[3\]"):
        pyattn.layer_norm(x, (3,), residual=torch.ones(3))
    with pytest.raises(RuntimeError, match="Expected residual to have the input's dtype float32, got int32"):
        pyattn.layer_norm(x, (3,), residual=x.int())  # (a floating residual of another dtype promotes, as x + r)
    for eps in (0.0, -1e-5, float("nan")):
        with pytest.raises(ValueError, match="eps must be a finite number > 0"):
            pyattn.layer_norm(x, (3,), eps=eps)
    x_before = x.clone()
    with pytest.raises(RuntimeError):
        pyattn.layer_norm(x, (4,))
    assert torch.equal(x, x_before)  # an error leaves inputs untouched


def test_modules_mirror_torch_nn():
    for kwargs in ({}, {"elementwise_affine": False}, {"bias": False}, {"eps": 1e-3}):
        ours, theirs = pyattn.nn.LayerNorm(32, **kwargs), torch.nn.LayerNorm(32, **kwargs)
        assert list(ours.state_dict()) == list(theirs.state_dict())
        if ours.weight is not None:
            with torch.no_grad():
                theirs.weight.normal_()
                if theirs.bias is not None:
                    theirs.bias.normal_()
        ours.load_state_dict(theirs.state_dict(), strict=True)
        theirs.load_state_dict(ours.state_dict(), strict=True)
        x = torch.randn(4, 5, 32)
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1.3e-6)
    ours, theirs = pyattn.nn.RMSNorm([4, 8]), torch.nn.RMSNorm([4, 8])
    with torch.no_grad():
        theirs.weight.normal_()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(3, 4, 8)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1.3e-6)
    assert pyattn.nn.RMSNorm(8).eps is None and pyattn.nn.LayerNorm(8).eps == 1e-5


def test_add_norm_module():
    m = pyattn.nn.AddNorm(16)
    ref = torch.nn.LayerNorm(16)
    with torch.no_grad():
        ref.weight.normal_()
        ref.bias.normal_()
    m.load_state_dict(ref.state_dict(), strict=True)
    x, r = torch.randn(2, 3, 16), torch.randn(2, 3, 16)
    y, s = m(x, r, return_residual=True)
    torch.testing.assert_close(y, ref(x + r), atol=1e-5, rtol=1.3e-6)
    assert torch.equal(s, x + r)


@pytest.mark.parametrize("backend", backend_params("layer_norm"))
def test_opcheck_custom_ops(backend):
    from pyattn.ops.layer_norm import _norm_bwd, _norm_fwd

    x, r = torch.randn(3, 20, requires_grad=True), torch.randn(3, 20, requires_grad=True)
    w, b = torch.randn(20, requires_grad=True), torch.randn(20, requires_grad=True)
    for rms in (False, True):
        args = (x, r, w, None if rms else b, 1e-5, rms, True, backend)
        torch.library.opcheck(_norm_fwd.op, args)
        y, s, mean, rstd = _norm_fwd(*args)
        torch.library.opcheck(_norm_bwd.op, (torch.randn(3, 20), s.detach(), w.detach(), mean.detach(), rstd.detach(),
                                          torch.randn(3, 20), 1e-5, rms, not rms, True, backend))


def test_opcheck_native_ops():
    if get_cpp_reason():
        pytest.skip(get_cpp_reason())
    x, r, w, b = torch.randn(3, 20), torch.randn(3, 20), torch.randn(20), torch.randn(20)
    torch.library.opcheck(torch.ops.pyattn.layer_norm_fwd.default, (x, r, w, b, 1e-5, False, True))
    y, s, mean, rstd = torch.ops.pyattn.layer_norm_fwd(x, r, w, b, 1e-5, False, True)
    torch.library.opcheck(torch.ops.pyattn.layer_norm_bwd.default,
                          (torch.randn(3, 20), s, w, mean, rstd, None, False, True, True))


def get_cpp_reason():
    ok, why = pyattn.dispatch.get_backend("cpp").availability()
    return "" if ok else f"pyattn._C unavailable: {why}"


@pytest.mark.parametrize("compile_backend", ["eager", "aot_eager", "inductor"])
def test_torch_compile_fullgraph(compile_backend):
    torch._dynamo.reset()
    m = pyattn.nn.AddNorm(24)

    def f(x, r):
        y, s = m(x, r, return_residual=True)
        return pyattn.rms_norm(y, (24,), residual=s) * 2

    x, r = torch.randn(4, 24, requires_grad=True), torch.randn(4, 24, requires_grad=True)
    cf = torch.compile(f, fullgraph=True, backend=compile_backend)
    out = cf(x, r)
    torch.testing.assert_close(out, f(x, r))
    g1 = torch.autograd.grad(out.sum(), (x, r, m.weight))
    g2 = torch.autograd.grad(f(x, r).sum(), (x, r, m.weight))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)
