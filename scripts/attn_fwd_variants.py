"""The CUDA attention forward's kernels side by side on one GPU, in one process: pyattn's cuda backend with each
kernel the environment variable PYATTN_CUDA_ATTN_SM90 selects (unset: the Hopper warp-specialized wgmma kernel,
csrc/cuda/attention_sm90.cu, as fwd_sm90 configures it: persistent, causal tiles from the dynamic scheduler; "wsd":
that configuration named; "ws1": a block per tile; "wsp": persistent with causal tiles round-robin; "ws128": key
blocks of 128 at non-causal HD 128 too (the default there has 176); "cp": the cp.async wgmma kernel; "0": the mma.sync
kernel of attention.cu; "-l2off": with PYATTN_CUDA_ATTN_L2=0, causal tiles level by level over all heads instead of
in L2 sections of heads), the Triton backend, and torch's SDPA backends (flash, cudnn), bf16, B * L = 16k tokens,
2048 / D heads (bench_attention.py's GPU shapes). Each pyattn variant is first checked against torch's flash output
(max abs error, printed; a variant off by more than 2e-2 is marked WRONG and the exit status is 1).
TFLOP/s = 4 B H L^2 D / time (halved when causal), the median of interleaved rounds' medians of CUDA-event timings
with the L2 flushed (compare, benchmarks/harness.measure).

    python scripts/attn_fwd_variants.py [--L 4096 1024] [--D 64 128] [--rounds 3] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.harness import attention_flops, measure  # noqa: E402

import pyattn  # noqa: E402

SM90 = "PYATTN_CUDA_ATTN_SM90"
# (the first is the default; "wsd" names the default's configuration: the same kernel timed twice, a noise check)
VARIANTS = {"cuda:wgmma-ws": {}, "cuda:wgmma-ws-l2off": {"PYATTN_CUDA_ATTN_L2": "0"}, "cuda:wgmma-ws1": {SM90: "ws1"},
            "cuda:wgmma-wsp": {SM90: "wsp"}, "cuda:wgmma-wsd": {SM90: "wsd"}, "cuda:wgmma-ws128": {SM90: "ws128"},
            "cuda:wgmma-cp": {SM90: "cp"}, "cuda:mma.sync": {SM90: "0"}}
# the environment variables the variants set (each call unsets those it does not set)
ENV_VARS = ("PYATTN_CUDA_ATTN_SM90", "PYATTN_CUDA_ATTN_SM90_BWD", "PYATTN_CUDA_ATTN_L2")


def set_env(env):
    """Sets the variables of `env` ({name: value}) and unsets the other ENV_VARS."""
    for name in ENV_VARS:
        if name in env:
            os.environ[name] = env[name]
        else:
            os.environ.pop(name, None)


def sdpa(backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    be = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]

    def run(q, k, v, causal):
        with sdpa_kernel(be):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return run


def pyattn_fn(backend, env):
    """pyattn's attention on `backend` under the environment `env` ({name: value}; set_env) set first (and kept as
    the function's .env)."""
    def run(q, k, v, causal):
        set_env(env)
        return pyattn.scaled_dot_product_attention(q, k, v, is_causal=causal, backend=backend)
    run.env = env  # (attn_bwd_variants.py sets it again before each timed backward)
    return run


def compare(args, providers, mode, make_inputs, check) -> int:
    """Each provider on bench_attention.py's GPU shapes (bf16, B * L = 16k tokens, 2048 / D heads), both causal
    settings: a printed row each (TFLOP/s by PERF.md's count for `mode`, x torch flash, the error `check` reports;
    a pyattn row off by more than 2e-2 is marked WRONG), written to args.json when given. make_inputs(B, H, L, D,
    generator) -> the inputs; check(fn, inputs, causal, state) -> (error, call), state a dict shared by the
    providers of one shape (the first one's result is the reference), call() the work to time. The providers are
    timed in args.rounds interleaved rounds (each a median of CUDA-event timings over 0.5 s / rounds): a row's time is
    the median of its rounds' and "spread" is (slowest - fastest round) / that, so a slow drift of the GPU's clocks
    reaches every provider alike (one kernel timed under two names in one pass once differed by 3%).
    Returns 1 if a row was WRONG, else 0."""
    sys.stdout.reconfigure(line_buffering=True)  # each row reaches the log even if a timeout kills the run
    rows, bad = [], 0
    print(f"{torch.cuda.get_device_name(0)}  torch {torch.__version__}  {args.rounds} rounds")
    print(f"{'L':>6} {'D':>4} {'causal':>6}  {'provider':<24} {'ms':>8} {'TFLOP/s':>8} {'x flash':>8} {'max err':>9} "
          f"{'spread':>7}")
    for L in args.L:
        for D in args.D:
            B, H = max(1, 16384 // L), 2048 // D
            inputs = make_inputs(B, H, L, D, torch.Generator(device="cuda").manual_seed(L + D))
            for causal in (False, True):
                flops = attention_flops(B, H, L, L, D, causal=causal, mode=mode)
                state, checked = {}, {}
                for name, fn in providers.items():
                    try:
                        checked[name] = check(fn, inputs, causal, state)
                    except Exception as e:  # noqa: BLE001 - a refused provider is reported, not fatal
                        print(f"{L:>6} {D:>4} {causal!s:>6}  {name:<24} refused: {str(e).splitlines()[0][:80]}")
                times = {name: [] for name in checked}
                for _ in range(args.rounds):
                    for name, (_, call) in checked.items():
                        times[name].append(measure(call, "cuda", memory=False, min_time=0.5 / args.rounds).p50)
                base = statistics.median(times["torch:flash"]) if "torch:flash" in times else None
                for name, (err, _) in checked.items():
                    t = statistics.median(times[name])
                    spread = (max(times[name]) - min(times[name])) / t
                    wrong = name.startswith("pyattn:") and not err <= 2e-2
                    bad += wrong
                    rows.append({"L": L, "D": D, "B": B, "H": H, "causal": causal, "provider": name, "ms": t * 1e3,
                                 "tflops": flops / t / 1e12, "vs_flash": base / t if base else None, "max_err": err,
                                 "rounds_ms": [x * 1e3 for x in times[name]]})
                    print(f"{L:>6} {D:>4} {causal!s:>6}  {name:<24} {t * 1e3:8.3f} {flops / t / 1e12:8.1f} "
                          f"{(base / t if base else float('nan')):8.2f} {err:9.2e} {spread:6.1%}"
                          f"{'  WRONG' if wrong else ''}")
                del checked  # (the backward's calls hold their forward graphs)
    set_env({})
    if args.json:
        with open(args.json, "w") as f:
            # "timings", not "rows": not `pyattn bench` output (scripts/results_table.py skips it)
            json.dump({"device": torch.cuda.get_device_name(0), "timings": rows}, f, indent=1)
    return 1 if bad else 0


def parse_args(lengths=(4096,)):
    ap = argparse.ArgumentParser(description=sys.modules["__main__"].__doc__.splitlines()[0])
    ap.add_argument("--L", type=int, nargs="+", default=list(lengths))
    ap.add_argument("--D", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (compare)")
    ap.add_argument("--json", help="write the rows here")
    return ap.parse_args()


def main() -> int:
    providers = {"torch:flash": sdpa("flash"), "torch:cudnn": sdpa("cudnn"),
                 "pyattn:triton": pyattn_fn("triton", {})}
    providers.update({f"pyattn:{name}": pyattn_fn("cuda", env) for name, env in VARIANTS.items()})

    def make_inputs(B, H, L, D, g):
        return tuple(torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))

    def check(fn, inputs, causal, state):  # max abs error against torch flash's output
        if "ref" not in state:
            state["ref"] = sdpa("flash")(*inputs, causal).float()
        err = (fn(*inputs, causal).float() - state["ref"]).abs().max().item()
        return err, lambda: fn(*inputs, causal)

    # (L = 1024 too: a tile there has a quarter of the key blocks, so what a tile costs beyond them, launch, Q load,
    # pipeline ramp, epilogue, weighs four times as much; that is where persistent grids should pay)
    return compare(parse_args((4096, 1024)), providers, "fwd", make_inputs, check)


if __name__ == "__main__":
    sys.exit(main())
