"""Rules on the SASS (machine code) of the Hopper attention kernels, checked offline by scripts/compile_cuda.py.

ptxas decides things that decide the speed of a wgmma kernel and that no compile error reports; two of them bit
this project before any GPU run could show it (docs/design.md), so the compile check now reads the machine code
(cuobjdump -sass of the sm_90a object) of every kernel that issues wgmma (HGMMA) and fails when:
  uniform-descriptors  an HGMMA issue run (WARPGROUP.ARRIVE .. the HGMMA that closes the group, gsb0) contains an
                       R2UR: a matrix descriptor computed in per-thread registers and moved into a uniform one before
                       each wgmma (~8-12 instructions between consecutive wgmmas instead of 2-4). Causes: a role
                       branch on threadIdx.x (warpgroup_uniform), a stage picked from a per-thread value,
                       make_desc per k-step (desc_at).
  pv-wait-after-softmax  (forward kernels) the P V's wait (WARPGROUP.DEPBAR.LE gsb0, 0x0 after the S wait
                       DEPBAR.LE gsb0, 0x1) is followed by an exp2 (MUFU.EX2) in the straight-line code after it:
                       ptxas hoisted the wait into the softmax, which then waits for the P V (Steps::pin).
cuobjdump and the nvdisasm it runs come with the CUDA toolkit, or from PyPI (nvidia-cuda-cuobjdump and
nvidia-cuda-nvdisasm, which scripts/setup_env.sh installs where nvcc is present).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sysconfig

# Sources whose sm_90a kernels are checked (the others issue no wgmma).
SOURCES = ("attention_sm90.cu", "attention_sm90_bwd.cu")

_RE_FUNC = re.compile(r"^\s*Function : (\S+)", re.MULTILINE)
_RE_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def _executable(path: str | None) -> bool:
    return bool(path) and os.path.isfile(path) and os.access(path, os.X_OK)


def _candidates(tool: str) -> list[str]:
    """PATH, $CUDA_HOME/bin, /usr/local/cuda/bin, then the NVIDIA wheels' bin folders in this interpreter's
    site-packages (nvidia-cuda-cuobjdump, nvidia-cuda-nvdisasm)."""
    cands = [shutil.which(tool) or "", os.path.join(os.environ.get("CUDA_HOME", "/nonexistent"), "bin", tool),
             os.path.join("/usr/local/cuda/bin", tool)]
    for site in sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}):
        cands += sorted(glob.glob(os.path.join(site, "nvidia", "*", "bin", tool)))
    return cands


def find_cuobjdump() -> str | None:
    """A cuobjdump that can print SASS: $CUOBJDUMP when set (only it), else the first of _candidates, and in every
    case an nvdisasm beside it or found the same way (cuobjdump -sass runs nvdisasm; disassemble points it there)."""
    if "CUOBJDUMP" in os.environ:
        cands = [os.environ["CUOBJDUMP"]]
    else:
        cands = _candidates("cuobjdump")
    tool = next((c for c in cands if _executable(c)), None)
    return tool if tool and find_nvdisasm(tool) else None


def find_nvdisasm(cuobjdump: str) -> str | None:
    beside = os.path.join(os.path.dirname(cuobjdump), "nvdisasm")
    return next((c for c in [beside] + _candidates("nvdisasm") if _executable(c)), None)


def sass_text(tool: str, path: str) -> str:
    """cuobjdump -sass of an object file or shared library, with the nvdisasm it runs on its PATH (RuntimeError with
    cuobjdump's message when it fails)."""
    nvdisasm = find_nvdisasm(tool)
    env = dict(os.environ, PATH=os.pathsep.join([os.path.dirname(nvdisasm or tool), os.environ.get("PATH", "")]))
    p = subprocess.run([tool, "-sass", path], capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"{tool} -sass failed (exit {p.returncode}): {p.stderr.strip()[:300]}")
    return p.stdout


def disassemble(tool: str, obj: str) -> dict[str, list[tuple[int, str, str]]]:
    """{mangled kernel name: [(address, opcode, operands), ...]} of an object file's SASS."""
    return parse_sass(sass_text(tool, obj))


def parse_sass(text: str) -> dict[str, list[tuple[int, str, str]]]:
    """cuobjdump -sass output -> {mangled kernel name: [(address, opcode, operands), ...]} (predicates dropped)."""
    out: dict[str, list[tuple[int, str, str]]] = {}
    starts = [(m.start(), m.group(1)) for m in _RE_FUNC.finditer(text)] + [(len(text), "")]
    for (a, name), (b, _) in zip(starts, starts[1:]):
        out[name] = [(int(m.group(1), 16), m.group(2), m.group(3).strip()) for m in _RE_INSTR.finditer(text, a, b)]
    return out


def check_kernel(name: str, instrs: list[tuple[int, str, str]]) -> tuple[list[str], dict]:
    """(problems, stats) of one kernel's SASS; stats: instructions, HGMMA, R2UR, MUFU.EX2 counts."""
    ops = [op for _, op, _ in instrs]
    stats = {"instructions": len(ops), "hgmma": sum(op.startswith("HGMMA") for op in ops),
             "r2ur": ops.count("R2UR"), "ex2": ops.count("MUFU.EX2")}
    problems: list[str] = []
    if not stats["hgmma"]:
        return problems, stats
    in_run = False
    for addr, op, args in instrs:
        if op == "WARPGROUP.ARRIVE":
            in_run = True
        elif in_run and op == "R2UR":
            problems.append(f"uniform-descriptors: R2UR at {addr:#x} inside an HGMMA issue run")
            in_run = False  # (one report per run)
        elif op.startswith("HGMMA") and "gsb0" in args:
            in_run = False
    if "attn_fwd_sm90" in name:
        after_pv_wait, last_wait, wait_addr = False, "", 0
        for addr, op, args in instrs:
            if op == "WARPGROUP.DEPBAR.LE":
                wait = args.replace(" ", "")
                # the P V's wait: a wait for all groups right after the S wait (for all but one)
                after_pv_wait = wait == "gsb0,0x0" and last_wait == "gsb0,0x1"
                last_wait, wait_addr = wait, addr
            elif after_pv_wait and op == "MUFU.EX2":
                problems.append(f"pv-wait-after-softmax: exp2 at {addr:#x} after the P V's wait at {wait_addr:#x}")
                after_pv_wait = False
            elif op.startswith(("HGMMA", "BRA", "EXIT")) or op == "WARPGROUP.ARRIVE":
                after_pv_wait = False  # (the straight-line code after the wait: where a hoisted wait leaves exp2s)
    return problems, stats
