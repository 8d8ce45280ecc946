"""Offline compile check of every shipped Triton kernel configuration, no GPU needed.

Every module kernels/<name>.py that defines `compile_configs()` contributes configurations: a list of
    (kernel_fn, signature, constexprs, num_warps)            or
    (kernel_fn, signature, constexprs, num_warps, options)   options: extra triton.compile options,
                                                              e.g. {"num_stages": 3}, and optionally
                                                              "archs": the compute capabilities the
                                                              configuration is launched on (default all)
where signature maps every argument name to a Triton type string ("*fp32", "*bf16", "i32", "fp32",
"constexpr") and constexprs gives the constexpr values. Each configuration is compiled with
triton.compile for sm_80 and sm_90a (Triton -> PTX), then the PTX goes through the same ptxas Triton
uses for that arch with -v, and the check fails (exit 1) on a compile error, a register spill, a local
stack frame, or shared memory above the per-block limit.

Pointer arguments are compiled as 16-byte aligned and integer arguments as multiples of 16 (the
specialization the JIT picks for typical shapes); --unaligned also compiles the unspecialized variant.

    python scripts/compile_triton.py                 # representative set per kernel file
    python scripts/compile_triton.py --full          # every shipped configuration (slow)
    python scripts/compile_triton.py --only layernorm --arch 90 -j 2
    python scripts/compile_triton.py --full --match "fwd_kernel .*BLOCK_N=4096"   # a subset

Works with Triton 3.x (3.6 .. 3.9): ASTSource(fn, signature, constexprs, attrs) and GPUTarget.
"""

import os

os.environ.pop("TRITON_INTERPRET", None)  # must compile for real, never interpret

import argparse  # noqa: E402
import concurrent.futures  # noqa: E402
import glob  # noqa: E402
import importlib  # noqa: E402
import inspect  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHS = (80, 90)
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # max shared memory per block (opt-in), bytes

warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")


def _import_triton():
    if os.environ.get("TRITON_INTERPRET"):
        raise RuntimeError("TRITON_INTERPRET must not be set for the compile check")
    import triton  # noqa: F401

    return triton


def kernel_modules(only=None):
    """Names of kernels/*.py modules (optionally filtered); an unknown name in ``only`` is an error."""
    paths = sorted(glob.glob(os.path.join(REPO, "kernels", "*.py")))
    every = [n for n in (os.path.splitext(os.path.basename(p))[0] for p in paths) if not n.startswith("_")]
    unknown = sorted(set(only or ()) - set(every))
    if unknown:  # a typo must not turn the check into "0/0 compiles ok"
        raise SystemExit(f"compile_triton: no kernel file kernels/{unknown[0]}.py (have: {', '.join(every)})")
    return [n for n in every if not only or n in only]


def _load_module(name):
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    return importlib.import_module(f"kernels.{name}")


def _module_configs(mod, full):
    fn = mod.compile_configs
    if "full" in inspect.signature(fn).parameters:
        return list(fn(full=full))
    return list(fn())


def collect(only, full, match=None):
    """[(module_name, index, label, archs)] for every configuration (optionally only those whose
    "kernel config" text matches the regex `match`; archs: the configuration's "archs" option or None = all);
    import failures become errors."""
    items, errors = [], []
    for name in kernel_modules(only):
        try:
            mod = _load_module(name)
        except Exception as e:  # a kernel file that does not even import is a failure
            errors.append(f"kernels/{name}.py: import failed: {type(e).__name__}: {e}")
            continue
        if not hasattr(mod, "compile_configs"):
            continue
        for i, cfg in enumerate(_module_configs(mod, full)):
            kernel, desc = describe(cfg)
            if match and not re.search(match, f"{kernel} {desc}"):
                continue
            items.append((name, i, (kernel, desc), _options(cfg).get("archs")))
    return items, errors


def _options(cfg):
    return dict(cfg[4]) if len(cfg) > 4 and cfg[4] else {}


def describe(cfg):
    fn, sig, consts, num_warps = cfg[:4]
    # Pointer dtypes: the first pointer's type, then each other type with the arguments that have it.
    ptrs = [(k, v[1:]) for k, v in sig.items() if isinstance(v, str) and v.startswith("*")]
    parts = [ptrs[0][1]] if ptrs else []
    for ty in dict.fromkeys(t for _, t in ptrs[1:]):
        if ptrs and ty != ptrs[0][1]:
            parts.append(f"{ty}[{','.join(k for k, t in ptrs if t == ty)}]")
    for k, v in consts.items():
        if isinstance(v, bool):
            if v:
                parts.append(k)
        else:
            parts.append(f"{k}={v}")
    parts.append(f"warps={num_warps}")
    parts += [f"{k}={v}" for k, v in _options(cfg).items() if k != "archs"]
    return getattr(fn, "__name__", str(fn)), " ".join(parts)


def _attrs(fn, sig, aligned):
    """tt.divisibility=16 on every pointer and integer argument (what the JIT specializes to for
    aligned tensors and sizes that are multiples of 16)."""
    if not aligned:
        return {}
    attrs = {}
    for name, ty in sig.items():
        if isinstance(ty, str) and (ty.startswith("*") or ty in ("i32", "i64", "u32", "u64")):
            attrs[(fn.arg_names.index(name),)] = [["tt.divisibility", 16]]
    return attrs


def _ptxas_for(arch):
    """The ptxas Triton itself uses for this arch, else the bundled one, else the system's."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        path = get_ptxas(arch).path
        if path:
            return path
    except Exception:
        pass
    import triton

    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if os.path.exists(bundled):
        return bundled
    return shutil.which("ptxas")


_RE_REGS = re.compile(r"Used (\d+) registers")
_RE_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_RE_STACK = re.compile(r"(\d+) bytes stack frame")
_RE_SMEM = re.compile(r"(\d+) bytes smem")


def _run_ptxas(ptx, arch):
    ptxas = _ptxas_for(arch)
    if ptxas is None:
        raise RuntimeError("no ptxas found (neither Triton's nor on PATH)")
    gpu = "sm_90a" if arch == 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        base = [ptxas, "-v", f"--gpu-name={gpu}", src, "-o", os.path.join(d, "k.cubin")]
        # Same register allocator setting Triton 3.9 uses; older ptxas may not know the flag.
        for extra in (["--regAllocOptLevel=2"], []):
            p = subprocess.run(base[:1] + extra + base[1:], capture_output=True, text=True)
            if p.returncode == 0 or not extra or "regAllocOptLevel" not in p.stderr:
                break
    log = p.stdout + p.stderr
    if p.returncode != 0:
        raise RuntimeError(f"ptxas failed ({p.returncode}):\n{log}")
    regs = max((int(m) for m in _RE_REGS.findall(log)), default=-1)
    spills = sum(int(a) + int(b) for a, b in _RE_SPILL.findall(log))
    stack = sum(int(m) for m in _RE_STACK.findall(log))
    smem = max((int(m) for m in _RE_SMEM.findall(log)), default=0)
    return regs, spills, stack, smem, log


def compile_one(job):
    """Worker: compile configuration `index` of module `name` for `arch`. Returns a result dict."""
    name, index, arch, aligned, full = job
    triton = _import_triton()
    from triton.backends.compiler import GPUTarget

    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
    cfg = _module_configs(_load_module(name), full)[index]
    fn, sig, consts, num_warps = cfg[:4]
    options = _options(cfg)
    options.pop("archs", None)
    options["num_warps"] = num_warps
    kernel, desc = describe(cfg)
    res = {
        "module": name,
        "kernel": kernel,
        "config": desc + ("" if aligned else " unaligned"),
        "arch": f"sm_{arch}{'a' if arch == 90 else ''}",
        "ok": False,
        "regs": "",
        "spills": "",
        "stack": "",
        "smem": "",
        "error": "",
    }
    t0 = time.time()
    try:
        src = triton.compiler.ASTSource(
            fn=fn, signature=sig, constexprs=consts, attrs=_attrs(fn, sig, aligned)
        )
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        regs, spills, stack, ptxas_smem, _ = _run_ptxas(compiled.asm["ptx"], arch)
        smem = max(int(getattr(compiled.metadata, "shared", 0) or 0), ptxas_smem)
        res.update(regs=regs, spills=spills, stack=stack, smem=smem)
        problems = []
        if spills:
            problems.append(f"{spills} bytes of register spills")
        if stack:
            problems.append(f"{stack} bytes of stack frame")
        if smem > SMEM_LIMIT[arch]:
            problems.append(f"shared memory {smem} > {SMEM_LIMIT[arch]}")
        res["ok"] = not problems
        res["error"] = "; ".join(problems)
    except Exception as e:
        msg = str(e).strip().splitlines()
        res["error"] = f"{type(e).__name__}: " + (" | ".join(msg[:6]) if msg else "")
    res["seconds"] = round(time.time() - t0, 2)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--full", action="store_true", help="every shipped configuration, not a representative set"
    )
    ap.add_argument("--only", nargs="*", help="kernel file names (without .py) to check")
    ap.add_argument("--arch", default=",".join(map(str, ARCHS)), help="comma-separated compute capabilities")
    ap.add_argument("--match", help="only configurations whose 'kernel config' text matches this regex")
    ap.add_argument(
        "--unaligned", action="store_true", help="also compile without divisibility specialization"
    )
    ap.add_argument("-j", "--jobs", type=int, default=min(4, os.cpu_count() or 1))
    ap.add_argument("-v", "--verbose", action="store_true", help="print each row as it finishes")
    args = ap.parse_args(argv)

    triton = _import_triton()
    archs = [int(a) for a in args.arch.split(",") if a]
    items, errors = collect(args.only, args.full, args.match)
    jobs = [
        (name, i, arch, aligned, args.full)
        for name, i, _, only_archs in items
        for arch in archs
        if only_archs is None or arch in only_archs
        for aligned in ((True, False) if args.unaligned else (True,))
    ]
    print(
        f"triton {triton.__version__}; {len(items)} configurations x up to {len(archs)} archs"
        f"{' x 2 alignments' if args.unaligned else ''} = {len(jobs)} compiles, {args.jobs} jobs",
        flush=True,
    )

    t0 = time.time()
    results = []
    if args.jobs > 1 and len(jobs) > 1:
        with concurrent.futures.ProcessPoolExecutor(max_workers=args.jobs) as ex:
            for r in ex.map(compile_one, jobs, chunksize=4):
                results.append(r)
                if args.verbose:
                    print(_row(r), flush=True)
    else:
        for job in jobs:
            results.append(compile_one(job))
            if args.verbose:
                print(_row(results[-1]), flush=True)

    header = ("kernel", "arch", "regs", "spills", "smem", "status", "config")
    rows = [
        (
            r["kernel"],
            r["arch"],
            str(r["regs"]),
            str(r["spills"]),
            str(r["smem"]),
            "ok" if r["ok"] else "FAIL",
            r["config"],
        )
        for r in results
    ]
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    widths[-1] = 0
    print(" ".join(h.ljust(w) for h, w in zip(header, widths)))
    for row in rows:
        print(" ".join(c.ljust(w) for c, w in zip(row, widths)))

    failed = [r for r in results if not r["ok"]]
    for r in failed:
        errors.append(f"{r['kernel']} {r['arch']} [{r['config']}]: {r['error']}")
    regs = [r["regs"] for r in results if isinstance(r["regs"], int) and r["regs"] >= 0]
    print(
        f"\n{len(results) - len(failed)}/{len(results)} compiles ok in {time.time() - t0:.0f}s"
        + (f"; registers {min(regs)}..{max(regs)}" if regs else "")
    )
    if errors:
        print("\nFAILURES:")
        for e in errors:
            print("  " + e)
        return 1
    return 0


def _row(r):
    status = "ok" if r["ok"] else f"FAIL {r['error']}"
    return (
        f"{r['kernel']} {r['arch']} regs={r['regs']} spills={r['spills']} smem={r['smem']} {status} "
        f"[{r['config']}]"
    )


if __name__ == "__main__":
    sys.exit(main())
