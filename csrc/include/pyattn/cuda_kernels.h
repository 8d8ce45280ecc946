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
// The persistent forward (GRURecFwdParams: every step of one layer direction in one cooperative launch). The plan
// is its grid, a block per SM: blocks == 0 when it does not apply (a block would do over 2^17 multiply-adds a step,
// W_hh's rows do not fit the shared memory of the blocks the device can hold at once, or PYATTN_CUDA_GRU_BLOCKS=0);
// then the binding runs a GEMM + gru_gates_fwd per step.
// PYATTN_CUDA_GRU_BLOCKS=N asks for N blocks (at least as many as the shared memory needs; for measurements).
// needs_sync: p.sync must point at a zeroed 8-byte counter (a grid of more than one block, and for the forward more
// than one step).
struct GRURecPlan {
  int blocks = 0;      // grid size; block c takes hidden units [c units, (c + 1) units)
  int units = 0;       // hidden units per block
  int batch_rows = 0;  // batch rows of h staged in shared memory at once (a multiple of 4)
  size_t smem = 0;     // dynamic shared memory per block, bytes
  bool needs_sync = false;
  bool one_block = false;  // forward: the one-block kernel (blocks 1, everything in shared memory), not the grid's
  int cluster = 0;  // > 1: the one-block kernel on a thread-block cluster of this many blocks (sm_90+; opt-in,
                    // PYATTN_CUDA_GRU_CLUSTER=1), each with its share of the units
};
// allow_cluster false: never the cluster kernel (the binding's retry when a cluster launch was refused).
GRURecPlan gru_rec_fwd_plan(const GRURecFwdParams& p, bool allow_cluster = true);
cudaError_t gru_rec_fwd(const GRURecFwdParams& p, const GRURecPlan& plan, cudaStream_t stream);
// The persistent backward (GRURecBwdParams), planned the same way (PYATTN_CUDA_GRU_BLOCKS too): writes p.dgi, p.dgh
// and p.dh (dL/dh0); blocks == 0: the binding runs gru_gates_bwd + a GEMM per step.
GRURecPlan gru_rec_bwd_plan(const GRURecBwdParams& p, bool allow_cluster = true);
cudaError_t gru_rec_bwd(const GRURecBwdParams& p, const GRURecPlan& plan, cudaStream_t stream);
// The one-launch cell step (GRUCellFwdParams): writes p.out and, if non-null, p.ws. The plan: blocks == 0 when it
// does not apply (B over 32, a chunk of 4 batch rows of x and h does not fit 96 KB of shared memory, or
// PYATTN_CUDA_GRU_CELL=0; =1 lifts the batch limit); then the binding runs the sequence path with T = 1.
struct GRUCellPlan {
  int blocks = 0;      // grid size; block c takes hidden units [c units, (c + 1) units)
  int units = 0;       // hidden units per block
  int warps = 0;       // warps per block
  int chunk_rows = 0;  // batch rows of x and h staged in shared memory at once (a multiple of 4)
  int vec = 1;         // elements per load: 4 (sizes, strides and pointers allow it) or 1
  size_t smem = 0;     // dynamic shared memory per block, bytes
};
GRUCellPlan gru_cell_fwd_plan(const GRUCellFwdParams& p);
cudaError_t gru_cell_fwd(const GRUCellFwdParams& p, const GRUCellPlan& plan, cudaStream_t stream);
// ---- end GRU ----

// ---- attention (csrc/cuda/attention.cu) ----
// FlashAttention-2 forward / backward on tensor cores; contract: the Attention section of params.h. fp16 / bf16 only
// (p.dtype F16 or BF16), D and Dv each <= kAttnMaxHeadDim, any Lq / Lk / strides (last dims stride 1; rows that are
// not 16-byte aligned take a slower 2-byte path), compute capability >= 8.0. p.num_threads is ignored.
constexpr int64_t kAttnMaxHeadDim = 256;
// nullptr when the kernels take p (dtype, head dims, sizes >= 1, grid size), else a sentence saying why not.
const char* attention_unsupported(const AttnCommon& p);
// Dynamic shared memory (bytes) per block that the forward (backward = false) or the backward's largest kernel needs
// for head dims (D, Dv); 0 when unsupported. The bindings compare it with the device's opt-in limit.
size_t attention_smem_bytes(int64_t D, int64_t Dv, bool backward);
// Writes p.out and p.lse. Deterministic. What it needs from the caller besides the tensors, attention_fwd_workspace(p)
// (p.arch, p.num_sms and the q / k / v / out pointers and strides must be set): p.workspace, `floats` floats of
// device memory when that is > 0 (the decoding path's per-split results), and p.tile_counter, one unsigned int of
// device memory, zero at launch, when `tile_counter` (the Hopper forward's dynamic tile scheduler).
struct AttnFwdWorkspace {
  int64_t floats = 0;
  bool tile_counter = false;
};
cudaError_t attention_fwd(const AttnFwdParams& p, cudaStream_t stream);
AttnFwdWorkspace attention_fwd_workspace(const AttnFwdParams& p);
// Writes p.dq, p.dk, p.dv (GQA: dk/dv summed over the group in a fixed order; deterministic, no atomics, except the
// opt-in fused Hopper dQ, PYATTN_CUDA_ATTN_SM90_BWD=fused, which p.deterministic turns off).
// workspace: attention_bwd_workspace_floats(p) floats of device memory (fp32 row statistics; and a dQ accumulator
// where the Hopper backward adds dQ atomically: p.deterministic false). Needs no initialisation.
cudaError_t attention_bwd(const AttnBwdParams& p, float* workspace, cudaStream_t stream);
int64_t attention_bwd_workspace_floats(const AttnBwdParams& p);
// ---- end attention ----

}  // namespace cuda
}  // namespace pyattn
