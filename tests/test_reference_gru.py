"""The torch backend's GRU cell and layer (the oracle for every kernel) against torch.nn.GRUCell /
torch.nn.GRU.

Weights are loaded from torch's modules; float64 comparisons are tight, lower precisions use
pyattn.testing.TOL. The layer backward is hand-written BPTT, checked against torch's autograd through nn.GRU.
"""
import pytest
import torch

import pyattn
from pyattn.ops.gru import gru_layer
from pyattn.testing import TOL, assert_tol, nan_padded

F64 = torch.float64
TOL64 = dict(atol=1e-11, rtol=1e-10)


@pytest.fixture(autouse=True)
def _fixed_seed():
    """Every test starts from the same global RNG state (tests that draw without a generator stay fixed)."""
    torch.manual_seed(0)


def _cell_params(cell):
    return (cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)


@pytest.mark.parametrize("batch,isz,hsz", [(0, 5, 7), (1, 1, 1), (3, 7, 127), (33, 64, 7), (2, 16, 1000)])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_cell_matches_torch(batch, isz, hsz, bias):
    torch.manual_seed(batch + isz + hsz)
    cell = torch.nn.GRUCell(isz, hsz, bias=bias).double()
    x = torch.randn(batch, isz, dtype=F64, requires_grad=True)
    h = torch.randn(batch, hsz, dtype=F64, requires_grad=True)
    out = pyattn.gru_cell(x, h, *_cell_params(cell))
    ref = cell(x, h)
    torch.testing.assert_close(out, ref, **TOL64)
    dout = torch.randn_like(ref)
    wrt = (x, h) + tuple(p for p in cell.parameters())
    for a, b in zip(torch.autograd.grad(out, wrt, dout), torch.autograd.grad(ref, wrt, dout)):
        torch.testing.assert_close(a, b, **TOL64)


def test_cell_unbatched_and_hx_none():
    cell = torch.nn.GRUCell(6, 9).double()
    x = torch.randn(6, dtype=F64)
    h = torch.randn(9, dtype=F64)
    out = pyattn.gru_cell(x, h, *_cell_params(cell))
    assert out.shape == (9,)
    torch.testing.assert_close(out, cell(x, h), **TOL64)
    torch.testing.assert_close(pyattn.gru_cell(x, None, *_cell_params(cell)), cell(x), **TOL64)
    xb = torch.randn(4, 6, dtype=F64)
    torch.testing.assert_close(pyattn.gru_cell(xb, None, *_cell_params(cell)), cell(xb), **TOL64)


def test_cell_gradcheck_float64():
    cell = torch.nn.GRUCell(3, 4).double()
    x = torch.randn(2, 3, dtype=F64, requires_grad=True)
    h = torch.randn(2, 4, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(pyattn.gru_cell, (x, h, *_cell_params(cell)))
    assert torch.autograd.gradcheck(lambda a, b, w1, w2: pyattn.gru_cell(a, b, w1, w2), (x, h, cell.weight_ih,
                                                                                          cell.weight_hh))
    # only one bias, and weights frozen (the backward op then skips weight grads)
    w_ih, w_hh = cell.weight_ih.detach(), cell.weight_hh.detach()
    assert torch.autograd.gradcheck(lambda a, b, bh: pyattn.gru_cell(a, b, w_ih, w_hh, None, bh),
                                    (x, h, cell.bias_hh))


def _layer_ref(gru, x, h0):
    """torch.nn.GRU (1 layer, maybe bidirectional) -> per-direction outputs."""
    out, hn = gru(x, h0)
    return out, hn


def _dirs(gru):
    names = ["", "_reverse"] if gru.bidirectional else [""]
    return [tuple(getattr(gru, f"{w}_l0{s}") for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
            for s in names]


@pytest.mark.parametrize("seq,batch", [(1, 3), (2, 1), (17, 33), (200, 3), (5, 0)])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_layer_matches_torch_gru(seq, batch, bidirectional):
    torch.manual_seed(seq * 7 + batch)
    isz, hsz = 5, 11
    gru = torch.nn.GRU(isz, hsz, bidirectional=bidirectional).double()
    x = torch.randn(seq, batch, isz, dtype=F64, requires_grad=True)
    h0 = torch.randn(2 if bidirectional else 1, batch, hsz, dtype=F64, requires_grad=True)
    ref_out, ref_hn = gru(x, h0)
    outs, hns = [], []
    for d, params in enumerate(_dirs(gru)):
        o, hn = gru_layer(x, h0[d], *params, reverse=d == 1)
        outs.append(o)
        hns.append(hn)
    out, hn = torch.cat(outs, -1), torch.stack(hns)
    torch.testing.assert_close(out, ref_out, **TOL64)
    torch.testing.assert_close(hn, ref_hn, **TOL64)
    dout, dhn = torch.randn_like(ref_out), torch.randn_like(ref_hn)
    wrt = (x, h0) + tuple(gru.parameters())
    ours = torch.autograd.grad((out, hn), wrt, (dout, dhn))
    theirs = torch.autograd.grad((ref_out, ref_hn), wrt, (dout, dhn))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, **TOL64)


def test_layer_gradcheck_float64():
    gru = torch.nn.GRU(3, 4).double()
    x = torch.randn(4, 2, 3, dtype=F64, requires_grad=True)
    h0 = torch.randn(2, 4, dtype=F64, requires_grad=True)
    params = _dirs(gru)[0]
    for reverse in (False, True):
        assert torch.autograd.gradcheck(lambda *a: gru_layer(*a, reverse=reverse), (x, h0, *params))
    assert torch.autograd.gradcheck(lambda a, b, w1, w2: gru_layer(a, b, w1, w2), (x, h0, *params[:2]))


def test_layer_equals_steps_of_cells_and_h0_none():
    torch.manual_seed(0)
    gru = torch.nn.GRU(6, 8)
    params = _dirs(gru)[0]
    x = torch.randn(9, 4, 6)
    out, hn = gru_layer(x, None, *params)
    h = torch.zeros(4, 8)
    for t in range(9):
        h = pyattn.gru_cell(x[t], h, *params)
        assert torch.equal(out[t], h)
    assert torch.equal(hn, h)
    out_r, hn_r = gru_layer(x, None, *params, reverse=True)
    h = torch.zeros(4, 8)
    for t in reversed(range(9)):
        h = pyattn.gru_cell(x[t], h, *params)
        assert torch.equal(out_r[t], h)
    assert torch.equal(hn_r, h)


def test_layer_zero_length_returns_h0():
    gru = torch.nn.GRU(3, 4)
    h0 = torch.randn(2, 4, requires_grad=True)
    out, hn = gru_layer(torch.randn(0, 2, 3), h0, *_dirs(gru)[0])
    assert out.shape == (0, 2, 4) and torch.equal(hn, h0) and hn.data_ptr() != h0.data_ptr()
    (dh0,) = torch.autograd.grad(hn.sum(), h0)
    assert torch.equal(dh0, torch.ones(2, 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_low_precision_within_tolerance_table(dtype):
    torch.manual_seed(1)
    gru = torch.nn.GRU(16, 127)
    x = torch.randn(50, 3, 16).to(dtype)
    h0 = torch.randn(3, 127).to(dtype)
    params = [p.detach().to(dtype) for p in _dirs(gru)[0]]
    dout = torch.randn(50, 3, 127).to(dtype)

    def run(dt):
        xs = x.to(dt).requires_grad_()
        hs = h0.to(dt).requires_grad_()
        ps = [p.to(dt).requires_grad_() for p in params]
        out, hn = gru_layer(xs, hs, *ps)
        return out, hn, torch.autograd.grad(out, [xs, hs, *ps], dout.to(dt))

    out, hn, grads = run(dtype)
    rout, rhn, rgrads = run(F64)  # the oracle: same (rounded) inputs, float64
    assert out.dtype == dtype and out.shape == (50, 3, 127)
    assert_tol(out, rout, "gru", dtype)
    assert_tol(hn, rhn, "gru", dtype)
    for a, b in zip(grads, rgrads):
        assert_tol(a, b, "gru", dtype, "bwd")
    assert set(TOL["gru"]) >= {torch.float32, torch.bfloat16, torch.float16}


def test_long_sequence_stays_bounded_and_matches():
    torch.manual_seed(2)
    gru = torch.nn.GRU(4, 16)
    x = torch.randn(1000, 2, 4) * 3
    out, hn = gru_layer(x, None, *_dirs(gru)[0])
    assert out.isfinite().all() and out.abs().max() <= 1
    ref, ref_hn = gru(x)
    assert_tol(out, ref, "gru", torch.float32)


def test_nan_padded_and_strided_inputs_bitwise():
    torch.manual_seed(3)
    gru = torch.nn.GRU(7, 9)
    params = _dirs(gru)[0]
    x = torch.randn(6, 5, 7)
    h0 = torch.randn(5, 9)
    out, hn = gru_layer(x, h0, *params)
    padded = [nan_padded(p) for p in params]
    out2, hn2 = gru_layer(nan_padded(x), nan_padded(h0), *padded)
    assert torch.equal(out, out2) and torch.equal(hn, hn2)
    xb = x.transpose(0, 1).contiguous().transpose(0, 1)  # batch_first storage seen time-major
    out3, _ = gru_layer(xb, h0, *params)
    assert torch.equal(out, out3)
    w_t = params[0].t().contiguous().t()  # last dim strided: copied, same result
    out4, _ = gru_layer(x, h0, w_t, *params[1:])
    assert torch.equal(out, out4)
    c = pyattn.gru_cell(nan_padded(x[0]), nan_padded(h0), *padded)
    assert torch.equal(c, pyattn.gru_cell(x[0], h0, *params))
