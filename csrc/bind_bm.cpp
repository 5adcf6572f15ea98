// Python binding of the BM kernels (registered into lowbit._native by module.cpp). Raw buffers:
// lowbit/kernels/bm.py checks dtypes, shapes and contiguity and passes data pointers. As in the other
// bindings (bind_binary.cpp, bind_w46.cpp), everything that can be checked from the arguments is checked
// here too (null pointers, shapes, geometry, the BM epilogue: bm.cpp's check_epi) and raises ValueError
// naming the binding before any work; an empty batch returns without touching the buffers. The BM
// epilogue is not one of epilogue.h's kinds: it combines four maxima through an exp table (bm.h).
// Every call releases the GIL.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "bm.h"

namespace py = pybind11;

namespace lowbit {

namespace {

void require(bool ok, const char* what, const std::string& msg) {
    if (!ok) throw std::invalid_argument(std::string(what) + ": " + msg);
}

bm::Epi make_bm_epi(const char* what, uintptr_t L, uintptr_t T, uintptr_t bias, int f, int sh, int F, int zin, int zp,
                    int lo, int hi, bool raw) {
    require(L != 0, what, "the input log table is missing");
    require(raw || T != 0, what, "the exp table is missing");
    require(f >= 0 && f <= 14, what, "log step bits f=" + std::to_string(f) + " outside [0, 14]");
    require(sh >= 0 && sh <= 62, what, "exp shift sh=" + std::to_string(sh) + " outside [0, 62]");
    require(F >= 0 && F <= 30, what, "output shift F=" + std::to_string(F) + " outside [0, 30]");
    require(zin >= 0 && zin <= 255, what, "input zero point " + std::to_string(zin) + " outside [0, 255]");
    require(raw || (zp >= 0 && zp <= 255), what, "output zero point " + std::to_string(zp) + " outside [0, 255]");
    require(raw || (lo >= 0 && lo <= hi && hi <= 255), what,
            "output clamp [" + std::to_string(lo) + ", " + std::to_string(hi) + "] outside [0, 255]");
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
            require(N >= 1 && K >= 1, "bm_pack", "empty weight");
            require(cpos != 0 && cneg != 0, "bm_pack", "null weight pointer");
            require(N < (int64_t(1) << 31), "bm_pack", "weight matrix too large");
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
            const char* what = "bm_linear";
            require(M >= 0, what, "negative row count");
            require(K == w.K, what, "input shape: " + std::to_string(K) + " features, the weights have " +
                                        std::to_string(w.K));
            require(ldx >= K, what, "row stride " + std::to_string(ldx) + " < K = " + std::to_string(K));
            require(w.G == 1, what, "weights packed for a grouped conv");
            require(x != 0 || M == 0, what, "null input pointer");
            require(out != 0 || M == 0, what, "null output pointer");
            const bm::Epi e = make_bm_epi(what, L, T, bias, f, sh, F, zin, zp, lo, hi, raw);
            if (M == 0) return;
            bm::linear(reinterpret_cast<const uint8_t*>(x), M, ldx, w, e, reinterpret_cast<void*>(out), w.N);
        },
        py::call_guard<py::gil_scoped_release>(),
        "x uint8 codes [M, K] -> out uint8 codes [M, N], or (raw) the four maxima int32 [M, 4, N].");

    m.def(
        "bm_conv2d",
        [](uintptr_t x, int64_t B, int64_t C, int64_t H, int64_t W, const Packed& w, int64_t kh, int64_t kw, int64_t sh,
           int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw, int64_t groups, uintptr_t L, uintptr_t T,
           uintptr_t bias, int f, int esh, int F, int zin, int zp, int lo, int hi, bool raw, uintptr_t out) {
            const char* what = "bm_conv2d";
            require(B >= 0 && C >= 1 && H >= 1 && W >= 1, what, "bad input shape");
            require(sh >= 1 && sw >= 1 && dh >= 1 && dw >= 1 && ph >= 0 && pw >= 0 && kh >= 1 && kw >= 1 && groups >= 1,
                    what, "bad stride / padding / dilation / kernel size");
            require(C % groups == 0, what, "channels not divisible by groups");
            require(w.G == groups && w.K == kh * kw * (C / groups), what,
                    "weight does not match the input channels / groups / kernel size");
            require((x != 0 && out != 0) || B == 0, what, "null buffer");
            bm::ConvGeom gm{B, C, H, W, kh, kw, sh, sw, ph, pw, dh, dw, 0, 0, groups};
            gm.Ho = wb::conv_out_size(H, kh, sh, ph, dh);
            gm.Wo = wb::conv_out_size(W, kw, sw, pw, dw);
            require(gm.Ho >= 1 && gm.Wo >= 1, what, "empty output");
            const bm::Epi e = make_bm_epi(what, L, T, bias, f, esh, F, zin, zp, lo, hi, raw);
            if (B == 0) return;
            bm::conv2d(reinterpret_cast<const uint8_t*>(x), gm, w, e, reinterpret_cast<void*>(out));
        },
        py::call_guard<py::gil_scoped_release>(),
        "x uint8 NHWC [B, H, W, C] -> out uint8 NHWC [B, Ho, Wo, N], or (raw) int32 [B*Ho*Wo, 4, N].");

    m.def(
        "bm_f32_maxplus",
        [](uintptr_t X, int64_t M, int64_t K, int64_t ldx, uintptr_t V, int64_t N, uintptr_t Y, uintptr_t I) {
            const char* what = "bm_f32_maxplus";
            require(M >= 0 && N >= 1 && K >= 1, what, "bad shape");
            require(ldx >= K, what, "row stride " + std::to_string(ldx) + " < K = " + std::to_string(K));
            require((X != 0 || M == 0) && V != 0 && (Y != 0 || M == 0), what, "null buffer");
            if (M == 0) return;
            bm::f32_maxplus(reinterpret_cast<const float*>(X), M, K, ldx, reinterpret_cast<const float*>(V), N,
                            reinterpret_cast<float*>(Y), reinterpret_cast<int32_t*>(I));
        },
        py::call_guard<py::gil_scoped_release>(),
        "Y[m, n] = max_k X[m, k] + V[n, k] (float32), I[m, n] = first argmax (int32; skipped when I_ptr is 0).");

    m.def(
        "bm_f32_maxplus_backward",
        [](uintptr_t I, uintptr_t G, int64_t M, int64_t N, int64_t K, uintptr_t gX, uintptr_t gV) {
            const char* what = "bm_f32_maxplus_backward";
            require(M >= 0 && N >= 1 && K >= 1, what, "bad shape");
            require((I != 0 && G != 0) || M == 0, what, "null buffer");
            bm::f32_maxplus_backward(reinterpret_cast<const int32_t*>(I), reinterpret_cast<const float*>(G), M, N, K,
                                     reinterpret_cast<float*>(gX), reinterpret_cast<float*>(gV));
        },
        py::call_guard<py::gil_scoped_release>(),
        "gX[m, I[m, n]] += G[m, n] and gV[n, I[m, n]] += G[m, n] (zero-filled float32 outputs; 0 = skip).");
}

}  // namespace lowbit
