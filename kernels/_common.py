"""Triton helpers shared by the kernel files of pyattn.kernels."""
import triton
import triton.language as tl


@triton.jit
def round_to(x, dtype: tl.constexpr, SOFT_BF16: tl.constexpr):
    """fp32 -> dtype, rounding to nearest even. SOFT_BF16 (set by the launchers for the CPU interpreter,
    whose fp32 -> bf16 cast truncates) rounds to bf16 with integer ops; on GPUs the native cast is used."""
    if SOFT_BF16 and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = bits + 0x7FFF + ((bits >> 16) & 1)
        rounded = tl.where(x != x, bits | 0x400000, rounded)  # noqa: PLR0124  (NaN stays a quiet NaN)
        return (rounded >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)
