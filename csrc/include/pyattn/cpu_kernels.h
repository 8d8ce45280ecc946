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

}  // namespace cpu
}  // namespace pyattn
