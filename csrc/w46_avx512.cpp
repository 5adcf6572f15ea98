// 4.6-bit AVX-512 paths (compiled everywhere on x86; chosen at run time only on CPUs that have them).
//
// avx512bw: the AVX2 scheme at 512 bits: one ZMM holds a whole k-quad of a 16-channel panel;
//   vpmaddubsw -> vpaddw (int16, `flush` steps, interval proven in w46.cpp) -> vpmaddwd with ones
//   -> int32. Tile: up to 6 rows x 2 panels (32 channels): 12 int16 accumulators.
// vnni: vpdpbusd (u8 x s8, four products summed straight into int32, no saturation) on the same
//   layout: the int8 instruction applies directly, as methods.md §2 recommends on VNNI machines.
#include "w46.h"

#ifdef LOWBIT_X86
#include <algorithm>

namespace lowbit {
namespace w46 {

#ifndef LB_AVX512  // (predefined by the emulation checks, *_emu_check.cc)
#define LB_AVX512 __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl")))
#endif
#ifndef LB_VNNI
#define LB_VNNI __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")))
#endif

template <int MR, int NP>
LB_AVX512 static void tile_avx512_t(const uint8_t* A, int64_t lda, const int8_t* P, int64_t pstride, int64_t Kq,
                                    int flush, int32_t* acc) {
    const __m512i ones = _mm512_set1_epi16(1);
    for (int64_t q0 = 0; q0 < Kq; q0 += flush) {
        const int64_t q1 = std::min<int64_t>(Kq, q0 + flush);
        __m512i c[MR][NP];
#pragma GCC unroll 8
        for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
            for (int j = 0; j < NP; ++j) c[r][j] = _mm512_setzero_si512();
        const uint8_t* a = A + q0 * 4;
        for (int64_t q = q0; q < q1; ++q, a += 4) {
            __m512i wv[NP];
#pragma GCC unroll 2
            for (int j = 0; j < NP; ++j) wv[j] = _mm512_load_si512(P + j * pstride + q * 64);
#pragma GCC unroll 8
            for (int r = 0; r < MR; ++r) {
                int32_t v;
                std::memcpy(&v, a + r * lda, 4);
                const __m512i av = _mm512_set1_epi32(v);
#pragma GCC unroll 2
                for (int j = 0; j < NP; ++j) c[r][j] = _mm512_add_epi16(c[r][j], _mm512_maddubs_epi16(av, wv[j]));
            }
        }
#pragma GCC unroll 8
        for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
            for (int j = 0; j < NP; ++j) {
                int32_t* d = acc + r * ACC_LD + j * NR;
                _mm512_storeu_si512(d, _mm512_add_epi32(_mm512_loadu_si512(d), _mm512_madd_epi16(c[r][j], ones)));
            }
    }
}

template <int NP>
LB_AVX512 static void tile_avx512_np(const uint8_t* A, int64_t lda, int mr, const int8_t* P, int64_t pstride,
                                     int64_t Kq, int flush, int32_t* acc) {
    switch (mr) {
        case 1: tile_avx512_t<1, NP>(A, lda, P, pstride, Kq, flush, acc); break;
        case 2: tile_avx512_t<2, NP>(A, lda, P, pstride, Kq, flush, acc); break;
        case 3: tile_avx512_t<3, NP>(A, lda, P, pstride, Kq, flush, acc); break;
        case 4: tile_avx512_t<4, NP>(A, lda, P, pstride, Kq, flush, acc); break;
        case 5: tile_avx512_t<5, NP>(A, lda, P, pstride, Kq, flush, acc); break;
        default: tile_avx512_t<6, NP>(A, lda, P, pstride, Kq, flush, acc); break;
    }
}

static void init_acc(int32_t* acc, const int32_t* corr, int mr, int np) {
    for (int r = 0; r < mr; ++r) std::memcpy(acc + r * ACC_LD, corr, sizeof(int32_t) * np * NR);
}

LB_AVX512 static void tile_avx512(const uint8_t* A, int64_t lda, int mr, const int8_t* P, int64_t pstride, int np,
                                  int64_t Kq, int flush, const int32_t* corr, int64_t m, int64_t n0, int cnt,
                                  const wb::Epi& e, const wb::Out& o) {
    alignas(64) int32_t acc[MAX_MR * ACC_LD];
    init_acc(acc, corr, mr, np);
    if (np >= 2)
        tile_avx512_np<2>(A, lda, mr, P, pstride, Kq, flush, acc);
    else
        tile_avx512_np<1>(A, lda, mr, P, pstride, Kq, flush, acc);
    for (int r = 0; r < mr; ++r) wb::epi_row_avx2(acc + r * ACC_LD, m + r, n0, n0, cnt, e, o);
}

template <int MR, int NP>
LB_VNNI static void tile_vnni_t(const uint8_t* A, int64_t lda, const int8_t* P, int64_t pstride, int64_t Kq,
                                int32_t* acc) {
    __m512i c[MR][NP];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
        for (int j = 0; j < NP; ++j) c[r][j] = _mm512_loadu_si512(acc + r * ACC_LD + j * NR);
    const uint8_t* a = A;
    for (int64_t q = 0; q < Kq; ++q, a += 4) {
        __m512i wv[NP];
#pragma GCC unroll 2
        for (int j = 0; j < NP; ++j) wv[j] = _mm512_load_si512(P + j * pstride + q * 64);
#pragma GCC unroll 8
        for (int r = 0; r < MR; ++r) {
            int32_t v;
            std::memcpy(&v, a + r * lda, 4);
            const __m512i av = _mm512_set1_epi32(v);
#pragma GCC unroll 2
            for (int j = 0; j < NP; ++j) c[r][j] = _mm512_dpbusd_epi32(c[r][j], av, wv[j]);
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
        for (int j = 0; j < NP; ++j) _mm512_storeu_si512(acc + r * ACC_LD + j * NR, c[r][j]);
}

template <int NP>
LB_VNNI static void tile_vnni_np(const uint8_t* A, int64_t lda, int mr, const int8_t* P, int64_t pstride, int64_t Kq,
                                 int32_t* acc) {
    switch (mr) {
        case 1: tile_vnni_t<1, NP>(A, lda, P, pstride, Kq, acc); break;
        case 2: tile_vnni_t<2, NP>(A, lda, P, pstride, Kq, acc); break;
        case 3: tile_vnni_t<3, NP>(A, lda, P, pstride, Kq, acc); break;
        case 4: tile_vnni_t<4, NP>(A, lda, P, pstride, Kq, acc); break;
        case 5: tile_vnni_t<5, NP>(A, lda, P, pstride, Kq, acc); break;
        case 6: tile_vnni_t<6, NP>(A, lda, P, pstride, Kq, acc); break;
        case 7: tile_vnni_t<7, NP>(A, lda, P, pstride, Kq, acc); break;
        default: tile_vnni_t<8, NP>(A, lda, P, pstride, Kq, acc); break;
    }
}

LB_VNNI static void tile_vnni(const uint8_t* A, int64_t lda, int mr, const int8_t* P, int64_t pstride, int np,
                              int64_t Kq, int, const int32_t* corr, int64_t m, int64_t n0, int cnt, const wb::Epi& e,
                              const wb::Out& o) {
    alignas(64) int32_t acc[MAX_MR * ACC_LD];
    init_acc(acc, corr, mr, np);
    if (np >= 2)
        tile_vnni_np<2>(A, lda, mr, P, pstride, Kq, acc);
    else
        tile_vnni_np<1>(A, lda, mr, P, pstride, Kq, acc);
    for (int r = 0; r < mr; ++r) wb::epi_row_avx2(acc + r * ACC_LD, m + r, n0, n0, cnt, e, o);
}

Kernel kernel_avx512bw() {
    Kernel k;
    k.mr = 6;
    k.np = 2;
    k.tile = tile_avx512;
    k.name = "avx512bw";
    return k;
}

Kernel kernel_vnni() {
    Kernel k;
    k.mr = 8;
    k.np = 2;
    k.tile = tile_vnni;
    k.name = "vnni";
    return k;
}

}  // namespace w46
}  // namespace lowbit
#endif
