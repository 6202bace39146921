// Makes the extension importable as the Python module slsg._C; importing it runs the
// static TORCH_LIBRARY registrations. Not compiled into the CMake (libtorch) build.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
