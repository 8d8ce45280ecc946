"""GRU benchmarks (``pyattn bench --op gru``): single-layer unidirectional GRU over a whole sequence.

Cases (shape B x T x I x H):
* ``gru``: the PERF.md target shapes, B=1 T=200 I=64 H=128 and B=32 T=100 I=H=256 (``--quick`` runs only these);
* ``gru_batch_sweep``: B in 1, 8, 32, 64 at T=100, I=H=256 (x = B);
* ``gru_hidden_sweep``: H = I in 64, 128, 256, 512 at B=32, T=100 (x = H).
Modes: ``fwd`` = inference (eval, no autograd graph); ``fwd+bwd`` = a training step: forward with grad, then the
gradients of (out * dout).sum() w.r.t. the input and every parameter.
Providers: ``torch.nn.GRU`` (the baseline), a ``torch.nn.GRUCell`` loop over the steps, and ``pyattn.nn.GRU`` on
every pyattn backend that accepts the input (``pyattn.use_backend(name)``; on CPU: cpp and torch; Triton is never
benchmarked on CPU, where it only runs in its interpreter). All share the same weights.
FLOPs per PERF.md: 2*B*T*3H*(I+H) forward, x3 for fwd+bwd. After the table, notes give the time per sequence and
per step of each provider on the target shapes.
"""
from __future__ import annotations

import torch

import pyattn
from pyattn.dispatch import get_backend
from pyattn.ops.gru import GRULayerInputs

try:
    from .harness import BenchContext, Case, Provider, Skip, Target, Work, gru_flops
except ImportError:  # run as a plain module from the benchmarks/ folder
    from harness import BenchContext, Case, Provider, Skip, Target, Work, gru_flops  # type: ignore

MODES = ("fwd", "fwd+bwd")
TARGET_SHAPES = ({"B": 1, "T": 200, "I": 64, "H": 128}, {"B": 32, "T": 100, "I": 256, "H": 256})


def targets() -> list[Target]:
    """PERF.md targets, checked on the best pyattn provider of each matching case: the CPU ones, and on a GPU the
    sequence target (B <= 64, H <= 1024: >= 1.0x cuDNN forward, >= 0.9x forward + backward) at both shapes."""
    b1 = lambda p: (p["B"], p["T"], p["I"], p["H"]) == (1, 200, 64, 128)
    b32 = lambda p: (p["B"], p["T"], p["I"], p["H"]) == (32, 100, 256, 256)
    seq_gpu = lambda p: p["B"] <= 64 and p["H"] <= 1024
    f32 = ("float32",)
    return [
        Target("gru", "fwd", "cpu", b1, min_speedup=3.0, dtypes=f32, text="CPU GRU inference vs torch.nn.GRU"),
        Target("gru", "fwd", "cpu", b32, min_speedup=1.2, dtypes=f32, text="CPU GRU inference vs torch.nn.GRU"),
        Target("gru", "fwd+bwd", "cpu", b32, min_speedup=1.0, dtypes=f32,
               text="CPU GRU training step vs torch.nn.GRU"),
        Target("gru", "fwd", "cuda", seq_gpu, min_speedup=1.0, text="GPU GRU sequence vs torch.nn.GRU (cuDNN)"),
        Target("gru", "fwd+bwd", "cuda", seq_gpu, min_speedup=0.9,
               text="GPU GRU training step vs torch.nn.GRU (cuDNN)"),
    ]


def cases(ctx: BenchContext) -> list[Case]:
    out = []
    for dt in ctx.want([torch.float32]):
        for mode in MODES:
            if ctx.tiny:
                out.append(Case("gru", mode, {"B": 2, "T": 5, "I": 8, "H": 16}, dt, ctx.device))
                continue
            for shape in TARGET_SHAPES:
                out.append(Case("gru", mode, dict(shape), dt, ctx.device))
            if ctx.quick:
                continue
            for b in (1, 8, 32, 64):
                out.append(Case("gru_batch_sweep", mode, {"B": b, "T": 100, "I": 256, "H": 256}, dt, ctx.device,
                                x="B"))
            for h in (64, 128, 256, 512):
                out.append(Case("gru_hidden_sweep", mode, {"B": 32, "T": 100, "I": h, "H": h}, dt, ctx.device,
                                x="H"))
    return out


def make_inputs(case: Case) -> dict:
    """x (T, B, I), h0 (1, B, H), dout (T, B, H) and torch.nn.GRU-initialised weights, all top level (so the
    harness's float64 reference converts them too)."""
    B, T, I, H = (case.shape[k] for k in "BTIH")
    g = torch.Generator(device="cpu").manual_seed(4321 + B + T + I + H)
    k = H ** -0.5

    def u(*shape):
        return ((torch.rand(*shape, generator=g) * 2 - 1) * k).to(device=case.device, dtype=case.dtype)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device=case.device, dtype=case.dtype)

    return {"x": randn(T, B, I), "h0": randn(1, B, H), "dout": randn(T, B, H),
            "weight_ih_l0": u(3 * H, I), "weight_hh_l0": u(3 * H, H), "bias_ih_l0": u(3 * H), "bias_hh_l0": u(3 * H)}


def work_for(case: Case) -> Work:
    B, T, I, H = (case.shape[k] for k in "BTIH")
    return Work(gru_flops(B, T, I, H, mode=case.mode), "flop")


def _load(module: torch.nn.Module, inputs: dict, case: Case) -> torch.nn.Module:
    module = module.to(device=case.device, dtype=case.dtype)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(inputs[name])
    return module


def _seq_fn(module: torch.nn.Module, inputs: dict, case: Case, run):
    """The timed callable for a sequence module: ``run(x, h0)`` -> (out (T, B, H), h_n)."""
    x, h0, dout = inputs["x"], inputs["h0"], inputs["dout"]
    params = list(module.parameters())
    if case.mode == "fwd":
        module.eval()

        def fwd():
            with torch.no_grad():
                return run(x, h0)
        return fwd
    if case.mode != "fwd+bwd":
        raise Skip(f"mode {case.mode} not benchmarked")
    module.train()
    xg = x.detach().clone().requires_grad_()

    def step():
        with torch.enable_grad():
            out, _ = run(xg, h0)
            return torch.autograd.grad(out, [xg, *params], dout)
    return step


def _torch_gru(case: Case, inputs: dict):
    m = _load(torch.nn.GRU(case.shape["I"], case.shape["H"]), inputs, case)
    return _seq_fn(m, inputs, case, lambda x, h0: m(x, h0))


def _torch_cell_loop(case: Case, inputs: dict):
    cell = torch.nn.GRUCell(case.shape["I"], case.shape["H"])
    cell = cell.to(device=case.device, dtype=case.dtype)
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(cell, name).copy_(inputs[name + "_l0"])

    def run(x, h0):
        h = h0[0]
        outs = []
        for t in range(x.shape[0]):
            h = cell(x[t], h)
            outs.append(h)
        return torch.stack(outs, 0), h[None]
    return _seq_fn(cell, inputs, case, run)


def _pyattn_gru(backend: str):
    def factory(case: Case, inputs: dict):
        m = _load(pyattn.nn.GRU(case.shape["I"], case.shape["H"]), inputs, case)

        def run(x, h0):
            with pyattn.use_backend(backend):
                return m(x, h0)
        return _seq_fn(m, inputs, case, run)
    return factory


def _refusals(name: str, case: Case) -> list[str]:
    B, I, H = case.shape["B"], case.shape["I"], case.shape["H"]
    probe = lambda *s: torch.empty(*s, device=case.device, dtype=case.dtype)
    inputs = GRULayerInputs(probe(1, B, I), probe(B, H), probe(3 * H, I), probe(3 * H, H), probe(3 * H),
                            probe(3 * H), needs_grad=case.mode != "fwd")
    return get_backend(name).not_supported_reasons(inputs)


def providers_for(ctx: BenchContext):
    names = [name for name, _, _ in pyattn.backends()]

    def providers(case: Case) -> list[Provider]:
        out = [Provider("torch:nn.GRU", _torch_gru, "torch:nn.GRU", baseline=True),
               Provider("torch:GRUCell loop", _torch_cell_loop, "torch:nn.GRUCell-loop")]
        for name in ctx.pyattn_backends(case, lambda n: _refusals(n, case), f"gru {case.mode}", names):
            out.append(Provider(f"pyattn:{name}", _pyattn_gru(name), f"pyattn:{name}"))
        return out
    return providers


def run(ctx: BenchContext) -> list[dict]:
    """The rows (with ``per_seq_ms`` and ``per_step_us`` added); run.py then calls ``ctx.finish(rows, targets())``."""
    rows = ctx.run_cases(cases(ctx), make_inputs, providers_for(ctx), work_for)
    for r in rows:
        p = r["params"]
        r["per_seq_ms"] = r["p50_ms"] / p["B"]
        r["per_step_us"] = r["p50_ms"] * 1e3 / p["T"]
    for r in rows:
        if r["op"] == "gru":
            ctx.note(f"gru {r['mode']} {r['shape']} {r['dtype']} {r['provider']}: {r['per_seq_ms']:.3f} ms/sequence, "
                     f"{r['per_step_us']:.1f} us/step (batch of {r['params']['B']})")
    return rows
