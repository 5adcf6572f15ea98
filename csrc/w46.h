#pragma once
// 4.6-bit integer kernels (methods.md §2; Trusov et al., Mathematics 2024).
//
// Operands: activation codes uint8 in [0, 2*K_x] with zero point K_x; weight codes int8 in
// [-K_w, K_w] (zero point 0); K_x * K_w <= 127. acc[m, n] = sum_k (a[m,k] - K_x) * w[n,k] + bias[n]
// in int32 = sum_k a*w - K_x * colsum[n] + bias[n] (the zero point enters through the column sums,
// as in the int8 kernels), then one of the shared epilogues (wb_common.h).
//
// Packed weight layout (shared by every ISA path, so the ISA cap may change after packing):
// per group, panels of NR = 16 output channels; a panel is [Kq = ceil(K/4)][16 channels][4 k]
// int8, i.e. 64 bytes per k-quad (one ZMM, or two YMM: channels 0-7 and 8-15). Channels past the
// group's end and k past K are zero, so they contribute nothing whatever the activation bytes.
#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "wb_common.h"

namespace lowbit {
namespace w46 {

constexpr int NR = 16;       // channels per panel
constexpr int ACC_LD = 32;   // row stride of the int32 tile accumulator (<= 2 panels per tile)
constexpr int MAX_MR = 8;

struct Packed {
    int64_t N = 0, K = 0, Kp = 0, Kq = 0, G = 1, Ng = 0, PG = 0;  // PG: panels per group
    int K_x = 0, K_w = 0;
    int flush = 64;  // k-quads accumulated in int16 before widening (see w46.cpp)
    wb::AlignedBuf panels;
    std::vector<int32_t> colsum;  // [N]
    std::vector<int64_t> l1;      // [N], sum_k |w[n, k]|: |acc - bias| <= K_x * l1[n] (checked <= 2^31 - 1)
    std::vector<int8_t> raw;      // [N, K] as given
    const int8_t* panel(int64_t g, int64_t p) const {
        return reinterpret_cast<const int8_t*>(panels.data()) + (g * PG + p) * Kq * 64;
    }
    int64_t panel_stride() const { return Kq * 64; }
};

// Validates the codes (|w| <= K_w, K_x*K_w <= 127) and packs. Throws std::invalid_argument.
std::shared_ptr<Packed> pack(const int8_t* w, int64_t N, int64_t K, int K_x, int K_w, int64_t groups);

// One ISA path: a tile kernel for `mr` rows x `np` panels: acc = corr[c] + sum_k a*w (int32), then
// the epilogue for output rows m.. and channels n0..n0+cnt (global channel indices).
using TileFn = void (*)(const uint8_t* A, int64_t lda, int mr, const int8_t* P, int64_t pstride, int np,
                        int64_t Kq, int flush, const int32_t* corr, int64_t m, int64_t n0, int cnt, const wb::Epi& e,
                        const wb::Out& o);
struct ConvGeom;
// Optional direct ("implicit GEMM") convolution on the padded NHWC image xp ([B][Hp][Wp][C] bytes,
// padding = K_x, plus slack after the end); returns false when it does not handle the geometry.
using ConvFn = bool (*)(const uint8_t* xp, int64_t Hp, int64_t Wp, const ConvGeom& gm, const Packed& w,
                        const int32_t* bias, const wb::Epi& e, const wb::Out& o);
struct Kernel {
    int mr = 1, np = 1;
    TileFn tile = nullptr;
    ConvFn conv = nullptr;
    const char* name = "portable";
};
// corr[n] = bias[n] - zp * colsum[g*Ng + n] for the group's channels, padded with 0 to PG*NR + ACC_LD.
// zp: the activation zero point, any code in [0, 2*K_x] (negative: K_x, the centred default).
std::vector<int32_t> make_corr(const Packed& w, int64_t g, const int32_t* bias, int zp = -1);
// The activation zero point a call uses: zp in [0, 2*K_x], or K_x for zp < 0 (throws otherwise).
int act_zero_point(const Packed& w, int zp);
Kernel kernel_portable();
#ifdef LOWBIT_X86
Kernel kernel_avx2();
Kernel kernel_avx512bw();
Kernel kernel_vnni();
#endif
Kernel select_kernel();  // by lowbit::active_isa()
const char* active_path();

// Fills rows [m0, m1) of the activation matrix (Kp readable bytes per row) and returns a pointer to
// row m0 with its row stride in *lda; `buf` has room for (m1 - m0) * Kp bytes.
using AFill = std::function<const uint8_t*(int64_t m0, int64_t m1, uint8_t* buf, int64_t* lda)>;

// GEMM of group g: M rows from `fill`, the group's Ng channels. bias: [Ng] or null. Epilogue
// parameters and outputs are indexed by the global channel g*Ng + n.
void gemm(const Packed& w, int64_t g, int64_t M, const AFill& fill, const int32_t* bias, const wb::Epi& e,
          const wb::Out& o, int zp = -1);

// Max activation code in x[0..n) (for the range check a <= 2*K_x).
uint8_t max_code(const uint8_t* x, int64_t n);

// x uint8 [M, K] (row stride ldx) -> epilogue of sum_k (x - zp) * w + bias. Checks codes <= 2*K_x (throws).
void linear(const uint8_t* x, int64_t M, int64_t ldx, const Packed& w, const int32_t* bias, const wb::Epi& e,
            const wb::Out& o, int zp = -1);

struct ConvGeom {
    int64_t B, C, H, W, kh, kw, sh, sw, ph, pw, dh, dw, Ho, Wo, groups;
    bool nhwc = false;  // input memory layout: false NCHW, true NHWC (channels_last)
    int zp = -1;        // activation zero point in [0, 2*K_x] (real zero; padding holds it); < 0: K_x
};
// x uint8 with NCHW semantics (memory NCHW or NHWC, gm.nhwc); weight packed from [N, kh, kw, C/groups]
// (K order (i, j, c)). Padded positions hold the zero point gm.zp (real zero). Depthwise layers
// (C/groups == 1, groups > 1) take a direct path. The output goes where `o` says (the binding uses NHWC rows: o.ldo = N).
void conv2d(const uint8_t* x, const ConvGeom& gm, const Packed& w, const int32_t* bias, const wb::Epi& e,
            const wb::Out& o);

}  // namespace w46
}  // namespace lowbit
