"""The ``cuda`` backend: CUDA C++ kernels in pyattn._C (csrc/cuda), built when torch has CUDA and nvcc exists."""
from __future__ import annotations

import torch

from .._ext import build_info, load_C
from ..dispatch import Backend, register
from ..dispatch.backend import OpCaps
from ._native import missing_kernel_reason

_HALF_AND_FLOAT = frozenset({torch.float32, torch.bfloat16, torch.float16})


class CudaBackend(Backend):
    name = "cuda"
    description = "CUDA C++ kernels (pyattn._C built with csrc/cuda)"
    caps = {
        "layer_norm": OpCaps(devices=frozenset({"cuda"}), dtypes=_HALF_AND_FLOAT),
        "rms_norm": OpCaps(devices=frozenset({"cuda"}), dtypes=_HALF_AND_FLOAT),
    }

    def availability(self):
        mod, why = load_C()
        if mod is None:
            return False, why
        if not build_info().get("with_cuda"):
            return False, "pyattn._C was built without CUDA sources (torch without CUDA, no nvcc, or PYATTN_CUDA=0)"
        if not torch.cuda.is_available():
            return False, "no CUDA device is available"
        return True, ""

    def extra_reasons(self, inputs) -> list[str]:
        return missing_kernel_reason(inputs.op, "CUDA")


register(CudaBackend())
