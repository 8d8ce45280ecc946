"""The CUDA GRU forward's paths side by side on one GPU, in one process: torch.nn.GRU (cuDNN), pyattn's cuda backend
with each grid the environment variable PYATTN_CUDA_GRU_BLOCKS selects for the persistent forward (csrc/cuda/gru.cu,
gru_rec_fwd: every step in one cooperative launch; unset ("auto"): gru_rec_fwd_plan's choice; "grid": the same with
the one-block and cluster kernels off (PYATTN_CUDA_GRU_ONE_BLOCK=0, PYATTN_CUDA_GRU_CLUSTER=0); "one": the one-block
forward where it fits (PYATTN_CUDA_GRU_ONE_BLOCK=1, opt-in); "cluster": the one-block forward on a thread-block
cluster of 8 blocks where it fits (PYATTN_CUDA_GRU_CLUSTER=1, sm_90+; the inference default on compute capability
9.x; elsewhere the row is the default plan's); "0": the per-step path,
a cuBLAS GEMM and a fused gate launch per step), and the Triton backend. Inference (no autograd), one layer, fp32 and
bf16, PERF.md's GRU shapes and a few more. Then a training step (forward + backward, dx and the weights' gradients)
of cuDNN against "auto" (the one-block backward where B H <= 512), "grid", "one" and "cluster": the one-block and
cluster backwards' own measurement. Each pyattn row is first checked against cuDNN's output (max abs error, printed;
off by more than 2e-3 (fp32) / 6e-2 (bf16) is marked WRONG and the exit status is 1; training rows: dx's error over
max |dx|, 1e-3 / 5e-2). Time per sequence and per step, median of CUDA-event timings (benchmarks/harness.measure),
and the speedup over cuDNN.

    python scripts/gru_fwd_grids.py [--json out.json] [--blocks 0 1 8 32 ...] [--no-train]
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

# (B, T, I, H); (16, 100, 256, 256): the cluster forward's largest B ceil(H / 8) (512), its inference default's edge
SHAPES = [(1, 200, 64, 128), (16, 100, 256, 256), (32, 100, 256, 256), (1, 200, 256, 512), (64, 50, 1024, 1024),
          (8, 100, 512, 512)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json")
    ap.add_argument("--blocks", nargs="*",
                    default=["auto", "grid", "one", "cluster", "0", "1", "4", "16", "64", "132"])
    ap.add_argument("--no-train", action="store_true", help="skip the training-step rows")
    args = ap.parse_args()
    rows, bad = [], 0
    print(f"{torch.cuda.get_device_name(0)}  torch {torch.__version__}")
    print(f"{'B':>3} {'T':>4} {'I':>5} {'H':>5} {'dtype':<9} {'provider':<26} {'ms/seq':>8} {'us/step':>8} "
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
                        os.environ.update(PYATTN_CUDA_GRU_ONE_BLOCK="0", PYATTN_CUDA_GRU_CLUSTER="0")
                    elif blocks == "one":
                        os.environ["PYATTN_CUDA_GRU_ONE_BLOCK"] = "1"
                    elif blocks == "cluster":
                        os.environ["PYATTN_CUDA_GRU_CLUSTER"] = "1"
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
                        report(rows, (B, T, I, H), dtype, name, refused=e)
                        continue
                    finally:
                        for var in ("PYATTN_CUDA_GRU_BLOCKS", "PYATTN_CUDA_GRU_ONE_BLOCK", "PYATTN_CUDA_GRU_CLUSTER"):
                            os.environ.pop(var, None)
                    base = t if base is None else base
                    tol = 2e-3 if dtype == torch.float32 else 6e-2  # (16-bit: the state is rounded every step)
                    wrong = name != "torch:nn.GRU" and not err <= tol
                    bad += wrong
                    report(rows, (B, T, I, H), dtype, name, t, base, err, wrong)
            if not args.no_train:
                bad += train_rows(rows, ref_mod, mod, x, h0, dtype)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": rows}, f, indent=1)
    return 1 if bad else 0


def report(rows, shape, dtype, name, t=None, base=None, err=None, wrong=False, refused=None):
    """Prints a row (B, T, I, H = shape; time per sequence and per step, x cuDNN, error) and appends it to `rows`, or
    prints that the provider refused (`refused`: the exception)."""
    B, T, I, H = shape
    head = f"{B:>3} {T:>4} {I:>5} {H:>5} {str(dtype)[6:]:<9} {name:<26}"
    if refused is not None:
        print(f"{head} refused: {str(refused).splitlines()[0][:80]}")
        return
    print(f"{head} {t * 1e3:8.3f} {t / T * 1e6:8.2f} {base / t:7.2f}x {err:9.2e}{'  WRONG' if wrong else ''}")
    rows.append({"B": B, "T": T, "I": I, "H": H, "dtype": str(dtype), "provider": name, "ms": t * 1e3,
                 "x_cudnn": base / t, "max_err": err})


def train_rows(rows, ref_mod, mod, x, h0, dtype) -> int:
    """A training step (forward + backward into dx and the weights) of cuDNN and of pyattn's cuda backend with the
    GRU plans' defaults ("auto"), the one-block kernels off ("grid"), both one-block kernels ("one") and both cluster
    kernels ("cluster", sm_90+; elsewhere the defaults): printed rows appended to `rows`; returns how many were WRONG (dx off cuDNN's by more than 1e-3 / 5e-2 of max |dx|)."""
    T, B, _ = x.shape
    H = h0.shape[-1]
    xg = x.detach().clone().requires_grad_()
    dout = torch.randn(T, B, H, device="cuda", dtype=dtype)
    envs = {"torch:nn.GRU fwd+bwd": None, "pyattn:cuda[auto] fwd+bwd": {},
            "pyattn:cuda[grid] fwd+bwd": {"PYATTN_CUDA_GRU_ONE_BLOCK": "0"},
            "pyattn:cuda[one] fwd+bwd": {"PYATTN_CUDA_GRU_ONE_BLOCK": "1"},
            "pyattn:cuda[cluster] fwd+bwd": {"PYATTN_CUDA_GRU_CLUSTER": "1"}}
    want, base, bad = None, None, 0
    for name, env in envs.items():
        module = ref_mod if env is None else mod

        def step(module=module, env=env):
            for key in ("PYATTN_CUDA_GRU_BLOCKS", "PYATTN_CUDA_GRU_ONE_BLOCK", "PYATTN_CUDA_GRU_CLUSTER"):
                os.environ.pop(key, None)
            os.environ.update(env or {})
            with pyattn.use_backend("cuda"):
                out = module(xg, h0)[0]
            return torch.autograd.grad(out, (xg, *module.parameters()), dout)
        try:
            dx = step()[0].float()
            t = measure(step, "cuda", memory=False, min_time=0.2).p50
        except Exception as e:  # noqa: BLE001 - a refused provider is reported, not fatal
            report(rows, (B, T, x.shape[2], H), dtype, name, refused=e)
            continue
        finally:
            for key in ("PYATTN_CUDA_GRU_ONE_BLOCK", "PYATTN_CUDA_GRU_CLUSTER"):
                os.environ.pop(key, None)
        want = dx if want is None else want
        base = t if base is None else base
        err = ((dx - want).abs().max() / want.abs().max()).item()
        wrong = env is not None and not err <= (1e-3 if dtype == torch.float32 else 5e-2)
        bad += wrong
        report(rows, (B, T, x.shape[2], H), dtype, name, t, base, err, wrong)
    return bad


if __name__ == "__main__":
    sys.exit(main())
