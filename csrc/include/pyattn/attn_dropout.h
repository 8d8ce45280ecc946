// The attention dropout keep decision, shared by the C++ CPU kernels (csrc/cpu/attention.cpp) and the CUDA kernels
// (csrc/cuda/attention.cu) so that both backends drop exactly the same elements for a given (seed, offset):
//
//   keep(b, h, i, j) = mix32(row_key(seed, offset, b, h, i) ^ col(j)) >= threshold(p)      P(keep) = 1 - p
//   row_key = low 32 bits of splitmix64(seed ^ splitmix64(offset + (b * Hq + h) * Lq + i))
//   col(j)  = uint32(j) * 0x9E3779B9 + 0x7F4A7C15
//
// h is the query head, Lq the query length. Plain integer arithmetic: the host and device results are identical.
// Torch-free; usable from host C++ and from CUDA device code.
#pragma once

#include <cstdint>

#include "pyattn/host_device.h"

namespace pyattn {
namespace attn_dropout {

PYATTN_HOST_DEVICE uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

PYATTN_HOST_DEVICE uint32_t mix32(uint32_t x) {  // lowbias32 finalizer
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

PYATTN_HOST_DEVICE uint32_t dropout_row_key(uint64_t seed, uint64_t offset, int64_t Hq, int64_t Lq, int64_t b,
                                            int64_t h, int64_t i) {
  return uint32_t(splitmix64(seed ^ splitmix64(offset + uint64_t((b * Hq + h) * Lq + i))));
}

PYATTN_HOST_DEVICE uint32_t dropout_col(int64_t j) { return uint32_t(j) * 0x9E3779B9u + 0x7F4A7C15u; }

// keep iff hash >= threshold: P(keep) = 1 - p (p in [0, 1)).
PYATTN_HOST_DEVICE uint32_t dropout_threshold(float p) {
  const double t = double(p) * 4294967296.0;
  return uint32_t(t < 4294967295.0 ? t : 4294967295.0);
}

PYATTN_HOST_DEVICE bool dropout_keep(uint32_t row_key, int64_t j, uint32_t threshold) {
  return mix32(row_key ^ dropout_col(j)) >= threshold;
}

}  // namespace attn_dropout
}  // namespace pyattn
