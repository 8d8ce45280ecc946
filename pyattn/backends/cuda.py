"""The ``cuda`` backend: CUDA C++ kernels in pyattn._C (csrc/cuda), built when torch has CUDA and nvcc exists."""
from __future__ import annotations

import torch

from .._ext import build_info, load_C
from ..dispatch import register
from ..dispatch.backend import OpCaps
from ._native import NativeBackend, missing_kernel_reason

_HALF_AND_FLOAT = frozenset({torch.float32, torch.bfloat16, torch.float16})


# ---- attention ----
_ATTN_MAX_HEAD_DIM = 256  # = kAttnMaxHeadDim (pyattn/cuda_kernels.h)
# Dynamic shared memory per block (bytes) of the kernels for each padded head dim max(D, Dv) -> 64 / 128 / 256:
# (forward, largest backward kernel) = attention_smem_bytes() of csrc/cuda/attention.cu (Tiles<HD>).
_ATTN_SMEM = {64: (36864, 57344), 128: (69632, 104448), 256: (101376, 136192)}


def _attention_reasons(inputs) -> list[str]:
    """The refusals of csrc/bindings/cuda/attention.cpp, so that an unforced call falls back instead of raising
    (float32 is refused by the caps' dtype set)."""
    d, dv = inputs.head_dim, inputs.v_head_dim
    if max(d, dv) > _ATTN_MAX_HEAD_DIM:
        return [f"head dim {max(d, dv)} > {_ATTN_MAX_HEAD_DIM} (the CUDA attention kernels' largest tile; q/k and v "
                f"head dims must each be <= {_ATTN_MAX_HEAD_DIM})"]
    reasons = []
    props = torch.cuda.get_device_properties(inputs.device)
    if (props.major, props.minor) < (8, 0):
        reasons.append(f"compute capability {props.major}.{props.minor} < 8.0 (fp16/bf16 mma.sync m16n8k16 and "
                       "cp.async need sm_80)")
    bucket = 64 if max(d, dv) <= 64 else 128 if max(d, dv) <= 128 else 256
    need = _ATTN_SMEM[bucket][1 if inputs.needs_grad else 0]
    limit = getattr(props, "shared_memory_per_block_optin", None)
    if limit is not None and need > limit:
        reasons.append(f"head dims ({d}, {dv}) need {need} bytes of shared memory per block "
                       f"({'backward' if inputs.needs_grad else 'forward'}); this device allows {limit}")
    return reasons


def cuda_attention_is_fastest(inputs) -> bool:
    """Attention calls where the cuda backend was measured faster than Triton's kernels on Hopper GPUs (the registry
    then takes the cuda backend first: CudaBackend.preferred_for); bf16, ms at L = 4096 non-causal / causal:
    - the warp-specialized forward (csrc/cuda/attention_sm90.cu; at least one 128-row query tile, an sm_90a build) at
      head dim 64 and 128: H100 1.25 / 0.70 vs Triton's 1.41 / 0.78 (HD 64), 0.92 / 0.52 vs 1.37 / 0.77 (HD 128)
      (benchmarks/results/nvidia-h100-80gb-hbm3/gpu-attn-variants.log; the H200's run H agreed);
    - the Hopper backward (csrc/cuda/attention_sm90_bwd.cu, dQ added in the dK / dV kernel) at head dim 64 and 128:
      H100 4.19 / 2.47 vs 4.77 / 2.76 (HD 64), 3.07 / 1.76 vs 5.86 / 3.13 (HD 128) (gpu-attn-bwd-variants.log; with
      the unfused backward, the H200's default until then, Triton was the faster at HD 64);
    - decoding steps (AttentionInputs.decoding: the split-KV kernel, csrc/cuda/attention_decode.cu) at head dim 128
      without autograd: 0.071 vs 0.172 ms (H200, B = 8, 32 / 8 heads, 4096 keys; head dim 64 not measured).
    All of them fp16 / bf16, D == Dv, no mask, no dropout, a positive scale, compute capability 9.0 (rows not 16-byte
    aligned, which the signature cannot see, still run correctly on the cuda backend's other kernels)."""
    d = inputs.head_dim
    if (inputs.dtype not in (torch.float16, torch.bfloat16) or inputs.v_head_dim != d or inputs.mask is not None
            or inputs.dropout_p != 0 or not inputs.scale > 0
            or torch.cuda.get_device_capability(inputs.device) != (9, 0)):
        return False
    if inputs.decoding:
        return d == 128 and not inputs.needs_grad
    return inputs.q_len >= 128 and d in (64, 128) and bool(build_info().get("sm90a_attention"))


def dropout_keep_mask(seed: int, offset: int, shape, p: float, device=None) -> torch.Tensor:
    """The keep-mask (B, Hq, Lq, Lk) bool (True = kept) the CUDA attention kernels apply for (seed, offset, p): the
    cpp kernels' hash (pyattn/attn_dropout.h, shared by both), computed on the CPU and moved to `device`."""
    b, h, lq, lk = (int(x) for x in shape)
    keep = torch.ops.pyattn.attn_dropout_keep(seed, offset, b, h, lq, lk, p)
    return keep if device is None else keep.to(device)
# ---- end attention ----


# ---- norm ----
_NORM_NOTES = (("LayerNorm/RMSNorm (+ fused residual) kernels of csrc/cuda/layer_norm.cu: one row per warp or "
                "block, 16-byte loads, corrected two-pass variance in fp32, any hidden size, deterministic "
                "dweight/dbias"),
               ("after triton in the priority lists: on an H100 and an H200 it passed tests/test_gpu.py and "
                "scripts/gpu_sanitize.sh; on the H100 it was faster than Triton's forward and backward in every "
                "measured case, so it is taken first on compute capability 9.0 for rows of up to 8192 "
                "elements (cuda_norm_is_fastest; "
                "docs/design.md, CUDA backend status)"))


def cuda_norm_is_fastest(inputs) -> bool:
    """Norm calls where the cuda backend was measured faster than Triton's kernels on a Hopper GPU: all of them
    (LayerNorm, RMSNorm and Add & Norm, fp32 and bf16, M = 4096, N = 1024 and 4096, forward and backward; H100, the
    kernels as restructured on 2026-11-27, benchmarks/results/nvidia-h100-80gb-hbm3/gpu-layernorm.csv): forward
    1.08x-9.0x Triton's (bf16 LayerNorm at N = 4096: 0.039 vs 0.042 ms; fp32 0.051 vs 0.124), backward 2.2x-3.8x
    (bf16 LayerNorm at N = 4096: 0.143 vs 0.325 ms). (The H200's run 1, before the restructuring, had the cuda
    forward slower in bf16.) Rows of up to 8192 elements only, the register kernels those cases ran (longer rows take
    the looped kernels, never timed against Triton's), and compute capability 9.0 only, the one measured."""
    return inputs.hidden <= 8192 and torch.cuda.get_device_capability(inputs.device) == (9, 0)


def _device_code_for(capability, archs: str) -> bool:
    """Whether a build for TORCH_CUDA_ARCH_LIST `archs` (e.g. "8.0;9.0a") has code a device of `capability` can run:
    a cubin sm_XY runs on X.y with y >= Y, an arch-specific sm_XYa only on X.Y, and +PTX on anything newer."""
    major, minor = capability
    for arch in archs.replace(" ", ";").split(";"):
        arch = arch.strip()
        if not arch:
            continue
        ptx = arch.endswith("+PTX")
        name = arch[:-4] if ptx else arch
        specific = name.endswith("a")
        try:
            a_major, a_minor = (int(v) for v in name.rstrip("a").split("."))
        except ValueError:
            continue
        if ptx and (major, minor) >= (a_major, a_minor):
            return True
        if major == a_major and (minor == a_minor if specific else minor >= a_minor):
            return True
    return False


def _norm_reasons(inputs) -> list[str]:
    archs = build_info().get("cuda_archs") or "8.0;9.0a"
    capability = torch.cuda.get_device_capability(inputs.device)
    if not _device_code_for(capability, archs):
        return [f"pyattn._C has no device code for compute capability {capability[0]}.{capability[1]} "
                f"(built for TORCH_CUDA_ARCH_LIST={archs})"]
    return []
# ---- end norm ----


class CudaBackend(NativeBackend):
    name = "cuda"
    description = "CUDA C++ kernels (pyattn._C built with csrc/cuda)"
    caps = {
        # ---- norm ---- any hidden size (rows up to 8192 held in registers, longer rows re-read per pass); fp32
        # statistics; weight/bias float32 or the input's dtype; deterministic dweight/dbias (no atomics)
        "layer_norm": OpCaps(devices=frozenset({"cuda"}), dtypes=_HALF_AND_FLOAT, notes=_NORM_NOTES),
        "rms_norm": OpCaps(devices=frozenset({"cuda"}), dtypes=_HALF_AND_FLOAT, notes=_NORM_NOTES),
        # ---- end norm ----
        # ---- attention ---- fp16/bf16 only: float32 is refused by this dtype set (the kernels are tensor-core mma)
        "attention": OpCaps(devices=frozenset({"cuda"}), dtypes=frozenset({torch.bfloat16, torch.float16}),
                            notes=(f"FlashAttention-2 on tensor cores (csrc/cuda/attention.cu): head dims up to "
                                   f"{_ATTN_MAX_HEAD_DIM}, GQA/MQA, bool/additive masks, both causal alignments, "
                                   "dropout (the cpp backend's keep hash), deterministic backward; on Hopper "
                                   "(sm_90a build) the unmasked fp16/bf16 forward and backward at head dim 64/128 "
                                   "run on wgmma with TMA loads and warp specialization (csrc/cuda/attention_sm90.cu, "
                                   "attention_sm90_bwd.cu; the backward adds dQ with bulk reductions, whose bits vary "
                                   "from run to run, except under torch.use_deterministic_algorithms), decoding "
                                   "steps on a split-KV kernel (attention_decode.cu); taken first where measured "
                                   "faster than Triton (cuda_attention_is_fastest)",)),
        # ---- end attention ----
        # ---- GRU ---- the input GEMM (cuBLAS) + the persistent recurrent kernels (csrc/cuda/gru.cu); fp32 math
        "gru_cell": OpCaps(devices=frozenset({"cuda"}), dtypes=_HALF_AND_FLOAT,
                           notes=("the input GEMM (fp32 output) + one fused launch for h W_hh^T and the gates (a GEMM + a "
                                  "gate launch past 2^17 multiply-adds a block); "
                                  "backward: one fused launch + GEMMs; first in the CUDA priority list (faster "
                                  "than Triton's cell on the H200: docs/design.md, CUDA backend status)",)),
        "gru": OpCaps(devices=frozenset({"cuda"}), dtypes=_HALF_AND_FLOAT,
                      notes=("input GEMM hoisted over all steps, then each layer direction one cooperative launch "
                             "(W_hh in shared memory, a block per SM, a grid barrier per step), forward and "
                             "backward; per step one GEMM + one fused gate launch where a block would do over 2^17 "
                             "multiply-adds a step; first in the CUDA priority list (faster than Triton's GRU on "
                             "the H200)",)),
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

    def preferred_for(self, inputs) -> bool:
        if inputs.device.type != "cuda":
            return False
        if inputs.op == "attention":
            return cuda_attention_is_fastest(inputs)
        return inputs.op in ("layer_norm", "rms_norm") and cuda_norm_is_fastest(inputs)

    def extra_reasons(self, inputs) -> list[str]:
        reasons = missing_kernel_reason(inputs.op, "CUDA")
        if inputs.op in ("layer_norm", "rms_norm") and not reasons:  # norm
            reasons.extend(_norm_reasons(inputs))
        if inputs.op == "attention" and not reasons:  # attention
            reasons.extend(_attention_reasons(inputs))
        if inputs.op in ("gru_cell", "gru") and not reasons:  # GRU
            major, minor = torch.cuda.get_device_capability(inputs.device)
            if (major, minor) < (8, 0):
                reasons.append(f"compute capability {major}.{minor} < 8.0 (csrc/cuda/gru.cu is built for sm_80 and "
                               "sm_90a only)")
        return reasons


register(CudaBackend())
