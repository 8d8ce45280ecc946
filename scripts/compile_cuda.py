"""Offline compile check of every CUDA source csrc/cuda/*.cu, no GPU and no torch needed.

Each .cu is compiled on its own with nvcc for sm_80 and sm_90a (one job per file and arch, run in parallel) with
the flags the real build (setup.py + torch.utils.cpp_extension) uses:
    torch's COMMON_NVCC_FLAGS  (-D__CUDA_NO_HALF_OPERATORS__ ... --expt-relaxed-constexpr)
    --compiler-options -fPIC   setup.py's NVCC_FLAGS (read from setup.py)   -std=c++17   -gencode=arch=compute_XX,code=sm_XX
plus `-Werror all-warnings -Xcompiler -Wall,-Werror -Xptxas -v`, and only -I csrc/include on the include path
(kernels are torch-free). ptxas' report is parsed per kernel; the check fails (exit 1) on a compile error or
warning, on any register spill ("bytes spill stores/loads" > 0), on static shared memory above the per-block limit
of the arch, or on ptxas' wgmma performance notes (ptxas_perf_notes). Stack frames (local arrays, calls)
are reported but do not fail the check. Shared memory a kernel allocates dynamically at launch is not visible here:
its launcher must check it against the device. With cuobjdump and nvdisasm (the toolkit's, or PyPI's
nvidia-cuda-cuobjdump and nvidia-cuda-nvdisasm) the sm_90a machine code of the wgmma kernels is checked too
(scripts/sass_rules.py: wgmma descriptors in uniform registers, the forward's P V wait after its softmax); --sass off
skips that, --sass require fails without them.

    python scripts/compile_cuda.py                      # every csrc/cuda/*.cu for sm_80 and sm_90a
    python scripts/compile_cuda.py --only layer_norm --arch 90 -v
    python scripts/compile_cuda.py --allow-missing-nvcc # exit 0 (with a message) when nvcc is not installed
    NVCC=/path/to/nvcc python scripts/compile_cuda.py   # a given nvcc (NVCC= empty: behave as if none existed)
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sass_rules  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHS = (80, 90)
# Max shared memory per block (opt-in), bytes: A100 163 KB, H100 227 KB.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
# torch.utils.cpp_extension.COMMON_NVCC_FLAGS (torch 2.4 .. 2.14; tests/test_cuda_build.py checks it against the
# installed torch when there is one). Copied so this check needs no torch.
TORCH_COMMON_NVCC_FLAGS = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr",
]
# setup.py adds -std=c++17, or c++20 when the installed torch needs it (its headers); kernels must compile as both:
# this check uses the older standard, scripts/build_cuda_ext.sh (torch 2.14) builds them as C++20.
STD_FLAG = "-std=c++17"
STRICT_FLAGS = ["-Werror", "all-warnings", "-Xcompiler", "-Wall,-Werror", "-Xptxas", "-v"]


def setup_nvcc_flags(setup_py: str = os.path.join(REPO, "setup.py")) -> list[str]:
    """The NVCC_FLAGS list literal of setup.py (read with ast, never executed)."""
    with open(setup_py) as f:
        tree = ast.parse(f.read(), setup_py)
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "NVCC_FLAGS"
                                                for t in node.targets):
            value = ast.literal_eval(node.value)
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise SystemExit("compile_cuda: setup.py's NVCC_FLAGS must be a list of strings")
            return value
    raise SystemExit("compile_cuda: setup.py defines no NVCC_FLAGS list")


def gencode(arch: int) -> str:
    """What torch emits for TORCH_CUDA_ARCH_LIST entries 8.0 / 9.0a (the -gencode form: see HOPPER notes)."""
    name = f"{arch}a" if arch == 90 else str(arch)
    return f"-gencode=arch=compute_{name},code=sm_{name}"


def find_nvcc() -> str | None:
    """$NVCC when set (only it: an empty or wrong value means "no nvcc"), else PATH, $CUDA_HOME/bin, /usr/local/cuda."""
    if "NVCC" in os.environ:
        cand = os.environ["NVCC"]
        return cand if cand and os.path.isfile(cand) and os.access(cand, os.X_OK) else None
    for cand in (shutil.which("nvcc"),
                 os.path.join(os.environ.get("CUDA_HOME", ""), "bin", "nvcc") if os.environ.get("CUDA_HOME") else None,
                 "/usr/local/cuda/bin/nvcc"):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def nvcc_command(nvcc: str, src: str, arch: int, out: str) -> list[str]:
    return ([nvcc, "-c", src, "-o", out, "-I", os.path.join(REPO, "csrc", "include")]
            + TORCH_COMMON_NVCC_FLAGS + ["--compiler-options", "-fPIC"] + setup_nvcc_flags() + [STD_FLAG]
            + [gencode(arch)] + (["-DPYATTN_SM90A"] if arch == 90 else []) + STRICT_FLAGS)


# ---- ptxas -v report ---------------------------------------------------------------------------------------
_RE_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_RE_FUNC = re.compile(r"Compiling function '([^']+)' for '(sm_\w+)'")
_RE_PROPS = re.compile(r"Function properties for (\S+)")
_RE_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_RE_USED = re.compile(r"Used (\d+) registers")
_RE_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(log: str) -> list[dict]:
    """One dict per function in a ptxas -v report: {name, arch, kind ("kernel" or "function"), regs, stack,
    spill_stores, spill_loads, smem}. "function" records are device functions ptxas compiled on their own (not
    inlined); their spills count like a kernel's."""
    records: list[dict] = []
    by_name: dict[tuple[str, str], dict] = {}
    arch = ""
    cur = None
    props_for = None

    def record(name, kind):
        rec = {"name": name, "arch": arch, "kind": kind, "regs": None, "stack": 0, "spill_stores": 0,
               "spill_loads": 0, "smem": 0}
        records.append(rec)
        by_name[(name, arch)] = rec
        return rec

    for line in log.splitlines():
        m = _RE_ENTRY.search(line)
        if m:
            arch = m.group(2)
            cur = record(m.group(1), "kernel")
            props_for = None
            continue
        m = _RE_FUNC.search(line)
        if m:
            arch = m.group(2)
            cur = record(m.group(1), "function")
            props_for = None
            continue
        m = _RE_PROPS.search(line)
        if m:
            props_for = m.group(1)
            continue
        m = _RE_FRAME.search(line)
        if m and props_for is not None:
            rec = by_name.get((props_for, arch)) or record(props_for, "function")
            rec["stack"] = int(m.group(1))
            rec["spill_stores"] = int(m.group(2))
            rec["spill_loads"] = int(m.group(3))
            continue
        m = _RE_USED.search(line)
        if m and cur is not None:
            cur["regs"] = int(m.group(1))
            s = _RE_SMEM.search(line)
            cur["smem"] = int(s.group(1)) if s else 0
    return records


def arch_number(arch: str) -> int:
    m = re.match(r"sm_(\d+)", arch or "")
    return int(m.group(1)) if m else 0


def kernel_problems(k: dict) -> list[str]:
    """Why a parsed kernel fails the check (empty: it passes)."""
    problems = []
    if k["spill_stores"] or k["spill_loads"]:
        problems.append(f"register spills: {k['spill_stores']} bytes stores, {k['spill_loads']} bytes loads")
    limit = SMEM_LIMIT.get(arch_number(k["arch"]))
    if limit is not None and k["smem"] > limit:
        problems.append(f"shared memory {k['smem']} bytes > {limit} (per-block limit of {k['arch']})")
    return problems


_DEMANGLE_CACHE: dict[str, str] = {}


def demangle(names: list[str]) -> dict[str, str]:
    """Readable kernel names (c++filt when present), without the pyattn::cuda::(anonymous namespace) prefix and
    the parameter list."""
    todo = [n for n in names if n not in _DEMANGLE_CACHE]
    cxxfilt = shutil.which("c++filt")
    if todo and cxxfilt:
        p = subprocess.run([cxxfilt], input="\n".join(todo), capture_output=True, text=True)
        outs = p.stdout.splitlines() if p.returncode == 0 else todo
        for n, d in zip(todo, outs):
            _DEMANGLE_CACHE[n] = d
    out = {}
    for n in names:
        d = _DEMANGLE_CACHE.get(n, n)
        d = re.sub(r"\(anonymous namespace\)::|pyattn::cuda::|pyattn::", "", d)
        d = re.sub(r"^void ", "", d)
        depth, cut = 0, len(d)
        for i, ch in enumerate(d):  # drop the parameter list: the first '(' outside template brackets
            if ch == "<":
                depth += 1
            elif ch == ">":
                depth -= 1
            elif ch == "(" and depth == 0:
                cut = i
                break
        out[n] = d[:cut]
    return out


# ---- one compile -------------------------------------------------------------------------------------------
def ptxas_perf_notes(log: str) -> list[str]:
    """ptxas' info lines that say a kernel's wgmmas lost their overlap: the "Potential Performance Loss" notes (wgmma
    serialized because registers of one in flight are touched before its wait, attention_sm90.cu) and C7519 (a
    warpgroup.arrive injected before a wgmma so that registers written in between reach it: seen for a 64-bit
    division inside the fused backward's step loop). Always a kernel bug here."""
    return [ln for ln in log.splitlines() if "Potential Performance Loss" in ln or "(C7519)" in ln]


def compile_one(job) -> dict:
    nvcc, src, arch, cuobjdump = job
    rel = os.path.relpath(src, REPO)
    res = {"file": rel, "arch": arch, "ok": False, "kernels": [], "error": "", "seconds": 0.0, "log": "",
           "sass": None}
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="pyattn_cc_") as d:
        cmd = nvcc_command(nvcc, src, arch, os.path.join(d, "k.o"))
        res["cmd"] = " ".join(cmd)
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        obj = os.path.join(d, "k.o")
        if p.returncode == 0 and cuobjdump and arch == 90 and os.path.basename(src) in sass_rules.SOURCES \
                and os.path.exists(obj):
            try:
                res["sass"] = sass_rules.disassemble(cuobjdump, obj)
            except RuntimeError as e:  # a failure of the check (not a crash of the script)
                res["sass_error"] = str(e)
    res["seconds"] = round(time.time() - t0, 1)
    log = p.stdout + p.stderr
    res["log"] = log
    if p.returncode != 0:
        lines = [ln for ln in log.splitlines() if ln.strip() and not ln.startswith("ptxas info")]
        res["error"] = f"nvcc failed (exit {p.returncode}):\n" + "\n".join(lines[:40])
        return res
    res["kernels"] = parse_ptxas(log)
    warnings = [ln for ln in log.splitlines() if re.search(r"\bwarning\b", ln, re.IGNORECASE)]
    problems = []
    if warnings:  # -Werror should have turned them into errors; ptxas warnings can still slip through
        problems.append("warnings:\n" + "\n".join(warnings[:20]))
    losses = ptxas_perf_notes(log)
    if losses:
        problems.append("ptxas performance-loss notes:\n" + "\n".join(losses[:20]))
    for k in res["kernels"]:
        k["problems"] = kernel_problems(k)
        if k["problems"]:
            problems.append(f"{k['name']}: " + "; ".join(k["problems"]))
    if not res["kernels"]:
        problems.append("ptxas reported no kernel (is -Xptxas -v missing, or does the file define none?)")
    if res.get("sass_error"):
        problems.append(res["sass_error"])
    res["sass_stats"] = {}
    for name, instrs in (res["sass"] or {}).items():  # the machine-code rules (scripts/sass_rules.py)
        sass_problems, res["sass_stats"][name] = sass_rules.check_kernel(name, instrs)
        problems += [f"{name}: {sp}" for sp in sass_problems[:3]]
    res["error"] = "\n".join(problems)
    res["ok"] = not problems
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[1:]))
    ap.add_argument("--only", nargs="*", help="file names in csrc/cuda (without .cu) to check")
    ap.add_argument("--arch", default=",".join(map(str, ARCHS)),
                    help="comma-separated compute capabilities (80, 90 = sm_90a); default 80,90")
    ap.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1, help="parallel nvcc jobs (default: cores)")
    ap.add_argument("-v", "--verbose", action="store_true", help="print each nvcc command and its full report")
    ap.add_argument("--allow-missing-nvcc", action="store_true",
                    help="exit 0 (after saying so) when nvcc is not installed, instead of failing")
    ap.add_argument("--sass", choices=("auto", "require", "off"), default="auto",
                    help="check the sm_90a wgmma kernels' machine code (scripts/sass_rules.py): when cuobjdump is "
                         "found (auto, the default), always (require: fail without cuobjdump), or never (off)")
    args = ap.parse_args(argv)

    nvcc = find_nvcc()
    if nvcc is None:
        msg = "compile_cuda: nvcc not found (PATH, $NVCC, $CUDA_HOME/bin): the CUDA sources were NOT checked"
        print(msg, file=sys.stderr)
        return 0 if args.allow_missing_nvcc else 1

    srcs = sorted(glob.glob(os.path.join(REPO, "csrc", "cuda", "*.cu")))
    names = [os.path.splitext(os.path.basename(s))[0] for s in srcs]
    unknown = sorted(set(args.only or ()) - set(names))
    if unknown:  # a typo must not turn the check into "0/0 ok"
        raise SystemExit(f"compile_cuda: no csrc/cuda/{unknown[0]}.cu (have: {', '.join(names) or 'none'})")
    srcs = [s for s, n in zip(srcs, names) if not args.only or n in args.only]
    archs = [int(a) for a in args.arch.split(",") if a.strip()]
    bad = [a for a in archs if a not in SMEM_LIMIT]
    if bad:
        raise SystemExit(f"compile_cuda: unsupported arch {bad[0]} (supported: {', '.join(map(str, SMEM_LIMIT))})")
    if not srcs:
        print("compile_cuda: no csrc/cuda/*.cu to check")
        return 0
    ver = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    cuobjdump = sass_rules.find_cuobjdump() if args.sass != "off" else None
    if args.sass == "require" and cuobjdump is None:
        raise SystemExit("compile_cuda: --sass require, but no cuobjdump + nvdisasm (PATH, $CUDA_HOME/bin, the "
                         "nvidia-cuda-cuobjdump / nvidia-cuda-nvdisasm wheels)")
    jobs = [(nvcc, s, a, cuobjdump) for s in srcs for a in archs]
    print(f"compile_cuda: {ver[-1] if ver else nvcc}; {len(srcs)} files x {len(archs)} archs = {len(jobs)} "
          f"compiles, {args.jobs} jobs; flags: "
          f"{' '.join(TORCH_COMMON_NVCC_FLAGS + setup_nvcc_flags() + [STD_FLAG] + STRICT_FLAGS)}",
          flush=True)

    t0 = time.time()
    results = []
    # Larger files first so the slowest compile starts early.
    jobs.sort(key=lambda j: -os.path.getsize(j[1]))
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as ex:
        for r in ex.map(compile_one, jobs):
            results.append(r)
            status = "ok" if r["ok"] else "FAIL"
            print(f"  {r['file']} sm_{r['arch']}{'a' if r['arch'] == 90 else ''}: {status}, "
                  f"{len(r['kernels'])} kernels, {r['seconds']}s", flush=True)
            if args.verbose:
                print("    " + r["cmd"])
                print(r["log"])

    names_map = demangle([k["name"] for r in results for k in r["kernels"]])
    rows = []
    for r in sorted(results, key=lambda r: (r["file"], r["arch"])):
        for k in r["kernels"]:
            rows.append((os.path.basename(r["file"]), k["arch"], str(k["regs"]), str(k["spill_stores"] + k["spill_loads"]),
                         str(k["smem"]), str(k["stack"]), "ok" if not k.get("problems") else "FAIL",
                         names_map.get(k["name"], k["name"])))
    header = ("file", "arch", "regs", "spills", "smem", "stack", "status", "kernel")
    if rows:
        widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
        widths[-1] = 0
        print()
        print(" ".join(h.ljust(w) for h, w in zip(header, widths)))
        for row in rows:
            print(" ".join(c.ljust(w) for c, w in zip(row, widths)))

    sass = {name: st for r in results for name, st in r.get("sass_stats", {}).items()}
    if sass:
        names_sass = demangle(list(sass))
        print("\nsm_90a machine code of the wgmma kernels (scripts/sass_rules.py):")
        print(f"{'instrs':>6} {'HGMMA':>5} {'R2UR':>4} {'EX2':>4} kernel")
        for name, st in sorted(sass.items(), key=lambda kv: names_sass[kv[0]]):
            print(f"{st['instructions']:>6} {st['hgmma']:>5} {st['r2ur']:>4} {st['ex2']:>4} {names_sass[name]}")
    if args.sass != "off" and 90 in archs:
        checked = sum(bool(r["sass"]) for r in results)
        if cuobjdump:
            print(f"compile_cuda: SASS rules checked on {len(sass)} kernels of {checked} objects ({cuobjdump})")
        else:
            print("compile_cuda: no cuobjdump + nvdisasm: the SASS rules (scripts/sass_rules.py) were NOT checked")
    failed = [r for r in results if not r["ok"]]
    nk = sum(len(r["kernels"]) for r in results)
    regs = [k["regs"] for r in results for k in r["kernels"] if isinstance(k["regs"], int)]
    spills = sum(k["spill_stores"] + k["spill_loads"] for r in results for k in r["kernels"])
    print(f"\ncompile_cuda: {len(results) - len(failed)}/{len(results)} compiles ok, {nk} kernels, "
          f"{spills} bytes of spills in total"
          + (f", registers {min(regs)}..{max(regs)}" if regs else "") + f", {time.time() - t0:.0f}s")
    if failed:
        print("\nFAILURES:")
        for r in failed:
            print(f"  {r['file']} sm_{r['arch']}:")
            for line in r["error"].splitlines():
                print("    " + line)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
