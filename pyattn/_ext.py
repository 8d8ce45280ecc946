"""Optional native pieces, loaded lazily and never fatally: ``pyattn._C`` and Triton.

Each loader returns (module or None, reason). The reason is what ``pyattn info`` and backend refusals show.
"""
from __future__ import annotations

import functools
import os


@functools.lru_cache(maxsize=None)
def load_C():
    if os.environ.get("PYATTN_DISABLE_EXT") == "1":
        return None, "disabled by PYATTN_DISABLE_EXT=1"
    try:
        import torch  # noqa: F401  (loads libtorch first)

        from pyattn import _C  # noqa: F401
    except Exception as e:  # ImportError, OSError (undefined symbol, ABI mismatch), ...
        return None, f"pyattn._C failed to load: {type(e).__name__}: {e}"
    return _C, ""


@functools.lru_cache(maxsize=None)
def build_info() -> dict:
    try:
        from pyattn._build_info import BUILD_INFO
    except ImportError:
        return {}
    return dict(BUILD_INFO)


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def load_triton():
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:
        return None, f"triton is not importable: {type(e).__name__}: {e}"
    return triton, ""


@functools.lru_cache(maxsize=None)
def load_kernels(name: str):
    """Import ``pyattn.kernels.<name>`` (needs Triton)."""
    triton, why = load_triton()
    if triton is None:
        return None, why
    try:
        import importlib

        return importlib.import_module(f"pyattn.kernels.{name}"), ""
    except Exception as e:
        return None, f"pyattn.kernels.{name} failed to import: {type(e).__name__}: {e}"
