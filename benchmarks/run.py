"""``pyattn bench``: run the per-op benchmarks, print the table, write JSON/CSV/plots.

``main(args)`` takes the argparse namespace of ``pyattn bench`` (pyattn/cli.py): op, device, dtype, quick, json, csv,
plot. Missing attributes take their defaults, and two extra ones are honoured for tests: ``tiny`` (toy sizes and
3 repetitions: checks the plumbing, measures nothing) and ``progress`` (False: no progress bar).
Also runnable as ``python -m pyattn.benchmarks.run [same options as pyattn bench]``.
"""
from __future__ import annotations

import importlib
import os
import sys
import time

import torch

from . import harness

# --op name -> bench file (benchmarks/bench_<name>.py). 'all' runs every one that exists.
BENCHES = ("layernorm", "attention", "decode", "gru", "transformer")
ALIASES = {"layer_norm": "layernorm", "rms_norm": "layernorm", "norm": "layernorm", "ln": "layernorm",
           "attn": "attention", "sdpa": "attention", "attention_decode": "decode", "gru_cell": "gru"}
HERE = os.path.dirname(os.path.abspath(__file__))


def bench_file(op: str) -> str:
    return os.path.join(HERE, f"bench_{op}.py")


def _ops(spec: str) -> tuple[list[str], bool]:
    """(ops to run, explicitly requested). Unknown names raise ValueError."""
    names = [s.strip().lower() for s in (spec or "all").split(",") if s.strip()]
    if not names or "all" in names:
        return list(BENCHES), False
    out = []
    for n in names:
        n = ALIASES.get(n, n)
        if n not in BENCHES:
            raise ValueError(f"unknown --op {n!r}; choose from {', '.join(BENCHES)}, all")
        if n not in out:
            out.append(n)
    return out, True


def main(args) -> int:
    opt = lambda name, default=None: getattr(args, name, default)  # noqa: E731
    try:
        ops, explicit = _ops(opt("op", "all"))
        dtypes = harness.parse_dtypes(opt("dtype"))
    except ValueError as e:
        print(f"pyattn bench: {e}", file=sys.stderr)
        return 2
    device = opt("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device).type
    except (RuntimeError, TypeError) as e:
        print(f"pyattn bench: bad --device {device!r}: {e}", file=sys.stderr)
        return 2
    if device == "cuda" and not torch.cuda.is_available():
        print("pyattn bench: --device cuda requested but torch sees no CUDA device", file=sys.stderr)
        return 2
    if device not in ("cpu", "cuda"):
        print(f"pyattn bench: unsupported device {device!r} (cpu or cuda)", file=sys.stderr)
        return 2

    runnable = []
    for op in ops:
        if os.path.exists(bench_file(op)):
            runnable.append(op)
        elif explicit:
            print(f"{op}: not benchmarked yet (no bench_{op}.py)")
    if not runnable:
        return 0

    t0 = time.perf_counter()
    ctx = harness.BenchContext(device, dtypes, quick=bool(opt("quick", False)), tiny=bool(opt("tiny", False)),
                               progress=bool(opt("progress", True)))
    rows: list[dict] = []
    targets: list = []
    for op in runnable:
        mod = importlib.import_module(f"{__package__}.bench_{op}" if __package__ else f"bench_{op}")
        rows.extend(mod.run(ctx))
        targets.extend(mod.targets() if hasattr(mod, "targets") else [])
    ctx.finish(rows, targets)

    if not rows:
        print("pyattn bench: nothing was measured")
    else:
        print(harness.format_table(rows, ctx.ceilings, ctx.env))
    if ctx.notes:
        print("\nnotes:")
        for n in ctx.notes:
            print(f"  {n}")
    if ctx.target_lines:
        print("\nPERF.md targets (best pyattn provider; speedup vs the same run's torch baseline):")
        for line in ctx.target_lines:
            print(line)

    written = []
    if opt("json"):
        harness.write_json(opt("json"), rows, ctx.env, ctx.ceilings, ctx.notes, ctx.target_lines)
        written.append(opt("json"))
    if opt("csv"):
        harness.write_csv(opt("csv"), rows)
        written.append(opt("csv"))
    if opt("plot"):
        pngs = harness.write_plots(opt("plot"), rows)
        written.append(f"{opt('plot')}/ ({len(pngs)} PNG)")
    if written:
        print("\nwrote: " + ", ".join(written))
    print(f"({len(rows)} rows in {time.perf_counter() - t0:.1f} s on {ctx.env['device_name']})")
    return 0


if __name__ == "__main__":
    from pyattn.cli import build_parser

    raise SystemExit(main(build_parser().parse_args(["bench", *sys.argv[1:]])))
