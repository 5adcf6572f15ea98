// Python binding of lowbit's native kernels. Raw buffers only: the Python side (lowbit.kernels)
// checks dtype, shape and contiguity of torch tensors and hands data pointers here.
#include <pybind11/pybind11.h>

#include <stdexcept>

#include "cpu_features.h"
#include "parallel.h"

namespace py = pybind11;

namespace lowbit {
void register_int8(py::module_& m);
void register_w46(py::module_& m);
void register_binary(py::module_& m);
void register_bm(py::module_& m);
void register_qops(py::module_& m);
void register_runtime(py::module_& m);
void register_plan(py::module_& m);
}  // namespace lowbit

PYBIND11_MODULE(_native, m) {
    m.doc() = "lowbit native CPU kernels";
    m.def("cpu_features", []() {
        const auto& f = lowbit::cpu();
        py::dict d;
        d["avx2"] = f.avx2;
        d["fma"] = f.fma;
        d["avx512f"] = f.avx512f;
        d["avx512bw"] = f.avx512bw;
        d["avx512vl"] = f.avx512vl;
        d["avx512vnni"] = f.avx512vnni;
        d["avx512vpopcntdq"] = f.avx512vpopcntdq;
        d["popcnt"] = f.popcnt;
        d["neon"] = f.neon;
        return d;
    });
    m.def("best_isa", []() { return std::string(lowbit::isa_name(lowbit::best_isa())); });
    m.def("active_isa", []() { return std::string(lowbit::isa_name(lowbit::active_isa())); });
    m.def("set_isa_cap", [](const std::string& name) {
        lowbit::Isa isa;
        if (!lowbit::parse_isa(name, &isa))
            throw std::invalid_argument("unknown ISA '" + name + "' (portable, neon, avx2, avx512bw, vnni)");
        lowbit::set_isa_cap(isa);
    });
    m.def("set_num_threads", [](int n) {
        if (n < 1) throw std::invalid_argument("thread count must be >= 1");
        lowbit::set_num_threads(n);
    });
    m.def("num_threads", []() { return lowbit::num_threads(); });
    lowbit::register_int8(m);
    lowbit::register_w46(m);
    lowbit::register_binary(m);
    lowbit::register_bm(m);
    lowbit::register_qops(m);
    lowbit::register_runtime(m);
    lowbit::register_plan(m);
}
