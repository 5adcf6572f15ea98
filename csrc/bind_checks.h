#pragma once
// Argument checks shared by the kernel bindings (bind_int8.cpp, bind_qops.cpp) and the plan runner's
// binding (bind_plan.cpp): each turns the flat Python arguments of one kernel call (data pointers as
// integers) into the validated C++ call, or throws std::invalid_argument (a Python ValueError) naming
// the problem. Everything that could make a kernel read or write out of bounds and can be checked from
// the arguments is checked here.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <vector>

#include "int8_common.h"
#include "qops.h"
#include "w46.h"

namespace lowbit {

// One int8 convolution (NHWC uint8 input, NHWC output), checked.
struct ConvCall {
    int8::ConvShape s;
    int32_t zp = 0;
    std::vector<const int8::Packed*> ws;  // empty: depthwise (dw)
    const int8_t* dw = nullptr;
    const int32_t* bias = nullptr;
    int8::Epi e;
    int64_t out_elem_size() const;  // bytes per output element (by epilogue kind)
    void run(const uint8_t* x) const;  // call without the GIL
};

ConvCall check_int8_conv2d(std::uintptr_t x, pybind11::tuple in_shape, int x_zp, pybind11::list weights,
                           std::uintptr_t dw_weight, int64_t n, pybind11::tuple kernel, pybind11::tuple stride,
                           pybind11::tuple padding, pybind11::tuple dilation, int64_t groups, std::uintptr_t bias,
                           int kind, std::uintptr_t out, std::uintptr_t m0, std::uintptr_t rshift, int out_zp,
                           int qmin, int qmax, std::uintptr_t scale, std::uintptr_t fbias, std::uintptr_t add_res,
                           int64_t add_m_a, int64_t add_m_b, int add_rshift, int add_r_zp, int add_out_zp, int add_lo,
                           int add_hi);

// One int8 GEMM on dense rows x [m, k] (row stride ldx), checked.
struct GemmCall {
    int64_t m = 0, k = 0, ldx = 0;
    int32_t zp = 0;
    const int8::Packed* w = nullptr;
    const int32_t* bias = nullptr;
    int8::Epi e;
    void run(const uint8_t* x) const;  // call without the GIL
};

GemmCall check_int8_gemm(std::uintptr_t x, int64_t mrows, int64_t k, int64_t ldx, int x_zp, const int8::Packed& w,
                         std::uintptr_t bias, int kind, std::uintptr_t out, std::uintptr_t m0, std::uintptr_t rshift,
                         int out_zp, int qmin, int qmax, std::uintptr_t scale, std::uintptr_t fbias);

// Pooling of uint8 codes: in_shape (b, c, h, w), out_hw, geometry (kh, kw, sh, sw, ph, pw, dh, dw).
qops::PoolShape check_pool2d(pybind11::tuple in_shape, pybind11::tuple out_hw, pybind11::tuple geom, bool fixed,
                             int op, int zp, bool ceil_mode);

// The epilogue of a 4.6-bit call over `rows` output rows of w.N channels (epilogue.h's check_epilogue,
// the accumulator bound with the bias and the activation zero point x_zp; < 0: K_x), checked.
wb::Epi check_w46_epi(const char* what, int epi, std::uintptr_t p0, std::uintptr_t p1, int32_t zp, int32_t qmin,
                      int32_t qmax, const w46::Packed& w, std::uintptr_t bias, std::uintptr_t out, int64_t rows,
                      int x_zp);

qops::AddParams check_add(int64_t m_a, int64_t m_b, int rshift, int a_zp, int b_zp, int out_zp, int lo, int hi);

}  // namespace lowbit
