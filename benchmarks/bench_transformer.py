"""Transformer benchmarks (``pyattn bench --op transformer``): the encoder-decoder model of pyattn.models
(``EncoderDecoderTransformer``: embeddings + PE, ``pyattn.nn.Transformer``, tied output projection) against the same
model with ``torch.nn.Transformer`` in place of ``pyattn.nn.Transformer``, with the same weights (state_dict copied).

Cases (B batch, S source length, T target length, E d_model, H heads, F d_ff, N layers per stack, V shared
vocabulary, G generated tokens), dropout 0:
* small: B=8 S=T=32 E=128 H=4 F=512 N=2 V=1000 G=32 (``--quick`` runs only this);
* medium: the paper's base sizes, B=8 S=T=64 E=512 H=8 F=2048 N=6 V=8000 G=48.
Modes:
* ``fwd+bwd``: one training step: forward, cross-entropy over the target tokens, backward to every parameter (fp32).
  Output checked: the loss and every gradient, against the torch model in float64.
* ``generate``: greedy decoding of exactly G tokens (``min_new_tokens=G``) for a batch of B sources, encoder
  included. pyattn providers decode incrementally with the key/value cache (one query row per step); the baseline
  is torch.nn.Transformer *without a cache* (torch's Transformer has none: ``generate(use_cache=False)`` runs the whole
  decoder over the prefix every step), so its row name says so; a ``pyattn:<backend> no cache`` row separates the
  cache's gain from the kernels'. Output checked: the generated tokens, against the baseline's (fp32).
Providers: every pyattn backend that accepts the case on the device (``pyattn.use_backend(name)``; on CPU cpp and
torch; Triton is never benchmarked on CPU, where it only runs in its interpreter).
Extra row fields: ``tokens_per_s`` (generate: B*G generated tokens per second; fwd+bwd: B*T target tokens per second).
FLOPs (2 per multiply-add, matmuls and attention only; x3 for fwd+bwd) by ``transformer_flops`` / ``generate_flops``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import pyattn
from pyattn.dispatch import PRIORITY, get_backend
from pyattn.models import EncoderDecoderTransformer, TransformerConfig
from pyattn.ops.attention import make_inputs as attention_inputs
from pyattn.ops.layer_norm import make_inputs as norm_inputs

try:
    from .harness import BenchContext, Case, Provider, Skip, Work
except ImportError:  # run as a plain module from the benchmarks/ folder
    from harness import BenchContext, Case, Provider, Skip, Work  # type: ignore

SMALL = {"B": 8, "S": 32, "T": 32, "E": 128, "H": 4, "F": 512, "N": 2, "V": 1000, "G": 32}
MEDIUM = {"B": 8, "S": 64, "T": 64, "E": 512, "H": 8, "F": 2048, "N": 6, "V": 8000, "G": 48}
TINY = {"B": 2, "S": 5, "T": 5, "E": 16, "H": 2, "F": 32, "N": 1, "V": 20, "G": 4}
PAD, BOS, EOS = 0, 1, 2


# ---- work ------------------------------------------------------------------------------------------------------

def _encoder_flops(B: int, S: int, E: int, F_: int, N: int) -> float:
    per_token = N * (2 * 4 * E * E + 2 * 2 * E * F_ + 4 * S * E)       # q,k,v,o projections, FFN, QK^T + PV
    return float(B * S * per_token)


def transformer_flops(B: int, S: int, T: int, E: int, F_: int, N: int, V: int, mode: str = "fwd") -> float:
    """Forward of the encoder-decoder on (B, S) sources and (B, T) targets: encoder, decoder (causal self-attention
    counted at half, cross-attention K/V projections of the memory, cross-attention, FFN), output projection; x3 for
    fwd+bwd."""
    dec_per_token = N * (2 * 4 * E * E + 2 * 2 * E * E + 2 * 2 * E * F_ + 2 * T * E + 4 * S * E) + 2 * E * V
    fwd = _encoder_flops(B, S, E, F_, N) + B * T * dec_per_token + N * B * S * 2 * 2 * E * E
    return fwd * (3.0 if mode == "fwd+bwd" else 1.0)


def generate_flops(B: int, S: int, G: int, E: int, F_: int, N: int, V: int) -> float:
    """Cached greedy decoding of G tokens: the encoder once, the memory's cross-attention K/V once, then G steps
    of one token each (step t attends over t + 1 cached positions and S memory positions)."""
    per_step = N * (2 * 4 * E * E + 2 * 2 * E * E + 2 * 2 * E * F_ + 4 * S * E) + 2 * E * V
    attn_self = N * 4 * E * sum(t + 1 for t in range(G))
    return _encoder_flops(B, S, E, F_, N) + N * B * S * 2 * 2 * E * E + B * (G * per_step + attn_self)


def work_for(case: Case) -> Work:
    p = case.shape
    if case.mode == "generate":
        return Work(generate_flops(p["B"], p["S"], p["G"], p["E"], p["F"], p["N"], p["V"]), "flop")
    return Work(transformer_flops(p["B"], p["S"], p["T"], p["E"], p["F"], p["N"], p["V"], case.mode), "flop")


# ---- cases and inputs ------------------------------------------------------------------------------------------

def cases(ctx: BenchContext) -> list[Case]:
    sizes = [TINY] if ctx.tiny else ([SMALL] if ctx.quick else [SMALL, MEDIUM])
    out = []
    for dt in ctx.want([torch.float32]):
        for mode in ("fwd+bwd", "generate"):
            for size in sizes:
                shape = {k: v for k, v in size.items() if k != ("T" if mode == "generate" else "G")}
                out.append(Case("transformer", mode, shape, dt, ctx.device))
    return out


def _config(p: dict) -> TransformerConfig:
    return TransformerConfig(p["V"], p["V"], d_model=p["E"], nhead=p["H"], num_encoder_layers=p["N"],
                             num_decoder_layers=p["N"], dim_feedforward=p["F"], dropout=0.0,
                             max_len=max(p["S"], p.get("T", 0), p.get("G", 0)) + 1, tie_embeddings=True,
                             share_src_tgt_embeddings=True, pad_id=PAD, bos_id=BOS, eos_id=EOS)


def make_inputs(case: Case) -> dict:
    """Token ids (sources with some right padding, targets) and the weights of one randomly initialised model, each
    weight a top-level entry ``w:<state_dict key>`` (so the harness's float64 reference converts them too)."""
    p = case.shape
    g = torch.Generator().manual_seed(1234 + sum(p.values()))
    B, S = p["B"], p["S"]
    src = torch.randint(3, p["V"], (B, S), generator=g)
    for i in range(1, B, 2):                        # every other source shorter by up to a quarter: padding
        src[i, S - 1 - (i * S) // (4 * B):] = PAD
    inputs = {"src": src.to(case.device)}
    if case.mode != "generate":
        tgt = torch.randint(3, p["V"], (B, p["T"] + 1), generator=g)
        tgt[:, 0] = BOS
        inputs["tgt_in"], inputs["tgt_out"] = tgt[:, :-1].to(case.device), tgt[:, 1:].to(case.device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4321 + sum(p.values()))
        model = EncoderDecoderTransformer(_config(p))
    for k, v in model.state_dict().items():
        if k not in ("generator.weight", "tgt_embed.weight"):           # tied to src_embed.weight
            inputs["w:" + k] = v.to(device=case.device, dtype=case.dtype)
    return inputs


def _model(case: Case, inputs: dict, core: str) -> EncoderDecoderTransformer:
    """The model in case.dtype with the inputs' weights; ``core="torch"`` swaps in a torch.nn.Transformer."""
    p = case.shape
    m = EncoderDecoderTransformer(_config(p), device=case.device, dtype=case.dtype)
    if core == "torch":
        m.transformer = torch.nn.Transformer(p["E"], p["H"], p["N"], p["N"], p["F"], 0.0, batch_first=True,
                                             device=case.device, dtype=case.dtype)
    state = {k[2:]: v for k, v in inputs.items() if k.startswith("w:")}
    state["tgt_embed.weight"] = state["generator.weight"] = state["src_embed.weight"]
    m.load_state_dict(state, strict=True)
    return m


def _train_step(m: EncoderDecoderTransformer, inputs: dict):
    params = [p for _, p in sorted(m.named_parameters())]
    src, tgt_in, tgt_out = inputs["src"], inputs["tgt_in"], inputs["tgt_out"]
    m.train()

    def step():
        logits = m(src, tgt_in)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tgt_out.reshape(-1))
        return (loss.detach(), *torch.autograd.grad(loss, params))
    return step


def _generate(m: EncoderDecoderTransformer, inputs: dict, G: int, use_cache: bool):
    src = inputs["src"]
    m.eval()
    return lambda: m.generate(src, G, min_new_tokens=G, use_cache=use_cache)


def _factory(core: str, backend=None, use_cache: bool = True):
    def factory(case: Case, inputs: dict):
        m = _model(case, inputs, core)
        if case.mode == "generate":
            fn = _generate(m, inputs, case.shape["G"], use_cache)
        elif case.mode == "fwd+bwd":
            fn = _train_step(m, inputs)
        else:
            raise Skip(f"mode {case.mode} not benchmarked")
        if backend is None:
            return fn

        def run():
            with pyattn.use_backend(backend):
                return fn()
        return run
    return factory


def _refusals(name: str, case: Case) -> list[str]:
    """Why backend ``name`` cannot run this case's attention calls (self/cross, with the padding mask, and the
    one-row steps of generation) or its Add & Norm."""
    p = case.shape
    B, S, E, H = p["B"], p["S"], p["E"], p["H"]
    L = p.get("T", 1)
    grad = case.mode == "fwd+bwd"

    def t(*shape):
        return torch.empty(*shape, device=case.device, dtype=case.dtype).requires_grad_(grad)
    mask = torch.ones(B, 1, 1, S, dtype=torch.bool, device=case.device)
    with torch.enable_grad():
        probes = [attention_inputs(t(B, H, L, E // H), t(B, H, S, E // H), t(B, H, S, E // H), mask),
                  attention_inputs(t(B, H, L, E // H), t(B, H, L, E // H), t(B, H, L, E // H), is_causal=L > 1),
                  norm_inputs(t(B * L, E), (E,), t(E), t(E), residual=t(B * L, E))]
    backend = get_backend(name)
    reasons = []
    for pr in probes:
        for r in backend.not_supported_reasons(pr):
            if r not in reasons:
                reasons.append(r)
    return reasons


def providers_for(ctx: BenchContext):
    # the device's attention priority order first (its head is what pyattn picks by default), then the others
    order = PRIORITY.get(("attention", ctx.device), [])
    names = sorted((name for name, _, _ in pyattn.backends()),
                   key=lambda n: order.index(n) if n in order else len(order))

    def providers(case: Case) -> list[Provider]:
        if case.mode == "generate":
            out = [Provider("torch:nn.Transformer, no KV cache (torch has none)", _factory("torch", use_cache=False),
                            "torch:nn.Transformer-nocache", baseline=True)]
        else:
            out = [Provider("torch:nn.Transformer", _factory("torch"), "torch:nn.Transformer", baseline=True)]
        first = True                      # the default backend also gets a no-cache generation row
        for name in ctx.pyattn_backends(case, lambda n: _refusals(n, case), f"transformer {case.mode}", names):
            if case.mode == "generate":
                out.append(Provider(f"pyattn:{name} KV cache", _factory("pyattn", name), f"pyattn:{name}"))
                if first:
                    out.append(Provider(f"pyattn:{name} no cache", _factory("pyattn", name, use_cache=False),
                                        f"pyattn:{name}-nocache"))
            else:
                out.append(Provider(f"pyattn:{name}", _factory("pyattn", name), f"pyattn:{name}"))
            first = False
        return out
    return providers


def run(ctx: BenchContext) -> list[dict]:
    """Rows for both modes, with ``tokens_per_s`` added; run.py then calls ``ctx.finish(rows, targets())``."""
    all_cases = cases(ctx)
    prov = providers_for(ctx)
    rows = ctx.run_cases([c for c in all_cases if c.mode != "generate"], make_inputs, prov, work_for)
    # generated tokens are compared with the baseline's own fp32 output: a float64 run could break a near-tie
    # between two tokens differently, which would not make either run wrong
    rows += ctx.run_cases([c for c in all_cases if c.mode == "generate"], make_inputs, prov, work_for,
                          reference="baseline")
    for r in rows:
        p = r["params"]
        tokens = p["B"] * (p["G"] if r["mode"] == "generate" else p["T"])
        r["tokens_per_s"] = tokens / (r["p50_ms"] / 1e3)
        what = "generated" if r["mode"] == "generate" else "target (training)"
        ctx.note(f"transformer {r['mode']} {r['shape']} {r['dtype']} {r['provider']}: "
                 f"{r['tokens_per_s']:.0f} {what} tokens/s ({r['p50_ms']:.1f} ms per call)")
    return rows
