// CUDA implementations of pyattn::attn_fwd / attn_bwd (schemas in ../library.cpp; kernels in
// csrc/cuda/attention.cu). The same checks, messages, output layouts (q's / k's / v's) and empty-input results as the
// CPU binding (../attention_checks.h), then what the CUDA kernels cannot take is refused with a clear error
// (float32 inputs, head dims > 256, compute capability < 8.0, a device whose per-block shared memory is too small);
// pyattn/backends/cuda.py refuses the same inputs first, so the dispatcher falls back instead of raising.
// Inputs keep their strides (0 included); only a last dim with stride != 1 is copied.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../attention_checks.h"
#include "../cuda_device.h"
#include "pyattn/cuda_kernels.h"
#include "pyattn/params.h"

namespace pyattn {
namespace {

using at::Tensor;
using attn_checks::check_bwd_inputs;

// What the kernels cannot take whatever the sizes (checked before the empty-input shortcuts, so that a refused
// input is refused for every length).
// Also fills p.arch (the device's compute capability), p.num_sms and p.l2_bytes for the launchers.
void check_kernel_support(const char* op, AttnCommon& p, const at::Device& dev, bool backward) {
  TORCH_CHECK(p.dtype == DType::F16 || p.dtype == DType::BF16, op,
              " (cuda): the CUDA attention kernels take float16 and bfloat16 inputs only (got float32; the "
              "triton and torch backends take float32)");
  TORCH_CHECK(p.D <= cuda::kAttnMaxHeadDim && p.Dv <= cuda::kAttnMaxHeadDim, op,
              " (cuda): the CUDA attention kernels take head dims up to ", cuda::kAttnMaxHeadDim, " (got D = ", p.D,
              ", Dv = ", p.Dv, ")");
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(dev.index());
  TORCH_CHECK(prop->major >= 8, op, " (cuda): the CUDA attention kernels need compute capability >= 8.0 (bf16/fp16 "
              "mma.sync m16n8k16, cp.async); device ", dev, " has ", prop->major, ".", prop->minor);
  p.arch = prop->major * 10 + prop->minor;
  p.num_sms = prop->multiProcessorCount;
  p.l2_bytes = prop->l2CacheSize;
  const size_t smem = cuda::attention_smem_bytes(p.D, p.Dv, backward);
  TORCH_CHECK(smem <= prop->sharedMemPerBlockOptin, op, " (cuda): head dims (", p.D, ", ", p.Dv, ") need ", smem,
              " bytes of shared memory per block in the ", backward ? "backward" : "forward", " but device ", dev,
              " allows ", prop->sharedMemPerBlockOptin);
}

void check_launchable(const char* op, const AttnCommon& p) {
  const char* why = cuda::attention_unsupported(p);
  TORCH_CHECK(why == nullptr, op, " (cuda): ", why == nullptr ? "" : why);
}

std::tuple<Tensor, Tensor> attn_fwd_cuda(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
                                         const std::optional<Tensor>& mask, double dropout_p, bool causal,
                                         bool bottom_right, double scale, int64_t seed, int64_t offset) {
  constexpr const char* op = "pyattn::attn_fwd";
  AttnFwdParams p;
  auto [q, k, v, m, s] = attn_checks::fill_common(op, "cuda", kCudaDevice, p, q_in, k_in, v_in, mask, dropout_p,
                                                  causal, bottom_right, scale, seed, offset);
  const c10::cuda::CUDAGuard guard(q.device());
  check_kernel_support(op, p, q.device(), false);
  Tensor out, lse;
  if (!attn_checks::alloc_fwd_outputs(p, q, s, out, lse)) return {out, lse};
  check_launchable(op, p);
  // (both kept alive by the caching allocator for the stream)
  Tensor ws, counter;
  const cuda::AttnFwdWorkspace need = cuda::attention_fwd_workspace(p);
  if (need.floats > 0) {  // the decoding path's per-split results
    ws = at::empty({need.floats}, q.options().dtype(at::kFloat));
    p.workspace = ws.data_ptr<float>();
  }
  if (need.tile_counter) {  // the Hopper forward's dynamic tile scheduler
    counter = at::zeros({1}, q.options().dtype(at::kInt));
    p.tile_counter = reinterpret_cast<unsigned*>(counter.data_ptr<int32_t>());
  }
  C10_CUDA_CHECK(cuda::attention_fwd(p, c10::cuda::getCurrentCUDAStream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> attn_bwd_cuda(const Tensor& dout_in, const Tensor& q_in, const Tensor& k_in,
                                                 const Tensor& v_in, const Tensor& out_in, const Tensor& lse_in,
                                                 const std::optional<Tensor>& mask, double dropout_p, bool causal,
                                                 bool bottom_right, double scale, int64_t seed, int64_t offset) {
  constexpr const char* op = "pyattn::attn_bwd";
  AttnBwdParams p;
  auto [q, k, v, m, s] = attn_checks::fill_common(op, "cuda", kCudaDevice, p, q_in, k_in, v_in, mask, dropout_p,
                                                  causal, bottom_right, scale, seed, offset);
  const c10::cuda::CUDAGuard guard(q.device());
  auto [dout, out, lse] = check_bwd_inputs(op, dout_in, out_in, lse_in, q.scalar_type(), s, q.device());
  check_kernel_support(op, p, q.device(), true);
  Tensor dq, dk, dv;
  if (!attn_checks::alloc_bwd_outputs(p, q, k, v, dout, out, lse, s, dq, dk, dv)) return {dq, dk, dv};
  check_launchable(op, p);
  p.deterministic = at::globalContext().deterministicAlgorithms();
  // fp32 row statistics (lse in log2 units, l2, delta), 3 * B * Hq * Lq floats, and the Hopper backward's dQ
  // accumulator when it takes p without deterministic mode; freed stream-ordered on return
  Tensor ws = at::empty({cuda::attention_bwd_workspace_floats(p)}, q.options().dtype(at::kFloat));
  C10_CUDA_CHECK(cuda::attention_bwd(p, ws.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dq, dk, dv};
}

}  // namespace
}  // namespace pyattn

PYATTN_CUDA_IMPL(m) {
  m.impl("attn_fwd", &pyattn::attn_fwd_cuda);
  m.impl("attn_bwd", &pyattn::attn_bwd_cuda);
}
