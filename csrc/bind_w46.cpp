// Python binding of the 4.6-bit kernels (registered into lowbit._native by module.cpp).
// Raw buffers: lowbit/kernels/w46.py checks dtypes, shapes and contiguity and passes data pointers.
// Every call releases the GIL.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "w46.h"

namespace py = pybind11;

namespace lowbit {

void register_w46(py::module_& m) {
    using w46::Packed;
    py::class_<Packed, std::shared_ptr<Packed>>(m, "W46Packed", "4.6-bit weights packed for the native kernels")
        .def_readonly("N", &Packed::N)
        .def_readonly("K", &Packed::K)
        .def_readonly("Kp", &Packed::Kp)
        .def_readonly("groups", &Packed::G)
        .def_readonly("K_x", &Packed::K_x)
        .def_readonly("K_w", &Packed::K_w)
        .def_readonly("flush", &Packed::flush, "k-quads accumulated in int16 before widening to int32");

    m.def(
        "w46_pack",
        [](uintptr_t w, int64_t N, int64_t K, int K_x, int K_w, int64_t groups) {
            return w46::pack(reinterpret_cast<const int8_t*>(w), N, K, K_x, K_w, groups);
        },
        py::arg("w_ptr"), py::arg("N"), py::arg("K"), py::arg("K_x"), py::arg("K_w"), py::arg("groups") = 1,
        py::call_guard<py::gil_scoped_release>(),
        "Pack int8 weight codes [N, K] (row-major) in [-K_w, K_w]; K_x*K_w <= 127.");

    m.def("w46_path", []() { return std::string(w46::active_path()); },
          "Kernel path the 4.6-bit ops use now (portable, avx2, avx512bw, vnni).");

    m.def(
        "w46_linear",
        [](uintptr_t x, int64_t M, int64_t ldx, const Packed& w, uintptr_t bias, int epi, uintptr_t p0, uintptr_t p1,
           int32_t zp, int32_t qmin, int32_t qmax, uintptr_t out, int x_zp) {
            if (M < 0 || ldx < w.K) throw std::invalid_argument("w46_linear: bad shape");
            if (epi < 0 || epi > wb::EPI_REQ_S8) throw std::invalid_argument("w46_linear: bad epilogue kind");
            wb::Out o;
            o.ptr = reinterpret_cast<void*>(out);
            o.ldo = w.N;
            w46::linear(reinterpret_cast<const uint8_t*>(x), M, ldx, w, reinterpret_cast<const int32_t*>(bias),
                        wb::make_epi(epi, p0, p1, zp, qmin, qmax), o, x_zp);
        },
        py::call_guard<py::gil_scoped_release>(),
        "x uint8 [M, K] (row stride ldx) -> out [M, N]; epi 0 int32, 1 float, 2 requant uint8, 3 requant int8; "
        "x_zp: activation zero point in [0, 2*K_x] (-1: K_x).");

    m.def(
        "w46_conv2d",
        [](uintptr_t x, int64_t B, int64_t C, int64_t H, int64_t W, const Packed& w, int64_t kh, int64_t kw, int64_t sh,
           int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw, int64_t groups, bool x_nhwc, uintptr_t bias,
           int epi, uintptr_t p0, uintptr_t p1, int32_t zp, int32_t qmin, int32_t qmax, uintptr_t out, int x_zp) {
            if (epi < 0 || epi > wb::EPI_REQ_S8) throw std::invalid_argument("w46_conv2d: bad epilogue kind");
            if (sh < 1 || sw < 1 || dh < 1 || dw < 1 || ph < 0 || pw < 0 || kh < 1 || kw < 1 || groups < 1)
                throw std::invalid_argument("w46_conv2d: bad stride / padding / dilation / kernel size");
            w46::ConvGeom gm{B, C, H, W, kh, kw, sh, sw, ph, pw, dh, dw, 0, 0, groups, x_nhwc, x_zp};
            gm.Ho = wb::conv_out_size(H, kh, sh, ph, dh);
            gm.Wo = wb::conv_out_size(W, kw, sw, pw, dw);
            if (gm.Ho < 1 || gm.Wo < 1) throw std::invalid_argument("w46_conv2d: empty output");
            wb::Out o;
            o.ptr = reinterpret_cast<void*>(out);
            o.ldo = w.N;  // NHWC rows: the NCHW-semantics output is channels_last in memory
            w46::conv2d(reinterpret_cast<const uint8_t*>(x), gm, w, reinterpret_cast<const int32_t*>(bias),
                        wb::make_epi(epi, p0, p1, zp, qmin, qmax), o);
        },
        py::call_guard<py::gil_scoped_release>(), "x uint8 NCHW semantics (memory NCHW, or NHWC if x_nhwc) -> out [B, Ho, Wo, N]; x_zp: activation "
        "zero point in [0, 2*K_x] (-1: K_x), held by the padding.");
}

}  // namespace lowbit
