"""The CUDA GRU forward's paths side by side on one GPU, in one process: torch.nn.GRU (cuDNN), pyattn's cuda backend
with each grid the environment variable PYATTN_CUDA_GRU_BLOCKS selects for the persistent forward (csrc/cuda/gru.cu,
gru_rec_fwd: every step in one cooperative launch; unset: gru_rec_fwd_plan's choice, the one-block kernel where it
takes the call; "grid": the plan's choice without the one-block kernel (PYATTN_CUDA_GRU_ONE_BLOCK=0); "0": the
per-step path, a cuBLAS GEMM and a fused gate launch per step), and the Triton backend. Inference (no autograd), one layer, fp32 and
bf16, PERF.md's GRU shapes and a few more. Each pyattn row is first checked against cuDNN's output (max abs error,
printed; off by more than 2e-3 (fp32) / 6e-2 (bf16) is marked WRONG and the exit status is 1). Time per sequence
and per step, median of CUDA-event timings (benchmarks/harness.measure), and the speedup over cuDNN.

    python scripts/gru_fwd_grids.py [--json out.json] [--blocks 0 1 8 32 ...]
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

SHAPES = [(1, 200, 64, 128), (32, 100, 256, 256), (1, 200, 256, 512), (64, 50, 1024, 1024), (8, 100, 512, 512)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json")
    ap.add_argument("--blocks", nargs="*", default=["auto", "grid", "0", "1", "4", "16", "64", "132"])
    args = ap.parse_args()
    rows, bad = [], 0
    print(f"{torch.cuda.get_device_name(0)}  torch {torch.__version__}")
    print(f"{'B':>3} {'T':>4} {'I':>5} {'H':>5} {'dtype':<9} {'provider':<22} {'ms/seq':>8} {'us/step':>8} "
          f"{'x cuDNN':>8} {'max err':>9}")
    for B, T, I, H in SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            torch.manual_seed(B * 7 + H)
            ref_mod = torch.nn.GRU(I, H).to("cuda", dtype)
            mod = pyattn.nn.GRU(I, H).to("cuda", dtype)
            mod.load_state_dict(ref_mod.state_dict())
            x = torch.randn(T, B, I, device="cuda", dtype=dtype)
            h0 = torch.randn(1, B, H, device="cuda", dtype=dtype)
            with torch.no_grad():
                want = ref_mod(x, h0)[0].float()
                # name -> (backend, PYATTN_CUDA_GRU_BLOCKS); the first is the baseline
                providers = {"torch:nn.GRU": (None, None), "pyattn:triton": ("triton", None)}
                providers.update({f"pyattn:cuda[{b}]": ("cuda", None if b == "auto" else b) for b in args.blocks})
                base = None
                for name, (backend, blocks) in providers.items():
                    os.environ.pop("PYATTN_CUDA_GRU_BLOCKS", None)
                    if blocks == "grid":
                        os.environ["PYATTN_CUDA_GRU_ONE_BLOCK"] = "0"
                    elif blocks is not None:
                        os.environ["PYATTN_CUDA_GRU_BLOCKS"] = blocks

                    def fn(backend=backend):
                        if backend is None:
                            return ref_mod(x, h0)
                        with pyattn.use_backend(backend):
                            return mod(x, h0)
                    try:
                        err = (fn()[0].float() - want).abs().max().item()
                        t = measure(fn, "cuda", memory=False, min_time=0.2).p50
                    except Exception as e:  # noqa: BLE001 - a refused provider is reported, not fatal
                        print(f"{B:>3} {T:>4} {I:>5} {H:>5} {str(dtype)[6:]:<9} {name:<22} refused: "
                              f"{str(e).splitlines()[0][:80]}")
                        continue
                    finally:
                        os.environ.pop("PYATTN_CUDA_GRU_BLOCKS", None)
                        os.environ.pop("PYATTN_CUDA_GRU_ONE_BLOCK", None)
                    base = t if base is None else base
                    tol = 2e-3 if dtype == torch.float32 else 6e-2  # (16-bit: the state is rounded every step)
                    wrong = name != "torch:nn.GRU" and not err <= tol
                    bad += wrong
                    print(f"{B:>3} {T:>4} {I:>5} {H:>5} {str(dtype)[6:]:<9} {name:<22} {t * 1e3:8.3f} "
                          f"{t / T * 1e6:8.2f} {base / t:7.2f}x {err:9.2e}{'  WRONG' if wrong else ''}")
                    rows.append({"B": B, "T": T, "I": I, "H": H, "dtype": str(dtype), "provider": name,
                                 "ms": t * 1e3, "x_cudnn": base / t, "max_err": err})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": rows}, f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
