"""Attention benchmarks (``pyattn bench --op attention``): throughput vs sequence length.

Cases: (B, H, L, D) self-attention, causal and not, modes fwd / bwd / fwd+bwd.
* GPU: bf16, B*L = 16k tokens, H = 2048 / D heads, D in 64, 128, L in 512 .. 16384 (``--quick``: L 1024, 4096).
* CPU: fp32, B=1, H=8, D=64, L in 1024, 2048, 4096 (``--quick``: 1024), the PERF.md CPU shapes.
* ``attention_masked`` (CPU): the same shapes at L in 1024, 2048 (``--quick``: 1024), non-causal, with a mask (shape
  entry ``mask``): ``pad`` a bool key-padding mask (B, 1, 1, L) hiding the last eighth of the keys, ``full`` an additive
  (B, 1, L, L) float mask (0 / -inf, 10% of the keys hidden at random per query, none of a row's first 8 keys: the
  4-D form Hugging Face models pass).
Providers: every torch SDPA backend forced one by one through ``torch.nn.attention.sdpa_kernel`` (flash, efficient,
cudnn on GPU; flash and math on CPU; a backend torch refuses for a case is noted, not timed), and pyattn's
``scaled_dot_product_attention`` on each pyattn backend that accepts the input (never Triton on CPU, where it only
runs in its interpreter; the pure-torch reference only at L <= 2048, since it forms the L x L matrix).
Baseline: torch's flash backend. FLOPs per PERF.md: 4*B*H*L*L*D forward, halved when causal, x2.5 bwd, x3.5
fwd+bwd. bwd times the backward only (the forward runs in the factory, outside the timed region).

Peak memory (PERF.md "Attention peak memory, L=16384: O(L), not O(L^2)"): on GPU every row carries it
(``peak_mem_mb``). On CPU, separate ``attention_memory`` rows (``metric`` "memory"; CPU only, fp32): the forward pass,
non-causal, B=1, H=1, D=64, L in 4096, 8192, 16384 (``--quick``: 16384; the tests' tiny setting: 512), for torch SDPA
forced to math (the baseline, which forms the L x L matrix) and to flash, and every pyattn backend that accepts the
input on CPU, the pure-torch L x L reference at every L included (never Triton). Each (L, provider) runs in a fresh
Python process (``memory_probe`` through ``harness.run_probe``): it builds the inputs, warms the call up once on
L=64, and reports the peak resident memory one call adds (``harness.cpu_peak_rss``: VmHWM after the call minus VmRSS
before it, after resetting VmHWM through /proc/self/clear_refs; the output counts). ``mem_ref_mb`` is what one
B x H x L x L fp32 matrix takes (1 GiB at L=16384); the table shows the peak and its % of that. A process killed
(out of memory) or timed out is a note. Target: pyattn:cpp at L=16384 below 1/8 of the L x L matrix, i.e. O(L).
Decoding (one query row against a KV cache) is bench_decode.py (``--op decode``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import pyattn
from pyattn.dispatch import get_backend
from pyattn.ops.attention import make_inputs as _attn_inputs

try:
    from .harness import (BenchContext, Case, Provider, Skip, Target, Work, attention_flops, case_from_dict,
                          cpu_peak_rss)
except ImportError:  # run as a plain module from the benchmarks/ folder
    from harness import (BenchContext, Case, Provider, Skip, Target, Work, attention_flops,  # type: ignore
                         case_from_dict, cpu_peak_rss)

MODES = ("fwd", "bwd", "fwd+bwd")
REFERENCE_MAX_L = 2048  # the torch reference backend materialises (B, H, L, L)
MEMORY_OP = "attention_memory"
MASKED_OP = "attention_masked"
MEMORY_WARMUP_L = 64    # the memory probe's warm-up call (libraries loaded, thread pools started) runs at this L


def targets() -> list[Target]:
    """PERF.md attention targets: on GPUs, bf16, D = 128, L >= 4k, causal and not, the forward >= 1.6x the flash
    backend (the baseline) and, per kernel family, >= 1.0x (cuda) / 0.85x (triton) the fastest torch SDPA backend
    (each forced: flash, efficient, cudnn), the backward >= 1.0x the fastest, the forward at L = 512 >= 0.95x the
    fastest; on CPUs against torch's CPU flash."""
    long = lambda p: p["L"] >= 4096 and p["D"] == 128  # noqa: E731
    short = lambda p: p["L"] == 512  # noqa: E731
    cpu = lambda p: p["B"] == 1 and p["H"] == 8 and p["D"] == 64 and 1024 <= p["L"] <= 4096  # noqa: E731
    bf16 = ("bfloat16",)
    gpu = []
    for op in ("attention", "attention_causal"):
        gpu += [
            Target(op, "fwd", "cuda", long, min_speedup=1.6, dtypes=bf16,
                   text="GPU attention fwd vs torch flash backend"),
            Target(op, "fwd", "cuda", long, min_vs_fastest=1.0, dtypes=bf16, kinds=("pyattn:cuda",),
                   text="GPU attention fwd (cuda) vs the fastest torch backend"),
            Target(op, "fwd", "cuda", long, min_vs_fastest=0.85, dtypes=bf16, kinds=("pyattn:triton",),
                   text="GPU attention fwd (triton) vs the fastest torch backend"),
            Target(op, "bwd", "cuda", long, min_vs_fastest=1.0, dtypes=bf16,
                   text="GPU attention bwd vs the fastest torch backend"),
            Target(op, "fwd", "cuda", short, min_vs_fastest=0.95, dtypes=bf16,
                   text="GPU attention fwd, L = 512, vs the fastest torch backend"),
        ]
    return gpu + [
        Target("attention", "fwd", "cpu", cpu, min_speedup=1.0, dtypes=("float32",),
               text="CPU attention fwd (non-causal) vs torch CPU flash"),
        Target("attention_causal", "fwd", "cpu", cpu, min_speedup=1.3, dtypes=("float32",),
               text="CPU attention fwd (causal) vs torch CPU flash"),
        Target(MEMORY_OP, "fwd", "cpu", lambda p: p["L"] == 16384, max_mem_ratio=1 / 8, dtypes=("float32",),
               kinds=("pyattn:cpp",), text="CPU attention peak memory O(L): pyattn:cpp < 1/8 of an L x L fp32 matrix"),
    ]


def cases(ctx: BenchContext) -> list[Case]:
    out = []
    gpu = ctx.device == "cuda"
    # CPU: fp32, and bf16 (on vdpbf16ps where the CPU has AVX512_BF16, else widened to fp32); masks in fp32 only
    for dt in ctx.want([torch.bfloat16] if gpu else [torch.float32, torch.bfloat16]):
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
        if not gpu and dt == torch.float32:
            for mask in ("pad", "full"):
                for mode in MODES:
                    seqs = (32,) if ctx.tiny else (1024,) if ctx.quick else (1024, 2048)
                    for seq in seqs:
                        shape = {"B": 1, "H": 2 if ctx.tiny else 8, "L": seq, "D": 16 if ctx.tiny else 64, "mask": mask}
                        out.append(Case(MASKED_OP, mode, shape, dt, ctx.device, x="L"))
    return out


def make_inputs(case: Case) -> dict:
    B, H, L, D = (case.shape[k] for k in ("B", "H", "L", "D"))
    g = torch.Generator(device="cpu").manual_seed(99 + L + D)
    mk = lambda: torch.randn(B, H, L, D, generator=g).to(device=case.device, dtype=case.dtype)  # noqa: E731
    inputs = {"q": mk(), "k": mk(), "v": mk(), "dout": mk()}
    kind = case.shape.get("mask")
    if kind == "pad":
        keep = torch.ones(B, 1, 1, L, dtype=torch.bool)
        keep[..., L - L // 8:] = False
        inputs["mask"] = keep.to(case.device)
    elif kind == "full":
        hide = torch.rand(B, 1, L, L, generator=g) < 0.1
        hide[..., :8] = False
        inputs["mask"] = torch.zeros(B, 1, L, L).masked_fill(hide, float("-inf")).to(case.device, case.dtype)
    return inputs


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


def _sdpa_attend(backend_name: str, causal: bool, mask=None):
    """``attend(q, k, v)`` through torch SDPA forced to one backend (``SDPBackend`` member name)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    sdp = getattr(SDPBackend, backend_name)

    def attend(q, k, v):
        with sdpa_kernel([sdp]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    return attend


def _pyattn_attend(backend: str, causal: bool, mask=None):
    return lambda q, k, v: pyattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                                               backend=backend)


def _torch_sdpa(backend_name: str):
    def factory(case: Case, inputs: dict):
        attend = _sdpa_attend(backend_name, case.op == "attention_causal", inputs.get("mask"))
        fn = _timed(case, inputs, attend)
        try:
            fn()  # torch raises "No available kernel" when the forced backend cannot take the case
        except RuntimeError as e:
            raise Skip(f"torch SDPA {backend_name} refuses {case.shape_str} {case.dtype}: {str(e).splitlines()[0]}")
        return fn
    return factory


def _pyattn(backend: str):
    def factory(case: Case, inputs: dict):
        return _timed(case, inputs, _pyattn_attend(backend, case.op == "attention_causal", inputs.get("mask")))
    return factory


def _sdpa_backends(device: str) -> tuple:
    return ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION") if device == "cuda" \
        else ("FLASH_ATTENTION", "MATH")


def _sdpa_provider(backend_name: str, baseline: bool) -> Provider:
    return Provider(f"torch:sdpa-{backend_name.split('_')[0].lower()}", _torch_sdpa(backend_name),
                    f"torch:sdpa-{backend_name.lower()}", baseline=baseline)


def _pyattn_backends(ctx: BenchContext, case: Case, reference_max_l=None) -> list[str]:
    """The pyattn backends that accept ``case`` (each refusal is a note): never Triton on CPU; the L x L torch
    reference only up to ``reference_max_l`` (None: always)."""
    p = case.shape
    one = torch.empty(1, device=case.device, dtype=case.dtype)
    q = one.expand(p["B"], p["H"], p.get("Lq", p["L"]), p["D"])
    k = one.expand(p["B"], p.get("Hkv", p["H"]), p["L"], p["D"])
    inputs = _attn_inputs(q, k, k, is_causal=case.op == "attention_causal", enable_gqa="Hkv" in p)

    def refusals(name: str) -> list:
        if name == "torch" and reference_max_l is not None and p["L"] > reference_max_l:
            return [f"the L x L reference is not benchmarked above L={reference_max_l}"]
        return get_backend(name).not_supported_reasons(inputs)
    return ctx.pyattn_backends(case, refusals, "attention")


def providers_for(ctx: BenchContext):
    def providers(case: Case) -> list[Provider]:
        out = [_sdpa_provider(b, baseline=b == "FLASH_ATTENTION") for b in _sdpa_backends(ctx.device)]
        for name in _pyattn_backends(ctx, case, REFERENCE_MAX_L):
            out.append(Provider(f"pyattn:{name}", _pyattn(name), f"pyattn:{name}"))
        return out
    return providers


# ---- CPU peak memory ------------------------------------------------------------------------------------------------

def memory_cases(ctx: BenchContext) -> list[Case]:
    """The ``attention_memory`` cases: CPU, fp32, forward, B=1, H=1, D=64 (none on GPU, whose timed rows carry it)."""
    if ctx.device != "cpu" or not ctx.want([torch.float32]):
        return []
    lengths = (512,) if ctx.tiny else (16384,) if ctx.quick else (4096, 8192, 16384)
    return [Case(MEMORY_OP, "fwd", {"B": 1, "H": 1, "L": seq, "D": 64}, torch.float32, ctx.device, x="L")
            for seq in lengths]


def memory_providers(ctx: BenchContext):
    """torch SDPA forced to math (the baseline: PERF.md's "math attention") and to flash, then every pyattn backend
    that accepts the case, the L x L reference at every L (it is the O(L^2) comparison point). The factories are
    not used: ``memory_probe`` rebuilds the call from the provider's kind in its own process."""
    def providers(case: Case) -> list[Provider]:
        out = [_sdpa_provider("MATH", baseline=True), _sdpa_provider("FLASH_ATTENTION", baseline=False)]
        out += [Provider(f"pyattn:{name}", _pyattn(name), f"pyattn:{name}") for name in _pyattn_backends(ctx, case)]
        return out
    return providers


def lxl_bytes(case: Case) -> float:
    """What one B x H x L x L fp32 attention matrix takes: the O(L^2) reference of the memory rows."""
    B, H, L = (case.shape[k] for k in ("B", "H", "L"))
    return 4.0 * B * H * L * L


def _attend_for_kind(kind: str, causal: bool):
    if kind.startswith("torch:sdpa-"):
        return _sdpa_attend(kind[len("torch:sdpa-"):].upper(), causal)
    if kind.startswith("pyattn:"):
        return _pyattn_attend(kind[len("pyattn:"):], causal)
    raise ValueError(f"unknown attention provider kind {kind!r}")


def memory_probe(case: dict, provider: str) -> dict:
    """Runs in a fresh process (``harness.run_probe``): the peak resident memory that one forward call of
    ``provider`` (a Provider.kind) adds on ``case`` (``harness.case_to_dict``), after one warm-up call at
    L = MEMORY_WARMUP_L. Returns ``harness.cpu_peak_rss``'s dict."""
    case = case_from_dict(case)
    attend = _attend_for_kind(provider, causal=case.op == "attention_causal")
    small = make_inputs(Case(case.op, case.mode, {**case.shape, "L": MEMORY_WARMUP_L}, case.dtype, case.device))
    with torch.no_grad():
        attend(small["q"], small["k"], small["v"])
    del small
    inputs = make_inputs(case)  # kept alive: a freed input (dout) would hand its memory to the output unseen
    q, k, v = inputs["q"], inputs["k"], inputs["v"]

    def call():
        with torch.no_grad():
            return attend(q, k, v)
    return cpu_peak_rss(call)


def run(ctx: BenchContext) -> list[dict]:
    rows = ctx.run_cases(cases(ctx), make_inputs, providers_for(ctx), work_for)
    mem_cases = memory_cases(ctx)
    if mem_cases:
        ctx.note(f"{MEMORY_OP} rows: the forward pass; ref = one B x H x L x L fp32 matrix (what math attention "
                 "forms); O(L) means well below it (target: pyattn:cpp < 1/8 of it at L=16384)")
        rows += ctx.run_memory_cases(mem_cases, memory_providers(ctx), memory_probe, lxl_bytes, work_for)
    return rows
