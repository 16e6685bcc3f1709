// The Python module kernels._C: importing it loads this library, whose static initialisers
// register the beitv2_cuda::* ops (TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL in each .cu file).
// No pybind11, so the library builds against Python's limited API (one wheel for CPython >= 3.9).
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
