"""Attention decoding benchmarks (``pyattn bench --op decode``): one new query row against a KV cache.

``attention_decode`` rows, forward only: (B, Hq, 1, D) queries against (B, Hkv, L, D) keys and values, GQA through
``enable_gqa=True``. CPU: fp32 and bf16, B=1, Hq=32, Hkv=8 (Llama-style groups of 4) and Hkv=32 (plain
multi-head), D=128, L in 1024, 4096 (``--quick``: 4096, Hkv=8). GPU: bf16, B=8, same heads, L in 4096, 16384.
Memory-bound: reported as GB/s of K and V (and q, out) moved, against PEAK_COPY. Providers as in bench_attention.py
(torch SDPA forced per backend, with enable_gqa; flash the baseline) and every pyattn backend that accepts the case.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import pyattn

try:
    from .bench_attention import _pyattn_backends, _sdpa_backends
    from .harness import BenchContext, Case, Provider, Skip, Work
except ImportError:  # run as a plain module from the benchmarks/ folder
    from bench_attention import _pyattn_backends, _sdpa_backends  # type: ignore
    from harness import BenchContext, Case, Provider, Skip, Work  # type: ignore

DECODE_OP = "attention_decode"


def decode_cases(ctx: BenchContext) -> list[Case]:
    gpu = ctx.device == "cuda"
    if ctx.tiny:
        shapes = [{"B": 1, "H": 4, "Hkv": 2, "Lq": 1, "L": 64, "D": 16}]
    else:
        seqs = ((4096,) if ctx.quick else (4096, 16384)) if gpu else ((4096,) if ctx.quick else (1024, 4096))
        heads = (8,) if ctx.quick else (8, 32)
        shapes = [{"B": 8 if gpu else 1, "H": 32, "Hkv": hkv, "Lq": 1, "L": seq, "D": 128}
                  for hkv in heads for seq in seqs]
    dts = ctx.want([torch.bfloat16] if gpu else [torch.float32, torch.bfloat16, torch.float16])
    return [Case(DECODE_OP, "fwd", shape, dt, ctx.device, x="L") for dt in dts for shape in shapes]


def make_decode_inputs(case: Case) -> dict:
    p = case.shape
    g = torch.Generator(device="cpu").manual_seed(7 + p["L"] + p["Hkv"])
    mk = lambda *s: torch.randn(*s, generator=g).to(device=case.device, dtype=case.dtype)  # noqa: E731
    return {"q": mk(p["B"], p["H"], p["Lq"], p["D"]), "k": mk(p["B"], p["Hkv"], p["L"], p["D"]),
            "v": mk(p["B"], p["Hkv"], p["L"], p["D"])}


def decode_work(case: Case) -> Work:
    p = case.shape
    elems = 2 * p["B"] * p["Hkv"] * p["L"] * p["D"] + 2 * p["B"] * p["H"] * p["Lq"] * p["D"]  # K, V read; q, out
    return Work(elems * torch.empty((), dtype=case.dtype).element_size(), "bytes")


def _decode_factory(attend):
    def factory(case: Case, inputs: dict):
        q, k, v = inputs["q"], inputs["k"], inputs["v"]

        def fwd():
            with torch.no_grad():
                return attend(q, k, v)
        try:
            fwd()
        except RuntimeError as e:  # torch raises "No available kernel" when a forced backend cannot take it
            raise Skip(f"refused {case.shape_str} {case.dtype}: {str(e).splitlines()[0]}")
        return fwd
    return factory


def decode_providers(ctx: BenchContext):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa(name: str):
        sdp = getattr(SDPBackend, name)

        def attend(q, k, v):
            with sdpa_kernel([sdp]):
                return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return attend

    def providers(case: Case) -> list[Provider]:
        out = [Provider(f"torch:sdpa-{b.split('_')[0].lower()}", _decode_factory(sdpa(b)),
                        f"torch:sdpa-{b.lower()}", baseline=b == "FLASH_ATTENTION") for b in _sdpa_backends(ctx.device)]
        for name in _pyattn_backends(ctx, case):
            attend = (lambda be: lambda q, k, v: pyattn.scaled_dot_product_attention(q, k, v, enable_gqa=True,
                                                                                     backend=be))(name)
            out.append(Provider(f"pyattn:{name}", _decode_factory(attend), f"pyattn:{name}"))
        return out
    return providers


def run(ctx: BenchContext) -> list[dict]:
    return ctx.run_cases(decode_cases(ctx), make_decode_inputs, decode_providers(ctx), decode_work)
