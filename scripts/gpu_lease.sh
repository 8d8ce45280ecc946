#!/usr/bin/env bash
# The GPU checks that fit one short lease (this workplace lends a GPU for ~15 minutes of device time, start-up
# included): one command, under a wall-clock budget, that
#   1. builds pyattn with its CUDA extension for this GPU's arch only (sm_90a on Hopper, sm_80 otherwise), then
#      times the CUDA attention forward's and backward's kernels against each other and torch
#      (scripts/attn_fwd_variants.py, scripts/attn_bwd_variants.py) and
#      the CUDA GRU forward's grids against cuDNN (scripts/gru_fwd_grids.py) and the GRU cell step's paths against
#      torch.nn.GRUCell (scripts/gru_cell_paths.py),
#   2. runs the `gpu` tests (pytest-xdist workers) and, at the same time, compute-sanitizer memcheck and racecheck
#      of the cuda backend's kernels (scripts/gpu_sanitize.sh; correctness only, so they may share the GPU) and the
#      rest of the suite (the CPU tests, under this machine's torch / Triton / compiler),
#   3. then, alone on the GPU, the benchmarks in priority order (attention --quick, which holds the PERF.md
#      L >= 4k, D = 128 shapes; then layernorm, gru and decode --quick while the budget lasts), and on Hopper an
#      Nsight Compute profile and the SASS of the attention kernels (scripts/attn_profile.py),
# and packs every log, JSON, CSV and plot into one tarball. Each step is cut off by its own share of the budget, so
# the script ends (and the tarball is written) inside the budget even when a step hangs.
# scripts/gpu_run.sh is the unhurried version of the same (both architectures, the whole suite, the full benchmark).
#
# Usage: bash scripts/gpu_lease.sh      Environment:
#   PYTHON               the CUDA torch's python (default python3)
#   PYATTN_LEASE_BUDGET  seconds for the whole script (default 540)
#   PYATTN_LEASE_OUT     where the tarball and summary go (default $OUT when set, else /tmp/pyattn-lease)
#   PYATTN_LEASE_BENCH   which benchmarks, in order (default "attention layernorm gru decode"; "none": no benchmark)
#   PYATTN_LEASE_TEST_SHARE  % of the time left after the build that the tests get (default 55; the rest: benchmarks)
#   PYATTN_LEASE_CPU_TESTS   0: skip the CPU tests (default 1: run them beside the gpu tests)
#   PYATTN_LEASE_PYTEST_K    a pytest -k expression for the gpu tests (default: all of them)
#   PYATTN_LEASE_GRU_GRIDS   0: skip scripts/gru_fwd_grids.py (default 1)
#   PYATTN_LEASE_GRU_CELL    0: skip scripts/gru_cell_paths.py (default 1)
#   PYATTN_LEASE_ATTN_BWD    0: skip scripts/attn_bwd_variants.py (default 1)
#   PYATTN_LEASE_PROFILE     0: skip the Nsight Compute profile and SASS of the Hopper attention kernels (default 1)
# Writes <out>/results.tgz (benchmarks/results/<device-slug>/: build.log, info.txt, gpu-attn-variants.{log,json},
# gpu-attn-bwd-variants.{log,json}, gpu-gru-grids.{log,json}, gpu-gru-cell-paths.{log,json},
# gpu-tests.log, cpu-tests.log, sanitize-memcheck.log, sanitize-racecheck.log, gpu-<op>.{log,json,csv}, plots/,
# ncu-attn-sm90.txt, sass/) and
# <out>/summary.txt.
# Exit status: 0 when every step that ran passed and the attention forward variants were timed, 1 otherwise.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
BUDGET="${PYATTN_LEASE_BUDGET:-540}"
DEST="${PYATTN_LEASE_OUT:-${OUT:-/tmp/pyattn-lease}}"
T0=$SECONDS
left() { echo $((BUDGET - (SECONDS - T0))); }
mkdir -p "$DEST"

GPU_NAME="$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))' 2>/dev/null || true)"
[ -n "$GPU_NAME" ] || { echo "gpu_lease: torch sees no CUDA device" | tee "$DEST/summary.txt"; exit 1; }
SLUG="$(printf '%s' "$GPU_NAME" | tr '[:upper:]' '[:lower:]' | sed -E 's/[^a-z0-9]+/-/g; s/^-+//; s/-+$//')"
RES="$ROOT/benchmarks/results/$SLUG"
mkdir -p "$RES"
SUM="$DEST/summary.txt"
: > "$SUM"
MAJOR="$("$PY" -c 'import torch; print(torch.cuda.get_device_capability(0)[0])')"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$([ "$MAJOR" -ge 9 ] && echo 9.0a || echo 8.0)}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
# shellcheck source=scripts/cuda_env.sh
. "$ROOT/scripts/cuda_env.sh"  # CUDA_HOME, CPATH for the CUDA build
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET PYATTN_BACKEND

FAILED=0
record() {  # record NAME RC SECONDS
  local verdict=ok
  [ "$2" -ne 0 ] && { verdict=FAIL; FAILED=1; }
  [ "$2" -eq 124 ] && verdict=TIMEOUT
  printf '%-18s %-7s rc=%-3s %4ss\n' "$1" "$verdict" "$2" "$3" | tee -a "$SUM"
}
step() {  # step NAME MAX_SECONDS RESERVE_SECONDS LOG CMD...: run with timeout min(MAX, left - RESERVE)
  # (the reserves are sized for the default budget of 540 s and shrink with a smaller one: a 200 s budget once
  # reserved 200 s after the build, so the build was skipped and nothing ran)
  local name="$1" max="$2" reserve="$3" log="$4"; shift 4
  [ "$BUDGET" -lt 540 ] && reserve=$(( reserve * BUDGET / 540 ))
  local lim=$(( $(left) - reserve )); [ "$lim" -gt "$max" ] && lim="$max"
  if [ "$lim" -lt 10 ]; then echo "$name: skipped, budget spent" | tee -a "$SUM"; return; fi
  local t0=$SECONDS
  echo "=== $name (limit ${lim}s): $*" >> "$log"
  timeout -k 5 "$lim" "$@" >> "$log" 2>&1
  record "$name" $? $((SECONDS - t0))
}

{ echo "device: $GPU_NAME (sm_${MAJOR}x), archs $TORCH_CUDA_ARCH_LIST, budget ${BUDGET}s"; nvidia-smi -L
  "$PY" -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)'
} 2>&1 | tee "$RES/env.txt" | tee -a "$SUM"

step build 300 200 "$RES/build.log" "$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e .
step info 60 180 "$RES/info.txt" "$PY" -m pyattn info
# The CUDA attention forward's kernels against each other and torch in one process (the number PERF.md asks for)
rm -f "$RES/gpu-attn-variants.json"
step attn-variants 150 160 "$RES/gpu-attn-variants.log" "$PY" scripts/attn_fwd_variants.py \
  --json "$RES/gpu-attn-variants.json"
# ... and the backward's (the Hopper wgmma kernels against the mma.sync ones, Triton and torch)
if [ "${PYATTN_LEASE_ATTN_BWD:-1}" != 0 ]; then
  rm -f "$RES/gpu-attn-bwd-variants.json"
  step attn-bwd-variants 90 150 "$RES/gpu-attn-bwd-variants.log" "$PY" scripts/attn_bwd_variants.py \
    --json "$RES/gpu-attn-bwd-variants.json"
fi
# The GRU forward's grids (the persistent kernel's PYATTN_CUDA_GRU_BLOCKS) against cuDNN, for gru_rec_fwd_plan
if [ "${PYATTN_LEASE_GRU_GRIDS:-1}" != 0 ]; then
  step gru-grids 90 150 "$RES/gpu-gru-grids.log" "$PY" scripts/gru_fwd_grids.py --json "$RES/gpu-gru-grids.json"
fi
# The GRU cell step's paths (the one-launch kernel against the sequence path and torch), for gru_cell_fwd_plan
if [ "${PYATTN_LEASE_GRU_CELL:-1}" != 0 ]; then
  step gru-cell-paths 60 140 "$RES/gpu-gru-cell-paths.log" "$PY" scripts/gru_cell_paths.py \
    --json "$RES/gpu-gru-cell-paths.json"
fi

# Tests and sanitizer side by side (correctness only); the benchmarks keep the last ~45% of what is left.
share=$(( ($(left) * ${PYATTN_LEASE_TEST_SHARE:-55}) / 100 ))
t0=$SECONDS
# (-v: every test's name and verdict as it finishes, so a run cut off by its time share still says which passed;
# 10 workers: the H100's run 1 got through 63% of the suite in its 104 s with 6 beside the sanitizers, while 12 alone
# took 99 s for all of it)
timeout -k 5 "$share" "$PY" -m pytest -m gpu ${PYATTN_LEASE_PYTEST_K:+-k "$PYATTN_LEASE_PYTEST_K"} -n 10 -v -ra \
  -p no:cacheprovider --timeout 240 tests > "$RES/gpu-tests.log" 2>&1 &
p_tests=$!
# The CPU tests too: on the H200 they would have caught the static-libstdc++ build (tests/test_extension_runtime.py).
p_cpu=
if [ "${PYATTN_LEASE_CPU_TESTS:-1}" != 0 ]; then
  OMP_NUM_THREADS=2 timeout -k 5 "$share" "$PY" -m pytest -m "not gpu" -n 8 -q -ra -p no:cacheprovider --timeout 240 \
    tests > "$RES/cpu-tests.log" 2>&1 &
  p_cpu=$!
fi
for tool in memcheck racecheck; do
  PYATTN_SANITIZE_TOOLS=$tool PYATTN_SANITIZE_TIMEOUT=$((share - 10)) PYTHON="$PY" \
    timeout -k 5 "$share" bash scripts/gpu_sanitize.sh > "$RES/sanitize-$tool.log" 2>&1 &
  eval "p_$tool=$!"
done
wait "$p_tests"; record gpu-tests $? $((SECONDS - t0))
[ -n "$p_cpu" ] && { wait "$p_cpu"; record cpu-tests $? $((SECONDS - t0)); }
wait "$p_memcheck"; record sanitize-memcheck $? $((SECONDS - t0))
wait "$p_racecheck"; record sanitize-racecheck $? $((SECONDS - t0))

bench() {  # bench OP MAX RESERVE
  step "bench-$1" "$2" "$3" "$RES/gpu-$1.log" "$PY" -m pyattn bench --op "$1" --device cuda --quick \
    --json "$RES/gpu-$1.json" --csv "$RES/gpu-$1.csv" --plot "$RES/plots"
}
for op in ${PYATTN_LEASE_BENCH:-attention layernorm gru decode}; do
  case "$op" in
    attention) bench attention 240 25 ;;
    layernorm) bench layernorm 90 20 ;;
    gru) bench gru 60 15 ;;
    decode) bench decode 60 10 ;;
  esac
done
# Last, for tuning offline: Nsight Compute's sections of the Hopper attention kernels (the default forward,
# non-causal and causal, and the backward's dK / dV and dQ kernels at D = 128, L = 4096; the warm-up's 4 launches
# skipped) and their SASS (scripts/attn_profile.py)
NCU="$(command -v ncu || echo "${CUDA_HOME:-/usr/local/cuda}/bin/ncu")"
if [ "${PYATTN_LEASE_PROFILE:-1}" != 0 ] && [ "$MAJOR" -eq 9 ] && [ -x "$NCU" ]; then
  step attn-profile 90 5 "$RES/ncu-attn-sm90.txt" "$NCU" --clock-control none --kernel-name regex:sm90 \
    --launch-skip 4 --launch-count 4 --section SpeedOfLight --section ComputeWorkloadAnalysis \
    --section MemoryWorkloadAnalysis --section SchedulerStats --section WarpStateStats --section Occupancy \
    --section LaunchStats "$PY" scripts/attn_profile.py run
  step attn-sass 30 0 "$RES/sass.log" "$PY" scripts/attn_profile.py sass "$RES/sass"
fi

echo "--- attention forward variants"; cat "$RES/gpu-attn-variants.log"
[ -f "$RES/gpu-attn-bwd-variants.log" ] && { echo "--- attention backward variants"; cat "$RES/gpu-attn-bwd-variants.log"; }
[ -f "$RES/gpu-gru-grids.log" ] && { echo "--- gru forward grids"; cat "$RES/gpu-gru-grids.log"; }
echo "--- tests"; tail -n 40 "$RES/gpu-tests.log"
[ -n "$p_cpu" ] && { echo "--- cpu tests"; tail -n 15 "$RES/cpu-tests.log"; }
for tool in memcheck racecheck; do echo "--- $tool"; tail -n 15 "$RES/sanitize-$tool.log"; done
for op in attention layernorm gru decode; do
  [ -f "$RES/gpu-$op.log" ] && { echo "--- bench $op"; grep -E "MET|MISS|pyattn:cuda|Traceback|Error" "$RES/gpu-$op.log" | tail -n 40; }
done
tar -czf "$DEST/results.tgz" -C "$ROOT/benchmarks/results" "$SLUG"
echo "--- summary ($(( SECONDS - T0 ))s of ${BUDGET}s)"; cat "$SUM"
[ -s "$RES/gpu-attn-variants.json" ] || FAILED=1
exit "$FAILED"
