"""Ecosystem hooks: pyattn.patch_torch() and attn_implementation="pyattn" in Hugging Face transformers.

Routing is verified with a spy on ``pyattn.ops.attention._run`` (the step every pyattn attention call takes
into the dispatcher), so a test fails if torch's own kernel silently did the work. Models are tiny and
randomly initialised from configs (no downloads); pyattn is compared with the same weights under "eager" and
"sdpa".
"""
import copy
import subprocess
import sys
import threading

import pytest
import torch
import torch.nn.functional as F

import pyattn
import pyattn.ops.attention as attn_ops
from conftest import backend_params
from pyattn.integrations import transformers as pyattn_hf
from pyattn.testing import assert_close_fp32

TORCH_SDPA = F.scaled_dot_product_attention  # torch's original, captured before any patch


@pytest.fixture
def spy(monkeypatch):
    """Records the backend= of every call that enters pyattn's attention dispatch."""
    calls = []
    real = attn_ops._run

    def _run(inputs, backend):
        calls.append(backend)
        return real(inputs, backend)

    monkeypatch.setattr(attn_ops, "_run", _run)
    return calls


@pytest.fixture(autouse=True)
def _no_leaked_patch():
    yield
    assert F.scaled_dot_product_attention is TORCH_SDPA, "a test left torch.nn.functional patched"


def _qkv(b=2, hq=4, hkv=4, lq=17, lk=17, d=16, requires_grad=False):
    q = torch.randn(b, hq, lq, d, requires_grad=requires_grad)
    k = torch.randn(b, hkv, lk, d, requires_grad=requires_grad)
    v = torch.randn(b, hkv, lk, d, requires_grad=requires_grad)
    return q, k, v


# ---- pyattn.patch_torch() ----------------------------------------------------------------------------------


CASES = {
    "plain": lambda q: {},
    "causal": lambda q: {"is_causal": True},
    "bool_mask": lambda q: {"attn_mask": torch.rand(q.shape[0], 1, q.shape[2], 13) > 0.3},
    "additive_mask": lambda q: {"attn_mask": torch.randn(1, q.shape[1], q.shape[2], 13)},
    "scale": lambda q: {"scale": 0.3, "is_causal": True},
}


@pytest.mark.parametrize("backend", [None] + backend_params("attention"))
@pytest.mark.parametrize("case", sorted(CASES))
def test_patch_routes_to_pyattn_and_matches_torch(spy, case, backend):
    q, k, v = _qkv(lq=11, lk=13)
    kwargs = CASES[case](q)
    ref = TORCH_SDPA(q, k, v, **kwargs)
    with pyattn.patch_torch(backend=backend):
        assert F.scaled_dot_product_attention is not TORCH_SDPA
        out = F.scaled_dot_product_attention(q, k, v, **kwargs)
    assert spy == [backend]
    assert_close_fp32(out, ref)


def test_patch_gqa_and_backward(spy):
    q, k, v = _qkv(hq=6, hkv=2, lq=9, lk=9, requires_grad=True)
    mask = torch.ones(9, 9, dtype=torch.bool).tril()
    ref = TORCH_SDPA(q, k, v, attn_mask=mask, enable_gqa=True)
    gref = torch.autograd.grad(ref.square().sum(), (q, k, v))
    with pyattn.patch_torch():
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    assert spy == [None]
    assert_close_fp32(out, ref)
    for g, gr in zip(grads, gref):
        assert_close_fp32(g, gr, "bwd")


def test_patch_restores_original_after_exit_and_exception(spy):
    with pyattn.patch_torch() as handle:
        assert handle.active
        assert F.scaled_dot_product_attention.__wrapped__ is TORCH_SDPA
    assert F.scaled_dot_product_attention is TORCH_SDPA and not handle.active

    with pytest.raises(KeyError, match="boom"):
        with pyattn.patch_torch():
            raise KeyError("boom")
    assert F.scaled_dot_product_attention is TORCH_SDPA
    q, k, v = _qkv()
    F.scaled_dot_product_attention(q, k, v)
    assert spy == []  # not routed any more


def test_patch_plain_call_handle(spy):
    handle = pyattn.patch_torch()  # patches immediately
    try:
        q, k, v = _qkv()
        F.scaled_dot_product_attention(q, k, v)
        assert spy == [None]
        captured = F.scaled_dot_product_attention
    finally:
        handle.undo()
    assert F.scaled_dot_product_attention is TORCH_SDPA
    handle.undo()  # idempotent
    captured(q, k, v)  # a reference kept from inside the patch goes to torch once the handle is undone
    assert spy == [None]
    with pytest.raises(RuntimeError, match="already undone"):
        with handle:
            pass
    assert "undone" in repr(handle)


def test_patch_nested_and_out_of_order(spy):
    q, k, v = _qkv()
    with pyattn.patch_torch():
        with pyattn.patch_torch(backend="torch"):
            F.scaled_dot_product_attention(q, k, v)
        F.scaled_dot_product_attention(q, k, v)  # the outer patch is back in charge
    assert spy == ["torch", None]
    assert F.scaled_dot_product_attention is TORCH_SDPA

    spy.clear()
    outer = pyattn.patch_torch(backend="torch")
    inner = pyattn.patch_torch()
    outer.undo()  # undone first, out of order: the inner one stays active
    F.scaled_dot_product_attention(q, k, v)
    assert F.scaled_dot_product_attention is not TORCH_SDPA
    inner.undo()
    assert F.scaled_dot_product_attention is TORCH_SDPA
    assert spy == [None]


def test_patch_is_process_wide(spy):
    q, k, v = _qkv()
    out = {}
    with pyattn.patch_torch():
        t = threading.Thread(target=lambda: out.setdefault("o", F.scaled_dot_product_attention(q, k, v)))
        t.start()
        t.join()
    assert spy == [None]
    assert_close_fp32(out["o"], TORCH_SDPA(q, k, v))


def test_patch_unknown_backend_names_the_argument():
    with pytest.raises(ValueError, match="unknown pyattn backend 'nope'"):
        pyattn.patch_torch(backend="nope")
    with pytest.raises(TypeError, match="backend must be"):
        pyattn.patch_torch(backend=3)


class _SubTensor(torch.Tensor):
    pass


def _fallback_calls():
    q, k, v = _qkv(lq=5, lk=5)
    return {
        # torch accepts dropout_p=1.0 (drops everything); pyattn refuses it
        "dropout_one": (lambda: F.scaled_dot_product_attention(q, k, v, dropout_p=1.0), None),
        "int_is_causal": (lambda: F.scaled_dot_product_attention(q, k, v, is_causal=1), TypeError),
        "unknown_kwarg": (lambda: F.scaled_dot_product_attention(q, k, v, window=3), TypeError),
        "extra_positional": (lambda: F.scaled_dot_product_attention(q, k, v, None, 0.0, False, 0.5),
                             TypeError),  # torch's scale is keyword-only
        "int_mask": (lambda: F.scaled_dot_product_attention(q, k, v, torch.ones(5, 5, dtype=torch.long)),
                     RuntimeError),
        "int_inputs": (lambda: F.scaled_dot_product_attention(q.long(), k.long(), v.long()), RuntimeError),
        "subclass": (lambda: F.scaled_dot_product_attention(q.as_subclass(_SubTensor), k, v), None),
        "inf_scale": (lambda: F.scaled_dot_product_attention(q, k, v, scale=float("inf")), None),
    }


@pytest.mark.parametrize("name", sorted(_fallback_calls()))
def test_patch_falls_back_to_torch_for_unsupported_arguments(spy, name):
    call, error = _fallback_calls()[name]
    if error is None:
        torch.manual_seed(1)
        ref = call()
        with pyattn.patch_torch():
            torch.manual_seed(1)
            out = call()
        assert type(out) is type(ref)
        torch.testing.assert_close(out, ref, equal_nan=True, rtol=0, atol=0)  # torch ran both: bit for bit
    else:
        with pytest.raises(error) as unpatched:
            call()
        with pyattn.patch_torch():
            with pytest.raises(error) as patched:
                call()
        assert str(patched.value) == str(unpatched.value)  # torch's own error, not pyattn's
    assert spy == []


def test_patch_never_recurses_into_itself(monkeypatch):
    """A pyattn code path that itself calls F.scaled_dot_product_attention gets torch's original."""
    real = attn_ops._run
    inner = []

    def _run(inputs, backend):
        inner.append(F.scaled_dot_product_attention(inputs.q, inputs.k, inputs.v))
        return real(inputs, backend)

    monkeypatch.setattr(attn_ops, "_run", _run)
    q, k, v = _qkv()
    with pyattn.patch_torch():
        out = F.scaled_dot_product_attention(q, k, v)
    assert len(inner) == 1  # a recursion would have called _run again (and again)
    assert_close_fp32(inner[0], out)


def test_patch_under_torch_compile_has_no_graph_break():
    """Inside the patch, torch.compile traces F.scaled_dot_product_attention into pyattn's custom op."""
    q, k, v = _qkv(lq=9, lk=9)

    def f(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True) * 2

    ref = f(q, k, v)
    torch._dynamo.reset()
    try:
        with pyattn.patch_torch():
            explained = torch._dynamo.explain(f)(q, k, v)
            out = torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v)
    finally:
        torch._dynamo.reset()
    assert explained.graph_break_count == 0
    targets = [str(n.target) for g in explained.graphs for n in g.graph.nodes if n.op == "call_function"]
    assert "pyattn.attention_fwd.default" in targets, targets
    assert_close_fp32(out, ref)


@pytest.mark.parametrize("causal", [False, True])
def test_patch_multihead_attention_matches_unpatched(spy, causal):
    """torch.nn.MultiheadAttention's regular path calls F.scaled_dot_product_attention (need_weights=False).
    Train mode keeps it off the C++ inference fast path, which never calls the Python function."""
    mha = torch.nn.MultiheadAttention(32, 4, batch_first=True, dropout=0.0).train()
    x = torch.randn(3, 10, 32, requires_grad=True)
    pad = torch.zeros(3, 10, dtype=torch.bool)
    pad[1, 7:] = True
    kwargs = {"key_padding_mask": pad, "need_weights": False}
    if causal:
        kwargs = {"attn_mask": torch.nn.Transformer.generate_square_subsequent_mask(10), "is_causal": True,
                  "need_weights": False}

    def run():
        out = mha(x, x, x, **kwargs)[0]
        return (out, *torch.autograd.grad(out.square().sum(), (x, mha.in_proj_weight)))

    ref = run()
    with pyattn.patch_torch():
        got = run()
    assert spy == [None]
    assert_close_fp32(got[0], ref[0])
    for g, gr in zip(got[1:], ref[1:]):
        assert_close_fp32(g, gr, "bwd")


# ---- Hugging Face transformers -----------------------------------------------------------------------------


def test_import_pyattn_does_not_import_transformers():
    code = ("import sys, pyattn, pyattn.integrations, pyattn.integrations.transformers as t; "
            "assert 'transformers' not in sys.modules, 'transformers imported'; "
            "assert not t.is_registered(); print('ok')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


def test_register_without_transformers_raises_import_error(monkeypatch):
    for mod in [m for m in sys.modules if m == "transformers" or m.startswith("transformers.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` raise ImportError
    with pytest.raises(ImportError, match="needs the 'transformers' package"):
        pyattn_hf.register()


SCALE_TOL = 1e-5  # TESTING.md fp32 forward tolerance, relative to the output's scale (whole models)
GRAD_TOL = 1e-4  # TESTING.md fp32 backward tolerance, relative to each gradient's scale


@pytest.fixture(scope="module")
def hf():
    """transformers, with "pyattn" registered; tests using it skip (with this reason) where it is missing."""
    tf = pytest.importorskip(
        "transformers", reason="Hugging Face transformers is not installed (pip install 'transformers>=4.48')"
    )

    assert pyattn_hf.register() == "pyattn"
    return tf


def _close(out, ref, tol=SCALE_TOL, what="output"):
    out, ref = out.detach().double(), ref.detach().double()
    assert out.shape == ref.shape, what
    err = (out - ref).abs().max().item()
    bound = tol * max(1.0, ref.abs().max().item())
    assert err <= bound, f"{what}: max abs error {err:.3g} > {bound:.3g}"


def _models(cls, cfg):
    """The same random weights under "pyattn", "eager" and "sdpa" (each model gets its own config copy: the
    implementation lives on the config)."""
    torch.manual_seed(0)
    models = {"pyattn": cls.from_config(copy.deepcopy(cfg), attn_implementation="pyattn").eval()}
    for impl in ("eager", "sdpa"):
        m = cls.from_config(copy.deepcopy(cfg), attn_implementation=impl).eval()
        m.load_state_dict(models["pyattn"].state_dict())
        models[impl] = m
    assert models["pyattn"].config._attn_implementation == "pyattn"
    return models


def test_register_is_idempotent_and_forwards_backend(hf, spy):
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    fn = ALL_ATTENTION_FUNCTIONS["pyattn"]
    assert pyattn_hf.register() == "pyattn" and ALL_ATTENTION_FUNCTIONS["pyattn"] is fn
    assert ALL_MASK_ATTENTION_FUNCTIONS["pyattn"] is sdpa_mask
    assert pyattn_hf.is_registered()
    try:
        pyattn_hf.register(backend="torch")
        forced = ALL_ATTENTION_FUNCTIONS["pyattn"]
        assert forced is not fn
        q, k, v = _qkv(hq=4, hkv=2)
        module = torch.nn.Module()
        out, weights = forced(module, q, k, v, None, is_causal=True)
        assert weights is None and out.shape == (2, 17, 4, 16)
        assert spy == ["torch"]
        assert_close_fp32(out, TORCH_SDPA(q, k, v, is_causal=True, enable_gqa=True).transpose(1, 2))
    finally:
        pyattn_hf.register()
    assert ALL_ATTENTION_FUNCTIONS["pyattn"] is fn
    with pytest.raises(ValueError, match="unknown pyattn backend 'nope'"):
        pyattn_hf.register(backend="nope")


def test_attention_function_rejects_what_it_cannot_do(hf):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="softcap"):
        pyattn_hf.pyattn_attention_forward(torch.nn.Module(), q, k, v, None, softcap=30.0)
    with pytest.raises(ValueError, match="s_aux"):
        pyattn_hf.pyattn_attention_forward(torch.nn.Module(), q, k, v, None, s_aux=torch.zeros(4))
    with pytest.raises(TypeError, match="attention_mask"):
        pyattn_hf.pyattn_attention_forward(torch.nn.Module(), q, k, v, [[1, 0]])


def _padding(batch, length, pad, left=False):
    am = torch.ones(batch, length, dtype=torch.long)
    for i, n in enumerate(pad):
        if n:
            if left:
                am[i, :n] = 0
            else:
                am[i, length - n:] = 0
    return am


def test_bert_encoder_with_padding(hf, spy):
    cfg = hf.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=37, max_position_embeddings=64)
    models = _models(hf.AutoModel, cfg)
    ids = torch.randint(0, 99, (3, 13))
    am = _padding(3, 13, [0, 4, 9])
    with torch.no_grad():
        outs = {name: m(input_ids=ids, attention_mask=am).last_hidden_state for name, m in models.items()}
    assert len(spy) == 2  # one pyattn call per layer, none from the eager/sdpa models
    # A padded query still sees the valid keys, so every position is comparable.
    _close(outs["pyattn"], outs["eager"], what="vs eager")
    _close(outs["pyattn"], outs["sdpa"], what="vs sdpa")


DECODERS = {
    # GQA: 4 query heads share 2 key/value heads
    "llama_gqa": lambda tf: (tf.AutoModelForCausalLM, tf.LlamaConfig(
        vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64)),
    # MQA with attention biases (Qwen2 style)
    "qwen2_mqa": lambda tf: (tf.AutoModelForCausalLM, tf.Qwen2Config(
        vocab_size=101, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=3,
        num_key_value_heads=1, max_position_embeddings=64)),
    "gpt2": lambda tf: (tf.AutoModelForCausalLM, tf.GPT2Config(
        vocab_size=101, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0)),
}


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_decoder_forward_backward_and_generate(hf, spy, name):
    cls, cfg = DECODERS[name](hf)
    models = _models(cls, cfg)
    ids = torch.randint(0, 101, (3, 12))
    am = _padding(3, 12, [0, 3, 7])  # right padding: every query row sees at least one valid key
    valid = am.bool()
    with torch.no_grad():
        logits = {n: m(input_ids=ids, attention_mask=am).logits for n, m in models.items()}
        unmasked = {n: m(input_ids=ids).logits for n, m in models.items()}  # pure causal: the is_causal path
    assert len(spy) == 2 * cfg.num_hidden_layers
    for ref in ("eager", "sdpa"):
        _close(logits["pyattn"][valid], logits[ref][valid], what=f"padded logits vs {ref}")
        _close(unmasked["pyattn"], unmasked[ref], what=f"causal logits vs {ref}")

    # one backward pass: every parameter's gradient equals sdpa's
    labels = ids.masked_fill(~valid, -100)
    grads = {}
    for n in ("pyattn", "sdpa"):
        m = models[n]
        m.zero_grad()
        m(input_ids=ids, attention_mask=am, labels=labels).loss.backward()
        grads[n] = {p: t.grad for p, t in m.named_parameters() if t.grad is not None}
    assert grads["pyattn"].keys() == grads["sdpa"].keys() and grads["pyattn"]
    for p in grads["sdpa"]:
        _close(grads["pyattn"][p], grads["sdpa"][p], GRAD_TOL, what=f"grad {p}")

    # greedy generation with the KV cache (left padding, as generate() expects for decoders)
    prompt_mask = _padding(3, 12, [0, 2, 5], left=True)
    tokens = {n: models[n].generate(input_ids=ids, attention_mask=prompt_mask, max_new_tokens=6,
                                    do_sample=False, pad_token_id=0)
              for n in ("pyattn", "sdpa", "eager")}
    assert tokens["pyattn"].shape == (3, 18)
    assert torch.equal(tokens["pyattn"], tokens["sdpa"])
    assert torch.equal(tokens["pyattn"], tokens["eager"])


ENCODER_DECODERS = {
    # relative position bias (learned, so the additive mask requires grad) merged into the mask
    "t5": lambda tf: (tf.AutoModelForSeq2SeqLM, tf.T5Config(
        vocab_size=101, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
        relative_attention_num_buckets=8, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0)),
    "bart": lambda tf: (tf.AutoModelForSeq2SeqLM, tf.BartConfig(
        vocab_size=101, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64,
        dropout=0.0, attention_dropout=0.0, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        decoder_start_token_id=2, forced_eos_token_id=None)),
}


@pytest.mark.parametrize("name", sorted(ENCODER_DECODERS))
def test_encoder_decoder_forward_backward_and_generate(hf, spy, name):
    cls, cfg = ENCODER_DECODERS[name](hf)
    models = _models(cls, cfg)
    src = torch.randint(3, 101, (2, 11))
    src_mask = _padding(2, 11, [0, 4])
    tgt = torch.randint(3, 101, (2, 7))
    tgt_mask = _padding(2, 7, [0, 2])
    valid = tgt_mask.bool()
    kw = {"input_ids": src, "attention_mask": src_mask, "decoder_input_ids": tgt,
          "decoder_attention_mask": tgt_mask}
    with torch.no_grad():
        logits = {n: m(**kw).logits for n, m in models.items()}
    # encoder self-attention, decoder self-attention and cross-attention, per layer
    layers = cfg.num_layers if name == "t5" else cfg.encoder_layers
    assert len(spy) == 3 * layers
    for ref in ("eager", "sdpa"):
        _close(logits["pyattn"][valid], logits[ref][valid], what=f"logits vs {ref}")

    labels = tgt.masked_fill(~valid, -100)
    grads = {}
    for n in ("pyattn", "sdpa"):
        m = models[n]
        m.zero_grad()
        m(**kw, labels=labels).loss.backward()
        grads[n] = {p: t.grad for p, t in m.named_parameters() if t.grad is not None}
    assert grads["pyattn"].keys() == grads["sdpa"].keys() and grads["pyattn"]
    for p in grads["sdpa"]:
        _close(grads["pyattn"][p], grads["sdpa"][p], GRAD_TOL, what=f"grad {p}")

    tokens = {n: models[n].generate(input_ids=src, attention_mask=src_mask, max_new_tokens=5, do_sample=False)
              for n in ("pyattn", "sdpa")}
    assert torch.equal(tokens["pyattn"], tokens["sdpa"])


def test_hf_sdpa_model_under_patch_torch_routes_to_pyattn(hf, spy):
    """patch_torch() also reaches transformers' own "sdpa" implementation (F.scaled_dot_product_attention)."""
    cls, cfg = DECODERS["llama_gqa"](hf)
    models = _models(cls, cfg)
    ids = torch.randint(0, 101, (2, 9))
    am = _padding(2, 9, [0, 3])
    with torch.no_grad():
        ref = models["sdpa"](input_ids=ids, attention_mask=am).logits
        assert spy == []
        with pyattn.patch_torch():
            out = models["sdpa"](input_ids=ids, attention_mask=am).logits
    assert len(spy) == cfg.num_hidden_layers
    _close(out[am.bool()], ref[am.bool()])
