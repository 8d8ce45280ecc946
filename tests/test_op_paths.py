"""The two ways down of every pyattn op (pyattn/ops/_common.Op): plain eager calls run the op's implementation
directly (with the same autograd formula, as a torch.autograd.Function), everything else goes through the
registered torch custom op. Both must give bitwise the same outputs and gradients, and each must be taken
exactly when it should be."""
import pytest
import torch
from torch.overrides import TorchFunctionMode

import pyattn
from pyattn.ops import attention as attn_ops
from pyattn.ops import gru as gru_ops
from pyattn.ops import layer_norm as ln_ops
from pyattn.ops._common import plain_eager

BACKENDS = ["torch", "cpp"]


class _ForceCustomOp(TorchFunctionMode):
    """A do-nothing torch function mode: while it is active, plain_eager() is False."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _leaves(*shapes, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g, dtype=dtype).requires_grad_() for s in shapes]


def _run_both(fn, leaves):
    """fn(*leaves) -> tensor or tuple; returns [(outputs, grads)] for the eager path and the custom-op path."""
    results = []
    for force in (False, True):
        xs = [x.detach().clone().requires_grad_() for x in leaves]
        if force:
            with _ForceCustomOp():
                out = fn(*xs)
        else:
            out = fn(*xs)
        outs = out if isinstance(out, tuple) else (out,)
        loss = sum((o.float() * (i + 1)).sum() for i, o in enumerate(outs) if o.requires_grad)
        grads = torch.autograd.grad(loss, xs, allow_unused=True)
        results.append(([o.detach() for o in outs], grads))
    return results


def _assert_same(results):
    (o1, g1), (o2, g2) = results
    for a, b in zip(o1, o2):
        assert torch.equal(a, b)
    for a, b in zip(g1, g2):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_attention_paths_agree(backend, causal):
    q, k, v = _leaves((2, 4, 37, 16), (2, 2, 45, 16), (2, 2, 45, 24))

    def fn(q, k, v):
        return pyattn.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True, backend=backend)

    _assert_same(_run_both(fn, [q, k, v]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_dropout_paths_agree(backend):
    q, k, v = _leaves((1, 2, 20, 8), (1, 2, 20, 8), (1, 2, 20, 8))

    def fn(q, k, v):
        torch.manual_seed(123)  # same seed on both paths: same keep-mask
        return pyattn.scaled_dot_product_attention(q, k, v, dropout_p=0.3, backend=backend)

    _assert_same(_run_both(fn, [q, k, v]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rms", [False, True])
def test_norm_paths_agree(backend, rms):
    x, r, w, b = _leaves((5, 3, 48), (5, 3, 48), (48,), (48,), seed=1)

    def fn(x, r, w, b):
        if rms:
            return pyattn.rms_norm(x, (48,), w, residual=r, return_residual=True, backend=backend)
        return pyattn.layer_norm(x, (48,), w, b, residual=r, return_residual=True, backend=backend)

    _assert_same(_run_both(fn, [x, r, w, b]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gru_paths_agree(backend):
    x, h, wih, whh, bih, bhh = _leaves((7, 3, 10), (3, 12), (36, 10), (36, 12), (36,), (36,), seed=2)

    def cell(x, h, wih, whh, bih, bhh):
        return pyattn.gru_cell(x[0], h, wih, whh, bih, bhh, backend=backend)

    def layer(x, h, wih, whh, bih, bhh):
        return gru_ops.gru_layer(x, h, wih, whh, bih, bhh, reverse=True, backend=backend)

    _assert_same(_run_both(cell, [x, h, wih, whh, bih, bhh]))
    _assert_same(_run_both(layer, [x, h, wih, whh, bih, bhh]))


def _fail(*args):
    raise AssertionError("the custom op was called")


def test_plain_eager_calls_skip_the_custom_op(monkeypatch):
    for op in (attn_ops._attention_fwd, attn_ops._attention_bwd, ln_ops._norm_fwd, ln_ops._norm_bwd):
        monkeypatch.setattr(op, "op", _fail)
    q, k, v = _leaves((1, 2, 9, 8), (1, 2, 9, 8), (1, 2, 9, 8))
    pyattn.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
    x, w = _leaves((4, 32), (32,))
    pyattn.layer_norm(x, (32,), w).sum().backward()
    with torch.no_grad():
        pyattn.scaled_dot_product_attention(q, k, v)
    assert q.grad is not None and w.grad is not None


def test_other_calls_take_the_custom_op(monkeypatch):
    calls = []
    real = attn_ops._attention_fwd.op
    monkeypatch.setattr(attn_ops._attention_fwd, "op", lambda *a: calls.append(1) or real(*a))
    q, k, v = (torch.randn(1, 2, 9, 8) for _ in range(3))
    with _ForceCustomOp():
        pyattn.scaled_dot_product_attention(q, k, v)
    assert calls == [1]
    # vmap: the custom op path (functorch transforms need it)
    before = len(calls)
    torch.func.vmap(lambda q: pyattn.scaled_dot_product_attention(q, k[0], v[0]))(q)
    assert len(calls) > before


def test_plain_eager_predicate():
    t = torch.randn(3)
    p = torch.nn.Parameter(torch.randn(3))
    assert plain_eager((t, p, None, 1.0, "x"))
    assert not plain_eager((torch.empty(3, device="meta"),))
    with _ForceCustomOp():
        assert not plain_eager((t,))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        assert not plain_eager((t,))

    def f(x):
        assert not plain_eager((x,))
        return x.sum()

    torch.func.grad(f)(t)

    def traced(x):
        assert not plain_eager((x,))
        return x * 2

    torch.jit.trace(traced, t, check_trace=False)  # (the check re-runs it untraced)


def test_eager_path_keeps_the_forward_backend_for_dropout():
    """With dropout the backward must run on the backend that drew the keep-mask: rng_state carries it on both
    paths."""
    q, k, v = _leaves((1, 2, 16, 8), (1, 2, 16, 8), (1, 2, 16, 8))
    out, lse, state = attn_ops._attention_fwd(q, k, v, None, 0.2, False, False, 0.3,
                                              torch.tensor([5, 0]), True, "cpp")
    assert int(state[2]) == attn_ops._backend_id("cpp")
    assert out.grad_fn is not None and not lse.requires_grad and not state.requires_grad


def test_eager_path_under_compile_uses_the_custom_op():
    q, k, v = (torch.randn(1, 2, 9, 8) for _ in range(3))
    f = torch.compile(lambda q, k, v: pyattn.scaled_dot_product_attention(q, k, v), backend="eager",
                      fullgraph=True)
    torch.testing.assert_close(f(q, k, v), pyattn.scaled_dot_product_attention(q, k, v), rtol=0, atol=0)


def test_unused_outputs_get_no_grad_tensors():
    """Ops skip materializing grads of unused outputs (lse, workspaces, statistics); a backward reached through
    one output only must still be right."""
    x, r, w, b = _leaves((6, 16), (6, 16), (16,), (16,), seed=3)
    _, s = pyattn.layer_norm(x, (16,), w, b, residual=r, return_residual=True)
    (s * 2).sum().backward()  # only the residual sum s = x + r is used
    assert torch.equal(x.grad, torch.full_like(x, 2.0)) and torch.equal(r.grad, torch.full_like(r, 2.0))
    assert w.grad is None or not w.grad.any()

    xs, h0 = _leaves((5, 2, 4), (2, 6), seed=4)
    gru = torch.nn.GRU(4, 6)
    _, h_last = gru_ops.gru_layer(xs, h0, gru.weight_ih_l0, gru.weight_hh_l0, gru.bias_ih_l0, gru.bias_hh_l0,
                                  backend="cpp")
    gx, gh = torch.autograd.grad(h_last.sum(), (xs, h0))  # only the final state is used
    _, h_ref = gru(xs, h0.unsqueeze(0))
    rx, rh = torch.autograd.grad(h_ref.sum(), (xs, h0))
    torch.testing.assert_close(gx, rx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gh, rh, rtol=1e-5, atol=1e-5)


def _sdpa_cases():
    g = torch.Generator().manual_seed(7)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    q, k, v = r(2, 4, 5, 8), r(2, 4, 6, 8), r(2, 4, 6, 3)
    kpm = torch.rand(2, 1, 1, 6, generator=g) > 0.3
    return [
        ("plain", (q, k, v), {}),
        ("causal", (q, k, v), {"is_causal": True}),
        ("bool mask", (q, k, v), {"attn_mask": kpm}),
        ("float mask", (q, k, v), {"attn_mask": r(1, 4, 5, 6)}),
        ("expanded mask", (q, k, v), {"attn_mask": kpm.expand(2, 4, 5, 6)}),
        ("strided mask", (q, k, v), {"attn_mask": r(2, 4, 6, 5).transpose(2, 3)}),
        ("gqa", (q, r(2, 2, 6, 8), r(2, 2, 6, 3)), {"enable_gqa": True}),
        ("mqa broadcast", (q, r(2, 1, 6, 8), r(2, 1, 6, 3)), {}),
        ("scale dropout", (q, k, v), {"scale": 0.3, "dropout_p": 0.2}),
        ("transposed heads", (r(2, 5, 4, 8).transpose(1, 2), k, v), {}),
        ("strided last dim", (r(2, 4, 8, 5).transpose(2, 3), k, v), {}),
    ]


@pytest.mark.parametrize("case", range(11))
def test_sdpa_fast_preparation_equals_the_general_one(case):
    """_prepare_sdpa_4d (the plain 4-D call) gives exactly what the general broadcasting path gives."""
    name, (q, k, v), kw = _sdpa_cases()[case]
    args = (q, k, v, kw.get("attn_mask"), kw.get("dropout_p", 0.0), kw.get("is_causal", False), kw.get("scale"),
            kw.get("enable_gqa", False))
    fast = attn_ops._prepare_sdpa_4d(*args)
    assert fast is not None, name
    general = attn_ops._prepare_sdpa_general(*args)
    assert fast[1] == general[1], name
    a, b = fast[0], general[0]
    for field in ("q", "k", "v", "mask"):
        x, y = getattr(a, field), getattr(b, field)
        assert (x is None) == (y is None), (name, field)
        if x is not None:
            assert x.shape == y.shape and x.stride() == y.stride() and torch.equal(x, y), (name, field)
    for field in ("dropout_p", "causal", "bottom_right", "scale", "needs_grad"):
        assert getattr(a, field) == getattr(b, field), (name, field)


def test_sdpa_fast_preparation_leaves_other_calls_to_the_general_path():
    q, k = torch.randn(2, 4, 5, 8), torch.randn(2, 4, 6, 8)
    assert attn_ops._prepare_sdpa_4d(q[0], k[0], k[0], None, 0.0, False, None, False) is None  # 3-D
    assert attn_ops._prepare_sdpa_4d(q, k[:1], k[:1], None, 0.0, False, None, False) is None  # batch broadcast
    assert attn_ops._prepare_sdpa_4d(q, k[:, :3], k[:, :3], None, 0.0, False, None, True) is None  # 3 !| 4 heads
    assert attn_ops._prepare_sdpa_4d(q, k, k[:, :, :5], None, 0.0, False, None, False) is None  # Lk mismatch
    assert attn_ops._prepare_sdpa_4d(q, k, k, torch.ones(5, 6, dtype=torch.bool), 0.0, False, None, False) is None
    with pytest.raises(RuntimeError, match="same sequence length"):  # and the general path raises torch's error
        pyattn.scaled_dot_product_attention(q, k, k[:, :, :5])


@pytest.mark.parametrize("force", [False, True], ids=["eager", "custom_op"])
@pytest.mark.parametrize("op", ["attention", "layer_norm", "gru_cell", "gru"])
def test_second_derivative_raises_instead_of_returning_zero(op, force):
    # The ops are differentiable once. Under create_graph=True their gradients must raise when differentiated
    # again, also when the incoming gradient is a constant (loss = out.sum()): torch's once_differentiable marks
    # them only when an incoming gradient requires grad, so the second derivative through the saved inputs (a
    # gradient penalty) came out silently as 0.
    x = torch.randn(1, 2, 5, 8, dtype=torch.float64, requires_grad=True)
    cell = pyattn.nn.GRUCell(8, 8).double()
    layer = pyattn.nn.GRU(8, 8).double()
    fns = {
        "attention": lambda t: pyattn.scaled_dot_product_attention(t, t, t, backend="torch"),
        "layer_norm": lambda t: pyattn.layer_norm(t, (8,), backend="torch"),
        "gru_cell": lambda t: cell(t[0, 0], t[0, 1]),
        "gru": lambda t: layer(t[0])[0],
    }
    if force:
        with _ForceCustomOp():
            out = fns[op](x)
    else:
        out = fns[op](x)
    g, = torch.autograd.grad(out.sum(), x, create_graph=True)
    assert g.requires_grad
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(g.square().sum(), x)
    g1, = torch.autograd.grad(fns[op](x).sum(), x)  # without create_graph: a plain gradient, no marking
    assert not g1.requires_grad and torch.equal(g1, g.detach())
