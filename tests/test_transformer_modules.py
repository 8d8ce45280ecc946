"""pyattn.nn Transformer modules against their torch.nn twins with copied weights (fp32, CPU).

Parity: outputs within TESTING.md's fp32 forward tolerance (atol 1e-5 / rtol 1.3e-6), input and parameter grads
within the backward one (atol 1e-4 / rtol 1e-5), train and eval mode with dropout=0; state_dicts load with
strict=True both ways. torch's inference fast path is switched off for the reference (fixture ``no_fastpath``)
except in the one test that compares against it on purpose. Most tests run on the automatic backend choice;
``test_parity_per_backend`` forces each CPU backend.
"""
import contextlib
import io
import warnings
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

import pyattn
from pyattn.dispatch import get_backend
from pyattn.ops import attention as ops_attention
from pyattn.ops import layer_norm as ops_layer_norm
from pyattn.testing import assert_close_fp32

from conftest import backend_params

CLASSES = ["Transformer", "TransformerEncoder", "TransformerDecoder", "TransformerEncoderLayer",
           "TransformerDecoderLayer"]


@pytest.fixture
def no_fastpath():
    """The reference is torch's regular (non fast-path) implementation: the one pyattn mirrors."""
    prev = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    yield
    torch.backends.mha.set_fastpath_enabled(prev)


@contextlib.contextmanager
def _quiet():
    """torch warns about enable_nested_tensor when its TransformerEncoder cannot use nested tensors."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="enable_nested_tensor is True")
        yield


def _pair(name, *args, **kwargs):
    """(ours, theirs): torch's module built first, ours loads its state_dict (strict), and a fresh torch module
    loads ours back (strict), so keys, shapes and values agree both ways."""
    with _quiet():
        theirs = getattr(torch.nn, name)(*args, **kwargs)
        ours = getattr(pyattn.nn, name)(*args, **kwargs)
        assert list(ours.state_dict()) == list(theirs.state_dict())
        ours.load_state_dict(theirs.state_dict(), strict=True)
        back = getattr(torch.nn, name)(*args, **kwargs)
        back.load_state_dict(ours.state_dict(), strict=True)
    for k, v in back.state_dict().items():
        assert torch.equal(v, theirs.state_dict()[k]), k
    return ours, theirs


def _encoder_pair(num_layers, d=16, h=2, ff=32):
    """(ours, theirs) TransformerEncoder stacks without a final norm, sharing weights."""
    ours = pyattn.nn.TransformerEncoder(pyattn.nn.TransformerEncoderLayer(d, h, ff, 0.0), num_layers)
    theirs = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(d, h, ff, 0.0), num_layers,
                                         enable_nested_tensor=False)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return ours, theirs


def _run_both(ours, theirs, inputs, call, train, grads=True):
    """Run ``call(module, *inputs)`` on both modules (inputs are cloned into fresh leaves for each), compare
    outputs, then input and parameter grads under the same random upstream gradient."""
    ours.train(train)
    theirs.train(train)
    leaves = []
    outs = []
    for m in (ours, theirs):
        xs = [x.detach().clone().requires_grad_(x.is_floating_point() and grads) for x in inputs]
        leaves.append(xs)
        outs.append(call(m, *xs))
    assert outs[0].shape == outs[1].shape
    assert_close_fp32(outs[0], outs[1], "fwd", msg=lambda m: f"output ({'train' if train else 'eval'}): {m}")
    if not grads or outs[0].numel() == 0:
        return outs[0]
    g = torch.randn_like(outs[1])
    params = [{k.removeprefix("_orig_mod."): p for k, p in m.named_parameters()} for m in (ours, theirs)]
    for i, m in enumerate((ours, theirs)):
        m.zero_grad(set_to_none=True)
        (outs[i] * g).sum().backward()
    for a, b in zip(*leaves):
        if a.requires_grad:
            assert_close_fp32(a.grad, b.grad, "bwd", msg=lambda m: f"input grad: {m}")
    assert params[0].keys() == params[1].keys()
    for k in params[1]:
        pa, pb = params[0][k].grad, params[1][k].grad
        assert (pa is None) == (pb is None), k
        if pb is not None:
            assert_close_fp32(pa, pb, "bwd", msg=lambda m, k=k: f"grad of {k}: {m}")
    return outs[0]


# ---- inputs and masks -------------------------------------------------------------------------------------------

def _seq(n, b, d, batch_first):
    """(n, b, d) or (b, n, d); b=None: unbatched (n, d)."""
    if b is None:
        return torch.randn(n, d)
    return torch.randn(b, n, d) if batch_first else torch.randn(n, b, d)


def _attn_mask(kind, lq, lk, b, h):
    """An attention mask of ``kind`` (torch.nn convention: bool True = masked): none, float, bool, float3d,
    bool3d (N * nhead, L, S; nhead, L, S unbatched), causal (float -inf above the diagonal), causal_bool."""
    n3 = h if b is None else b * h
    if kind == "none":
        return None
    if kind == "float":
        return torch.randn(lq, lk)
    if kind == "float3d":
        return torch.randn(n3, lq, lk)
    if kind in ("bool", "bool3d"):
        m = torch.rand((lq, lk) if kind == "bool" else (n3, lq, lk)) > 0.6
        m[..., 0] = False  # every query keeps a key (fully masked rows are tested separately)
        return m
    if kind == "causal":
        return torch.nn.Transformer.generate_square_subsequent_mask(lq)
    if kind == "causal_bool":
        return torch.ones(lq, lk, dtype=torch.bool).triu(1)
    raise ValueError(kind)


def _kpm(kind, lk, b):
    """A key padding mask: none, bool (True = padding; batch element i loses its last i keys), float."""
    if kind == "none":
        return None
    if b is None:
        m = torch.zeros(lk, dtype=torch.bool)
        m[-2:] = True
    else:
        m = torch.zeros(b, lk, dtype=torch.bool)
        for i in range(b):
            m[i, lk - min(i, lk - 1):] = True
    if kind == "bool":
        return m
    if kind == "float":
        return torch.zeros(m.shape).masked_fill(m, float("-inf"))
    raise ValueError(kind)


# ---- constructor / signature / state_dict ------------------------------------------------------------------

@pytest.mark.parametrize("name", CLASSES)
def test_signatures_match_torch(name):
    import inspect
    for meth in ("__init__", "forward"):
        ours = inspect.signature(getattr(getattr(pyattn.nn, name), meth)).parameters
        theirs = inspect.signature(getattr(getattr(torch.nn, name), meth)).parameters
        assert list(ours) == list(theirs), (name, meth)
        for k in theirs:
            assert ours[k].default == theirs[k].default, (name, meth, k)
            assert ours[k].kind == theirs[k].kind, (name, meth, k)
    assert pyattn.nn.Transformer.generate_square_subsequent_mask is not None
    assert isinstance(inspect.getattr_static(pyattn.nn.Transformer, "generate_square_subsequent_mask"),
                      staticmethod)


def test_generate_square_subsequent_mask():
    for sz in (0, 1, 5):
        for dtype in (None, torch.float64, torch.bfloat16):
            a = pyattn.nn.Transformer.generate_square_subsequent_mask(sz, dtype=dtype)
            b = torch.nn.Transformer.generate_square_subsequent_mask(sz, dtype=dtype)
            assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("kw", [dict(), dict(bias=False, norm_first=True, batch_first=True, activation="gelu")],
                         ids=["default", "nobias-prenorm"])
def test_same_init_and_state_dict_as_torch(kw):
    """Same construction order: under one seed both build bitwise the same weights (xavier_uniform_ included)."""
    args = dict(d_model=16, nhead=2, num_encoder_layers=2, num_decoder_layers=1, dim_feedforward=24, **kw)
    torch.manual_seed(7)
    with _quiet():
        theirs = torch.nn.Transformer(**args)
    torch.manual_seed(7)
    ours = pyattn.nn.Transformer(**args)
    sa, sb = ours.state_dict(), theirs.state_dict()
    assert list(sa) == list(sb)
    for k in sb:
        assert sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]), k
    assert "encoder.layers.1.self_attn.in_proj_weight" in sa and "decoder.layers.0.multihead_attn.out_proj.weight" \
        in sa and "decoder.layers.0.norm3.weight" in sa and "encoder.norm.weight" in sa
    assert ("encoder.layers.0.norm1.bias" in sa) == kw.get("bias", True)
    # the layers are pyattn's modules
    enc = ours.encoder.layers[0]
    assert isinstance(enc.self_attn, pyattn.nn.MultiheadAttention) and isinstance(enc.norm1, pyattn.nn.AddNorm)
    assert isinstance(ours.encoder.norm, pyattn.nn.LayerNorm) and isinstance(ours.decoder.norm, pyattn.nn.LayerNorm)
    assert ours.encoder.layers[0] is not ours.encoder.layers[1]  # deep copies, as torch's _get_clones


def test_checkpoint_swap_into_existing_model():
    """A model written against torch.nn.Transformer: its checkpoint loads with strict=True into the same model
    built on pyattn.nn.Transformer, and back, with the same outputs."""

    class Seq2Seq(torch.nn.Module):
        def __init__(self, transformer_cls, vocab=11, d=16):
            super().__init__()
            self.emb = torch.nn.Embedding(vocab, d)
            with _quiet():
                self.transformer = transformer_cls(d, 2, 2, 2, 32, dropout=0.0, batch_first=True)
            self.out = torch.nn.Linear(d, vocab)

        def forward(self, src, tgt):
            m = torch.nn.Transformer.generate_square_subsequent_mask(tgt.shape[1])
            return self.out(self.transformer(self.emb(src), self.emb(tgt), tgt_mask=m, tgt_is_causal=True,
                                             src_key_padding_mask=src == 0))

    theirs = Seq2Seq(torch.nn.Transformer)
    buf = io.BytesIO()
    torch.save(theirs.state_dict(), buf)
    buf.seek(0)
    ours = Seq2Seq(pyattn.nn.Transformer)
    ours.load_state_dict(torch.load(buf), strict=True)
    src = torch.tensor([[3, 4, 5, 0, 0], [1, 2, 3, 4, 5]])
    tgt = torch.tensor([[1, 7, 8], [2, 9, 10]])
    for train in (True, False):
        _run_both(ours, theirs, [src, tgt], lambda m, s, t: m(s, t), train)
    back = Seq2Seq(torch.nn.Transformer)
    back.load_state_dict(ours.state_dict(), strict=True)
    torch.testing.assert_close(back(src, tgt), theirs(src, tgt), atol=0, rtol=0)


# ---- layer parity ---------------------------------------------------------------------------------------------

ENC_CASES = [
    # d, h, activation, norm_first, batch_first, bias, src_mask kind, key padding kind, is_causal
    (16, 2, "relu", False, False, True, "none", "none", False),
    (32, 4, "gelu", True, True, True, "float", "none", False),
    (16, 4, torch.tanh, False, True, False, "bool", "bool", False),
    (24, 3, torch.nn.GELU(approximate="tanh"), True, False, True, "none", "bool", False),
    (16, 2, "relu", False, False, True, "float3d", "float", False),
    (16, 2, "gelu", True, True, False, "bool3d", "none", False),
    (16, 2, "relu", False, True, True, "causal", "none", True),
    (16, 2, "relu", True, False, True, "causal_bool", "bool", True),
]


@pytest.mark.parametrize("d,h,act,nf,bf,bias,mk,kk,causal", ENC_CASES)
def test_encoder_layer_matches_torch(no_fastpath, d, h, act, nf, bf, bias, mk, kk, causal):
    ours, theirs = _pair("TransformerEncoderLayer", d, h, dim_feedforward=2 * d + 3, dropout=0.0, activation=act,
                         batch_first=bf, norm_first=nf, bias=bias)
    s, b = 7, 3
    x = _seq(s, b, d, bf)
    kw = dict(src_mask=_attn_mask(mk, s, s, b, h), src_key_padding_mask=_kpm(kk, s, b), is_causal=causal)
    for train in (True, False):
        _run_both(ours, theirs, [x], lambda m, x: m(x, **kw), train)


DEC_CASES = [
    # d, h, activation, norm_first, batch_first, bias, tgt_mask, memory_mask, tgt kpm, memory kpm, tgt_is_causal
    (16, 2, "relu", False, False, True, "none", "none", "none", "none", False),
    (32, 4, "gelu", True, True, True, "causal", "none", "none", "bool", True),
    (16, 4, torch.tanh, False, True, False, "bool", "float", "bool", "none", False),
    (16, 2, "relu", True, False, True, "float3d", "bool3d", "float", "float", False),
    (24, 3, "gelu", False, False, False, "causal_bool", "bool", "bool", "bool", True),
]


@pytest.mark.parametrize("d,h,act,nf,bf,bias,tm,mm,tk,mk,causal", DEC_CASES)
def test_decoder_layer_matches_torch(no_fastpath, d, h, act, nf, bf, bias, tm, mm, tk, mk, causal):
    ours, theirs = _pair("TransformerDecoderLayer", d, h, dim_feedforward=40, dropout=0.0, activation=act,
                         batch_first=bf, norm_first=nf, bias=bias)
    t, s, b = 5, 8, 2
    tgt, mem = _seq(t, b, d, bf), _seq(s, b, d, bf)
    kw = dict(tgt_mask=_attn_mask(tm, t, t, b, h), memory_mask=_attn_mask(mm, t, s, b, h),
              tgt_key_padding_mask=_kpm(tk, t, b), memory_key_padding_mask=_kpm(mk, s, b), tgt_is_causal=causal)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Support for mismatched")  # bool kpm + float mask cases
        for train in (True, False):
            _run_both(ours, theirs, [tgt, mem], lambda m, a, c: m(a, c, **kw), train)


TRANSFORMER_CASES = [
    # d, h, enc layers, dec layers, activation, norm_first, batch_first, bias, masks
    (16, 2, 1, 1, "relu", False, False, True, dict()),
    (32, 4, 2, 2, "gelu", False, True, True, dict(src_mask="bool", tgt_mask="causal", src_kpm="bool",
                                                        tgt_kpm="bool", mem_kpm="bool")),
    (16, 2, 2, 3, torch.nn.functional.silu, True, False, False,
     dict(src_mask="float", tgt_mask="causal", memory_mask="float", mem_kpm="float", src_kpm="float")),
    (24, 4, 3, 1, "relu", True, True, True, dict(src_mask="causal", tgt_mask="causal_bool", memory_mask="bool3d")),
]


def _transformer_kwargs(masks, s, t, b, h):
    return dict(src_mask=_attn_mask(masks.get("src_mask", "none"), s, s, b, h),
                tgt_mask=_attn_mask(masks.get("tgt_mask", "none"), t, t, b, h),
                memory_mask=_attn_mask(masks.get("memory_mask", "none"), t, s, b, h),
                src_key_padding_mask=_kpm(masks.get("src_kpm", "none"), s, b),
                tgt_key_padding_mask=_kpm(masks.get("tgt_kpm", "none"), t, b),
                memory_key_padding_mask=_kpm(masks.get("mem_kpm", "none"), s, b))


@pytest.mark.filterwarnings("ignore:Support for mismatched")  # bool padding + float mask: torch warns too
@pytest.mark.parametrize("d,h,ne,nd,act,nf,bf,bias,masks", TRANSFORMER_CASES)
def test_transformer_matches_torch(no_fastpath, d, h, ne, nd, act, nf, bf, bias, masks):
    ours, theirs = _pair("Transformer", d, h, ne, nd, 3 * d, dropout=0.0, activation=act, batch_first=bf,
                         norm_first=nf, bias=bias)
    s, t, b = 9, 6, 3
    src, tgt = _seq(s, b, d, bf), _seq(t, b, d, bf)
    kw = _transformer_kwargs(masks, s, t, b, h)
    for train in (True, False):
        _run_both(ours, theirs, [src, tgt], lambda m, a, c: m(a, c, **kw), train)


@pytest.mark.parametrize("norm", [True, False], ids=["norm", "no-norm"])
def test_stacks_match_torch(no_fastpath, norm):
    """TransformerEncoder / TransformerDecoder built around one of our layers, torch's built around torch's."""
    d, h = 16, 2
    torch.manual_seed(1)
    with _quiet():
        theirs_enc = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(d, h, 32, 0.0), 3,
                                                 torch.nn.LayerNorm(d) if norm else None, enable_nested_tensor=False)
        theirs_dec = torch.nn.TransformerDecoder(torch.nn.TransformerDecoderLayer(d, h, 32, 0.0), 2,
                                                 torch.nn.LayerNorm(d) if norm else None)
    ours_enc = pyattn.nn.TransformerEncoder(pyattn.nn.TransformerEncoderLayer(d, h, 32, 0.0), 3,
                                            pyattn.nn.LayerNorm(d) if norm else None, enable_nested_tensor=False)
    ours_dec = pyattn.nn.TransformerDecoder(pyattn.nn.TransformerDecoderLayer(d, h, 32, 0.0), 2,
                                            pyattn.nn.LayerNorm(d) if norm else None)
    for o, t in ((ours_enc, theirs_enc), (ours_dec, theirs_dec)):
        assert list(o.state_dict()) == list(t.state_dict())
        o.load_state_dict(t.state_dict(), strict=True)
    assert ours_enc.use_nested_tensor is False and ours_enc.mask_check is True
    src, tgt = torch.randn(7, 2, d), torch.randn(4, 2, d)
    kpm = _kpm("bool", 7, 2)
    for train in (True, False):
        _run_both(ours_enc, theirs_enc, [src], lambda m, x: m(x, src_key_padding_mask=kpm), train)
        _run_both(ours_dec, theirs_dec, [tgt, src],
                  lambda m, a, c: m(a, c, tgt_mask=_attn_mask("causal", 4, 4, 2, h), memory_key_padding_mask=kpm),
                  train)


def test_swapped_in_torch_layernorm_still_matches(no_fastpath):
    """A user who replaces norm1 by a torch.nn.LayerNorm gets the unfused sum and the same numbers."""
    ours, theirs = _pair("TransformerEncoderLayer", 16, 2, 32, 0.0)
    ln = torch.nn.LayerNorm(16)
    ln.load_state_dict(ours.norm1.state_dict())
    ours.norm1 = ln
    ours.load_state_dict(theirs.state_dict(), strict=True)
    _run_both(ours, theirs, [torch.randn(5, 2, 16)], lambda m, x: m(x), True)


# ---- unbatched, empty, fully masked -----------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:Support for mismatched")  # bool padding + float mask: torch warns too
@pytest.mark.parametrize("nf", [False, True], ids=["postnorm", "prenorm"])
def test_unbatched_inputs(no_fastpath, nf):
    d, h = 16, 2
    s, t = 6, 4
    enc, enc_t = _pair("TransformerEncoderLayer", d, h, 32, 0.0, norm_first=nf)
    kw = dict(src_mask=_attn_mask("bool3d", s, s, None, h), src_key_padding_mask=_kpm("bool", s, None))
    _run_both(enc, enc_t, [torch.randn(s, d)], lambda m, x: m(x, **kw), True)
    dec, dec_t = _pair("TransformerDecoderLayer", d, h, 32, 0.0, norm_first=nf, batch_first=True)
    kw = dict(tgt_mask=_attn_mask("causal", t, t, None, h), memory_mask=_attn_mask("float", t, s, None, h),
              memory_key_padding_mask=_kpm("float", s, None), tgt_is_causal=True)
    _run_both(dec, dec_t, [torch.randn(t, d), torch.randn(s, d)], lambda m, a, c: m(a, c, **kw), True)
    tr, tr_t = _pair("Transformer", d, h, 2, 2, 32, 0.0, norm_first=nf)
    kw = _transformer_kwargs(dict(src_mask="float", tgt_mask="causal", src_kpm="bool", mem_kpm="bool"), s, t,
                             None, h)
    for train in (True, False):
        _run_both(tr, tr_t, [torch.randn(s, d), torch.randn(t, d)], lambda m, a, c: m(a, c, **kw), train)


@pytest.mark.parametrize("bf", [False, True], ids=["seq-first", "batch-first"])
def test_empty_batch(no_fastpath, bf):
    """B = 0 gives an empty output of the right shape, like torch, and backward runs. With a key padding mask torch
    (2.13) fails to reshape the empty merged mask ("cannot reshape tensor of 0 elements"); pyattn returns the empty
    output there too."""
    tr, tr_t = _pair("Transformer", 16, 2, 1, 1, 32, 0.0, batch_first=bf)
    src, tgt = _seq(5, 0, 16, bf), _seq(3, 0, 16, bf)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(3)
    out = _run_both(tr, tr_t, [src, tgt], lambda m, a, c: m(a, c, tgt_mask=mask), True)
    assert out.shape == tgt.shape
    src.requires_grad_()
    kpm = torch.zeros(0, 5, dtype=torch.bool)
    out = tr(src, tgt, src_key_padding_mask=kpm, memory_key_padding_mask=kpm)
    assert out.shape == tgt.shape
    out.sum().backward()
    assert src.grad is not None and src.grad.shape == src.shape


def test_fully_padded_batch_element(no_fastpath):
    """A batch element whose keys are all padding: attention gives 0 there (torch >= 2.5 too), no NaN."""
    tr, tr_t = _pair("Transformer", 16, 2, 1, 1, 32, 0.0)
    src, tgt = torch.randn(5, 2, 16), torch.randn(3, 2, 16)
    kpm = torch.zeros(2, 5, dtype=torch.bool)
    kpm[1] = True
    out = _run_both(tr, tr_t, [src, tgt], lambda m, a, c: m(a, c, src_key_padding_mask=kpm,
                                                             memory_key_padding_mask=kpm), True)
    assert torch.isfinite(out).all()


# ---- is_causal: torch's detection and hint semantics --------------------------------------------------------------

@pytest.fixture
def sdpa_calls(monkeypatch):
    """Records (mask given?, is_causal) of every attention call the MultiheadAttention modules make."""
    calls = []
    import pyattn.nn.activation as act
    real = act.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, *a, **kw):
        calls.append((attn_mask is not None, bool(is_causal)))
        return real(q, k, v, attn_mask, dropout_p, is_causal, *a, **kw)
    monkeypatch.setattr(act, "scaled_dot_product_attention", spy)
    return calls


@pytest.mark.filterwarnings("ignore:Support for mismatched")  # bool padding + float mask: torch warns too
@pytest.mark.parametrize("mask_kind", ["causal", "causal_bool"])
def test_encoder_detects_causal_mask(no_fastpath, sdpa_calls, mask_kind):
    """is_causal=None and a mask equal to the causal mask: the layers run causal attention without reading the mask
    (torch does the same); any other mask, or a key padding mask to merge, is passed as a mask."""
    enc, enc_t = _encoder_pair(2)
    x = torch.randn(6, 2, 16)
    causal = _attn_mask(mask_kind, 6, 6, 2, 2)
    _run_both(enc, enc_t, [x], lambda m, x: m(x, mask=causal), True)
    assert sdpa_calls == [(False, True)] * 2
    sdpa_calls.clear()
    kpm = _kpm("bool", 6, 2)
    _run_both(enc, enc_t, [x], lambda m, x: m(x, mask=causal, src_key_padding_mask=kpm), True)
    assert sdpa_calls == [(True, False)] * 2  # merged with the padding mask: no longer causal, as in torch
    sdpa_calls.clear()
    not_causal = causal.clone()
    not_causal[-1, 0] = not_causal[0, -1]  # mask one more key of the last query
    _run_both(enc, enc_t, [x], lambda m, x: m(x, mask=not_causal), True)
    assert sdpa_calls == [(True, False)] * 2
    sdpa_calls.clear()
    # explicit is_causal=False with the causal mask: the mask is used as a mask, same numbers
    _run_both(enc, enc_t, [x], lambda m, x: m(x, mask=causal, is_causal=False), True)
    assert sdpa_calls == [(True, False)] * 2


def test_decoder_causal_hints(no_fastpath, sdpa_calls):
    tr, tr_t = _pair("Transformer", 16, 2, 1, 2, 32, 0.0)
    s, t = 7, 4
    src, tgt = torch.randn(s, 2, 16), torch.randn(t, 2, 16)
    tgt_mask = torch.nn.Transformer.generate_square_subsequent_mask(t)
    _run_both(tr, tr_t, [src, tgt], lambda m, a, c: m(a, c, tgt_mask=tgt_mask), True)
    # encoder: no mask; decoder layers: causal self-attention (detected), unmasked cross-attention
    assert sdpa_calls == [(False, False)] + [(False, True), (False, False)] * 2
    sdpa_calls.clear()
    # memory_is_causal with a (T, S) top-left causal memory mask, T != S: the hint replaces the mask, as in torch
    mem_mask = torch.triu(torch.full((t, s), float("-inf")), 1)
    _run_both(tr, tr_t, [src, tgt], lambda m, a, c: m(a, c, tgt_mask=tgt_mask, tgt_is_causal=True,
                                                       memory_mask=mem_mask, memory_is_causal=True), True)
    assert sdpa_calls == [(False, False)] + [(False, True), (False, True)] * 2


def test_is_causal_hint_needs_a_mask():
    for mod in (pyattn.nn.TransformerEncoderLayer(16, 2, 32), torch.nn.TransformerEncoderLayer(16, 2, 32)):
        with pytest.raises(RuntimeError, match="Need attn_mask if specifying the is_causal hint"):
            mod(torch.randn(5, 2, 16), is_causal=True)


# ---- dropout ----------------------------------------------------------------------------------------------------

def test_dropout_is_seeded_and_off_in_eval(no_fastpath):
    ours, theirs = _pair("Transformer", 16, 2, 2, 2, 32, dropout=0.3)
    src, tgt = torch.randn(6, 2, 16), torch.randn(5, 2, 16)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(5)
    ours.train()
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        out = ours(src, tgt, tgt_mask=mask)
        ours.zero_grad(set_to_none=True)
        out.square().mean().backward()
        runs.append((out.detach(), [p.grad.clone() for p in ours.parameters()]))
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    assert all(torch.isfinite(g).all() for g in runs[0][1])
    torch.manual_seed(124)
    assert not torch.equal(ours(src, tgt, tgt_mask=mask), runs[0][0])
    # eval: dropout off, so the outputs equal torch's
    out_eval = _run_both(ours, theirs, [src, tgt], lambda m, a, c: m(a, c, tgt_mask=mask), False)
    assert not torch.allclose(out_eval, runs[0][0])


def test_attention_dropout_reaches_pyattn_sdpa(monkeypatch):
    """The attention dropout probability is handed to pyattn's SDPA in training only."""
    import pyattn.nn.activation as act
    seen = []
    real = act.scaled_dot_product_attention
    monkeypatch.setattr(act, "scaled_dot_product_attention",
                        lambda q, k, v, m=None, p=0.0, c=False: seen.append(p) or real(q, k, v, m, p, c))
    layer = pyattn.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.25)
    x = torch.randn(5, 2, 16)
    layer.train()(x)
    layer.eval()(x)
    assert seen == [0.25, 0.0]


# ---- fused Add & Norm -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,nf,expected", [
    ("TransformerEncoderLayer", False, [True, True]),
    ("TransformerEncoderLayer", True, [False, True]),
    ("TransformerDecoderLayer", False, [True, True, True]),
    ("TransformerDecoderLayer", True, [False, True, True]),
])
def test_add_and_norm_is_one_fused_call(monkeypatch, kind, nf, expected):
    """Every residual sum that a LayerNorm follows goes into pyattn.layer_norm(residual=...) (one fused op);
    pre-norm's first norm has no sum before it."""
    import pyattn.nn.normalization as norm_mod
    calls = []
    real = norm_mod.F.layer_norm

    def spy(*a, residual=None, **kw):
        calls.append(residual is not None)
        return real(*a, residual=residual, **kw)
    monkeypatch.setattr(norm_mod.F, "layer_norm", spy)
    layer = getattr(pyattn.nn, kind)(16, 2, 32, 0.0, norm_first=nf)
    x = torch.randn(5, 2, 16)
    layer(x) if kind == "TransformerEncoderLayer" else layer(x, torch.randn(6, 2, 16))
    assert calls == expected


# ---- backends -------------------------------------------------------------------------------------------------

def _backend_cases():
    seen = {}
    for op in ("attention", "layer_norm"):
        for p in backend_params(op):
            seen.setdefault(p.id, p)
    return list(seen.values())


class _SelectSpy:
    """Wraps pyattn's backend selection for attention and layer_norm: records (op, backend that ran, inputs) and
    optionally forces ``force`` for the ops in ``force_ops``."""

    def __init__(self, monkeypatch, force=None, force_ops=()):
        self.calls = []
        for mod in (ops_attention, ops_layer_norm):
            real = mod.select

            def wrapped(inputs, backend=None, _real=real):
                if backend is None and inputs.op in force_ops:
                    backend = force
                chosen = _real(inputs, backend)
                self.calls.append((inputs.op, chosen.name, inputs))
                return chosen
            monkeypatch.setattr(mod, "select", wrapped)


@pytest.mark.parametrize("backend", _backend_cases())
def test_parity_per_backend(no_fastpath, monkeypatch, backend):
    """Transformer parity with each CPU backend forced. A backend that takes every attention and layer_norm call of
    the model is forced with pyattn.use_backend(name). One that lacks an op on CPU (cpp has no attention kernel
    until pyattn._C ships one) is forced for the ops it takes, and the rest run on the automatic choice: forcing it
    for everything would only raise BackendNotSupported (tested in test_dispatch). Triton runs in the interpreter
    (slow): these cases are small on purpose."""
    d, h, s, t, b = 16, 2, 6, 5, 2
    masks = dict(src_mask="bool", tgt_mask="causal", src_kpm="bool", mem_kpm="bool")
    be = get_backend(backend)
    for nf in (False, True):
        ours, theirs = _pair("Transformer", d, h, 1, 1, 24, 0.0, norm_first=nf)
        src, tgt = torch.randn(s, b, d), torch.randn(t, b, d)
        kw = _transformer_kwargs(masks, s, t, b, h)

        def call(m, a, c):
            return m(a, c, **kw)
        with monkeypatch.context() as mp:  # what would run: every call's inputs
            probe = _SelectSpy(mp)
            _run_both(ours, theirs, [src, tgt], call, True)
        ops = {op for op, _, _ in probe.calls}
        assert ops == {"attention", "layer_norm"}
        taken = {op for op in ops if all(not be.not_supported_reasons(i) for o, _, i in probe.calls if o == op)}
        assert "layer_norm" in taken, f"{backend} refuses this model's layer_norm calls"
        with monkeypatch.context() as mp:
            if taken == ops:
                spy = _SelectSpy(mp)
                with pyattn.use_backend(backend):
                    _run_both(ours, theirs, [src, tgt], call, True)
            else:
                spy = _SelectSpy(mp, force=backend, force_ops=taken)
                _run_both(ours, theirs, [src, tgt], call, True)
        ran = Counter((op, name) for op, name, _ in spy.calls)
        for op in taken:  # forward and backward of every forced op ran on the backend
            assert ran[(op, backend)] > 0 and all(name == backend for o, name, _ in spy.calls if o == op), ran


# ---- torch.compile ----------------------------------------------------------------------------------------------

def test_encoder_layer_compiles_fullgraph(no_fastpath):
    torch._dynamo.reset()
    ours, theirs = _pair("TransformerEncoderLayer", 16, 2, 32, 0.0, batch_first=True, norm_first=False)
    x = torch.randn(2, 6, 16)
    kpm = _kpm("bool", 6, 2)
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    for train in (True, False):
        _run_both(compiled, theirs, [x], lambda m, x: m(x, src_key_padding_mask=kpm), train)
        mask = _attn_mask("causal", 6, 6, 2, 2)
        _run_both(compiled, theirs, [x], lambda m, x: m(x, src_mask=mask, is_causal=True), train)


def test_stack_compiles_fullgraph_with_explicit_is_causal(no_fastpath):
    """The stacks' causal-mask detection (is_causal=None) is data dependent, as in torch; with the hint given
    explicitly a whole Transformer compiles with fullgraph=True."""
    torch._dynamo.reset()
    ours, theirs = _pair("Transformer", 16, 2, 1, 1, 32, 0.0)
    src, tgt = torch.randn(6, 2, 16), torch.randn(4, 2, 16)
    kw = dict(tgt_mask=_attn_mask("causal", 4, 4, 2, 2), tgt_is_causal=True, src_is_causal=False,
              src_key_padding_mask=_kpm("bool", 6, 2))
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    _run_both(compiled, theirs, [src, tgt], lambda m, a, c: m(a, c, **kw), False, grads=False)


@pytest.mark.slow
def test_encoder_layer_compiles_inductor(no_fastpath):
    """Inductor (C++ codegen on CPU, ~15 s here): pyattn's ops stay opaque custom ops with fake impls."""
    torch._dynamo.reset()
    ours, theirs = _pair("TransformerEncoderLayer", 16, 2, 32, 0.0, batch_first=True, norm_first=True)
    x = torch.randn(2, 6, 16)
    kpm = _kpm("bool", 6, 2)
    compiled = torch.compile(ours, fullgraph=True, backend="inductor")
    _run_both(compiled, theirs, [x], lambda m, x: m(x, src_key_padding_mask=kpm), True)


# ---- torch's fast path: the one documented difference -------------------------------------------------------------

@pytest.fixture
def fastpath():
    prev = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(True)
    yield
    torch.backends.mha.set_fastpath_enabled(prev)


def test_matches_torch_fast_path_on_real_positions(fastpath):
    """In eval mode under no_grad torch switches to its fused fast path, and TransformerEncoder with a key padding
    mask to nested tensors, which writes 0 at padded positions. pyattn has no fast path: it returns the computed
    values there (as torch's regular path does). Every non-padded position agrees."""
    with _quiet():
        theirs = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(16, 2, 32, 0.0, batch_first=True), 2)
    ours = pyattn.nn.TransformerEncoder(pyattn.nn.TransformerEncoderLayer(16, 2, 32, 0.0, batch_first=True), 2)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    ours.eval()
    theirs.eval()
    x = torch.randn(3, 7, 16)
    kpm = _kpm("bool", 7, 3)
    with torch.no_grad():
        a, b = ours(x, src_key_padding_mask=kpm), theirs(x, src_key_padding_mask=kpm)
        assert_close_fp32(a[~kpm], b[~kpm])
        # the reference really took the nested path (zeros where padded; docs/transformer.md documents this)
        assert bool((b[kpm] == 0).all()) and not bool((a[kpm] == 0).all())
        a, b = ours(x), theirs(x)  # no padding: the layer fast path, all positions
        assert_close_fp32(a, b)


# ---- errors (torch's exception types and texts) -------------------------------------------------------------------

def _both_raise(exc, match, fn):
    for lib in (pyattn.nn, torch.nn):
        with _quiet(), pytest.raises(exc, match=match):
            fn(lib)


def test_bad_inputs_raise_like_torch(no_fastpath):
    _both_raise(RuntimeError, "activation should be relu/gelu, not tanh",
                lambda nn: nn.TransformerEncoderLayer(16, 2, activation="tanh"))
    _both_raise(RuntimeError, "activation should be relu/gelu, not swish",
                lambda nn: nn.TransformerDecoderLayer(16, 2, activation="swish"))
    _both_raise(AssertionError, "embed_dim must be divisible by num_heads",
                lambda nn: nn.TransformerEncoderLayer(16, 3))
    x = torch.randn(5, 2, 16)
    _both_raise(AssertionError, "only bool and floating types of src_key_padding_mask are supported",
                lambda nn: nn.TransformerEncoderLayer(16, 2, 32)(x, src_key_padding_mask=torch.zeros(2, 5,
                                                                                                    dtype=torch.long)))
    _both_raise(AssertionError, "only bool and floating types of src_mask are supported",
                lambda nn: nn.TransformerEncoderLayer(16, 2, 32)(x, src_mask=torch.zeros(5, 5, dtype=torch.int32)))
    _both_raise(AssertionError, "only bool and floating types of key_padding_mask are supported",
                lambda nn: nn.TransformerDecoderLayer(16, 2, 32)(x, x, tgt_key_padding_mask=torch.zeros(
                    2, 5, dtype=torch.uint8)))
    _both_raise(RuntimeError, r"The shape of the 2D attn_mask is torch.Size\(\[4, 5\]\), but should be \(5, 5\)",
                lambda nn: nn.TransformerEncoderLayer(16, 2, 32)(x, src_mask=torch.zeros(4, 5)))
    _both_raise(RuntimeError, r"The shape of the 3D attn_mask is torch.Size\(\[2, 5, 5\]\), but should be "
                r"\(4, 5, 5\)", lambda nn: nn.TransformerEncoderLayer(16, 2, 32)(x, src_mask=torch.zeros(2, 5, 5)))
    _both_raise(AssertionError, r"Expected key_padded_mask.shape\[0\] to be 2, but got 5",
                lambda nn: nn.TransformerEncoderLayer(16, 2, 32)(torch.randn(5, 2, 16),
                                                                 src_key_padding_mask=torch.zeros(5, 2)))
    _both_raise(AssertionError, "query should be unbatched 2D or batched 3D tensor but received 4-D",
                lambda nn: nn.TransformerEncoderLayer(16, 2, 32)(torch.randn(5, 2, 1, 16)))
    _both_raise(RuntimeError, "the batch number of src and tgt must be equal",
                lambda nn: nn.Transformer(16, 2, 1, 1, 32)(torch.randn(5, 2, 16), torch.randn(4, 3, 16)))
    _both_raise(RuntimeError, "the batch number of src and tgt must be equal",
                lambda nn: nn.Transformer(16, 2, 1, 1, 32, batch_first=True)(torch.randn(2, 5, 16),
                                                                              torch.randn(3, 4, 16)))
    _both_raise(RuntimeError, "the feature number of src and tgt must be equal to d_model",
                lambda nn: nn.Transformer(16, 2, 1, 1, 32)(torch.randn(5, 2, 16), torch.randn(4, 2, 8)))
    # nested tensors: torch takes them only on its fast path; pyattn has none and says so
    nested = torch.nested.nested_tensor([torch.randn(3, 16), torch.randn(5, 16)])
    with pytest.raises(ValueError, match="no nested tensors .src is nested"):
        pyattn.nn.TransformerEncoderLayer(16, 2, 32)(nested)
    # after an error the module still works
    layer = pyattn.nn.TransformerEncoderLayer(16, 2, 32)
    assert layer(x).shape == x.shape


def test_mismatched_mask_types_warn_like_torch(no_fastpath):
    ours, theirs = _encoder_pair(2)
    x = torch.randn(6, 2, 16)
    kw = dict(mask=_attn_mask("float", 6, 6, 2, 2), src_key_padding_mask=_kpm("bool", 6, 2))
    for m in (ours, theirs):
        with pytest.warns(UserWarning, match="Support for mismatched src_key_padding_mask and mask is deprecated"):
            m(x, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _run_both(ours, theirs, [x], lambda m, x: m(x, **kw), True)


def test_exports():
    for name in CLASSES:
        assert name in pyattn.nn.__all__ and getattr(pyattn.nn, name).__module__ == "pyattn.nn.transformer"
    assert set(CLASSES) <= set(dir(pyattn.nn))
    assert F.relu is pyattn.nn.TransformerEncoderLayer(8, 2, 16).activation


def test_attention_dropout_one_drops_every_weight_as_torch():
    # dropout=1.0 in training: torch multiplies every attention weight by 0 (no error); pyattn's SDPA refuses
    # p = 1, so the module gives the zero attention output itself, with zero (not None) in-projection grads.
    torch.manual_seed(0)
    theirs = torch.nn.MultiheadAttention(8, 2, dropout=1.0)
    ours = pyattn.nn.MultiheadAttention(8, 2, dropout=1.0)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 2, 8)
    got, want = ours(x, x, x, need_weights=False)[0], theirs(x, x, x, need_weights=False)[0]
    torch.testing.assert_close(got, want)
    got.sum().backward()
    want.sum().backward()
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    layer = pyattn.nn.TransformerEncoderLayer(8, 2, 16, dropout=1.0).train()
    assert layer(torch.randn(3, 2, 8)).shape == (3, 2, 8)


@pytest.mark.parametrize("cls", ["TransformerEncoderLayer", "TransformerDecoderLayer", "Transformer"])
def test_modules_under_autocast_match_torch(cls):
    # torch.autocast (bf16 on CPU): the linears run in bf16 while the residual stream stays fp32, so Add & Norm sees
    # fp32 + bf16 (torch's `x + r` promotes; pyattn's fused op raised a dtype error) and SDPA sees autocast's casts.
    torch.manual_seed(0)
    args = (16, 2, 1, 1, 32) if cls == "Transformer" else (16, 2, 32)
    theirs = getattr(torch.nn, cls)(*args, dropout=0.0, batch_first=True)
    ours = getattr(pyattn.nn, cls)(*args, dropout=0.0, batch_first=True)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 5, 16)
    outs = []
    for mod in (ours, theirs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = mod(x) if cls == "TransformerEncoderLayer" else mod(x, x)
        out.float().square().mean().backward()
        outs.append((out, [p.grad for p in mod.parameters()]))
    (got, ggot), (want, gwant) = outs
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want, atol=3e-2, rtol=3e-2)  # bf16 linears: ~2^-8 relative per rounding
    for a, b in zip(ggot, gwant):
        torch.testing.assert_close(a, b, atol=3e-2, rtol=5e-2)
