"""Attention benchmarks (``pyattn bench --op attention``): throughput vs sequence length.

Cases: (B, H, L, D) self-attention, causal and not, modes fwd / bwd / fwd+bwd.
* GPU: bf16, B*L = 16k tokens, H = 2048 / D heads, D in 64, 128, L in 512 .. 16384 (``--quick``: L 1024, 4096).
* CPU: fp32, B=1, H=8, D=64, L in 1024, 2048, 4096 (``--quick``: 1024), the PERF.md CPU shapes.
Providers: every torch SDPA backend forced one by one through ``torch.nn.attention.sdpa_kernel`` (flash, efficient,
cudnn on GPU; flash and math on CPU; a backend torch refuses for a case is noted, not timed), and pyattn's
``scaled_dot_product_attention`` on each pyattn backend that accepts the input (never Triton on CPU, where it only
runs in its interpreter; the pure-torch reference only at L <= 2048, since it forms the L x L matrix).
Baseline: torch's flash backend. FLOPs per PERF.md: 4*B*H*L*L*D forward, halved when causal, x2.5 bwd, x3.5
fwd+bwd. bwd times the backward only (the forward runs in the factory, outside the timed region).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import pyattn
from pyattn.dispatch import get_backend
from pyattn.ops.attention import make_inputs as _attn_inputs

try:
    from .harness import BenchContext, Case, Provider, Skip, Target, Work, attention_flops
except ImportError:  # run as a plain module from the benchmarks/ folder
    from harness import BenchContext, Case, Provider, Skip, Target, Work, attention_flops  # type: ignore

MODES = ("fwd", "bwd", "fwd+bwd")
REFERENCE_MAX_L = 2048  # the torch reference backend materialises (B, H, L, L)


def targets() -> list[Target]:
    """PERF.md attention targets (checked on the best pyattn provider against the flash baseline)."""
    long = lambda p: p["L"] >= 4096 and p["D"] == 128  # noqa: E731
    cpu = lambda p: p["B"] == 1 and p["H"] == 8 and p["D"] == 64 and 1024 <= p["L"] <= 4096  # noqa: E731
    return [
        Target("attention", "fwd", "cuda", long, min_speedup=1.6, dtypes=("bfloat16",),
               text="GPU attention fwd vs torch flash backend"),
        Target("attention", "fwd", "cpu", cpu, min_speedup=1.0, dtypes=("float32",),
               text="CPU attention fwd (non-causal) vs torch CPU flash"),
        Target("attention_causal", "fwd", "cpu", cpu, min_speedup=1.3, dtypes=("float32",),
               text="CPU attention fwd (causal) vs torch CPU flash"),
    ]


def cases(ctx: BenchContext) -> list[Case]:
    out = []
    gpu = ctx.device == "cuda"
    for dt in ctx.want([torch.bfloat16] if gpu else [torch.float32]):
        for causal in (False, True):
            op = "attention_causal" if causal else "attention"
            for mode in MODES:
                if ctx.tiny:
                    out.append(Case(op, mode, {"B": 1, "H": 2, "L": 32, "D": 16}, dt, ctx.device, x="L"))
                    continue
                if gpu:
                    for d in (64, 128):
                        for seq in ((1024, 4096) if ctx.quick else (512, 1024, 2048, 4096, 8192, 16384)):
                            out.append(Case(op, mode, {"B": max(1, 16384 // seq), "H": 2048 // d, "L": seq, "D": d},
                                            dt, ctx.device, x="L"))
                else:
                    for seq in ((1024,) if ctx.quick else (1024, 2048, 4096)):
                        out.append(Case(op, mode, {"B": 1, "H": 8, "L": seq, "D": 64}, dt, ctx.device, x="L"))
    return out


def make_inputs(case: Case) -> dict:
    B, H, L, D = (case.shape[k] for k in ("B", "H", "L", "D"))
    g = torch.Generator(device="cpu").manual_seed(99 + L + D)
    mk = lambda: torch.randn(B, H, L, D, generator=g).to(device=case.device, dtype=case.dtype)  # noqa: E731
    return {"q": mk(), "k": mk(), "v": mk(), "dout": mk()}


def work_for(case: Case) -> Work:
    B, H, L, D = (case.shape[k] for k in ("B", "H", "L", "D"))
    return Work(attention_flops(B, H, L, L, D, causal=case.op == "attention_causal", mode=case.mode), "flop")


def _timed(case: Case, inputs: dict, attend):
    """The timed callable for ``attend(q, k, v) -> out`` in the case's mode."""
    q, k, v, dout = inputs["q"], inputs["k"], inputs["v"], inputs["dout"]
    if case.mode == "fwd":
        def fwd():
            with torch.no_grad():
                return attend(q, k, v)
        return fwd
    qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
    if case.mode == "bwd":
        out = attend(qg, kg, vg)

        def bwd():
            return torch.autograd.grad(out, (qg, kg, vg), dout, retain_graph=True)
        return bwd

    def fwd_bwd():
        return torch.autograd.grad(attend(qg, kg, vg), (qg, kg, vg), dout)
    return fwd_bwd


def _torch_sdpa(backend_name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    sdp = getattr(SDPBackend, backend_name)

    def factory(case: Case, inputs: dict):
        causal = case.op == "attention_causal"

        def attend(q, k, v):
            with sdpa_kernel([sdp]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        fn = _timed(case, inputs, attend)
        try:
            fn()  # torch raises "No available kernel" when the forced backend cannot take the case
        except RuntimeError as e:
            raise Skip(f"torch SDPA {backend_name} refuses {case.shape_str} {case.dtype}: {str(e).splitlines()[0]}")
        return fn
    return factory


def _pyattn(backend: str):
    def factory(case: Case, inputs: dict):
        causal = case.op == "attention_causal"
        return _timed(case, inputs, lambda q, k, v: pyattn.scaled_dot_product_attention(
            q, k, v, is_causal=causal, backend=backend))
    return factory


def providers_for(ctx: BenchContext):
    names = [name for name, _, _ in pyattn.backends()]
    torch_backends = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION") if ctx.device == "cuda" \
        else ("FLASH_ATTENTION", "MATH")

    def providers(case: Case) -> list[Provider]:
        out = [Provider(f"torch:sdpa-{b.split('_')[0].lower()}", _torch_sdpa(b), f"torch:sdpa-{b.lower()}",
                        baseline=b == "FLASH_ATTENTION") for b in torch_backends]
        probe = {k: torch.empty(1, device=case.device, dtype=case.dtype).expand(
            case.shape["B"], case.shape["H"], case.shape["L"], case.shape["D"]) for k in "qkv"}
        inputs = _attn_inputs(probe["q"], probe["k"], probe["v"], is_causal=case.op == "attention_causal")
        for name in names:
            if name == "triton" and case.device == "cpu":
                ctx.note("pyattn:triton not benchmarked on CPU (it only runs in the Triton interpreter there)")
                continue
            if name == "torch" and case.shape["L"] > REFERENCE_MAX_L:
                ctx.note(f"pyattn:torch (the L x L reference) not benchmarked above L={REFERENCE_MAX_L}")
                continue
            reasons = get_backend(name).not_supported_reasons(inputs)
            if reasons:
                ctx.note(f"pyattn:{name} not benchmarked for attention on {case.device}: " + "; ".join(reasons))
                continue
            out.append(Provider(f"pyattn:{name}", _pyattn(name), f"pyattn:{name}"))
        return out
    return providers


def run(ctx: BenchContext) -> list[dict]:
    return ctx.run_cases(cases(ctx), make_inputs, providers_for(ctx), work_for)
