// Python binding of the binary kernels (registered into lowbit._native by module.cpp).
// Raw buffers: lowbit/kernels/binary.py checks dtypes, shapes and contiguity and passes data pointers.
// Every call releases the GIL.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "binary.h"

namespace py = pybind11;

namespace lowbit {

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
            if (M < 0 || ldx < w.KW) throw std::invalid_argument("binary_linear: bad shape");
            if (epi != wb::EPI_I32 && epi != wb::EPI_F32 && epi != wb::EPI_BITS)
                throw std::invalid_argument("binary_linear: bad epilogue kind");
            wb::Out o;
            o.ptr = reinterpret_cast<void*>(out);
            o.ldo = epi == wb::EPI_BITS ? (w.N + 63) / 64 : w.N;
            binary::linear(reinterpret_cast<const uint64_t*>(x), M, ldx, w, wb::make_epi(epi, p0, p1, 0, 0, 0), o);
        },
        py::call_guard<py::gil_scoped_release>(),
        "x words [M, KW] -> out: epi 0 int32 [M, N], 1 float [M, N], 4 bits [M, ceil(N/64)] (zero-filled).");

    m.def(
        "binary_conv2d",
        [](uintptr_t x, int64_t B, int64_t C, int64_t H, int64_t W, const Packed& w, int64_t kh, int64_t kw, int64_t sh,
           int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw, int64_t groups, int pad_value, int epi,
           uintptr_t p0, uintptr_t p1, uintptr_t out) {
            if (epi != wb::EPI_I32 && epi != wb::EPI_F32 && epi != wb::EPI_BITS)
                throw std::invalid_argument("binary_conv2d: bad epilogue kind");
            if (sh < 1 || sw < 1 || dh < 1 || dw < 1 || ph < 0 || pw < 0 || kh < 1 || kw < 1 || groups < 1)
                throw std::invalid_argument("binary_conv2d: bad stride / padding / dilation / kernel size");
            binary::ConvGeom gm{B, C, H, W, kh, kw, sh, sw, ph, pw, dh, dw, 0, 0, groups, pad_value};
            gm.Ho = wb::conv_out_size(H, kh, sh, ph, dh);
            gm.Wo = wb::conv_out_size(W, kw, sw, pw, dw);
            if (gm.Ho < 1 || gm.Wo < 1) throw std::invalid_argument("binary_conv2d: empty output");
            wb::Out o;
            o.ptr = reinterpret_cast<void*>(out);
            if (epi == wb::EPI_BITS) {
                o.ldo = (w.N + 63) / 64;  // [B, Ho, Wo, ceil(N/64)] words
            } else {
                o.ldo = w.N;  // [B, Ho, Wo, N]: NCHW semantics, channels_last memory
            }
            binary::conv2d(reinterpret_cast<const uint64_t*>(x), gm, w, wb::make_epi(epi, p0, p1, 0, 0, 0), o);
        },
        py::call_guard<py::gil_scoped_release>(),
        "x words [B, H, W, groups, ceil(C/groups/64)] -> int32/float [B, Ho, Wo, N], or bits [B, Ho, Wo, ceil(N/64)].");

    m.def(
        "pack_bits_u8",
        [](uintptr_t src, int64_t R, int64_t K, int64_t lds, uintptr_t dst) {
            binary::pack_bits_u8(reinterpret_cast<const uint8_t*>(src), R, K, lds, reinterpret_cast<uint64_t*>(dst));
        },
        py::call_guard<py::gil_scoped_release>(), "0/1 bytes [R, K] (row stride lds) -> words [R, ceil(K/64)].");
}

}  // namespace lowbit
