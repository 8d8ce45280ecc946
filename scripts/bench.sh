#!/usr/bin/env bash
# The main job (README): set up .venv from scratch if needed, then `pyattn bench` on whatever device is here.
# Extra arguments go to `pyattn bench` (e.g. --quick, --op layernorm, --json out.json --plot plots/).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
pyattn info
pyattn bench "$@"
