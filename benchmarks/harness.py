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

Method (PERF.md): p20/p50/p80 over repeated runs after warm-up, the median quoted; CUDA events on GPU (the L2
cache is flushed before every repetition by writing a 256 MiB buffer, so small sizes are not timed from L2),
``time.perf_counter`` on CPU (caches are not flushed on CPU: sizes that fit the last-level cache can exceed
PEAK_COPY). Ceilings are measured in the same run, lazily (only those the benchmarked ops need):
PEAK_COPY = ``dst.copy_(src)`` of 256 MiB counting read + write; PEAK_GEMM = square matmul, fp32 on CPU
(4096^3, 2048^3 with --quick), bf16 on GPU (8192^3, 4096^3 with --quick). A ceiling is a best case, so it uses the
p20 time, and it is measured twice, before the first case and after the last (``BenchContext.finish``), keeping the
higher value: a burst of load from other users of a shared machine then lowers it less often.

Peak memory: on GPU ``torch.cuda.max_memory_allocated()`` during one extra call minus what was allocated before it
(the memory the call itself needs: outputs + workspace). On CPU it is left ``None``: torch's CPU allocator keeps no
statistics, and neither tracemalloc nor the profiler sees its allocations reliably.
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


def measure(fn: Callable[[], Any], device: str, warmup: int = 3, reps: Optional[int] = None,
            min_time: float = 0.5, min_reps: int = 5, max_reps: int = 1000, flush_l2: Optional[bool] = None,
            memory: bool = True) -> Timing:
    """Time ``fn()``: ``warmup`` untimed calls, then ``reps`` timed calls (or as many as fill ``min_time`` seconds,
    clamped to [min_reps, max_reps], estimated from the fastest warm-up call). CUDA events per call on GPU with one
    synchronize at the end; perf_counter on CPU. ``flush_l2`` (default: on GPU only) writes a 256 MiB buffer before
    each timed call, outside the events. ``peak_mem_bytes``: GPU only (see the module docstring)."""
    device = torch.device(device).type
    cuda = device == "cuda"
    if flush_l2 is None:
        flush_l2 = cuda
    est = math.inf                  # the fastest warm-up call: a first call's JIT/autotune time does not count
    for _ in range(max(warmup, 1)):
        t0 = time.perf_counter()
        fn()
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
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            if buf is not None:
                buf.zero_()
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
    return Timing(percentile(times, 20), percentile(times, 50), percentile(times, 80), reps, peak, times)


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
    """Timing knobs: set from --quick (and the hidden ``tiny`` used by the tests)."""

    warmup: int = 3
    min_time: float = 0.5
    min_reps: int = 5
    max_reps: int = 1000
    copy_bytes: int = 256 * MiB
    gemm_n: int = 4096

    @classmethod
    def for_run(cls, device: str, quick: bool = False, tiny: bool = False) -> "Settings":
        if tiny:
            return cls(warmup=1, min_time=0.0, min_reps=3, max_reps=3, copy_bytes=4 * MiB, gemm_n=128)
        gemm = (4096 if quick else 8192) if device == "cuda" else (2048 if quick else 4096)
        if quick:
            # warmup 1: the untimed output-check call before it is a warm-up call too
            return cls(warmup=1, min_time=0.25, min_reps=3, max_reps=200, gemm_n=gemm)
        return cls(warmup=3, min_time=1.0, min_reps=5, max_reps=2000, gemm_n=gemm)

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
        inputs = make_inputs(case)
        ref = self._reference(case, providers, inputs, reference)
        base_name = providers[0].name if providers and providers[0].baseline else None
        base_time, base_err, case_rows = None, None, []
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
                t = measure(fn, case.device, warmup=self.settings.warmup, min_time=self.settings.min_time,
                            min_reps=self.settings.min_reps, max_reps=self.settings.max_reps)
                del fn
            except Skip as e:
                self.note(f"{prov.name} skipped for {case.op} {case.mode}: {e}")
                continue
            except Exception as e:  # a broken provider must not take the whole run down
                msg = (str(e).strip().splitlines() or [""])[0][:200]
                self.note(f"{prov.name} FAILED on {case.op} {case.mode} {case.shape_str} {dtype_str(case.dtype)}: "
                          f"{type(e).__name__}: {msg}")
                continue
            if prov.baseline:
                base_time = t.p50
            case_rows.append(self._row(case, prov, t, work, check, base_name))
        for r in case_rows:
            r["speedup"] = (base_time / r["p50_ms"] * 1e3) if base_time else None
        return case_rows

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
            "work": work.amount, "work_unit": work.unit,
            "throughput": rate / div, "throughput_unit": label,
            "ceiling": work.ceiling, "ceiling_value": (ceil.value / div) if ceil else None,
            "pct_of_ceiling": (100.0 * rate / ceil.value) if ceil else None,
            "speedup": None,
            "peak_mem_mb": (t.peak_mem_bytes / MiB) if t.peak_mem_bytes is not None else None,
            "check": check[0], "max_abs_err": check[1],
            "target": None, "meets_target": None,
        }


# ---------------------------------------------------------------------------------------------------------------
# Targets (PERF.md): annotate the rows a target applies to
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class Target:
    """``min_speedup`` vs the baseline and/or ``min_pct`` of the ceiling, for the best pyattn provider."""

    op: str
    mode: str
    device: str
    match: Callable[[dict], bool]        # on a row's params
    min_speedup: Optional[float] = None
    min_pct: Optional[float] = None
    dtypes: Optional[tuple] = None       # dtype names; None = any
    text: str = ""

    def applies(self, row: dict) -> bool:
        return (row["op"] == self.op and row["mode"] == self.mode and row["device"] == self.device
                and (self.dtypes is None or row["dtype"] in self.dtypes) and self.match(row["params"]))

    def describe(self) -> str:
        parts = []
        if self.min_speedup is not None:
            parts.append(f">= {self.min_speedup:g}x")
        if self.min_pct is not None:
            parts.append(f">= {self.min_pct:g}% of ceiling")
        return ", ".join(parts)


def apply_targets(rows: list[dict], targets: Sequence[Target]) -> list[str]:
    """Mark rows with their target and whether they meet it; return one summary line per (target, case)."""
    lines = []
    for tgt in targets:
        groups: dict[tuple, list[dict]] = {}
        for r in rows:
            if tgt.applies(r):
                groups.setdefault((r["shape"], r["dtype"]), []).append(r)
        for (shape, dtype), rs in sorted(groups.items()):
            ours = [r for r in rs if r["kind"].startswith("pyattn:")]
            for r in ours:
                ok = True
                if tgt.min_speedup is not None:
                    ok = ok and r["speedup"] is not None and r["speedup"] >= tgt.min_speedup
                if tgt.min_pct is not None:
                    ok = ok and r["pct_of_ceiling"] is not None and r["pct_of_ceiling"] >= tgt.min_pct
                ok = ok and r["check"] != "MISMATCH"
                r["target"], r["meets_target"] = tgt.describe(), ok
            if not ours:
                lines.append(f"  {tgt.text or tgt.op} {tgt.mode} {shape} {dtype}: no pyattn provider ran")
                continue
            best = max(ours, key=lambda r: r["speedup"] or 0.0)
            pct = f", {best['pct_of_ceiling']:.0f}% of {best['ceiling']}" if best["pct_of_ceiling"] is not None else ""
            sp = f"{best['speedup']:.2f}x" if best["speedup"] is not None else "n/a"
            lines.append(f"  {'MET ' if best['meets_target'] else 'MISS'}  {tgt.text or tgt.op} {tgt.mode} {shape} "
                         f"{dtype}: target {tgt.describe()}; best {best['provider']} {sp}{pct}")
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
    """An aligned text table, one line per row, blank line between (op, mode, dtype) groups."""
    head = ["op", "mode", "dtype", "shape", "provider", "p50 ms", "[p20 - p80]", "throughput", "% ceil",
            "speedup", "check", "target"]
    body: list[Optional[list[str]]] = []
    prev = None
    for r in sorted(rows, key=_sort_key):
        grp = (r["op"], r["mode"], r["dtype"])
        if prev is not None and grp != prev:
            body.append(None)
        prev = grp
        target = "" if r["target"] is None else (("MET " if r["meets_target"] else "MISS ") + r["target"])
        body.append([r["op"], r["mode"], r["dtype"], r["shape"], r["provider"], f"{r['p50_ms']:.3f}",
                     f"[{r['p20_ms']:.3f} - {r['p80_ms']:.3f}]", f"{r['throughput']:.1f} {r['throughput_unit']}",
                     _fmt(r["pct_of_ceiling"], ".0f") + ("%" if r["pct_of_ceiling"] is not None else ""),
                     "base" if r["is_baseline"] else (_fmt(r["speedup"], ".2f") + ("x" if r["speedup"] else "")),
                     r["check"], target])
    widths = [max([len(h)] + [len(b[i]) for b in body if b is not None]) for i, h in enumerate(head)]
    right = {5, 6, 7, 8, 9}

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
              "p20_ms", "p50_ms", "p80_ms", "reps", "work", "work_unit", "throughput", "throughput_unit", "ceiling",
              "ceiling_value", "pct_of_ceiling", "speedup", "peak_mem_mb", "check", "max_abs_err", "target",
              "meets_target", "params", "tags"]


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
    """One PNG per (op, mode, dtype): throughput vs the swept size, one line per provider, the ceiling dashed.
    Uses matplotlib's object API with the Agg canvas (no pyplot, no display). Returns the files written."""
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
        for prov in sorted({r["provider"] for r in rs}, key=lambda p: (not any(r["is_baseline"] for r in rs
                                                                                 if r["provider"] == p), p)):
            pr = sorted((r for r in rs if r["provider"] == prov), key=lambda r: (r["x"] or 0, r["shape"]))
            xs = [order.index(r["shape"]) if use_index else r["x"] for r in pr]
            base = any(r["is_baseline"] for r in pr)
            ax.plot(xs, [r["throughput"] for r in pr], marker="o", linestyle="--" if base else "-",
                    label=prov + (" (baseline)" if base else ""))
        ceil = next((r for r in rs if r["ceiling_value"] is not None), None)
        if ceil is not None:
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

