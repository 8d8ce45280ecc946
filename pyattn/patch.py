"""``pyattn.patch_torch()``: route ``torch.nn.functional.scaled_dot_product_attention`` through pyattn.

API: ``patch_torch()`` patches *when it is called* and returns a :class:`TorchPatch` handle; leaving a
``with`` block on the handle, or ``handle.undo()``, removes that patch::

    with pyattn.patch_torch(backend=None):   # patched inside the block, restored on exit (also on exceptions)
        model(x)

    handle = pyattn.patch_torch()             # patched from this call on ...
    model(x)
    handle.undo()                             # ... until undo() (idempotent)

A handle is single-use: entering ``with`` on a handle that was already undone raises ``RuntimeError``.

What is routed: every call that looks ``torch.nn.functional.scaled_dot_product_attention`` up while a patch is
active: ``F.scaled_dot_product_attention(...)`` in user code,
``torch.nn.functional.multi_head_attention_forward`` (so ``torch.nn.MultiheadAttention`` with
``need_weights=False`` outside its inference fast path) and Hugging Face transformers' ``"sdpa"`` attention.
Not routed: references taken before the patch (``from torch.nn.functional import
scaled_dot_product_attention`` at import time), TorchScript, and ``torch.nn.MultiheadAttention``'s inference
fast path (``torch._native_multi_head_attention``, one C++ op that never calls the Python function). Under
``torch.compile`` the patched function traces into pyattn's custom op without a graph break.

Fallback: a call pyattn does not take goes to the original torch function exactly as it was made (same
positional and keyword arguments), so it behaves as without the patch, torch's own errors included: extra
positional or unknown keyword arguments; query, key, value or attn_mask that are not plain strided
``torch.Tensor`` / ``Parameter`` (nested, sparse, DTensor, FakeTensor and other subclasses); non-floating
dtypes; an attn_mask whose dtype is not bool, float32 or query's dtype; ``dropout_p`` not a number in [0, 1)
(torch accepts 1.0, pyattn does not); ``is_causal`` / ``enable_gqa`` that are not bools; a non-finite
``scale``. Every other call runs ``pyattn.scaled_dot_product_attention(..., backend=backend)``, whose
validation raises torch's exception types with torch's texts. A forced ``backend=`` that refuses an input
raises ``pyattn.BackendNotSupported`` (as ``backend=`` on pyattn's own functions does); with ``backend=None``
pyattn picks a backend per call, ending at its ``torch`` backend. Dropout draws its seed from torch's default
generator, but the keep-mask differs from torch's.

Threads and reentrancy: the patch replaces a module attribute, so it is process-wide: while any handle is
active, calls from every thread are routed. Applying and undoing are serialised by a lock and handles may be
undone in any order: the most recently applied handle that is still active decides the backend, and torch's
original comes back when the last active handle is undone. For a per-thread (or per-task) backend, use
``pyattn.use_backend(...)`` (a context variable) inside one ``patch_torch()``. A call of
``F.scaled_dot_product_attention`` made from inside pyattn's own implementation (same thread) goes to torch's
original, so the patch never recurses into itself.
"""
from __future__ import annotations

import math
import numbers
import threading
import warnings
from typing import Optional

import torch
import torch.nn.functional as F

from .dispatch import get_backend

__all__ = ["TorchPatch", "patch_torch"]

_ATTR = "scaled_dot_product_attention"
_lock = threading.RLock()
_active: list["TorchPatch"] = []  # applied, not yet undone; the last one is installed
_original = None  # what torch.nn.functional held when the first active patch went on
_installed = None  # the wrapper this module last put on torch.nn.functional
_inside = threading.local()  # .depth > 0 while pyattn runs a routed call on this thread

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_PLAIN_TYPES = tuple(t for t in (torch.Tensor, torch.nn.Parameter, getattr(torch.nn, "Buffer", None)) if t)


def _plain(t) -> bool:
    return type(t) in _PLAIN_TYPES and t.layout == torch.strided


_POSITIONAL = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}
_NAMES = _POSITIONAL + ("scale", "enable_gqa")  # torch's schema: scale and enable_gqa are keyword-only


def _bind(args: tuple, kwargs: dict) -> Optional[tuple]:
    """torch's signature -> (query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa), or None
    for a call torch would reject or that has arguments pyattn does not know."""
    if len(args) > len(_POSITIONAL):
        return None
    vals = dict(_DEFAULTS)
    vals.update(zip(_POSITIONAL, args))
    for name, val in kwargs.items():
        if name not in _NAMES or name in _POSITIONAL[: len(args)]:
            return None
        vals[name] = val
    if not ("query" in vals and "key" in vals and "value" in vals):
        return None
    return tuple(vals[n] for n in _NAMES)


def _supported(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> bool:
    """Whether pyattn.scaled_dot_product_attention takes these arguments (else: torch's original runs)."""
    if not (_plain(query) and _plain(key) and _plain(value)):
        return False
    if query.dtype not in _FLOAT_DTYPES:
        return False
    if attn_mask is not None:
        if not _plain(attn_mask):
            return False
        if attn_mask.dtype not in (torch.bool, torch.float32, query.dtype):
            return False
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        return False
    if not (0.0 <= dropout_p < 1.0):
        return False
    if not isinstance(is_causal, bool) or not isinstance(enable_gqa, bool):
        return False
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
            return False
    return True


def _compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # torch < 2.3
        return False


class TorchPatch:
    """Handle returned by :func:`patch_torch`: the patch is active from creation until :meth:`undo` (or the
    end of a ``with`` block on the handle)."""

    def __init__(self, backend: Optional[str] = None):
        if backend is not None:
            if not isinstance(backend, str):
                raise TypeError(
                    f"patch_torch(): backend must be a backend name (str) or None, got {backend!r}"
                )
            get_backend(backend)  # ValueError naming the unknown backend and the known ones
        self.backend = backend
        self._done = False
        self._apply()

    # ---- state ---------------------------------------------------------------------------------------------

    @property
    def active(self) -> bool:
        """True from creation until undone."""
        return not self._done

    def _apply(self) -> None:
        global _original
        with _lock:
            current = getattr(F, _ATTR)
            if not _active:
                _original = current
            elif current is not _installed:
                warnings.warn(
                    "pyattn.patch_torch(): torch.nn.functional.scaled_dot_product_attention was replaced by "
                    "someone else while a pyattn patch was active; the new pyattn patch goes on top of "
                    "pyattn's and the other replacement will be lost when the pyattn patches are undone",
                    RuntimeWarning,
                    stacklevel=3,
                )
            self._wrapper = _make_wrapper(self, _original)
            _active.append(self)
            _install()

    def undo(self) -> None:
        """Remove this patch (a no-op when already undone). The previous active patch, or torch's original
        function when none is left, is installed again."""
        global _original
        with _lock:
            if self._done:
                return
            self._done = True
            _active.remove(self)
            if getattr(F, _ATTR) is not _installed:
                warnings.warn(
                    "pyattn.patch_torch(): torch.nn.functional.scaled_dot_product_attention was replaced by "
                    "someone else while a pyattn patch was active; undoing the pyattn patch overwrites that "
                    "replacement",
                    RuntimeWarning,
                    stacklevel=3,
                )
            _install()
            if not _active:
                _original = None

    # ---- context manager -----------------------------------------------------------------------------------

    def __enter__(self) -> "TorchPatch":
        if self._done:
            raise RuntimeError(
                "this pyattn.patch_torch() handle was already undone; call pyattn.patch_torch() again for a "
                "new patch"
            )
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.undo()
        return False

    def __repr__(self) -> str:
        state = "active" if self.active else "undone"
        return f"<pyattn.TorchPatch backend={self.backend!r} {state}>"


def _install() -> None:
    """Put the top active patch's wrapper (or the original) on torch.nn.functional; the caller holds _lock."""
    global _installed
    fn = _active[-1]._wrapper if _active else _original
    setattr(F, _ATTR, fn)
    _installed = fn if _active else None


def _make_wrapper(handle: TorchPatch, original):
    from .ops.attention import scaled_dot_product_attention as pyattn_sdpa

    backend = handle.backend

    # Called exactly as torch's function; anything unusual is handed over unchanged (same arguments, same
    # positions), so torch then accepts it (a newer torch) or raises its own error with its own text.
    def scaled_dot_product_attention(*args, **kwargs):
        skip = handle._done or (not _compiling() and getattr(_inside, "depth", 0) > 0)
        a = None if skip else _bind(args, kwargs)
        if a is None or not _supported(*a):
            return original(*args, **kwargs)
        if _compiling():
            return pyattn_sdpa(*a, backend=backend)
        _inside.depth = getattr(_inside, "depth", 0) + 1
        try:
            return pyattn_sdpa(*a, backend=backend)
        finally:
            _inside.depth -= 1

    scaled_dot_product_attention.__doc__ = (
        "torch.nn.functional.scaled_dot_product_attention routed through "
        f"pyattn.scaled_dot_product_attention (backend={backend!r}) by pyattn.patch_torch(); unsupported "
        "arguments fall back to torch's original.\n\n"
        + (getattr(original, "__doc__", None) or "")
    )
    scaled_dot_product_attention.__wrapped__ = original
    scaled_dot_product_attention._pyattn_patch = handle
    return scaled_dot_product_attention


def patch_torch(backend: Optional[str] = None) -> TorchPatch:
    """Route ``torch.nn.functional.scaled_dot_product_attention`` through
    ``pyattn.scaled_dot_product_attention`` (with ``backend=backend``; ``None``: pyattn's automatic choice)
    from now until the returned handle is undone.

    Use it as a context manager (``with pyattn.patch_torch(): ...`` restores the original on exit, also on
    exceptions) or keep the handle and call ``handle.undo()``. Nested and overlapping patches work; see the
    module docs of ``pyattn.patch`` (and docs/integrations.md) for what is routed, the fallbacks to torch's
    original, and thread behaviour.
    """
    return TorchPatch(backend)
