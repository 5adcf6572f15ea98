// BM AVX2 path: the AVX-512 scheme (bm_avx512.cpp) at 256 bits. A panel of 16 channels is two YMM;
// integer tile 2 rows x (+, -) panels = 8 accumulators, 4 weight registers and the broadcast; float
// tile 2 rows (argmax: maxima, indices and a blend mask) or 4 rows (values only) x one panel.
#include "bm.h"

#ifdef LOWBIT_X86
#include <algorithm>
#include <cstring>
#include <limits>

namespace lowbit {
namespace bm {

#define LB_BM_AVX2 __attribute__((target("avx2,fma")))

template <int MR, bool W16>
LB_BM_AVX2 static inline void tile_int(const uint8_t* A, int64_t lda, const int32_t* P0, const int32_t* P1,
                                       int64_t KG, int32_t* R0, int32_t* R1, int64_t ldr) {
    __m256i acc[MR][4];  // [row][(+ lo, + hi, - lo, - hi)]
    const __m256i mn = W16 ? _mm256_set1_epi16(std::numeric_limits<int16_t>::min()) : _mm256_set1_epi8(-128);
    for (int r = 0; r < MR; ++r)
        for (int j = 0; j < 4; ++j) acc[r][j] = mn;
    for (int64_t g = 0; g < KG; ++g) {
        __m256i w[4];
        w[0] = _mm256_load_si256(reinterpret_cast<const __m256i*>(P0 + g * NR));
        w[1] = _mm256_load_si256(reinterpret_cast<const __m256i*>(P0 + g * NR + 8));
        w[2] = _mm256_load_si256(reinterpret_cast<const __m256i*>(P1 + g * NR));
        w[3] = _mm256_load_si256(reinterpret_cast<const __m256i*>(P1 + g * NR + 8));
        for (int r = 0; r < MR; ++r) {
            int32_t av;
            std::memcpy(&av, A + r * lda + g * 4, 4);
            const __m256i a = _mm256_set1_epi32(av);
            for (int j = 0; j < 4; ++j) {
                if (W16)
                    acc[r][j] = _mm256_max_epi16(acc[r][j], _mm256_adds_epi16(a, w[j]));
                else
                    acc[r][j] = _mm256_max_epi8(acc[r][j], _mm256_adds_epi8(a, w[j]));
            }
        }
    }
    for (int r = 0; r < MR; ++r)
        for (int j = 0; j < 4; ++j) {
            const __m256i v = acc[r][j];
            __m256i red;
            if (W16) {
                red = _mm256_max_epi16(v, _mm256_srli_epi32(v, 16));
                red = _mm256_srai_epi32(_mm256_slli_epi32(red, 16), 16);
            } else {
                red = _mm256_max_epi8(v, _mm256_srli_epi32(v, 16));
                red = _mm256_max_epi8(red, _mm256_srli_epi32(red, 8));
                red = _mm256_srai_epi32(_mm256_slli_epi32(red, 24), 24);
            }
            int32_t* dst = (j < 2 ? R0 : R1) + r * ldr + (j & 1) * 8;
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), red);
        }
}

template <bool W16>
LB_BM_AVX2 static void panel_int(const uint8_t* A, int64_t lda, int64_t rows, const int32_t* P0, const int32_t* P1,
                                 int64_t KG, int32_t* R0, int32_t* R1, int64_t ldr) {
    int64_t r = 0;
    for (; r + 2 <= rows; r += 2) tile_int<2, W16>(A + r * lda, lda, P0, P1, KG, R0 + r * ldr, R1 + r * ldr, ldr);
    if (r < rows) tile_int<1, W16>(A + r * lda, lda, P0, P1, KG, R0 + r * ldr, R1 + r * ldr, ldr);
}

template <int MR, bool IDX>
LB_BM_AVX2 static inline void tile_f32(const float* X, int64_t ldx, const float* P, int64_t K, float* Y, int32_t* I,
                                       int64_t ldy, int64_t n0, int cnt) {
    __m256 acc[MR][2], idx[MR][2];  // idx: int32 indices carried in float registers (blends are bitwise)
    for (int r = 0; r < MR; ++r)
        for (int j = 0; j < 2; ++j) {
            acc[r][j] = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
            idx[r][j] = _mm256_setzero_ps();
        }
    for (int64_t k = 0; k < K; ++k) {
        const __m256 w0 = _mm256_load_ps(P + k * NR), w1 = _mm256_load_ps(P + k * NR + 8);
        const __m256 kv = _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int32_t>(k)));
        for (int r = 0; r < MR; ++r) {
            const __m256 b = _mm256_set1_ps(X[r * ldx + k]);
            for (int j = 0; j < 2; ++j) {
                const __m256 t = _mm256_add_ps(b, j == 0 ? w0 : w1);
                if (IDX) {
                    const __m256 m = _mm256_cmp_ps(t, acc[r][j], _CMP_GT_OQ);
                    acc[r][j] = _mm256_blendv_ps(acc[r][j], t, m);
                    idx[r][j] = _mm256_blendv_ps(idx[r][j], kv, m);
                } else {
                    acc[r][j] = _mm256_max_ps(acc[r][j], t);
                }
            }
        }
    }
    for (int r = 0; r < MR; ++r) {
        alignas(32) float yv[NR];
        alignas(32) int32_t iv[NR];
        for (int j = 0; j < 2; ++j) {
            _mm256_store_ps(yv + 8 * j, acc[r][j]);
            _mm256_store_si256(reinterpret_cast<__m256i*>(iv + 8 * j), _mm256_castps_si256(idx[r][j]));
        }
        for (int c = 0; c < cnt; ++c) {
            Y[r * ldy + n0 + c] = yv[c];
            if (IDX) I[r * ldy + n0 + c] = iv[c];
        }
    }
}

template <bool IDX>
LB_BM_AVX2 static void panel_f32(const float* X, int64_t ldx, int64_t rows, const float* P, int, int64_t K, float* Y,
                                 int32_t* I, int64_t ldy, int64_t n0, int cnt) {
    constexpr int MR = IDX ? 2 : 4;
    const int c = std::min(NR, cnt);
    int64_t r = 0;
    for (; r + MR <= rows; r += MR)
        tile_f32<MR, IDX>(X + r * ldx, ldx, P, K, Y + r * ldy, IDX ? I + r * ldy : nullptr, ldy, n0, c);
    for (; r < rows; ++r)
        tile_f32<1, IDX>(X + r * ldx, ldx, P, K, Y + r * ldy, IDX ? I + r * ldy : nullptr, ldy, n0, c);
}

Kernel kernel_avx2() {
    Kernel k;
    k.i8 = panel_int<false>;
    k.i16 = panel_int<true>;
    k.f32 = panel_f32<true>;
    k.f32max = panel_f32<false>;
    k.fnp = 1;
    k.name = "avx2";
    return k;
}

}  // namespace bm
}  // namespace lowbit
#endif
