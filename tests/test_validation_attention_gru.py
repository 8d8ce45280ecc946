"""Attention and GRU API: torch's error types and texts, forced-backend refusals, custom ops (opcheck),
torch.compile with zero graph breaks, explain()."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import pyattn
from pyattn.dispatch import BackendNotSupported
from pyattn.ops.attention import _attention_bwd, _attention_fwd
from pyattn.ops.gru import _gru_cell_bwd, _gru_cell_fwd, _gru_layer_bwd, _gru_layer_fwd, gru_layer

sdpa = pyattn.scaled_dot_product_attention


@pytest.fixture(autouse=True)
def _fixed_seed():
    """Every test starts from the same global RNG state (tests that draw without a generator stay fixed)."""
    torch.manual_seed(0)


def _torch_message(fn):
    with pytest.raises(Exception) as info:
        fn()
    return type(info.value), str(info.value)


def _same_error_as_torch(ours, theirs):
    """Both raise, with the same exception type and the same text (ours may only append a clarification)."""
    t_type, t_msg = _torch_message(theirs)
    with pytest.raises(t_type) as info:
        ours()
    assert str(info.value).startswith(t_msg.rstrip(".").split("\n")[0][:60]), (str(info.value), t_msg)


# ---- attention ---------------------------------------------------------------------------------------------

def test_attention_errors_match_torch_texts():
    q = torch.randn(2, 4, 5, 8)

    def fs(*args, **kw):  # torch's checks as its math backend makes them (the fused CPU kernel skips some)
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(*args, **kw)

    cases = [
        ((q, q.double(), q), {}),  # dtypes differ
        ((q, q, q.to("meta")), {}),  # devices differ
        ((torch.randn(8), torch.randn(8), torch.randn(8)), {}),  # rank < 2
        ((q, q, q), {"attn_mask": torch.ones(5, 5, dtype=torch.bool), "is_causal": True}),
        ((q, q, q), {"dropout_p": 1.5}),
        ((q, q, q), {"attn_mask": torch.ones(5, 5, dtype=torch.int64)}),  # mask dtype
        ((q, q, q), {"attn_mask": torch.ones(5, 5, dtype=torch.float64)}),
    ]
    for args, kw in cases:
        _same_error_as_torch(lambda: sdpa(*args, **kw), lambda: fs(*args, **kw))
    with pytest.raises(
        RuntimeError,
        match=r"Expected query, key, and value to have the same dtype, but got "
        r"query.dtype: float key.dtype: double and value.dtype: float instead.",
    ):
        sdpa(q, q.double(), q)
    with pytest.raises(
        RuntimeError,
        match=r"Expected attn_mask dtype to be bool or float or to match query dtype, "
        r"but got attn_mask.dtype: long int and  query.dtype: float instead.",
    ):
        sdpa(q, q, q, attn_mask=torch.ones(5, 5, dtype=torch.int64))


def test_attention_errors_where_torch_has_no_specific_check():
    q = torch.randn(2, 4, 5, 8)
    with pytest.raises(
        RuntimeError, match=r"same head dimension .* query.size\(-1\): 8 and key.size\(-1\): 7"
    ):
        sdpa(q, torch.randn(2, 4, 5, 7), q)
    with pytest.raises(
        RuntimeError,
        match=r"Expected key and value to have the same sequence length, but got key "
        r"of shape \[2, 4, 5, 8\] and value of shape \[2, 4, 6, 8\]",
    ):
        sdpa(q, q, torch.randn(2, 4, 6, 8))
    with pytest.raises(
        RuntimeError, match="Number of heads in key and value must divide the number of heads in query"
    ):
        sdpa(q, torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 8), enable_gqa=True)
    with pytest.raises(RuntimeError, match="Number of heads in key and value must divide"):
        sdpa(q, torch.randn(2, 2, 5, 8), torch.randn(2, 4, 5, 8), enable_gqa=True)  # k/v heads differ
    with pytest.raises(
        RuntimeError,
        match=r"The size of tensor a \(4\) must match the size of tensor b \(2\) at "
        r"non-singleton dimension 1 .*enable_gqa=True",
    ):
        sdpa(q, torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8))
    with pytest.raises(RuntimeError, match=r"batch dimensions to be broadcastable"):
        sdpa(q, torch.randn(3, 4, 5, 8), torch.randn(3, 4, 5, 8))
    for p in (-0.1, 1.5, float("nan")):
        with pytest.raises(RuntimeError, match="dropout probability has to be between 0 and 1, but got"):
            sdpa(q, q, q, dropout_p=p)
    with pytest.raises(RuntimeError, match=r"dropout probability 1.0 is not supported .* \[0, 1\)"):
        sdpa(q, q, q, dropout_p=1.0)
    # a 0-d tensor is a probability (torch takes it); anything else that is no number is a TypeError, not a range
    # error quoting the value
    assert torch.equal(sdpa(q, q, q, dropout_p=torch.tensor(0.0)), sdpa(q, q, q))
    for bad in ("0.1", torch.tensor([0.1, 0.2])):
        with pytest.raises(TypeError, match=f"dropout_p must be a float, got {type(bad).__name__}"):
            sdpa(q, q, q, dropout_p=bad)
    for bad in (q.long(), q.int()):
        with pytest.raises(RuntimeError, match="expected floating point query, key and value, but got int"):
            sdpa(bad, bad, bad)
    with pytest.raises(
        RuntimeError,
        match=r"attn_mask of shape \[3, 5\] cannot be broadcast to the attention "
        r"weights' shape \[2, 4, 5, 5\]",
    ):
        sdpa(q, q, q, attn_mask=torch.ones(3, 5, dtype=torch.bool))
    with pytest.raises(RuntimeError, match=r"attn_mask of shape \[2, 4, 5, 5, 1\] cannot be broadcast"):
        sdpa(q, q, q, attn_mask=torch.ones(2, 4, 5, 5, 1, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="Expected attn_mask to be on the same device as query"):
        sdpa(q, q, q, attn_mask=torch.ones(5, 5, device="meta"))
    for s in (math.inf, -math.inf, math.nan):
        with pytest.raises(ValueError, match="scale must be a finite number"):
            sdpa(q, q, q, scale=s)
    with pytest.raises(TypeError, match="key must be a Tensor"):
        sdpa(q, [1.0], q)


def test_flash_attn_func_errors():
    q = torch.randn(2, 5, 4, 8)
    with pytest.raises(
        RuntimeError,
        match=r"flash_attn_func expects q, k, v of shape \(batch, seqlen, nheads, "
        r"headdim\), but got q.dim: 3",
    ):
        pyattn.flash_attn_func(q[0], q[0], q[0])
    with pytest.raises(
        RuntimeError, match="Number of heads in key/value must divide number of heads in query"
    ):
        pyattn.flash_attn_func(q, torch.randn(2, 5, 3, 8), torch.randn(2, 5, 3, 8))
    with pytest.raises(RuntimeError, match="same batch size"):
        pyattn.flash_attn_func(q, torch.randn(1, 5, 4, 8), torch.randn(1, 5, 4, 8))
    with pytest.raises(RuntimeError, match="Expected q, k, and v to have the same dtype"):
        pyattn.flash_attn_func(q, q.half(), q)
    with pytest.raises(RuntimeError, match=r"same head dimension .* q.size\(-1\): 8 and k.size\(-1\): 6"):
        pyattn.flash_attn_func(q, torch.randn(2, 5, 4, 6), q)
    with pytest.raises(ValueError, match="scale must be a finite number"):
        pyattn.flash_attn_func(q, q, q, softmax_scale=math.inf)
    with pytest.raises(RuntimeError, match=r"same sequence length, but got k of shape \[2, 5, 4, 8\] and v of shape "
                                           r"\[2, 6, 4, 8\]"):  # the shapes as passed, (B, L, H, D)
        pyattn.flash_attn_func(q, q, torch.randn(2, 6, 4, 8))


def test_forced_backend_refusal_and_fallback():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(
        BackendNotSupported,
        match=r"backend 'cuda' \(forced by backend= argument\) cannot run "
        r"attention",
    ):
        sdpa(q, q, q, backend="cuda")
    with pytest.raises(BackendNotSupported, match="cannot run gru_cell"):
        pyattn.gru_cell(torch.randn(2, 3), None, torch.randn(12, 3), torch.randn(12, 4), backend="cuda")
    # an additive mask that requires grad only runs on the torch backend
    m = torch.zeros(4, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="attn_mask requires grad, which only the torch backend computes"):
        sdpa(q, q, q, attn_mask=m, backend="cpp")
    # unforced: falls through the priority list (to torch at worst), and the process stays usable
    torch.testing.assert_close(sdpa(q, q, q), F.scaled_dot_product_attention(q, q, q), atol=1e-5, rtol=1.3e-6)


def test_error_leaves_inputs_untouched_and_next_call_works():
    q = torch.randn(1, 2, 4, 8)
    k = torch.randn(1, 2, 4, 8)
    before = (q.clone(), k.clone())
    with pytest.raises(RuntimeError):
        sdpa(q, k, torch.randn(1, 2, 5, 8))
    assert torch.equal(q, before[0]) and torch.equal(k, before[1])
    assert sdpa(q, k, k).shape == (1, 2, 4, 8)


# ---- GRU ---------------------------------------------------------------------------------------------------


def test_gru_cell_errors_match_torch():
    cell = torch.nn.GRUCell(4, 6)
    w = (cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
    cases = [
        (torch.randn(3, 5), torch.randn(3, 6)),  # wrong input_size
        (torch.randn(3, 4), torch.randn(3, 5)),  # wrong hidden size
        (torch.randn(3, 4), torch.randn(2, 6)),  # batch mismatch
        (torch.randn(2, 3, 4), None),  # 3-D input
        (torch.randn(3, 4), torch.randn(1, 3, 6)),  # 3-D hidden
        (torch.randn(3, 4).double(), torch.randn(3, 6).double()),  # dtype mismatch with the weights
        (torch.randn(3, 4), torch.randn(3, 6).double()),
    ]
    for x, h in cases:
        _same_error_as_torch(lambda: pyattn.gru_cell(x, h, *w), lambda: cell(x, h))
    _same_error_as_torch(
        lambda: pyattn.gru_cell(torch.randn(3, 4), None, torch.randn(17, 4), *w[1:]),
        lambda: torch.gru_cell(torch.randn(3, 4), torch.randn(3, 6), torch.randn(17, 4), *w[1:]),
    )
    with pytest.raises(RuntimeError, match="input has inconsistent input_size: got 5 expected 4"):
        pyattn.gru_cell(torch.randn(3, 5), None, *w)
    with pytest.raises(RuntimeError, match="hidden0 has inconsistent hidden_size: got 5, expected 6"):
        pyattn.gru_cell(torch.randn(3, 4), torch.randn(3, 5), *w)
    with pytest.raises(RuntimeError, match="Input batch size 3 doesn't match hidden0 batch size 2"):
        pyattn.gru_cell(torch.randn(3, 4), torch.randn(2, 6), *w)
    with pytest.raises(ValueError, match="GRUCell: Expected input to be 1D or 2D, got 3D instead"):
        pyattn.gru_cell(torch.randn(2, 3, 4), None, *w)
    with pytest.raises(ValueError, match="GRUCell: Expected input to be 1D or 2D, got 0D instead"):
        pyattn.gru_cell(torch.tensor(1.0), None, *w)
    with pytest.raises(
        RuntimeError, match="mat1 and mat2 must have the same dtype, but got Double and Float"
    ):
        pyattn.gru_cell(torch.randn(3, 4).double(), None, *w)
    with pytest.raises(RuntimeError, match=r"GRUCell: Expected hidden to be 1D like the input \(unbatched\)"):
        pyattn.gru_cell(torch.randn(4), torch.randn(3, 6), *w)
    with pytest.raises(RuntimeError, match=r"Expected bias_hh of shape \[18\]"):
        pyattn.gru_cell(torch.randn(3, 4), None, *w[:3], torch.randn(17))
    with pytest.raises(RuntimeError, match="weight_hh first dim must be 3 \\* hidden_size = 18, but got 17"):
        pyattn.gru_cell(torch.randn(3, 4), None, w[0], torch.randn(17, 6))
    with pytest.raises(RuntimeError, match="expected a floating point input, got int32"):
        pyattn.gru_cell(torch.ones(3, 4, dtype=torch.int32), None, *(t.int() for t in w))
    with pytest.raises(RuntimeError, match="Expected all tensors to be on the same device"):
        pyattn.gru_cell(torch.randn(3, 4), torch.randn(3, 6, device="meta"), *w)
    assert pyattn.gru_cell(torch.randn(3, 4), None, *w).shape == (3, 6)  # usable after errors


def test_gru_shortcut_accepts_only_valid_arguments():
    # _validate's fast path (_plainly_valid) must refuse everything the itemised checks raise for, and take the
    # common valid calls (else it would be dead code).
    from pyattn.ops.gru import _plainly_valid, _validate
    x, h = torch.randn(3, 4), torch.randn(3, 6)
    w = [torch.randn(18, 4), torch.randn(18, 6), torch.randn(18), torch.randn(18)]
    for ok in ((x, h, *w), (x, h, *w[:2], None, None), (torch.randn(5, 3, 4), h, *w)):
        assert _plainly_valid(*ok)
        _validate(*ok, "gru_cell")
    bad = {
        "input int": (x.int(), h, *w),
        "input size": (torch.randn(3, 5), h, *w),
        "batch": (x, torch.randn(2, 6), *w),
        "hidden size": (x, torch.randn(3, 5), *w),
        "hx dtype": (x, h.double(), *w),
        "weight_ih rows": (x, h, torch.randn(17, 4), *w[1:]),
        "weight_hh rows": (x, h, w[0], torch.randn(17, 6), *w[2:]),
        "weight_ih 3-D": (x, h, torch.randn(1, 18, 4), *w[1:]),
        "weight_hh dtype": (x, h, w[0], w[1].double(), *w[2:]),
        "bias_ih shape": (x, h, *w[:2], torch.randn(17), w[3]),
        "bias_hh 2-D": (x, h, *w[:3], torch.randn(1, 18)),
        "bias_ih dtype": (x, h, *w[:2], w[2].double(), w[3]),
        "bias_hh not a tensor": (x, h, *w[:3], [0.0] * 18),
        "weight_hh not a tensor": (x, h, w[0], w[1].tolist(), *w[2:]),
        "device": (x, h.to("meta"), *w),
    }
    for name, args in bad.items():
        assert not _plainly_valid(*args), name
        with pytest.raises((RuntimeError, TypeError)):
            _validate(*args, "gru_cell")


def test_gru_layer_errors():
    gru = torch.nn.GRU(4, 6)
    w = (gru.weight_ih_l0, gru.weight_hh_l0)
    with pytest.raises(RuntimeError, match=r"expected a 3-D time-major input \(seq_len, batch, input_size\)"):
        gru_layer(torch.randn(3, 4), None, *w)
    with pytest.raises(RuntimeError, match="input has inconsistent input_size: got 5 expected 4"):
        gru_layer(torch.randn(2, 3, 5), None, *w)
    with pytest.raises(RuntimeError, match="expected a 2-D h0"):
        gru_layer(torch.randn(2, 3, 4), torch.randn(1, 3, 6), *w)
    with pytest.raises(RuntimeError, match="Input batch size 3 doesn't match hidden0 batch size 2"):
        gru_layer(torch.randn(2, 3, 4), torch.randn(2, 6), *w)


# ---- custom ops --------------------------------------------------------------------------------------------


def test_opcheck_attention_ops():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 8, generator=g, requires_grad=True)
    k = torch.randn(2, 2, 7, 8, generator=g, requires_grad=True)
    v = torch.randn(2, 2, 7, 6, generator=g, requires_grad=True)
    qb = torch.randn(2, 5, 4, 8, generator=g).transpose(1, 2).requires_grad_()
    bool_mask = torch.rand(2, 1, 5, 7, generator=g) > 0.3
    samples = [
        (q, k, v, None, 0.0, False, False, 0.3, None, True, None),
        (q, k, v, bool_mask, 0.0, True, True, 0.3, None, True, None),
        (
            qb,
            k,
            v,
            torch.randn(1, 4, 1, 7, generator=g),
            0.2,
            True,
            False,
            0.5,
            torch.tensor([3, 4]),
            True,
            "torch",
        ),
    ]
    for args in samples:
        torch.library.opcheck(_attention_fwd.op, args)
        out, lse, state = _attention_fwd(*args)
        qq, kk, vv = (t.detach() for t in args[:3])
        torch.library.opcheck(
            _attention_bwd.op,
            (torch.randn(out.shape, generator=g), qq, kk, vv, out.detach(), lse, *args[3:8], state, args[10]),
        )


def test_opcheck_gru_ops():
    g = torch.Generator().manual_seed(0)
    cell = torch.nn.GRUCell(5, 7)
    x = torch.randn(3, 5, generator=g, requires_grad=True)
    h = torch.randn(3, 7, generator=g, requires_grad=True)
    w = (cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
    for bias in (w[2:], (None, w[3])):
        args = (x, h, w[0], w[1], *bias, True, None)
        torch.library.opcheck(_gru_cell_fwd.op, args)
        _, ws = _gru_cell_fwd(*args)
        torch.library.opcheck(
            _gru_cell_bwd.op,
            (
                torch.randn(3, 7, generator=g),
                x.detach(),
                h.detach(),
                w[0].detach(),
                w[1].detach(),
                ws,
                bias[0] is not None,
                True,
                True,
                None,
            ),
        )
    torch.library.opcheck(_gru_cell_fwd.op, (x, h, *w, False, None))  # no workspace: backward recomputes it
    torch.library.opcheck(
        _gru_layer_fwd.op, (torch.randn(2, 3, 5, requires_grad=True), h, *w, False, False, None)
    )
    xs = torch.randn(4, 3, 5, generator=g, requires_grad=True)
    for reverse in (False, True):
        args = (xs, h, *w, reverse, True, None)
        torch.library.opcheck(_gru_layer_fwd.op, args)
        out, _, ws = _gru_layer_fwd(*args)
        torch.library.opcheck(
            _gru_layer_bwd.op,
            (
                torch.randn(4, 3, 7, generator=g),
                torch.randn(3, 7, generator=g),
                xs.detach(),
                h.detach(),
                w[0].detach(),
                w[1].detach(),
                out.detach(),
                ws,
                True,
                True,
                reverse,
                False,
                None,
            ),
        )


def _compiled_matches(fn, args, compile_backend):
    torch._dynamo.reset()
    cf = torch.compile(fn, fullgraph=True, backend=compile_backend)  # fullgraph: any graph break raises
    out = cf(*args)
    ref = fn(*args)
    torch.testing.assert_close(out, ref)
    wrt = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    for a, b in zip(torch.autograd.grad(out.sum(), wrt), torch.autograd.grad(ref.sum(), wrt)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("compile_backend", ["eager", "aot_eager"])
def test_torch_compile_fullgraph(compile_backend):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 9, 16, generator=g, requires_grad=True)
    k = torch.randn(2, 2, 11, 16, generator=g, requires_grad=True)
    v = torch.randn(2, 2, 11, 16, generator=g, requires_grad=True)
    mask = torch.rand(2, 1, 9, 11, generator=g) > 0.3

    def attn(q, k, v, mask):
        a = pyattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        b, lse = pyattn.flash_attn_func(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True, return_lse=True
        )
        return a + b.transpose(1, 2) + lse[..., None]

    _compiled_matches(attn, (q, k, v, mask), compile_backend)

    # the seed is drawn inside the graph; only shapes and finiteness are comparable
    def attn_dropout(q, k, v):
        return pyattn.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=0.2)

    torch._dynamo.reset()
    out = torch.compile(attn_dropout, fullgraph=True, backend=compile_backend)(q, k, v)
    assert out.shape == (2, 9, 4, 16) and out.isfinite().all()
    assert all(t.isfinite().all() for t in torch.autograd.grad(out.sum(), (q, k, v)))

    # a learned float mask (T5's position_bias): the torch-math path, whose use_backend() check once read a
    # ContextVar Dynamo cannot trace (fullgraph raised Unsupported)
    bias = torch.randn(1, 4, 9, 11, generator=g, requires_grad=True)
    torch._dynamo.reset()
    _compiled_matches(lambda q, k, v, m: pyattn.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True),
                      (q, k, v, bias), compile_backend)

    cell = torch.nn.GRUCell(5, 7)
    x = torch.randn(3, 5, generator=g, requires_grad=True)
    h = torch.randn(3, 7, generator=g, requires_grad=True)
    _compiled_matches(
        lambda x, h: pyattn.gru_cell(x, h, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh),
        (x, h),
        compile_backend,
    )


@pytest.mark.slow
def test_torch_compile_inductor():
    # one inductor case (it compiles C++ on CPU, ~20-40 s on 2 cores): attention then a GRU cell, forward +
    # backward
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, 5, 8, generator=g, requires_grad=True)
    cell = torch.nn.GRUCell(8, 8)

    def f(q):
        a = pyattn.scaled_dot_product_attention(q, q, q, is_causal=True)
        return pyattn.gru_cell(a.view(10, 8), None, cell.weight_ih, cell.weight_hh)

    _compiled_matches(f, (q,), "inductor")


def test_explain_attention_and_gru_cell():
    q = torch.randn(1, 2, 4, 8, dtype=torch.float64)
    text = pyattn.explain("attention", q, q, q, is_causal=True)
    assert "op attention on cpu" in text and "causal=top_left" in text and "selected:" in text
    cell = torch.nn.GRUCell(3, 4)
    text = pyattn.explain(
        "gru_cell", torch.randn(2, 3), None, cell.weight_ih, cell.weight_hh, backend="torch"
    )
    assert "op gru_cell on cpu" in text and "forced 'torch'" in text and "accepts" in text


def test_explain_and_select_for_calls_with_nothing_to_compute():
    # Empty calls run torch's ops whatever was asked (no kernel), and explain says so instead of naming a backend.
    q, k = torch.randn(1, 2, 0, 8), torch.randn(1, 2, 5, 8)
    for text in (pyattn.explain("attention", q, k, k), pyattn.explain("attention", k, q, q, backend="cpp"),
                 pyattn.explain("layer_norm", torch.randn(0, 34)[:, ::2], (17,)),
                 pyattn.explain("gru_cell", torch.randn(0, 3), None, torch.randn(12, 3), torch.randn(12, 4))):
        assert "nothing to compute" in text and "selected" not in text, text
    with pyattn.use_backend("cpp"):
        assert pyattn.layer_norm(torch.randn(3, 0), (0,)).shape == (3, 0)
