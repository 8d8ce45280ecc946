"""GRU benchmarks (``pyattn bench --op gru``): single-layer unidirectional GRU over a whole sequence, and one GRU
cell step.

Cases (shape B x T x I x H, or B x I x H for the cell):
* ``gru``: the PERF.md target shapes, B=1 T=200 I=64 H=128 and B=32 T=100 I=H=256 (``--quick`` runs only these);
* ``gru_batch_sweep``: B in 1, 8, 32, 64 at T=100, I=H=256 (x = B);
* ``gru_hidden_sweep``: H = I in 64, 128, 256, 512 at B=32, T=100 (x = H);
* ``gru_packed``: B=32 sequences of lengths T=100 down to 26 (all different, in a fixed shuffled order) as a
  PackedSequence (``pack_padded_sequence(..., enforce_sorted=False)``, packed once outside the timed call),
  I=H=256, fp32 (also in ``--quick``): pyattn runs one layer call per run of equal batch size, here 32;
* ``gru_cell``: one step of ``GRUCell``, B in 1, 32, 256 at I=H=256 and B=64 at I=H=1024 (``--quick``: B=1 and 32
  at I=H=256); PERF.md's GPU cell target (>= 1.5x torch.nn.GRUCell) applies to its forward.
dtypes: fp32; on CPU also bf16 (``gru`` and ``gru_cell`` cases; the sweeps are fp32 only).
Modes: ``fwd`` = inference (eval, no autograd graph); ``fwd+bwd`` = a training step: forward with grad, then the
gradients of (out * dout).sum() w.r.t. the input (and the cell's hidden state) and every parameter.
Providers: ``torch.nn.GRU`` (the baseline), a ``torch.nn.GRUCell`` loop over the steps, and ``pyattn.nn.GRU`` on
every pyattn backend that accepts the input (``pyattn.use_backend(name)``; on CPU: cpp and torch; Triton is never
benchmarked on CPU, where it only runs in its interpreter); for the cell, ``torch.nn.GRUCell`` (the baseline) and
``pyattn.nn.GRUCell`` per backend. All share the same weights.
FLOPs per PERF.md: 2*B*T*3H*(I+H) forward (T = 1 for the cell; B*T = the sum of the lengths for packed input), x3
for fwd+bwd. After the table, notes give the
time per sequence and per step of each provider on the target shapes.
"""
from __future__ import annotations

import torch

import pyattn
from pyattn.dispatch import get_backend
from pyattn.ops.gru import GRUCellInputs, GRULayerInputs

try:
    from .harness import BenchContext, Case, Provider, Skip, Target, Work, gru_flops
except ImportError:  # run as a plain module from the benchmarks/ folder
    from harness import BenchContext, Case, Provider, Skip, Target, Work, gru_flops  # type: ignore

MODES = ("fwd", "fwd+bwd")
TARGET_SHAPES = ({"B": 1, "T": 200, "I": 64, "H": 128}, {"B": 32, "T": 100, "I": 256, "H": 256})
PACKED_SHAPE = {"B": 32, "T": 100, "I": 256, "H": 256}
CELL_SHAPES = ({"B": 1, "I": 256, "H": 256}, {"B": 32, "I": 256, "H": 256}, {"B": 256, "I": 256, "H": 256},
               {"B": 64, "I": 1024, "H": 1024})


def targets() -> list[Target]:
    """PERF.md targets, checked on the best pyattn provider of each matching case: the CPU ones, and on a GPU the
    sequence target (B <= 64, H <= 1024: >= 1.0x cuDNN forward, >= 0.9x forward + backward) at both shapes and the
    cell step target (>= 1.5x torch.nn.GRUCell, forward) at every cell shape."""
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
        Target("gru_cell", "fwd", "cuda", lambda p: True, min_speedup=1.5,
               text="GPU GRU cell step vs torch.nn.GRUCell"),
    ]


def cases(ctx: BenchContext) -> list[Case]:
    out = []
    gpu = ctx.device == "cuda"
    # CPU: fp32, and bf16 (the cpp kernels' GEMMs on vdpbf16ps where the CPU has AVX512_BF16) without the sweeps
    for dt in ctx.want([torch.float32] if gpu else [torch.float32, torch.bfloat16]):
        for mode in MODES:
            if ctx.tiny:
                out.append(Case("gru", mode, {"B": 2, "T": 5, "I": 8, "H": 16}, dt, ctx.device))
                out.append(Case("gru_cell", mode, {"B": 2, "I": 8, "H": 16}, dt, ctx.device))
                out.append(Case("gru_packed", mode, {"B": 3, "T": 5, "I": 8, "H": 16}, dt, ctx.device))
                continue
            for shape in TARGET_SHAPES:
                out.append(Case("gru", mode, dict(shape), dt, ctx.device))
            if dt == torch.float32:
                out.append(Case("gru_packed", mode, dict(PACKED_SHAPE), dt, ctx.device))
            for shape in CELL_SHAPES[:2] if ctx.quick else CELL_SHAPES:
                out.append(Case("gru_cell", mode, dict(shape), dt, ctx.device))
            if ctx.quick or dt != torch.float32:
                continue
            for b in (1, 8, 32, 64):
                out.append(Case("gru_batch_sweep", mode, {"B": b, "T": 100, "I": 256, "H": 256}, dt, ctx.device,
                                x="B"))
            for h in (64, 128, 256, 512):
                out.append(Case("gru_hidden_sweep", mode, {"B": 32, "T": 100, "I": h, "H": h}, dt, ctx.device,
                                x="H"))
    return out


def packed_lengths(B: int, T: int) -> torch.Tensor:
    """B sequence lengths from T down to about T / 4, all different while T allows, in a fixed shuffled order."""
    lens = [T - (i * (3 * T // 4)) // max(B - 1, 1) for i in range(B)]
    perm = torch.randperm(B, generator=torch.Generator().manual_seed(B * 1000 + T)).tolist()
    return torch.tensor([lens[i] for i in perm])


def make_inputs(case: Case) -> dict:
    """x (T, B, I), h0 (1, B, H), dout (T, B, H) and torch.nn.GRU-initialised weights, all top level (so the
    harness's float64 reference converts them too); for the cell: x (B, I), hx (B, H), dout (B, H) and the weights
    under GRUCell's parameter names; for packed input also ``lengths`` (B,) and dout (sum of lengths, H)."""
    B, I, H = (case.shape[k] for k in "BIH")
    T = case.shape.get("T", 1)
    g = torch.Generator(device="cpu").manual_seed(4321 + B + T + I + H)
    k = H ** -0.5

    def u(*shape):
        return ((torch.rand(*shape, generator=g) * 2 - 1) * k).to(device=case.device, dtype=case.dtype)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device=case.device, dtype=case.dtype)

    inputs = {"x": randn(T, B, I), "h0": randn(1, B, H), "dout": randn(T, B, H),
              "weight_ih_l0": u(3 * H, I), "weight_hh_l0": u(3 * H, H), "bias_ih_l0": u(3 * H), "bias_hh_l0": u(3 * H)}
    if case.op == "gru_packed":
        inputs["lengths"] = packed_lengths(B, T)
        inputs["dout"] = randn(int(inputs["lengths"].sum()), H)
    if case.op == "gru_cell":
        inputs = {"x": inputs["x"][0], "hx": inputs["h0"][0], "dout": inputs["dout"][0],
                  **{name[:-3]: t for name, t in inputs.items() if name.endswith("_l0")}}
    return inputs


def work_for(case: Case) -> Work:
    B, I, H = (case.shape[k] for k in "BIH")
    T = case.shape.get("T", 1)
    if case.op == "gru_packed":
        B, T = int(packed_lengths(B, T).sum()), 1
    return Work(gru_flops(B, T, I, H, mode=case.mode), "flop")


def _load(module: torch.nn.Module, inputs: dict, case: Case) -> torch.nn.Module:
    module = module.to(device=case.device, dtype=case.dtype)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(inputs[name])
    return module


def _timed(module: torch.nn.Module, case: Case, fwd, grads):
    """The timed callable of ``case.mode``: "fwd" runs ``fwd()`` without autograd (module in eval mode),
    "fwd+bwd" runs ``grads()`` with it (train mode)."""
    if case.mode == "fwd":
        module.eval()

        def run_fwd():
            with torch.no_grad():
                return fwd()
        return run_fwd
    if case.mode != "fwd+bwd":
        raise Skip(f"mode {case.mode} not benchmarked")
    module.train()

    def step():
        with torch.enable_grad():
            return grads()
    return step


def _seq_fn(module: torch.nn.Module, inputs: dict, case: Case, run):
    """The timed callable for a sequence module: ``run(x, h0)`` -> (out (T, B, H), h_n)."""
    x, h0, dout = inputs["x"], inputs["h0"], inputs["dout"]
    params = list(module.parameters())
    xg = x.detach().clone().requires_grad_()
    return _timed(module, case, lambda: run(x, h0), lambda: torch.autograd.grad(run(xg, h0)[0], [xg, *params], dout))


def _packed_fn(module: torch.nn.Module, inputs: dict, case: Case, run):
    """The timed callable for packed input: ``run(packed, h0)`` -> (packed out, h_n); gradients of
    (out.data * dout).sum() w.r.t. the packed input rows and every parameter."""
    from torch.nn.utils.rnn import pack_padded_sequence

    packed = pack_padded_sequence(inputs["x"], inputs["lengths"], enforce_sorted=False)
    packed_g = packed._replace(data=packed.data.detach().clone().requires_grad_())
    params = list(module.parameters())
    return _timed(module, case, lambda: run(packed, inputs["h0"]),
                  lambda: torch.autograd.grad(run(packed_g, inputs["h0"])[0].data, [packed_g.data, *params],
                                              inputs["dout"]))


def _torch_gru(case: Case, inputs: dict):
    m = _load(torch.nn.GRU(case.shape["I"], case.shape["H"]), inputs, case)
    return (_packed_fn if case.op == "gru_packed" else _seq_fn)(m, inputs, case, lambda x, h0: m(x, h0))


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


def _cell_fn(cell_cls, backend=None):
    """Factory of the timed callable for one GRU cell step: ``cell(x, hx)`` -> h' (B, H); fwd+bwd also takes the
    gradients w.r.t. x, hx and every parameter."""
    def factory(case: Case, inputs: dict):
        cell = _load(cell_cls(case.shape["I"], case.shape["H"]), inputs, case)
        x, hx, dout = inputs["x"], inputs["hx"], inputs["dout"]

        def run(x, hx):
            if backend is None:
                return cell(x, hx)
            with pyattn.use_backend(backend):
                return cell(x, hx)
        xg, hg = x.detach().clone().requires_grad_(), hx.detach().clone().requires_grad_()
        params = list(cell.parameters())
        return _timed(cell, case, lambda: run(x, hx), lambda: torch.autograd.grad(run(xg, hg), [xg, hg, *params], dout))
    return factory


def _pyattn_gru(backend: str):
    def factory(case: Case, inputs: dict):
        m = _load(pyattn.nn.GRU(case.shape["I"], case.shape["H"]), inputs, case)

        def run(x, h0):
            with pyattn.use_backend(backend):
                return m(x, h0)
        return (_packed_fn if case.op == "gru_packed" else _seq_fn)(m, inputs, case, run)
    return factory


def _refusals(name: str, case: Case) -> list[str]:
    B, I, H = case.shape["B"], case.shape["I"], case.shape["H"]
    probe = lambda *s: torch.empty(*s, device=case.device, dtype=case.dtype)
    x = probe(B, I) if case.op == "gru_cell" else probe(1, B, I)
    kind = GRUCellInputs if case.op == "gru_cell" else GRULayerInputs
    inputs = kind(x, probe(B, H), probe(3 * H, I), probe(3 * H, H), probe(3 * H), probe(3 * H),
                  needs_grad=case.mode != "fwd")
    return get_backend(name).not_supported_reasons(inputs)


def providers_for(ctx: BenchContext):
    names = [name for name, _, _ in pyattn.backends()]

    def providers(case: Case) -> list[Provider]:
        if case.op == "gru_cell":
            out = [Provider("torch:nn.GRUCell", _cell_fn(torch.nn.GRUCell), "torch:nn.GRUCell", baseline=True)]
            for name in ctx.pyattn_backends(case, lambda n: _refusals(n, case), f"gru_cell {case.mode}", names):
                out.append(Provider(f"pyattn:{name}", _cell_fn(pyattn.nn.GRUCell, name), f"pyattn:{name}"))
            return out
        out = [Provider("torch:nn.GRU", _torch_gru, "torch:nn.GRU", baseline=True)]
        if case.op != "gru_packed":
            out.append(Provider("torch:GRUCell loop", _torch_cell_loop, "torch:nn.GRUCell-loop"))
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
        r["per_step_us"] = r["p50_ms"] * 1e3 / p.get("T", 1)
    for r in rows:
        if r["op"] == "gru":
            ctx.note(f"gru {r['mode']} {r['shape']} {r['dtype']} {r['provider']}: {r['per_seq_ms']:.3f} ms/sequence, "
                     f"{r['per_step_us']:.1f} us/step (batch of {r['params']['B']})")
    return rows
