"""The CUDA attention backward's kernels side by side on one GPU, in one process: pyattn's cuda backend with the
Hopper wgmma backward (csrc/cuda/attention_sm90_bwd.cu; the default on compute capability 9.0: the warp-specialized
dK / dV kernel adding dQ with bulk reductions, "fused"), with PYATTN_CUDA_ATTN_SM90_BWD=ws (that dK / dV kernel and
the dQ kernel: deterministic mode's pair), =cp (the cp.async dK / dV kernel and the dQ kernel), =fusedat (the fused
kernel with atomics) and =0 (the mma.sync kernels of attention.cu), the default with PYATTN_CUDA_ATTN_L2=0
("-l2off": the grids' tiles level by level over all heads instead of in L2 sections of heads), the Triton backend,
and torch's SDPA backends (flash, cudnn), bf16, B * L = 16k tokens, 2048 / D heads (bench_attention.py's GPU
shapes). Only the backward is timed (torch.autograd.grad of a forward built once per provider). Each pyattn variant's
dq, dk, dv are first checked against torch flash's (max abs error over max |flash|, printed; above 2e-2 the row is
marked WRONG and the exit status is 1). TFLOP/s = 2.5 x the forward's 4 B H L^2 D (halved when causal; PERF.md's
count), timed in interleaved rounds as attn_fwd_variants.py does (compare).

    python scripts/attn_bwd_variants.py [--L 4096] [--D 64 128] [--rounds 3] [--json out.json]
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import attn_fwd_variants  # noqa: E402
from attn_fwd_variants import sdpa, set_env  # noqa: E402

# PYATTN_CUDA_ATTN_SM90_BWD; the atomic kernels last (compare runs each provider once, in this order, before the timing
# rounds: a hang there, cut off by the lease's timeout, leaves the shapes done before it in the log)
BWD = "PYATTN_CUDA_ATTN_SM90_BWD"
VARIANTS = {"pyattn:cuda:wgmma-ws": {BWD: "ws"}, "pyattn:cuda:wgmma-cp": {BWD: "cp"},
            "pyattn:cuda:mma.sync": {BWD: "0"}, "pyattn:cuda:wgmma-fused": {},
            "pyattn:cuda:wgmma-fused-l2off": {"PYATTN_CUDA_ATTN_L2": "0"},
            "pyattn:cuda:wgmma-fusedat": {BWD: "fusedat"}}
pyattn_fn = attn_fwd_variants.pyattn_fn


def main() -> int:
    providers = {"torch:flash": sdpa("flash"), "torch:cudnn": sdpa("cudnn"), "pyattn:triton": pyattn_fn("triton", {})}
    providers.update({name: pyattn_fn("cuda", env) for name, env in VARIANTS.items()})

    def make_inputs(B, H, L, D, g):
        return tuple(torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_(i < 3)
                     for i in range(4))  # q, k, v, dout

    def check(fn, inputs, causal, state):  # max over dq, dk, dv of the max abs error / max |torch flash's|
        q, k, v, dout = inputs
        out = fn(q, k, v, causal)  # (the backward runs under the forward's environment and backend)
        grads = torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
        ref = state.setdefault("ref", [t.float() for t in grads])
        err = max(((a.float() - r).abs().max() / r.abs().max()).item() for a, r in zip(grads, ref))

        def call():
            set_env(getattr(fn, "env", {}))  # (the backward reads the environment when it runs)
            return torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
        return err, call

    return attn_fwd_variants.compare(attn_fwd_variants.parse_args(), providers, "bwd", make_inputs, check)


if __name__ == "__main__":
    sys.exit(main())
