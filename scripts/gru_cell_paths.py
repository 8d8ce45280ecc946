"""The CUDA GRU cell step's two paths side by side on one GPU, in one process, to place the one-launch kernel's batch
limit (csrc/cuda/gru.cu gru_cell_fwd_plan, kCellMaxWorkF32 / kCellMaxWork16): torch.nn.GRUCell (the baseline),
pyattn's cuda backend by default ("auto"), forced onto the one-launch cell kernel (PYATTN_CUDA_GRU_CELL=1: x W_ih^T,
h W_hh^T and the gates in one kernel) and forced onto the sequence path (=0: a cuBLAS GEMM for the input projection,
then the persistent kernel), and the Triton backend. Inference (no autograd), fp32 and bf16, I = H in 256 and 1024,
batches 1 to 256. Each pyattn row is first checked against torch's output (max abs error, printed; over 2e-3 (fp32) /
6e-2 (bf16) is marked WRONG and the exit status is 1). GPU time per step: the median of CUDA-event timings with the
L2 flushed before each (benchmarks/harness.measure, as `pyattn bench`), and the speedup over torch.nn.GRUCell.

    python scripts/gru_cell_paths.py [--json out.json] [--batch 1 8 32 ...] [--size 256 1024]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.harness import measure  # noqa: E402

import pyattn  # noqa: E402

# name -> (backend, PYATTN_CUDA_GRU_CELL); the first is the baseline
PROVIDERS = {"torch:nn.GRUCell": (None, None), "pyattn:cuda[auto]": ("cuda", None),
             "pyattn:cuda[cell]": ("cuda", "1"), "pyattn:cuda[seq]": ("cuda", "0"), "pyattn:triton": ("triton", None)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json")
    ap.add_argument("--batch", type=int, nargs="*", default=[1, 4, 8, 16, 32, 64, 128, 256])
    ap.add_argument("--size", type=int, nargs="*", default=[256, 1024])
    args = ap.parse_args()
    rows, bad = [], 0
    print(f"{torch.cuda.get_device_name(0)}  torch {torch.__version__}")
    print(f"{'B':>4} {'I=H':>5} {'dtype':<9} {'provider':<20} {'us/step':>8} {'x torch':>8} {'max err':>9}")
    for size in args.size:
        for dtype in (torch.float32, torch.bfloat16):
            torch.manual_seed(size)
            ref = torch.nn.GRUCell(size, size).to("cuda", dtype)
            cell = pyattn.nn.GRUCell(size, size).to("cuda", dtype)
            cell.load_state_dict(ref.state_dict())
            for B in args.batch:
                x = torch.randn(B, size, device="cuda", dtype=dtype)
                h = torch.rand(B, size, device="cuda", dtype=dtype) * 2 - 1
                with torch.no_grad():
                    want = ref(x, h).float()
                    base = None
                    for name, (backend, setting) in PROVIDERS.items():
                        os.environ.pop("PYATTN_CUDA_GRU_CELL", None)
                        if setting is not None:
                            os.environ["PYATTN_CUDA_GRU_CELL"] = setting
                        if backend is None:
                            fn = lambda: ref(x, h)  # noqa: E731
                        else:
                            fn = lambda be=backend: pyattn.gru_cell(  # noqa: E731
                                x, h, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh, backend=be)
                        err = (fn().float() - want).abs().max().item()
                        wrong = err > (2e-3 if dtype == torch.float32 else 6e-2)
                        bad += wrong
                        us = measure(fn, "cuda", memory=False, max_reps=300).p50 * 1e6  # (160 rows in ~40 s)
                        base = base or us
                        print(f"{B:>4} {size:>5} {str(dtype)[6:]:<9} {name:<20} {us:8.1f} {base / us:7.2f}x "
                              f"{err:9.2e}{'  WRONG' if wrong else ''}", flush=True)
                        rows.append({"B": B, "I": size, "H": size, "dtype": str(dtype)[6:], "provider": name,
                                     "us_per_step": us, "speedup": base / us, "max_err": err, "wrong": wrong})
                    os.environ.pop("PYATTN_CUDA_GRU_CELL", None)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": rows}, f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
