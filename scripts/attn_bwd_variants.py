"""The CUDA attention backward's kernels side by side on one GPU, in one process: pyattn's cuda backend with the
Hopper wgmma backward (csrc/cuda/attention_sm90_bwd.cu; the default on compute capability 9.0), with its
warp-specialized dK / dV kernel (PYATTN_CUDA_ATTN_SM90_BWD=ws; =fused: also adding dQ with atomics, no dQ kernel) and
with the mma.sync kernels of attention.cu (=0), the Triton backend, and torch's SDPA backends (flash, cudnn), bf16,
B * L = 16k tokens, 2048 / D heads (bench_attention.py's GPU shapes). Only the backward is timed
(torch.autograd.grad of a forward built once per provider). Each pyattn variant's dq, dk, dv are first checked against
torch flash's (max abs error over max |flash|, printed; above 2e-2 the row is marked WRONG and the exit status is 1).
TFLOP/s = 2.5 x the forward's 4 B H L^2 D (halved when causal; PERF.md's count), median of CUDA-event timings with
the L2 flushed (benchmarks/harness.measure).

    python scripts/attn_bwd_variants.py [--L 4096] [--D 64 128] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import attn_fwd_variants  # noqa: E402
from attn_fwd_variants import sdpa  # noqa: E402
from benchmarks.harness import attention_flops, measure  # noqa: E402

# PYATTN_CUDA_ATTN_SM90_BWD; the opt-in kernels last (a hang there, cut off by the lease's timeout, leaves the rows
# before it in the log: every row is flushed)
VARIANTS = {"pyattn:cuda:wgmma": None, "pyattn:cuda:mma.sync": "0", "pyattn:cuda:wgmma-ws": "ws",
            "pyattn:cuda:wgmma-fused": "fused"}


def pyattn_fn(backend, env):
    return attn_fwd_variants.pyattn_fn(backend, env, var="PYATTN_CUDA_ATTN_SM90_BWD")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--L", type=int, nargs="+", default=[4096])
    ap.add_argument("--D", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # each row reaches the log even if a timeout kills the run
    providers = {"torch:flash": sdpa("flash"), "torch:cudnn": sdpa("cudnn"), "pyattn:triton": pyattn_fn("triton", None)}
    providers.update({name: pyattn_fn("cuda", env) for name, env in VARIANTS.items()})
    rows, bad = [], 0
    print(f"{torch.cuda.get_device_name(0)}  torch {torch.__version__}")
    print(f"{'L':>6} {'D':>4} {'causal':>6}  {'provider':<24} {'ms':>8} {'TFLOP/s':>8} {'x flash':>8} {'max err':>9}")
    for L in args.L:
        for D in args.D:
            B, H = max(1, 16384 // L), 2048 // D
            g = torch.Generator(device="cuda").manual_seed(L + D)
            q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
                       for _ in range(3))
            dout = torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16, generator=g)
            for causal in (False, True):
                flops = attention_flops(B, H, L, L, D, causal=causal, mode="bwd")
                ref, base = None, None
                for name, fn in providers.items():
                    try:
                        out = fn(q, k, v, causal)  # (the backward runs under the forward's environment and backend)
                        grads = torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
                        if ref is None:
                            ref = [t.float() for t in grads]
                        err = max(((a.float() - r).abs().max() / r.abs().max()).item() for a, r in zip(grads, ref))
                        t = measure(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True), "cuda",
                                    memory=False).p50
                    except Exception as e:  # noqa: BLE001 - a refused provider is reported, not fatal
                        print(f"{L:>6} {D:>4} {causal!s:>6}  {name:<24} refused: {str(e).splitlines()[0][:80]}")
                        continue
                    base = t if name == "torch:flash" else base
                    wrong = name.startswith("pyattn:") and not err <= 2e-2
                    bad += wrong
                    rows.append({"L": L, "D": D, "B": B, "H": H, "causal": causal, "provider": name, "ms": t * 1e3,
                                 "tflops": flops / t / 1e12, "vs_flash": base / t if base else None, "max_err": err})
                    print(f"{L:>6} {D:>4} {causal!s:>6}  {name:<24} {t * 1e3:8.3f} {flops / t / 1e12:8.1f} "
                          f"{(base / t if base else float('nan')):8.2f} {err:9.2e}{'  WRONG' if wrong else ''}")
                    del out, grads
    os.environ.pop("PYATTN_CUDA_ATTN_SM90_BWD", None)
    if args.json:
        with open(args.json, "w") as f:
            # "timings", not "rows": not `pyattn bench` output (scripts/results_table.py skips it)
            json.dump({"device": torch.cuda.get_device_name(0), "timings": rows}, f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
