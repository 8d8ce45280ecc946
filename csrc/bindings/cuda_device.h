// The device whose tensors the CUDA bindings (csrc/bindings/cuda/) take, and where they register their kernels.
// Normally CUDA tensors, registered as torch.ops.pyattn.* for the CUDA dispatch key. The CUDA emulator build
// (scripts/cuda_emu.py, -DPYATTN_CUDA_EMU) compiles the same bindings and kernels for CPU tensors, registered as
// torch.ops.pyattn_emu.* for the CPU key, with the CUDA runtime emulated (csrc/emu/cuda_emu.h).
#pragma once

#include <ATen/ATen.h>

namespace pyattn {
#ifdef PYATTN_CUDA_EMU
constexpr at::DeviceType kCudaDevice = at::kCPU;
#define PYATTN_CUDA_IMPL(m) TORCH_LIBRARY_IMPL(pyattn_emu, CPU, m)
#else
constexpr at::DeviceType kCudaDevice = at::kCUDA;
#define PYATTN_CUDA_IMPL(m) TORCH_LIBRARY_IMPL(pyattn, CUDA, m)
#endif
inline bool on_cuda_device(const at::Tensor& t) { return t.device().type() == kCudaDevice; }
}  // namespace pyattn
