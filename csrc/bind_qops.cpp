// Python binding of the pooling and residual-add kernels on uint8 codes (qops.h). Raw pointers: the
// torch-facing checks are in lowbit.kernels.native; everything that could make the C++ side read or
// write out of bounds is checked here again and raises ValueError.
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "bind_checks.h"
#include "qops.h"
#include "quantize.h"

namespace py = pybind11;

namespace lowbit {

namespace {

void require(bool cond, const std::string& msg) {
    if (!cond) throw std::invalid_argument(msg);
}

int64_t pool_out(int64_t n, int64_t k, int64_t s, int64_t p, int64_t d, bool ceil_mode) {
    const int64_t span = n + 2 * p - d * (k - 1) - 1;
    int64_t o = (span + (ceil_mode ? s - 1 : 0)) / s + 1;
    if (ceil_mode && (o - 1) * s >= n + p) --o;
    return o;
}

}  // namespace

qops::PoolShape check_pool2d(py::tuple in_shape, py::tuple out_hw, py::tuple geom, bool fixed, int op, int zp,
                             bool ceil_mode) {
    require(in_shape.size() == 4 && out_hw.size() == 2 && geom.size() == 8, "bad shape tuples");
    qops::PoolShape s;
    s.b = in_shape[0].cast<int64_t>();
    s.c = in_shape[1].cast<int64_t>();
    s.h = in_shape[2].cast<int64_t>();
    s.w = in_shape[3].cast<int64_t>();
    s.ho = out_hw[0].cast<int64_t>();
    s.wo = out_hw[1].cast<int64_t>();
    int64_t* g[8] = {&s.kh, &s.kw, &s.sh, &s.sw, &s.ph, &s.pw, &s.dh, &s.dw};
    for (int i = 0; i < 8; ++i) *g[i] = geom[static_cast<size_t>(i)].cast<int64_t>();
    s.fixed = fixed;
    require(op == 0 || op == 1, "pool op must be 0 (max) or 1 (average)");
    require(s.b >= 0 && s.c >= 1 && s.h >= 1 && s.w >= 1 && s.ho >= 1 && s.wo >= 1, "bad pooling shape");
    require(zp >= 0 && zp <= 255, "zero point must be in [0, 255]");
    if (fixed) {
        require(s.kh >= 1 && s.kw >= 1 && s.sh >= 1 && s.sw >= 1 && s.dh >= 1 && s.dw >= 1 && s.ph >= 0 && s.pw >= 0,
                "kernel, stride and dilation must be >= 1, padding >= 0");
        require(2 * s.ph <= (s.kh - 1) * s.dh + 1 && 2 * s.pw <= (s.kw - 1) * s.dw + 1,
                "padding must be at most half of the (dilated) kernel");
        require(s.ho == pool_out(s.h, s.kh, s.sh, s.ph, s.dh, ceil_mode) &&
                    s.wo == pool_out(s.w, s.kw, s.sw, s.pw, s.dw, ceil_mode),
                "output size does not match the pooling geometry");
    } else {
        require(s.ho <= s.h && s.wo <= s.w, "adaptive pooling to a larger size");
    }
    return s;
}

qops::AddParams check_add(int64_t m_a, int64_t m_b, int rshift, int a_zp, int b_zp, int out_zp, int lo, int hi) {
    require(m_a >= 1 && m_b >= 1 && m_a <= (int64_t(1) << 31) && m_b <= (int64_t(1) << 31),
            "add multipliers must be in [1, 2^31]");
    require(rshift >= 1 && rshift <= 62, "add shift " + std::to_string(rshift) + " outside [1, 62]");
    require(a_zp >= 0 && a_zp <= 255 && b_zp >= 0 && b_zp <= 255, "input zero points must be in [0, 255]");
    require(out_zp >= -(1 << 24) && out_zp <= (1 << 24), "output zero point out of range");
    require(0 <= lo && lo <= hi && hi <= 255, "add clamp must satisfy 0 <= lo <= hi <= 255");
    qops::AddParams p;
    p.m_a = m_a;
    p.m_b = m_b;
    p.rshift = rshift;
    p.a_zp = a_zp;
    p.b_zp = b_zp;
    p.out_zp = out_zp;
    p.lo = lo;
    p.hi = hi;
    return p;
}

void register_qops(py::module_& m) {
    m.def(
        "qops_pool2d",
        [](std::uintptr_t x, py::tuple in_shape, py::tuple out_hw, py::tuple geom, bool fixed, int op, int zp,
           bool nhwc, bool ceil_mode, std::uintptr_t y) {
            qops::PoolShape s = check_pool2d(in_shape, out_hw, geom, fixed, op, zp, ceil_mode);
            require(x != 0 && y != 0, "null pointer");
            if (s.b == 0) return;
            py::gil_scoped_release rel;
            qops::pool2d(reinterpret_cast<const uint8_t*>(x), reinterpret_cast<uint8_t*>(y), s,
                         static_cast<qops::PoolOp>(op), zp, nhwc);
        },
        py::arg("x"), py::arg("in_shape"), py::arg("out_hw"), py::arg("geometry"), py::arg("fixed"), py::arg("op"),
        py::arg("zp"), py::arg("nhwc"), py::arg("ceil_mode"), py::arg("y"),
        "Max / average pooling of uint8 codes; geometry = (kh, kw, sh, sw, ph, pw, dh, dw).");

    m.def(
        "qops_add",
        [](std::uintptr_t a, std::uintptr_t b, std::uintptr_t out, int64_t n, int64_t m_a, int64_t m_b, int rshift,
           int a_zp, int b_zp, int out_zp, int lo, int hi) {
            require(n >= 0, "negative element count");
            require(n == 0 || (a != 0 && b != 0 && out != 0), "null pointer");
            qops::AddParams p = check_add(m_a, m_b, rshift, a_zp, b_zp, out_zp, lo, hi);
            py::gil_scoped_release rel;
            qops::add_u8(reinterpret_cast<const uint8_t*>(a), reinterpret_cast<const uint8_t*>(b),
                         reinterpret_cast<uint8_t*>(out), n, p);
        },
        py::arg("a"), py::arg("b"), py::arg("out"), py::arg("n"), py::arg("m_a"), py::arg("m_b"), py::arg("rshift"),
        py::arg("a_zp"), py::arg("b_zp"), py::arg("out_zp"), py::arg("lo"), py::arg("hi"),
        "Residual add of uint8 codes, one rounding (see csrc/qops.h).");
    m.def(
        "quant_f32_u8",
        [](std::uintptr_t x, std::uintptr_t out, int64_t rows, int64_t cols, std::uintptr_t scale, bool per_row,
           int zp, int lo, int hi) {
            require(rows >= 0 && cols >= 0, "negative size");
            require(rows * cols == 0 || (x != 0 && out != 0 && scale != 0), "null pointer");
            require(zp >= -(1 << 24) && zp <= (1 << 24), "zero point out of range");
            require(0 <= lo && lo <= hi && hi <= 255, "clamp must satisfy 0 <= lo <= hi <= 255");
            const float* s = reinterpret_cast<const float*>(scale);
            const int64_t ns = per_row ? rows : 1;
            for (int64_t i = 0; i < ns && rows * cols > 0; ++i)
                require(std::isfinite(s[i]) && s[i] > 0.f, "scales must be finite and positive");
            quant::QuantParams p;
            p.scale = s;
            p.per_row = per_row;
            p.zp = static_cast<float>(zp);
            p.lo = static_cast<float>(lo);
            p.hi = static_cast<float>(hi);
            py::gil_scoped_release rel;
            quant::quantize_u8(reinterpret_cast<const float*>(x), reinterpret_cast<uint8_t*>(out), rows, cols, p);
        },
        py::arg("x"), py::arg("out"), py::arg("rows"), py::arg("cols"), py::arg("scale"), py::arg("per_row"),
        py::arg("zp"), py::arg("lo"), py::arg("hi"),
        "float32 -> uint8 codes clamp(round(x / scale) + zp, lo, hi), per tensor or per row (csrc/quantize.h).");
}

}  // namespace lowbit
