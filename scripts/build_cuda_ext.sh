#!/usr/bin/env bash
# Builds the WHOLE pyattn extension (C++ CPU kernels + CUDA kernels + all bindings) against a CUDA build of torch,
# on a machine without a GPU, in a copy of the source tree; then imports pyattn from that copy and checks that every
# C++ op with a CUDA implementation in csrc/bindings/cuda/*.cpp is registered for the CUDA dispatch key (and every
# op of csrc/bindings/*.cpp for CPU), and that the library holds sm_80 and sm_90a code. Nothing can RUN here (no
# GPU): this proves the CUDA build compiles, links and loads, not that the kernels are right.
# Follows the "Building the CUDA extension on a machine without a GPU" notes of the project's TESTING.md.
#
# Never touches the repository's own build (pyattn/_C*.so, build/): it works in $PYATTN_CUDA_BUILD_DIR.
# Environment:
#   PYATTN_CUDA_VENV       the CUDA-torch venv (default /work/venv-cuda); created when missing: torch==2.14.1
#                          (a CUDA 13.0 build) + ninja setuptools wheel numpy pytest; marked ready with .ready
#   PYATTN_CUDA_BUILD_DIR  where the copy is built (default /tmp/pyattn-cuda-build; kept between runs so ninja
#                          rebuilds only what changed)
#   TORCH_CUDA_ARCH_LIST   default "8.0;9.0a";  MAX_JOBS  parallel compile jobs (default: cores)
# Exits non-zero, with the end of the build log, on any failure.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PYATTN_CUDA_VENV:-/work/venv-cuda}"
BUILD="${PYATTN_CUDA_BUILD_DIR:-/tmp/pyattn-cuda-build}"
TORCH_SPEC="torch==2.14.1"
t_start=$SECONDS

die() { echo "build_cuda_ext: FAILED: $*" >&2; exit 1; }
note() { echo "build_cuda_ext: $*"; }

command -v nvcc >/dev/null 2>&1 || die "nvcc is not on PATH (the CUDA 13.0 toolkit is needed to build the CUDA kernels)"

# ---- 1. the CUDA-torch venv (one creator at a time; others wait on the lock) --------------------------------
mkdir -p "$(dirname "$VENV")"
exec 9>"$VENV.lock"
flock 9
if [ ! -f "$VENV/.ready" ]; then
  note "creating the CUDA venv $VENV ($TORCH_SPEC + build tools)"
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV" || die "python3 -m venv $VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$TORCH_SPEC" ninja setuptools wheel numpy pytest \
    || die "pip install $TORCH_SPEC into $VENV"
  "$VENV/bin/python" -c 'import torch, sys; sys.exit(0 if torch.version.cuda else 1)' \
    || die "$VENV has a torch without CUDA ($("$VENV/bin/python" -c 'import torch; print(torch.__version__)'))"
  touch "$VENV/.ready"
fi
flock -u 9
PY="$VENV/bin/python"
TORCH_INFO="$("$PY" -c 'import torch; print(torch.__version__, torch.version.cuda)')" || die "torch does not import in $VENV"
case "$TORCH_INFO" in *" None") die "$VENV has a torch without CUDA ($TORCH_INFO)";; esac
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"

# ---- 2. the toolchain environment ---------------------------------------------------------------------------
# nvcc on PATH may be a wrapper script, which defeats torch's guess of CUDA_HOME: ask nvcc where its TOP is.
probe="$(mktemp -d)"
trap 'rm -rf "$probe"' EXIT
: > "$probe/x.cu"
TOP="$(cd "$probe" && nvcc --dryrun -c x.cu 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)"
[ -n "$TOP" ] && [ -d "$TOP" ] || die "could not find CUDA_HOME from 'nvcc --dryrun' (got '$TOP')"
export CUDA_HOME="$(cd "$TOP" && pwd -P)"
[ -x "$CUDA_HOME/bin/nvcc" ] || die "CUDA_HOME=$CUDA_HOME has no bin/nvcc"
# ATen's CUDA headers include cuBLAS/cuSPARSE headers the toolkit here lacks; the venv's nvidia wheels have them.
NV_INC="$SITE/nvidia/cu13/include"
[ -d "$NV_INC" ] || die "$NV_INC is missing (the nvidia-*-cu13 wheels that come with $TORCH_SPEC)"
export CPATH="$NV_INC${CPATH:+:$CPATH}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0a}"
export PYATTN_CUDA=1
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
unset PYATTN_DISABLE_EXT TRITON_INTERPRET
note "torch $TORCH_INFO ($VENV), CUDA_HOME=$CUDA_HOME, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS"

# ---- 3. a copy of the source tree ---------------------------------------------------------------------------
# The working tree as it is (untracked files included), without git data, built products or caches, synced into
# $BUILD/src by content: only files whose bytes changed are rewritten (so they get a new mtime and ninja rebuilds
# exactly what changed; copying mtimes instead would let an object built from an older copy look up to date), and
# files gone from the tree are removed. Object files live in $BUILD/tmp.
SRC="$BUILD/src"
mkdir -p "$BUILD"
exec 8>"$BUILD.lock"  # one build per folder at a time
flock 8
# A folder from another layout (e.g. an mtime-preserving copy) cannot be trusted for incremental builds: start over.
if [ "$(cat "$BUILD/.layout" 2>/dev/null)" != "content-sync-1" ]; then
  rm -rf "$BUILD/src" "$BUILD/tmp"
  echo "content-sync-1" > "$BUILD/.layout"
fi
mkdir -p "$SRC"
python3 - "$ROOT" "$SRC" <<'EOF_SYNC' || die "copying $ROOT to $SRC"
import filecmp
import fnmatch
import os
import shutil
import sys

root, dst = sys.argv[1], sys.argv[2]
SKIP_DIRS = {".git", "build", "__pycache__", ".pytest_cache", ".benchmarks"}
SKIP_FILES = ("*.so", "*.o", "*.pyc")
KEEP = {os.path.join("pyattn", "_build_info.py")}  # written by setup.py in the copy


def skip_dir(name):
    return name in SKIP_DIRS or name.startswith(".venv") or name.endswith(".egg-info")


def skip_file(rel):
    return rel in KEEP or any(fnmatch.fnmatch(os.path.basename(rel), pat) for pat in SKIP_FILES)


want = set()
changed = 0
for d, dirs, files in os.walk(root):
    dirs[:] = [x for x in dirs if not skip_dir(x)]
    for f in files:
        src = os.path.join(d, f)
        rel = os.path.relpath(src, root)
        if skip_file(rel) or not os.path.isfile(src):
            continue
        want.add(rel)
        out = os.path.join(dst, rel)
        if os.path.isfile(out) and filecmp.cmp(src, out, shallow=False):
            continue
        os.makedirs(os.path.dirname(out), exist_ok=True)
        shutil.copyfile(src, out)
        shutil.copymode(src, out)
        changed += 1
removed = 0
for d, dirs, files in os.walk(dst, topdown=True):
    dirs[:] = [x for x in dirs if not skip_dir(x)]
    for f in files:
        rel = os.path.relpath(os.path.join(d, f), dst)
        if rel not in want and not skip_file(rel):
            os.remove(os.path.join(d, f))
            removed += 1
print(f"build_cuda_ext: synced {len(want)} files into {dst} ({changed} written, {removed} removed)")
EOF_SYNC
note "building in $SRC (log: $BUILD/build.log)"

# ---- 4. build -----------------------------------------------------------------------------------------------
# build_ext --inplace (not pip install -e): the shared venv is left untouched; the library lands in $SRC/pyattn.
t_build=$SECONDS
if ! (cd "$SRC" && "$PY" setup.py build_ext --inplace --build-temp "$BUILD/tmp") > "$BUILD/build.log" 2>&1; then
  echo "----- last 80 lines of $BUILD/build.log -----" >&2
  tail -n 80 "$BUILD/build.log" >&2
  die "the build failed (full log: $BUILD/build.log)"
fi
note "build ok in $((SECONDS - t_build))s"

# ---- 5. import and registration checks ----------------------------------------------------------------------
cd "$SRC"
CUOBJDUMP="$(command -v cuobjdump || true)"
[ -n "$CUOBJDUMP" ] || CUOBJDUMP="$(ls "$SITE"/triton/backends/nvidia/bin/cuobjdump 2>/dev/null || true)"
PYTHONPATH="$SRC" CUOBJDUMP="$CUOBJDUMP" "$PY" - <<'EOF' || die "the import/registration check failed"
import glob
import os
import re
import subprocess
import sys

import torch

import pyattn
from pyattn._ext import build_info, load_C

src = os.getcwd()
mod, why = load_C()
if mod is None:
    sys.exit(f"pyattn._C does not load: {why}")
if os.path.dirname(os.path.abspath(mod.__file__)) != os.path.join(src, "pyattn"):
    sys.exit(f"imported the wrong pyattn._C: {mod.__file__} (expected the one built in {src})")
info = build_info()
if not info.get("with_cuda"):
    sys.exit(f"pyattn._C was built without CUDA: {info}")
print(f"build_cuda_ext: pyattn._C = {mod.__file__}")
print(f"build_cuda_ext: build info: torch {info['torch']}, cuda {info['cuda']}, archs {info['cuda_archs']}, "
      f"{len(info['sources'])} sources")


def impl_ops(pattern, key):
    """{op: file} for every m.impl("op", ...) inside TORCH_LIBRARY_IMPL(pyattn, <key>, m) { ... } blocks (CUDA:
    PYATTN_CUDA_IMPL(m) { ... }, which is that block outside the emulator build; csrc/bindings/cuda_device.h)."""
    ops = {}
    head = r"PYATTN_CUDA_IMPL\(\s*(\w+)\s*\)" if key == "CUDA" else \
        r"TORCH_LIBRARY_IMPL\(\s*pyattn\s*,\s*" + key + r"\s*,\s*(\w+)\s*\)"
    block = re.compile(head + r"\s*\{(.*?)\n\}", re.S)
    for path in sorted(glob.glob(os.path.join(src, pattern))):
        text = open(path).read()
        for m in block.finditer(text):
            for op in re.findall(r"\b" + m.group(1) + r"\s*\.\s*impl\(\s*\"([\w.]+)\"", m.group(2)):
                ops[op] = os.path.relpath(path, src)
    return ops


failures = []
for pattern, key in (("csrc/bindings/cuda/*.cpp", "CUDA"), ("csrc/bindings/*.cpp", "CPU")):
    ops = impl_ops(pattern, key)
    if not ops:
        failures.append(f"no {key} registration block with m.impl(...) found in {pattern}")
    for op, path in sorted(ops.items()):
        ok = torch._C._dispatch_has_kernel_for_dispatch_key(f"pyattn::{op}", key)
        print(f"build_cuda_ext: pyattn::{op:<20} {key:<4} {'registered' if ok else 'MISSING'}  ({path})")
        if not ok:
            failures.append(f"pyattn::{op} has no {key} kernel although {path} implements it")

# The cuda backend must say why it cannot run here (no device), not that the build lacks CUDA.
if not torch.cuda.is_available():
    status = {name: (ok, reason) for name, ok, reason in pyattn.backends()}
    ok, reason = status.get("cuda", (None, "not registered"))
    print(f"build_cuda_ext: backend cuda: available={ok} ({reason})")
    if ok or "no CUDA device" not in reason:
        failures.append(f"cuda backend status unexpected without a GPU: available={ok}, reason={reason!r}")

# Device code for each arch of TORCH_CUDA_ARCH_LIST (sm_80 and sm_90a by default).
cuobjdump = os.environ.get("CUOBJDUMP")
want = sorted({"sm_" + a.replace(".", "").replace("+PTX", "")
               for a in os.environ["TORCH_CUDA_ARCH_LIST"].replace(" ", ";").split(";") if a})
if cuobjdump:
    out = subprocess.run([cuobjdump, "--list-elf", mod.__file__], capture_output=True, text=True)
    have = sorted(set(re.findall(r"\.(sm_\w+)\.cubin", out.stdout)))
    print(f"build_cuda_ext: cubins in pyattn._C: {', '.join(have) or 'none'}")
    for arch in want:
        if arch not in have:
            failures.append(f"pyattn._C has no {arch} code (cuobjdump --list-elf: {have})")
else:
    print("build_cuda_ext: cuobjdump not found: the archs of the device code were not checked")

if failures:
    print("build_cuda_ext: FAILURES:\n  " + "\n  ".join(failures), file=sys.stderr)
    sys.exit(1)
EOF
note "OK: the CUDA extension builds, loads, and registers its CUDA kernels ($((SECONDS - t_start))s in total)"
