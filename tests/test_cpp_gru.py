"""The cpp backend's fused GRU (csrc/cpu/gru.cpp through torch.ops.pyattn.gru_seq_* / gru_step_*) against the
oracle: the torch backend evaluated in float64 on the same (fp32) values, compared with pyattn.testing.TOL["gru"]
[float32] (TESTING.md's fp32 policy; backward atol scaled by max(1, max|ref|) since weight grads are sums over T*B
rows). Covers cells and layers (reverse too), forward and every gradient with and without biases, odd sizes that
cross the 16-lane panels and 8-row register tiles, strided and NaN-padded views, pyattn.nn.GRU against
torch.nn.GRU, determinism (also across thread counts), opcheck of the C++ ops and the bindings' error messages.
fp16 / bf16 (16-bit products summed in fp32, on vdpbf16ps pairs for bf16 where the CPU has AVX512_BF16; the state
rounded to the dtype after every step): against the same float64 oracle with TOL["gru"][dtype], each step's state is
the dtype's cell on the stored previous state, and the NaN-fill, strided-view, determinism and thread tests run in all
three dtypes.
"""
import pytest
import torch

import pyattn
from pyattn.dispatch import BackendNotSupported, get_backend, select
from pyattn.ops.gru import GRULayerInputs, gru_layer
from pyattn.testing import PACKED_CALLS, assert_tol, check_packed_gru, nan_padded

F32, F64 = torch.float32, torch.float64
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HALF = [torch.float16, torch.bfloat16]
_DT_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _dt_id(dt):
    return _DT_IDS[dt]


def _cast(tensors, dtype):
    return [None if t is None else t.to(dtype) for t in tensors]


def _cpp_reason():
    ok, why = get_backend("cpp").availability()
    if not ok:
        return why
    from pyattn.backends._native import has_kernel

    if not has_kernel("gru_seq_fwd", "CPU"):
        return "pyattn._C was built without the GRU kernels"
    return None


pytestmark = pytest.mark.skipif(_cpp_reason() is not None, reason=f"cpp backend unavailable: {_cpp_reason()}")


@pytest.fixture(autouse=True)
def _fixed_seed():
    torch.manual_seed(0)


def _params(isz, hsz, bias, seed=0):
    """fp32 weights with torch.nn.GRU's init U(-1/sqrt(H), 1/sqrt(H)): (w_ih, w_hh, b_ih, b_hh) (biases None)."""
    g = torch.Generator().manual_seed(seed)
    k = hsz ** -0.5

    def u(*shape):
        return (torch.rand(*shape, generator=g) * 2 - 1) * k

    w_ih, w_hh = u(3 * hsz, isz), u(3 * hsz, hsz)
    return (w_ih, w_hh, u(3 * hsz), u(3 * hsz)) if bias else (w_ih, w_hh, None, None)


def _leaves(tensors, dtype=None, requires_grad=True):
    out = []
    for t in tensors:
        if t is None:
            out.append(None)
            continue
        t = t.detach().to(dtype) if dtype is not None else t.detach().clone()
        out.append(t.requires_grad_(requires_grad))
    return out


def _layer(backend, x, h0, params, reverse, dout, dh_last, dtype=None, grad_mask=None):
    """(out, h_last, grads of the leaves x, h0, w_ih, w_hh[, b_ih, b_hh] that require grad) of gru_layer."""
    leaves = _leaves((x, h0, *params), dtype)
    if grad_mask is not None:
        for t, m in zip(leaves, grad_mask):
            if t is not None:
                t.requires_grad_(m)
    out, h_last = gru_layer(*leaves, reverse=reverse, backend=backend)
    loss = (out * dout.to(out.dtype)).sum() + (h_last * dh_last.to(out.dtype)).sum()
    wrt = [t for t in leaves if t is not None and t.requires_grad]
    return out, h_last, torch.autograd.grad(loss, wrt)


def _check(out, ref, kind, what, dtype=F32):
    assert out.dtype == dtype, what
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert_tol(out, ref, "gru", dtype, kind, msg=lambda m: f"{what}: {m}")


# (seq, batch, input, hidden): seq 1, 2, 17, 200; batch 1, 3, 33 (8-row tiles + tails); sizes 7, 33, 130 (16-lane
# panels + tails) and the PERF shape I=64, H=128.
LAYER_SHAPES = [(1, 1, 7, 7), (2, 3, 33, 7), (17, 33, 7, 130), (200, 3, 33, 33), (17, 1, 130, 33),
                (2, 33, 130, 130), (200, 1, 64, 128)]


@pytest.mark.parametrize("seq,batch,isz,hsz", LAYER_SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_layer_matches_float64_oracle(seq, batch, isz, hsz, reverse, bias):
    params = _params(isz, hsz, bias, seed=seq + batch + hsz)
    x, h0 = torch.randn(seq, batch, isz), torch.randn(batch, hsz)
    dout, dh = torch.randn(seq, batch, hsz), torch.randn(batch, hsz)
    inputs = GRULayerInputs(x, h0, *params, needs_grad=True, reverse=reverse)
    assert select(inputs).name == "cpp", "fp32 CPU layers must pick the cpp backend by default"
    out, h_last, grads = _layer("cpp", x, h0, params, reverse, dout, dh)
    r_out, r_h, r_grads = _layer("torch", x, h0, params, reverse, dout, dh, dtype=F64)
    _check(out, r_out, "fwd", "out")
    _check(h_last, r_h, "fwd", "h_last")
    names = [n for n, t in zip(("dx", "dh0", "dw_ih", "dw_hh", "db_ih", "db_hh"), (x, h0, *params)) if t is not None]
    assert len(grads) == len(names) == len(r_grads)
    for name, g, r in zip(names, grads, r_grads):
        _check(g, r, "bwd", name)


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_layer_workspace_contract_and_cross_backend_backward(reverse):
    """The saved ws is [r | z | n | hn] fp32 like the torch backend's, and each backend's backward reads the other's
    forward workspace."""
    seq, batch, isz, hsz = 17, 9, 13, 37
    w_ih, w_hh, b_ih, b_hh = _params(isz, hsz, True, seed=3)
    x, h0 = torch.randn(seq, batch, isz), torch.randn(batch, hsz)
    cpp, tb = get_backend("cpp"), get_backend("torch")
    out_c, h_c, ws_c = cpp.gru_layer_fwd(x, h0, w_ih, w_hh, b_ih, b_hh, reverse, True)
    out_t, _h_t, ws_t = tb.gru_layer_fwd(x, h0, w_ih, w_hh, b_ih, b_hh, reverse, True)
    ref = tb.gru_layer_fwd(*(t.double() for t in (x, h0, w_ih, w_hh, b_ih, b_hh)), reverse, True)
    assert ws_c.dtype == F32 and ws_c.shape == (seq, batch, 4 * hsz)
    _check(ws_c, ref[2], "fwd", "ws")
    _check(out_c, ref[0], "fwd", "out")
    _check(h_c, ref[1], "fwd", "h_last")
    # inference: no workspace
    _, _, ws_none = cpp.gru_layer_fwd(x, h0, w_ih, w_hh, b_ih, b_hh, reverse, False)
    assert ws_none.numel() == 0
    dout, dh = torch.randn(seq, batch, hsz), torch.randn(batch, hsz)
    r_grads = tb.gru_layer_bwd(dout.double(), dh.double(), x.double(), h0.double(), w_ih.double(), w_hh.double(),
                               ref[0], ref[2], True, True, reverse, True)
    for fwd_out, fwd_ws, bwd in ((out_t, ws_t, cpp), (out_c, ws_c, tb), (out_c, ws_c, cpp)):
        grads = bwd.gru_layer_bwd(dout, dh, x, h0, w_ih, w_hh, fwd_out, fwd_ws, True, True, reverse, True)
        for name, g, r in zip(("dx", "dh0", "dw_ih", "dw_hh", "db_ih", "db_hh"), grads, r_grads):
            _check(g, r, "bwd", f"{name} ({bwd.name} backward of the other forward)")
    # weight grads not asked for: empty tensors, dx/dh0 unchanged
    grads = cpp.gru_layer_bwd(dout, dh, x, h0, w_ih, w_hh, out_c, ws_c, True, True, reverse, False)
    assert all(g.numel() == 0 for g in grads[2:])
    _check(grads[0], r_grads[0], "bwd", "dx (no weight grads)")
    _check(grads[1], r_grads[1], "bwd", "dh0 (no weight grads)")


@pytest.mark.parametrize("dtype", DTYPES, ids=_dt_id)
@pytest.mark.parametrize("seq,batch,isz,hsz", [(3, 9, 7, 33), (2, 1, 130, 17), (17, 33, 13, 130)],
                         ids=lambda v: str(v))
def test_nan_filled_outputs_and_scratch(monkeypatch, seq, batch, isz, hsz, dtype):
    """With PYATTN_DEBUG_NAN_FILL=1 the bindings fill outputs, the saved workspace and the kernels' scratch with NaN:
    every output element is written and no scratch is read before it is written (results stay finite and equal to
    the normal run bit for bit)."""
    params = _cast(_params(isz, hsz, True, seed=11), dtype)
    x, h0 = torch.randn(seq, batch, isz, dtype=dtype), torch.randn(batch, hsz, dtype=dtype)
    dout, dh = torch.randn(seq, batch, hsz, dtype=dtype), torch.randn(batch, hsz, dtype=dtype)
    mask = (True, True, False, False, False, False)
    runs = {}
    for fill in ("0", "1"):
        monkeypatch.setenv("PYATTN_DEBUG_NAN_FILL", fill)
        runs[fill] = [_layer("cpp", x, h0, params, rev, dout, dh) for rev in (False, True)]
        runs[fill].append(_layer("cpp", x, h0, params, False, dout, dh, grad_mask=mask))
        cell_leaves = _leaves((x[0], h0, *params))
        h1 = pyattn.gru_cell(*cell_leaves, backend="cpp")
        runs[fill].append((h1, h1, torch.autograd.grad(h1, cell_leaves, dh)))
    for a, b in zip(runs["0"], runs["1"]):
        for ta, tb in zip((a[0], a[1], *a[2]), (b[0], b[1], *b[2])):
            assert torch.isfinite(tb).all()
            assert torch.equal(ta, tb)


def test_layer_frozen_weights_and_input_only_grads():
    """need_weights=False path: only dx (and dh0) are computed."""
    params = _params(33, 130, True, seed=5)
    x, h0 = torch.randn(17, 33, 33), torch.randn(33, 130)
    dout, dh = torch.randn(17, 33, 130), torch.randn(33, 130)
    mask = (True, True, False, False, False, False)
    _, _, grads = _layer("cpp", x, h0, params, False, dout, dh, grad_mask=mask)
    _, _, r_grads = _layer("torch", x, h0, params, False, dout, dh, dtype=F64, grad_mask=mask)
    assert len(grads) == 2
    _check(grads[0], r_grads[0], "bwd", "dx")
    _check(grads[1], r_grads[1], "bwd", "dh0")


@pytest.mark.parametrize("batch", [1, 3, 12, 33])  # one and several 8-row slivers, a tail sliver
@pytest.mark.parametrize("isz,hsz", [(7, 7), (33, 130), (130, 33), (400, 20), (0, 20)], ids=lambda v: str(v))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_cell_matches_float64_oracle(batch, isz, hsz, bias):
    params = _params(isz, hsz, bias, seed=batch + isz)
    x, h = torch.randn(batch, isz), torch.randn(batch, hsz)
    leaves = _leaves((x, h, *params))
    out = pyattn.gru_cell(*leaves, backend="cpp")
    ref_leaves = _leaves((x, h, *params), F64)
    ref = pyattn.gru_cell(*ref_leaves, backend="torch")
    _check(out, ref, "fwd", "h'")
    dh = torch.randn(batch, hsz)
    wrt = [t for t in leaves if t is not None]
    r_wrt = [t for t in ref_leaves if t is not None]
    for name, g, r in zip(("dx", "dhx", "dw_ih", "dw_hh", "db_ih", "db_hh"),
                          torch.autograd.grad(out, wrt, dh), torch.autograd.grad(ref, r_wrt, dh.double())):
        _check(g, r, "bwd", name)


@pytest.mark.parametrize("batch", [1, 8, 9, 17, 70])
@pytest.mark.parametrize("isz,hsz", [(37, 45), (400, 20), (16, 64)], ids=lambda v: str(v))
def test_cell_is_bitwise_one_layer_step(batch, isz, hsz):
    """A cell step (csrc/cpu/gru.cpp cell_fwd: W packed a panel of hidden units at a time, slivers of batch rows)
    gives the bits of a layer's first step (T = 2: W_ih through sgemm, W_hh packed whole), and a one-step layer (the
    cell's path) the same: vector tails (37, 45), K blocks (400 > 384), whole panels only (16, 64), several slivers
    and, on 2 threads, items split by slivers (H = 20: fewer panels than threads x 2), a strided input."""
    params = _params(isz, hsz, True, seed=batch)
    wide = torch.randn(batch, isz + 3)
    x, h = wide[:, :isz], torch.randn(batch, hsz)
    out = pyattn.gru_cell(x, h, *params, backend="cpp")
    seq, h_last = gru_layer(torch.stack([x, torch.randn(batch, isz)]), h, *params, backend="cpp")
    assert torch.equal(out, seq[0])
    one, _ = gru_layer(x[None], h, *params, backend="cpp")
    assert torch.equal(out, one[0])


@pytest.mark.parametrize("batch", [1, 9, 70])
@pytest.mark.parametrize("isz,hsz", [(37, 45), (21, 64), (400, 20)], ids=lambda v: str(v))
def test_cell_backward_is_bitwise_the_sequence_path(batch, isz, hsz):
    """The one-step backward reads W_hh and W_ih in place (only a partial last panel copied) where the sequence path
    packs them: a two-step layer whose second step gets zero gradient has the cell's dx, dh0 and weight and bias
    gradients bit for bit (its extra rows add exact zeros). Weights and inputs are NaN-padded views: the in-place
    reads must follow their row strides."""
    vals = (torch.randn(batch, isz), torch.randn(batch, hsz), *_params(isz, hsz, True, seed=batch))
    padded = [nan_padded(t, requires_grad=True) for t in vals]
    dh = torch.randn(batch, hsz)
    cell_grads = torch.autograd.grad(pyattn.gru_cell(*padded, backend="cpp"), padded, dh)
    x2 = torch.stack([vals[0], torch.randn(batch, isz)])
    _, _, seq_grads = _layer("cpp", x2, vals[1], vals[2:], False, torch.stack([dh, torch.zeros_like(dh)]),
                             torch.zeros_like(dh))
    assert torch.equal(cell_grads[0], seq_grads[0][0]), "dx"
    for name, a, b in zip(("dh0", "dw_ih", "dw_hh", "db_ih", "db_hh"), cell_grads[1:], seq_grads[1:]):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("dtype", DTYPES, ids=_dt_id)
@pytest.mark.parametrize("hsz", [20, 100])  # 100: the backward's dGh W_hh in panel groups on two threads
def test_cell_thread_count_independent(hsz, dtype):
    """One step on 1 and on 2+ threads (items: panels of hidden units, split by slivers; the backward's row blocks,
    panel groups and GEMM chunks) gives the same bits."""
    params = _params(45, hsz, True, seed=3)
    leaves = _leaves((torch.randn(70, 45), torch.randn(70, hsz), *params), dtype)
    dh = torch.randn(70, hsz, dtype=dtype)
    old = torch.get_num_threads()
    runs = []
    try:
        for n in (1, max(2, old)):
            torch.set_num_threads(n)
            out = pyattn.gru_cell(*leaves, backend="cpp")
            runs.append((out, *torch.autograd.grad(out, leaves, dh)))
    finally:
        torch.set_num_threads(old)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_cell_module_and_unbatched():
    cell = pyattn.nn.GRUCell(10, 19)
    twin = torch.nn.GRUCell(10, 19).double()
    twin.load_state_dict({k: v.double() for k, v in cell.state_dict().items()})
    x, h = torch.randn(5, 10), torch.randn(5, 19)
    with pyattn.use_backend("cpp"):
        _check(cell(x, h), twin(x.double(), h.double()), "fwd", "GRUCell")
        _check(cell(x[0], h[0]), twin(x[0].double(), h[0].double()), "fwd", "GRUCell unbatched")
        _check(cell(x), twin(x.double()), "fwd", "GRUCell hx=None")


def test_empty_batch_and_direct_empty_calls():
    """Batch 0 never reaches a kernel (the op layer sends it to the torch backend); the C++ ops called directly on
    empty inputs return correctly shaped empty/zero results without running a kernel."""
    w_ih, w_hh, b_ih, b_hh = _params(5, 7, True)
    x = torch.randn(4, 0, 5, requires_grad=True)
    out, h = gru_layer(x, None, w_ih, w_hh, b_ih, b_hh, backend="cpp")
    assert out.shape == (4, 0, 7) and h.shape == (0, 7)
    out.sum().backward()
    assert x.grad.shape == x.shape
    assert pyattn.gru_cell(torch.randn(0, 5), None, w_ih, w_hh, backend="cpp").shape == (0, 7)
    ops = torch.ops.pyattn
    o, hl, ws = ops.gru_seq_fwd(torch.randn(3, 0, 5), torch.randn(0, 7), w_ih, w_hh, b_ih, b_hh, False, True)
    assert o.shape == (3, 0, 7) and hl.shape == (0, 7) and ws.shape == (3, 0, 28)
    h0 = torch.randn(2, 7)
    o, hl, ws = ops.gru_seq_fwd(torch.randn(0, 2, 5), h0, w_ih, w_hh, b_ih, b_hh, False, True)
    assert o.shape == (0, 2, 7) and torch.equal(hl, h0) and hl.data_ptr() != h0.data_ptr()
    dl = torch.randn(2, 7)
    g = ops.gru_seq_bwd(torch.randn(0, 2, 7), dl, torch.randn(0, 2, 5), h0, w_ih, w_hh, o, ws, True, True, False,
                        True)
    assert g[0].shape == (0, 2, 5) and torch.equal(g[1], dl)
    assert all(torch.count_nonzero(t) == 0 for t in g[2:]) and g[2].shape == w_ih.shape and g[4].shape == (21,)
    # input_size 0 (the op layer also sends it to torch): the one-step kernel's gi is zero, h' and dhx as torch's
    w0, _, _, _ = _params(0, 7, True)
    x0, hx = torch.randn(9, 0), torch.randn(9, 7)
    h1, ws = ops.gru_step_fwd(x0, hx, w0, w_hh, b_ih, b_hh, True)
    _check(h1, torch.gru_cell(x0.double(), hx.double(), w0.double(), w_hh.double(), b_ih.double(), b_hh.double()),
           "fwd", "h' (input_size 0)")
    g = ops.gru_step_bwd(torch.ones(9, 7), x0, hx, w0, w_hh, ws, True, True, True)
    assert g[0].shape == (9, 0) and g[2].shape == (21, 0) and torch.isfinite(g[1]).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=_dt_id)
@pytest.mark.parametrize("isz", [21, 22])  # bf16 pairs: x copied (odd) or read in place as words (even strides)
def test_strided_and_nan_padded_views_bitwise(dtype, isz):
    """batch_first transposed x, NaN-padded x / h0 / weights (reading past a row gives NaN), a last-dim-strided x:
    the same bits as contiguous inputs, forward and backward."""
    seq, batch, hsz = 17, 11, 35
    params = _cast(_params(isz, hsz, True, seed=9), dtype)
    x, h0 = torch.randn(seq, batch, isz, dtype=dtype), torch.randn(batch, hsz, dtype=dtype)
    dout, dh = torch.randn(seq, batch, hsz, dtype=dtype), torch.randn(batch, hsz, dtype=dtype)
    base = _layer("cpp", x, h0, params, True, dout, dh)

    def run(xv, hv, pv):
        out, h_last = gru_layer(xv, hv, *pv, reverse=True, backend="cpp")
        loss = (out * dout).sum() + (h_last * dh).sum()
        return out, h_last, torch.autograd.grad(loss, [xv, hv, *pv])

    # batch_first storage: (B, T, I) transposed to (T, B, I)
    xb = x.transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
    variants = {"batch_first": (xb, _leaves([h0])[0], _leaves(params))}
    # NaN-padded views of larger buffers
    xp = nan_padded(x, requires_grad=True)
    hp = nan_padded(h0, requires_grad=True)
    pp = [nan_padded(p, requires_grad=True) for p in params]
    variants["nan_padded"] = (xp, hp, pp)
    # last dim strided (copied by the op layer)
    buf = torch.stack([x, torch.full_like(x, float("nan"))], -1).reshape(seq, batch, 2 * isz)
    xs = buf[..., ::2].detach().requires_grad_()
    variants["last_dim_strided"] = (xs, _leaves([h0])[0], _leaves(params))
    for name, (xv, hv, pv) in variants.items():
        assert xv.stride() != x.stride() or name == "last_dim_strided"
        out, h_last, grads = run(xv, hv, pv)
        assert torch.equal(out, base[0]), name
        assert torch.equal(h_last, base[1]), name
        for i, (g, b) in enumerate(zip(grads, base[2])):
            assert torch.equal(g, b), f"{name}: grad {i} differs"


@pytest.mark.parametrize("dtype", DTYPES, ids=_dt_id)
def test_deterministic_and_thread_count_independent(dtype):
    """Two runs are bitwise equal, and so are runs on 1 and on 2+ threads (fixed reduction order; the shapes are
    above the kernels' threading thresholds)."""
    params = _cast(_params(64, 130, True, seed=1), dtype)
    x, h0 = torch.randn(23, 33, 64, dtype=dtype), torch.randn(33, 130, dtype=dtype)
    dout, dh = torch.randn(23, 33, 130, dtype=dtype), torch.randn(33, 130, dtype=dtype)
    first = _layer("cpp", x, h0, params, False, dout, dh)
    second = _layer("cpp", x, h0, params, False, dout, dh)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = _layer("cpp", x, h0, params, False, dout, dh)
        torch.set_num_threads(max(2, old))
        multi = _layer("cpp", x, h0, params, False, dout, dh)
    finally:
        torch.set_num_threads(old)
    for other in (second, single, multi):
        assert torch.equal(first[0], other[0]) and torch.equal(first[1], other[1])
        for a, b in zip(first[2], other[2]):
            assert torch.equal(a, b)


def test_long_sequence_stays_bounded():
    params = _params(8, 33, True, seed=2)
    x, h0 = torch.randn(1000, 2, 8), torch.randn(2, 33)
    dout, dh = torch.randn(1000, 2, 33), torch.randn(2, 33)
    out, h_last, grads = _layer("cpp", x, h0, params, False, dout, dh)
    r_out, r_h, r_grads = _layer("torch", x, h0, params, False, dout, dh, dtype=F64)
    _check(h_last, r_h, "fwd", "h_last")
    assert out.abs().max() <= max(1.0, h0.abs().max().item())  # h' is a convex mix of h and tanh(...)
    assert out[-100:].abs().max() <= 1.0
    _check(out, r_out, "fwd", "out")
    for g, r in zip(grads, r_grads):
        _check(g, r, "bwd", "grad")


# ---- fp16 / bf16 ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", HALF, ids=_dt_id)
@pytest.mark.parametrize("seq,batch,isz,hsz", [(1, 1, 7, 7), (17, 33, 7, 130), (200, 3, 33, 33), (2, 33, 130, 130)],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_layer_half_matches_float64_oracle(dtype, seq, batch, isz, hsz, reverse, bias):
    """16-bit layers pick the cpp backend and stay within TOL["gru"][dtype] of the float64 oracle on the same
    (rounded) values, every output and gradient in the input's dtype."""
    params = _cast(_params(isz, hsz, bias, seed=seq + batch + hsz), dtype)
    x, h0 = torch.randn(seq, batch, isz, dtype=dtype), torch.randn(batch, hsz, dtype=dtype)
    dout, dh = torch.randn(seq, batch, hsz, dtype=dtype), torch.randn(batch, hsz, dtype=dtype)
    inputs = GRULayerInputs(x, h0, *params, needs_grad=True, reverse=reverse)
    assert select(inputs).name == "cpp", "16-bit CPU layers must pick the cpp backend by default"
    out, h_last, grads = _layer("cpp", x, h0, params, reverse, dout, dh)
    r_out, r_h, r_grads = _layer("torch", x, h0, params, reverse, dout, dh, dtype=F64)
    _check(out, r_out, "fwd", "out", dtype)
    _check(h_last, r_h, "fwd", "h_last", dtype)
    names = [n for n, t in zip(("dx", "dh0", "dw_ih", "dw_hh", "db_ih", "db_hh"), (x, h0, *params)) if t is not None]
    assert len(grads) == len(names) == len(r_grads)
    for name, g, r in zip(names, grads, r_grads):
        _check(g, r, "bwd", name, dtype)


@pytest.mark.parametrize("dtype", HALF, ids=_dt_id)
@pytest.mark.parametrize("batch", [1, 9, 33])
@pytest.mark.parametrize("isz,hsz", [(37, 45), (400, 20)], ids=lambda v: str(v))
def test_layer_half_state_is_the_cell_on_the_stored_state(dtype, batch, isz, hsz):
    """The state is rounded to the dtype after every step: out[t] is, bit for bit, the 16-bit cell applied to x[t]
    and the stored out[t - 1] (a state kept in fp32 between steps and rounded at the end would differ). The cell and
    a one-step layer agree too, forward and backward."""
    seq = 9
    params = _cast(_params(isz, hsz, True, seed=batch), dtype)
    x, h0 = torch.randn(seq, batch, isz, dtype=dtype), torch.randn(batch, hsz, dtype=dtype)
    for reverse in (False, True):
        out, h_last = gru_layer(x, h0, *params, reverse=reverse, backend="cpp")
        h = h0
        for t in (reversed(range(seq)) if reverse else range(seq)):
            h = pyattn.gru_cell(x[t], h, *params, backend="cpp")
            assert torch.equal(out[t], h), f"step {t} (reverse={reverse})"
        assert torch.equal(h_last, h)
    leaves = _leaves((x[0], h0, *params))
    one_leaves = _leaves((x[:1], h0, *params))
    cell = pyattn.gru_cell(*leaves, backend="cpp")
    one, _ = gru_layer(*one_leaves, backend="cpp")
    assert torch.equal(cell, one[0])
    dh = torch.randn(batch, hsz, dtype=dtype)
    for a, b in zip(torch.autograd.grad(cell, leaves, dh), torch.autograd.grad(one[0], one_leaves, dh)):
        assert torch.equal(a, b.reshape(a.shape))


@pytest.mark.parametrize("dtype", HALF, ids=_dt_id)
@pytest.mark.parametrize("batch", [1, 12, 33])
@pytest.mark.parametrize("isz,hsz", [(7, 7), (33, 130), (0, 20)], ids=lambda v: str(v))
def test_cell_half_matches_float64_oracle(dtype, batch, isz, hsz):
    params = _cast(_params(isz, hsz, True, seed=batch + isz), dtype)
    x, h = torch.randn(batch, isz, dtype=dtype), torch.randn(batch, hsz, dtype=dtype)
    leaves = _leaves((x, h, *params))
    out = pyattn.gru_cell(*leaves, backend="cpp")
    ref_leaves = _leaves((x, h, *params), F64)
    ref = pyattn.gru_cell(*ref_leaves, backend="torch")
    _check(out, ref, "fwd", "h'", dtype)
    dh = torch.randn(batch, hsz, dtype=dtype)
    for name, g, r in zip(("dx", "dhx", "dw_ih", "dw_hh", "db_ih", "db_hh"), torch.autograd.grad(out, leaves, dh),
                          torch.autograd.grad(ref, ref_leaves, dh.double())):
        _check(g, r, "bwd", name, dtype)


@pytest.mark.parametrize("dtype", HALF, ids=_dt_id)
def test_layer_half_nan_and_inf_propagate(dtype):
    """A NaN in h0 makes that row's states NaN at every step (stored as torch stores a rounded NaN: bf16 0x7FC0) and
    leaves the other rows equal to a run without it; an inf input saturates the gates (sigmoid 0 / 1, tanh +-1) as
    in the float64 reference, so the states stay finite."""
    seq, batch, isz, hsz = 5, 9, 7, 37  # 37: vector lanes and a scalar tail in the rounding
    params = _cast(_params(isz, hsz, True, seed=4), dtype)
    x, h0 = torch.randn(seq, batch, isz, dtype=dtype), torch.randn(batch, hsz, dtype=dtype)
    h0_nan = h0.clone()
    h0_nan[3, 5] = float("nan")
    out, _ = gru_layer(x, h0_nan, *params, backend="cpp")
    ref, _ = gru_layer(x, h0, *params, backend="cpp")
    assert out[:, 3].isnan().any(dim=-1).all(), "the NaN row stays NaN"
    keep = [b for b in range(batch) if b != 3]
    assert torch.equal(out[:, keep], ref[:, keep])
    if dtype == torch.bfloat16:
        bits = out[:, 3].view(torch.int16)[out[:, 3].isnan()]
        assert (bits == 0x7FC0).all()
    x_inf = x.clone()
    x_inf[0, 1, 0] = float("inf")
    out_inf, _ = gru_layer(x_inf, h0, *params, backend="cpp")
    ref_inf, _ = gru_layer(x_inf.double(), h0.double(), *_cast(params, F64), backend="torch")
    assert torch.isfinite(ref_inf).all() and torch.isfinite(out_inf).all()
    _check(out_inf, ref_inf, "fwd", "out (inf input)", dtype)


@pytest.mark.parametrize("dtype", HALF, ids=_dt_id)
def test_nn_gru_half_matches_torch_nn_gru(dtype):
    """pyattn.nn.GRU in fp16 / bf16 (two bidirectional layers, batch_first) against torch.nn.GRU in float64 from the
    same rounded weights and inputs, within TOL["gru"][dtype]."""
    cfg = {"num_layers": 2, "bidirectional": True, "batch_first": True}
    mod = pyattn.nn.GRU(13, 33, **cfg).to(dtype)
    twin = torch.nn.GRU(13, 33, **cfg).double()
    twin.load_state_dict({k: v.double() for k, v in mod.state_dict().items()}, strict=True)
    x = torch.randn(5, 17, 13, dtype=dtype, requires_grad=True)
    with pyattn.use_backend("cpp"):
        out, hn = mod(x)
    xr = x.detach().double().requires_grad_()
    r_out, r_hn = twin(xr)
    _check(out, r_out, "fwd", "output", dtype)
    _check(hn, r_hn, "fwd", "h_n", dtype)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad((out * dout).sum(), [x, *mod.parameters()])
    r_grads = torch.autograd.grad((r_out * dout.double()).sum(), [xr, *twin.parameters()])
    for i, (g, r) in enumerate(zip(grads, r_grads)):
        _check(g, r, "bwd", f"grad {i}", dtype)


NN_CONFIGS = [
    {"num_layers": 1},
    {"num_layers": 2, "bidirectional": True, "batch_first": True},
    {"num_layers": 3, "bidirectional": True, "dropout": 0.25},  # dropout inactive in eval
    {"num_layers": 2, "bias": False, "batch_first": True},
]


@pytest.mark.parametrize("cfg", NN_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("with_h0", [False, True], ids=["h0=None", "h0"])
def test_nn_gru_matches_torch_nn_gru(cfg, with_h0):
    isz, hsz, seq, batch = 13, 33, 17, 5
    mod = pyattn.nn.GRU(isz, hsz, **cfg).eval()
    twin = torch.nn.GRU(isz, hsz, **cfg).double().eval()
    twin.load_state_dict({k: v.double() for k, v in mod.state_dict().items()}, strict=True)
    dirs = 2 if cfg.get("bidirectional") else 1
    shape = (batch, seq, isz) if cfg.get("batch_first") else (seq, batch, isz)
    x = torch.randn(shape, requires_grad=True)
    h0 = torch.randn(cfg["num_layers"] * dirs, batch, hsz, requires_grad=True) if with_h0 else None
    with pyattn.use_backend("cpp"):
        out, hn = mod(x, h0)
    xr = x.detach().double().requires_grad_()
    h0r = h0.detach().double().requires_grad_() if with_h0 else None
    r_out, r_hn = twin(xr, h0r)
    _check(out, r_out, "fwd", "output")
    _check(hn, r_hn, "fwd", "h_n")
    dout, dhn = torch.randn_like(out), torch.randn_like(hn)
    wrt = [x] + ([h0] if with_h0 else []) + list(mod.parameters())
    r_wrt = [xr] + ([h0r] if with_h0 else []) + list(twin.parameters())
    grads = torch.autograd.grad((out * dout).sum() + (hn * dhn).sum(), wrt)
    r_grads = torch.autograd.grad((r_out * dout.double()).sum() + (r_hn * dhn.double()).sum(), r_wrt)
    for i, (g, r) in enumerate(zip(grads, r_grads)):
        _check(g, r, "bwd", f"grad {i}")


@pytest.mark.parametrize("cfg", NN_CONFIGS[:3], ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("merge_rows", sorted(PACKED_CALLS), ids=lambda m: f"merge={m}")
def test_nn_gru_packed_sequence_on_the_cpp_kernels(cfg, merge_rows):
    """PackedSequence inputs: the packed plan's groups (views, padded, mixed) on the cpp kernels."""
    calls = check_packed_gru("cpp", isz=13, hsz=33, merge_rows=merge_rows, **cfg)
    assert calls == PACKED_CALLS[merge_rows] * cfg["num_layers"] * (2 if cfg.get("bidirectional") else 1)


def test_nn_gru_unbatched_matches():
    mod = pyattn.nn.GRU(6, 9, num_layers=2, bidirectional=True)
    twin = torch.nn.GRU(6, 9, num_layers=2, bidirectional=True).double()
    twin.load_state_dict({k: v.double() for k, v in mod.state_dict().items()})
    x = torch.randn(12, 6)
    with pyattn.use_backend("cpp"):
        out, hn = mod(x)
    r_out, r_hn = twin(x.double())
    _check(out, r_out, "fwd", "output")
    _check(hn, r_hn, "fwd", "h_n")


def test_nn_gru_dropout_training_matches_torch_backend():
    """Inter-layer dropout in training: with the same seed the cpp and torch backends draw the same masks, so the
    results agree to fp32 tolerance (the torch backend's fp32 result stands in for the oracle here); and dropout
    changes the result."""
    mod = pyattn.nn.GRU(7, 19, num_layers=3, dropout=0.5).train()
    x = torch.randn(9, 4, 7)
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, torch.tensor([9, 3, 6, 9]), enforce_sorted=False)
    for inp in (x, packed):  # (the packed path applies it to the packed rows between layers)
        data = (lambda o: o.data) if inp is packed else (lambda o: o)
        results = {}
        for backend in ("cpp", "torch"):
            torch.manual_seed(123)
            xi = x.clone().requires_grad_()
            arg = xi if inp is x else inp._replace(data=inp.data.detach().clone().requires_grad_())
            with pyattn.use_backend(backend):
                out, hn = mod(arg)
            (data(out).sum() + hn.sum()).backward()
            results[backend] = (data(out).detach(), hn.detach(), data(arg).grad)
        for a, b in zip(results["cpp"], results["torch"]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        mod.eval()
        with pyattn.use_backend("cpp"):
            assert not torch.allclose(data(mod(inp)[0]), results["cpp"][0])
        mod.train()


@pytest.mark.parametrize("compiler", ["eager", "aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_torch_compile_fullgraph_runs_the_cpp_kernels(compiler):
    """pyattn.nn.GRU compiles with fullgraph=True (the C++ ops run inside the custom ops) and gives the eager bits."""
    torch._dynamo.reset()
    mod = pyattn.nn.GRU(8, 16, num_layers=2, bidirectional=True)
    x = torch.randn(5, 3, 8, requires_grad=True)
    ref = mod(x)
    out = torch.compile(mod, fullgraph=True, backend=compiler)(x)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
    wrt = [x, mod.weight_hh_l0, mod.bias_ih_l1_reverse]
    g = torch.autograd.grad(out[0].sum() + out[1].sum(), wrt)
    r = torch.autograd.grad(ref[0].sum() + ref[1].sum(), wrt)
    for a, b in zip(g, r):
        assert torch.equal(a, b)
    torch._dynamo.reset()


def test_dispatch_refuses_other_dtypes_and_falls_back():
    params = _params(5, 7, True)
    x, h0 = torch.randn(3, 2, 5, dtype=F64), torch.randn(2, 7, dtype=F64)
    p64 = [p.double() for p in params]
    inputs = GRULayerInputs(x, h0, *p64, needs_grad=False)
    reasons = get_backend("cpp").not_supported_reasons(inputs)
    assert any("float64" in r for r in reasons), reasons
    assert select(inputs).name == "torch"
    with pytest.raises(BackendNotSupported, match="float64"):
        gru_layer(x, h0, *p64, backend="cpp")
    assert "cpp: accepts -> selected" in pyattn.explain("gru_cell", torch.randn(2, 5), None, *params)


# ---- the C++ ops directly ----------------------------------------------------------------------------------


def _seq_args(seq=4, batch=3, isz=5, hsz=7, bias=True):
    w_ih, w_hh, b_ih, b_hh = _params(isz, hsz, bias)
    return [torch.randn(seq, batch, isz), torch.randn(batch, hsz), w_ih, w_hh, b_ih, b_hh]


@pytest.mark.parametrize("dtype", DTYPES, ids=_dt_id)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_opcheck_cpp_ops(bias, dtype):
    ops = torch.ops.pyattn
    args = _cast(_seq_args(bias=bias), dtype)
    for reverse in (False, True):
        for needs_grad in (False, True):
            torch.library.opcheck(ops.gru_seq_fwd.default, (*args, reverse, needs_grad))
    out, h_last, ws = ops.gru_seq_fwd(*args, False, True)
    x, h0, w_ih, w_hh = args[:4]
    dout, dh = torch.randn_like(out), torch.randn_like(h_last)
    for need_w in (False, True):
        torch.library.opcheck(ops.gru_seq_bwd.default,
                              (dout, dh, x, h0, w_ih, w_hh, out, ws, bias, bias, False, need_w))
    xc, hc = x[0], h0
    torch.library.opcheck(ops.gru_step_fwd.default, (xc, hc, w_ih, w_hh, args[4], args[5], True))
    torch.library.opcheck(ops.gru_step_fwd.default, (xc, hc, w_ih, w_hh, args[4], args[5], False))
    h1, ws1 = ops.gru_step_fwd(xc, hc, w_ih, w_hh, args[4], args[5], True)
    for need_w in (False, True):
        torch.library.opcheck(ops.gru_step_bwd.default,
                              (torch.randn_like(h1), xc, hc, w_ih, w_hh, ws1, bias, bias, need_w))


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: a.__setitem__(0, a[0].double()), "input must have dtype float32"),
        (lambda a: a.__setitem__(0, a[0][0]), "input must be 3-D"),
        (lambda a: a.__setitem__(1, torch.randn(4, 7)), r"h0 must have shape \[3, 7\]"),
        (lambda a: a.__setitem__(2, torch.randn(21, 6)), r"weight_ih must have shape \[21, 5\]"),
        (lambda a: a.__setitem__(3, torch.randn(20, 7)), "weight_hh must have shape"),
        (lambda a: a.__setitem__(3, torch.randn(21)), "weight_hh must be 2-D"),
        (lambda a: a.__setitem__(4, torch.randn(20)), r"bias_ih must have shape \[21\]"),
        (lambda a: a.__setitem__(5, torch.randn(21, dtype=F64)), "bias_hh must have dtype float32"),
        (lambda a: a.__setitem__(1, a[1].half()), "h0 must have dtype float32"),
    ],
    ids=["x_dtype", "x_rank", "h0_shape", "w_ih_shape", "w_hh_shape", "w_hh_rank", "b_ih_shape", "b_hh_dtype",
         "h0_dtype"],
)
def test_bad_inputs_to_cpp_op_raise_naming_the_argument(mutate, match):
    args = _seq_args()
    good = [a.clone() for a in args]
    mutate(args)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.pyattn.gru_seq_fwd(*args, False, True)
    # nothing lost: the next valid call works and inputs were untouched
    out, _h, _ws = torch.ops.pyattn.gru_seq_fwd(*good, False, True)
    assert out.shape == (4, 3, 7) and torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", HALF, ids=_dt_id)
def test_half_ops_empty_inputs_and_dtype_mismatch(dtype):
    """16-bit C++ ops on empty sequences / batches return the dtype's empty or zero results (and h_T = h0), and a
    tensor of another dtype than the input is refused naming it."""
    ops = torch.ops.pyattn
    w_ih, w_hh, b_ih, b_hh = _cast(_params(5, 7, True), dtype)
    h0 = torch.randn(2, 7, dtype=dtype)
    o, hl, ws = ops.gru_seq_fwd(torch.randn(0, 2, 5, dtype=dtype), h0, w_ih, w_hh, b_ih, b_hh, False, True)
    assert o.shape == (0, 2, 7) and o.dtype == dtype and torch.equal(hl, h0) and ws.dtype == F32
    o, hl, _ = ops.gru_seq_fwd(torch.randn(3, 0, 5, dtype=dtype), h0[:0], w_ih, w_hh, b_ih, b_hh, False, False)
    assert o.shape == (3, 0, 7) and hl.shape == (0, 7) and o.dtype == dtype
    dl = torch.randn(2, 7, dtype=dtype)
    g = ops.gru_seq_bwd(torch.randn(0, 2, 7, dtype=dtype), dl, torch.randn(0, 2, 5, dtype=dtype), h0, w_ih, w_hh,
                        None, torch.zeros(0, 2, 28), True, True, False, True)
    assert all(t.dtype == dtype for t in g) and torch.equal(g[1], dl)
    assert all(torch.count_nonzero(t) == 0 for t in g[2:])
    name = str(dtype).split(".")[-1]
    with pytest.raises(RuntimeError, match=f"h0 must have dtype {name}"):
        ops.gru_seq_fwd(torch.randn(3, 2, 5, dtype=dtype), h0.float(), w_ih, w_hh, b_ih, b_hh, False, True)
    with pytest.raises(RuntimeError, match=f"weight_hh must have dtype {name}"):
        ops.gru_seq_fwd(torch.randn(3, 2, 5, dtype=dtype), h0, w_ih, w_hh.float(), b_ih, b_hh, False, True)


def test_bad_workspace_to_cpp_backward_raises():
    args = _seq_args()
    out, h, ws = torch.ops.pyattn.gru_seq_fwd(*args, False, True)
    x, h0, w_ih, w_hh = args[:4]
    with pytest.raises(RuntimeError, match="ws must have shape"):
        torch.ops.pyattn.gru_seq_bwd(torch.randn_like(out), torch.randn_like(h), x, h0, w_ih, w_hh, out,
                                     ws[:, :, :-1], True, True, False, True)
    with pytest.raises(RuntimeError, match="dout must have shape"):
        torch.ops.pyattn.gru_seq_bwd(torch.randn(4, 3, 8), torch.randn_like(h), x, h0, w_ih, w_hh, out, ws, True,
                                     True, False, True)
