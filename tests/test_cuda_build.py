"""What can be checked about the CUDA build on a machine without a GPU (the build itself: scripts/build_cuda_ext.sh in
.ci/run; the kernels' compile check: scripts/compile_cuda.py in scripts/test.sh).

- the cuda backend says clearly why it cannot run here, and a forced call raises with that reason;
- CUDA priority lists keep "cuda" after "triton" until a GPU run shows it faster (docs/design.md);
- the device-code rule the backend uses to refuse GPUs the build has no code for;
- scripts/compile_cuda.py: --help, the missing-nvcc behaviour, its flags (torch's and setup.py's), its ptxas-report
  parser on canned reports, and the whole script run on a fake nvcc whose report has a spill (must fail) or none;
  its machine-code rules (scripts/sass_rules.py) on canned SASS that keeps and breaks each.
"""
from __future__ import annotations

import importlib.util
import os
import stat
import subprocess
import sys

import pytest
import torch

import pyattn
from pyattn.dispatch import get_backend
from pyattn.dispatch.registry import PRIORITY, BackendNotSupported

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "compile_cuda.py")


def _load_compile_cuda():
    spec = importlib.util.spec_from_file_location("pyattn_compile_cuda", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


cc = _load_compile_cuda()


# ---- the backend ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the cuda backend may be available")
def test_cuda_backend_unavailable_with_a_clear_reason():
    status = {name: (ok, reason) for name, ok, reason in pyattn.backends()}
    ok, reason = status["cuda"]
    assert not ok
    assert ("built without CUDA sources" in reason or "no CUDA device is available" in reason
            or "pyattn._C failed to load" in reason or "PYATTN_DISABLE_EXT" in reason), reason
    x = torch.randn(4, 8)
    with pytest.raises(BackendNotSupported, match=r"backend 'cuda' .* cuda backend unavailable: "):
        pyattn.layer_norm(x, (8,), backend="cuda")
    # an unforced call still runs (on the CPU backends)
    torch.testing.assert_close(pyattn.layer_norm(x, (8,)), torch.nn.functional.layer_norm(x, (8,)))


def test_cuda_priority_follows_the_gpu_measurements():
    """Unforced calls on CUDA tensors take the backend the H200 runs measured faster: cuda for GRU layers (its
    persistent kernels beat Triton's on every benchmarked shape) and GRU cells (fifth session), triton first for the
    rest. Moving an op's "cuda" is a deliberate change (docs/design.md, "CUDA backend status"): update this test with
    it."""
    cuda_lists = {op: order for (op, dev), order in PRIORITY.items() if dev == "cuda"}
    assert set(cuda_lists) >= {"attention", "layer_norm", "rms_norm", "gru_cell", "gru"}
    cuda_first = {"gru", "gru_cell"}
    for op, order in cuda_lists.items():
        assert order[-1] == "torch", (op, order)
        first, second = ("cuda", "triton") if op in cuda_first else ("triton", "cuda")
        assert order.index(first) < order.index(second), (op, order)


def test_norm_caps_say_why_after_triton():
    caps = get_backend("cuda").caps
    for op in ("layer_norm", "rms_norm"):
        assert caps[op].devices == frozenset({"cuda"})
        assert any("after triton" in note for note in caps[op].notes), caps[op].notes


@pytest.mark.parametrize("capability,archs,expected", [
    ((8, 0), "8.0;9.0a", True), ((8, 6), "8.0;9.0a", True), ((8, 9), "8.0;9.0a", True),
    ((9, 0), "8.0;9.0a", True), ((7, 5), "8.0;9.0a", False), ((10, 0), "8.0;9.0a", False),
    ((12, 0), "8.0;9.0a", False), ((9, 0), "8.0", False), ((9, 0), "8.0+PTX", True), ((10, 0), "9.0+PTX", True),
    ((8, 6), "8.6", True), ((8, 0), "8.6", False), ((9, 0), "9.0a", True), ((8, 0), "", False),
])
def test_device_code_rule(capability, archs, expected):
    from pyattn.backends.cuda import _device_code_for

    assert _device_code_for(capability, archs) is expected


# ---- scripts/compile_cuda.py -----------------------------------------------------------------------------------
def _run(args, env_extra=None, timeout=120):
    env = dict(os.environ)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=timeout)


def test_compile_cuda_help():
    p = _run(["--help"])
    assert p.returncode == 0, p.stderr
    for flag in ("--allow-missing-nvcc", "--only", "--arch", "--jobs"):
        assert flag in p.stdout


def test_compile_cuda_missing_nvcc():
    p = _run([], {"NVCC": ""})
    assert p.returncode == 1 and "nvcc not found" in p.stderr and "NOT checked" in p.stderr
    p = _run(["--allow-missing-nvcc"], {"NVCC": ""})
    assert p.returncode == 0 and "nvcc not found" in p.stderr


def test_compile_cuda_flags_match_the_real_build():
    flags = cc.setup_nvcc_flags()
    assert "-O3" in flags and "--use_fast_math" in flags
    assert not any(f.startswith("-std=") for f in flags)  # setup.py adds the standard torch needs
    # torch's own half/bfloat16 guards stay defined: kernels convert with the intrinsics
    assert not any(f.startswith("-U__CUDA_NO_") for f in flags)
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    assert cc.TORCH_COMMON_NVCC_FLAGS == list(COMMON_NVCC_FLAGS)
    cmd = cc.nvcc_command("nvcc", "k.cu", 90, "k.o")
    assert "-gencode=arch=compute_90a,code=sm_90a" in cmd and "-Xptxas" in cmd and "-Werror" in cmd
    assert cc.nvcc_command("nvcc", "k.cu", 80, "k.o")[-len(cc.STRICT_FLAGS) - 1] == \
        "-gencode=arch=compute_80,code=sm_80"


CANNED_REPORT = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z11good_kernelPf' for 'sm_80'
ptxas info    : Function properties for _Z11good_kernelPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers, used 1 barriers, 128 bytes smem, 360 bytes cmem[0]
ptxas info    : Compile time = 10.000 ms
ptxas info    : Compiling entry function '_Z12spill_kernelPf' for 'sm_90a'
ptxas info    : Function properties for _Z12spill_kernelPf
    16 bytes stack frame, 12 bytes spill stores, 8 bytes spill loads
ptxas info    : Used 255 registers, used 0 barriers, 360 bytes cmem[0]
ptxas info    : Compiling entry function '_Z8big_smemPf' for 'sm_80'
ptxas info    : Function properties for _Z8big_smemPf
    8 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 200000 bytes smem, 360 bytes cmem[0]
ptxas info    : Compiling function '_Z6helperf' for 'sm_80'
ptxas info    : Function properties for _Z6helperf
    24 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
"""


def test_ptxas_report_parser_on_canned_output():
    recs = {r["name"]: r for r in cc.parse_ptxas(CANNED_REPORT)}
    assert set(recs) == {"_Z11good_kernelPf", "_Z12spill_kernelPf", "_Z8big_smemPf", "_Z6helperf"}
    good, spill, smem, helper = (recs[n] for n in ("_Z11good_kernelPf", "_Z12spill_kernelPf", "_Z8big_smemPf",
                                                   "_Z6helperf"))
    assert (good["arch"], good["kind"], good["regs"], good["smem"], good["spill_stores"]) == ("sm_80", "kernel", 32,
                                                                                            128, 0)
    assert cc.kernel_problems(good) == []
    assert (spill["arch"], spill["regs"], spill["stack"], spill["spill_stores"], spill["spill_loads"]) == \
        ("sm_90a", 255, 16, 12, 8)
    assert any("spill" in p for p in cc.kernel_problems(spill))
    assert smem["smem"] == 200000 and smem["stack"] == 8
    problems = cc.kernel_problems(smem)
    assert len(problems) == 1 and "shared memory 200000" in problems[0]  # a stack frame alone is not a failure
    assert helper["kind"] == "function" and any("spill" in p for p in cc.kernel_problems(helper))
    # the same smem is fine on sm_90a (227 KB per block)
    assert cc.kernel_problems(dict(smem, arch="sm_90a")) == []
    names = cc.demangle(["_Z12spill_kernelPf"])
    assert names["_Z12spill_kernelPf"] in ("spill_kernel", "_Z12spill_kernelPf")  # c++filt may be missing


def test_ptxas_perf_notes_fail_the_check():
    """The wgmma notes ptxas prints as info lines (serialized wgmmas, an injected warpgroup.arrive) are failures;
    other info lines are not."""
    log = "\n".join([
        "ptxas info    : Compiling entry function '_Z1kv' for 'sm_90a'",
        "ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized due to ...",
        "ptxas info    : (C7519) warpgroup.arrive is injected in around line 103959 by compiler to allow use of "
        "registers in GMMA in function '_Z1kv'",
        "ptxas info    : Used 168 registers, used 1 barriers"])
    notes = cc.ptxas_perf_notes(log)
    assert len(notes) == 2 and "C7515" in notes[0] and "C7519" in notes[1]
    assert cc.ptxas_perf_notes("ptxas info    : Used 168 registers, used 1 barriers\n") == []


def _fake_nvcc(tmp_path, report):
    """An nvcc that compiles nothing: prints `report` on stderr (as ptxas -v does) and succeeds."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "report.txt").write_text(report)
    path = tmp_path / "nvcc"
    path.write_text("#!/bin/sh\n"
                    'if [ "$1" = "--version" ]; then echo "Cuda compilation tools, release 0.0 (fake)"; exit 0; fi\n'
                    f'cat "{tmp_path / "report.txt"}" >&2\n')
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_compile_cuda_fails_on_a_spill_and_passes_a_clean_report(tmp_path):
    if not [f for f in os.listdir(os.path.join(REPO, "csrc", "cuda")) if f.endswith(".cu")]:
        pytest.skip("no csrc/cuda/*.cu to compile")
    name = min(f for f in os.listdir(os.path.join(REPO, "csrc", "cuda")) if f.endswith(".cu"))[:-3]
    spill = _fake_nvcc(tmp_path / "spill", CANNED_REPORT)
    p = _run(["--only", name, "-j", "2"], {"NVCC": spill})
    assert p.returncode == 1, p.stdout + p.stderr
    assert "FAILURES" in p.stdout and "register spills: 12 bytes stores, 8 bytes loads" in p.stdout
    assert "shared memory 200000 bytes > 166912" in p.stdout
    clean_report = CANNED_REPORT.split("ptxas info    : Compiling entry function '_Z12spill_kernelPf'")[0]
    clean = _fake_nvcc(tmp_path / "clean", clean_report)
    p = _run(["--only", name, "-j", "2"], {"NVCC": clean})
    assert p.returncode == 0, p.stdout + p.stderr
    assert "2/2 compiles ok" in p.stdout and "0 bytes of spills" in p.stdout


def test_compile_cuda_rejects_an_unknown_file(tmp_path):
    p = _run(["--only", "no_such_kernel_file"], {"NVCC": _fake_nvcc(tmp_path, "")})
    assert p.returncode != 0 and "no csrc/cuda/no_such_kernel_file.cu" in (p.stdout + p.stderr)


@pytest.mark.parametrize("script", ["build_cuda_ext.sh", "gpu_sanitize.sh", "gpu_run.sh", "gpu_lease.sh",
                                    "cuda_env.sh", "test.sh"])
def test_shell_scripts_parse(script):
    p = subprocess.run(["bash", "-n", os.path.join(REPO, "scripts", script)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: gpu_lease.sh would build and run")
def test_gpu_lease_without_a_gpu_says_so_and_fails(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, PYATTN_LEASE_OUT=str(tmp_path))
    p = subprocess.run(["bash", os.path.join(REPO, "scripts", "gpu_lease.sh")], capture_output=True, text=True,
                       env=env, timeout=120)
    assert p.returncode == 1
    assert "torch sees no CUDA device" in (tmp_path / "summary.txt").read_text()


# ---- scripts/sass_rules.py (the compile check's machine-code rules) ---------------------------------------------
def _sass(name: str, body: list[str]) -> str:
    """cuobjdump -sass text of one kernel with the given instructions (addresses 0x0000, 0x0010, ...)."""
    lines = [f"\t\tFunction : {name}", "\t.headerflags\t@\"EF_CUDA_SM90\""]
    lines += [f"        /*{16 * i:04x}*/    {ins} ;   /* 0x000000000000 */" for i, ins in enumerate(body)]
    return "\n".join(lines) + "\n"


_FWD = "_ZN6pyattn4cuda4attn4sm9023attn_fwd_sm90_ws_kernelI"
_ISSUE = ["WARPGROUP.ARRIVE", "UIADD3 UR20, UR36, 0x2, URZ", "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR20], R24",
          "UMOV UR21, 0x40000040", "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR20], R24, gsb0"]
_SOFTMAX = ["WARPGROUP.DEPBAR.LE gsb0, 0x1", "FFMA.FTZ R3, R24, R2, -R4", "MUFU.EX2 R3, R3", "STS.64 [R6], R16",
            "WARPGROUP.DEPBAR.LE gsb0, 0x0", "F2FP.BF16.F32.PACK_AB R176, R3, R5", "@!P0 BRA 0x0"]


def test_sass_rules_pass_the_intended_schedule():
    sr = cc.sass_rules
    kernels = sr.parse_sass(_sass(_FWD, _ISSUE + _SOFTMAX + ["R2UR UR4, R2", "EXIT"]))
    (name, instrs), = kernels.items()
    problems, stats = sr.check_kernel(name, instrs)
    assert problems == [] and stats == {"instructions": 14, "hgmma": 2, "r2ur": 1, "ex2": 1}  # (R2UR outside a run)


def test_sass_rules_catch_per_thread_descriptors_and_a_hoisted_wait():
    sr = cc.sass_rules
    r2ur = _ISSUE[:3] + ["R2UR UR20, R22"] + _ISSUE[3:]
    (name, instrs), = sr.parse_sass(_sass(_FWD, r2ur + _SOFTMAX)).items()
    problems, _ = sr.check_kernel(name, instrs)
    assert len(problems) == 1 and problems[0].startswith("uniform-descriptors: R2UR at 0x30"), problems
    hoisted = _SOFTMAX[:1] + _SOFTMAX[4:5] + _SOFTMAX[1:4] + _SOFTMAX[5:]  # the P V's wait before the exp2
    (name, instrs), = sr.parse_sass(_sass(_FWD, _ISSUE + hoisted)).items()
    problems, _ = sr.check_kernel(name, instrs)
    assert len(problems) == 1 and problems[0].startswith("pv-wait-after-softmax: exp2 at 0x80"), problems
    # the backward's kernels have other waits: only the uniform-descriptors rule applies to them
    (name, instrs), = sr.parse_sass(_sass(_FWD.replace("fwd", "bwd_dkdv"), _ISSUE + hoisted)).items()
    assert sr.check_kernel(name, instrs)[0] == []
