#pragma once
// Bipolar morphological (BM) kernels (methods.md §4; the scheme is specified in docs/methods.md,
// "BM networks", and by the plain-PyTorch reference lowbit/kernels/bm.py).
//
// Integer path (inference). Log-domain codes of width 8 or 16 bits, MIN = -2^(bits-1) meaning "zero"
// (log of 0). Every valid code is <= 0, so a sum of two codes never exceeds 0 and a sum involving MIN
// saturates to MIN: the max-plus product
//     R[m, n] = max_k sat(a[m, k] + c[n, k])          (sat: clamp to [MIN, MAX], as vpaddsb / vpaddsw)
// needs no overflow handling. A BM layer runs it for the input log codes of each sign (a+, a-) against
// the weight codes of each sign (c+, c-), then the epilogue per output (m, n):
//     E(r) = 0 if r == MIN, else rshift_round(T[r & (2^f - 1)], sh - (r >> f))
//     y    = E(R++) - E(R+-) - E(R-+) + E(R--) + bias[n]                    (int32)
//     q    = clamp(zp + ((y + 2^(F-1)) >> F), lo, hi)                        (uint8 output code)
// with rshift_round(v, s) = (v + 2^(s-1)) >> s (0 once s >= 63). Input uint8 codes x with zero point
// zin become log codes through the 256-entry table L: d = x - zin, a+ = L[d] if d > 0 else MIN,
// a- = L[-d] if d < 0 else MIN. An input with zin == 0 has no negative part: the two a- branches are
// MIN everywhere and are skipped.
//
// Packed weight layout (all paths read the same object): per sign (+, -), per group, panels of NR = 16
// output channels, [KG][NR] dwords; dword (g, c) holds the codes of channel c at k = g*per .. g*per +
// per - 1 (per = 4 int8 codes or 2 int16 codes per dword), padding (k >= K, channel >= Ng) = MIN.
// Activation rows use the same grouping (a row is KG dwords), so a SIMD lane pairs a[k] with c[n, k]:
// the broadcast dword of 4 (2) activation codes meets 16 channels' dwords; lanes hold partial maxima
// over k mod per, reduced at the end of the row.
//
// Float path (training): Y[m, n] = max_k (X[m, k] + V[n, k]) in float32 and, optionally, the first k
// reaching the maximum, I[m, n] (the argmax the hard-max gradient flows to). -inf stands for log 0.
#include <cstdint>
#include <functional>
#include <memory>

#include "wb_common.h"

namespace lowbit {
namespace bm {

constexpr int NR = 16;

struct Packed {
    int64_t N = 0, K = 0, G = 1, Ng = 0, PG = 0, KG = 0;
    int bits = 8, per = 4;
    wb::AlignedBuf buf;
    int32_t min_code() const { return -(1 << (bits - 1)); }
    const int32_t* panel(int sign, int64_t g, int64_t p) const {
        return reinterpret_cast<const int32_t*>(buf.data()) + ((sign * G + g) * PG + p) * KG * NR;
    }
};

// cpos, cneg: [N, K] codes (int16 storage) in [MIN, 0]; conv weights as [N, kh, kw, C/groups].
std::shared_ptr<Packed> pack(const int16_t* cpos, const int16_t* cneg, int64_t N, int64_t K, int64_t groups, int bits);

struct Epi {
    int f = 4, sh = 1, F = 8;
    const int32_t* T = nullptr;     // [2^f]
    const int32_t* bias = nullptr;  // [N] or null
    const int16_t* L = nullptr;     // [256] input log table
    int32_t zin = 0, zp = 0, lo = 0, hi = 255;
    bool raw = false;  // write the four maxima (int32 [M][4][N], branch order ++, +-, -+, --) instead of codes
};

// The BM epilogue for one output (the definition above); r** are the raw maxima, MIN = min code.
int32_t combine(int32_t rpp, int32_t rpm, int32_t rmp, int32_t rmm, int32_t bias, int32_t minv, const Epi& e);

// Integer tile: rows [0, rows) of A (log codes, row stride lda bytes, KG dwords per row) against the
// packed panels P0 (weights of sign +) and P1 (sign -) of the same NR channels -> R0 / R1[r * ldr + c]
// (raw maxima, int32).
using IntPanelFn = void (*)(const uint8_t* A, int64_t lda, int64_t rows, const int32_t* P0, const int32_t* P1,
                            int64_t KG, int32_t* R0, int32_t* R1, int64_t ldr);
// Float tile: rows [0, rows) of X (row stride ldx floats, K values) against `np` consecutive panels of
// V ([K][NR] floats each, panel stride K*NR) -> Y / I (row stride ldy) for `cnt` channels from n0.
using F32PanelFn = void (*)(const float* X, int64_t ldx, int64_t rows, const float* P, int np, int64_t K, float* Y,
                            int32_t* I, int64_t ldy, int64_t n0, int cnt);

struct Kernel {
    IntPanelFn i8 = nullptr, i16 = nullptr;
    F32PanelFn f32 = nullptr;     // with argmax (I != null required)
    F32PanelFn f32max = nullptr;  // values only
    int fnp = 1;                  // panels per float tile
    const char* name = "portable";
};
Kernel kernel_portable();
#ifdef LOWBIT_X86
Kernel kernel_avx2();
Kernel kernel_avx512();
#endif
Kernel select_kernel();
const char* active_path();

// Fills log-code rows for output rows [m0, m1): row r (0-based) gets a+ codes, row (m1 - m0) + r the
// a- codes when the input is signed; each row KG dwords (padding codes MIN), row stride lda bytes.
using AFill = std::function<void(int64_t m0, int64_t m1, uint8_t* buf, int64_t lda)>;

// x: uint8 [M, K] codes (row stride ldx); out: uint8 [M, N] (row stride ldo) or raw int32 [M][4][N].
void linear(const uint8_t* x, int64_t M, int64_t ldx, const Packed& w, const Epi& e, void* out, int64_t ldo);

struct ConvGeom {
    int64_t B, C, H, W, kh, kw, sh, sw, ph, pw, dh, dw, Ho, Wo, groups;
};
// x: uint8 NHWC [B, H, W, C]; out: uint8 NHWC [B, Ho, Wo, N] or raw int32 [B*Ho*Wo][4][N].
void conv2d(const uint8_t* x, const ConvGeom& gm, const Packed& w, const Epi& e, void* out);

// Float max-plus: X [M, K] (row stride ldx), V [N, K] -> Y [M, N], I [M, N] (may be null).
void f32_maxplus(const float* X, int64_t M, int64_t K, int64_t ldx, const float* V, int64_t N, float* Y, int32_t* I);

// Hard-max backward: gX[m, I[m, n]] += G[m, n], gV[n, I[m, n]] += G[m, n] (either may be null; both
// zero-filled by the caller). gX is split by rows across threads, gV accumulated in a fixed order.
void f32_maxplus_backward(const int32_t* I, const float* G, int64_t M, int64_t N, int64_t K, float* gX, float* gV);

}  // namespace bm
}  // namespace lowbit
