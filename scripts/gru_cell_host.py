"""Where a GRU cell step's host time goes, per layer of the call path, in one process: torch.nn.GRUCell, then
pyattn.nn.GRUCell, the public function pyattn.gru_cell, and the backend's gru_cell_fwd alone (for cpp / cuda the
custom op's C++ binding), each on backends cpp / cuda / triton as the device allows, inference (no autograd), fp32.
The H200 runs measured pyattn's cell at 0.074 ms (cuda) / 0.06-0.19 ms (triton) against torch's 0.014-0.024 ms at B =
1, I = H = 256: host bound. Times are wall-clock means over many back-to-back calls with one synchronize at the end
(the host rate, which is what a cell step in a Python loop sees), in microseconds. With --profile, a torch.profiler
table of one backend's gru_cell_fwd shows the CPU-side cost of each ATen op and CUDA runtime call
(cudaFuncSetAttribute, the occupancy query, cudaLaunchCooperativeKernel, ...).

    python scripts/gru_cell_host.py [--device cuda] [--batch 1 32] [--size 256] [--profile cuda]
"""
from __future__ import annotations

import argparse
import time

import torch

import pyattn
from pyattn.dispatch import get_backend


def host_us(fn, device: str, n: int = 2000) -> float:
    for _ in range(100):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, nargs="*", default=[1, 32])
    ap.add_argument("--size", type=int, default=256, help="input and hidden size")
    ap.add_argument("--profile", help="a backend whose raw op to profile (torch.profiler)")
    args = ap.parse_args()
    dev, H = args.device, args.size
    backends = [b for b in (["cpp"] if dev == "cpu" else ["cuda", "triton"]) if get_backend(b).availability()[0]]
    print(f"{torch.cuda.get_device_name(0) if dev == 'cuda' else 'cpu'}  torch {torch.__version__}  "
          f"I = H = {H}, fp32, us per step (host rate)")
    ref = torch.nn.GRUCell(H, H).to(dev)
    cell = pyattn.nn.GRUCell(H, H).to(dev)
    cell.load_state_dict(ref.state_dict())
    w = (cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
    with torch.no_grad():
        for B in args.batch:
            x, h = torch.randn(B, H, device=dev), torch.randn(B, H, device=dev)
            print(f"B = {B:>3}  torch.nn.GRUCell {host_us(lambda: ref(x, h), dev):7.1f}")
            for be in backends:
                with pyattn.use_backend(be):
                    module = host_us(lambda: cell(x, h), dev)
                    fn = host_us(lambda: pyattn.gru_cell(x, h, *w), dev)
                raw = host_us(lambda: get_backend(be).gru_cell_fwd(x, h, *w, False), dev)
                print(f"        {be:<7} pyattn.nn.GRUCell {module:7.1f}   pyattn.gru_cell {fn:7.1f}   "
                      f"backend call {raw:7.1f}")
            if args.profile:
                from torch.profiler import ProfilerActivity, profile

                acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
                be = get_backend(args.profile)
                with profile(activities=acts) as prof:
                    for _ in range(200):
                        be.gru_cell_fwd(x, h, *w, False)
                    if dev == "cuda":
                        torch.cuda.synchronize()
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
