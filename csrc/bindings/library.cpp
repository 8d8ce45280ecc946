// The schemas of every C++ op in pyattn._C, in one place. Kernels are registered per dispatch key
// next to their bindings (TORCH_LIBRARY_IMPL(pyattn, CPU|CUDA, m)); fake (meta) implementations for
// torch.compile live in pyattn/backends/cpp.py.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(pyattn, m) {
  // LayerNorm / RMSNorm with an optional fused residual (Add & Norm). x: (M, N), last dim contiguous.
  m.def("layer_norm_fwd(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, float eps, bool rms, "
        "bool store_residual) -> (Tensor y, Tensor residual_out, Tensor mean, Tensor rstd)");
  m.def("layer_norm_bwd(Tensor dy, Tensor s, Tensor? weight, Tensor mean, Tensor rstd, Tensor? dresidual_out, "
        "bool rms, bool has_bias, bool need_dweight) -> (Tensor dx, Tensor dweight, Tensor dbias)");
}

// `import pyattn._C` loads this library (and runs the registrations above); it has no Python functions.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "pyattn C++/CUDA ops (torch.ops.pyattn)", -1, nullptr};
  return PyModule_Create(&module);
}
