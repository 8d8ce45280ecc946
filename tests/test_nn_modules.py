"""Drop-in modules against their torch.nn twins with copied weights: GRUCell, GRU, MultiheadAttention.

Runs on the automatic backend choice of this machine (kernels where available, else torch); the per-backend
kernel suites force each backend.
"""
import itertools
import math
import re
import warnings

import pytest
import torch

import pyattn
from pyattn.testing import PACKED_CALLS, check_packed_gru

FWD = dict(atol=1e-5, rtol=1.3e-6)
BWD = dict(atol=1e-4, rtol=1e-5)


def _pair(ours_cls, theirs_cls, *args, **kwargs):
    theirs = theirs_cls(*args, **kwargs)
    ours = ours_cls(*args, **kwargs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return ours, theirs


def _grads(module, *outs):
    loss = sum((o.float() * torch.linspace(-1, 1, o.numel()).view(o.shape)).sum() for o in outs)
    return torch.autograd.grad(loss, [p for p in module.parameters()])


@pytest.mark.parametrize("layers,bidirectional,batch_first,bias", [
    (1, False, False, True), (2, True, True, True), (3, False, True, False), (2, True, False, False)])
def test_gru_matches_torch(layers, bidirectional, batch_first, bias):
    ours, theirs = _pair(pyattn.nn.GRU, torch.nn.GRU, 7, 13, num_layers=layers, bias=bias, batch_first=batch_first,
                         bidirectional=bidirectional)
    dirs = 2 if bidirectional else 1
    for t_len, bsz in ((1, 3), (17, 1), (5, 33)):
        x = torch.randn((bsz, t_len, 7) if batch_first else (t_len, bsz, 7))
        for h0 in (None, torch.zeros(layers * dirs, bsz, 13), torch.randn(layers * dirs, bsz, 13)):
            (o1, h1), (o2, h2) = ours(x, h0), theirs(x, h0)
            torch.testing.assert_close(o1, o2, **FWD)
            torch.testing.assert_close(h1, h2, **FWD)
        for g1, g2 in zip(_grads(ours, o1, h1), _grads(theirs, o2, h2)):
            torch.testing.assert_close(g1, g2, **BWD)


def test_gru_unbatched_empty_and_dropout():
    ours, theirs = _pair(pyattn.nn.GRU, torch.nn.GRU, 4, 6, num_layers=2, batch_first=True, dropout=0.5)
    x = torch.randn(9, 4)  # unbatched (T, I)
    h0 = torch.randn(2, 6)
    ours.eval(), theirs.eval()
    for a, b in zip(ours(x, h0), theirs(x, h0)):
        torch.testing.assert_close(a, b, **FWD)
    xb = torch.randn(0, 3, 4)  # batch 0 (batch_first)
    for a, b in zip(ours(xb), theirs(xb)):
        assert a.shape == b.shape
    ours.train()
    o1, _ = ours(torch.randn(2, 5, 4))
    o2, _ = ours(torch.randn(2, 5, 4))
    assert o1.shape == (2, 5, 6) and not torch.equal(o1, o2)
    with pytest.warns(UserWarning, match="dropout option adds dropout after all but last recurrent layer"):
        pyattn.nn.GRU(4, 6, num_layers=1, dropout=0.3)


def test_gru_errors_match_torch():
    ours, theirs = _pair(pyattn.nn.GRU, torch.nn.GRU, 10, 20, num_layers=2)
    cases = [
        (torch.randn(5, 3, 7), None),
        (torch.randn(5, 3, 10), torch.randn(1, 3, 20)),
        (torch.randn(5, 3, 10, 1), None),
        (torch.randn(0, 3, 10), None),
        (torch.randn(5, 3, 10).double(), None),
        (torch.randn(5, 10), torch.randn(2, 3, 20)),
    ]
    for x, h in cases:
        with pytest.raises(Exception) as want:
            theirs(x, h)
        with pytest.raises(type(want.value), match=str(want.value).split("\n")[0][:60].replace("(", r"\(")
                           .replace(")", r"\)").replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
            ours(x, h)


@pytest.mark.parametrize("args,kwargs", [((0, 8), {}), ((8, 0), {}), ((8.0, 8), {}), ((8, 8.5), {}),
                                         ((8, 8), {"bias": 1}), ((8, 8), {"batch_first": None})], ids=str)
def test_gru_constructor_errors_match_torch(args, kwargs):
    with pytest.raises(Exception) as want:
        torch.nn.GRU(*args, **kwargs)
    with pytest.raises(type(want.value), match=f"^{re.escape(str(want.value))}$"):
        pyattn.nn.GRU(*args, **kwargs)


@pytest.mark.parametrize("cfg", [dict(), dict(num_layers=2, bidirectional=True), dict(num_layers=3, bias=False),
                                 dict(bidirectional=True, batch_first=True)],
                         ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
@pytest.mark.parametrize("merge_rows", sorted(PACKED_CALLS), ids=lambda m: f"merge={m}")
@pytest.mark.parametrize("enforce_sorted,with_h0", [(False, True), (True, False)])
def test_gru_packed_sequence_matches_torch(cfg, merge_rows, enforce_sorted, with_h0):
    """PackedSequence inputs on pyattn's layer op (automatic backend), the packed plan's three kinds of group: a run
    of equal batch as a view (merge 0), padded groups and views mixed (merge 2), everything padded (merge inf)."""
    calls = check_packed_gru(None, enforce_sorted=enforce_sorted, with_h0=with_h0, merge_rows=merge_rows, **cfg)
    assert calls == PACKED_CALLS[merge_rows] * cfg.get("num_layers", 1) * (2 if cfg.get("bidirectional") else 1)


@pytest.mark.parametrize("lengths", [(4,), (3, 3, 3), (1, 1), (9, 8, 7, 6, 5, 4, 3, 2, 1), (1, 30, 2)], ids=str)
@pytest.mark.parametrize("merge_rows", [0, 8, math.inf], ids=lambda m: f"merge={m}")
def test_gru_packed_sequence_lengths(lengths, merge_rows):
    calls = check_packed_gru(None, lengths=lengths, merge_rows=merge_rows, num_layers=2, bidirectional=True) // 4
    runs = len(set(lengths))  # runs of equal batch: one per distinct length
    assert calls == {0: runs, math.inf: 1}.get(merge_rows, calls) and 1 <= calls <= runs


def test_gru_packed_sequence_default_plan():
    """The device's default: on CPU a few calls (padded groups up to CPU_MERGE_ROWS wasted row-steps)."""
    assert check_packed_gru(None, num_layers=2, bidirectional=True) == 4 * PACKED_CALLS[math.inf]


def test_gru_packed_sequence_errors_match_torch():
    ours, theirs = _pair(pyattn.nn.GRU, torch.nn.GRU, 3, 5, num_layers=2)
    packed = torch.nn.utils.rnn.pack_sequence([torch.randn(4, 3), torch.randn(2, 3)], enforce_sorted=False)
    bad_feat = torch.nn.utils.rnn.pack_sequence([torch.randn(4, 2), torch.randn(2, 2)])
    for x, h in ((packed, torch.randn(1, 2, 5)), (packed, torch.randn(2, 5)), (packed, torch.randn(2, 3, 5, 1)),
                 (bad_feat, None), (bad_feat, torch.randn(2, 2, 5))):
        with pytest.raises(RuntimeError) as want:
            theirs(x, h)
        with pytest.raises(RuntimeError) as got:
            ours(x, h)
        assert str(got.value) == str(want.value)


def test_gru_cell_matches_torch():
    for bias in (True, False):
        ours, theirs = _pair(pyattn.nn.GRUCell, torch.nn.GRUCell, 5, 11, bias=bias)
        for x, h in ((torch.randn(3, 5), torch.randn(3, 11)), (torch.randn(5), None), (torch.randn(1, 5), None)):
            a, b = ours(x, h), theirs(x, h)
            torch.testing.assert_close(a, b, **FWD)
        for g1, g2 in zip(_grads(ours, a), _grads(theirs, b)):
            torch.testing.assert_close(g1, g2, **BWD)


def test_gru_compiles_fullgraph():
    torch._dynamo.reset()
    ours, theirs = _pair(pyattn.nn.GRU, torch.nn.GRU, 4, 8, num_layers=2, bidirectional=True)
    x = torch.randn(6, 3, 4)
    out, h = torch.compile(ours, fullgraph=True, backend="aot_eager")(x)
    ref_out, ref_h = theirs(x)
    torch.testing.assert_close(out, ref_out, **FWD)
    torch.testing.assert_close(h, ref_h, **FWD)


def test_gru_packed_sequence_compiles():
    """torch.compile over packed input: the plan's bookkeeping runs eagerly (torch.compiler.disable), the layer ops
    are traced; same values as torch.nn.GRU."""
    torch._dynamo.reset()
    ours, theirs = _pair(pyattn.nn.GRU, torch.nn.GRU, 4, 8, num_layers=2, bidirectional=True)
    packed = torch.nn.utils.rnn.pack_sequence([torch.randn(5, 4), torch.randn(2, 4), torch.randn(3, 4)],
                                              enforce_sorted=False)
    (out, h), (ref_out, ref_h) = torch.compile(ours, backend="aot_eager")(packed), theirs(packed)
    torch.testing.assert_close(out.data, ref_out.data, **FWD)
    torch.testing.assert_close(h, ref_h, **FWD)


MHA_VARIANTS = [dict(), dict(batch_first=True), dict(bias=False), dict(add_bias_kv=True), dict(add_zero_attn=True),
                dict(kdim=8, vdim=12), dict(dropout=0.0, batch_first=True, add_bias_kv=True, add_zero_attn=True)]


@pytest.mark.parametrize("kw", MHA_VARIANTS, ids=lambda k: ",".join(k) or "default")
def test_multihead_attention_matches_torch(kw):
    e, h = 16, 4
    ours, theirs = _pair(pyattn.nn.MultiheadAttention, torch.nn.MultiheadAttention, e, h, **kw)
    kd, vd = kw.get("kdim", e), kw.get("vdim", e)
    q, k, v = torch.randn(5, 3, e), torch.randn(7, 3, kd), torch.randn(7, 3, vd)
    if kw.get("batch_first"):
        q, k, v = (t.transpose(0, 1).contiguous() for t in (q, k, v))
    kpm = torch.zeros(3, 7, dtype=torch.bool)
    kpm[0, -2:] = True
    am_bool = torch.rand(5, 7) > 0.7
    am_bool[:, 0] = False
    masks = [dict(), dict(key_padding_mask=kpm), dict(attn_mask=torch.randn(5, 7)),
             dict(attn_mask=am_bool, key_padding_mask=kpm), dict(attn_mask=torch.randn(3 * h, 5, 7))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about mixed mask types; the result is still defined
        for m, need_weights in itertools.product(masks, (False, True)):
            a, wa = ours(q, k, v, need_weights=need_weights, **m)
            b, wb = theirs(q, k, v, need_weights=need_weights, **m)
            torch.testing.assert_close(a, b, **FWD)
            assert (wa is None) == (wb is None)
        for g1, g2 in zip(_grads(ours, a), _grads(theirs, b)):
            torch.testing.assert_close(g1, g2, **BWD)


def test_multihead_attention_causal_and_unbatched():
    ours, theirs = _pair(pyattn.nn.MultiheadAttention, torch.nn.MultiheadAttention, 8, 2)
    x = torch.randn(6, 2, 8)
    m = torch.nn.Transformer.generate_square_subsequent_mask(6)
    a = ours(x, x, x, attn_mask=m, is_causal=True, need_weights=False)[0]
    b = theirs(x, x, x, attn_mask=m, is_causal=True, need_weights=False)[0]
    torch.testing.assert_close(a, b, **FWD)
    with pytest.raises(RuntimeError, match="Need attn_mask if specifying the is_causal hint"):
        ours(x, x, x, is_causal=True, need_weights=False)
    xu = torch.randn(6, 8)
    torch.testing.assert_close(ours(xu, xu, xu, need_weights=False)[0], theirs(xu, xu, xu, need_weights=False)[0],
                               **FWD)
