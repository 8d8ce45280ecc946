"""The one benchmark harness of pyattn: cases, providers, timing, ceilings, result rows, table/JSON/CSV/plots.

How a bench file plugs in (``benchmarks/bench_<op>.py``, run by ``benchmarks/run.py``)::

    def run(ctx: BenchContext) -> list[dict]:
        cases = [Case(op="layer_norm", mode="fwd", shape={"M": 4096, "N": 1024}, dtype=torch.float32,
                      device=ctx.device, x="N"), ...]
        return ctx.run_cases(cases, make_inputs, providers_for, work_for)

    def targets() -> list[Target]:      # optional: the PERF.md targets of this op, marked in the rows
        return [Target("layer_norm", "fwd", "cpu", lambda p: p["N"] == 1024, min_speedup=2.0)]

* ``make_inputs(case) -> dict`` builds the tensors once per case (shared by every provider of that case).
* ``providers_for(case) -> list[Provider]``; exactly one provider per case has ``baseline=True`` (the torch
  reference that speedups are quoted against; it is measured first).
* ``Provider.factory(case, inputs) -> fn``: any setup (e.g. the forward pass of a backward benchmark) happens in
  the factory, outside the timed region; ``fn()`` is the timed call and returns its output tensor(s), which are
  compared once, untimed, with a float64 evaluation of the baseline (``check`` column), so a wrong kernel never
  gets a speedup quietly.
* ``work_for(case) -> Work``: bytes (norms, reported in GB/s against PEAK_COPY) or FLOPs (attention, GRU, reported
  in TFLOP/s on GPU and GFLOP/s on CPU against PEAK_GEMM), using the formulas of PERF.md below.
* optional CPU peak-memory rows: ``rows += ctx.run_memory_cases(cases, providers_for, probe, mem_ref_for, work_for)``
  with a module-level ``probe(case: dict, provider: str) -> dict`` that rebuilds the call from the provider's kind
  in a fresh process and returns ``cpu_peak_rss(call)`` (see "Peak memory" below; bench_attention.py has one).

Method (PERF.md): p20/p50/p80 over repeated runs after warm-up, the median quoted; CUDA events on GPU (the L2
cache is flushed before every repetition by writing a 256 MiB buffer, so small sizes are not timed from L2, and a GPU
busy-wait longer than the host's time to issue the call follows it, so the times are the device's: the host's issue
time is reported apart, ``host_ms``; see ``measure``),
``time.perf_counter`` on CPU (caches are not flushed on CPU: sizes that fit the last-level cache can exceed
PEAK_COPY). Ceilings are measured in the same run, lazily (only those the benchmarked ops need):
PEAK_COPY = ``dst.copy_(src)`` of 256 MiB counting read + write; PEAK_GEMM = square matmul, fp32 on CPU
(4096^3, 2048^3 with --quick), bf16 on GPU (8192^3, 4096^3 with --quick). A ceiling is a best case, so it uses the
p20 time, and it is measured twice, before the first case and after the last (``BenchContext.finish``), keeping the
higher value: a burst of load from other users of a shared machine then lowers it less often.

Peak memory: on GPU ``torch.cuda.max_memory_allocated()`` during one extra call minus what was allocated before it
(the memory the call itself needs: outputs + workspace). In the timed CPU rows it is left ``None``: torch's CPU
allocator keeps no statistics, and neither tracemalloc nor the profiler sees its allocations (or a C++ kernel's)
reliably. CPU peak memory is measured by the operating system instead, in separate rows (``metric`` "memory",
``BenchContext.run_memory_cases``): each (case, provider) runs in a fresh Python process (``run_probe``), which builds
its inputs, warms the call up on a tiny input, then measures one call with ``cpu_peak_rss``: the peak resident set
(Linux ``VmHWM``, reset to the current ``VmRSS`` by writing 5 to ``/proc/self/clear_refs``) minus the resident set
before the call, i.e. the pages the call touches that were not resident yet: outputs + workspace, C++ allocations
included. Where clear_refs is not writable, ``resource.getrusage`` ``ru_maxrss`` deltas are used (an upper bound when
the call does not raise the process's earlier peak). Page granularity and allocator reuse make it a few-MiB-accurate
measurement, good for telling O(L) from O(L^2), not for comparing kilobytes. A process that dies (out of memory) or
times out becomes a note. Memory rows carry ``peak_mem_mb``, ``mem_ref_mb`` (a size to compare it with, e.g. what an
L x L fp32 matrix takes), and the wall time of that single call in ``p20/p50/p80_ms`` (``reps`` = 1: not a
benchmark; no speedup, no % of ceiling). ``Target.max_mem_ratio`` checks ``peak_mem_mb < ratio * mem_ref_mb``.
"""
from __future__ import annotations

import csv
import dataclasses
import datetime as _dt
import functools
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

MiB = 1 << 20

# ---------------------------------------------------------------------------------------------------------------
# Cases and providers
# ---------------------------------------------------------------------------------------------------------------

DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
}


def dtype_str(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def parse_dtypes(spec: Optional[str]) -> Optional[list[torch.dtype]]:
    """'float32,bf16' -> [torch.float32, torch.bfloat16]; None -> None (each bench's default)."""
    if not spec:
        return None
    out = []
    for part in spec.split(","):
        part = part.strip().lower().replace("torch.", "")
        if not part:
            continue
        if part not in DTYPE_NAMES:
            raise ValueError(f"unknown dtype {part!r}; known: {', '.join(sorted(set(DTYPE_NAMES)))}")
        if DTYPE_NAMES[part] not in out:
            out.append(DTYPE_NAMES[part])
    return out


@dataclass(frozen=True)
class Case:
    """One benchmarked configuration. ``x`` names the swept entry of ``shape`` (the plots' horizontal axis)."""

    op: str                      # e.g. "layer_norm", "rms_norm", "add_layer_norm", "attention", "gru"
    mode: str                    # "fwd" | "bwd" | "fwd+bwd"
    shape: dict                  # e.g. {"M": 4096, "N": 1024}
    dtype: torch.dtype
    device: str                  # "cpu" | "cuda"
    x: Optional[str] = None      # key of ``shape`` that varies across the sweep
    tags: tuple = ()             # free-form labels (e.g. ("causal",)) kept in the rows

    def __hash__(self) -> int:
        return hash((self.op, self.mode, tuple(sorted(self.shape.items())), self.dtype, self.device, self.tags))

    @property
    def shape_str(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.shape.items())

    @property
    def x_value(self):
        return self.shape.get(self.x) if self.x else None


@dataclass
class Provider:
    """A way to run a case. ``kind`` is ``"pyattn:<backend>"`` or ``"torch:<variant>"``."""

    name: str
    factory: Callable[[Case, dict], Callable[[], Any]]
    kind: str
    baseline: bool = False


class Skip(Exception):
    """Raised by a provider factory that cannot run a case; the message becomes a one-line note."""


# ---------------------------------------------------------------------------------------------------------------
# Work formulas (PERF.md "How to count")
# ---------------------------------------------------------------------------------------------------------------

_MODE_FACTOR_ATTN = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
# GRU backward is not fixed by PERF.md; by the usual convention backward costs twice the forward.
_MODE_FACTOR_GRU = {"fwd": 1.0, "bwd": 2.0, "fwd+bwd": 3.0}


def attention_flops(B: int, H: int, Lq: int, Lk: int, D: int, causal: bool = False, mode: str = "fwd") -> float:
    """Forward 4*B*H*Lq*Lk*D (QK^T and PV), halved when causal; backward 2.5x forward; fwd+bwd 3.5x."""
    f = 4.0 * B * H * Lq * Lk * D
    if causal:
        f /= 2
    return f * _MODE_FACTOR_ATTN[mode]


def norm_bytes(numel: int, elem_size: int, mode: str = "fwd", extra: int = 0) -> float:
    """LayerNorm/RMSNorm bytes: forward 2*numel*es (read x, write y) + numel*es per extra residual input/output;
    backward 3*numel*es (read x and dy, write dx) + numel*es per extra; fwd+bwd the sum. Weights are ignored."""
    fwd = (2 + extra) * numel * elem_size
    bwd = (3 + extra) * numel * elem_size
    return float({"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode])


def gru_flops(B: int, T: int, input_size: int, hidden: int, num_layers: int = 1, bidirectional: bool = False,
              mode: str = "fwd") -> float:
    """2*B*T*3H*(I+H) per direction and layer (layers after the first read H*directions inputs)."""
    dirs = 2 if bidirectional else 1
    total = 0.0
    for layer in range(num_layers):
        inp = input_size if layer == 0 else hidden * dirs
        total += dirs * 2.0 * B * T * 3 * hidden * (inp + hidden)
    return total * _MODE_FACTOR_GRU[mode]


@dataclass(frozen=True)
class Work:
    """What one call does: ``amount`` of ``unit`` ("bytes" or "flop"), compared against ``ceiling``."""

    amount: float
    unit: str            # "bytes" | "flop"

    @property
    def ceiling(self) -> str:
        return "PEAK_COPY" if self.unit == "bytes" else "PEAK_GEMM"


def throughput_unit(unit: str, device: str) -> tuple[str, float]:
    """(label, divisor) for reporting: GB/s for bytes, TFLOP/s on GPU and GFLOP/s on CPU for flops."""
    if unit == "bytes":
        return "GB/s", 1e9
    return ("TFLOP/s", 1e12) if device == "cuda" else ("GFLOP/s", 1e9)


# ---------------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class Timing:
    p20: float           # seconds
    p50: float
    p80: float
    reps: int
    peak_mem_bytes: Optional[int] = None
    times: list = field(default_factory=list, repr=False)
    host: Optional[float] = None  # GPU: seconds the host takes to issue one call (the fastest warm-up call's)


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), q in [0, 100]."""
    if not values:
        raise ValueError("percentile of no values")
    v = sorted(values)
    pos = (len(v) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@functools.lru_cache(maxsize=None)
def _l2_flush_buffer(device: str) -> torch.Tensor:
    return torch.empty(256 * MiB, dtype=torch.int8, device=device)


@functools.lru_cache(maxsize=None)
def _gpu_cycles_per_second() -> Optional[float]:
    """The rate of torch.cuda._sleep's spin loop (clock cycles a second, the fastest of 3 timed 2M-cycle sleeps), or
    None where this torch has no torch.cuda._sleep."""
    sleep = getattr(torch.cuda, "_sleep", None)
    if sleep is None:
        return None
    cycles, best = 2_000_000, math.inf
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        sleep(cycles)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return cycles / best if best > 0 else None


def _gpu_delay(seconds: float) -> None:
    """Queue about ``seconds`` of GPU busy-waiting on the current stream (nothing where torch.cuda._sleep is
    missing), so that the host issues the next timed call's kernels before the GPU reaches its start event."""
    rate = _gpu_cycles_per_second()
    if rate is not None and seconds > 0:
        torch.cuda._sleep(int(seconds * rate))


def measure(fn: Callable[[], Any], device: str, warmup: int = 3, reps: Optional[int] = None,
            min_time: float = 0.5, min_reps: int = 5, max_reps: int = 1000, flush_l2: Optional[bool] = None,
            memory: bool = True) -> Timing:
    """Time ``fn()``: ``warmup`` untimed calls, then ``reps`` timed calls (or as many as fill ``min_time`` seconds,
    clamped to [min_reps, max_reps], estimated from the fastest warm-up call). CUDA events per call on GPU with one
    synchronize at the end; perf_counter on CPU. ``flush_l2`` (default: on GPU only) writes a 256 MiB buffer before
    each timed call, outside the events. ``peak_mem_bytes``: GPU only (see the module docstring).
    GPU times are device times: each timed call is queued behind a GPU busy-wait (torch.cuda._sleep) of 1.5x the
    host's time to issue it (``Timing.host``, the fastest warm-up call's) + 20 us, at most 10 ms, so the GPU reaches
    the start event only after the host has issued the call's kernels. Without it, a call whose Python and launch
    overhead outlasts the L2 flush (autograd backwards of small ops: ~0.1 ms) is timed as that overhead, whatever its
    kernels take: on the H100's first run each provider's LayerNorm backward took about as long at 8 MiB as at 32
    (torch 0.088 / 0.095 ms, pyattn's cuda 0.143 / 0.143, Triton 0.321 / 0.325)."""
    device = torch.device(device).type
    cuda = device == "cuda"
    if flush_l2 is None:
        flush_l2 = cuda
    est = math.inf                  # the fastest warm-up call: a first call's JIT/autotune time does not count
    host = math.inf                 # GPU: the fastest warm-up call's issue time (fn() returning, before the sync)
    for _ in range(max(warmup, 1)):
        t0 = time.perf_counter()
        fn()
        host = min(host, time.perf_counter() - t0)
        _sync(device)
        est = min(est, time.perf_counter() - t0)
    if reps is None:
        reps = int(min(max_reps, max(min_reps, math.ceil(min_time / max(est, 1e-7)))))
    reps = max(int(reps), 1)

    peak = None
    if memory and cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = max(0, torch.cuda.max_memory_allocated() - base)

    times: list[float] = []
    if cuda:
        buf = _l2_flush_buffer("cuda") if flush_l2 else None
        delay = min(1.5 * host + 20e-6, 10e-3)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            if buf is not None:
                buf.zero_()
            _gpu_delay(delay)
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)]
    else:
        pc = time.perf_counter
        for _ in range(reps):
            t = pc()
            fn()
            times.append(pc() - t)
    return Timing(percentile(times, 20), percentile(times, 50), percentile(times, 80), reps, peak, times,
                  host if cuda else None)


# ---------------------------------------------------------------------------------------------------------------
# CPU peak memory: the resident memory one call adds, measured by the OS in a fresh process
# ---------------------------------------------------------------------------------------------------------------

def _status_kb(field: str) -> Optional[int]:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM); None where there is no /proc."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs); False where that is refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_peak_rss(fn: Callable[[], Any]) -> dict:
    """The peak resident memory one ``fn()`` call adds to this process, its output included (held until the peak is
    read): ``{"peak_bytes", "seconds" (wall time of the call), "method"}``. Run it in a fresh process after a warm-up
    (``run_probe``): memory freed earlier and still resident can be reused by the call without showing up."""
    import gc
    import resource

    gc.collect()
    if _reset_peak_rss() and _status_kb("VmRSS") is not None:
        base = _status_kb("VmRSS")
        t0 = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - t0
        peak = _status_kb("VmHWM")
        del out
        return {"peak_bytes": max(0, peak - base) * 1024, "seconds": seconds, "method": "VmHWM"}
    # ru_maxrss: kB on Linux, bytes on macOS; it cannot be reset, so it only moves when the call beats the old peak
    # (which Linux carries across execve: a run_probe child starts at its parent's peak)
    scale = 1 if sys.platform == "darwin" else 1024
    before_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    rss = _status_kb("VmRSS")
    base = rss * 1024 if rss is not None else before_max
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    after_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    del out
    if after_max > before_max:
        return {"peak_bytes": max(0, after_max - base), "seconds": seconds, "method": "ru_maxrss"}
    return {"peak_bytes": max(0, before_max - base), "seconds": seconds,
            "method": "ru_maxrss (upper bound: the call did not raise the process's earlier peak)"}


class ProbeFailed(Exception):
    """A ``run_probe`` subprocess died (e.g. killed when out of memory), timed out, or returned no result."""


_PROBE_MARK = "PYATTN_PROBE_RESULT "


def run_probe(func: Callable[..., dict], kwargs: dict, timeout: float = 300.0) -> dict:
    """Call the module-level ``func(**kwargs)`` in a fresh Python process (this interpreter, this ``sys.path``, this
    torch thread count) and return its JSON result. ``kwargs`` and the result must be JSON-able. Raises
    ``ProbeFailed`` with a one-line reason when the process exits non-zero, is killed or runs past ``timeout``."""
    import signal

    code = ("import json, sys\n"
            f"sys.path[:0] = {[p for p in sys.path if p]!r}\n"
            "import importlib, torch\n"
            f"torch.set_num_threads({torch.get_num_threads()})\n"
            f"f = importlib.import_module({func.__module__!r})\n"
            f"for name in {func.__qualname__!r}.split('.'):\n"
            "    f = getattr(f, name)\n"
            "res = f(**json.loads(sys.argv[1]))\n"
            f"print('\\n' + {_PROBE_MARK!r} + json.dumps(res), flush=True)\n")
    try:
        res = subprocess.run([sys.executable, "-c", code, json.dumps(kwargs)], capture_output=True, text=True,
                             timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ProbeFailed(f"timed out after {timeout:g} s") from None
    if res.returncode < 0:
        try:
            sig = signal.Signals(-res.returncode).name
        except ValueError:
            sig = f"signal {-res.returncode}"
        raise ProbeFailed(f"killed by {sig}" + (" (out of memory?)" if sig == "SIGKILL" else ""))
    if res.returncode != 0:
        last = next((line.strip() for line in reversed(res.stderr.splitlines()) if line.strip()), "")
        raise ProbeFailed(f"exit code {res.returncode}" + (f": {last[:200]}" if last else "")
                          + (" (out of memory?)" if res.returncode == 137 else ""))
    for line in reversed(res.stdout.splitlines()):
        if line.startswith(_PROBE_MARK):
            return json.loads(line[len(_PROBE_MARK):])
    raise ProbeFailed("the subprocess printed no result")


def case_to_dict(case: Case) -> dict:
    """A JSON-able ``Case`` (for ``run_probe``); ``case_from_dict`` inverts it."""
    return {"op": case.op, "mode": case.mode, "shape": dict(case.shape), "dtype": dtype_str(case.dtype),
            "device": case.device, "x": case.x, "tags": list(case.tags)}


def case_from_dict(d: dict) -> Case:
    return Case(d["op"], d["mode"], dict(d["shape"]), DTYPE_NAMES[d["dtype"]], d["device"], d.get("x"),
                tuple(d.get("tags", ())))


# ---------------------------------------------------------------------------------------------------------------
# Ceilings (measured in the same run)
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class Ceiling:
    name: str            # "PEAK_COPY" | "PEAK_GEMM"
    value: float         # bytes/s or flop/s
    unit: str            # "bytes" | "flop"
    how: str             # what was measured

    def as_dict(self, device: str) -> dict:
        label, div = throughput_unit(self.unit, device)
        return {"name": self.name, "value": self.value / div, "unit": label, "how": self.how}


def peak_copy(device: str, nbytes: int = 256 * MiB, timing: Optional[dict] = None) -> Ceiling:
    """Device copy bandwidth: ``dst.copy_(src)`` of ``nbytes``, counting read + write (2 * nbytes per call)."""
    n = nbytes // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t = measure(lambda: dst.copy_(src), device, flush_l2=False, memory=False, **(timing or {}))
    return Ceiling("PEAK_COPY", 2.0 * n * 4 / t.p20, "bytes", f"copy_ of {nbytes / MiB:.0f} MiB, read+write")


def peak_gemm(device: str, n: int, timing: Optional[dict] = None) -> Ceiling:
    """Matmul throughput: fp32 on CPU, bf16 on GPU, n x n x n (2*n^3 flops per call)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    t = measure(lambda: torch.mm(a, b, out=c), device, flush_l2=False, memory=False, **(timing or {}))
    return Ceiling("PEAK_GEMM", 2.0 * n ** 3 / t.p20, "flop", f"{dtype_str(dtype)} matmul {n}^3")


# ---------------------------------------------------------------------------------------------------------------
# Environment (what every row is keyed by)
# ---------------------------------------------------------------------------------------------------------------

def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(torch.cuda.current_device())
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def slugify(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3' (the results/<device>/ folder name)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def _version(dist: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return None


def git_commit(path: Optional[str] = None) -> tuple[Optional[str], Optional[bool]]:
    """(HEAD commit, working tree dirty) of the repository holding ``path`` (this file); (None, None) outside one."""
    cwd = path or os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None, None
        st = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True,
                            text=True, timeout=10)
        return head.stdout.strip() or None, (bool(st.stdout.strip()) if st.returncode == 0 else None)
    except (OSError, subprocess.SubprocessError):
        return None, None


def environment(device: str) -> dict:
    import pyattn

    commit, dirty = git_commit()
    return {
        "device": device,
        "device_name": device_name(device),
        "threads": torch.get_num_threads() if device == "cpu" else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "pyattn": getattr(pyattn, "__version__", None),
        "commit": commit,
        "dirty": dirty,
        "python": platform.python_version(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
    }


# ---------------------------------------------------------------------------------------------------------------
# Output checks (untimed): every provider's output is compared once with a float64 evaluation of the baseline,
# so a wrong kernel is flagged, never hidden behind a speedup
# ---------------------------------------------------------------------------------------------------------------

# Loose, sanity-check tolerances (the tests hold the real ones): |out - ref| <= atol + rtol * |ref|.
_CHECK_ATOL = {torch.float32: 1e-3, torch.float64: 1e-6, torch.bfloat16: 1.5e-1, torch.float16: 2e-2}
_CHECK_RTOL = {torch.float32: 1e-3, torch.float64: 1e-6, torch.bfloat16: 5e-2, torch.float16: 1e-2}


def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return []


def compare(ref, out, dtype: torch.dtype) -> tuple[bool, Optional[float]]:
    """(within the loose per-dtype tolerance, max abs error) of ``out`` against ``ref``; NaN/inf patterns must
    match. (False, None) when the outputs do not even have the same structure or shapes."""
    rs, os_ = _tensors(ref), _tensors(out)
    if len(rs) != len(os_):
        return False, None
    atol, rtol = _CHECK_ATOL.get(dtype, 1e-3), _CHECK_RTOL.get(dtype, 1e-3)
    ok, worst = True, 0.0
    for r, o in zip(rs, os_):
        if r.shape != o.shape:
            return False, None
        r64, o64 = r.detach().double(), o.detach().double()
        if not r64.numel():
            continue
        fr, fo = torch.isfinite(r64), torch.isfinite(o64)
        if not torch.equal(fr, fo):
            ok = False
        both = fr & fo
        d = (r64 - o64).abs()[both]
        if d.numel():
            worst = max(worst, float(d.max()))
            ok = ok and bool((d <= atol + rtol * r64.abs()[both]).all())
    return ok, worst


def _to_float64(inputs: dict) -> dict:
    return {k: (v.detach().double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
            for k, v in inputs.items()}


# ---------------------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------------------

class _Progress:
    """A tqdm bar on a terminal (when tqdm is installed); otherwise one plain line per case on stderr, so logs stay
    readable."""

    def __init__(self, total: int, enabled: bool = True):
        self.bar = None
        self.enabled = enabled
        self.total, self.n, self.last_case = total, 0, None
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="run", dynamic_ncols=True, leave=False, file=sys.stderr)
            except ImportError:
                self.bar = None

    def update(self, case: str, provider: str) -> None:
        self.n += 1
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_description_str(f"{case} {provider}"[:60])
            self.bar.update(1)
        elif case != self.last_case:
            print(f"[{self.n}/{self.total}] {case}", file=sys.stderr, flush=True)
        self.last_case = case

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass
class Settings:
    """Timing knobs: set from --quick (and the hidden ``tiny`` used by the tests). ``rounds``: a case's providers are
    timed in that many interleaved rounds (each ``min_time / rounds``, the times pooled), so that a drift of the
    device's clocks during a case reaches every provider alike: on GPUs 3 (an H200 timed one kernel under two names
    3% apart in back-to-back single passes), on CPUs 1 (CPU runs time big cases whose providers' buffers should not
    all be alive at once)."""

    warmup: int = 3
    min_time: float = 0.5
    min_reps: int = 5
    max_reps: int = 1000
    copy_bytes: int = 256 * MiB
    gemm_n: int = 4096
    rounds: int = 1

    @classmethod
    def for_run(cls, device: str, quick: bool = False, tiny: bool = False) -> "Settings":
        rounds = 3 if device == "cuda" else 1
        if tiny:
            return cls(warmup=1, min_time=0.0, min_reps=3, max_reps=3, copy_bytes=4 * MiB, gemm_n=128, rounds=rounds)
        gemm = (4096 if quick else 8192) if device == "cuda" else (2048 if quick else 4096)
        if quick:
            # warmup 1: the untimed output-check call before it is a warm-up call too
            return cls(warmup=1, min_time=0.25, min_reps=3, max_reps=200, gemm_n=gemm, rounds=rounds)
        return cls(warmup=3, min_time=1.0, min_reps=5, max_reps=2000, gemm_n=gemm, rounds=rounds)

    def timing(self) -> dict:
        return {"warmup": self.warmup, "min_time": self.min_time, "min_reps": self.min_reps, "max_reps": self.max_reps}


class BenchContext:
    """What a bench file's ``run(ctx)`` gets: device, dtypes, sizes flags, same-run ceilings, notes, progress."""

    def __init__(self, device: str, dtypes: Optional[list] = None, quick: bool = False, tiny: bool = False,
                 progress: bool = True, settings: Optional[Settings] = None):
        self.device = torch.device(device).type
        self.dtypes = dtypes
        self.quick = quick
        self.tiny = tiny
        self.progress = progress
        self.settings = settings or Settings.for_run(self.device, quick, tiny)
        self.env = environment(self.device)
        self.ceilings: dict[str, Ceiling] = {}
        self.notes: list[str] = []
        self.target_lines: list[str] = []   # apply_targets() summaries, printed after the table

    def note(self, text: str) -> None:
        """A one-line note, kept once (printed after the table by run.py and saved in the JSON)."""
        if text not in self.notes:
            self.notes.append(text)

    def pyattn_backends(self, case: Case, refusals: Callable[[str], list], what: str,
                        names: Optional[Sequence[str]] = None) -> list[str]:
        """The pyattn backends to time on ``case`` (``names``, default: every registered one, in order): never Triton
        on CPU (it only runs in its interpreter there); a backend that is unavailable or whose ``refusals(name)`` is
        non-empty is a note ("pyattn:<name> not benchmarked for <what> on <device>: ...") instead."""
        import pyattn
        from pyattn.dispatch import get_backend

        out = []
        for name in (names if names is not None else [n for n, _, _ in pyattn.backends()]):
            if name == "triton" and case.device == "cpu":
                self.note("pyattn:triton not benchmarked on CPU (it only runs in the Triton interpreter there)")
                continue
            ok, why = get_backend(name).availability()
            if not ok:
                self.note(f"pyattn:{name} unavailable: {why}")
                continue
            reasons = refusals(name)
            if reasons:
                self.note(f"pyattn:{name} not benchmarked for {what} on {case.device}: " + "; ".join(reasons))
                continue
            out.append(name)
        return out

    def want(self, dtypes: Iterable[torch.dtype]) -> list[torch.dtype]:
        """The bench's default dtypes, filtered by --dtype."""
        dtypes = list(dtypes)
        return dtypes if self.dtypes is None else [d for d in dtypes if d in self.dtypes]

    def _measure_ceiling(self, name: str) -> Ceiling:
        s = self.settings
        if name == "PEAK_COPY":
            return peak_copy(self.device, s.copy_bytes, s.timing())
        if name == "PEAK_GEMM":
            return peak_gemm(self.device, s.gemm_n, s.timing())
        raise ValueError(f"unknown ceiling {name!r}")

    def ceiling(self, name: str) -> Ceiling:
        """The named ceiling, measured on first use."""
        if name not in self.ceilings:
            self.ceilings[name] = self._measure_ceiling(name)
        return self.ceilings[name]

    def finish(self, rows: list[dict], targets: Sequence["Target"] = ()) -> list[dict]:
        """After the last case: measure every ceiling again and keep the higher value, recompute each row's
        % of ceiling, then mark the PERF.md ``targets`` (summaries go to ``self.target_lines``)."""
        for name in list(self.ceilings):
            again = self._measure_ceiling(name)
            if again.value > self.ceilings[name].value:
                self.ceilings[name] = again
        for r in rows:
            c = self.ceilings.get(r["ceiling"])
            if c is None or r["device"] != self.device:
                continue
            _, div = throughput_unit(c.unit, self.device)
            r["ceiling_value"] = c.value / div
            r["pct_of_ceiling"] = 100.0 * r["throughput"] * div / c.value
        self.target_lines += apply_targets(rows, targets)
        return rows

    def run_cases(self, cases: Sequence[Case], make_inputs: Callable[[Case], dict],
                  providers_for: Callable[[Case], list], work_for: Callable[[Case], Work],
                  reference: str = "float64") -> list[dict]:
        """Measure every provider on every case; rows carry speedup vs the case's baseline and % of ceiling.

        ``reference`` is what each output is checked against (untimed): "float64" = the baseline provider run on
        float64 copies of the inputs (the default; choose something cheaper where float64 would not fit),
        "baseline" = the baseline's own output, "none" = no check. ``check`` is "ok" when within the loose
        tolerance or no further off than the baseline itself (torch is not always exact in half precision),
        "MISMATCH" otherwise; the baseline's own row says "ok" or "inexact"."""
        plan = [(c, sorted(providers_for(c), key=lambda p: not p.baseline)) for c in cases]
        for c in sorted({w.ceiling for w in (work_for(c) for c, _ in plan)}):
            self.ceiling(c)
        bar = _Progress(sum(len(ps) for _, ps in plan), self.progress)
        rows: list[dict] = []
        try:
            for case, providers in plan:
                rows.extend(self._run_case(case, providers, make_inputs, work_for(case), reference, bar))
        finally:
            bar.close()
        return rows

    def _reference(self, case: Case, providers: list, inputs: dict, reference: str):
        base = providers[0] if providers and providers[0].baseline else None
        if reference == "none" or base is None or reference == "baseline":
            return None
        if reference != "float64":
            raise ValueError(f"reference must be float64, baseline or none, got {reference!r}")
        case64 = dataclasses.replace(case, dtype=torch.float64)
        try:
            out = base.factory(case64, _to_float64(inputs))()
            return [t.detach() for t in _tensors(out)]
        except Exception as e:
            self.note(f"no float64 reference for {case.op} {case.mode} ({type(e).__name__}: {e}); "
                      "checking against the baseline's output")
            return None

    def _run_case(self, case: Case, providers: list, make_inputs, work: Work, reference: str, bar) -> list[dict]:
        """Checks and times each provider (Settings.rounds > 1: checks and first timing round per provider, then
        the other rounds interleaved over the providers, their times pooled)."""
        inputs = make_inputs(case)
        ref = self._reference(case, providers, inputs, reference)
        base_name = providers[0].name if providers and providers[0].baseline else None
        base_err, done = None, []  # done: (provider, fn or None, Timing, check)
        s, rounds = self.settings, max(1, self.settings.rounds)
        for prov in providers:
            bar.update(f"{case.op} {case.mode} {case.shape_str} {dtype_str(case.dtype)}", prov.name)
            try:
                fn = prov.factory(case, inputs)
                out = fn()                                  # untimed: the output that is checked
                _sync(case.device)
                if reference == "none":
                    check = ("unchecked", None)
                elif ref is None and prov.baseline:
                    ref, check = [t.detach() for t in _tensors(out)], ("ok", 0.0)
                elif ref is None:
                    check = ("unchecked", None)
                else:
                    ok, err = compare(ref, out, case.dtype)
                    if prov.baseline:
                        base_err = err
                        check = ("ok" if ok else "inexact", err)
                    else:
                        tolerated = ok or (err is not None and base_err is not None and err <= 2 * base_err)
                        check = ("ok" if tolerated else "MISMATCH", err)
                del out
                t = measure(fn, case.device, warmup=s.warmup, min_time=s.min_time / rounds, min_reps=s.min_reps,
                            max_reps=s.max_reps)
                if rounds == 1:
                    fn = None  # (its buffers go now: CPU cases can be big)
            except Skip as e:
                self.note(f"{prov.name} skipped for {case.op} {case.mode}: {e}")
                continue
            except Exception as e:  # a broken provider must not take the whole run down
                msg = (str(e).strip().splitlines() or [""])[0][:200]
                self.note(f"{prov.name} FAILED on {case.op} {case.mode} {case.shape_str} {dtype_str(case.dtype)}: "
                          f"{type(e).__name__}: {msg}")
                continue
            done.append((prov, fn, t, check))
        for _ in range(rounds - 1):
            for i, (prov, fn, t, check) in enumerate(done):
                try:
                    more = measure(fn, case.device, warmup=1, min_time=s.min_time / rounds, min_reps=s.min_reps,
                                   max_reps=s.max_reps, memory=False)
                except Exception as e:  # (it ran before: keep the rounds it has)
                    self.note(f"{prov.name} FAILED in a later timing round on {case.op} {case.mode} "
                              f"{case.shape_str}: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}")
                    continue
                times = t.times + more.times
                done[i] = (prov, fn, Timing(percentile(times, 20), percentile(times, 50), percentile(times, 80),
                                            len(times), t.peak_mem_bytes, times, t.host), check)
        case_rows = [self._row(case, prov, t, work, check, base_name) for prov, _, t, check in done]
        base_time = next((t.p50 for prov, _, t, _ in done if prov.baseline), None)
        for r in case_rows:
            r["speedup"] = (base_time / r["p50_ms"] * 1e3) if base_time else None
        return case_rows

    def run_memory_cases(self, cases: Sequence[Case], providers_for: Callable[[Case], list],
                         probe: Callable[..., dict], mem_ref_for: Callable[[Case], float],
                         work_for: Callable[[Case], Work], timeout: Optional[float] = None) -> list[dict]:
        """CPU peak-memory rows (``metric`` "memory"; see the module docstring): for every case and provider,
        ``probe(case=case_to_dict(case), provider=provider.kind)`` runs in a fresh process (``run_probe``) and
        returns ``cpu_peak_rss``'s dict for one call. ``providers_for`` gives ``Provider`` objects whose ``factory``
        is not used (the probe rebuilds the call from the kind); the baseline provider, if any, is named in the rows'
        ``baseline``. ``mem_ref_for(case)`` is the byte count the rows compare against (``mem_ref_mb``). A provider
        whose process fails, is killed or times out (``timeout`` seconds; default 60 with ``tiny``, else 300) gets
        a note instead of a row."""
        if timeout is None:
            timeout = 60.0 if self.tiny else 300.0
        plan = [(c, sorted(providers_for(c), key=lambda p: not p.baseline)) for c in cases]
        bar = _Progress(sum(len(ps) for _, ps in plan), self.progress)
        rows: list[dict] = []
        methods: set = set()
        try:
            for case, providers in plan:
                base_name = providers[0].name if providers and providers[0].baseline else None
                for prov in providers:
                    bar.update(f"{case.op} {case.mode} {case.shape_str} {dtype_str(case.dtype)}", prov.name)
                    try:
                        res = run_probe(probe, {"case": case_to_dict(case), "provider": prov.kind}, timeout)
                    except ProbeFailed as e:
                        self.note(f"{prov.name} peak memory not measured for {case.op} {case.mode} {case.shape_str} "
                                  f"{dtype_str(case.dtype)}: {e}")
                        continue
                    methods.add(res["method"])
                    sec = max(float(res["seconds"]), 1e-9)
                    row = self._row(case, prov, Timing(sec, sec, sec, 1, int(res["peak_bytes"])), work_for(case),
                                    ("unchecked", None), base_name)
                    row.update(metric="memory", mem_ref_mb=mem_ref_for(case) / MiB, ceiling=None, ceiling_value=None,
                               pct_of_ceiling=None)
                    rows.append(row)
        finally:
            bar.close()
        if methods:
            self.note("peak memory rows (metric 'memory'): resident memory one call adds in a fresh process, read "
                      f"from {' / '.join(sorted(methods))}; the time columns are that single call's")
        return rows

    def _row(self, case: Case, prov: Provider, t: Timing, work: Work, check, baseline: Optional[str]) -> dict:
        label, div = throughput_unit(work.unit, case.device)
        rate = work.amount / t.p50
        ceil = self.ceilings.get(work.ceiling)
        env = self.env
        return {
            "op": case.op, "mode": case.mode, "shape": case.shape_str, "params": dict(case.shape),
            "x_name": case.x, "x": case.x_value, "tags": list(case.tags),
            "dtype": dtype_str(case.dtype), "provider": prov.name, "kind": prov.kind, "baseline": baseline,
            "is_baseline": prov.baseline,
            "device": case.device, "device_name": env["device_name"], "threads": env["threads"],
            "torch": env["torch"], "cuda": env["cuda"], "triton": env["triton"], "pyattn": env["pyattn"],
            "commit": env["commit"], "dirty": env["dirty"], "timestamp": env["timestamp"],
            "p20_ms": t.p20 * 1e3, "p50_ms": t.p50 * 1e3, "p80_ms": t.p80 * 1e3, "reps": t.reps,
            "host_ms": t.host * 1e3 if t.host is not None else None,
            "work": work.amount, "work_unit": work.unit,
            "throughput": rate / div, "throughput_unit": label,
            "ceiling": work.ceiling, "ceiling_value": (ceil.value / div) if ceil else None,
            "pct_of_ceiling": (100.0 * rate / ceil.value) if ceil else None,
            "speedup": None,
            "peak_mem_mb": (t.peak_mem_bytes / MiB) if t.peak_mem_bytes is not None else None,
            "metric": "time", "mem_ref_mb": None,
            "check": check[0], "max_abs_err": check[1],
            "target": None, "meets_target": None,
        }


# ---------------------------------------------------------------------------------------------------------------
# Targets (PERF.md): annotate the rows a target applies to
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class Target:
    """``min_speedup`` vs the baseline and/or ``min_pct`` of the ceiling, for the best pyattn provider (the fastest;
    the one with the least peak memory for a memory-only target); ``min_vs_fastest``: the fastest torch provider's
    time (every ``torch:`` row of the case, e.g. each SDPA backend forced) over the row's, PERF.md's "fastest torch
    backend" baseline; ``max_mem_ratio``: peak memory below that fraction of the row's ``mem_ref_mb`` (memory rows).
    ``kinds`` limits the target to those pyattn providers."""

    op: str
    mode: str
    device: str
    match: Callable[[dict], bool]        # on a row's params
    min_speedup: Optional[float] = None
    min_pct: Optional[float] = None
    dtypes: Optional[tuple] = None       # dtype names; None = any
    text: str = ""
    max_mem_ratio: Optional[float] = None
    kinds: Optional[tuple] = None        # provider kinds (e.g. ("pyattn:cpp",)); None = every pyattn provider
    min_vs_fastest: Optional[float] = None

    def applies(self, row: dict) -> bool:
        return (row["op"] == self.op and row["mode"] == self.mode and row["device"] == self.device
                and (self.dtypes is None or row["dtype"] in self.dtypes) and self.match(row["params"]))

    def describe(self) -> str:
        parts = []
        if self.min_speedup is not None:
            parts.append(f">= {self.min_speedup:g}x")
        if self.min_vs_fastest is not None:
            parts.append(f">= {self.min_vs_fastest:g}x fastest torch")
        if self.min_pct is not None:
            parts.append(f">= {self.min_pct:g}% of ceiling")
        if self.max_mem_ratio is not None:
            parts.append(f"peak mem < {self.max_mem_ratio:g} x ref")
        return ", ".join(parts)


def _fmt_mib(mib: float) -> str:
    return f"{mib / 1024:.2f} GiB" if mib >= 1024 else f"{mib:.1f} MiB"


def apply_targets(rows: list[dict], targets: Sequence[Target]) -> list[str]:
    """Mark rows with their targets (several on one row: joined with "; ", met when all are) and whether they meet
    them; return one summary line per (target, case)."""
    lines = []
    for r in rows:
        r["target"], r["meets_target"] = None, None
    for tgt in targets:
        groups: dict[tuple, list[dict]] = {}
        for r in rows:
            if tgt.applies(r):
                groups.setdefault((r["shape"], r["dtype"]), []).append(r)
        for (shape, dtype), rs in sorted(groups.items()):
            ours = [r for r in rs if r["kind"].startswith("pyattn:") and (tgt.kinds is None or r["kind"] in tgt.kinds)]
            torch_rows = [r for r in rs if r["kind"].startswith("torch:") and r.get("p50_ms")]
            fastest = min(torch_rows, key=lambda r: r["p50_ms"]) if torch_rows else None

            def vs_fastest(r):
                return fastest["p50_ms"] / r["p50_ms"] if fastest is not None and r.get("p50_ms") else None
            oks = {}  # id(row) -> whether it meets this target
            for r in ours:
                ok = True
                if tgt.min_speedup is not None:
                    ok = ok and r["speedup"] is not None and r["speedup"] >= tgt.min_speedup
                if tgt.min_vs_fastest is not None:
                    ok = ok and vs_fastest(r) is not None and vs_fastest(r) >= tgt.min_vs_fastest
                if tgt.min_pct is not None:
                    ok = ok and r["pct_of_ceiling"] is not None and r["pct_of_ceiling"] >= tgt.min_pct
                if tgt.max_mem_ratio is not None:
                    ok = ok and r.get("peak_mem_mb") is not None and bool(r.get("mem_ref_mb")) \
                        and r["peak_mem_mb"] < tgt.max_mem_ratio * r["mem_ref_mb"]
                ok = oks[id(r)] = ok and r["check"] != "MISMATCH"
                if r["target"] is None:
                    r["target"], r["meets_target"] = tgt.describe(), ok
                else:
                    r["target"], r["meets_target"] = f"{r['target']}; {tgt.describe()}", r["meets_target"] and ok
            if not ours:
                lines.append(f"  {tgt.text or tgt.op} {tgt.mode} {shape} {dtype}: no pyattn provider ran")
                continue
            if tgt.min_speedup is None and tgt.min_pct is None and tgt.max_mem_ratio is not None:
                best = min(ours, key=lambda r: math.inf if r.get("peak_mem_mb") is None else r["peak_mem_mb"])
                got = "peak mem " + ("n/a" if best.get("peak_mem_mb") is None else _fmt_mib(best["peak_mem_mb"]))
                if best.get("peak_mem_mb") is not None and best.get("mem_ref_mb"):
                    got += f" = {best['peak_mem_mb'] / best['mem_ref_mb']:.3g} x ref ({_fmt_mib(best['mem_ref_mb'])})"
            elif tgt.min_vs_fastest is not None:
                best = max(ours, key=lambda r: vs_fastest(r) or 0.0)
                ratio = vs_fastest(best)
                got = "n/a" if ratio is None else f"{ratio:.2f}x {fastest['provider']}"
            else:
                best = max(ours, key=lambda r: r["speedup"] or 0.0)
                pct = (f", {best['pct_of_ceiling']:.0f}% of {best['ceiling']}" if best["pct_of_ceiling"] is not None
                       else "")
                got = (f"{best['speedup']:.2f}x" if best["speedup"] is not None else "n/a") + pct
            lines.append(f"  {'MET ' if oks[id(best)] else 'MISS'}  {tgt.text or tgt.op} {tgt.mode} {shape} "
                         f"{dtype}: target {tgt.describe()}; best {best['provider']} {got}")
    return lines


# ---------------------------------------------------------------------------------------------------------------
# Output: table, JSON, CSV, plots
# ---------------------------------------------------------------------------------------------------------------

def _sort_key(r: dict):
    return (r["op"], r["mode"], r["dtype"], r["x"] if isinstance(r["x"], (int, float)) else 0, r["shape"],
            not r["is_baseline"], r["provider"])


def _fmt(v, spec: str, none: str = "-") -> str:
    return none if v is None else format(v, spec)


def format_table(rows: list[dict], ceilings: Optional[dict] = None, env: Optional[dict] = None) -> str:
    """An aligned text table, one line per row, blank line between (op, mode, dtype) groups. ``peak mem``: the
    measured peak memory (GPU rows, CPU memory rows), with its share of the row's ``mem_ref_mb`` where one is given;
    a single-call memory row shows ``(1 call)`` instead of the p20 - p80 spread. GPU rows also show ``host ms``, the
    host's time to issue one call (``measure``: the times are the device's)."""
    host = any(r.get("host_ms") is not None for r in rows)
    head = ["op", "mode", "dtype", "shape", "provider", "p50 ms", "[p20 - p80]"] + (["host ms"] if host else []) + [
        "throughput", "% ceil", "speedup", "peak mem", "check", "target"]
    body: list[Optional[list[str]]] = []
    prev = None
    for r in sorted(rows, key=_sort_key):
        grp = (r["op"], r["mode"], r["dtype"])
        if prev is not None and grp != prev:
            body.append(None)
        prev = grp
        target = "" if r["target"] is None else (("MET " if r["meets_target"] else "MISS ") + r["target"])
        mem = "-" if r.get("peak_mem_mb") is None else _fmt_mib(r["peak_mem_mb"])
        if r.get("peak_mem_mb") is not None and r.get("mem_ref_mb"):
            mem += f" ({100.0 * r['peak_mem_mb'] / r['mem_ref_mb']:.1f}% of ref)"
        body.append([r["op"], r["mode"], r["dtype"], r["shape"], r["provider"], f"{r['p50_ms']:.3f}",
                     f"[{r['p20_ms']:.3f} - {r['p80_ms']:.3f}]" if r.get("metric") != "memory" else "(1 call)"]
                    + ([_fmt(r.get("host_ms"), ".3f")] if host else []) + [
                     f"{r['throughput']:.1f} {r['throughput_unit']}",
                     _fmt(r["pct_of_ceiling"], ".0f") + ("%" if r["pct_of_ceiling"] is not None else ""),
                     "base" if r["is_baseline"] else (_fmt(r["speedup"], ".2f") + ("x" if r["speedup"] else "")),
                     mem, r["check"], target])
    widths = [max([len(h)] + [len(b[i]) for b in body if b is not None]) for i, h in enumerate(head)]
    right = set(range(5, 12 if host else 11))

    def line(cells):
        cells = (c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
        return "  ".join(cells).rstrip()

    out = []
    if env:
        thr = f", {env['threads']} threads" if env.get("threads") else ""
        out.append(f"device: {env['device_name']} ({env['device']}{thr}); torch {env['torch']}, triton "
                   f"{env['triton'] or '-'}, pyattn {env['pyattn']}, commit {(env['commit'] or '-')[:12]}"
                   f"{' (dirty)' if env.get('dirty') else ''}")
    for c in (ceilings or {}).values():
        d = c if isinstance(c, dict) else c.as_dict(env["device"] if env else "cpu")
        out.append(f"ceiling {d['name']}: {d['value']:.1f} {d['unit']} ({d['how']})")
    out.append(line(head))
    out.append("  ".join("-" * w for w in widths))
    out.extend("" if b is None else line(b) for b in body)
    return "\n".join(out)


CSV_FIELDS = ["op", "mode", "shape", "x_name", "x", "dtype", "provider", "kind", "baseline", "is_baseline", "device",
              "device_name", "threads", "torch", "cuda", "triton", "pyattn", "commit", "dirty", "timestamp",
              "p20_ms", "p50_ms", "p80_ms", "reps", "host_ms", "work", "work_unit", "throughput", "throughput_unit",
              "ceiling", "ceiling_value", "pct_of_ceiling", "speedup", "peak_mem_mb", "metric", "mem_ref_mb", "check",
              "max_abs_err", "target", "meets_target", "params", "tags"]


def write_json(path: str, rows: list[dict], env: dict, ceilings: dict, notes: Sequence[str] = (),
               targets: Sequence[str] = ()) -> None:
    """{"schema": 1, "env": {...}, "ceilings": {name: {...}}, "notes": [...], "targets": [...], "rows": [...]}."""
    dev = env["device"]
    doc = {"schema": 1, "env": env,
           "ceilings": {k: (c if isinstance(c, dict) else c.as_dict(dev)) for k, c in ceilings.items()},
           "notes": list(notes), "targets": list(targets), "rows": sorted(rows, key=_sort_key)}
    _mkparent(path)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, default=str)
        f.write("\n")


def write_csv(path: str, rows: list[dict]) -> None:
    _mkparent(path)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in sorted(rows, key=_sort_key):
            w.writerow({k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in r.items()})


def _mkparent(path: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)


def write_plots(outdir: str, rows: list[dict]) -> list[str]:
    """One PNG per (op, mode, dtype): throughput vs the swept size, one line per provider, the ceiling dashed (memory
    rows: peak memory in MiB, log scale, the reference size dotted). Uses matplotlib's object API with the Agg canvas
    (no pyplot, no display). Returns the files written."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        print("note: matplotlib is not installed; no plots written (pip install matplotlib)", file=sys.stderr)
        return []
    os.makedirs(outdir, exist_ok=True)
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["op"], r["mode"], r["dtype"], r["device"]), []).append(r)
    written = []
    for (op, mode, dtype, device), rs in sorted(groups.items()):
        fig = Figure(figsize=(7, 4.5), dpi=110)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        xs_all = sorted({r["x"] for r in rs if isinstance(r["x"], (int, float))})
        use_index = not xs_all
        order = sorted({r["shape"] for r in rs}, key=lambda s: next((r["x"] or 0) for r in rs if r["shape"] == s))
        memory = all(r.get("metric") == "memory" and r.get("peak_mem_mb") is not None for r in rs)
        value = (lambda r: max(r["peak_mem_mb"], 1e-3)) if memory else (lambda r: r["throughput"])  # noqa: E731
        for prov in sorted({r["provider"] for r in rs}, key=lambda p: (not any(r["is_baseline"] for r in rs
                                                                                 if r["provider"] == p), p)):
            pr = sorted((r for r in rs if r["provider"] == prov), key=lambda r: (r["x"] or 0, r["shape"]))
            xs = [order.index(r["shape"]) if use_index else r["x"] for r in pr]
            base = any(r["is_baseline"] for r in pr)
            ax.plot(xs, [value(r) for r in pr], marker="o", linestyle="--" if base else "-",
                    label=prov + (" (baseline)" if base else ""))
        refs = sorted({(order.index(r["shape"]) if use_index else r["x"], r["mem_ref_mb"]) for r in rs
                       if memory and r.get("mem_ref_mb")})
        if refs:
            ax.plot([x for x, _ in refs], [m for _, m in refs], color="gray", linestyle=":", marker="x",
                    label="reference size")
        ceil = next((r for r in rs if r["ceiling_value"] is not None), None)
        if ceil is not None and not memory:
            ax.axhline(ceil["ceiling_value"], color="gray", linestyle=":", linewidth=1,
                       label=f"{ceil['ceiling']} {ceil['ceiling_value']:.0f} {ceil['throughput_unit']}")
        if use_index:
            ax.set_xticks(range(len(order)))
            ax.set_xticklabels(order, rotation=20, fontsize=7)
        else:
            if len(xs_all) > 1 and xs_all[0] > 0 and xs_all[-1] / xs_all[0] >= 8:
                ax.set_xscale("log", base=2)
            ax.set_xticks(xs_all)
            ax.set_xticklabels([str(x) for x in xs_all])
            ax.set_xlabel(rs[0]["x_name"] + "   (" + " ".join(f"{k}={v}" for k, v in rs[0]["params"].items()
                                                           if k != rs[0]["x_name"]) + ")")
        if memory:
            ax.set_ylabel("peak memory (MiB)")
            ax.set_yscale("log")
        else:
            ax.set_ylabel(rs[0]["throughput_unit"])
            ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.set_title(f"{op} {mode} {dtype} on {rs[0]['device_name']}", fontsize=10)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(outdir, f"{op}_{mode.replace('+', '-')}_{dtype}_{device}.png")
        fig.savefig(path)
        written.append(path)
    return written

