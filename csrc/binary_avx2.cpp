// Binary AVX2 path: popcount of a XOR w by nibble lookup (vpshufb) on pre-split nibble planes:
// popcount(a ^ w) over a byte = lut[(a_lo ^ w_lo)] + lut[(a_hi ^ w_hi)], where x_lo = x & 0x0f and
// x_hi = (x >> 4) & 0x0f are computed once per operand (weights at pack time, activations once per
// row block) instead of once per pair: 6 instructions per 256 bit-products (2 vpxor, 2 vpshufb,
// 2 vpaddb). Counts accumulate in bytes (<= 4 + 4 = 8 per word step, so at most 31 steps before a
// byte could pass 255) and are widened with vpsadbw. Vectorized across output channels: a panel
// word index holds 8 channels (two YMM: even and odd channels, see kPlaneSlot), the activation word
// is broadcast. Tile: 4 rows x 8 channels (8 byte accumulators, 4 weight-plane registers, the LUT,
// 2 broadcasts and a temporary), in inline assembly; row remainders use the intrinsic version.
// The panel kernel walks all rows of a block with the epilogue fused and its constants hoisted.
// Convolutions with groups == 1 and dilation 1 run directly on the padded input image (no im2col):
// the 4 rows of a tile are 4 neighbouring output pixels, each kernel row a contiguous segment.
#include "binary.h"

#ifdef LOWBIT_X86
#include <algorithm>
#include <vector>

#include "parallel.h"

namespace lowbit {
namespace binary {

// up to 31 word steps per byte-accumulator flush (8 * 31 = 248 <= 255)
constexpr int64_t FLUSH = 31;

#define LB_AVX2_INLINE __attribute__((target("avx2,fma"), always_inline)) inline

alignas(32) static const uint8_t kLut[32] = {0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                             0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4};

LB_AVX2 void prep_planes_avx2(const uint64_t* A, int64_t lda, int64_t rows, int64_t KW, uint64_t* lo, uint64_t* hi) {
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    for (int64_t r = 0; r < rows; ++r) {
        const uint64_t* a = A + r * lda;
        uint64_t* l = lo + r * KW;
        uint64_t* h = hi + r * KW;
        int64_t k = 0;
        for (; k + 4 <= KW; k += 4) {
            const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + k));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(l + k), _mm256_and_si256(v, m4));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(h + k), _mm256_and_si256(_mm256_srli_epi16(v, 4), m4));
        }
        for (; k < KW; ++k) {
            l[k] = a[k] & 0x0f0f0f0f0f0f0f0fULL;
            h[k] = (a[k] >> 4) & 0x0f0f0f0f0f0f0f0fULL;
        }
    }
}

// The 4-row x 8-channel tile in inline assembly (GCC's version of this loop adds a reg-reg copy
// per accumulator update). Byte counters: rows 0-3 x (even, odd channels) in ymm4-11; weight planes
// ymm0-3; LUT ymm15. nseg segments of seglen word steps each (total <= 31); after a segment the
// activation pointers jump by segjump bytes (the next kernel row of a direct convolution; 0 for a
// GEMM), the weight pointers run on. Returns the 4 rows' popcounts (8 x int32, channel order).
LB_AVX2 static inline void block4_asm(const uint64_t* alo, const uint64_t* ahi, int64_t lda, const uint64_t* pl,
                                      const uint64_t* ph, int64_t seglen, int64_t nseg, int64_t segjump,
                                      __m256i* pc) {
    const int64_t ldb = lda * 8;
    const uint64_t* alo3 = alo + 3 * lda;
    const uint64_t* ahi3 = ahi + 3 * lda;
    int64_t cnt;
    register __m256i p0 __asm__("xmm4");
    register __m256i p1 __asm__("xmm6");
    register __m256i p2 __asm__("xmm8");
    register __m256i p3 __asm__("xmm10");
    __asm__ volatile(
        "vmovdqa %[lut], %%ymm15\n\t"
        "vpxor %%xmm4, %%xmm4, %%xmm4\n\t"
        "vpxor %%xmm5, %%xmm5, %%xmm5\n\t"
        "vpxor %%xmm6, %%xmm6, %%xmm6\n\t"
        "vpxor %%xmm7, %%xmm7, %%xmm7\n\t"
        "vpxor %%xmm8, %%xmm8, %%xmm8\n\t"
        "vpxor %%xmm9, %%xmm9, %%xmm9\n\t"
        "vpxor %%xmm10, %%xmm10, %%xmm10\n\t"
        "vpxor %%xmm11, %%xmm11, %%xmm11\n\t"
        "2:\n\t"
        "mov %[seglen], %[cnt]\n\t"
        "1:\n\t"
        "vmovdqa (%[pl]), %%ymm0\n\t"
        "vmovdqa 32(%[pl]), %%ymm1\n\t"
        "vmovdqa (%[ph]), %%ymm2\n\t"
        "vmovdqa 32(%[ph]), %%ymm3\n\t"
        "vpbroadcastq (%[alo]), %%ymm12\n\t"
        "vpbroadcastq (%[ahi]), %%ymm13\n\t"
        "vpxor %%ymm0, %%ymm12, %%ymm14\n\t"
        "vpshufb %%ymm14, %%ymm15, %%ymm14\n\t"
        "vpaddb %%ymm14, %%ymm4, %%ymm4\n\t"
        "vpxor %%ymm1, %%ymm12, %%ymm12\n\t"
        "vpshufb %%ymm12, %%ymm15, %%ymm12\n\t"
        "vpaddb %%ymm12, %%ymm5, %%ymm5\n\t"
        "vpxor %%ymm2, %%ymm13, %%ymm14\n\t"
        "vpshufb %%ymm14, %%ymm15, %%ymm14\n\t"
        "vpaddb %%ymm14, %%ymm4, %%ymm4\n\t"
        "vpxor %%ymm3, %%ymm13, %%ymm13\n\t"
        "vpshufb %%ymm13, %%ymm15, %%ymm13\n\t"
        "vpaddb %%ymm13, %%ymm5, %%ymm5\n\t"
        "vpbroadcastq (%[alo],%[ldb]), %%ymm12\n\t"
        "vpbroadcastq (%[ahi],%[ldb]), %%ymm13\n\t"
        "vpxor %%ymm0, %%ymm12, %%ymm14\n\t"
        "vpshufb %%ymm14, %%ymm15, %%ymm14\n\t"
        "vpaddb %%ymm14, %%ymm6, %%ymm6\n\t"
        "vpxor %%ymm1, %%ymm12, %%ymm12\n\t"
        "vpshufb %%ymm12, %%ymm15, %%ymm12\n\t"
        "vpaddb %%ymm12, %%ymm7, %%ymm7\n\t"
        "vpxor %%ymm2, %%ymm13, %%ymm14\n\t"
        "vpshufb %%ymm14, %%ymm15, %%ymm14\n\t"
        "vpaddb %%ymm14, %%ymm6, %%ymm6\n\t"
        "vpxor %%ymm3, %%ymm13, %%ymm13\n\t"
        "vpshufb %%ymm13, %%ymm15, %%ymm13\n\t"
        "vpaddb %%ymm13, %%ymm7, %%ymm7\n\t"
        "vpbroadcastq (%[alo],%[ldb],2), %%ymm12\n\t"
        "vpbroadcastq (%[ahi],%[ldb],2), %%ymm13\n\t"
        "vpxor %%ymm0, %%ymm12, %%ymm14\n\t"
        "vpshufb %%ymm14, %%ymm15, %%ymm14\n\t"
        "vpaddb %%ymm14, %%ymm8, %%ymm8\n\t"
        "vpxor %%ymm1, %%ymm12, %%ymm12\n\t"
        "vpshufb %%ymm12, %%ymm15, %%ymm12\n\t"
        "vpaddb %%ymm12, %%ymm9, %%ymm9\n\t"
        "vpxor %%ymm2, %%ymm13, %%ymm14\n\t"
        "vpshufb %%ymm14, %%ymm15, %%ymm14\n\t"
        "vpaddb %%ymm14, %%ymm8, %%ymm8\n\t"
        "vpxor %%ymm3, %%ymm13, %%ymm13\n\t"
        "vpshufb %%ymm13, %%ymm15, %%ymm13\n\t"
        "vpaddb %%ymm13, %%ymm9, %%ymm9\n\t"
        "vpbroadcastq (%[alo3]), %%ymm12\n\t"
        "vpbroadcastq (%[ahi3]), %%ymm13\n\t"
        "vpxor %%ymm0, %%ymm12, %%ymm14\n\t"
        "vpshufb %%ymm14, %%ymm15, %%ymm14\n\t"
        "vpaddb %%ymm14, %%ymm10, %%ymm10\n\t"
        "vpxor %%ymm1, %%ymm12, %%ymm12\n\t"
        "vpshufb %%ymm12, %%ymm15, %%ymm12\n\t"
        "vpaddb %%ymm12, %%ymm11, %%ymm11\n\t"
        "vpxor %%ymm2, %%ymm13, %%ymm14\n\t"
        "vpshufb %%ymm14, %%ymm15, %%ymm14\n\t"
        "vpaddb %%ymm14, %%ymm10, %%ymm10\n\t"
        "vpxor %%ymm3, %%ymm13, %%ymm13\n\t"
        "vpshufb %%ymm13, %%ymm15, %%ymm13\n\t"
        "vpaddb %%ymm13, %%ymm11, %%ymm11\n\t"
        "add $8, %[alo]\n\t"
        "add $8, %[ahi]\n\t"
        "add $8, %[alo3]\n\t"
        "add $8, %[ahi3]\n\t"
        "add $64, %[pl]\n\t"
        "add $64, %[ph]\n\t"
        "dec %[cnt]\n\t"
        "jnz 1b\n\t"
        "add %[segjump], %[alo]\n\t"
        "add %[segjump], %[ahi]\n\t"
        "add %[segjump], %[alo3]\n\t"
        "add %[segjump], %[ahi3]\n\t"
        "dec %[nseg]\n\t"
        "jnz 2b\n\t"
        "vpxor %%xmm12, %%xmm12, %%xmm12\n\t"
        "vpsadbw %%ymm12, %%ymm4, %%ymm4\n\t"
        "vpsadbw %%ymm12, %%ymm5, %%ymm5\n\t"
        "vpsllq $32, %%ymm5, %%ymm5\n\t"
        "vpblendd $0xaa, %%ymm5, %%ymm4, %%ymm4\n\t"
        "vpsadbw %%ymm12, %%ymm6, %%ymm6\n\t"
        "vpsadbw %%ymm12, %%ymm7, %%ymm7\n\t"
        "vpsllq $32, %%ymm7, %%ymm7\n\t"
        "vpblendd $0xaa, %%ymm7, %%ymm6, %%ymm6\n\t"
        "vpsadbw %%ymm12, %%ymm8, %%ymm8\n\t"
        "vpsadbw %%ymm12, %%ymm9, %%ymm9\n\t"
        "vpsllq $32, %%ymm9, %%ymm9\n\t"
        "vpblendd $0xaa, %%ymm9, %%ymm8, %%ymm8\n\t"
        "vpsadbw %%ymm12, %%ymm10, %%ymm10\n\t"
        "vpsadbw %%ymm12, %%ymm11, %%ymm11\n\t"
        "vpsllq $32, %%ymm11, %%ymm11\n\t"
        "vpblendd $0xaa, %%ymm11, %%ymm10, %%ymm10\n\t"
        : [alo] "+r"(alo), [ahi] "+r"(ahi), [alo3] "+r"(alo3), [ahi3] "+r"(ahi3), [pl] "+r"(pl), [ph] "+r"(ph),
          [nseg] "+r"(nseg), [cnt] "=&r"(cnt), "=x"(p0), "=x"(p1), "=x"(p2), "=x"(p3)
        : [ldb] "r"(ldb), [seglen] "rm"(seglen), [segjump] "rm"(segjump),
          [lut] "m"(*reinterpret_cast<const __m256i*>(kLut))
        : "cc", "memory", "xmm0", "xmm1", "xmm2", "xmm3", "xmm5", "xmm7", "xmm9", "xmm11", "xmm12", "xmm13", "xmm14",
          "xmm15");
    pc[0] = _mm256_add_epi32(pc[0], p0);
    pc[1] = _mm256_add_epi32(pc[1], p1);
    pc[2] = _mm256_add_epi32(pc[2], p2);
    pc[3] = _mm256_add_epi32(pc[3], p3);
}

// Intrinsic version for row remainders (MR < 4): adds popcounts of MR rows x 8 channels to pc[r].
template <int MR>
LB_AVX2_INLINE void popcount_rows(const uint64_t* Alo, const uint64_t* Ahi, int64_t lda, const uint64_t* Plo,
                                  const uint64_t* Phi, int64_t KW, __m256i* pc) {
    const __m256i lut = _mm256_load_si256(reinterpret_cast<const __m256i*>(kLut));
    const __m256i zero = _mm256_setzero_si256();
    for (int64_t k0 = 0; k0 < KW; k0 += FLUSH) {
        const int64_t k1 = std::min<int64_t>(KW, k0 + FLUSH);
        __m256i c0[MR], c1[MR];
#pragma GCC unroll 4
        for (int r = 0; r < MR; ++r) c0[r] = c1[r] = zero;
        for (int64_t k = k0; k < k1; ++k) {
            const __m256i wl0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(Plo + k * NR));
            const __m256i wl1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(Plo + k * NR + 4));
            const __m256i wh0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(Phi + k * NR));
            const __m256i wh1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(Phi + k * NR + 4));
#pragma GCC unroll 4
            for (int r = 0; r < MR; ++r) {
                const __m256i al = _mm256_set1_epi64x(static_cast<long long>(Alo[r * lda + k]));
                const __m256i ah = _mm256_set1_epi64x(static_cast<long long>(Ahi[r * lda + k]));
                c0[r] = _mm256_add_epi8(c0[r], _mm256_shuffle_epi8(lut, _mm256_xor_si256(al, wl0)));
                c1[r] = _mm256_add_epi8(c1[r], _mm256_shuffle_epi8(lut, _mm256_xor_si256(al, wl1)));
                c0[r] = _mm256_add_epi8(c0[r], _mm256_shuffle_epi8(lut, _mm256_xor_si256(ah, wh0)));
                c1[r] = _mm256_add_epi8(c1[r], _mm256_shuffle_epi8(lut, _mm256_xor_si256(ah, wh1)));
            }
        }
        // vpsadbw: 4 x u64 sums of the even (c0) and odd (c1) channels; interleave into channel order
#pragma GCC unroll 4
        for (int r = 0; r < MR; ++r) {
            const __m256i s = _mm256_blend_epi32(_mm256_sad_epu8(c0[r], zero),
                                                 _mm256_slli_epi64(_mm256_sad_epu8(c1[r], zero), 32), 0xaa);
            pc[r] = _mm256_add_epi32(pc[r], s);
        }
    }
}

// Epilogue constants of one panel, computed once per panel call.
struct PanelEpi {
    bool fast_bits = false;  // threshold output, 8 channels, byte-aligned
    __m256i pmax;            // bit = popcount <= pmax (<=> K - 2*popcount >= thr)
    uint32_t flipbits = 0;
    uint8_t* out = nullptr;  // byte of row 0
    int64_t row_bytes = 0;
    __m256i kb;
};

LB_AVX2_INLINE void panel_epi_init(PanelEpi& pe, int32_t Kbits, int64_t n0, int cnt, const wb::Epi& e, const wb::Out& o) {
    pe.kb = _mm256_set1_epi32(Kbits);
    if (e.kind == wb::EPI_BITS && cnt == 8 && (n0 & 7) == 0) {
        pe.fast_bits = true;
        alignas(32) int32_t pm[8];
        for (int j = 0; j < 8; ++j) {
            // dot >= thr  <=>  K - 2p >= thr  <=>  p <= floor((K - thr) / 2); p in [0, K]
            const int64_t d = static_cast<int64_t>(Kbits) - e.thr[n0 + j];
            pm[j] = d < 0 ? -1 : static_cast<int32_t>(std::min<int64_t>(d >> 1, Kbits));
        }
        pe.pmax = _mm256_load_si256(reinterpret_cast<const __m256i*>(pm));
        if (e.flip)
            for (int j = 0; j < 8; ++j) pe.flipbits |= static_cast<uint32_t>(e.flip[n0 + j] & 1u) << j;
        pe.row_bytes = o.ldo * 8;
        pe.out = static_cast<uint8_t*>(o.ptr) + (n0 >> 3);  // little-endian: channel n is bit n%8 of byte n/8
    }
}

// Epilogue of one row: popcounts p (8 channels) of output row m.
LB_AVX2_INLINE void row_epilogue(__m256i p, const PanelEpi& pe, int64_t m, int64_t n0, int cnt, const wb::Epi& e,
                                 const wb::Out& o) {
    if (pe.fast_bits) {
        const uint32_t gt = static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(p, pe.pmax))));
        pe.out[m * pe.row_bytes] = static_cast<uint8_t>(((~gt) & 0xffu) ^ pe.flipbits);
        return;
    }
    const __m256i d = _mm256_sub_epi32(pe.kb, _mm256_slli_epi32(p, 1));
    if (e.kind == wb::EPI_BITS) {
        wb::store_bits8(wb::threshold_bits8_avx2(d, n0, cnt, e), m, n0, cnt, o);
    } else {
        alignas(32) int32_t dot[8];
        _mm256_store_si256(reinterpret_cast<__m256i*>(dot), d);
        wb::epi_row_avx2(dot, m, n0, n0, cnt, e, o);
    }
}

LB_AVX2 static void panel_avx2(const uint64_t* A0, const uint64_t* A1, int64_t lda, int64_t rows, const uint64_t* P0,
                               const uint64_t* P1, int64_t, int, int64_t KW, int32_t Kbits, int64_t m, int64_t n0,
                               int cnt, const wb::Epi& e, const wb::Out& o) {
    PanelEpi pe;
    panel_epi_init(pe, Kbits, n0, cnt, e, o);
    int64_t r = 0;
    for (; r + 4 <= rows; r += 4) {
        __m256i pc[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
        for (int64_t k0 = 0; k0 < KW; k0 += FLUSH) {
            const int64_t n = std::min<int64_t>(FLUSH, KW - k0);
            block4_asm(A0 + r * lda + k0, A1 + r * lda + k0, lda, P0 + k0 * NR, P1 + k0 * NR, n, 1, 0, pc);
        }
        for (int i = 0; i < 4; ++i) row_epilogue(pc[i], pe, m + r + i, n0, cnt, e, o);
    }
    const int rem = static_cast<int>(rows - r);
    if (rem > 0) {
        __m256i pc[3] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
        if (rem == 3) popcount_rows<3>(A0 + r * lda, A1 + r * lda, lda, P0, P1, KW, pc);
        if (rem == 2) popcount_rows<2>(A0 + r * lda, A1 + r * lda, lda, P0, P1, KW, pc);
        if (rem == 1) popcount_rows<1>(A0 + r * lda, A1 + r * lda, lda, P0, P1, KW, pc);
        for (int i = 0; i < rem; ++i) row_epilogue(pc[i], pe, m + r + i, n0, cnt, e, o);
    }
}

// Direct convolution (groups == 1, dilation 1, kw*CgW <= 31 words): tiles of 4 neighbouring
// output pixels of one output row; the padded image has slack after its end for the extra pixels
// of a row's last tile (computed, not stored).
struct ConvTask {
    const uint64_t *xlo, *xhi, *Plo, *Phi;
    int64_t Hp, Wp, ps, lda, seglen, segjump, CgW;
    int32_t Kbits;
};

LB_AVX2 static void conv_rows_avx2(const ConvTask& ct, const ConvGeom& gm, const Packed& w, int64_t r0, int64_t r1,
                                   int64_t p0, int64_t p1, const wb::Epi& e, const wb::Out& o) {
    for (int64_t p = p0; p < p1; ++p) {
        const int cnt = static_cast<int>(std::min<int64_t>(NR, w.Ng - p * NR));
        const int64_t n0 = p * NR;
        PanelEpi pe;
        panel_epi_init(pe, ct.Kbits, n0, cnt, e, o);
        for (int64_t row = r0; row < r1; ++row) {
            const int64_t b = row / gm.Ho, oh = row % gm.Ho;
            const int64_t base = ((b * ct.Hp + oh * gm.sh) * ct.Wp) * ct.CgW;
            for (int64_t ow = 0; ow < gm.Wo; ow += 4) {
                const int64_t a = base + ow * gm.sw * ct.CgW;
                __m256i pc[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                                 _mm256_setzero_si256()};
                // kernel rows in calls of at most 31 words (the byte counters' flush interval)
                const int64_t rpc = std::max<int64_t>(1, FLUSH / ct.seglen);
                for (int64_t i0 = 0; i0 < gm.kh; i0 += rpc) {
                    const int64_t ai = a + i0 * ct.Wp * ct.CgW, pi = p * ct.ps + i0 * ct.seglen * NR;
                    block4_asm(ct.xlo + ai, ct.xhi + ai, ct.lda, ct.Plo + pi, ct.Phi + pi, ct.seglen,
                               std::min<int64_t>(rpc, gm.kh - i0), ct.segjump, pc);
                }
                const int nv = static_cast<int>(std::min<int64_t>(4, gm.Wo - ow));
                const int64_t m = row * gm.Wo + ow;
                for (int i = 0; i < nv; ++i) row_epilogue(pc[i], pe, m + i, n0, cnt, e, o);
            }
        }
    }
}

static bool conv_avx2(const uint64_t* img, int64_t nimg, int64_t Hp, int64_t Wp, const ConvGeom& gm,
                      const Packed& w, const wb::Epi& e, const wb::Out& o) {
    const int64_t CgW = w.seg_words;
    if (gm.groups != 1 || gm.dh != 1 || gm.dw != 1 || gm.kw * CgW > FLUSH) return false;
    std::vector<uint64_t> lo(static_cast<size_t>(nimg)), hi(static_cast<size_t>(nimg));
    prep_planes_avx2(img, nimg, 1, nimg, lo.data(), hi.data());
    const uint64_t* xlo = lo.data();
    const uint64_t* xhi = hi.data();
    const int64_t PG = w.PG, rows = gm.B * gm.Ho;
    const int nt = num_threads();
    // tasks: (block of output rows) x (panel group)
    int64_t ngroups = 1;
    const int64_t rb = std::max<int64_t>(1, (rows + 4 * nt - 1) / (4 * nt));
    if (nt > 1 && rows < 4 * nt) ngroups = std::min<int64_t>(PG, (4 * nt + rows - 1) / rows);
    const int64_t pg = (PG + ngroups - 1) / ngroups;
    ngroups = (PG + pg - 1) / pg;
    const int64_t rblocks = (rows + rb - 1) / rb;
    ConvTask ct;
    ct.xlo = xlo;
    ct.xhi = xhi;
    ct.Plo = w.panel(w.lo, 0, 0);
    ct.Phi = w.panel(w.hi, 0, 0);
    ct.Hp = Hp;
    ct.Wp = Wp;
    ct.ps = w.panel_stride();
    ct.lda = gm.sw * CgW;
    ct.seglen = gm.kw * CgW;
    ct.segjump = (Wp - gm.kw) * CgW * 8;
    ct.CgW = CgW;
    ct.Kbits = static_cast<int32_t>(w.Kbits);
    parallel_for(rblocks * ngroups, 1, [&](int64_t tb, int64_t te) {
        for (int64_t t = tb; t < te; ++t) {
            const int64_t r0 = (t / ngroups) * rb, r1 = std::min(rows, r0 + rb);
            const int64_t p0 = (t % ngroups) * pg, p1 = std::min(PG, p0 + pg);
            if (r0 < r1 && p0 < p1) conv_rows_avx2(ct, gm, w, r0, r1, p0, p1, e, o);
        }
    });
    return true;
}

Kernel kernel_avx2() {
    Kernel k;
    k.mr = 4;
    k.np = 1;
    k.planes = true;
    k.panel = panel_avx2;
    k.prep = prep_planes_avx2;
    k.conv = conv_avx2;
    k.name = "avx2";
    return k;
}

}  // namespace binary
}  // namespace lowbit
#endif
