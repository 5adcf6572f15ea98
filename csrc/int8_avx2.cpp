// AVX2 int8 kernels (exact for every u8 x s8 input).
//
// GEMM micro-kernel: the activations of a tile are packed as int16 (x - x_zp) in groups of 4 k; the
// weights (packed [k4][16 channels][4 k] int8) are widened 16 bytes at a time to int16 (4 channels x
// 4 k) and multiplied with vpmaddwd against a 64-bit broadcast of 4 activations. Each int32 lane then
// holds a partial sum over 2 of the 4 k of one channel; the pairs are folded with vphaddd at the end.
// |x - x_zp| <= 255 and |w| <= 128 so a vpmaddwd pair sum is at most 65280: never saturates.
// Tiles: 6 rows x 8 channels (12 accumulators; the main one, hand-scheduled in inline asm), 4-5 rows
// x 8 channels, and 1-3 rows x 16 channels. K is blocked (<= 512) so the weight slice of a block stays
// in L1 across the row tiles of a chunk. The vector ALUs are the limit here (vpmaddwd + vpaddd per 16
// multiply-adds): on Zen 3 about 21-23 multiply-adds per cycle. (vpmaddubsw would need fewer
// instructions but saturates int16 for large u8 x s8 pairs, so it is not exact; VNNI has no such issue.)
#include "int8_common.h"

#ifdef LOWBIT_INT8_X86

#include <immintrin.h>

#include <algorithm>
#include <cstring>

#define LB_AVX2 __attribute__((target("avx2,fma")))

namespace lowbit {
namespace int8 {

namespace {

constexpr int kMr = 6;
constexpr int64_t kKcMax = 128;  // k4 groups per K block (512 k)

// One tile of rows [m0, m0 + mr) -> dst [k4][mr][4] int16 (x - zp), zero for k >= K.
LB_AVX2 void pack_a_tile(const GemmJob& j, int64_t m0, int mr, int16_t* dst, uint8_t* rowbuf) {
    const int64_t K = j.a->k, k4 = j.w->k4;
    const __m256i zpv = _mm256_set1_epi16(static_cast<int16_t>(j.zp));
    const int64_t qstride = int64_t(mr) * 4;
    for (int r = 0; r < mr; ++r) {
        const uint8_t* x = j.a->row(m0 + r, rowbuf);
        int16_t* d = dst + r * 4;
        int64_t k = 0;
        for (; k + 16 <= K; k += 16) {
            __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x + k));
            __m256i v = _mm256_sub_epi16(_mm256_cvtepu8_epi16(b), zpv);
            __m128i lo = _mm256_castsi256_si128(v), hi = _mm256_extracti128_si256(v, 1);
            int16_t* p = d + (k >> 2) * qstride;
            _mm_storel_epi64(reinterpret_cast<__m128i*>(p), lo);
            _mm_storeh_pd(reinterpret_cast<double*>(p + qstride), _mm_castsi128_pd(lo));
            _mm_storel_epi64(reinterpret_cast<__m128i*>(p + 2 * qstride), hi);
            _mm_storeh_pd(reinterpret_cast<double*>(p + 3 * qstride), _mm_castsi128_pd(hi));
        }
        if (k + 8 <= K) {
            __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(x + k));
            __m128i v = _mm_sub_epi16(_mm_cvtepu8_epi16(b), _mm256_castsi256_si128(zpv));
            int16_t* p = d + (k >> 2) * qstride;
            _mm_storel_epi64(reinterpret_cast<__m128i*>(p), v);
            _mm_storeh_pd(reinterpret_cast<double*>(p + qstride), _mm_castsi128_pd(v));
            k += 8;
        }
        for (; k < k4 * 4; ++k)
            d[(k >> 2) * qstride + (k & 3)] = k < K ? static_cast<int16_t>(int32_t(x[k]) - j.zp) : int16_t(0);
    }
}

// MR rows x (4 * NA) channels over kq groups of 4 k. W points at the first channel of the tile inside
// a packed block (row stride 64 bytes). Writes/accumulates int32 into T (row stride ldt).
// Accumulators are named variables (not an array): GCC does not scalarize a 12 x __m256i array and
// would keep most of it on the stack; the empty asm statements pin each row's accumulators so the
// broadcasts are not all hoisted (which also made GCC spill).
#define LB_ACC_DECL(r) __m256i c##r##0 = z, c##r##1 = z, c##r##2 = z, c##r##3 = z;
#define LB_ACC_ROW(r)                                                                  \
    if constexpr (MR > r) {                                                            \
        int64_t v;                                                                     \
        std::memcpy(&v, aq + r * 4, sizeof(v));                                        \
        const __m256i x = _mm256_set1_epi64x(v);                                       \
        c##r##0 = _mm256_add_epi32(c##r##0, _mm256_madd_epi16(x, w0));                \
        c##r##1 = _mm256_add_epi32(c##r##1, _mm256_madd_epi16(x, w1));                 \
        if constexpr (NA == 4) {                                                       \
            c##r##2 = _mm256_add_epi32(c##r##2, _mm256_madd_epi16(x, w2));             \
            c##r##3 = _mm256_add_epi32(c##r##3, _mm256_madd_epi16(x, w3));             \
            __asm__("" : "+x"(c##r##2), "+x"(c##r##3));                                   \
        }                                                                              \
        __asm__("" : "+x"(c##r##0), "+x"(c##r##1));                                   \
    }
#define LB_ACC_STORE(r)                                                                \
    if constexpr (MR > r) {                                                            \
        store_pair(T + r * ldt, c##r##0, c##r##1, first);                             \
        if constexpr (NA == 4) store_pair(T + r * ldt + 8, c##r##2, c##r##3, first);  \
    }

// acc a = [c0 c0' c1 c1' | c2 c2' c3 c3'] (two partial sums per channel), b likewise for c4..c7.
LB_AVX2 inline void store_pair(int32_t* dst, __m256i a, __m256i b, bool first) {
    __m256i s = _mm256_permute4x64_epi64(_mm256_hadd_epi32(a, b), 0xD8);
    __m256i* d = reinterpret_cast<__m256i*>(dst);
    if (!first) s = _mm256_add_epi32(s, _mm256_loadu_si256(d));
    _mm256_storeu_si256(d, s);
}

template <int MR, int NA>
LB_AVX2 void kernel(const int16_t* A, const int8_t* W, int64_t kq, int32_t* T, int64_t ldt, bool first) {
    static_assert(MR >= 1 && MR <= 6 && (NA == 2 || NA == 4), "tile");
    const __m256i z = _mm256_setzero_si256();
    LB_ACC_DECL(0) LB_ACC_DECL(1) LB_ACC_DECL(2) LB_ACC_DECL(3) LB_ACC_DECL(4) LB_ACC_DECL(5)
    int64_t q = 0;
    if constexpr (MR == 6 && NA == 2) {
        // Hand-scheduled main tile: GCC's allocation adds register moves that cost dispatch slots in a
        // loop that is already bound by vector ALU throughput. Two k-groups per iteration.
        const int16_t* a = A;
        const int8_t* w = W;
        int64_t n2 = kq / 2;
        q = n2 * 2;
        if (n2 > 0) {
#define LB_ROW(r, off)                                  \
    "vpbroadcastq " off "(%[a]), %%ymm14\n\t"           \
    "vpmaddwd %%ymm12, %%ymm14, %%ymm15\n\t"            \
    "vpaddd %%ymm15, %[c" #r "0], %[c" #r "0]\n\t"      \
    "vpmaddwd %%ymm13, %%ymm14, %%ymm14\n\t"            \
    "vpaddd %%ymm14, %[c" #r "1], %[c" #r "1]\n\t"
            __asm__ volatile(
                "1:\n\t"
                "vpmovsxbw (%[w]), %%ymm12\n\t"
                "vpmovsxbw 16(%[w]), %%ymm13\n\t"
                LB_ROW(0, "0") LB_ROW(1, "8") LB_ROW(2, "16") LB_ROW(3, "24") LB_ROW(4, "32") LB_ROW(5, "40")
                "vpmovsxbw 64(%[w]), %%ymm12\n\t"
                "vpmovsxbw 80(%[w]), %%ymm13\n\t"
                LB_ROW(0, "48") LB_ROW(1, "56") LB_ROW(2, "64") LB_ROW(3, "72") LB_ROW(4, "80") LB_ROW(5, "88")
                "addq $128, %[w]\n\t"
                "addq $96, %[a]\n\t"
                "decq %[n]\n\t"
                "jnz 1b\n\t"
                : [c00] "+x"(c00), [c01] "+x"(c01), [c10] "+x"(c10), [c11] "+x"(c11), [c20] "+x"(c20),
                  [c21] "+x"(c21), [c30] "+x"(c30), [c31] "+x"(c31), [c40] "+x"(c40), [c41] "+x"(c41),
                  [c50] "+x"(c50), [c51] "+x"(c51), [a] "+r"(a), [w] "+r"(w), [n] "+r"(n2)
                :
                : "cc", "memory", "xmm12", "xmm13", "xmm14", "xmm15");
#undef LB_ROW
        }
    }
    for (; q < kq; ++q) {
        const int8_t* wq = W + q * 64;
        const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wq)));
        const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wq + 16)));
        __m256i w2 = z, w3 = z;
        if constexpr (NA == 4) {
            w2 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wq + 32)));
            w3 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wq + 48)));
        }
        const int16_t* aq = A + q * (MR * 4);
        LB_ACC_ROW(0) LB_ACC_ROW(1) LB_ACC_ROW(2) LB_ACC_ROW(3) LB_ACC_ROW(4) LB_ACC_ROW(5)
    }
    LB_ACC_STORE(0) LB_ACC_STORE(1) LB_ACC_STORE(2) LB_ACC_STORE(3) LB_ACC_STORE(4) LB_ACC_STORE(5)
}

#undef LB_ACC_DECL
#undef LB_ACC_ROW
#undef LB_ACC_STORE

using KernelFn = void (*)(const int16_t*, const int8_t*, int64_t, int32_t*, int64_t, bool);

// [mr] for NA = 4 (mr <= 3) and NA = 2 (mr >= 4).
constexpr KernelFn kKernels16[4] = {nullptr, kernel<1, 4>, kernel<2, 4>, kernel<3, 4>};
constexpr KernelFn kKernels8[7] = {nullptr, kernel<1, 2>, kernel<2, 2>, kernel<3, 2>,
                                   kernel<4, 2>, kernel<5, 2>, kernel<6, 2>};

LB_AVX2 inline __m256i sra64(__m256i v, __m256i s) {
    const __m256i sgn = _mm256_cmpgt_epi64(_mm256_setzero_si256(), v);
    return _mm256_xor_si256(_mm256_srlv_epi64(_mm256_xor_si256(v, sgn), s), sgn);
}

LB_AVX2 inline __m256i clamp64(__m256i v, __m256i lo, __m256i hi) {
    v = _mm256_blendv_epi8(v, lo, _mm256_cmpgt_epi64(lo, v));
    return _mm256_blendv_epi8(v, hi, _mm256_cmpgt_epi64(v, hi));
}

// Low byte of each int32 lane -> 8 bytes.
LB_AVX2 inline void store_bytes8(void* dst, __m256i v) {
    const __m256i sel = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 0, 4, 8,
                                         12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
    const __m256i s = _mm256_shuffle_epi8(v, sel);
    const __m128i b = _mm_unpacklo_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(dst), b);
}

}  // namespace

LB_AVX2 void epilogue_avx2(const Epi& e, const int32_t* T, int64_t ldt, int64_t row0, int64_t rows, int64_t n0,
                           int64_t cols, const int32_t* corr) {
    if (e.add_res) {  // fused residual add: the scalar epilogue (the AVX-512 kernels have their own)
        epilogue_scalar(e, T, ldt, row0, rows, n0, cols, corr);
        return;
    }
    const int64_t co = e.col_off + n0;
    int64_t c = 0;
    for (; c + 8 <= cols; c += 8) {
        const __m256i corrv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(corr + n0 + c));
        const int64_t o0 = row0 * e.ldo + co + c;
        switch (e.kind) {
            case EpiKind::none: {
                int32_t* out = static_cast<int32_t*>(e.out) + o0;
                for (int64_t r = 0; r < rows; ++r) {
                    __m256i acc = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(T + r * ldt + c));
                    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + r * e.ldo), _mm256_add_epi32(acc, corrv));
                }
                break;
            }
            case EpiKind::requant_u8:
            case EpiKind::requant_s8: {
                const __m256i one = _mm256_set1_epi64x(1);
                const __m256i m0v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(e.m0 + co + c));
                const __m256i rsv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(e.rshift + co + c));
                const __m256i rs_e = _mm256_and_si256(rsv, _mm256_set1_epi64x(0xffffffffLL));
                const __m256i rs_o = _mm256_srli_epi64(rsv, 32);
                const __m256i rnd_e = _mm256_sllv_epi64(one, _mm256_sub_epi64(rs_e, one));
                const __m256i rnd_o = _mm256_sllv_epi64(one, _mm256_sub_epi64(rs_o, one));
                const __m256i m0_o = _mm256_srli_epi64(m0v, 32);
                const __m256i lo = _mm256_set1_epi64x(int64_t(e.qmin) - e.out_zp);
                const __m256i hi = _mm256_set1_epi64x(int64_t(e.qmax) - e.out_zp);
                const __m256i zpv = _mm256_set1_epi32(e.out_zp);
                uint8_t* out = static_cast<uint8_t*>(e.out) + o0;  // 1-byte elements either way
                const __m256i big = _mm256_cmpgt_epi32(rsv, _mm256_set1_epi32(31));
                if (_mm256_movemask_ps(_mm256_castsi256_ps(big)) == 0xFF) {
                    // All shifts >= 32 (the usual case: multiplier < 2^-1 ... ): v >> r = (v >> 32) >> (r - 32),
                    // and v >> 32 is the high dword of the int64 product, so the rest runs on int32 lanes
                    // (|result| < 2^30: no overflow when adding the zero point).
                    const __m256i rs32 = _mm256_sub_epi32(rsv, _mm256_set1_epi32(32));
                    const __m256i qlo = _mm256_set1_epi32(e.qmin), qhi = _mm256_set1_epi32(e.qmax);
                    for (int64_t r = 0; r < rows; ++r) {
                        __m256i acc = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(T + r * ldt + c));
                        acc = _mm256_add_epi32(acc, corrv);
                        const __m256i pe = _mm256_add_epi64(_mm256_mul_epi32(acc, m0v), rnd_e);
                        const __m256i po =
                            _mm256_add_epi64(_mm256_mul_epi32(_mm256_srli_epi64(acc, 32), m0_o), rnd_o);
                        const __m256i hi = _mm256_blend_epi32(_mm256_srli_epi64(pe, 32), po, 0xAA);
                        __m256i res = _mm256_add_epi32(_mm256_srav_epi32(hi, rs32), zpv);
                        res = _mm256_min_epi32(_mm256_max_epi32(res, qlo), qhi);
                        store_bytes8(out + r * e.ldo, res);
                    }
                    break;
                }
                for (int64_t r = 0; r < rows; ++r) {
                    __m256i acc = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(T + r * ldt + c));
                    acc = _mm256_add_epi32(acc, corrv);
                    __m256i pe = _mm256_add_epi64(_mm256_mul_epi32(acc, m0v), rnd_e);
                    __m256i po = _mm256_add_epi64(_mm256_mul_epi32(_mm256_srli_epi64(acc, 32), m0_o), rnd_o);
                    pe = clamp64(sra64(pe, rs_e), lo, hi);
                    po = clamp64(sra64(po, rs_o), lo, hi);
                    __m256i res = _mm256_blend_epi32(pe, _mm256_slli_epi64(po, 32), 0xAA);
                    store_bytes8(out + r * e.ldo, _mm256_add_epi32(res, zpv));
                }
                break;
            }
            case EpiKind::float_out: {
                const __m256 sc = _mm256_loadu_ps(e.scale + co + c);
                const bool has_b = e.fbias != nullptr;
                const __m256 fb = has_b ? _mm256_loadu_ps(e.fbias + co + c) : _mm256_setzero_ps();
                float* out = static_cast<float*>(e.out) + o0;
                for (int64_t r = 0; r < rows; ++r) {
                    __m256i acc = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(T + r * ldt + c));
                    __m256 f = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(acc, corrv)), sc);
                    if (has_b) f = _mm256_add_ps(f, fb);
                    _mm256_storeu_ps(out + r * e.ldo, f);
                }
                break;
            }
        }
    }
    if (c < cols) epilogue_scalar(e, T + c, ldt, row0, rows, n0 + c, cols - c, corr);
}

LB_AVX2 void chunk_avx2(const GemmJob& j, int64_t m0, int64_t m1, int64_t b0, int64_t b1) {
    const int64_t k4 = j.w->k4, rows = m1 - m0;
    const int64_t ntiles = (rows + kMr - 1) / kMr;
    const size_t tile_elems = static_cast<size_t>(k4 * kMr * 4);
    int16_t* A = scratch<int16_t>(0, tile_elems * static_cast<size_t>(ntiles));
    int32_t* T = scratch<int32_t>(1, static_cast<size_t>(ntiles * kMr * kBlockN));
    uint8_t* rowbuf = scratch<uint8_t>(2, static_cast<size_t>(std::max<int64_t>(j.a->k, 1)));
    for (int64_t t = 0; t < ntiles; ++t) {
        const int mr = static_cast<int>(std::min<int64_t>(kMr, rows - t * kMr));
        pack_a_tile(j, m0 + t * kMr, mr, A + t * tile_elems, rowbuf);
    }
    const int64_t nkc = std::max<int64_t>(1, (k4 + kKcMax - 1) / kKcMax);
    const int64_t kc = std::max<int64_t>(1, (k4 + nkc - 1) / nkc);
    for (int64_t b = b0; b < b1; ++b) {
        const int64_t cols = std::min<int64_t>(kBlockN, j.w->n - b * kBlockN);
        const int8_t* Wb = j.w->block(b);
        if (k4 == 0) std::memset(T, 0, static_cast<size_t>(ntiles * kMr * kBlockN) * sizeof(int32_t));
        for (int64_t kb = 0; kb < k4; kb += kc) {
            const int64_t kq = std::min(kc, k4 - kb);
            const bool first = kb == 0;
            for (int64_t t = 0; t < ntiles; ++t) {
                const int mr = static_cast<int>(std::min<int64_t>(kMr, rows - t * kMr));
                const int16_t* At = A + t * tile_elems + kb * mr * 4;
                int32_t* Tt = T + t * kMr * kBlockN;
                const int8_t* Wk = Wb + kb * (kBlockN * kGroupK);
                if (mr <= 3) {
                    kKernels16[mr](At, Wk, kq, Tt, kBlockN, first);
                } else {
                    kKernels8[mr](At, Wk, kq, Tt, kBlockN, first);
                    if (cols > 8) kKernels8[mr](At, Wk + 32, kq, Tt + 8, kBlockN, first);
                }
            }
        }
        epilogue_avx2(j.epi, T, kBlockN, m0, rows, b * kBlockN, cols, j.corr);
    }
}

// ---------------------------------------------------------------------------------------------------
// Depthwise convolution. Two taps at a time: the int16 activations of taps t and t+1 (16 channels) are
// interleaved with vpunpck{l,h}wd and multiplied with vpmaddwd against weights pre-interleaved the
// same way (dw_pack_avx2), giving int32 sums over the two taps. Layout of the paired weights:
// [channel block of 16][tap pair][lo, hi][16] int16 where lo holds channels 0-3 | 8-11 and hi 4-7 |
// 12-15, each channel as (w_t, w_t+1). A missing tap (odd count) has weight 0. The activations are
// used as raw u8 (the driver folds -x_zp * sum_t w[c, t] into the per-channel correction).

void dw_pack_avx2(const int8_t* w, int64_t c, int64_t taps, std::vector<int16_t>& out) {
    const int64_t nb = c / 16, pairs = (taps + 1) / 2;
    out.assign(static_cast<size_t>(std::max<int64_t>(1, nb * pairs * 32)), 0);
    static const int kLo[8] = {0, 1, 2, 3, 8, 9, 10, 11}, kHi[8] = {4, 5, 6, 7, 12, 13, 14, 15};
    for (int64_t cb = 0; cb < nb; ++cb)
        for (int64_t p = 0; p < pairs; ++p) {
            int16_t* d = out.data() + (cb * pairs + p) * 32;
            for (int half = 0; half < 2; ++half)
                for (int i = 0; i < 8; ++i) {
                    const int64_t ch = cb * 16 + (half ? kHi[i] : kLo[i]);
                    const int64_t t0 = 2 * p, t1 = 2 * p + 1;
                    d[half * 16 + 2 * i] = w[ch * taps + t0];
                    d[half * 16 + 2 * i + 1] = t1 < taps ? w[ch * taps + t1] : int16_t(0);
                }
        }
}

namespace {

// One output pixel: tp[0 .. 2*pairs) point at the input pixels (NHWC rows of C bytes) of each tap
// (the zero-point row for padding and for the dummy odd tap). Raw u8 products: the zero point is in
// the correction (bias - x_zp * sum of the channel's taps).
LB_AVX2 inline void dw_pixel(const uint8_t* const* tp, const int16_t* wpair, const int8_t* w, int64_t C,
                             int64_t taps, int64_t pairs, int32_t* out) {
    const int64_t nb = C / 16;
    for (int64_t cb = 0; cb < nb; ++cb) {
        const int16_t* wp = wpair + cb * pairs * 32;
        const int64_t co = cb * 16;
        __m256i alo = _mm256_setzero_si256(), ahi = _mm256_setzero_si256();
        for (int64_t p = 0; p < pairs; ++p) {
            const __m256i x0 =
                _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(tp[2 * p] + co)));
            const __m256i x1 =
                _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(tp[2 * p + 1] + co)));
            const __m256i wlo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + p * 32));
            const __m256i whi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + p * 32 + 16));
            alo = _mm256_add_epi32(alo, _mm256_madd_epi16(_mm256_unpacklo_epi16(x0, x1), wlo));
            ahi = _mm256_add_epi32(ahi, _mm256_madd_epi16(_mm256_unpackhi_epi16(x0, x1), whi));
        }
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + co), _mm256_permute2x128_si256(alo, ahi, 0x20));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + co + 8), _mm256_permute2x128_si256(alo, ahi, 0x31));
    }
    for (int64_t c = nb * 16; c < C; ++c) {
        int32_t s = 0;
        for (int64_t t = 0; t < taps; ++t) s += int32_t(tp[t][c]) * int32_t(w[c * taps + t]);
        out[c] = s;
    }
}

}  // namespace

LB_AVX2 void dw_rows_avx2(const DwJob& j, int64_t r0, int64_t r1) {
    const ConvShape& S = *j.s;
    const int64_t C = S.c, taps = S.kh * S.kw, pairs = (taps + 1) / 2;
    int32_t* T = scratch<int32_t>(1, static_cast<size_t>(S.wo * C));
    uint8_t* zrow = scratch<uint8_t>(3, static_cast<size_t>(C + 16));
    std::memset(zrow, j.zp, static_cast<size_t>(C + 16));
    const uint8_t** tp = scratch<const uint8_t*>(4, static_cast<size_t>(2 * pairs));
    int64_t* off = scratch<int64_t>(5, static_cast<size_t>(2 * pairs));
    for (int64_t i = 0; i < S.kh; ++i)
        for (int64_t jj = 0; jj < S.kw; ++jj) off[i * S.kw + jj] = (i * S.dh * S.w + jj * S.dw) * C;
    if (taps & 1) off[taps] = 0;  // dummy tap (weight 0): any readable row
    // Output columns whose taps are all inside the input horizontally.
    const int64_t ow_lo = std::min(S.wo, (S.pw + S.sw - 1) / S.sw);
    const int64_t lim = S.w - 1 - (S.kw - 1) * S.dw + S.pw;  // ow * sw <= lim
    const int64_t ow_hi = lim < 0 ? ow_lo : std::max(ow_lo, std::min(S.wo, lim / S.sw + 1));
    for (int64_t r = r0; r < r1; ++r) {
        const int64_t oh = r % S.ho, b = r / S.ho;
        const uint8_t* xb = j.x + b * S.h * S.w * C;
        const int64_t ih0 = oh * S.sh - S.ph;
        const bool rows_in = ih0 >= 0 && ih0 + (S.kh - 1) * S.dh < S.h;
        for (int64_t ow = 0; ow < S.wo; ++ow) {
            const int64_t iw0 = ow * S.sw - S.pw;
            if (rows_in && ow >= ow_lo && ow < ow_hi) {
                const uint8_t* base = xb + (ih0 * S.w + iw0) * C;
                for (int64_t t = 0; t < 2 * pairs; ++t) tp[t] = base + off[t];
            } else {
                for (int64_t i = 0; i < S.kh; ++i) {
                    const int64_t ih = ih0 + i * S.dh;
                    for (int64_t jj = 0; jj < S.kw; ++jj) {
                        const int64_t iw = iw0 + jj * S.dw;
                        const bool in = ih >= 0 && ih < S.h && iw >= 0 && iw < S.w;
                        tp[i * S.kw + jj] = in ? xb + (ih * S.w + iw) * C : zrow;
                    }
                }
                if (taps & 1) tp[taps] = zrow;
            }
            dw_pixel(tp, j.wpair, j.w, C, taps, pairs, T + ow * C);
        }
        epilogue_avx2(j.epi, T, C, r * S.wo, S.wo, 0, C, j.corr);
    }
}

}  // namespace int8
}  // namespace lowbit

#endif  // LOWBIT_INT8_X86
