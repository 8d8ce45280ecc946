#!/usr/bin/env bash
# One command for a GPU machine (works offline): build pyattn with its CUDA extension, run the `gpu` tests, the
# compute-sanitizer checks of the CUDA kernels (scripts/gpu_sanitize.sh) and the whole test suite, run the full
# benchmark, and keep everything under benchmarks/results/<device-slug>/:
#   info.txt (pyattn info), build.log, test.log, sanitize.log, bench.txt (the printed table), bench.log (with
#   progress), bench.json, bench.csv, plots/*.png, summary.txt (one line per step).
# Every step runs even when an earlier one failed (a failed build still leaves the torch/triton backends to
# measure); the script exits non-zero if any step failed, after writing what it has.
#
# Uses the Python on PATH (or $PYTHON; the repo's .venv when one exists and no venv is active), which must already
# have a CUDA build of torch, plus pytest, matplotlib (and triton for the triton backend).
# Environment: TORCH_CUDA_ARCH_LIST (default "8.0;9.0a"), MAX_JOBS (default 16), PYATTN_RESULTS (output root,
# default benchmarks/results), PYATTN_BENCH_ARGS (extra `pyattn bench` arguments, e.g. "--quick"),
# PYATTN_PYTEST_ARGS (extra pytest arguments for both test steps), PYATTN_SKIP_BUILD=1 (reuse the installed build).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f "$ROOT/.venv/bin/activate" ]; then
  # shellcheck disable=SC1091
  . "$ROOT/.venv/bin/activate"
fi
PY="${PYTHON:-python}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0a}"
export MAX_JOBS="${MAX_JOBS:-16}"
# shellcheck source=scripts/cuda_env.sh
. "$ROOT/scripts/cuda_env.sh"  # CUDA_HOME, CPATH for the CUDA build

# The device slug: the GPU's name as torch (else nvidia-smi) reports it, e.g. nvidia-h100-80gb-hbm3.
GPU_NAME="$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")' \
            2>/dev/null || true)"
if [ -z "$GPU_NAME" ] && command -v nvidia-smi >/dev/null 2>&1; then
  GPU_NAME="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 || true)"
fi
NO_GPU=0
if [ -z "$GPU_NAME" ]; then
  NO_GPU=1
  GPU_NAME="cpu-$(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- || uname -m)"
  echo "gpu_run.sh: torch sees no CUDA device; results go under the CPU's name and the run counts as failed" >&2
fi
SLUG="$(printf '%s' "$GPU_NAME" | tr '[:upper:]' '[:lower:]' | sed -E 's/[^a-z0-9]+/-/g; s/^-+//; s/-+$//')"
OUT="${PYATTN_RESULTS:-$ROOT/benchmarks/results}/$SLUG"
mkdir -p "$OUT"
: > "$OUT/summary.txt"
echo "gpu_run.sh: device '$GPU_NAME' -> $OUT"

FAILED=0
step() {  # step NAME LOGFILE CMD...: run CMD, tee its output into LOGFILE (appending), record pass/fail
  local name="$1" log="$2"; shift 2
  local t0=$SECONDS
  echo "=== $name: $*" | tee -a "$log"
  "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  local line
  line="$(printf '%-10s %-4s rc=%-3s %4ss  %s' "$name" "$([ "$rc" -eq 0 ] && echo ok || echo FAIL)" "$rc" \
          "$((SECONDS - t0))" "$*")"
  echo "$line" >> "$OUT/summary.txt"
  if [ "$rc" -ne 0 ]; then
    FAILED=1
    echo "gpu_run.sh: step '$name' failed (rc=$rc), continuing" >&2
  fi
  return 0
}

rm -f "$OUT/build.log" "$OUT/test.log" "$OUT/sanitize.log" "$OUT/bench.txt" "$OUT/bench.log" "$OUT/info.txt"
if [ "${PYATTN_SKIP_BUILD:-0}" != "1" ]; then
  # --no-build-isolation: compile against the installed (CUDA) torch; --no-deps --no-index: never touch the network.
  step build "$OUT/build.log" "$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e .
fi
step info "$OUT/info.txt" "$PY" -m pyattn info
if [ -f scripts/compile_triton.py ]; then
  step ptxas "$OUT/test.log" "$PY" scripts/compile_triton.py
fi
if [ -f scripts/compile_cuda.py ]; then  # every csrc/cuda/*.cu for sm_80/sm_90a: -Werror, no spills
  step nvcc "$OUT/test.log" "$PY" scripts/compile_cuda.py
fi
gpu_tests() {  # pytest exits 5 when no test carries the gpu marker: say so, but it is not a failure
  "$PY" -m pytest -m gpu -v -ra tests ${PYATTN_PYTEST_ARGS:-}
  local rc=$?
  if [ "$rc" -eq 5 ]; then echo "gpu_run.sh: no test is marked gpu (nothing GPU-only to run)"; return 0; fi
  return "$rc"
}
# shellcheck disable=SC2086
step gpu-tests "$OUT/test.log" gpu_tests
# compute-sanitizer memcheck + racecheck of the cuda backend's kernels on small shapes (exit 2: not available here)
step sanitize "$OUT/sanitize.log" env PYTHON="$PY" bash scripts/gpu_sanitize.sh
# shellcheck disable=SC2086
step all-tests "$OUT/test.log" "$PY" -m pytest -q -ra tests ${PYATTN_PYTEST_ARGS:-}
rm -rf "$OUT/plots"
bench_run() {  # the table alone goes to bench.txt; bench.log gets everything (progress, notes)
  # shellcheck disable=SC2086
  "$PY" -m pyattn bench ${PYATTN_BENCH_ARGS:-} --json "$OUT/bench.json" --csv "$OUT/bench.csv" \
    --plot "$OUT/plots" | tee "$OUT/bench.txt"
  return "${PIPESTATUS[0]}"
}
step bench "$OUT/bench.log" bench_run

[ "$NO_GPU" -eq 1 ] && { echo "no-gpu     FAIL  torch saw no CUDA device" >> "$OUT/summary.txt"; FAILED=1; }
echo
echo "gpu_run.sh: summary ($OUT/summary.txt)"
cat "$OUT/summary.txt"
if [ "$FAILED" -ne 0 ]; then
  echo "gpu_run.sh: FAILED (see the logs in $OUT)" >&2
  exit 1
fi
echo "gpu_run.sh: all steps passed; results in $OUT"
