// The pyattn op library: its schemas (schemas.h) and the Python module `import pyattn._C` loads.
#include <Python.h>
#include <torch/library.h>

#include "schemas.h"

TORCH_LIBRARY(pyattn, m) { pyattn::define_schemas(m); }

// `import pyattn._C` loads this library (and runs the registrations above); it has no Python functions.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "pyattn C++/CUDA ops (torch.ops.pyattn)", -1, nullptr};
  return PyModule_Create(&module);
}
