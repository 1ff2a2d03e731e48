// Makes the compiled library importable as `slimops._C`. Importing it runs the static
// TORCH_LIBRARY registrations; the module itself holds nothing (ops live in torch.ops.slimops).
// Only setup.py compiles this file; the CMake build links the same kernels without Python.
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "slimops compiled kernels", -1, nullptr};
  return PyModule_Create(&module_def);
}
}
