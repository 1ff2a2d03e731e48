// Makes the compiled library importable as `slimops._C`. Importing it runs the static
// TORCH_LIBRARY registrations; the ops live in torch.ops.slimops. The module itself holds one function,
// `cpu_isa()`: the instruction set the CPU kernels use in this process (csrc/cpu/isa.h), and `cpu_bf16_dot()`:
// whether their bfloat16 paths use the AVX512-BF16 dot products (csrc/cpu/bf16_dot.h), and `cpu_bf16_conv_onednn()`:
// whether channel_conv's bfloat16 calls run through oneDNN on AMX (csrc/cpu/channel_conv_onednn.h), for
// `slimops info` and the benchmarks' headers; `cpu_amx_bf16()`: whether the bf16 kernels may use AMX tiles;
// `cpu_conv_in_place(h, w, k)`: whether channel_conv's float32 direct forward reads such planes in place
// (csrc/cpu/direct_unpadded.h), and `cpu_conv_winograd(h, w, nc, nr)`: whether its float32 3x3 "same" forward runs
// Winograd F(2x2, 3x3) (csrc/cpu/winograd.h), for the tests that check those paths. Only setup.py compiles this
// file; the CMake build links the same kernels without Python.
#include <Python.h>

#include <exception>

#include "cpu/amx_bf16.h"
#include "cpu/bf16_dot.h"
#include "cpu/channel_conv_onednn.h"
#include "cpu/direct_conv.h"
#include "cpu/isa.h"
#include "cpu/winograd.h"

namespace {

PyObject* cpu_isa(PyObject*, PyObject*) {
  try {
    return PyUnicode_FromString(slimops::cpu::isa_name(slimops::cpu::cpu_isa()));
  } catch (const c10::Error& e) {  // a bad SLIMOPS_CPU_ISA: the message, not the C++ backtrace
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    return nullptr;
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
}

// A flag of the CPU kernels' dispatch (read once by the kernels: an environment variable it reads may be bad).
template <bool (*Flag)()>
PyObject* flag(PyObject*, PyObject*) {
  try {
    return PyBool_FromLong(Flag() ? 1 : 0);
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    return nullptr;
  }
}

// cpu_conv_in_place(h, w, k): whether the direct forward of a float32 k x k "same" conv at stride 1 (k 1 or 3) reads
// an h x w plane in place rather than through the padded buffer.
PyObject* cpu_conv_in_place(PyObject*, PyObject* args) {
  long long h = 0, w = 0, k = 0;
  if (!PyArg_ParseTuple(args, "LLL", &h, &w, &k)) return nullptr;
  try {
    const int64_t p = k / 2;
    const slimops::ConvGeom g{1, 1, h, w, k, k, 1, 1, p, p, 1, 1, h, w};
    return PyBool_FromLong(slimops::cpu::direct_conv_in_place(g) ? 1 : 0);
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    return nullptr;
  }
}

// cpu_conv_winograd(h, w, nc, nr): whether channel_conv2d's float32 forward of a 3x3 conv with padding 1 at stride 1
// on h x w planes, nc kept input and nr kept output channels, runs Winograd F(2x2, 3x3).
PyObject* cpu_conv_winograd(PyObject*, PyObject* args) {
  long long h = 0, w = 0, nc = 0, nr = 0;
  if (!PyArg_ParseTuple(args, "LLLL", &h, &w, &nc, &nr)) return nullptr;
  const slimops::ConvGeom g{1, nc, h, w, 3, 3, 1, 1, 1, 1, 1, 1, h, w};
  return PyBool_FromLong(slimops::cpu::winograd_applies(g, nc, nr) ? 1 : 0);
}

PyMethodDef methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS,
     "The instruction set of the CPU kernels in this process: base, avx2 or avx512 (SLIMOPS_CPU_ISA caps it)."},
    {"cpu_bf16_dot", flag<slimops::cpu::cpu_bf16_dot>, METH_NOARGS,
     "Whether the bfloat16 paths use AVX512-BF16 dot products (avx512 ISA, a CPU with AVX512_BF16, "
     "SLIMOPS_CPU_BF16_DOT not 0)."},
    {"cpu_amx_bf16", flag<slimops::cpu::cpu_amx_bf16>, METH_NOARGS,
     "Whether the bfloat16 kernels may use AMX tiles (avx512 ISA, AMX-BF16 usable, SLIMOPS_CPU_AMX not 0)."},
    {"cpu_bf16_conv_onednn", flag<slimops::cpu::bf16_conv_onednn>, METH_NOARGS,
     "Whether channel_conv's bfloat16 calls run through oneDNN on AMX tiles (avx512 ISA, AMX-BF16 usable, "
     "SLIMOPS_CPU_BF16_CONV not 'direct')."},
    {"cpu_conv_in_place", cpu_conv_in_place, METH_VARARGS,
     "cpu_conv_in_place(h, w, k): whether channel_conv's float32 forward of a k x k 'same' conv at stride 1 reads "
     "an h x w plane in place (no padded copy) in this process."},
    {"cpu_conv_winograd", cpu_conv_winograd, METH_VARARGS,
     "cpu_conv_winograd(h, w, nc, nr): whether channel_conv2d's float32 forward of a 3x3 conv with padding 1 at "
     "stride 1 on h x w planes with nc / nr kept channels runs Winograd F(2x2, 3x3) in this process."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "slimops compiled kernels", -1, methods};
  return PyModule_Create(&module_def);
}
}
