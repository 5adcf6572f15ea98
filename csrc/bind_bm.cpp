// Python binding of the BM kernels (registered into lowbit._native by module.cpp). Raw buffers:
// lowbit/kernels/bm.py checks dtypes, shapes and contiguity and passes data pointers; this layer
// checks what it can see (pointers, sizes, geometry, epilogue parameters). Every call releases the GIL.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "bm.h"

namespace py = pybind11;

namespace lowbit {

namespace {

void need(bool ok, const char* what) {
    if (!ok) throw std::invalid_argument(what);
}

bm::Epi make_bm_epi(uintptr_t L, uintptr_t T, uintptr_t bias, int f, int sh, int F, int zin, int zp, int lo, int hi,
                    bool raw) {
    need(L != 0, "bm: the input log table is missing");
    need(raw || T != 0, "bm: the exp table is missing");
    bm::Epi e;
    e.L = reinterpret_cast<const int16_t*>(L);
    e.T = reinterpret_cast<const int32_t*>(T);
    e.bias = reinterpret_cast<const int32_t*>(bias);
    e.f = f;
    e.sh = sh;
    e.F = F;
    e.zin = zin;
    e.zp = zp;
    e.lo = lo;
    e.hi = hi;
    e.raw = raw;
    return e;
}

}  // namespace

void register_bm(py::module_& m) {
    using bm::Packed;
    py::class_<Packed, std::shared_ptr<Packed>>(m, "BMPacked", "BM log-domain weight codes packed for the kernels")
        .def_readonly("N", &Packed::N)
        .def_readonly("K", &Packed::K)
        .def_readonly("groups", &Packed::G)
        .def_readonly("bits", &Packed::bits);

    m.def(
        "bm_pack",
        [](uintptr_t cpos, uintptr_t cneg, int64_t N, int64_t K, int64_t groups, int bits) {
            need(cpos != 0 && cneg != 0, "bm_pack: null weight pointer");
            return bm::pack(reinterpret_cast<const int16_t*>(cpos), reinterpret_cast<const int16_t*>(cneg), N, K,
                            groups, bits);
        },
        py::arg("cpos_ptr"), py::arg("cneg_ptr"), py::arg("N"), py::arg("K"), py::arg("groups"), py::arg("bits"),
        py::call_guard<py::gil_scoped_release>(),
        "Pack weight codes c+ / c- (int16 [N, K], values in [MIN, 0]) as int8 (bits 8) or int16 (bits 16) codes.");

    m.def("bm_path", []() { return std::string(bm::active_path()); },
          "Kernel path the BM ops use now (portable, avx2, avx512bw).");

    m.def(
        "bm_linear",
        [](uintptr_t x, int64_t M, int64_t K, int64_t ldx, const Packed& w, uintptr_t L, uintptr_t T, uintptr_t bias,
           int f, int sh, int F, int zin, int zp, int lo, int hi, bool raw, uintptr_t out) {
            need(x != 0 || M == 0, "bm_linear: null input");
            need(out != 0 || M == 0, "bm_linear: null output");
            need(M >= 0 && K == w.K && ldx >= K, "bm_linear: input shape does not match the weights");
            need(w.G == 1, "bm_linear: weights packed for a grouped conv");
            bm::linear(reinterpret_cast<const uint8_t*>(x), M, ldx, w,
                       make_bm_epi(L, T, bias, f, sh, F, zin, zp, lo, hi, raw), reinterpret_cast<void*>(out), w.N);
        },
        py::call_guard<py::gil_scoped_release>(),
        "x uint8 codes [M, K] -> out uint8 codes [M, N], or (raw) the four maxima int32 [M, 4, N].");

    m.def(
        "bm_conv2d",
        [](uintptr_t x, int64_t B, int64_t C, int64_t H, int64_t W, const Packed& w, int64_t kh, int64_t kw, int64_t sh,
           int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw, int64_t groups, uintptr_t L, uintptr_t T,
           uintptr_t bias, int f, int esh, int F, int zin, int zp, int lo, int hi, bool raw, uintptr_t out) {
            need(B >= 1 && C >= 1 && H >= 1 && W >= 1, "bm_conv2d: empty input");
            need(x != 0 && out != 0, "bm_conv2d: null buffer");
            need(sh >= 1 && sw >= 1 && dh >= 1 && dw >= 1 && ph >= 0 && pw >= 0 && kh >= 1 && kw >= 1 && groups >= 1,
                 "bm_conv2d: bad stride / padding / dilation / kernel size");
            need(C % groups == 0, "bm_conv2d: channels not divisible by groups");
            bm::ConvGeom gm{B, C, H, W, kh, kw, sh, sw, ph, pw, dh, dw, 0, 0, groups};
            gm.Ho = wb::conv_out_size(H, kh, sh, ph, dh);
            gm.Wo = wb::conv_out_size(W, kw, sw, pw, dw);
            need(gm.Ho >= 1 && gm.Wo >= 1, "bm_conv2d: empty output");
            bm::conv2d(reinterpret_cast<const uint8_t*>(x), gm, w,
                       make_bm_epi(L, T, bias, f, esh, F, zin, zp, lo, hi, raw), reinterpret_cast<void*>(out));
        },
        py::call_guard<py::gil_scoped_release>(),
        "x uint8 NHWC [B, H, W, C] -> out uint8 NHWC [B, Ho, Wo, N], or (raw) int32 [B*Ho*Wo, 4, N].");

    m.def(
        "bm_f32_maxplus",
        [](uintptr_t X, int64_t M, int64_t K, int64_t ldx, uintptr_t V, int64_t N, uintptr_t Y, uintptr_t I) {
            need(M >= 0 && N >= 1 && K >= 1 && ldx >= K, "bm_f32_maxplus: bad shape");
            need((X != 0 || M == 0) && V != 0 && (Y != 0 || M == 0), "bm_f32_maxplus: null buffer");
            bm::f32_maxplus(reinterpret_cast<const float*>(X), M, K, ldx, reinterpret_cast<const float*>(V), N,
                            reinterpret_cast<float*>(Y), reinterpret_cast<int32_t*>(I));
        },
        py::call_guard<py::gil_scoped_release>(),
        "Y[m, n] = max_k X[m, k] + V[n, k] (float32), I[m, n] = first argmax (int32; skipped when I_ptr is 0).");

    m.def(
        "bm_f32_maxplus_backward",
        [](uintptr_t I, uintptr_t G, int64_t M, int64_t N, int64_t K, uintptr_t gX, uintptr_t gV) {
            need(M >= 0 && N >= 1 && K >= 1, "bm_f32_maxplus_backward: bad shape");
            need((I != 0 && G != 0) || M == 0, "bm_f32_maxplus_backward: null buffer");
            bm::f32_maxplus_backward(reinterpret_cast<const int32_t*>(I), reinterpret_cast<const float*>(G), M, N, K,
                                     reinterpret_cast<float*>(gX), reinterpret_cast<float*>(gV));
        },
        py::call_guard<py::gil_scoped_release>(),
        "gX[m, I[m, n]] += G[m, n] and gV[n, I[m, n]] += G[m, n] (zero-filled float32 outputs; 0 = skip).");
}

}  // namespace lowbit
