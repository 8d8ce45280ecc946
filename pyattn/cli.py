"""``pyattn info | bench | demo`` (console script ``pyattn``; also ``python -m pyattn``)."""
from __future__ import annotations

import argparse
import platform
import sys

OPS = ("attention", "layer_norm", "rms_norm", "gru_cell", "gru")


def _info(args) -> int:
    import torch

    import pyattn
    from pyattn._ext import build_info, load_C, load_triton
    from pyattn.dispatch import PRIORITY, get_backend

    print(f"pyattn {pyattn.__version__}  python {platform.python_version()}  torch {torch.__version__}"
          f" (CUDA {torch.version.cuda or 'none'})")
    triton, why = load_triton()
    print(f"triton: {triton.__version__ if triton else 'unavailable: ' + why}")
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print(f"device: {p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB)")
    else:
        print(f"device: cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads);"
              " no CUDA device")
    mod, why = load_C()
    bi = build_info()
    if mod is None:
        print(f"extension pyattn._C: not loaded ({why})")
    else:
        print(f"extension pyattn._C: built with torch {bi.get('torch')}, CUDA {bi.get('cuda') or 'no'}"
              f", archs {bi.get('cuda_archs') or '-'}"
              f"{' (Hopper attention forward and backward: sm_90a)' if bi.get('sm90a_attention') else ''}"
              f", cpu -march={bi.get('cpu_march')}")
    print("\nbackends:")
    for name, ok, reason in pyattn.backends():
        b = get_backend(name)
        print(f"  {name:7s} {'available' if ok else 'unavailable'}  {b.description}"
              + ("" if ok else f"\n          reason: {reason}"))
    print("\nops (priority per device; a backend that cannot take an op says why):")
    for op in OPS:
        for dev in ("cpu", "cuda"):
            order = PRIORITY.get((op, dev), ["torch"])
            cells = []
            for name in order:
                b = get_backend(name)
                if op not in b.caps:
                    cells.append(f"{name}: not implemented")
                    continue
                ok, why = b.availability()
                extra = [] if not ok else _static_reasons(b, op, dev)
                cells.append(f"{name}: " + ("yes" if ok and not extra else "no (" + (why or "; ".join(extra)) + ")"))
            print(f"  {op:10s} {dev:4s}  " + " | ".join(cells))
    return 0


def _static_reasons(backend, op: str, dev: str) -> list[str]:
    """Refusals that do not depend on the input (device kind, missing kernel): probe with a tiny meta input."""
    import torch

    if dev not in backend.caps[op].devices:
        return [f"device {dev} not supported"]
    if backend.name == "torch":
        return []
    from pyattn._ext import triton_interpreting
    from pyattn.backends._native import missing_kernel_reason

    if backend.name == "cpp":
        return missing_kernel_reason(op, "CPU")
    if backend.name == "cuda":
        return missing_kernel_reason(op, "CUDA")
    if backend.name == "triton" and dev == "cpu" and not triton_interpreting():
        return ["CPU only under TRITON_INTERPRET=1"]
    if backend.name == "triton" and dev == "cuda" and not torch.cuda.is_available():
        return ["no CUDA device"]
    return []


def _bench(args) -> int:
    from pyattn.benchmarks import run as bench_run

    return bench_run.main(args)


LECTURE_TEXT = "a gated recurrent unit: the reset gate r, the update gate z, the candidate n and the new state h"


def _demo(args) -> int:
    if args.what == "transformer":
        from pyattn.models.translation_demo import run_demo

        return run_demo(device=args.device, steps=args.steps, seconds=args.seconds, seed=args.seed, out=args.out,
                        max_digits=args.digits, threads=args.threads)
    if args.what != "gru":
        print(f"pyattn demo {args.what}: unknown demo (gru | transformer)", file=sys.stderr)
        return 2
    import pyattn
    from pyattn.models.char_gru import train_on_text

    print(pyattn.explain("gru_cell", *_probe_gru_args()).splitlines()[1].strip())
    ok = True
    for text, prompt_len, steps in (("help", 1, 60), (LECTURE_TEXT, 2, 200)):
        print(f"\ntraining a character GRU on {text!r} ({len(text)} chars, {steps} steps, device {args.device})")
        res = train_on_text(text, prompt_len=prompt_len, steps=steps, device=args.device,
                            log=lambda step, loss: print(f"  step {step:4d}  loss {loss:.4f}"))
        verdict = "correct" if res.correct else "WRONG"
        print(f"  {res.seconds:.1f} s; prompt {res.prompt!r} -> {res.continuation!r} ({verdict})")
        ok &= res.correct
    return 0 if ok else 1


def _probe_gru_args():
    import torch

    return torch.zeros(1, 8), torch.zeros(1, 8), torch.zeros(24, 8), torch.zeros(24, 8)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pyattn", description="pyattn: fused attention, norm and GRU kernels")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="versions, device, build contents, backend availability per op")
    b = sub.add_parser("bench", help="benchmark pyattn's backends against torch")
    b.add_argument("--op", default="all", help="attention | decode | layernorm | gru | transformer | all")
    b.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    b.add_argument("--dtype", default=None, help="comma-separated dtypes, e.g. float32,bfloat16")
    b.add_argument("--quick", action="store_true", help="small sizes and few repeats (about a minute on 2 cores)")
    b.add_argument("--json", default=None, help="write result rows to this JSON file")
    b.add_argument("--csv", default=None, help="write result rows to this CSV file")
    b.add_argument("--plot", default=None, help="write PNG plots into this directory")
    d = sub.add_parser("demo", help="train a small model on pyattn")
    d.add_argument("what", nargs="?", default="gru", help="gru | transformer")
    d.add_argument("--device", default="cpu", help="cpu (default) | cuda")
    d.add_argument("--steps", type=int, default=None,
                   help="transformer: training steps (default 600; about a minute on 2 CPU cores)")
    d.add_argument("--seconds", type=float, default=None,
                   help="transformer: stop training after this many seconds if the steps are not done yet")
    d.add_argument("--seed", type=int, default=0, help="transformer: random seed (model, data)")
    d.add_argument("--out", default="pyattn_demo_transformer_loss.png",
                   help="transformer: where to write the loss-curve PNG")
    d.add_argument("--digits", type=int, default=6, help="transformer: numbers of up to this many digits (1-12)")
    d.add_argument("--threads", type=int, default=None,
                   help="transformer: torch CPU threads while training (default: torch's; on a busy shared machine "
                        "1 avoids oversubscription)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return {"info": _info, "bench": _bench, "demo": _demo}[args.cmd](args)


if __name__ == "__main__":
    raise SystemExit(main())
