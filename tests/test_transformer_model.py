"""pyattn.models.EncoderDecoderTransformer: the paper's model on pyattn.nn, and generate() with a key/value cache.

The cache is checked against recomputing the whole decoder over the prefix at every step (greedy and beam search,
post-norm and pre-norm, batches with source padding), one cached step against the full decoder's last position
(fp32 tolerance, and float64 to show the formulas are the same), the search against an independent argmax loop, the
model's own log-probabilities and an exhaustive search over a tiny vocabulary. Forward is compared with the same
weights in torch.nn.Transformer.
"""
from __future__ import annotations

import copy
import functools
import io
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import pyattn
from pyattn.models import (EncoderDecoderTransformer, LayerKVCache, TransformerConfig, decoder_layer_step,
                           sinusoidal_positional_encoding)
from pyattn.models.transformer import project_memory

PAD, BOS, EOS = 0, 1, 2


@pytest.fixture(autouse=True)
def _one_thread():
    """The models here are tiny (d_model 32): one torch thread is as fast, and on a 2-core machine shared with other
    busy processes two spinning OpenMP threads make them up to 10x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _config(**kw) -> TransformerConfig:
    base = dict(src_vocab_size=19, tgt_vocab_size=13, d_model=32, nhead=4, num_encoder_layers=2, num_decoder_layers=2,
                dim_feedforward=48, dropout=0.0, max_len=40)
    base.update(kw)
    return TransformerConfig(**base)


def _random_model(seed: int = 0, dtype=torch.float32, **kw) -> EncoderDecoderTransformer:
    """A model whose random weights give varied outputs: untied output projection with larger weights (so that
    generation neither repeats one token forever nor ends at once) and a few rows ending early (eos boosted)."""
    torch.manual_seed(seed)
    kw.setdefault("tie_embeddings", False)
    m = EncoderDecoderTransformer(_config(**kw)).to(dtype).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 1.5 / p.shape[-1] ** 0.5)
            elif "bias" in name:
                p.normal_(0.0, 0.2)
        m.generator.weight.normal_(0.0, 0.6)
        m.generator.weight[EOS] *= 1.6
    return m


@functools.lru_cache(maxsize=None)
def _trained_model(norm_first: bool) -> EncoderDecoderTransformer:
    """A model trained for 60 steps (about a second) to reverse its source: far from perfect, but its outputs
    depend on the prefix and end with eos at different lengths, which a random model's do not (those repeat one
    token). Shared by the tests (they leave it in eval mode, unchanged)."""
    torch.manual_seed(0)
    m = EncoderDecoderTransformer(_config(norm_first=norm_first, tie_embeddings=True, activation="gelu"))
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        lens = torch.randint(2, 10, (32,), generator=g)
        src = torch.randint(3, 13, (32, 9), generator=g)
        src[torch.arange(9)[None] >= lens[:, None]] = PAD
        tgt = torch.full((32, 11), PAD)
        for i, n in enumerate(lens.tolist()):
            tgt[i, :n] = src[i, :n].flip(0)
            tgt[i, n] = EOS
        dec_in = torch.cat([torch.full((32, 1), BOS), tgt[:, :-1]], 1)
        loss = F.cross_entropy(m(src, dec_in).reshape(-1, 13), tgt.reshape(-1), ignore_index=PAD)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()


def _src(batch: int = 5, length: int = 9, seed: int = 1, vocab: int = 19) -> torch.Tensor:
    """Random source ids with right padding of different lengths (row 0 unpadded)."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(3, vocab, (batch, length), generator=g)
    for i in range(1, batch):
        src[i, length - (i * 2) % length:] = PAD if (i * 2) % length else src[i, 0]
    return src


# ---- configuration and construction ----------------------------------------------------------------------------

def _count_formula(V: int, E: int, F_: int, n_enc: int, n_dec: int) -> int:
    """The paper's base model with a shared vocabulary V: one V x E matrix (source and target embeddings and the
    output projection), per encoder layer a multi-head attention (4E^2 + 4E), a feed-forward (2EF + F + E) and two
    LayerNorms (2E each); per decoder layer two attentions, the feed-forward and three LayerNorms; plus the final
    LayerNorm of each stack (torch.nn.Transformer's encoder.norm / decoder.norm)."""
    mha = 4 * E * E + 4 * E
    ffn = 2 * E * F_ + F_ + E
    ln = 2 * E
    return V * E + n_enc * (mha + ffn + 2 * ln) + n_dec * (2 * mha + ffn + 3 * ln) + 2 * ln


def test_base_preset_has_the_paper_sizes_and_about_63M_parameters():
    cfg = TransformerConfig.base(37000)
    assert (cfg.num_encoder_layers, cfg.num_decoder_layers, cfg.d_model, cfg.nhead, cfg.dim_feedforward,
            cfg.dropout) == (6, 6, 512, 8, 2048, 0.1)
    assert cfg.src_vocab_size == cfg.tgt_vocab_size == 37000
    assert cfg.tie_embeddings and cfg.share_src_tgt_embeddings and not cfg.norm_first
    m = EncoderDecoderTransformer(cfg, device="meta")          # sizes only: no 250 MB of weights to initialise
    n = sum(p.numel() for p in m.parameters())                  # parameters() counts a shared tensor once
    assert n == _count_formula(37000, 512, 2048, 6, 6)
    assert 62.5e6 < n < 63.5e6, n
    layer = m.transformer.decoder.layers[0]
    assert isinstance(layer, pyattn.nn.TransformerDecoderLayer)
    assert isinstance(m.encoder.layers[0], pyattn.nn.TransformerEncoderLayer)
    assert layer.self_attn.num_heads == 8 and layer.linear1.out_features == 2048
    assert len(m.encoder.layers) == 6 and len(m.decoder.layers) == 6
    # different vocabularies: target embedding and output projection shared, the source embedding separate
    c2 = TransformerConfig.base(30000, 20000)
    assert not c2.share_src_tgt_embeddings
    n2 = sum(p.numel() for p in EncoderDecoderTransformer(c2, device="meta").parameters())
    assert n2 == _count_formula(20000, 512, 2048, 6, 6) + 30000 * 512
    assert TransformerConfig.base(37000, norm_first=True).norm_first


@pytest.mark.parametrize("kw, match", [
    (dict(d_model=30, nhead=4), "divisible by nhead"),
    (dict(src_vocab_size=20, tgt_vocab_size=13, share_src_tgt_embeddings=True), "share_src_tgt_embeddings"),
    (dict(dropout=1.0), "dropout"),
    (dict(bos_id=0), "distinct"),
    (dict(eos_id=13), "eos_id"),
    (dict(num_decoder_layers=0), "num_decoder_layers"),
    (dict(activation="tanh"), "activation"),
    (dict(d_model=0), "d_model"),
])
def test_config_errors_name_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        _config(**kw)


def test_positional_encoding_is_the_papers_formula_and_a_buffer():
    for L, d in ((50, 16), (7, 9)):
        pe = sinusoidal_positional_encoding(L, d)
        assert pe.shape == (L, d) and pe.dtype == torch.float32
        for pos in range(L):
            for j in range(d):
                i = j // 2
                angle = pos / 10000 ** (2 * i / d)
                want = math.sin(angle) if j % 2 == 0 else math.cos(angle)
                assert abs(pe[pos, j].item() - want) <= 1e-6, (pos, j)
    m = EncoderDecoderTransformer(_config())
    assert torch.equal(m.pe, sinusoidal_positional_encoding(40, 32))
    assert "pe" in dict(m.named_buffers()) and all(p is not m.pe for p in m.parameters())
    assert "pe" not in m.state_dict()                        # derived from the config, not stored


def test_forward_is_embeddings_times_sqrt_d_plus_pe_through_torch_transformer():
    """Same weights in torch.nn.Transformer: logits equal the paper's composition, with the source padding mask
    derived from pad_id and the causal target mask."""
    m = _random_model(norm_first=False)
    ref = torch.nn.Transformer(32, 4, 2, 2, 48, 0.0, batch_first=True).eval()
    ref.load_state_dict(m.transformer.state_dict(), strict=True)
    src = _src()
    tgt = torch.randint(3, 13, (5, 6))
    tgt[:, 0] = BOS
    scale = math.sqrt(32)
    with torch.no_grad():
        s = m.src_embed(src) * scale + m.pe[:9]
        t = m.tgt_embed(tgt) * scale + m.pe[:6]
        causal = torch.nn.Transformer.generate_square_subsequent_mask(6)
        h = ref(s, t, tgt_mask=causal, src_key_padding_mask=src.eq(PAD), memory_key_padding_mask=src.eq(PAD))
        want = F.linear(h, m.generator.weight)
        got = m(src, tgt)
    assert got.shape == (5, 6, 13)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # an explicit mask equal to the derived one gives the same logits; log_probs is the log-softmax
    torch.testing.assert_close(m(src, tgt, src_key_padding_mask=src.eq(PAD)), got, atol=0, rtol=0)
    torch.testing.assert_close(m.log_probs(src, tgt), F.log_softmax(got, -1), atol=1e-6, rtol=0)


def test_tied_embeddings_share_storage():
    m = EncoderDecoderTransformer(_config(tie_embeddings=True))
    assert m.generator.weight is m.tgt_embed.weight
    assert m.generator.weight.data_ptr() == m.tgt_embed.weight.data_ptr()
    assert m.src_embed.weight.data_ptr() != m.tgt_embed.weight.data_ptr()
    shared = EncoderDecoderTransformer(_config(src_vocab_size=13, share_src_tgt_embeddings=True))
    ptrs = {shared.src_embed.weight.data_ptr(), shared.tgt_embed.weight.data_ptr(), shared.generator.weight.data_ptr()}
    assert len(ptrs) == 1
    # one parameter, trained once: a step through the output projection moves the embedding too
    opt = torch.optim.SGD(shared.parameters(), lr=1.0)
    before = shared.src_embed.weight.detach().clone()
    src = torch.randint(3, 13, (2, 5))
    tgt = torch.randint(3, 13, (2, 4))
    shared(src, tgt).logsumexp(-1).sum().backward()
    opt.step()
    assert not torch.equal(shared.src_embed.weight, before)
    assert shared.generator.weight.data_ptr() == shared.src_embed.weight.data_ptr()
    untied = EncoderDecoderTransformer(_config(tie_embeddings=False))
    assert untied.generator.weight.data_ptr() != untied.tgt_embed.weight.data_ptr()


def test_state_dict_round_trip():
    m = _random_model(3, tie_embeddings=True)
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    torch.manual_seed(99)
    m2 = EncoderDecoderTransformer(_config(tie_embeddings=True)).eval()
    src, tgt = _src(), torch.randint(3, 13, (5, 4))
    assert not torch.equal(m2(src, tgt), m(src, tgt))
    m2.load_state_dict(torch.load(buf), strict=True)
    assert torch.equal(m2(src, tgt), m(src, tgt))
    assert m2.generator.weight is m2.tgt_embed.weight           # loading keeps the tie
    assert torch.equal(m2.generate(src, 8, num_beams=2), m.generate(src, 8, num_beams=2))
    keys = set(m.state_dict())
    assert {"transformer.encoder.layers.0.self_attn.in_proj_weight", "transformer.decoder.layers.1.norm3.weight",
            "transformer.decoder.norm.weight", "src_embed.weight", "tgt_embed.weight", "generator.weight"} <= keys
    # the transformer part is a torch.nn.Transformer checkpoint, both ways
    ref = torch.nn.Transformer(32, 4, 2, 2, 48, 0.0, batch_first=True)
    ref.load_state_dict(m.transformer.state_dict(), strict=True)
    m2.transformer.load_state_dict(ref.state_dict(), strict=True)


# ---- incremental decoding --------------------------------------------------------------------------------------

@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-11)], ids=["fp32", "fp64"])
def test_cached_step_equals_full_decoder_last_position(norm_first, dtype, tol):
    m = copy.deepcopy(_trained_model(norm_first)).to(dtype)
    src = _src()
    tgt = torch.randint(3, 13, (5, 11))
    tgt[:, 0] = BOS
    with torch.no_grad():
        memory, kpm = m.encode(src)
        assert kpm is not None and kpm.any()
        cache = m.init_cache(memory, kpm, capacity=11)
        full_logits = m.generator(m.decode(tgt, memory, kpm))              # (B, T, V)
        for t in range(11):
            step_logits = m.decode_step(tgt[:, t], cache)
            torch.testing.assert_close(step_logits, full_logits[:, t], atol=tol, rtol=tol)
        assert cache.length == 11
        # one layer on its own: the step equals the layer over the prefix at its last position
        layer = m.decoder.layers[1]
        x = torch.randn(5, 7, 32, dtype=dtype)
        causal = torch.nn.Transformer.generate_square_subsequent_mask(7, dtype=dtype)
        full = layer(x, memory, tgt_mask=causal, memory_key_padding_mask=kpm, tgt_is_causal=True)
        k, v = project_memory(layer, memory)
        lcache = LayerKVCache(torch.empty(5, 4, 7, 8, dtype=dtype), torch.empty(5, 4, 7, 8, dtype=dtype), k, v)
        mask = ~kpm[:, None, None, :]
        for t in range(7):
            out = decoder_layer_step(layer, x[:, t:t + 1], lcache, t, mask)
            torch.testing.assert_close(out[:, 0], full[:, t], atol=tol, rtol=tol)


def test_cached_step_refuses_train_mode_and_full_cache():
    m = _random_model()
    memory, kpm = m.encode(_src())
    cache = m.init_cache(memory, kpm, capacity=1)
    m.train()
    with pytest.raises(RuntimeError, match="eval"):
        m.decode_step(torch.full((5,), BOS), cache)
    m.eval()
    m.decode_step(torch.full((5,), BOS), cache)
    with pytest.raises(RuntimeError, match="full"):
        m.decode_step(torch.full((5,), 3), cache)


def _ended_early(out: torch.Tensor, steps: int) -> tuple[int, int]:
    """(rows that produced eos before the last step, rows that ran to max_new_tokens without eos)."""
    early = sum(1 for row in out.tolist() if EOS in row and row.index(EOS) < steps - 1)
    full = sum(1 for row in out.tolist() if EOS not in row and len(row) == steps)
    return early, full


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
@pytest.mark.parametrize("num_beams, length_penalty, early_stopping", [
    (1, 1.0, False), (4, 1.0, False), (3, 0.0, False), (5, 2.0, False), (4, 1.0, True)])
def test_generate_with_cache_equals_without(norm_first, num_beams, length_penalty, early_stopping):
    m = _trained_model(norm_first)
    src = _src(batch=6)
    steps = 7
    kw = dict(num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping, return_scores=True)
    a, sa = m.generate(src, steps, **kw)
    b, sb = m.generate(src, steps, use_cache=False, **kw)
    assert torch.equal(a, b)
    torch.testing.assert_close(sa, sb, atol=1e-5, rtol=1e-5)
    assert a.shape[0] == 6 and a.shape[1] <= steps and a.dtype == torch.long
    assert not (a == BOS).any()
    for row in a.tolist():                                      # pad only after eos
        if EOS in row:
            assert all(t == PAD for t in row[row.index(EOS) + 1:])
        else:
            assert PAD not in row
    early, full = _ended_early(a, steps)
    assert early >= 1 and full >= 1, (early, full)              # both the eos and the max-length paths are run


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_generate_with_cache_equals_without_per_backend(backend):
    if not dict((n, ok) for n, ok, _ in pyattn.backends())[backend]:
        pytest.skip(f"backend {backend} unavailable here")
    m = _trained_model(True)
    src = _src(batch=4)
    with pyattn.use_backend(backend):
        for beams in (1, 3):
            a = m.generate(src, 7, num_beams=beams)
            b = m.generate(src, 7, num_beams=beams, use_cache=False)
            assert torch.equal(a, b), (backend, beams)


def test_cached_step_also_runs_torch_nn_decoder_layers():
    """decoder_layer_step reads parameters by torch.nn's names, so a model whose core is swapped for a
    torch.nn.Transformer with the same weights decodes with the cache too, and gives the same translations."""
    m = _trained_model(True)
    twin = copy.deepcopy(m)
    twin.transformer = torch.nn.Transformer(32, 4, 2, 2, 48, 0.0, activation="gelu", batch_first=True,
                                            norm_first=True).eval()
    twin.transformer.load_state_dict(m.transformer.state_dict(), strict=True)
    src = _src(batch=4)
    for beams in (1, 3):
        want = m.generate(src, 7, num_beams=beams)
        assert torch.equal(twin.generate(src, 7, num_beams=beams), want)
        assert torch.equal(twin.generate(src, 7, num_beams=beams, use_cache=False), want)


def test_greedy_equals_an_argmax_loop_over_the_model():
    m = _trained_model(False)
    src = _src(batch=4)
    out, scores = m.generate(src, 12, return_scores=True)
    for i in range(4):
        prefix = torch.tensor([[BOS]])
        total = 0.0
        row = []
        with torch.no_grad():
            for _ in range(12):
                lp = m.log_probs(src[i:i + 1, :], prefix)[0, -1]
                lp[PAD] = lp[BOS] = float("-inf")
                t = int(lp.argmax())
                total += float(lp[t])
                row.append(t)
                prefix = torch.cat([prefix, torch.tensor([[t]])], 1)
                if t == EOS:
                    break
        got = out[i].tolist()
        assert got[:len(row)] == row and all(t == PAD for t in got[len(row):])
        assert abs(scores[i].item() - total) < 1e-4


def _sequence_log_prob(m, src_row: torch.Tensor, ids: list[int]) -> float:
    tgt = torch.tensor([[BOS] + ids[:-1]])
    with torch.no_grad():
        lp = m.log_probs(src_row[None], tgt)[0]
    return float(lp[torch.arange(len(ids)), torch.tensor(ids)].sum())


@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 0.6])
def test_beam_scores_are_length_normalised_model_log_probs(length_penalty):
    m = _trained_model(True)
    src = _src(batch=5)
    out, scores = m.generate(src, 12, num_beams=4, length_penalty=length_penalty, return_scores=True)
    greedy, gscores = m.generate(src, 12, return_scores=True)
    for i in range(5):
        ids = out[i].tolist()
        ids = ids[:ids.index(EOS) + 1] if EOS in ids else [t for t in ids if t != PAD]
        lp = _sequence_log_prob(m, src[i], ids)
        assert abs(scores[i].item() - lp / len(ids) ** length_penalty) < 1e-4
        if length_penalty == 0.0:       # unnormalised: beam search never returns worse than greedy here
            assert scores[i].item() >= gscores[i].item() - 1e-5


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_wide_beam_is_exhaustive_search_on_a_tiny_vocabulary(length_penalty):
    """Target vocabulary: 3 specials + 2 words, 3 steps: 1 + 2 + 4 sequences ending in eos and 8 without. 16 beams
    hold them all, so beam search must return the best of all of them."""
    torch.manual_seed(8)
    m = _random_model(seed=8, tgt_vocab_size=5)
    src = _src(batch=3)
    out, scores = m.generate(src, 3, num_beams=16, length_penalty=length_penalty, return_scores=True)
    cands = [list(p) + [EOS] for n in range(3) for p in itertools.product((3, 4), repeat=n)]
    cands += [list(p) for p in itertools.product((3, 4), repeat=3)]
    assert len(cands) == 15
    for i in range(3):
        best = max(cands, key=lambda ids: _sequence_log_prob(m, src[i], ids) / len(ids) ** length_penalty)
        want = _sequence_log_prob(m, src[i], best) / len(best) ** length_penalty
        got = [t for t in out[i].tolist() if t != PAD]
        assert got == best, (i, got, best)
        assert abs(scores[i].item() - want) < 1e-4


@pytest.mark.parametrize("num_beams", [1, 3])
def test_padded_batch_equals_each_source_alone(num_beams):
    m = _trained_model(True)
    src = _src(batch=5)
    out = m.generate(src, 10, num_beams=num_beams)
    for i in range(5):
        n = int((src[i] != PAD).sum())
        alone = m.generate(src[i:i + 1, :n], 10, num_beams=num_beams)
        assert out[i, :alone.shape[1]].tolist() == alone[0].tolist()
        assert (out[i, alone.shape[1]:] == PAD).all()


def test_beam_search_reorders_the_cache():
    m = _trained_model(False)
    src = _src(batch=3)
    from pyattn.models import transformer as T

    seen = []
    orig = T.KVCache.reorder

    def spy(self, index):
        seen.append(index.clone())
        return orig(self, index)

    T.KVCache.reorder = spy
    try:
        m.generate(src, 7, num_beams=3)
    finally:
        T.KVCache.reorder = orig
    assert seen and any(not torch.equal(ix, torch.arange(9)) for ix in seen)   # hypotheses really moved
    for ix in seen:                                              # only within the beams of the same source
        assert torch.equal(ix // 3, torch.arange(9) // 3)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_min_new_tokens_holds_eos_back(num_beams):
    m = _trained_model(True)
    src = _src(batch=6)
    free = m.generate(src, 7, num_beams=num_beams)
    assert (free == EOS).any(dim=1).sum() >= 2
    for min_new in (3, 7):
        out = m.generate(src, 7, num_beams=num_beams, min_new_tokens=min_new)
        ref = m.generate(src, 7, num_beams=num_beams, min_new_tokens=min_new, use_cache=False)
        assert torch.equal(out, ref)
        for row in out.tolist():
            assert EOS not in row[:min_new] and PAD not in row[:min_new]
    assert out.shape == (6, 7) and not (out == EOS).any()
    with pytest.raises(ValueError, match="min_new_tokens"):
        m.generate(src, 7, min_new_tokens=8)


def test_generate_runs_in_eval_mode_and_restores_the_mode():
    m = _random_model(seed=10, dropout=0.3)
    src = _src(batch=3)
    want = m.eval().generate(src, 9, num_beams=2)
    m.train()
    got = m.generate(src, 9, num_beams=2)
    assert m.training and torch.equal(got, want)


def test_generate_empty_batch():
    m = _random_model()
    out, scores = m.generate(torch.empty(0, 5, dtype=torch.long), 4, return_scores=True)
    assert out.shape == (0, 0) and scores.shape == (0,)


@pytest.mark.parametrize("call, exc, match", [
    (lambda m, s: m.generate(s, 5, num_beams=0), ValueError, "num_beams"),
    (lambda m, s: m.generate(s, 5, num_beams=-2), ValueError, "num_beams"),
    (lambda m, s: m.generate(s, 5, num_beams=2.0), ValueError, "num_beams"),
    (lambda m, s: m.generate(s, 0), ValueError, "max_new_tokens"),
    (lambda m, s: m.generate(s, 41), ValueError, "max_new_tokens"),
    (lambda m, s: m.generate(s, 5, length_penalty=float("nan")), ValueError, "length_penalty"),
    (lambda m, s: m.generate(s.float(), 5), TypeError, "src"),
    (lambda m, s: m.generate(s[0], 5), ValueError, "src must be 2-D"),
    (lambda m, s: m.generate(s[:, :0], 5), ValueError, "src has length 0"),
    (lambda m, s: m.generate(s + 30, 5), ValueError, "src holds token id"),
    (lambda m, s: m.generate(s, 5, src_key_padding_mask=s.eq(0)[:, :-1]), ValueError, "src_key_padding_mask"),
    (lambda m, s: m.generate(s, 5, src_key_padding_mask=s.eq(0).float()), TypeError, "src_key_padding_mask"),
    (lambda m, s: m(s, s[:2, :3]), ValueError, "batch size"),
    (lambda m, s: m(s, torch.full((5, 3), 13)), ValueError, "tgt holds token id"),
    (lambda m, s: m(torch.zeros(5, 41, dtype=torch.long), s), ValueError, "max_len"),
])
def test_bad_inputs_raise_naming_the_argument(call, exc, match):
    m = _random_model()
    src = _src()
    with pytest.raises(exc, match=match):
        call(m, src)
    assert m.generate(src, 3).shape[0] == 5                     # the model is still usable


def test_model_trains_loss_decreases():
    torch.manual_seed(0)
    m = EncoderDecoderTransformer(_config(dropout=0.1, tie_embeddings=True))
    opt = torch.optim.Adam(m.parameters(), lr=5e-3)
    src = torch.randint(3, 13, (8, 6))
    tgt = torch.cat([src.flip(1), torch.full((8, 1), EOS)], 1)          # reverse the source
    dec_in = torch.cat([torch.full((8, 1), BOS), tgt[:, :-1]], 1)
    losses = []
    m.train()
    for _ in range(30):
        loss = F.cross_entropy(m(src, dec_in).reshape(-1, 13), tgt.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(p.grad is not None for p in m.parameters())
