"""LayerNorm, RMSNorm and Add & Norm benchmarks (``pyattn bench --op layernorm``).

Cases (M rows x N hidden, swept over N): LayerNorm fwd/bwd, RMSNorm fwd/bwd, Add & Norm fwd
(LN(x + r) returning x + r as well, as pre-norm stacks need it), in float32 and bfloat16 by default.
Providers: every pyattn backend that accepts the input on this device (``backend=<name>``; refusals are printed as
one-line notes; Triton is never benchmarked on CPU, where it only runs in its interpreter) and the torch baselines
``F.layer_norm``, ``F.rms_norm`` and the unfused pair ``s = x + r; F.layer_norm(s)``.
Bwd mode times the backward only: the forward runs once in the factory, then
``torch.autograd.grad(y, (x, weight[, bias]), dy, retain_graph=True)`` is timed.
Bytes per PERF.md: fwd 2*numel*es (Add & Norm +2: residual in, sum out), bwd 3*numel*es.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import pyattn
from pyattn.dispatch import get_backend
from pyattn.ops.layer_norm import make_inputs as _norm_inputs

try:
    from .harness import BenchContext, Case, Provider, Skip, Target, Work, norm_bytes
except ImportError:  # run as a plain module from the benchmarks/ folder
    from harness import BenchContext, Case, Provider, Skip, Target, Work, norm_bytes  # type: ignore

OPS = (("layer_norm", "fwd"), ("layer_norm", "bwd"), ("rms_norm", "fwd"), ("rms_norm", "bwd"),
       ("add_layer_norm", "fwd"))
LN_EPS, RMS_EPS = 1e-5, 1e-6


def sizes(ctx: BenchContext) -> tuple[int, list[int]]:
    if ctx.tiny:
        return 64, [32, 64]
    if ctx.quick:
        return 4096, [1024, 4096]
    ns = [512, 1024, 2048, 4096, 8192] + ([16384] if ctx.device == "cuda" else [])
    return 4096, ns


def targets() -> list[Target]:
    """PERF.md targets, checked on the best pyattn provider of each matching case."""
    at_4096x1024 = lambda p: p["M"] == 4096 and p["N"] == 1024  # noqa: E731
    wide = lambda p: p["N"] >= 4096  # noqa: E731
    both = ("float32", "bfloat16")
    return [
        Target("layer_norm", "fwd", "cpu", at_4096x1024, min_speedup=2.0, dtypes=both,
               text="CPU LayerNorm vs F.layer_norm"),
        Target("add_layer_norm", "fwd", "cpu", at_4096x1024, min_speedup=3.0, dtypes=both,
               text="CPU Add & Norm vs x + r, F.layer_norm"),
        Target("layer_norm", "fwd", "cuda", wide, min_speedup=1.3, min_pct=90.0, dtypes=both,
               text="GPU LayerNorm fwd vs F.layer_norm"),
        Target("layer_norm", "bwd", "cuda", wide, min_speedup=1.3, min_pct=75.0, dtypes=both,
               text="GPU LayerNorm bwd vs torch"),
    ]


def make_inputs(case: Case) -> dict:
    M, N = case.shape["M"], case.shape["N"]
    g = torch.Generator(device="cpu").manual_seed(1234 + N)
    dev, dt = case.device, case.dtype

    def randn(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g) * scale + shift).to(device=dev, dtype=dt)

    inputs = {"x": randn(M, N), "weight": randn(N, scale=0.1, shift=1.0), "bias": randn(N, scale=0.1)}
    if case.op == "add_layer_norm":
        inputs["residual"] = randn(M, N)
    if case.mode == "bwd":
        inputs["dy"] = randn(M, N)
    return inputs


def work_for(case: Case) -> Work:
    M, N = case.shape["M"], case.shape["N"]
    extra = 2 if case.op == "add_layer_norm" else 0   # residual read + sum written
    return Work(norm_bytes(M * N, torch.empty((), dtype=case.dtype).element_size(), case.mode, extra), "bytes")


# ---- the timed calls ------------------------------------------------------------------------------------------

def _fwd(op: str, inputs: dict, backend=None, torch_ref: bool = False):
    """The forward of ``op`` on ``inputs``: pyattn with ``backend`` or the torch baseline. Returns a callable."""
    x, w, b, r = inputs["x"], inputs["weight"], inputs["bias"], inputs.get("residual")
    n = (x.shape[-1],)
    if torch_ref:
        if op == "layer_norm":
            return lambda x=x: F.layer_norm(x, n, w, b, LN_EPS)
        if op == "rms_norm":
            return lambda x=x: F.rms_norm(x, n, w, RMS_EPS)

        def add_norm(x=x):
            s = x + r
            return F.layer_norm(s, n, w, b, LN_EPS), s
        return add_norm
    if op == "layer_norm":
        return lambda x=x: pyattn.layer_norm(x, n, w, b, LN_EPS, backend=backend)
    if op == "rms_norm":
        return lambda x=x: pyattn.rms_norm(x, n, w, RMS_EPS, backend=backend)
    return lambda x=x: pyattn.layer_norm(x, n, w, b, LN_EPS, residual=r, return_residual=True, backend=backend)


def _factory(backend=None, torch_ref: bool = False):
    def factory(case: Case, inputs: dict):
        if case.mode == "fwd":
            return _fwd(case.op, inputs, backend, torch_ref)
        if case.mode != "bwd" or case.op == "add_layer_norm":
            raise Skip(f"mode {case.mode} not benchmarked for {case.op}")
        leaves = {k: inputs[k].detach().requires_grad_() for k in ("x", "weight", "bias")}
        if case.op == "rms_norm":
            del leaves["bias"]
        fwd = _fwd(case.op, {**inputs, **leaves}, backend, torch_ref)
        with torch.enable_grad():
            y = fwd()
        dy = inputs["dy"]
        wrt = tuple(leaves.values())
        return lambda: torch.autograd.grad(y, wrt, dy, retain_graph=True)
    return factory


def _refusals(name: str, case: Case, inputs: dict) -> list[str]:
    x, r = inputs["x"], inputs.get("residual")
    rms = case.op == "rms_norm"
    ni = _norm_inputs(x, (x.shape[-1],), inputs["weight"], None if rms else inputs["bias"],
                      RMS_EPS if rms else LN_EPS, residual=r, rms=rms)
    return get_backend(name).not_supported_reasons(ni)


def providers_for(ctx: BenchContext):
    names = [name for name, _, _ in pyattn.backends()]

    def providers(case: Case) -> list[Provider]:
        base = {"layer_norm": ("torch:F.layer_norm", "torch:F.layer_norm"),
                "rms_norm": ("torch:F.rms_norm", "torch:F.rms_norm"),
                "add_layer_norm": ("torch:x+r,F.layer_norm", "torch:add+F.layer_norm")}[case.op]
        out = [Provider(base[0], _factory(torch_ref=True), base[1], baseline=True)]
        probe = make_inputs(Case(case.op, case.mode, {"M": 1, "N": case.shape["N"]}, case.dtype, case.device))
        for name in ctx.pyattn_backends(case, lambda n: _refusals(n, case, probe), case.op, names):
            out.append(Provider(f"pyattn:{name}", _factory(backend=name), f"pyattn:{name}"))
        return out
    return providers


def cases(ctx: BenchContext) -> list[Case]:
    M, ns = sizes(ctx)
    out = []
    for dt in ctx.want([torch.float32, torch.bfloat16]):
        for op, mode in OPS:
            for n in ns:
                out.append(Case(op, mode, {"M": M, "N": n}, dt, ctx.device, x="N"))
    return out


def run(ctx: BenchContext) -> list[dict]:
    """The rows; run.py then calls ``ctx.finish(rows, targets())`` (ceilings re-measured, targets marked)."""
    return ctx.run_cases(cases(ctx), make_inputs, providers_for(ctx), work_for)
