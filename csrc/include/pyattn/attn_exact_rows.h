// Which rows the attention backward gives exact softmax statistics, shared by the C++ CPU kernels
// (csrc/cpu/attention.cpp) and the CUDA kernels (csrc/cuda/attention.cu); kernels/attention.py's EXACT_ROW_LSE2
// is the same limit.
//
// The backward recomputes P = exp2(t - lse2) from the forward's lse2 = m + log2(l) (log2 units). Where |lse2| is
// large, fp32 cannot hold log2(l) next to m: an additive mask of -1e9 or finfo.min on every key of a row makes its
// logits equal after rounding (P uniform, 1 / l), and exp2(t - lse2) would give 1. For rows past the limit the
// backward recomputes m and l2 = log2(l) from the keys and uses P = exp2((t - m) - l2). At the limit (2^14) fp32's
// spacing is 2^-9, so rows below it lose at most 2^-10 of log2(l); ordinary logits stay far below it.
// Torch-free; usable from host C++ and from CUDA device code.
#pragma once

#include "pyattn/host_device.h"

namespace pyattn {

constexpr float kExactRowLse2 = 16384.0f;

// True for a row whose finite lse2 (log2 units) is past the limit (+inf: a row that saw no key, P = 0; NaN: no).
PYATTN_HOST_DEVICE bool needs_exact_row_stats(float lse2) {
  return lse2 < -kExactRowLse2 || (lse2 > kExactRowLse2 && lse2 <= 3.402823466e38f);
}

}  // namespace pyattn
