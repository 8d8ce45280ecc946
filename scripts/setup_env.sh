#!/usr/bin/env bash
# Creates (or reuses) the virtual environment .venv and installs pyattn into it with everything the tests and
# benchmarks need. Safe to run again. On a machine without torch it installs the pinned CPU build
# (torch==2.13.0); a machine that already has torch (e.g. a GPU box with a CUDA build) keeps its own, because
# the venv sees the system site-packages. Source it (`. scripts/setup_env.sh`) or run it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PYATTN_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv --system-site-packages "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
pip_q() { python -m pip install -q --disable-pip-version-check "$@"; }
python -c "import torch" 2>/dev/null || pip_q "torch==2.13.0"
python -c "import triton" 2>/dev/null || pip_q "triton>=3.7,<3.10"
pip_q setuptools wheel ninja numpy pytest pytest-xdist expecttest hypothesis matplotlib tqdm
# Where nvcc is (scripts/compile_cuda.py checks the kernels offline), cuobjdump and nvdisasm too: the compile check
# then reads the Hopper attention kernels' machine code (scripts/sass_rules.py). PyPI ships both on their own when
# the toolkit lacks them.
CUDA_BIN="${CUDA_HOME:-/usr/local/cuda}/bin"
if { command -v nvcc || [ -x "$CUDA_BIN/nvcc" ]; } >/dev/null 2>&1 \
    && ! { { command -v cuobjdump || [ -x "$CUDA_BIN/cuobjdump" ]; } \
           && { command -v nvdisasm || [ -x "$CUDA_BIN/nvdisasm" ]; }; } >/dev/null 2>&1; then
  pip_q nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm || echo "setup_env: no cuobjdump / nvdisasm (pip install" \
    "nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm failed): the compile check will say it skipped the SASS rules" >&2
fi
# --no-build-isolation: compile against the torch installed above instead of fetching another one.
(cd "$ROOT" && MAX_JOBS="${MAX_JOBS:-2}" pip_q --no-build-isolation -e ".[test,bench]")
