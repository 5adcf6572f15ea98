#pragma once
// Integer ops on uint8 activation codes (per-tensor scale and zero point): pooling and the residual add.
// Bit-exact with the plain-PyTorch references (lowbit.kernels.reference / lowbit.nn.ops):
//
// - max pool: max over the window's valid input positions (padding never wins; torch's semantics,
//   dilation and ceil_mode included). The scale and zero point are unchanged.
// - average pool, fixed windows: padded positions hold the zero point and count (count_include_pad),
//   divisor kh*kw; adaptive windows [floor(i*H/Ho), ceil((i+1)*H/Ho)), divisor = window size. Output
//   = round-half-up(sum / divisor) = (sum + divisor/2) / divisor in integers.
// - add: out = clamp(((m_a (a - a_zp) + m_b (b - b_zp) + 2^(rshift-1)) >> rshift) + out_zp, lo, hi),
//   64-bit integers, arithmetic shift (one rounding, half up). 1 <= m_a, m_b <= 2^31, 1 <= rshift <= 62.
//
// Layouts: pooling in NHWC (channels innermost) or NCHW; the add is element-wise on two tensors of the
// same layout. Work is split over lowbit's thread pool.
#include <cstdint>

namespace lowbit {
namespace qops {

// Pooling geometry. `fixed`: kernel/stride/padding/dilation windows; otherwise adaptive windows
// (kernel, stride, padding and dilation unused).
struct PoolShape {
    int64_t b = 0, c = 0, h = 0, w = 0, ho = 0, wo = 0;
    int64_t kh = 1, kw = 1, sh = 1, sw = 1, ph = 0, pw = 0, dh = 1, dw = 1;
    bool fixed = true;
};

enum class PoolOp : int { max = 0, avg = 1 };

// y[b, oh, ow, c] (nhwc) or y[b, c, oh, ow] (nchw). zp: the padding value of a fixed average pool.
void pool2d(const uint8_t* x, uint8_t* y, const PoolShape& s, PoolOp op, int32_t zp, bool nhwc);

struct AddParams {
    int64_t m_a = 1, m_b = 1;
    int32_t rshift = 1, a_zp = 0, b_zp = 0, out_zp = 0, lo = 0, hi = 255;
};

// out[i] = add(a[i], b[i]) for i < n (the path by the active ISA: AVX-512, AVX2 or portable).
void add_u8(const uint8_t* a, const uint8_t* b, uint8_t* out, int64_t n, const AddParams& p);
// One element, the specification in int64 (also the portable path's loop body).
inline uint8_t add_one(uint8_t a, uint8_t b, const AddParams& p) {
    const int64_t acc = p.m_a * (int64_t(a) - p.a_zp) + p.m_b * (int64_t(b) - p.b_zp);
    int64_t v = ((acc + (int64_t(1) << (p.rshift - 1))) >> p.rshift) + p.out_zp;
    v = v < p.lo ? p.lo : (v > p.hi ? p.hi : v);
    return static_cast<uint8_t>(v);
}

// The SIMD paths (qops_simd.cpp) work on doubles: every product and sum is an integer below 2^41, so
// it is exact, and floor(acc * 2^-rshift + 0.5) is exact too (its bits span at most 42 places).
void add_u8_avx2(const uint8_t* a, const uint8_t* b, uint8_t* out, int64_t n, const AddParams& p);
void add_u8_avx512(const uint8_t* a, const uint8_t* b, uint8_t* out, int64_t n, const AddParams& p);

}  // namespace qops
}  // namespace lowbit
