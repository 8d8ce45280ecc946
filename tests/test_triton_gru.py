"""The triton backend's GRU (kernels/gru.py: fused recurrent step forward, fused gate-gradient backward) against
the oracle: the torch backend evaluated in float64 on the same values, compared with pyattn.testing.TOL["gru"]
(fp32 = TESTING.md's fp32 policy; backward atol scaled by max(1, max|ref|) since weight grads are sums over T*B
rows). Runs through the Triton interpreter on machines without CUDA (conftest sets TRITON_INTERPRET=1).

Covers cells and layers (reverse too), forward and every gradient with and without biases, batch 1/3/33, seq
1/2/17, odd sizes 5/33/70 that cross the 32/64-wide tiles, fp16/bf16, NaN-filled launcher allocations and
NaN-padded inputs, pyattn.nn.GRU against torch.nn.GRU, opcheck, determinism and one launch per step.
"""
import os

import pytest
import torch

import pyattn
from pyattn._ext import load_kernels
from pyattn.dispatch import BackendNotSupported, get_backend
from pyattn.ops.gru import gru_layer
from pyattn.testing import assert_tol, check_packed_gru, nan_padded

F32, F64 = torch.float32, torch.float64


def _triton_reason():
    ok, why = get_backend("triton").availability()
    if not ok:
        return why
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return "triton on CPU needs TRITON_INTERPRET=1"
    mod, why = load_kernels("gru")
    return None if mod is not None else why


pytestmark = pytest.mark.skipif(_triton_reason() is not None, reason=f"triton unavailable: {_triton_reason()}")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _params(isz, hsz, bias, seed=0):
    """fp32 weights with torch.nn.GRU's init U(-1/sqrt(H), 1/sqrt(H)): (w_ih, w_hh, b_ih, b_hh) (biases None)."""
    g = torch.Generator().manual_seed(seed)
    k = hsz ** -0.5

    def u(*shape):
        return ((torch.rand(*shape, generator=g) * 2 - 1) * k).to(DEVICE)

    w_ih, w_hh = u(3 * hsz, isz), u(3 * hsz, hsz)
    return (w_ih, w_hh, u(3 * hsz), u(3 * hsz)) if bias else (w_ih, w_hh, None, None)


def _leaves(tensors, dtype=None):
    return [None if t is None else t.detach().to(dtype, copy=True).requires_grad_() for t in tensors]


def _run(fn, backend, x, h, params, douts, dtype):
    """(outputs, grads of every non-None leaf) of fn(backend, leaves) with loss = sum(out_i * dout_i)."""
    leaves = _leaves((x, h, *params), dtype)
    outs = fn(backend, leaves)
    loss = sum((o * d.to(o.dtype)).sum() for o, d in zip(outs, douts))
    wrt = [t for t in leaves if t is not None]
    return outs, torch.autograd.grad(loss, wrt)


def _layer_fn(reverse):
    return lambda backend, lv: gru_layer(*lv, reverse=reverse, backend=backend)


def _cell_fn(backend, lv):
    return (pyattn.gru_cell(*lv, backend=backend),)


def _compare(fn, x, h, params, douts, dtype=F32):
    douts = [d.to(dtype) for d in douts]  # the same (rounded) upstream grads for kernel and oracle
    outs, grads = _run(fn, "triton", x, h, params, douts, dtype)
    r_outs, r_grads = _run(fn, "torch", x.to(dtype), h.to(dtype), [None if p is None else p.to(dtype) for p in params],
                           douts, F64)  # the oracle: float64 on the same (rounded) values
    names = [n for n, t in zip(("dx", "dh", "dw_ih", "dw_hh", "db_ih", "db_hh"), (x, h, *params)) if t is not None]
    assert len(grads) == len(r_grads) == len(names)
    for i, (o, r) in enumerate(zip(outs, r_outs)):
        assert o.dtype == dtype and o.shape == r.shape
        assert not o.isnan().any(), f"output {i} has NaN"
        assert_tol(o, r, "gru", dtype, "fwd", msg=lambda m, i=i: f"output {i}: {m}")
    for name, g, r in zip(names, grads, r_grads):
        assert g.dtype == dtype and g.shape == r.shape, name
        assert_tol(g, r, "gru", dtype, "bwd", msg=lambda m, name=name: f"{name}: {m}")


# (seq, batch, input, hidden): seq 1, 2, 17; batch 1, 3, 33; sizes 5, 33, 70 (tails of the 32-row and 64-wide
# interpreter tiles and the 64-wide K chunks).
LAYER_SHAPES = [(1, 1, 5, 5), (2, 3, 33, 70), (17, 33, 70, 33), (17, 1, 5, 70), (2, 33, 70, 5)]


@pytest.mark.parametrize("seq,batch,isz,hsz", LAYER_SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_layer_matches_float64_oracle(seq, batch, isz, hsz, reverse, bias):
    params = _params(isz, hsz, bias, seed=seq + batch + hsz)
    x, h0 = torch.randn(seq, batch, isz, device=DEVICE), torch.randn(batch, hsz, device=DEVICE)
    douts = (torch.randn(seq, batch, hsz, device=DEVICE), torch.randn(batch, hsz, device=DEVICE))
    _compare(_layer_fn(reverse), x, h0, params, douts)


@pytest.mark.parametrize("batch", [1, 3, 33])
@pytest.mark.parametrize("isz,hsz", [(5, 5), (33, 70), (70, 33)], ids=lambda v: str(v))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_cell_matches_float64_oracle(batch, isz, hsz, bias):
    params = _params(isz, hsz, bias, seed=batch + hsz)
    x, h = torch.randn(batch, isz, device=DEVICE), torch.randn(batch, hsz, device=DEVICE)
    _compare(_cell_fn, x, h, params, (torch.randn(batch, hsz, device=DEVICE),))


# fp16/bf16: pyattn.testing.TOL["gru"] (state rounded to the dtype each step; budgets measured for the torch
# backend run in the dtype, the kernels load, upcast and compute in fp32 like it).
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_layer_half_within_tolerance_table(dtype, reverse):
    seq, batch, isz, hsz = 17, 3, 33, 70
    params = _params(isz, hsz, True, seed=7)
    x, h0 = torch.randn(seq, batch, isz, device=DEVICE), torch.randn(batch, hsz, device=DEVICE)
    douts = (torch.randn(seq, batch, hsz, device=DEVICE), torch.randn(batch, hsz, device=DEVICE))
    _compare(_layer_fn(reverse), x, h0, params, douts, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cell_half_within_tolerance_table(dtype):
    params = _params(33, 70, True, seed=8)
    x, h = torch.randn(33, 33, device=DEVICE), torch.randn(33, 70, device=DEVICE)
    _compare(_cell_fn, x, h, params, (torch.randn(33, 70, device=DEVICE),), dtype)


@pytest.fixture
def nan_alloc(monkeypatch):
    """Every launcher allocation (outputs, workspace, gate-gradient scratch) NaN-filled."""
    k = load_kernels("gru")[0]
    monkeypatch.setattr(k, "_alloc", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                               device=device))
    return k


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_nan_filled_buffers_and_nan_padded_inputs_do_not_leak(nan_alloc, reverse):
    """NaN-filled outputs/scratch are fully written, and inputs padded with NaN past their logical end (row
    stride > width) give the same result bit for bit as contiguous ones."""
    seq, batch, isz, hsz = 5, 33, 33, 70
    params = _params(isz, hsz, True, seed=11)
    x, h0 = torch.randn(seq, batch, isz, device=DEVICE), torch.randn(batch, hsz, device=DEVICE)
    douts = (torch.randn(seq, batch, hsz, device=DEVICE), torch.randn(batch, hsz, device=DEVICE))
    outs, grads = _run(_layer_fn(reverse), "triton", x, h0, params, douts, F32)
    for t in (*outs, *grads):
        assert not t.isnan().any()

    pv = [nan_padded(t, requires_grad=True) for t in (x, h0, params[0], params[1])]
    p_outs = gru_layer(pv[0], pv[1], pv[2], pv[3], params[2], params[3], reverse=reverse, backend="triton")
    loss = sum((o * d).sum() for o, d in zip(p_outs, douts))
    p_grads = torch.autograd.grad(loss, pv)
    for a, b in zip((*outs, *grads[:4]), (*p_outs, *p_grads)):
        assert torch.equal(a, b)
    # cell: padded hx / weights
    c = pyattn.gru_cell(x[0], h0, *params, backend="triton")
    cp = pyattn.gru_cell(nan_padded(x[0]), nan_padded(h0), nan_padded(params[0]), nan_padded(params[1]),
                         params[2], params[3], backend="triton")
    assert not c.isnan().any() and torch.equal(c, cp)
    _, cg = _run(_cell_fn, "triton", x[0], h0, params, (douts[1],), F32)
    for g in cg:
        assert not g.isnan().any()


@pytest.mark.parametrize("seq_kernel", [True, False], ids=["one-launch", "per-step"])
def test_launches(monkeypatch, seq_kernel):
    """Every step in one launch each way while W_hh fits SEQ_MAX_W_BYTES, else per step one fused kernel launch
    forward and one gate-gradient launch (and a GEMM) backward."""
    k = load_kernels("gru")[0]
    if not seq_kernel:
        monkeypatch.setattr(k, "SEQ_MAX_W_BYTES", 0)
    counts = {"seq": 0, "seq_bwd": 0, "fwd": 0, "bwd": 0}
    for name, key in (("_launch_seq_fwd", "seq"), ("_launch_seq_bwd", "seq_bwd"), ("_launch_step_fwd", "fwd"),
                      ("_launch_gates_bwd", "bwd")):
        def counted(*a, real=getattr(k, name), key=key):
            counts[key] += 1
            return real(*a)
        monkeypatch.setattr(k, name, counted)
    seq, batch, isz, hsz = 5, 3, 5, 33
    params = _params(isz, hsz, True)
    x, h0 = torch.randn(seq, batch, isz, device=DEVICE), torch.randn(batch, hsz, device=DEVICE)
    douts = (torch.ones(seq, batch, hsz, device=DEVICE), torch.ones(batch, hsz, device=DEVICE))
    _run(_layer_fn(False), "triton", x, h0, params, douts, F32)
    assert counts == ({"seq": 1, "seq_bwd": 1, "fwd": 0, "bwd": 0} if seq_kernel
                      else {"seq": 0, "seq_bwd": 0, "fwd": seq, "bwd": seq})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_one_launch_equals_per_step(monkeypatch, dtype, reverse):
    """The sequence kernels (a program per batch block through every step) against the per-step path: the forward's
    bits in the interpreter (the same tile shapes and order; batch rows over two programs, an odd hidden size over
    several hidden blocks), the backward within rounding (its dh_prev GEMM sums in another order)."""
    k = load_kernels("gru")[0]
    g = torch.Generator().manual_seed(11)
    seq, batch, isz, hsz = 4, 40, 6, 70
    x = torch.randn(seq, batch, isz, generator=g).to(DEVICE, dtype)
    h0 = torch.randn(batch, hsz, generator=g).to(DEVICE, dtype)
    params = [p.to(dtype) for p in _params(isz, hsz, True)]
    one = k.gru_layer_fwd(x, h0, *params, reverse, True)
    monkeypatch.setattr(k, "SEQ_MAX_W_BYTES", 0)
    steps = k.gru_layer_fwd(x, h0, *params, reverse, True)
    if DEVICE == "cpu":  # the interpreter: one tile configuration for both kernels
        for a, b in zip(one, steps):
            assert torch.equal(a, b)
    else:  # the GPU configurations differ (tile sizes: summation order)
        for a, b in zip(one, steps):
            torch.testing.assert_close(a, b, atol=2e-3 if dtype == torch.float32 else 3e-2, rtol=1e-2)
    # backward: one launch against the per-step gate kernel + cuBLAS / CPU addmm (another summation order)
    dout = torch.randn(seq, batch, hsz, generator=g).to(DEVICE, dtype)
    dh_last = torch.randn(batch, hsz, generator=g).to(DEVICE, dtype)
    args = (dout, dh_last, x, h0, params[0], params[1], one[0], one[2], True, True, reverse, True)
    grads_steps = k.gru_layer_bwd(*args)
    monkeypatch.setattr(k, "SEQ_MAX_W_BYTES", 1 << 20)
    grads_one = k.gru_layer_bwd(*args)
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=2e-2)
    for name, a, b in zip(("dx", "dh0", "dw_ih", "dw_hh", "db_ih", "db_hh"), grads_one, grads_steps):
        torch.testing.assert_close(a, b, **tol, msg=lambda m, name=name: f"{name}: {m}")


NN_CFG = dict(num_layers=2, bidirectional=True, batch_first=True)


def test_nn_gru_matches_torch_nn_gru():
    isz, hsz, seq, batch = 13, 33, 9, 3
    mod = pyattn.nn.GRU(isz, hsz, **NN_CFG).eval().to(DEVICE)
    # the twin stays in train mode (no dropout here, so the same function): cuDNN's RNN backward refuses eval mode
    twin = torch.nn.GRU(isz, hsz, **NN_CFG).double().to(DEVICE)
    twin.load_state_dict({k: v.double() for k, v in mod.state_dict().items()}, strict=True)
    x = torch.randn(batch, seq, isz, device=DEVICE, requires_grad=True)
    h0 = torch.randn(4, batch, hsz, device=DEVICE, requires_grad=True)
    k = load_kernels("gru")[0]
    with pyattn.use_backend("triton"):
        out, hn = mod(x, h0)
    xr, h0r = x.detach().double().requires_grad_(), h0.detach().double().requires_grad_()
    r_out, r_hn = twin(xr, h0r)
    assert_tol(out, r_out, "gru", F32, "fwd")
    assert_tol(hn, r_hn, "gru", F32, "fwd")
    dout, dhn = torch.randn_like(out), torch.randn_like(hn)
    with pyattn.use_backend("triton"):
        grads = torch.autograd.grad((out * dout).sum() + (hn * dhn).sum(), [x, h0, *mod.parameters()])
    r_grads = torch.autograd.grad((r_out * dout.double()).sum() + (r_hn * dhn.double()).sum(),
                                  [xr, h0r, *twin.parameters()])
    assert len(grads) == len(r_grads) == 2 + 16
    for i, (g, r) in enumerate(zip(grads, r_grads)):
        assert_tol(g, r, "gru", F32, "bwd", msg=lambda m, i=i: f"grad {i}: {m}")
    assert k is not None


def test_nn_gru_packed_sequence_on_the_triton_kernels():
    """PackedSequence inputs: padded groups and views (merge_rows 2: 3 calls per layer direction)."""
    assert check_packed_gru("triton", DEVICE, merge_rows=2, **NN_CFG) == 3 * 4


def test_opcheck_gru_cell_fwd_triton():
    params = _params(5, 33, True)
    x, h = torch.randn(3, 5, device=DEVICE), torch.randn(3, 33, device=DEVICE)
    op = torch.ops.pyattn.gru_cell_fwd.default
    for needs_grad in (True, False):
        args = (x.clone().requires_grad_(), h.clone().requires_grad_(),
                *[p.clone().requires_grad_() for p in params], needs_grad, "triton")
        torch.library.opcheck(op, args)


def test_deterministic_bitwise():
    seq, batch, isz, hsz = 9, 33, 33, 70
    params = _params(isz, hsz, True, seed=5)
    x, h0 = torch.randn(seq, batch, isz, device=DEVICE), torch.randn(batch, hsz, device=DEVICE)
    douts = (torch.randn(seq, batch, hsz, device=DEVICE), torch.randn(batch, hsz, device=DEVICE))
    a = _run(_layer_fn(True), "triton", x, h0, params, douts, F32)
    b = _run(_layer_fn(True), "triton", x, h0, params, douts, F32)
    for u, v in zip((*a[0], *a[1]), (*b[0], *b[1])):
        assert torch.equal(u, v)


def test_forced_triton_refuses_float64_with_reason():
    params = [p.double() for p in _params(5, 7, True)]
    x, h0 = torch.randn(2, 3, 5, dtype=F64, device=DEVICE), torch.randn(3, 7, dtype=F64, device=DEVICE)
    with pytest.raises(BackendNotSupported, match="float64"):
        gru_layer(x, h0, *params, backend="triton")
    with pytest.raises(BackendNotSupported, match="float64"):
        pyattn.gru_cell(x[0], h0, *params, backend="triton")
    # the process stays usable: the next valid call works
    out = pyattn.gru_cell(x[0].float(), h0.float(), *[p.float() for p in params], backend="triton")
    assert out.shape == (3, 7) and not out.isnan().any()
