// 4.6-bit AVX2 path: vpmaddubsw (unsigned activation codes x signed weight codes -> int16 pair sums,
// which cannot saturate under K_x*K_w <= 127), vpaddw into int16 accumulators for `flush` steps, then
// vpmaddwd with ones into int32 (interval proven in w46.cpp). Tile: up to 6 rows x 16 channels
// (12 int16 accumulators + 2 weight registers + 1 broadcast).
#include "w46.h"

#ifdef LOWBIT_X86
#include <algorithm>

namespace lowbit {
namespace w46 {

template <int MR>
LB_AVX2 static void tile_avx2_t(const uint8_t* A, int64_t lda, const int8_t* P, int64_t Kq, int flush,
                                const int32_t* corr, int64_t m, int64_t n0, int cnt, const wb::Epi& e,
                                const wb::Out& o) {
    alignas(32) int32_t acc[MR * ACC_LD];
    const __m256i ones = _mm256_set1_epi16(1);
    {
        const __m256i k0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(corr));
        const __m256i k1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(corr + 8));
#pragma GCC unroll 8
        for (int r = 0; r < MR; ++r) {
            _mm256_store_si256(reinterpret_cast<__m256i*>(acc + r * ACC_LD), k0);
            _mm256_store_si256(reinterpret_cast<__m256i*>(acc + r * ACC_LD + 8), k1);
        }
    }
    for (int64_t q0 = 0; q0 < Kq; q0 += flush) {
        const int64_t q1 = std::min<int64_t>(Kq, q0 + flush);
        __m256i c0[MR], c1[MR];
#pragma GCC unroll 8
        for (int r = 0; r < MR; ++r) c0[r] = c1[r] = _mm256_setzero_si256();
        const uint8_t* a = A + q0 * 4;
        const int8_t* p = P + q0 * 64;
        for (int64_t q = q0; q < q1; ++q, a += 4, p += 64) {
            const __m256i w0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(p));
            const __m256i w1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(p + 32));
#pragma GCC unroll 8
            for (int r = 0; r < MR; ++r) {
                int32_t v;
                std::memcpy(&v, a + r * lda, 4);
                const __m256i av = _mm256_set1_epi32(v);
                c0[r] = _mm256_add_epi16(c0[r], _mm256_maddubs_epi16(av, w0));
                c1[r] = _mm256_add_epi16(c1[r], _mm256_maddubs_epi16(av, w1));
            }
        }
#pragma GCC unroll 8
        for (int r = 0; r < MR; ++r) {
            __m256i* d = reinterpret_cast<__m256i*>(acc + r * ACC_LD);
            _mm256_store_si256(d, _mm256_add_epi32(_mm256_load_si256(d), _mm256_madd_epi16(c0[r], ones)));
            _mm256_store_si256(d + 1, _mm256_add_epi32(_mm256_load_si256(d + 1), _mm256_madd_epi16(c1[r], ones)));
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) wb::epi_row_avx2(acc + r * ACC_LD, m + r, n0, n0, cnt, e, o);
}

LB_AVX2 static void tile_avx2(const uint8_t* A, int64_t lda, int mr, const int8_t* P, int64_t, int, int64_t Kq,
                              int flush, const int32_t* corr, int64_t m, int64_t n0, int cnt, const wb::Epi& e,
                              const wb::Out& o) {
    switch (mr) {
        case 1: tile_avx2_t<1>(A, lda, P, Kq, flush, corr, m, n0, cnt, e, o); break;
        case 2: tile_avx2_t<2>(A, lda, P, Kq, flush, corr, m, n0, cnt, e, o); break;
        case 3: tile_avx2_t<3>(A, lda, P, Kq, flush, corr, m, n0, cnt, e, o); break;
        case 4: tile_avx2_t<4>(A, lda, P, Kq, flush, corr, m, n0, cnt, e, o); break;
        case 5: tile_avx2_t<5>(A, lda, P, Kq, flush, corr, m, n0, cnt, e, o); break;
        default: tile_avx2_t<6>(A, lda, P, Kq, flush, corr, m, n0, cnt, e, o); break;
    }
}

Kernel kernel_avx2() {
    Kernel k;
    k.mr = 6;
    k.np = 1;
    k.tile = tile_avx2;
    k.name = "avx2";
    return k;
}

}  // namespace w46
}  // namespace lowbit
#endif
