// Torch-free C++ CPU kernels (csrc/cpu/). Called by the bindings in csrc/bindings/ with a filled params struct.
#pragma once

#include <cstdint>

#include "pyattn/params.h"

namespace pyattn {
namespace cpu {

// ---- LayerNorm / RMSNorm (csrc/cpu/layer_norm.cpp) ----
// Writes p.y, p.residual_out (if non-null), p.mean (if non-null and !rms), p.rstd (if non-null).
void layer_norm_fwd(const NormFwdParams& p);
// Writes p.dx and, if non-null, p.dweight / p.dbias (bitwise reproducible for any thread count).
void layer_norm_bwd(const NormBwdParams& p);
// fp32 elements of scratch layer_norm_bwd needs in p.workspace (0 when neither dweight nor dbias is wanted).
int64_t layer_norm_bwd_workspace_floats(const NormBwdParams& p);

// ---- Attention (csrc/cpu/attention.cpp) ----
// Writes p.out and p.lse. Deterministic (no result depends on the thread count).
void attention_fwd(const AttnFwdParams& p);
// Writes p.dq, p.dk, p.dv (dk/dv summed over each GQA group in a fixed order). Deterministic.
void attention_bwd(const AttnBwdParams& p);
// The dropout keep decision of element (b, h, i, j) (h: query head; Lq: query length), shared by both passes.
bool attn_dropout_keep(uint64_t seed, uint64_t offset, int64_t Hq, int64_t Lq, int64_t b, int64_t h, int64_t i,
                       int64_t j, float p);

// ---- GRU (csrc/cpu/gru.cpp) ----
// Forward of one direction of one layer (a cell is T = 1): writes p.out (T, B, H) and, when non-null, p.ws.
// Deterministic: the result depends only on the sizes, never on the thread count.
void gru_fwd(const GRUFwdParams& p);
// fp32 scratch elements gru_fwd needs in p.workspace.
int64_t gru_fwd_workspace_floats(const GRUFwdParams& p);
// BPTT: writes p.dx, p.dh0 and, when p.need_weights, p.dw_ih, p.dw_hh and the non-null bias grads.
void gru_bwd(const GRUBwdParams& p);
int64_t gru_bwd_workspace_floats(const GRUBwdParams& p);
// ---- end GRU ----

}  // namespace cpu
}  // namespace pyattn
