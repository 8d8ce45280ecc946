"""Build pyattn: always the C++ CPU extension ``pyattn._C``; CUDA sources too when torch has CUDA and nvcc exists.

Environment:
  PYATTN_CUDA=0|1          force the CUDA part off/on (default: on when torch.version.cuda and nvcc are found)
  TORCH_CUDA_ARCH_LIST     CUDA archs (default "8.0;9.0a")
  PYATTN_CPU_ARCH          -march for the CPU kernels (default "native"; "none" for a portable build)
  MAX_JOBS                 parallel compile jobs (ninja)
No network access happens here.
"""
import glob
import os
import re
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))

# nvcc flags of csrc/cuda/*.cu, after torch's own (torch.utils.cpp_extension.COMMON_NVCC_FLAGS, which define
# __CUDA_NO_HALF_OPERATORS__, __CUDA_NO_HALF_CONVERSIONS__, __CUDA_NO_BFLOAT16_CONVERSIONS__ and
# __CUDA_NO_HALF2_OPERATORS__: kernels convert with __half2float / __float2bfloat16_rn & co.) and before the
# -gencode flags TORCH_CUDA_ARCH_LIST gives. scripts/compile_cuda.py reads this literal (it must stay a plain list
# of strings) to compile every .cu standalone with the same flags.
# The C++ standard is added by _extensions() (_cxx_std: C++20 when the installed torch requires it, else C++17).
NVCC_FLAGS = ["-O3", "--use_fast_math", "-lineinfo"]


def _sm90a_flags(archs):
    """-DPYATTN_SM90A when TORCH_CUDA_ARCH_LIST gives sm_90a machine code (the wgmma attention forward of
    csrc/cuda/attention_sm90.cu) and no plain sm_90 code that a Hopper GPU could run instead (whose copy of that kernel
    is empty): without it the host never launches the sm_90a kernel."""
    entries = [e for e in re.split(r"[;\s]+", archs) if e]
    has_90a = any(e.split("+")[0] == "9.0a" for e in entries)
    has_90 = any(e.split("+")[0] == "9.0" for e in entries)
    return ["-DPYATTN_SM90A"] if has_90a and not has_90 else []


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def _want_cuda(torch):
    flag = os.environ.get("PYATTN_CUDA")
    if flag is not None:
        return flag == "1"
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.version.cuda is not None and CUDA_HOME is not None and shutil.which("nvcc") is not None


def _cxx_std(torch):
    """-std for every source: torch >= 2.10 headers need C++20 (ATen.h says so and #errors otherwise)."""
    aten = os.path.join(os.path.dirname(torch.__file__), "include", "ATen", "ATen.h")
    try:
        with open(aten) as f:
            return "c++20" if "C++20" in f.read() else "c++17"
    except OSError:
        return "c++17"


def _shared_libstdcxx():
    """[path] of the shared libstdc++ this interpreter loaded with torch (Linux), else [].

    Given to the linker ahead of the compiler driver's own -lstdc++, it makes pyattn._C use torch's C++ runtime even
    with a g++ whose library directory holds only libstdc++.a (the GPU machines' /opt/gcc wrapper: -B into a gcc
    tree without libstdc++.so). A private static copy there broke every TORCH_CHECK message that formats a number:
    its std::locale is never set up, so "got shape [8]" came out as "got shape [" or the process segfaulted.
    """
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "/libstdc++.so" in line}
    except OSError:
        return []
    return sorted(p for p in paths if os.path.isfile(p))[:1]


def _write_build_info(info):
    path = os.path.join(ROOT, "pyattn", "_build_info.py")
    with open(path, "w") as f:
        f.write("# Written by setup.py at build time: what pyattn._C contains.\n")
        f.write(f"BUILD_INFO = {info!r}\n")


def _extensions():
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:  # metadata-only invocation (e.g. sdist) without torch
        print("pyattn: torch not importable, building without the C++ extension", file=sys.stderr)
        return [], {}

    cpu_sources = _rel(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp"))
                       + glob.glob(os.path.join(ROOT, "csrc", "bindings", "*.cpp")))
    cuda_sources = _rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))
                        + glob.glob(os.path.join(ROOT, "csrc", "bindings", "cuda", "*.cpp")))
    march = os.environ.get("PYATTN_CPU_ARCH", "native")
    std = _cxx_std(torch)
    cxx = ["-O3", f"-std={std}", "-fopenmp", "-Wall", "-Wno-unknown-pragmas"]
    if march != "none":
        cxx.append(f"-march={march}")
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    with_cuda = _want_cuda(torch) and bool(cuda_sources)
    archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a") if with_cuda else ""
    info = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda if with_cuda else None,
        "cuda_archs": archs or None,
        "cpu_march": march,
        "with_cuda": with_cuda,
        "sm90a_attention": bool(with_cuda and _sm90a_flags(archs)),  # the Hopper attention kernels are built in
        "sources": cpu_sources + (cuda_sources if with_cuda else []),
    }
    _write_build_info(info)
    link = ["-fopenmp"] + _shared_libstdcxx()
    if with_cuda:
        nvcc = NVCC_FLAGS + [f"-std={std}"] + _sm90a_flags(archs)
        ext = CUDAExtension("pyattn._C", cpu_sources + cuda_sources, include_dirs=include_dirs,
                            extra_compile_args={"cxx": cxx + ["-DPYATTN_WITH_CUDA"], "nvcc": nvcc},
                            extra_link_args=link)
    else:
        ext = CppExtension("pyattn._C", cpu_sources, include_dirs=include_dirs,
                           extra_compile_args={"cxx": cxx}, extra_link_args=link)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["pyattn", "pyattn.*"]) + ["pyattn.kernels", "pyattn.benchmarks"],
    package_dir={"pyattn.kernels": "kernels", "pyattn.benchmarks": "benchmarks"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
