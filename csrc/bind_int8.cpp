// Python binding of the int8 kernels (registered into lowbit._native by module.cpp).
//
// Raw buffers only: lowbit.kernels.native checks dtypes/shapes/contiguity of the torch tensors and
// passes data pointers (as integers). Everything that could make the C++ side read or write out of
// bounds and can be checked from the arguments (sizes against the packed weights, zero points,
// shift ranges, clamp ranges, null pointers) is checked here too and raises ValueError.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "bind_checks.h"
#include "cpu_features.h"
#include "epilogue.h"
#include "int8_common.h"

namespace py = pybind11;

namespace lowbit {

namespace {

using int8::Packed;

template <class T>
const T* cptr(std::uintptr_t p) {
    return reinterpret_cast<const T*>(p);
}

// The message is only built when the check fails.
#define LB_REQUIRE(cond, msg)                                   \
    do {                                                        \
        if (!(cond)) throw std::invalid_argument(msg);          \
    } while (0)

// Builds and validates the epilogue for `n` output channels starting at 0 (kinds: epilogue.h).
int8::Epi make_epi(int kind, std::uintptr_t out, int64_t rows, int64_t ldo, int64_t n, std::uintptr_t m0,
                   std::uintptr_t rshift, int out_zp, int qmin, int qmax, std::uintptr_t scale, std::uintptr_t fbias) {
    EpiArgs a;
    a.kind = kind;
    const bool requant = kind == static_cast<int>(EpiKind::requant_u8) || kind == static_cast<int>(EpiKind::requant_s8);
    a.p0 = requant ? m0 : scale;
    a.p1 = requant ? rshift : fbias;
    a.zp = out_zp;
    a.qmin = qmin;
    a.qmax = qmax;
    check_epilogue("int8", a, n, epi_mask(EpiKind::none) | epi_mask(EpiKind::float_out) |
                                     epi_mask(EpiKind::requant_u8) | epi_mask(EpiKind::requant_s8));
    LB_REQUIRE(out != 0 || rows * n == 0, "null output pointer");
    int8::Epi e;
    e.kind = static_cast<EpiKind>(kind);
    e.out = reinterpret_cast<void*>(out);
    e.ldo = ldo;
    if (requant) {
        e.m0 = cptr<int32_t>(m0);
        e.rshift = cptr<int32_t>(rshift);
        e.out_zp = out_zp;
        e.qmin = qmin;
        e.qmax = qmax;
    } else if (e.kind == EpiKind::float_out) {
        e.scale = cptr<float>(scale);
        e.fbias = fbias ? cptr<float>(fbias) : nullptr;
    }
    return e;
}

void check_zp(int x_zp) { LB_REQUIRE(x_zp >= 0 && x_zp <= 255, "activation zero point must be in [0, 255]"); }

}  // namespace

int64_t ConvCall::out_elem_size() const {
    return (e.kind == EpiKind::requant_u8 || e.kind == EpiKind::requant_s8) ? 1 : 4;
}

void ConvCall::run(const uint8_t* x) const {
    if (ws.empty())
        int8::conv2d_depthwise(x, s, zp, dw, bias, e);
    else
        int8::conv2d_gemm(x, s, zp, ws, bias, e);
}

void GemmCall::run(const uint8_t* x) const {
    int8::DenseRows rows;
    rows.k = k;
    rows.x = x;
    rows.ld = ldx;
    int8::gemm(rows, m, zp, *w, bias, e);
}

GemmCall check_int8_gemm(std::uintptr_t x, int64_t mrows, int64_t k, int64_t ldx, int x_zp, const Packed& w,
                         std::uintptr_t bias, int kind, std::uintptr_t out, std::uintptr_t m0, std::uintptr_t rshift,
                         int out_zp, int qmin, int qmax, std::uintptr_t scale, std::uintptr_t fbias) {
    LB_REQUIRE(mrows >= 0, "negative row count");
    LB_REQUIRE(k == w.k, "activations have K = " + std::to_string(k) + ", the packed weights K = " +
                          std::to_string(w.k));
    LB_REQUIRE(ldx >= k, "activation row stride smaller than K");
    LB_REQUIRE(x != 0 || mrows * k == 0, "null activation pointer");
    check_zp(x_zp);
    GemmCall g;
    g.e = make_epi(kind, out, mrows, w.n, w.n, m0, rshift, out_zp, qmin, qmax, scale, fbias);
    check_acc_bound("int8_gemm", 255, w.l1.data(), cptr<int32_t>(bias), w.n);
    g.m = mrows;
    g.k = k;
    g.ldx = ldx;
    g.zp = x_zp;
    g.w = &w;
    g.bias = cptr<int32_t>(bias);
    return g;
}

ConvCall check_int8_conv2d(std::uintptr_t x, py::tuple in_shape, int x_zp, py::list weights, std::uintptr_t dw_weight,
                           int64_t n, py::tuple kernel, py::tuple stride, py::tuple padding, py::tuple dilation,
                           int64_t groups, std::uintptr_t bias, int kind, std::uintptr_t out, std::uintptr_t m0,
                           std::uintptr_t rshift, int out_zp, int qmin, int qmax, std::uintptr_t scale,
                           std::uintptr_t fbias, std::uintptr_t add_res, int64_t add_m_a, int64_t add_m_b,
                           int add_rshift, int add_r_zp, int add_out_zp, int add_lo, int add_hi) {
    LB_REQUIRE(in_shape.size() == 4 && kernel.size() == 2 && stride.size() == 2 && padding.size() == 2 &&
                   dilation.size() == 2,
               "shape tuples have the wrong length");
    ConvCall c;
    int8::ConvShape& s = c.s;
    s.b = in_shape[0].cast<int64_t>();
    s.c = in_shape[1].cast<int64_t>();
    s.h = in_shape[2].cast<int64_t>();
    s.w = in_shape[3].cast<int64_t>();
    s.n = n;
    s.kh = kernel[0].cast<int64_t>();
    s.kw = kernel[1].cast<int64_t>();
    s.sh = stride[0].cast<int64_t>();
    s.sw = stride[1].cast<int64_t>();
    s.ph = padding[0].cast<int64_t>();
    s.pw = padding[1].cast<int64_t>();
    s.dh = dilation[0].cast<int64_t>();
    s.dw = dilation[1].cast<int64_t>();
    s.groups = groups;
    LB_REQUIRE(s.b >= 0 && s.c >= 1 && s.h >= 1 && s.w >= 1 && s.n >= 1, "bad conv input/output shape");
    LB_REQUIRE(s.kh >= 1 && s.kw >= 1 && s.sh >= 1 && s.sw >= 1 && s.dh >= 1 && s.dw >= 1 && s.ph >= 0 && s.pw >= 0,
               "kernel, stride and dilation must be >= 1, padding >= 0");
    LB_REQUIRE(groups >= 1 && s.c % groups == 0 && s.n % groups == 0, "groups must divide the input and output channels");
    s.ho = (s.h + 2 * s.ph - s.dh * (s.kh - 1) - 1) / s.sh + 1;
    s.wo = (s.w + 2 * s.pw - s.dw * (s.kw - 1) - 1) / s.sw + 1;
    LB_REQUIRE(s.h + 2 * s.ph >= s.dh * (s.kh - 1) + 1 && s.w + 2 * s.pw >= s.dw * (s.kw - 1) + 1,
               "the (dilated) kernel is larger than the padded input");
    LB_REQUIRE(x != 0 || s.b == 0, "null input pointer");
    check_zp(x_zp);
    c.zp = x_zp;
    c.bias = cptr<int32_t>(bias);
    int8::Epi& e = c.e;
    e = make_epi(kind, out, s.b * s.ho * s.wo, s.n, s.n, m0, rshift, out_zp, qmin, qmax, scale, fbias);
    if (add_res) {  // fused residual add (csrc/int8_common.h, Epi::add_res)
        LB_REQUIRE(e.kind == EpiKind::requant_u8, "a fused residual add needs a uint8 requantizing epilogue");
        LB_REQUIRE(out_zp >= 0 && out_zp <= 255, "a fused residual add needs an output zero point in [0, 255]");
        LB_REQUIRE(add_m_a >= 1 && add_m_b >= 1 && add_m_a <= (int64_t(1) << 31) && add_m_b <= (int64_t(1) << 31),
                   "residual add multipliers must be in [1, 2^31]");
        LB_REQUIRE(add_rshift >= 1 && add_rshift <= 62, "residual add shift outside [1, 62]");
        LB_REQUIRE(add_r_zp >= 0 && add_r_zp <= 255, "residual zero point must be in [0, 255]");
        LB_REQUIRE(add_out_zp >= -(1 << 24) && add_out_zp <= (1 << 24), "residual add output zero point out of range");
        LB_REQUIRE(0 <= add_lo && add_lo <= add_hi && add_hi <= 255, "residual add clamp must be within [0, 255]");
        e.add_res = cptr<uint8_t>(add_res);
        e.add.m_a = add_m_a;
        e.add.m_b = add_m_b;
        e.add.rshift = add_rshift;
        e.add.a_zp = out_zp;
        e.add.b_zp = add_r_zp;
        e.add.out_zp = add_out_zp;
        e.add.lo = add_lo;
        e.add.hi = add_hi;
    }
    const int64_t cg = s.c / groups, ng = s.n / groups;
    if (weights.size() == 0) {
        LB_REQUIRE(groups == s.c && s.n == s.c && dw_weight != 0,
                   "depthwise path needs groups == in == out channels and a weight pointer");
        const int64_t taps = s.kh * s.kw;
        std::vector<int64_t> l1(static_cast<size_t>(s.c), 0);
        const int8_t* dw = cptr<int8_t>(dw_weight);
        for (int64_t i = 0; i < s.c * taps; ++i) l1[static_cast<size_t>(i / taps)] += dw[i] < 0 ? -dw[i] : dw[i];
        check_acc_bound("int8_conv2d", 255, l1.data(), c.bias, s.c);
        c.dw = dw;
        return c;
    }
    LB_REQUIRE(static_cast<int64_t>(weights.size()) == groups, "need one packed weight per group");
    for (auto h : weights) {
        const Packed& p = h.cast<const Packed&>();
        // K order (kh, kw, c); with groups == 1 each kernel row may be padded to a multiple of 4
        const int64_t kpadded = s.kh * ((s.kw * cg + 3) / 4 * 4);
        LB_REQUIRE(p.n == ng && (p.k == s.kh * s.kw * cg || (groups == 1 && p.k == kpadded)),
                   "packed group weight has shape [" + std::to_string(p.n) + ", " + std::to_string(p.k) +
                       "], expected [" + std::to_string(ng) + ", " + std::to_string(s.kh * s.kw * cg) + "]");
        const int32_t* bg = bias ? c.bias + static_cast<int64_t>(c.ws.size()) * ng : nullptr;
        check_acc_bound("int8_conv2d", 255, p.l1.data(), bg, ng);
        c.ws.push_back(&p);
    }
    return c;
}

void register_int8(py::module_& m) {
    py::class_<Packed>(m, "Int8Weights", "int8 weights [n, k] packed for lowbit's int8 GEMM kernels")
        .def_readonly("n", &Packed::n)
        .def_readonly("k", &Packed::k)
        .def_property_readonly("nbytes", &Packed::nbytes)
        .def("colsum", [](const Packed& p) {
            py::list l;
            for (int64_t i = 0; i < p.n; ++i) l.append(p.colsum[static_cast<size_t>(i)]);
            return l;
        })
        .def("__repr__", [](const Packed& p) {
            return "<lowbit Int8Weights n=" + std::to_string(p.n) + " k=" + std::to_string(p.k) + ">";
        });

    m.def(
        "int8_pack",
        [](std::uintptr_t w, int64_t n, int64_t k) {
            LB_REQUIRE(n >= 0 && k >= 0, "negative weight shape");
            LB_REQUIRE(w != 0 || n * k == 0, "null weight pointer");
            LB_REQUIRE(k < (int64_t(1) << 31) && n < (int64_t(1) << 31), "weight matrix too large");
            std::unique_ptr<Packed> p;
            {
                py::gil_scoped_release rel;
                p = int8::pack(cptr<int8_t>(w), n, k, k);
            }
            check_acc_bound("int8_pack", 255, p->l1.data(), nullptr, n);
            return p;
        },
        py::arg("w"), py::arg("n"), py::arg("k"), "Pack int8 weights [n, k] (row-major, contiguous).");

    m.def("int8_isa", []() { return std::string(isa_name(int8::int8_isa())); },
          "Kernel family the int8 ops use under the current ISA cap: portable, avx2 or vnni.");

    m.def(
        "int8_gemm",
        [](std::uintptr_t x, int64_t mrows, int64_t k, int64_t ldx, int x_zp, const Packed& w, std::uintptr_t bias,
           int kind, std::uintptr_t out, std::uintptr_t m0, std::uintptr_t rshift, int out_zp, int qmin, int qmax,
           std::uintptr_t scale, std::uintptr_t fbias) {
            GemmCall g = check_int8_gemm(x, mrows, k, ldx, x_zp, w, bias, kind, out, m0, rshift, out_zp, qmin, qmax,
                                         scale, fbias);
            if (mrows == 0 || w.n == 0) return;
            py::gil_scoped_release rel;
            g.run(cptr<uint8_t>(x));
        },
        py::arg("x"), py::arg("m"), py::arg("k"), py::arg("ldx"), py::arg("x_zp"), py::arg("w"), py::arg("bias"),
        py::arg("kind"), py::arg("out"), py::arg("m0"), py::arg("rshift"), py::arg("out_zp"), py::arg("qmin"),
        py::arg("qmax"), py::arg("scale"), py::arg("fbias"),
        "out[m, n] = epi(sum_k (x[m, k] - x_zp) * w[n, k] + bias[n]); pointers as integers (0 = none).");

    // Convolution on NHWC uint8 input; output NHWC [b, ho, wo, n]. `weights`: one Int8Weights per group
    // with K order (kh, kw, c/groups), or an empty list with `dw_weight` (int8 [c, kh, kw]) for depthwise.
    m.def(
        "int8_conv2d",
        [](std::uintptr_t x, py::tuple in_shape, int x_zp, py::list weights, std::uintptr_t dw_weight, int64_t n,
           py::tuple kernel, py::tuple stride, py::tuple padding, py::tuple dilation, int64_t groups,
           std::uintptr_t bias, int kind, std::uintptr_t out, std::uintptr_t m0, std::uintptr_t rshift, int out_zp,
           int qmin, int qmax, std::uintptr_t scale, std::uintptr_t fbias, std::uintptr_t add_res, int64_t add_m_a,
           int64_t add_m_b, int add_rshift, int add_r_zp, int add_out_zp, int add_lo, int add_hi) {
            ConvCall c = check_int8_conv2d(x, in_shape, x_zp, weights, dw_weight, n, kernel, stride, padding,
                                           dilation, groups, bias, kind, out, m0, rshift, out_zp, qmin, qmax, scale,
                                           fbias, add_res, add_m_a, add_m_b, add_rshift, add_r_zp, add_out_zp, add_lo,
                                           add_hi);
            if (c.s.b == 0) return;
            py::gil_scoped_release rel;
            c.run(cptr<uint8_t>(x));
        },
        py::arg("x"), py::arg("in_shape"), py::arg("x_zp"), py::arg("weights"), py::arg("dw_weight"), py::arg("n"),
        py::arg("kernel"), py::arg("stride"), py::arg("padding"), py::arg("dilation"), py::arg("groups"),
        py::arg("bias"), py::arg("kind"), py::arg("out"), py::arg("m0"), py::arg("rshift"), py::arg("out_zp"),
        py::arg("qmin"), py::arg("qmax"), py::arg("scale"), py::arg("fbias"), py::arg("add_res") = 0,
        py::arg("add_m_a") = 1, py::arg("add_m_b") = 1, py::arg("add_rshift") = 1, py::arg("add_r_zp") = 0,
        py::arg("add_out_zp") = 0, py::arg("add_lo") = 0, py::arg("add_hi") = 255);
}

}  // namespace lowbit
