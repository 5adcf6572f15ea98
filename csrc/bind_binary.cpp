// Python binding of the binary kernels (registered into lowbit._native by module.cpp).
// Raw buffers: lowbit/kernels/binary.py checks dtypes, shapes and contiguity and passes data pointers.
// Everything that can be checked from the arguments is checked here too (null pointers, shapes, the
// epilogue: epilogue.h's check_epilogue) and raises ValueError before any work. Every call releases
// the GIL.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "binary.h"
#include "epilogue.h"

namespace py = pybind11;

namespace lowbit {

namespace {

constexpr unsigned kBinaryEpilogues =
    epi_mask(EpiKind::none) | epi_mask(EpiKind::float_out) | epi_mask(EpiKind::bits);

void require(bool ok, const char* what, const std::string& msg) {
    if (!ok) throw std::invalid_argument(std::string(what) + ": " + msg);
}

wb::Epi checked_epi(const char* what, int epi, uintptr_t p0, uintptr_t p1, int64_t n, uintptr_t out, int64_t rows) {
    EpiArgs a;
    a.kind = epi;
    a.p0 = p0;
    a.p1 = p1;
    check_epilogue(what, a, n, kBinaryEpilogues);
    require(out != 0 || rows == 0, what, "null output pointer");
    return wb::make_epi(epi, p0, p1, 0, 0, 0);
}

}  // namespace

void register_binary(py::module_& m) {
    using binary::Packed;
    py::class_<Packed, std::shared_ptr<Packed>>(m, "BinaryPacked", "±1 weights bit-packed for the native kernels")
        .def_readonly("N", &Packed::N)
        .def_readonly("KW", &Packed::KW)
        .def_readonly("K", &Packed::Kbits)
        .def_readonly("groups", &Packed::G)
        .def_readonly("seg_words", &Packed::seg_words)
        .def_readonly("seg_bits", &Packed::seg_bits);

    m.def(
        "binary_pack",
        [](uintptr_t w, int64_t N, int64_t KW, int64_t seg_words, int64_t seg_bits, int64_t groups) {
            require(N >= 1 && KW >= 1, "binary_pack", "empty weight");
            require(w != 0, "binary_pack", "null weight pointer");
            require(N < (int64_t(1) << 31) && KW < (int64_t(1) << 25), "binary_pack", "weight matrix too large");
            return binary::pack(reinterpret_cast<const uint64_t*>(w), N, KW, seg_words, seg_bits, groups);
        },
        py::arg("w_ptr"), py::arg("N"), py::arg("KW"), py::arg("seg_words"), py::arg("seg_bits"), py::arg("groups") = 1,
        py::call_guard<py::gil_scoped_release>(),
        "Pack weight words [N, KW]: rows of KW/seg_words segments, seg_bits valid bits each.");

    m.def("binary_path", []() { return std::string(binary::active_path()); },
          "Kernel path the binary ops use now (portable, avx2, avx512bw, avx512_vpopcntdq).");

    m.def(
        "binary_linear",
        [](uintptr_t x, int64_t M, int64_t ldx, const Packed& w, int epi, uintptr_t p0, uintptr_t p1, uintptr_t out) {
            const char* what = "binary_linear";
            require(M >= 0, what, "negative row count");
            require(ldx >= w.KW, what, "row stride " + std::to_string(ldx) + " < " + std::to_string(w.KW) + " words");
            require(x != 0 || M == 0, what, "null activation pointer");
            const wb::Epi e = checked_epi(what, epi, p0, p1, w.N, out, M);
            if (M == 0) return;
            wb::Out o;
            o.ptr = reinterpret_cast<void*>(out);
            o.ldo = epi == wb::EPI_BITS ? (w.N + 63) / 64 : w.N;
            binary::linear(reinterpret_cast<const uint64_t*>(x), M, ldx, w, e, o);
        },
        py::call_guard<py::gil_scoped_release>(),
        "x words [M, KW] -> out: epi (epilogue.h) 0 int32 [M, N], 1 float [M, N], 4 bits [M, ceil(N/64)] "
        "(zero-filled).");

    m.def(
        "binary_conv2d",
        [](uintptr_t x, int64_t B, int64_t C, int64_t H, int64_t W, const Packed& w, int64_t kh, int64_t kw, int64_t sh,
           int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw, int64_t groups, int pad_value, int epi,
           uintptr_t p0, uintptr_t p1, uintptr_t out) {
            const char* what = "binary_conv2d";
            require(B >= 0 && C >= 1 && H >= 1 && W >= 1, what, "bad input shape");
            require(sh >= 1 && sw >= 1 && dh >= 1 && dw >= 1 && ph >= 0 && pw >= 0 && kh >= 1 && kw >= 1 && groups >= 1,
                    what, "bad stride / padding / dilation / kernel size");
            require(pad_value == 1 || pad_value == -1, what, "pad_value must be +1 or -1");
            require(x != 0 || B == 0, what, "null input pointer");
            binary::ConvGeom gm{B, C, H, W, kh, kw, sh, sw, ph, pw, dh, dw, 0, 0, groups, pad_value};
            gm.Ho = wb::conv_out_size(H, kh, sh, ph, dh);
            gm.Wo = wb::conv_out_size(W, kw, sw, pw, dw);
            require(gm.Ho >= 1 && gm.Wo >= 1, what, "empty output");
            const wb::Epi e = checked_epi(what, epi, p0, p1, w.N, out, B * gm.Ho * gm.Wo);
            if (B == 0) return;
            wb::Out o;
            o.ptr = reinterpret_cast<void*>(out);
            // bits: [B, Ho, Wo, ceil(N/64)] words; else [B, Ho, Wo, N]: NCHW semantics, channels_last memory
            o.ldo = epi == wb::EPI_BITS ? (w.N + 63) / 64 : w.N;
            binary::conv2d(reinterpret_cast<const uint64_t*>(x), gm, w, e, o);
        },
        py::call_guard<py::gil_scoped_release>(),
        "x words [B, H, W, groups, ceil(C/groups/64)] -> int32/float [B, Ho, Wo, N], or bits [B, Ho, Wo, ceil(N/64)].");

    m.def(
        "pack_bits_u8",
        [](uintptr_t src, int64_t R, int64_t K, int64_t lds, uintptr_t dst) {
            const char* what = "pack_bits_u8";
            require(R >= 0 && K >= 0, what, "negative shape");
            require(lds >= K, what, "row stride " + std::to_string(lds) + " < K = " + std::to_string(K));
            require((src != 0 && dst != 0) || R * K == 0, what, "null pointer");
            if (R * K == 0) return;
            binary::pack_bits_u8(reinterpret_cast<const uint8_t*>(src), R, K, lds, reinterpret_cast<uint64_t*>(dst));
        },
        py::call_guard<py::gil_scoped_release>(), "0/1 bytes [R, K] (row stride lds) -> words [R, ceil(K/64)].");
}

}  // namespace lowbit
