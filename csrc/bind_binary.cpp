// Python binding of the binary kernels (registered into lowbit._native by module.cpp).
#include <pybind11/pybind11.h>

namespace py = pybind11;

namespace lowbit {

void register_binary(py::module_& m) { (void)m; }

}  // namespace lowbit
