// Python binding of the w46 kernels (registered into lowbit._native by module.cpp).
#include <pybind11/pybind11.h>

namespace py = pybind11;

namespace lowbit {

void register_w46(py::module_& m) { (void)m; }

}  // namespace lowbit
