"""Backend registry and selection.

Order of precedence: ``backend=`` argument > ``pyattn.use_backend(...)`` context > ``PYATTN_BACKEND`` env >
the priority list for (op, device). A forced backend that refuses raises ``BackendNotSupported`` with its
reasons; an unforced call falls through the list, ending at ``torch``, which accepts everything.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Iterator, Optional

from .backend import Backend, OpInputs

# Priority lists are data. Triton on CPU only runs in the interpreter (tests), so it is never chosen there unforced.
# CUDA devices: "cuda" comes AFTER "triton" for attention and the norms on purpose. On the GPU runs so far (H200s,
# 2026-11-26/27, benchmarks/results/nvidia-h200/NOTES.md) both passed tests/test_gpu.py and compute-sanitizer, but the
# CUDA C++ kernels were slower than Triton's for attention training at head dim 64 and most norm shapes (faster in
# fp32, slower in bf16); so an unforced call on a GPU takes Triton, except where a backend's preferred_for says it was
# measured the fastest (_priority): on Hopper, the CUDA attention forward at head dims 64 and 128, training at head
# dim 128 and decoding steps at head dim 128 take cuda (pyattn/backends/cuda.py, cuda_attention_is_fastest), and so
# does the norms' backward (its own selection; faster than Triton's in every measured case: cuda_norm_is_fastest). GRU
# layers and cells take cuda first: its persistent layer kernels (one launch per direction) beat Triton's on every
# benchmarked shape (fourth H200 session: 0.545 vs 11.2 ms forward at B = 1, T = 200, H = 128; 3.57 vs 24.5 ms
# forward + backward at B = 32, T = 100, H = 256), and so did its cell (fifth session: 0.013 vs 0.060 ms forward at
# B = 1, I = H = 256; 0.028 vs 0.072 at B = 32; forward + backward 0.66 vs 0.99 and 0.85 vs 1.07 ms).
# `backend="cuda"` (or use_backend / PYATTN_BACKEND) still forces the CUDA kernels. An op's "cuda" moves before
# "triton" once, on a GPU, it passes its tests/test_gpu.py suites and scripts/gpu_sanitize.sh (memcheck + racecheck)
# on backend "cuda" and its benchmark beats Triton's (docs/design.md, "CUDA backend status").
PRIORITY: dict[tuple[str, str], list[str]] = {
    ("attention", "cuda"): ["triton", "cuda", "torch"],
    ("attention", "cpu"): ["cpp", "torch"],
    ("layer_norm", "cuda"): ["triton", "cuda", "torch"],
    ("layer_norm", "cpu"): ["cpp", "torch"],
    ("rms_norm", "cuda"): ["triton", "cuda", "torch"],
    ("rms_norm", "cpu"): ["cpp", "torch"],
    ("gru_cell", "cuda"): ["cuda", "triton", "torch"],
    ("gru_cell", "cpu"): ["cpp", "torch"],
    ("gru", "cuda"): ["cuda", "triton", "torch"],
    ("gru", "cpu"): ["cpp", "torch"],
}
DEFAULT_PRIORITY = ["torch"]

_BACKENDS: dict[str, Backend] = {}
_forced: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("pyattn_backend", default=None)
_cache: dict[tuple, Backend] = {}


class BackendNotSupported(RuntimeError):
    """A forced backend cannot run this input; the message lists its reasons."""


def register(backend: Backend) -> Backend:
    _BACKENDS[backend.name] = backend
    _cache.clear()
    return backend


def get_backend(name: str) -> Backend:
    try:
        return _BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown pyattn backend {name!r}; known: {', '.join(sorted(_BACKENDS))}") from None


def backends() -> list[tuple[str, bool, str]]:
    """Every registered backend as (name, available, reason when not)."""
    return [(b.name, *b.availability()) for b in _BACKENDS.values()]


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """Force a backend for every pyattn op called inside the block (``None`` restores automatic selection)."""
    if name is not None:
        get_backend(name)
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


def backend_request(backend: Optional[str]) -> Optional[str]:
    """What an op's forward saves for its backward to request: its backend= argument, else the backend a
    use_backend() block forces around the forward. The backward usually runs after the block has exited (e.g.
    ``with use_backend("triton"): loss = model(x)`` then ``loss.backward()``), and forcing a backend is meant for the
    whole computation, not half of it. (PYATTN_BACKEND is read again by the backward, so it needs no pinning.)"""
    return backend if backend is not None else _forced.get()


def _env_backend() -> Optional[str]:
    """PYATTN_BACKEND as it is now (read on every call, so setting it at run time works). os.environ.get raises and
    catches a KeyError inside when the variable is unset: inside a training step the backend request took 4.0 us
    (median) with it, 1.4 us with the environ's own dict (~50 ns alone). Falls back to os.environ.get on Pythons
    whose os.environ lacks that dict."""
    data = getattr(os.environ, "_data", None)
    if data is None or _ENV_KEY is None:
        return os.environ.get("PYATTN_BACKEND") or None
    v = data.get(_ENV_KEY)
    return os.environ.decodevalue(v) if v else None


_ENV_KEY = os.environ.encodekey("PYATTN_BACKEND") if hasattr(os.environ, "encodekey") else None


def _requested(explicit: Optional[str], context: bool = True) -> tuple[Optional[str], str]:
    if explicit is not None:
        return explicit, "backend= argument"
    ctx = _forced.get() if context else None
    if ctx is not None:
        return ctx, "pyattn.use_backend()"
    env = _env_backend()
    if env is not None:
        return env, "PYATTN_BACKEND"
    return None, ""


def _priority(inputs: OpInputs) -> list[str]:
    """The op's list for the device, with a later backend moved to the front where it says it is the fastest for
    these inputs (Backend.preferred_for; e.g. the CUDA attention forward on Hopper without autograd)."""
    order = PRIORITY.get((inputs.op, inputs.device.type), DEFAULT_PRIORITY)
    for name in order[1:]:
        b = _BACKENDS.get(name)
        if b is not None and b.availability()[0] and b.preferred_for(inputs):
            return [name] + [n for n in order if n != name]
    return order


def select(inputs: OpInputs, backend: Optional[str] = None) -> Backend:
    """The backend that runs ``inputs`` (cached per input signature and request)."""
    if inputs.nothing_to_compute():
        return get_backend("torch")
    name, source = _requested(backend)
    key = (inputs.op, name, inputs.signature())
    hit = _cache.get(key)
    if hit is not None:
        return hit
    if name is not None:
        chosen = get_backend(name)
        reasons = chosen.not_supported_reasons(inputs)
        if reasons:
            raise BackendNotSupported(
                f"pyattn: backend {name!r} (forced by {source}) cannot run {inputs.op}: " + "; ".join(reasons))
    else:
        chosen = None
        for cand in _priority(inputs):
            b = _BACKENDS.get(cand)
            if b is not None and not b.not_supported_reasons(inputs):
                chosen = b
                break
        if chosen is None:
            chosen = get_backend("torch")
    _cache[key] = chosen
    return chosen


def explain_inputs(inputs: OpInputs, backend: Optional[str] = None) -> str:
    name, source = _requested(backend)
    lines = [f"op {inputs.op} on {inputs.device.type}: " + ", ".join(f"{k}={v}" for k, v in inputs.describe().items())]
    if inputs.nothing_to_compute():
        lines.append("  nothing to compute (an empty input): torch's ops make the outputs, no kernel runs")
        return "\n".join(lines)
    if name is not None:
        reasons = get_backend(name).not_supported_reasons(inputs)
        verdict = "REFUSES: " + "; ".join(reasons) if reasons else "accepts"
        lines.append(f"  forced {name!r} by {source}: {verdict}")
        return "\n".join(lines)
    order = _priority(inputs)
    chosen = None
    for cand in order + [b for b in _BACKENDS if b not in order]:
        b = _BACKENDS.get(cand)
        if b is None:
            continue
        reasons = b.not_supported_reasons(inputs)
        tag = "" if cand in order else " (not in priority list)"
        if reasons:
            lines.append(f"  {cand}{tag}: refuses: " + "; ".join(reasons))
        elif chosen is None and cand in order:
            chosen = cand
            lines.append(f"  {cand}: accepts -> selected")
        else:
            lines.append(f"  {cand}{tag}: accepts")
    lines.insert(1, f"  priority: {' > '.join(order)}; selected: {chosen or 'torch'}")
    return "\n".join(lines)
