// Torch-free CUDA kernel launchers (csrc/cuda/*.cu). Called by the bindings in csrc/bindings/cuda/ with a filled
// params struct (pyattn/params.h) and the current stream. Includable from plain C++ (the bindings): only the CUDA
// runtime API types appear here. One section per op; each section is owned by the file that implements it.
//
// Launchers only enqueue work on `stream` (no synchronisation, no allocation): they return the first error of
// cudaGetLastError() after their launches (cudaSuccess otherwise); the bindings check it.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "pyattn/params.h"

namespace pyattn {
namespace cuda {

// ---- LayerNorm / RMSNorm (csrc/cuda/layer_norm.cu) ----
// Forward: writes p.y, p.residual_out (if non-null), p.mean (if non-null and !rms), p.rstd (if non-null).
// Every pointer is device memory; p.num_threads is ignored. M == 0 launches nothing.
cudaError_t layer_norm_fwd(const NormFwdParams& p, cudaStream_t stream);
// Backward: writes p.dx and, if non-null, p.dweight / p.dbias. dweight/dbias are bitwise reproducible: per-chunk
// fp32 partial sums in p.workspace over a partition of the rows that depends only on (M, N, dtype), then a
// fixed-order sum over the chunks (no atomics). p.workspace must hold layer_norm_bwd_workspace_floats(p) floats
// (it may be nullptr when that is 0). M == 0 with dweight/dbias wanted writes zeros.
cudaError_t layer_norm_bwd(const NormBwdParams& p, cudaStream_t stream);
int64_t layer_norm_bwd_workspace_floats(const NormBwdParams& p);
// ---- end LayerNorm ----

// ---- GRU (csrc/cuda/gru.cu) ----
// One fused launch per step (the GEMMs are the bindings' cuBLAS calls). Forward: writes p.out (h') and, if non-null,
// p.ws ([r | z | n | hn]). Backward: writes p.dgi, p.dgh and p.dh_direct (= d z, d = dh (+ dout)).
// B == 0 or H == 0 launches nothing.
cudaError_t gru_gates_fwd(const GRUGatesFwdParams& p, cudaStream_t stream);
cudaError_t gru_gates_bwd(const GRUGatesBwdParams& p, cudaStream_t stream);
// ---- end GRU ----

}  // namespace cuda
}  // namespace pyattn
