// torch.ops.pyattn_emu: the schemas of torch.ops.pyattn (../bindings/schemas.h), implemented for CPU tensors by the
// CUDA bindings and kernels running in the CUDA emulator (built by scripts/cuda_emu.py, -DPYATTN_CUDA_EMU).
#include <torch/library.h>

#include <string>
#include <vector>

#include "../bindings/schemas.h"
#include "cuda_emu.h"

namespace pyattn_emu {
int64_t selftest(const std::string& name);  // selftest.cpp
}

TORCH_LIBRARY(pyattn_emu, m) {
  pyattn::define_schemas(m);
  // The emulator's counters (cuda_emu.h: ldmatrix phases, their shared-memory wavefronts, launches, blocks, largest
  // dynamic shared memory, wgmma instructions).
  m.def("emu_counters() -> int[]", [] {
    const long long* c = pyattn_emu::counters();
    return std::vector<int64_t>(c, c + pyattn_emu::kNumCounters);
  });
  m.def("emu_reset_counters() -> ()", [] { pyattn_emu::reset_counters(); });
  // Kernels with one deliberate defect each (selftest.cpp): the emulator must report every one.
  m.def("emu_selftest(str name) -> int", [](std::string name) { return pyattn_emu::selftest(name); });
}
