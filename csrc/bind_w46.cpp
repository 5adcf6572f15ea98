// Python binding of the 4.6-bit kernels (registered into lowbit._native by module.cpp).
// Raw buffers: lowbit/kernels/w46.py checks dtypes, shapes and contiguity and passes data pointers.
// Everything that can be checked from the arguments is checked here too (null pointers, shapes,
// the epilogue: epilogue.h's check_epilogue, the accumulator bound with the bias) and raises
// ValueError before any work. Every call releases the GIL.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "bind_checks.h"
#include "epilogue.h"
#include "w46.h"

namespace py = pybind11;

namespace lowbit {

namespace {

constexpr unsigned kW46Epilogues = epi_mask(EpiKind::none) | epi_mask(EpiKind::float_out) |
                                   epi_mask(EpiKind::requant_u8) | epi_mask(EpiKind::requant_s8);

void require(bool ok, const char* what, const std::string& msg) {
    if (!ok) throw std::invalid_argument(std::string(what) + ": " + msg);
}

}  // namespace

// Validated epilogue and output for N channels of `rows` output rows.
// x_zp: the activation zero point (< 0: K_x); |a - x_zp| <= max(x_zp, 2 K_x - x_zp) bounds the accumulator.
wb::Epi check_w46_epi(const char* what, int epi, uintptr_t p0, uintptr_t p1, int32_t zp, int32_t qmin, int32_t qmax,
                      const w46::Packed& w, uintptr_t bias, uintptr_t out, int64_t rows, int x_zp) {
    EpiArgs a;
    a.kind = epi;
    a.p0 = p0;
    a.p1 = p1;
    a.zp = zp;
    a.qmin = qmin;
    a.qmax = qmax;
    check_epilogue(what, a, w.N, kW46Epilogues);
    const int z = w46::act_zero_point(w, x_zp);
    check_acc_bound(what, std::max(z, 2 * w.K_x - z), w.l1.data(), reinterpret_cast<const int32_t*>(bias), w.N);
    require(out != 0 || rows == 0, what, "null output pointer");
    return wb::make_epi(epi, p0, p1, zp, qmin, qmax);
}

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
            require(N >= 1 && K >= 1, "w46_pack", "empty weight [" + std::to_string(N) + ", " + std::to_string(K) + "]");
            require(w != 0, "w46_pack", "null weight pointer");
            require(K < (int64_t(1) << 31) && N < (int64_t(1) << 31), "w46_pack", "weight matrix too large");
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
            const char* what = "w46_linear";
            require(M >= 0, what, "negative row count");
            require(ldx >= w.K, what, "row stride " + std::to_string(ldx) + " < K = " + std::to_string(w.K));
            require(x != 0 || M == 0, what, "null activation pointer");
            const wb::Epi e = check_w46_epi(what, epi, p0, p1, zp, qmin, qmax, w, bias, out, M, x_zp);
            if (M == 0) return;
            wb::Out o;
            o.ptr = reinterpret_cast<void*>(out);
            o.ldo = w.N;
            w46::linear(reinterpret_cast<const uint8_t*>(x), M, ldx, w, reinterpret_cast<const int32_t*>(bias), e, o,
                        x_zp);
        },
        py::call_guard<py::gil_scoped_release>(),
        "x uint8 [M, K] (row stride ldx) -> out [M, N]; epi (epilogue.h): 0 int32, 1 float, 2 requant uint8, "
        "3 requant int8; x_zp: activation zero point in [0, 2*K_x] (-1: K_x).",
        py::arg("x"), py::arg("M"), py::arg("ldx"), py::arg("w"), py::arg("bias"), py::arg("epi"), py::arg("p0"),
        py::arg("p1"), py::arg("zp"), py::arg("qmin"), py::arg("qmax"), py::arg("out"), py::arg("x_zp") = -1);

    m.def(
        "w46_conv2d",
        [](uintptr_t x, int64_t B, int64_t C, int64_t H, int64_t W, const Packed& w, int64_t kh, int64_t kw, int64_t sh,
           int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw, int64_t groups, bool x_nhwc, uintptr_t bias,
           int epi, uintptr_t p0, uintptr_t p1, int32_t zp, int32_t qmin, int32_t qmax, uintptr_t out, int x_zp) {
            const char* what = "w46_conv2d";
            require(B >= 0 && C >= 1 && H >= 1 && W >= 1, what, "bad input shape");
            require(sh >= 1 && sw >= 1 && dh >= 1 && dw >= 1 && ph >= 0 && pw >= 0 && kh >= 1 && kw >= 1 && groups >= 1,
                    what, "bad stride / padding / dilation / kernel size");
            require(x != 0 || B == 0, what, "null input pointer");
            w46::ConvGeom gm{B, C, H, W, kh, kw, sh, sw, ph, pw, dh, dw, 0, 0, groups, x_nhwc, x_zp};
            gm.Ho = wb::conv_out_size(H, kh, sh, ph, dh);
            gm.Wo = wb::conv_out_size(W, kw, sw, pw, dw);
            require(gm.Ho >= 1 && gm.Wo >= 1, what, "empty output");
            const wb::Epi e = check_w46_epi(what, epi, p0, p1, zp, qmin, qmax, w, bias, out, B * gm.Ho * gm.Wo, x_zp);
            if (B == 0) return;
            wb::Out o;
            o.ptr = reinterpret_cast<void*>(out);
            o.ldo = w.N;  // NHWC rows: the NCHW-semantics output is channels_last in memory
            w46::conv2d(reinterpret_cast<const uint8_t*>(x), gm, w, reinterpret_cast<const int32_t*>(bias), e, o);
        },
        py::call_guard<py::gil_scoped_release>(),
        "x uint8 NCHW semantics (memory NCHW, or NHWC if x_nhwc) -> out [B, Ho, Wo, N]; x_zp: activation zero "
        "point in [0, 2*K_x] (-1: K_x), held by the padding.",
        py::arg("x"), py::arg("B"), py::arg("C"), py::arg("H"), py::arg("W"), py::arg("w"), py::arg("kh"), py::arg("kw"),
        py::arg("sh"), py::arg("sw"), py::arg("ph"), py::arg("pw"), py::arg("dh"), py::arg("dw"), py::arg("groups"),
        py::arg("x_nhwc"), py::arg("bias"), py::arg("epi"), py::arg("p0"), py::arg("p1"), py::arg("zp"), py::arg("qmin"),
        py::arg("qmax"), py::arg("out"), py::arg("x_zp") = -1);
}

}  // namespace lowbit
