// Binary AVX-512 paths (compiled on every x86; run only where the CPU has them). One ZMM holds the
// 8 channels of a panel at one word index; the activation word is broadcast.
//   VPOPCNTDQ (Ice Lake and later, Zen 4): vpxorq + vpopcntq + vpaddq per 512 bit-products.
//   AVX-512BW without it (Skylake-X): the AVX2 nibble-plane pshufb scheme at 512 bits, byte counts
//   flushed every 31 word steps with vpsadbw.
#include "binary.h"

#ifdef LOWBIT_X86
#include <algorithm>

#include "cpu_features.h"

namespace lowbit {
namespace binary {

#ifndef LB_AVX512  // (predefined by the emulation checks, *_emu_check.cc)
#define LB_AVX512 __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl")))
#endif
#ifndef LB_AVX512POP
#define LB_AVX512POP __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512vpopcntdq")))
#endif

constexpr int64_t FLUSH512 = 31;
// (_mm512_maskz_cvtepi64_epi32 with a full mask = vpmovqd; the unmasked intrinsic trips a GCC 12
// -Wuninitialized false positive on its _mm256_undefined_si256 operand.)

template <int MR, int NP>
LB_AVX512POP static void tile_pop_t(const uint64_t* A, int64_t lda, const uint64_t* P, int64_t pstride, int64_t KW,
                                    int32_t* pc) {
    __m512i c[MR][NP];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
        for (int j = 0; j < NP; ++j) c[r][j] = _mm512_setzero_si512();
    for (int64_t k = 0; k < KW; ++k) {
        __m512i wv[NP];
#pragma GCC unroll 2
        for (int j = 0; j < NP; ++j) wv[j] = _mm512_load_si512(P + j * pstride + k * NR);
#pragma GCC unroll 8
        for (int r = 0; r < MR; ++r) {
            const __m512i av = _mm512_set1_epi64(static_cast<long long>(A[r * lda + k]));
#pragma GCC unroll 2
            for (int j = 0; j < NP; ++j)
                c[r][j] = _mm512_add_epi64(c[r][j], _mm512_popcnt_epi64(_mm512_xor_si512(av, wv[j])));
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
        for (int j = 0; j < NP; ++j) {
            __m256i* d = reinterpret_cast<__m256i*>(pc + r * ACC_LD + j * NR);
            _mm256_storeu_si256(d, _mm256_add_epi32(_mm256_loadu_si256(d), _mm512_maskz_cvtepi64_epi32(0xff, c[r][j])));
        }
}

template <int MR, int NP>
LB_AVX512 static void tile_lut_t(const uint64_t* Alo, const uint64_t* Ahi, int64_t lda, const uint64_t* Plo,
                                 const uint64_t* Phi, int64_t pstride, int64_t KW, int32_t* pc) {
    alignas(64) static const uint8_t kLut[64] = {0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2, 1, 2,
                                                 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3,
                                                 2, 3, 3, 4, 0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4};
    const __m512i lut = _mm512_load_si512(kLut);
    const __m512i zero = _mm512_setzero_si512();
    for (int64_t k0 = 0; k0 < KW; k0 += FLUSH512) {
        const int64_t k1 = std::min<int64_t>(KW, k0 + FLUSH512);
        __m512i c[MR][NP];
#pragma GCC unroll 8
        for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
            for (int j = 0; j < NP; ++j) c[r][j] = zero;
        for (int64_t k = k0; k < k1; ++k) {
            __m512i wl[NP], wh[NP];
#pragma GCC unroll 2
            for (int j = 0; j < NP; ++j) {
                wl[j] = _mm512_load_si512(Plo + j * pstride + k * NR);
                wh[j] = _mm512_load_si512(Phi + j * pstride + k * NR);
            }
#pragma GCC unroll 8
            for (int r = 0; r < MR; ++r) {
                const __m512i al = _mm512_set1_epi64(static_cast<long long>(Alo[r * lda + k]));
                const __m512i ah = _mm512_set1_epi64(static_cast<long long>(Ahi[r * lda + k]));
#pragma GCC unroll 2
                for (int j = 0; j < NP; ++j) {
                    c[r][j] = _mm512_add_epi8(c[r][j], _mm512_shuffle_epi8(lut, _mm512_xor_si512(al, wl[j])));
                    c[r][j] = _mm512_add_epi8(c[r][j], _mm512_shuffle_epi8(lut, _mm512_xor_si512(ah, wh[j])));
                }
            }
        }
#pragma GCC unroll 8
        for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
            for (int j = 0; j < NP; ++j) {
                __m256i* d = reinterpret_cast<__m256i*>(pc + r * ACC_LD + j * NR);
                // the planes hold channels in kPlaneSlot order (0,2,4,6,1,3,5,7): put them back
                const __m256i s = _mm256_permutevar8x32_epi32(
                    _mm512_maskz_cvtepi64_epi32(0xff, _mm512_sad_epu8(c[r][j], zero)), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
                _mm256_storeu_si256(d, _mm256_add_epi32(_mm256_loadu_si256(d), s));
            }
    }
}

template <int NP>
LB_AVX512POP static void tile_pop_np(const uint64_t* A, int64_t lda, int mr, const uint64_t* P, int64_t ps, int64_t KW,
                                     int32_t* pc) {
    switch (mr) {
        case 1: tile_pop_t<1, NP>(A, lda, P, ps, KW, pc); break;
        case 2: tile_pop_t<2, NP>(A, lda, P, ps, KW, pc); break;
        case 3: tile_pop_t<3, NP>(A, lda, P, ps, KW, pc); break;
        case 4: tile_pop_t<4, NP>(A, lda, P, ps, KW, pc); break;
        case 5: tile_pop_t<5, NP>(A, lda, P, ps, KW, pc); break;
        case 6: tile_pop_t<6, NP>(A, lda, P, ps, KW, pc); break;
        case 7: tile_pop_t<7, NP>(A, lda, P, ps, KW, pc); break;
        default: tile_pop_t<8, NP>(A, lda, P, ps, KW, pc); break;
    }
}

template <int NP>
LB_AVX512 static void tile_lut_np(const uint64_t* A0, const uint64_t* A1, int64_t lda, int mr, const uint64_t* P0,
                                  const uint64_t* P1, int64_t ps, int64_t KW, int32_t* pc) {
    switch (mr) {
        case 1: tile_lut_t<1, NP>(A0, A1, lda, P0, P1, ps, KW, pc); break;
        case 2: tile_lut_t<2, NP>(A0, A1, lda, P0, P1, ps, KW, pc); break;
        case 3: tile_lut_t<3, NP>(A0, A1, lda, P0, P1, ps, KW, pc); break;
        case 4: tile_lut_t<4, NP>(A0, A1, lda, P0, P1, ps, KW, pc); break;
        case 5: tile_lut_t<5, NP>(A0, A1, lda, P0, P1, ps, KW, pc); break;
        default: tile_lut_t<6, NP>(A0, A1, lda, P0, P1, ps, KW, pc); break;
    }
}

LB_AVX2 static void epi_avx2(const int32_t* pc, int64_t m, int64_t n0, int cnt, int32_t Kbits, const wb::Epi& e,
                             const wb::Out& o);

LB_AVX512POP static void tile_pop(const uint64_t* A0, const uint64_t*, int64_t lda, int mr, const uint64_t* P0,
                                  const uint64_t*, int64_t ps, int np, int64_t KW, int32_t Kbits, int64_t m,
                                  int64_t n0, int cnt, const wb::Epi& e, const wb::Out& o) {
    alignas(64) int32_t pc[MAX_MR * ACC_LD] = {0};
    if (np >= 2)
        tile_pop_np<2>(A0, lda, mr, P0, ps, KW, pc);
    else
        tile_pop_np<1>(A0, lda, mr, P0, ps, KW, pc);
    for (int r = 0; r < mr; ++r) epi_avx2(pc + r * ACC_LD, m + r, n0, cnt, Kbits, e, o);
}

LB_AVX512 static void tile_lut(const uint64_t* A0, const uint64_t* A1, int64_t lda, int mr, const uint64_t* P0,
                               const uint64_t* P1, int64_t ps, int np, int64_t KW, int32_t Kbits, int64_t m, int64_t n0,
                               int cnt, const wb::Epi& e, const wb::Out& o) {
    alignas(64) int32_t pc[MAX_MR * ACC_LD] = {0};
    if (np >= 2)
        tile_lut_np<2>(A0, A1, lda, mr, P0, P1, ps, KW, pc);
    else
        tile_lut_np<1>(A0, A1, lda, mr, P0, P1, ps, KW, pc);
    for (int r = 0; r < mr; ++r) epi_avx2(pc + r * ACC_LD, m + r, n0, cnt, Kbits, e, o);
}

LB_AVX2 static void epi_avx2(const int32_t* pc, int64_t m, int64_t n0, int cnt, int32_t Kbits, const wb::Epi& e,
                             const wb::Out& o) {
    alignas(32) int32_t dot[ACC_LD];
    const __m256i kb = _mm256_set1_epi32(Kbits);
    for (int c = 0; c < ACC_LD; c += 8) {
        const __m256i p = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pc + c));
        _mm256_store_si256(reinterpret_cast<__m256i*>(dot + c), _mm256_sub_epi32(kb, _mm256_slli_epi32(p, 1)));
    }
    if (e.kind == wb::EPI_BITS) {
        for (int c = 0; c < cnt; c += 8) {
            const int k = std::min(8, cnt - c);
            const __m256i d = _mm256_load_si256(reinterpret_cast<const __m256i*>(dot + c));
            wb::store_bits8(wb::threshold_bits8_avx2(d, n0 + c, k, e), m, n0 + c, k, o);
        }
    } else {
        wb::epi_row_avx2(dot, m, n0, n0, cnt, e, o);
    }
}

LB_AVX512POP static void panel_pop(const uint64_t* A0, const uint64_t* A1, int64_t lda, int64_t rows,
                                   const uint64_t* P0, const uint64_t* P1, int64_t ps, int np, int64_t KW, int32_t Kbits,
                                   int64_t m, int64_t n0, int cnt, const wb::Epi& e, const wb::Out& o) {
    for (int64_t r = 0; r < rows; r += 8) {
        const int mr = static_cast<int>(std::min<int64_t>(8, rows - r));
        tile_pop(A0 + r * lda, A1, lda, mr, P0, P1, ps, np, KW, Kbits, m + r, n0, cnt, e, o);
    }
}

LB_AVX512 static void panel_lut(const uint64_t* A0, const uint64_t* A1, int64_t lda, int64_t rows, const uint64_t* P0,
                                const uint64_t* P1, int64_t ps, int np, int64_t KW, int32_t Kbits, int64_t m, int64_t n0,
                                int cnt, const wb::Epi& e, const wb::Out& o) {
    for (int64_t r = 0; r < rows; r += 6) {
        const int mr = static_cast<int>(std::min<int64_t>(6, rows - r));
        tile_lut(A0 + r * lda, A1 + r * lda, lda, mr, P0, P1, ps, np, KW, Kbits, m + r, n0, cnt, e, o);
    }
}

Kernel kernel_avx512() {
    Kernel k;
    k.np = 2;
    k.prep = prep_planes_avx2;
    if (cpu().avx512vpopcntdq) {
        k.mr = 8;
        k.planes = false;
        k.panel = panel_pop;
        k.name = "avx512_vpopcntdq";
    } else {
        k.mr = 6;
        k.planes = true;
        k.panel = panel_lut;
        k.name = "avx512bw";
    }
    return k;
}

}  // namespace binary
}  // namespace lowbit
#endif
