"""pyattn: fused attention, LayerNorm/RMSNorm and GRU kernels for PyTorch.

Importing never fails because pyattn._C, Triton or CUDA is missing: ``pyattn.backends()`` says why a backend
is unavailable, and every op falls back to the pure-PyTorch ``torch`` backend.
"""
from __future__ import annotations

__version__ = "0.1.0"

from . import backends as _backends  # noqa: F401  (registers torch, cpp, triton, cuda)
from .dispatch import BackendNotSupported, backends, use_backend
from .functional import layer_norm, rms_norm
from .functional import flash_attn_func, gru_cell, scaled_dot_product_attention
from . import nn  # noqa: E402
from .patch import patch_torch

_EXPLAIN = {}


def _explainers():
    if not _EXPLAIN:
        from .ops import layer_norm as _ln

        _EXPLAIN["layer_norm"] = lambda *a, **k: _ln.make_inputs(*a, rms=False, **k)
        _EXPLAIN["rms_norm"] = lambda *a, **k: _ln.make_inputs(*a, rms=True, **k)
        from .ops import attention as _attn
        from .ops import gru as _gru

        _EXPLAIN["attention"] = _attn.make_inputs  # scaled_dot_product_attention's arguments
        _EXPLAIN["gru_cell"] = _gru.make_cell_inputs
    return _EXPLAIN


def explain(op: str, *args, backend=None, **kwargs) -> str:
    """Which backend would run ``op`` on these arguments (same as the functional op's), and why each other refuses."""
    from .dispatch import explain_inputs

    makers = _explainers()
    if op not in makers:
        raise ValueError(f"unknown op {op!r}; known: {', '.join(sorted(makers))}")
    return explain_inputs(makers[op](*args, **kwargs), backend)


__all__ = ["BackendNotSupported", "backends", "explain", "layer_norm", "nn", "rms_norm", "use_backend",
           "__version__"]
__all__ += ["flash_attn_func", "gru_cell", "scaled_dot_product_attention"]
__all__ += ["patch_torch"]
