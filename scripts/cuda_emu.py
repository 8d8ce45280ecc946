"""Build the CUDA emulator extension: csrc/cuda/*.cu and the CUDA bindings (csrc/bindings/cuda/*.cpp) compiled as
plain C++ against a CPU build of torch, with the CUDA runtime, shared memory, warp collectives, ldmatrix, mma and
cp.async emulated (csrc/emu/cuda_emu.h). The result registers torch.ops.pyattn_emu.* (the schemas of
torch.ops.pyattn) for CPU tensors, so the CUDA kernels are tested without a GPU (tests/test_cuda_emu.py).

The sources are not edited by hand for this: each .cu is copied to build/cuda_emu/src/<name>_cu.cpp with three
mechanical rewrites, `kernel<<<grid, block, smem, stream>>>(args)` -> `::pyattn_emu::launch(kernel, grid, block, smem,
stream)(args)`, `extern __shared__ ... T name[];` -> `T* name = ::pyattn_emu::dynamic_smem();`, and a
`check_launch_bounds(E)` call first in the body of each `__launch_bounds__(E)` kernel; the inline PTX has
PYATTN_CUDA_EMU branches in csrc/cuda/attention_utils.cuh and attention.cu.

    python scripts/cuda_emu.py            # build (incremental) and print the library's path
    python scripts/cuda_emu.py --print    # show the rewritten sources' launch lines
    python scripts/cuda_emu.py --memcheck # AddressSanitizer build, every op on small shapes (like memcheck)
"""
from __future__ import annotations

import argparse
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = os.path.join(ROOT, "build", "cuda_emu")
NAME = "pyattn_cuda_emu"

_EXTERN_SMEM = re.compile(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([A-Za-z_][\w ]*?)\s+(\w+)\[\];")


def _kernel_start(src: str, end: int) -> int:
    """Start of the kernel expression that ends at src[end] (exclusive): `name`, `ns::name` or `name<...>`."""
    i = end
    while i > 0 and src[i - 1].isspace():
        i -= 1
    if src[i - 1] == ">":  # template arguments: walk back to the matching '<'
        depth = 0
        while True:
            i -= 1
            if src[i] == ">":
                depth += 1
            elif src[i] == "<":
                depth -= 1
                if depth == 0:
                    break
    while i > 0 and (src[i - 1].isalnum() or src[i - 1] in "_:"):
        i -= 1
    return i


def transform(src: str) -> str:
    """Rewrite launches and extern shared arrays for the emulator (see the module docstring)."""
    out, pos = [], 0
    while True:
        k = src.find("<<<", pos)
        if k < 0:
            break
        e = src.find(">>>", k)
        if e < 0:
            raise ValueError("unterminated <<< at offset %d" % k)
        start = _kernel_start(src, k)
        kernel = src[start:k]  # raw (newlines kept): line numbers stay those of the .cu
        config = src[k + 3:e]
        j = e + 3
        while src[j].isspace():
            j += 1
        if src[j] != "(":
            raise ValueError("expected '(' after >>> at offset %d" % e)
        out.append(src[pos:start])
        out.append("::pyattn_emu::launch(%s, %s)%s(" % (kernel, config, src[e + 3:j]))
        pos = j + 1
    out.append(src[pos:])
    res = _add_launch_bounds_checks("".join(out))
    return _EXTERN_SMEM.sub(
        lambda m: "%s* const %s = reinterpret_cast<%s*>(::pyattn_emu::dynamic_smem());"
        % (m.group(1), m.group(2), m.group(1)), res)


def _first_arg(args: str) -> str:
    """The first of comma-separated macro arguments (commas inside parentheses or <> do not split)."""
    depth = 0
    for i, ch in enumerate(args):
        depth += {"(": 1, "<": 1, ")": -1, ">": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            return args[:i]
    return args


def _add_launch_bounds_checks(src: str) -> str:
    """`__launch_bounds__(E[, B]) name(...) {` -> the same with `::pyattn_emu::check_launch_bounds(E, ...);` first in
    the body (E may use the kernel's template parameters; inserted on the brace's line, so line numbers stay)."""
    out, pos = [], 0
    for m in re.finditer(r"__launch_bounds__\(", src):
        i, depth = m.end(), 1
        while depth:
            depth += {"(": 1, ")": -1}.get(src[i], 0)
            i += 1
        expr = _first_arg(src[m.end():i - 1])  # max threads (a second argument, min blocks per SM, is not checked)
        brace, semi = src.find("{", i), src.find(";", i)
        if brace < 0 or (0 <= semi < brace):
            continue  # a declaration
        out.append(src[pos:brace + 1])
        out.append(" ::pyattn_emu::check_launch_bounds(static_cast<long long>(%s), __FILE__, __LINE__);" % expr)
        pos = brace + 1
    out.append(src[pos:])
    return "".join(out)


def _write_if_changed(path: str, text: str) -> None:
    if os.path.exists(path):
        with open(path) as f:
            if f.read() == text:
                return  # keep the mtime: ninja rebuilds nothing
    with open(path, "w") as f:
        f.write(text)


def sources() -> list[str]:
    src_dir = os.path.join(BUILD, "src")
    os.makedirs(src_dir, exist_ok=True)
    out = []
    cuda_dir = os.path.join(ROOT, "csrc", "cuda")
    for name in sorted(os.listdir(cuda_dir)):
        if not name.endswith(".cu"):
            continue
        with open(os.path.join(cuda_dir, name)) as f:
            text = f.read()
        dst = os.path.join(src_dir, name[:-3] + "_cu.cpp")  # not <name>.o: the bindings have that
        _write_if_changed(dst, "// GENERATED by scripts/cuda_emu.py from csrc/cuda/%s: do not edit.\n#line 1 \"csrc/cuda/%s\"\n%s"
                          % (name, name, transform(text)))
        out.append(dst)
    bind_dir = os.path.join(ROOT, "csrc", "bindings", "cuda")
    out += [os.path.join(bind_dir, n) for n in sorted(os.listdir(bind_dir)) if n.endswith(".cpp")]
    out += [os.path.join(ROOT, "csrc", "emu", n) for n in ("cuda_emu.cpp", "library.cpp", "selftest.cpp")]
    return out


def _shared_libstdcxx() -> list[str]:
    """setup.py's _shared_libstdcxx(): [path] of the shared libstdc++ this interpreter loaded with torch, else [],
    linked by path as for pyattn._C (a g++ that links a private static libstdc++ breaks every TORCH_CHECK message that
    formats a number; on the GPU machines that crashed the emulator's refusal tests). The function is read from
    setup.py with ast and run here (importing setup.py would run setup()), as compile_cuda.py reads its NVCC_FLAGS."""
    import ast

    with open(os.path.join(ROOT, "setup.py")) as f:
        tree = ast.parse(f.read())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "_shared_libstdcxx")
    ns = {"os": os}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), "setup.py", "exec"), ns)
    return ns["_shared_libstdcxx"]()


def build(verbose: bool = False, asan: bool = False) -> str:
    """Build (incrementally) and load the emulator library; returns its path. torch.ops.pyattn_emu is then defined.
    `asan`: the AddressSanitizer variant (its own build directory), loadable only with libasan preloaded."""
    import torch
    from torch.utils.cpp_extension import load

    name, build_dir = (NAME + "_asan", BUILD + "_asan") if asan else (NAME, BUILD)
    os.makedirs(build_dir, exist_ok=True)
    flags = ["-DPYATTN_CUDA_EMU", "-O1" if asan else "-O2", "-fno-strict-aliasing", "-Wno-unknown-pragmas"]
    if asan:
        flags += ["-fsanitize=address", "-fno-omit-frame-pointer"]
    load(name=name, sources=sources(), build_directory=build_dir, is_python_module=False, verbose=verbose,
         extra_include_paths=[os.path.join(ROOT, "csrc", p) for p in ("emu/include", "include", "cuda")],
         extra_cflags=flags, extra_ldflags=(["-fsanitize=address"] if asan else []) + _shared_libstdcxx())
    assert hasattr(torch.ops, "pyattn_emu")
    return os.path.join(build_dir, name + ".so")


def libasan() -> str | None:
    """Path of the C++ compiler's libasan.so, or None."""
    import subprocess

    try:
        out = subprocess.run([os.environ.get("CXX", "c++"), "-print-file-name=libasan.so"], capture_output=True,
                             text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return out if os.path.isabs(out) and os.path.exists(out) else None


def _memcheck_workload() -> None:
    """Every CUDA op on small shapes with tight allocations (contiguous tensors, broadcast masks, unaligned and
    NaN-padded views): run under AddressSanitizer, an access past any tensor, workspace or shared-memory buffer is
    reported and fails the run (the emulator's counterpart of compute-sanitizer memcheck)."""
    import math

    import torch

    sys.path.insert(0, ROOT)
    from pyattn.testing import make_qkv

    os.environ.pop("LD_PRELOAD", None)  # preloaded into this process already; not into the compiler
    build(asan=True)
    ops = torch.ops.pyattn_emu
    n = 0
    for layout in ("contiguous", "blhd", "nan_padded", "strided"):
        for d, dv, causal, br, lq, lk in ((64, 64, True, False, 37, 45), (59, 59, False, False, 37, 45),
                                          (128, 96, True, True, 70, 33), (256, 256, True, False, 19, 40),
                                          (24, 40, False, False, 1, 80)):
            n += 1  # dtype and mask (none + dropout, broadcast bool, additive) rotate over the cases
            dtype = (torch.float16, torch.bfloat16)[n % 2]
            q, k, v = make_qkv(2, 2, lq, lk, d, dv=dv, hkv=1, dtype=dtype, layout=layout, seed=d)
            mask = (None, torch.rand(1, 1, 1, lk) > 0.3, torch.randn(2, 1, lq, lk).to(dtype))[n % 3]
            args = (mask, 0.1 if mask is None else 0.0, causal, br, 1 / math.sqrt(d), 5, 7)
            out, lse = ops.attn_fwd(q, k, v, *args)
            ops.attn_bwd(torch.randn_like(out), q, k, v, out, lse, *args)
    os.environ["PYATTN_EMU_SMS"] = "4"  # the decoding forward (attention_decode.cu) over several splits
    for layout in ("contiguous", "blhd", "expanded"):
        for d, hq, lq, lk, causal, br in ((64, 4, 1, 300, False, False), (128, 2, 3, 400, True, True),
                                          (128, 8, 1, 257, True, False)):
            q, k, v = make_qkv(2, hq, lq, lk, d, hkv=1 if hq == 8 else 2, dtype=torch.bfloat16, layout=layout,
                               seed=d)
            ops.attn_fwd(q, k, v, None, 0.0, causal, br, 1 / math.sqrt(d), 0, 0)
    # the Hopper forward (attention_sm90.cu; the emulated device is sm_90): the warp-specialized kernel with a block
    # per tile, persistent round-robin and persistent with the dynamic tile scheduler (causal), on a grid of 3; the
    # Hopper backward; a tiny L2, so that causal grids take their tiles in sections of one GQA group (l2_section_tile)
    os.environ["PYATTN_EMU_SMS"] = "3"
    os.environ["PYATTN_EMU_L2"] = "1"
    for variant in ("ws1", "wsp", "wsd"):
        os.environ["PYATTN_CUDA_ATTN_SM90"] = variant
        for d, lq, lk, causal in ((64, 300, 260, True), (128, 200, 300, True), (128, 130, 200, False)):
            q, k, v = make_qkv(2, 2, lq, lk, d, hkv=1, dtype=torch.bfloat16, seed=d)
            ops.emu_reset_counters()
            out, lse = ops.attn_fwd(q, k, v, None, 0.0, causal, False, 1 / math.sqrt(d), 0, 0)
            assert ops.emu_counters()[5] > 0, "the Hopper forward (wgmma) did not run"
            # the Hopper backward (attention_sm90_bwd.cu), key and query tails, a GQA group: its dK / dV kernel with
            # cp.async, then warp-specialized adding dQ with bulk reductions, then with atomics (the default, without
            # dQ, runs in the other cases)
            os.environ["PYATTN_CUDA_ATTN_SM90_BWD"] = {"ws1": "cp", "wsp": "fused", "wsd": "fusedat"}[variant]
            ops.emu_reset_counters()
            ops.attn_bwd(torch.randn_like(out), q, k, v, out, lse, None, 0.0, causal, False, 1 / math.sqrt(d), 0, 0)
            assert ops.emu_counters()[5] > 0, "the Hopper backward (wgmma) did not run"
    os.environ.pop("PYATTN_CUDA_ATTN_SM90_BWD", None)
    os.environ.pop("PYATTN_CUDA_ATTN_SM90")
    os.environ.pop("PYATTN_EMU_SMS")
    os.environ.pop("PYATTN_EMU_L2")
    for m, n in ((3, 7), (9, 1000), (2, 1024), (2, 8200), (700, 64), (4, 257)):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for shift in (0, 1):
                buf = torch.randn(shift + m * n, dtype=dtype)
                x = buf[shift:].view(m, n)
                w, b = torch.randn(n + shift)[shift:], torch.randn(n)
                for rms in (False, True):
                    y, s, mean, rstd = ops.layer_norm_fwd(x, x, w, None if rms else b, 1e-5, rms, True)
                    ops.layer_norm_bwd(x, s, w, mean, rstd, x, rms, not rms, True)
    # GRU: the persistent kernels as planned (H 1024: 61 blocks), on a forced grid of 3, with the batch staged in
    # chunks (a 4 KiB shared-memory budget) and on the per-step path
    gru_runs = ((None, None, ((3, 2, 5, 7), (2, 3, 16, 129), (1, 1, 3, 1024))), ("3", None, ((2, 3, 16, 129),)),
                ("2", "4096", ((3, 9, 5, 7),)), ("0", None, ((3, 2, 5, 7), (2, 3, 16, 129))))
    for blocks, optin, shapes in gru_runs:
        for var, val in (("PYATTN_CUDA_GRU_BLOCKS", blocks), ("PYATTN_EMU_SMEM_OPTIN", optin)):
            os.environ.pop(var, None)
            if val is not None:
                os.environ[var] = val
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for t, bsz, i, h in shapes:
                x, h0 = torch.randn(t, bsz, i, dtype=dtype), torch.randn(bsz, h, dtype=dtype)
                w = [torch.randn(3 * h, i), torch.randn(3 * h, h), torch.randn(3 * h), torch.randn(3 * h)]
                w = [p.to(dtype) for p in w]
                out, hl, ws = ops.gru_seq_fwd(x, h0, *w, True, True)
                ops.gru_seq_bwd(out, hl, x, h0, w[0], w[1], out, ws, True, True, True, True)
                h1, ws1 = ops.gru_step_fwd(x[0], h0, *w, True)
                ops.gru_step_bwd(h1, x[0], h0, w[0], w[1], ws1, True, True, True)
    os.environ.pop("PYATTN_CUDA_GRU_BLOCKS", None)
    os.environ.pop("PYATTN_EMU_SMEM_OPTIN", None)
    # the one-launch cell step (gru_cell_fwd_kernel): 4-element loads, views one element into their storage (1-element
    # loads, nothing past the tensors), and rows of 12 KB staged in chunks of 8 rows (the last one partial)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for bsz, i, h, shift in ((5, 8, 12, 0), (5, 8, 12, 1), (13, 3000, 16, 0)):
            def tight(*shape):
                return torch.randn(shift + math.prod(shape), dtype=dtype)[shift:].view(*shape)

            x, h0 = tight(bsz, i), tight(bsz, h)
            w = [tight(3 * h, i), tight(3 * h, h), tight(3 * h), tight(3 * h)]
            h1, ws1 = ops.gru_step_fwd(x, h0, *w, True)
            ops.gru_step_bwd(h1, x, h0, w[0], w[1], ws1, True, True, True)
    # the cluster kernels (8 blocks writing into each other's shared memory), a last block with fewer units
    os.environ["PYATTN_CUDA_GRU_CLUSTER"] = "1"
    for dtype in (torch.float32, torch.bfloat16):
        for t, bsz, i, h in ((3, 2, 5, 61), (2, 1, 3, 128)):
            x, h0 = torch.randn(t, bsz, i, dtype=dtype), torch.randn(bsz, h, dtype=dtype)
            w = [p.to(dtype) for p in (torch.randn(3 * h, i), torch.randn(3 * h, h), torch.randn(3 * h),
                                       torch.randn(3 * h))]
            out, hl, ws = ops.gru_seq_fwd(x, h0, *w, False, True)
            ops.gru_seq_bwd(out, hl, x, h0, w[0], w[1], out, ws, True, True, False, True)
    os.environ.pop("PYATTN_CUDA_GRU_CLUSTER")


def memcheck() -> int:
    """Build the AddressSanitizer variant and run the memcheck workload, both in a child process with libasan
    preloaded; returns the child's exit status (non-zero on any report)."""
    import subprocess

    asan = libasan()
    if asan is None:
        print("cuda_emu: memcheck needs the C++ compiler's libasan.so, which was not found", file=sys.stderr)
        return 2
    import torch  # noqa: F401  (maps the libstdc++ that the child preloads with libasan)

    # libstdc++ preloaded too: AddressSanitizer resolves the real __cxa_throw when it starts, and an interpreter that
    # does not link libstdc++ itself (the GPU machines' python3.12) left it null, so torch's first C++ exception
    # aborted the child ("CHECK failed: real___cxa_throw"). No GPU either: the emulator runs on the CPU.
    env = dict(os.environ, LD_PRELOAD=":".join([asan] + _shared_libstdcxx()), CUDA_VISIBLE_DEVICES="",
               ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:exitcode=23")
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--memcheck-child"], env=env,
                       capture_output=True, text=True)
    report = "\n".join(l for l in r.stderr.splitlines() if "makecontext/swapcontext" not in l)
    if r.returncode != 0 or "AddressSanitizer" in report:
        print(r.stdout + report, file=sys.stderr)
        return r.returncode or 1
    print("cuda_emu: memcheck clean (AddressSanitizer, every CUDA op on small shapes)")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--print", action="store_true", help="print the rewritten launch lines and exit")
    ap.add_argument("--memcheck", action="store_true",
                    help="build with AddressSanitizer and run every op on small shapes; non-zero on any report")
    ap.add_argument("--memcheck-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    if args.memcheck_child:
        _memcheck_workload()
        return 0
    if args.memcheck:
        return memcheck()
    if args.print:
        for path in sources():
            with open(path) as f:
                for n, line in enumerate(f, 1):
                    if "pyattn_emu::" in line:
                        print("%s:%d: %s" % (os.path.relpath(path, ROOT), n, line.strip()))
        return 0
    print(build(verbose=args.verbose))
    return 0


if __name__ == "__main__":
    sys.exit(main())
