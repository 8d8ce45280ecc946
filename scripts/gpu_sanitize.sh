#!/usr/bin/env bash
# compute-sanitizer over pyattn's CUDA kernels (the `cuda` backend, forced) on small shapes, on a GPU machine:
#   memcheck   out-of-bounds / misaligned global and shared accesses, hardware exceptions
#   racecheck  shared-memory hazards (read-after-write, write-after-read, write-after-write between threads)
# with PYTORCH_NO_CUDA_MEMORY_CACHING=1, so every tensor is its own cudaMalloc and an access past its end is caught
# instead of landing in a neighbour inside the caching allocator's block.
# The workload (written below to a temporary file) runs each op's forward and backward through pyattn with
# backend="cuda" over shapes that cross the kernels' configurations and their aligned/element paths; an op whose
# CUDA kernels this build lacks is reported and skipped, but a run that exercises no op at all fails.
#
# Usage: bash scripts/gpu_sanitize.sh            (after building pyattn with CUDA; gpu_run.sh calls it)
# Environment: PYTHON (default python), PYATTN_SANITIZE_TOOLS (default "memcheck racecheck"; also initcheck,
# synccheck), PYATTN_SANITIZE_OPS (default "norm attention gru"), PYATTN_SANITIZE_TIMEOUT (seconds per tool, 1800).
# Exit status: 0 clean; 1 a tool reported errors or the workload failed; 2 no usable GPU / compute-sanitizer here.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python}"
TOOLS="${PYATTN_SANITIZE_TOOLS:-memcheck racecheck}"
export PYATTN_SANITIZE_OPS="${PYATTN_SANITIZE_OPS:-norm attention gru}"
TIMEOUT="${PYATTN_SANITIZE_TIMEOUT:-1800}"
export PYTORCH_NO_CUDA_MEMORY_CACHING=1
unset TRITON_INTERPRET PYATTN_BACKEND

SAN="$(command -v compute-sanitizer || true)"
for cand in ${CUDA_HOME:+"$CUDA_HOME/bin/compute-sanitizer"} /usr/local/cuda/bin/compute-sanitizer \
            /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
  [ -z "$SAN" ] && [ -x "$cand" ] && SAN="$cand"
done
if [ -z "$SAN" ]; then
  echo "gpu_sanitize: compute-sanitizer not found (PATH, \$CUDA_HOME/bin, /usr/local/cuda): NOT checked" >&2
  exit 2
fi
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_sanitize: torch sees no CUDA device: NOT checked" >&2
  exit 2
fi

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
cat > "$WORK/workload.py" <<'EOF'
"""Small-shape forward + backward of every op the cuda backend has, forced onto it."""
import os
import sys

import torch

import pyattn
from pyattn.dispatch import get_backend
from pyattn.dispatch.registry import BackendNotSupported

ok, why = get_backend("cuda").availability()
if not ok:
    sys.exit(f"gpu_sanitize: the cuda backend is unavailable: {why}")
DEV = "cuda"
ops = os.environ["PYATTN_SANITIZE_OPS"].split()
ran, skipped = [], []
g = torch.Generator(device="cpu").manual_seed(0)


def rnd(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=g).to(DEV, dtype)


def padded(t, pad, shift):
    """t's values in rows of stride N + pad, starting `shift` elements into the allocation (element paths)."""
    m, n = t.shape
    buf = torch.zeros(shift + m * (n + pad), device=t.device, dtype=t.dtype)
    out = buf[shift:].view(m, n + pad)[:, :n]
    out.copy_(t)
    return out


def attempt(name, fn):
    """Runs one op's cases; a case the cuda backend refuses (this build or device lacks the kernel, or the shape is
    outside the kernel's range) is reported and skipped, the others still run."""
    done = {"cases": 0, "refused": []}

    def case(label, thunk):
        try:
            thunk()
            torch.cuda.synchronize()
            done["cases"] += 1
        except BackendNotSupported as e:
            done["refused"].append(f"{label}: {e}")

    fn(case)
    if done["cases"]:
        ran.append(f"{name} ({done['cases']} cases)")
    skipped.extend(f"{name} {r}" for r in done["refused"])


def norm(case):
    def one(m, n, dtype, pdt, rms):
        x = rnd(m, n, dtype=dtype).requires_grad_()
        r = rnd(m, n, dtype=dtype).requires_grad_()
        w = rnd(n, dtype=pdt).requires_grad_()
        b = None if rms else rnd(n, dtype=pdt).requires_grad_()
        if rms:
            y, s = pyattn.rms_norm(x, (n,), w, residual=r, return_residual=True, backend="cuda")
        else:
            y, s = pyattn.layer_norm(x, (n,), w, b, residual=r, return_residual=True, backend="cuda")
        leaves = [x, r, w] + ([b] if b is not None else [])
        torch.autograd.grad((y, s), leaves, (torch.ones_like(y), torch.ones_like(s)))

    def elementwise(n, dtype, pad, shift):  # unaligned base / row stride not a multiple of the vector
        x, dy, w = rnd(9, n, dtype=dtype), rnd(9, n, dtype=dtype), rnd(n)
        _, _, mean, rstd = torch.ops.pyattn.layer_norm_fwd(padded(x, pad, shift), None, w, None, 1e-5, False, False)
        torch.ops.pyattn.layer_norm_bwd(padded(dy, pad, shift), padded(x, pad, shift), w, mean, rstd, None, False,
                                        False, True)

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for m, n in ((1, 1), (3, 7), (37, 64), (5, 65), (40, 300), (3, 1024), (2, 1025), (17, 4096), (3, 8193),
                     (2, 20000)):
            for pdt in (torch.float32, dtype):
                for rms in (False, True):
                    case(f"{dtype} {(m, n)} params {pdt} rms={rms}", lambda: one(m, n, dtype, pdt, rms))
            for pad, shift in ((3, 0), (0, 1)):
                case(f"{dtype} n={n} pad={pad} shift={shift}", lambda: elementwise(n, dtype, pad, shift))


def attention(case):
    def one(lq, lk, d, causal, hkv, dtype):
        q = rnd(1, 2, lq, d, dtype=dtype).requires_grad_()
        k = rnd(1, hkv, lk, d, dtype=dtype).requires_grad_()
        v = rnd(1, hkv, lk, d, dtype=dtype).requires_grad_()
        out = pyattn.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=hkv != 2, backend="cuda")
        torch.autograd.grad(out, (q, k, v), torch.ones_like(out))

    def masked(dtype):
        q = rnd(2, 2, 19, 64, dtype=dtype).requires_grad_()
        k = rnd(2, 2, 37, 64, dtype=dtype).requires_grad_()
        v = rnd(2, 2, 37, 64, dtype=dtype).requires_grad_()
        mask = torch.rand(2, 1, 19, 37, generator=g).to(DEV) > 0.3
        out = pyattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.1, backend="cuda")
        torch.autograd.grad(out, (q, k, v), torch.ones_like(out))

    for dtype in (torch.float16, torch.bfloat16):
        for shape in ((1, 17, 64, False, 2), (17, 17, 64, True, 2), (65, 130, 128, False, 1), (130, 65, 128, True, 2),
                      (33, 33, 256, True, 2), (20, 20, 40, False, 2)):
            case(f"{dtype} (Lq, Lk, D, causal, Hkv)={shape}", lambda: one(*shape, dtype))
        case(f"{dtype} bool mask + dropout", lambda: masked(dtype))
        # the decoding forward (attention_decode.cu: split-KV, about 4 blocks an SM) and its backward
        for shape in ((1, 3000, 128, False, 1), (3, 700, 64, True, 2)):
            case(f"{dtype} decode (Lq, Lk, D, causal, Hkv)={shape}", lambda: one(*shape, dtype))
        # the cp.async Hopper forward (the default one there is the warp-specialized kernel; off Hopper the mma.sync
        # kernel runs); the backwards of these and of the head dim 64 / 128 cases above are the Hopper backward's
        # (attention_sm90_bwd.cu: several key and query blocks, tails, GQA)
        os.environ["PYATTN_CUDA_ATTN_SM90"] = "cp"
        for shape in ((65, 130, 128, False, 1), (130, 65, 128, True, 2), (300, 300, 128, True, 2), (300, 200, 64, True, 1)):
            case(f"{dtype} cp (Lq, Lk, D, causal, Hkv)={shape}", lambda: one(*shape, dtype))
        # the warp-specialized kernel with 128-key blocks at non-causal HD 128 (the default there has 176)
        os.environ["PYATTN_CUDA_ATTN_SM90"] = "ws128"
        case(f"{dtype} ws128 (Lq, Lk, D, causal, Hkv)=(130, 400, 128, False, 1)",
             lambda: one(130, 400, 128, False, 1, dtype))
        # the Hopper backward's other kernels (the default, the warp-specialized dK / dV kernel also adding dQ with
        # bulk reductions, ran above): with the dQ kernel the warp-specialized one (ws, deterministic mode's) and the
        # cp.async one, and the fused one adding dQ with atomics (fusedat)
        for variant in ("ws", "cp", "fusedat"):
            os.environ["PYATTN_CUDA_ATTN_SM90_BWD"] = variant
            for shape in ((300, 300, 128, True, 1), (130, 200, 64, False, 2), (17, 300, 128, True, 1)):
                case(f"{dtype} bwd {variant} (Lq, Lk, D, causal, Hkv)={shape}", lambda: one(*shape, dtype))
        del os.environ["PYATTN_CUDA_ATTN_SM90_BWD"]
        # the forward's other grids (the default, persistent with the dynamic tile scheduler for causal calls, ran
        # above): causal tiles round-robin (wsp) and a block per tile (ws1)
        for variant in ("wsp", "ws1"):
            os.environ["PYATTN_CUDA_ATTN_SM90"] = variant
            for shape in ((300, 300, 128, True, 2), (300, 200, 64, True, 1)):
                case(f"{dtype} {variant} (Lq, Lk, D, causal, Hkv)={shape}", lambda: one(*shape, dtype))
        del os.environ["PYATTN_CUDA_ATTN_SM90"]


def gru(case):
    def cell(bsz, isz, hsz, dtype):
        x = rnd(bsz, isz, dtype=dtype).requires_grad_()
        h = rnd(bsz, hsz, dtype=dtype).requires_grad_()
        w_ih = rnd(3 * hsz, isz, dtype=dtype).requires_grad_()
        w_hh = rnd(3 * hsz, hsz, dtype=dtype).requires_grad_()
        b_ih, b_hh = rnd(3 * hsz, dtype=dtype).requires_grad_(), rnd(3 * hsz, dtype=dtype).requires_grad_()
        out = pyattn.gru_cell(x, h, w_ih, w_hh, b_ih, b_hh, backend="cuda")
        torch.autograd.grad(out, (x, h, w_ih, w_hh, b_ih, b_hh), torch.ones_like(out))

    def layer():
        module = pyattn.nn.GRU(16, 33, num_layers=2, bidirectional=True).to(DEV)
        with pyattn.use_backend("cuda"):
            out, hn = module(rnd(5, 3, 16))
            (out.sum() + hn.sum()).backward()

    for dtype in (torch.float32, torch.bfloat16):
        for bsz, isz, hsz in ((1, 3, 5), (3, 17, 33), (4, 64, 130)):
            case(f"cell {dtype} {(bsz, isz, hsz)}", lambda: cell(bsz, isz, hsz, dtype))
    case("2-layer bidirectional GRU", layer)
    # the persistent kernels on grids of 1, 3 and 7 blocks (a grid barrier per step), and the per-step path
    for blocks in ("1", "3", "7", "0"):
        os.environ["PYATTN_CUDA_GRU_BLOCKS"] = blocks
        case(f"2-layer bidirectional GRU, PYATTN_CUDA_GRU_BLOCKS={blocks}", layer)
    del os.environ["PYATTN_CUDA_GRU_BLOCKS"]
    os.environ["PYATTN_CUDA_GRU_ONE_BLOCK"] = "1"  # (the one-block forward too; by default only the backward's)
    case("2-layer bidirectional GRU, PYATTN_CUDA_GRU_ONE_BLOCK=1", layer)
    del os.environ["PYATTN_CUDA_GRU_ONE_BLOCK"]


for op in ops:
    if op not in ("norm", "attention", "gru"):
        sys.exit(f"gpu_sanitize: unknown op {op!r} in PYATTN_SANITIZE_OPS (norm, attention, gru)")
    attempt(op, globals()[op])
print(f"gpu_sanitize: ran {', '.join(ran) or 'nothing'}")
for line in skipped:
    print(f"gpu_sanitize: skipped {line}")
if not ran:
    sys.exit("gpu_sanitize: no op ran on the cuda backend: nothing was checked")
EOF

# Can compute-sanitizer run on this machine at all (some GPU sandboxes refuse the device)?
if ! "$SAN" --tool memcheck --error-exitcode 86 "$PY" -c 'import torch; torch.ones(4, device="cuda").sum().item()' \
     > "$WORK/probe.log" 2>&1; then
  cat "$WORK/probe.log" >&2
  echo "gpu_sanitize: compute-sanitizer cannot run a trivial torch program here: NOT checked" >&2
  exit 2
fi

status=0
for tool in $TOOLS; do
  extra=()
  [ "$tool" = racecheck ] && extra=(--racecheck-report hazard)
  echo "=== gpu_sanitize: $tool (ops: $PYATTN_SANITIZE_OPS)"
  t0=$SECONDS
  timeout "$TIMEOUT" "$SAN" --tool "$tool" --error-exitcode 86 --print-limit 50 "${extra[@]}" \
    "$PY" "$WORK/workload.py"
  rc=$?
  case "$rc" in
    0) echo "gpu_sanitize: $tool clean ($((SECONDS - t0))s)" ;;
    86) echo "gpu_sanitize: $tool REPORTED ERRORS ($((SECONDS - t0))s)" >&2; status=1 ;;
    124) echo "gpu_sanitize: $tool timed out after ${TIMEOUT}s" >&2; status=1 ;;
    *) echo "gpu_sanitize: the workload failed under $tool (exit $rc)" >&2; status=1 ;;
  esac
done
exit "$status"
