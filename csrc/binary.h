#pragma once
// Binary (±1) kernels (methods.md §3): activations and weights packed 64 per uint64 word along K,
// bit 1 = +1, bit 0 = -1, bit k%64 of word k/64. dot = K - 2 * popcount(a XOR w).
//
// Padding bits: a row is a sequence of segments (linear: one segment of K bits; conv: one segment
// of C/groups channel bits per kernel position (i, j)), each segment stored in whole words. The bits
// past a segment's end are forced to 0 in both operands (weights at pack time, activations when the
// kernel copies them), so their XOR is 0 and they never count, whatever the caller left there.
//
// Packed weight layout (every ISA path reads the same object): per group, panels of NR = 8 output
// channels, [KW words][8 channels] uint64 (one ZMM or two YMM per word index), plus the two nibble
// planes of the same words (w & 0x0f.., (w >> 4) & 0x0f..) for the pshufb popcount paths. In the
// planes the 8 channels of a word index sit in the order 0,2,4,6,1,3,5,7 (kPlaneSlot), so that the
// AVX2 kernel's two YMM halves give even / odd channels and one vpblendd of their vpsadbw sums
// yields the 8 counts in channel order.
#include <cstdint>
#include <functional>
#include <memory>

#include "wb_common.h"

namespace lowbit {
namespace binary {

constexpr int NR = 8;
constexpr int ACC_LD = 16;  // row stride of the int32 tile accumulator (<= 2 panels per tile)
constexpr int MAX_MR = 8;
// slot of channel c within a word index of the nibble planes
constexpr int kPlaneSlot[NR] = {0, 4, 1, 5, 2, 6, 3, 7};

struct Packed {
    int64_t N = 0, KW = 0, Kbits = 0, G = 1, Ng = 0, PG = 0;
    int64_t seg_words = 0, seg_bits = 0;
    wb::AlignedBuf raw, lo, hi;
    int64_t panel_stride() const { return KW * NR; }  // in words
    const uint64_t* panel(const wb::AlignedBuf& b, int64_t g, int64_t p) const {
        return reinterpret_cast<const uint64_t*>(b.data()) + (g * PG + p) * KW * NR;
    }
};

// w: [N, KW] words, rows made of KW/seg_words segments of seg_words words with seg_bits valid bits.
std::shared_ptr<Packed> pack(const uint64_t* w, int64_t N, int64_t KW, int64_t seg_words, int64_t seg_bits,
                             int64_t groups);

// Panel kernel: for rows [0, rows) of an activation block and `np` consecutive panels (<= the
// kernel's np): dot = Kbits - 2 * popcount(a XOR w), then the epilogue for output rows m.. and
// channels n0..n0+cnt (global channel indices). Plane kernels get (A0, A1, P0, P1) = (lo, hi, lo, hi)
// nibble planes; the others (raw, -, raw, -).
using PanelFn = void (*)(const uint64_t* A0, const uint64_t* A1, int64_t lda, int64_t rows, const uint64_t* P0,
                         const uint64_t* P1, int64_t pstride, int np, int64_t KW, int32_t Kbits, int64_t m, int64_t n0,
                         int cnt, const wb::Epi& e, const wb::Out& o);
// Nibble planes of rows [0, rows) of A (row stride lda) -> lo, hi (row stride KW).
using PrepFn = void (*)(const uint64_t* A, int64_t lda, int64_t rows, int64_t KW, uint64_t* lo, uint64_t* hi);
struct ConvGeom;
// Optional direct ("implicit GEMM") convolution for groups == 1, dilation 1, on the padded NHWC
// input image (img: [B][Hp][Wp][CgW] words, padding bits cleared, then slack up to nimg words)
// without im2col. Returns false when it does not handle this geometry (im2col + gemm then runs).
using ConvFn = bool (*)(const uint64_t* img, int64_t nimg, int64_t Hp, int64_t Wp, const ConvGeom& gm,
                        const Packed& w, const wb::Epi& e, const wb::Out& o);
struct Kernel {
    int mr = 1, np = 1;
    bool planes = false;
    PanelFn panel = nullptr;
    PrepFn prep = nullptr;
    ConvFn conv = nullptr;
    const char* name = "portable";
};
void prep_planes_scalar(const uint64_t* A, int64_t lda, int64_t rows, int64_t KW, uint64_t* lo, uint64_t* hi);
Kernel kernel_portable();
#ifdef LOWBIT_X86
void prep_planes_avx2(const uint64_t* A, int64_t lda, int64_t rows, int64_t KW, uint64_t* lo, uint64_t* hi);
Kernel kernel_avx2();
Kernel kernel_avx512();  // VPOPCNTDQ where present, else the pshufb popcount at 512 bits
#endif
Kernel select_kernel();
const char* active_path();

// Fills rows [m0, m1) as raw words (KW per row, padding bits already 0) into buf (row stride KW), or
// returns a pointer to rows that already satisfy that, with their stride in *lda.
using AFill = std::function<const uint64_t*(int64_t m0, int64_t m1, uint64_t* buf, int64_t* lda)>;

void gemm(const Packed& w, int64_t g, int64_t M, const AFill& fill, const wb::Epi& e, const wb::Out& o);

// x: [M, KW] words (row stride ldx words); padding bits may hold anything (masked here).
void linear(const uint64_t* x, int64_t M, int64_t ldx, const Packed& w, const wb::Epi& e, const wb::Out& o);

struct ConvGeom {
    int64_t B, C, H, W, kh, kw, sh, sw, ph, pw, dh, dw, Ho, Wo, groups;
    int pad_value;  // +1 or -1
};
// x: [B, H, W, groups, ceil((C/groups)/64)] words (channels packed per group, NHWC);
// weight packed from [N, kh, kw, ceil((C/groups)/64)] words (seg_words = ceil(Cg/64), seg_bits = Cg).
void conv2d(const uint64_t* x, const ConvGeom& gm, const Packed& w, const wb::Epi& e, const wb::Out& o);

// Packs rows of 0/1 bytes: src [R, K] (row stride lds bytes, nonzero = 1) -> dst [R, ceil(K/64)] words.
void pack_bits_u8(const uint8_t* src, int64_t R, int64_t K, int64_t lds, uint64_t* dst);

}  // namespace binary
}  // namespace lowbit
