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
        # ---- GRU ---- cuBLAS GEMMs + one fused gate kernel per step (csrc/cuda/gru.cu); fp32 math
        "gru_cell": OpCaps(devices=frozenset({"cuda"}), dtypes=_HALF_AND_FLOAT,
                           notes=("two GEMMs (fp32 output) + one fused gate launch; backward: one fused "
                                  "launch + GEMMs",)),
        "gru": OpCaps(devices=frozenset({"cuda"}), dtypes=_HALF_AND_FLOAT,
                      notes=("input GEMM hoisted over all steps, then per step one GEMM + one fused "
                             "gate launch",)),
        # ---- end GRU ----
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

    # ---- GRU ---- (same signatures and returns as TorchBackend.gru_*; C++ ops in csrc/bindings/cuda/gru.cpp)
    def gru_cell_fwd(self, x, hx, w_ih, w_hh, b_ih, b_hh, needs_grad):
        return tuple(torch.ops.pyattn.gru_step_fwd(x, hx, w_ih, w_hh, b_ih, b_hh, needs_grad))

    def gru_cell_bwd(self, dh, x, hx, w_ih, w_hh, ws, has_b_ih, has_b_hh, need_weights):
        return tuple(torch.ops.pyattn.gru_step_bwd(dh, x, hx, w_ih, w_hh, ws, has_b_ih, has_b_hh, need_weights))

    def gru_layer_fwd(self, x, h0, w_ih, w_hh, b_ih, b_hh, reverse, needs_grad):
        return tuple(torch.ops.pyattn.gru_seq_fwd(x, h0, w_ih, w_hh, b_ih, b_hh, reverse, needs_grad))

    def gru_layer_bwd(self, dout, dh_last, x, h0, w_ih, w_hh, out, ws, has_b_ih, has_b_hh, reverse, need_weights):
        return tuple(torch.ops.pyattn.gru_seq_bwd(dout, dh_last, x, h0, w_ih, w_hh, out, ws, has_b_ih, has_b_hh,
                                                  reverse, need_weights))
    # ---- end GRU ----


register(CudaBackend())
