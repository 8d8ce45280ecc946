// torch.ops.pyattn_emu: the schemas of torch.ops.pyattn (../bindings/schemas.h), implemented for CPU tensors by the
// CUDA bindings and kernels running in the CUDA emulator (built by scripts/cuda_emu.py, -DPYATTN_CUDA_EMU).
#include <torch/library.h>

#include "../bindings/schemas.h"

TORCH_LIBRARY(pyattn_emu, m) { pyattn::define_schemas(m); }
