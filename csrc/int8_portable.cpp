// Portable int8 GEMM worker: plain C++ over the packed layout, written so that compilers vectorize it
// with the baseline ISA (the int16 dot products below become pmaddwd on x86-64 SSE2, smlal/sdot-like
// sequences on AArch64). Per chunk the activations are converted once to int16 rows (x - x_zp), and
// per packed block the 16 weight columns are de-interleaved to contiguous int16; then each output is
// a plain dot product over K, computed 2 rows x 2 columns at a time (1-3 rows: directly on the packed
// block instead).
#include <algorithm>
#include <cstring>

#include "int8_common.h"

namespace lowbit {
namespace int8 {

namespace {

inline void dot_2x2(const int16_t* x0, const int16_t* x1, const int16_t* y0, const int16_t* y1, int64_t k,
                    int32_t* t0, int32_t* t1) {
    int32_t s00 = 0, s01 = 0, s10 = 0, s11 = 0;
    for (int64_t i = 0; i < k; ++i) {
        s00 += int32_t(x0[i]) * int32_t(y0[i]);
        s01 += int32_t(x0[i]) * int32_t(y1[i]);
        s10 += int32_t(x1[i]) * int32_t(y0[i]);
        s11 += int32_t(x1[i]) * int32_t(y1[i]);
    }
    t0[0] = s00;
    t0[1] = s01;
    t1[0] = s10;
    t1[1] = s11;
}

inline void dot_1x2(const int16_t* x0, const int16_t* y0, const int16_t* y1, int64_t k, int32_t* t0) {
    int32_t s00 = 0, s01 = 0;
    for (int64_t i = 0; i < k; ++i) {
        s00 += int32_t(x0[i]) * int32_t(y0[i]);
        s01 += int32_t(x0[i]) * int32_t(y1[i]);
    }
    t0[0] = s00;
    t0[1] = s01;
}

}  // namespace

void chunk_portable(const GemmJob& j, int64_t m0, int64_t m1, int64_t b0, int64_t b1) {
    const int64_t K = j.a->k, kp = j.w->k4 * kGroupK, rows = m1 - m0;
    int16_t* A = scratch<int16_t>(0, static_cast<size_t>(std::max<int64_t>(1, rows * kp)));
    int32_t* T = scratch<int32_t>(1, static_cast<size_t>(rows * kBlockN));
    uint8_t* rowbuf = scratch<uint8_t>(2, static_cast<size_t>(std::max<int64_t>(K, 1)));
    int16_t* Wc = scratch<int16_t>(3, static_cast<size_t>(std::max<int64_t>(1, kBlockN * kp)));
    for (int64_t r = 0; r < rows; ++r) {
        const uint8_t* x = j.a->row(m0 + r, rowbuf);
        int16_t* d = A + r * kp;
        for (int64_t k = 0; k < K; ++k) d[k] = static_cast<int16_t>(int32_t(x[k]) - j.zp);
        for (int64_t k = K; k < kp; ++k) d[k] = 0;
    }
    for (int64_t b = b0; b < b1; ++b) {
        const int64_t cols = std::min<int64_t>(kBlockN, j.w->n - b * kBlockN);
        const int64_t cpad = (cols + 1) & ~int64_t(1);
        const int8_t* W = j.w->block(b);
        if (rows < 4) {  // too few rows to amortize the de-interleave: straight over the packed block
            for (int64_t r = 0; r < rows; ++r) {
                int32_t acc[kBlockN] = {};
                const int16_t* x = A + r * kp;
                for (int64_t q = 0; q < j.w->k4; ++q) {
                    const int8_t* w = W + q * (kBlockN * kGroupK);
                    const int32_t x0 = x[q * 4], x1 = x[q * 4 + 1], x2 = x[q * 4 + 2], x3 = x[q * 4 + 3];
                    for (int c = 0; c < kBlockN; ++c)
                        acc[c] += x0 * w[c * 4] + x1 * w[c * 4 + 1] + x2 * w[c * 4 + 2] + x3 * w[c * 4 + 3];
                }
                std::memcpy(T + r * kBlockN, acc, sizeof(acc));
            }
            epilogue_scalar(j.epi, T, kBlockN, m0, rows, b * kBlockN, cols, j.corr);
            continue;
        }
        for (int64_t c = 0; c < cpad; ++c)
            for (int64_t q = 0; q < j.w->k4; ++q)
                for (int g = 0; g < kGroupK; ++g)
                    Wc[c * kp + q * kGroupK + g] = W[q * (kBlockN * kGroupK) + c * kGroupK + g];
        int64_t r = 0;
        for (; r + 2 <= rows; r += 2)
            for (int64_t c = 0; c < cpad; c += 2)
                dot_2x2(A + r * kp, A + (r + 1) * kp, Wc + c * kp, Wc + (c + 1) * kp, kp, T + r * kBlockN + c,
                        T + (r + 1) * kBlockN + c);
        if (r < rows)
            for (int64_t c = 0; c < cpad; c += 2)
                dot_1x2(A + r * kp, Wc + c * kp, Wc + (c + 1) * kp, kp, T + r * kBlockN + c);
        epilogue_scalar(j.epi, T, kBlockN, m0, rows, b * kBlockN, cols, j.corr);
    }
}

}  // namespace int8
}  // namespace lowbit
