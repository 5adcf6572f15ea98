// BM AVX-512 path. Integer max-plus (AVX-512BW): a ZMM holds one panel (16 channels x one dword of
// 4 int8 / 2 int16 codes); per dword group of k the activation dword is broadcast (a plain load),
// added with signed saturation (vpaddsb / vpaddsw) to the + and - weight panels and folded into
// running maxima (vpmaxsb / vpmaxsw): 4 instructions per 2 x 64 (int8) or 2 x 32 (int16) terms. Tile:
// 8 rows x (+, -) panels = 16 accumulators. At the end of a row the 4 (2) lanes of a dword are
// reduced by shifts and maxima and sign-extended to int32.
// Float max-plus (AVX-512F): 6 rows x 2 panels of 16 channels; with the argmax, a greater-than mask
// selects the new maxima and their k (first occurrence kept, as torch.max).
#include "bm.h"

#ifdef LOWBIT_X86
#include <algorithm>
#include <cstring>
#include <limits>

namespace lowbit {
namespace bm {

#ifndef LB_AVX512
#define LB_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))
#endif

template <int MR, bool W16>
LB_AVX512 static inline void tile_int(const uint8_t* A, int64_t lda, const int32_t* P0, const int32_t* P1,
                                      int64_t KG, int32_t* R0, int32_t* R1, int64_t ldr) {
    __m512i acc0[MR], acc1[MR];
    const __m512i mn = W16 ? _mm512_set1_epi16(std::numeric_limits<int16_t>::min()) : _mm512_set1_epi8(-128);
    for (int r = 0; r < MR; ++r) acc0[r] = mn, acc1[r] = mn;
    for (int64_t g = 0; g < KG; ++g) {
        const __m512i w0 = _mm512_load_si512(P0 + g * NR);
        const __m512i w1 = _mm512_load_si512(P1 + g * NR);
        for (int r = 0; r < MR; ++r) {
            int32_t av;
            std::memcpy(&av, A + r * lda + g * 4, 4);
            const __m512i a = _mm512_set1_epi32(av);
            if (W16) {
                acc0[r] = _mm512_max_epi16(acc0[r], _mm512_adds_epi16(a, w0));
                acc1[r] = _mm512_max_epi16(acc1[r], _mm512_adds_epi16(a, w1));
            } else {
                acc0[r] = _mm512_max_epi8(acc0[r], _mm512_adds_epi8(a, w0));
                acc1[r] = _mm512_max_epi8(acc1[r], _mm512_adds_epi8(a, w1));
            }
        }
    }
    for (int r = 0; r < MR; ++r)
        for (int s = 0; s < 2; ++s) {
            const __m512i v = s == 0 ? acc0[r] : acc1[r];
            __m512i red;
            if (W16) {
                red = _mm512_max_epi16(v, _mm512_srli_epi32(v, 16));
                red = _mm512_srai_epi32(_mm512_slli_epi32(red, 16), 16);
            } else {
                red = _mm512_max_epi8(v, _mm512_srli_epi32(v, 16));
                red = _mm512_max_epi8(red, _mm512_srli_epi32(red, 8));
                red = _mm512_srai_epi32(_mm512_slli_epi32(red, 24), 24);
            }
            _mm512_storeu_si512(reinterpret_cast<void*>((s == 0 ? R0 : R1) + r * ldr), red);
        }
}

template <bool W16>
LB_AVX512 static void panel_int(const uint8_t* A, int64_t lda, int64_t rows, const int32_t* P0, const int32_t* P1,
                                int64_t KG, int32_t* R0, int32_t* R1, int64_t ldr) {
    int64_t r = 0;
    for (; r + 8 <= rows; r += 8) tile_int<8, W16>(A + r * lda, lda, P0, P1, KG, R0 + r * ldr, R1 + r * ldr, ldr);
    const int64_t left = rows - r;
    const uint8_t* a = A + r * lda;
    int32_t *q0 = R0 + r * ldr, *q1 = R1 + r * ldr;
    if (left >= 4) {
        tile_int<4, W16>(a, lda, P0, P1, KG, q0, q1, ldr);
        a += 4 * lda, q0 += 4 * ldr, q1 += 4 * ldr;
    }
    switch (left & 3) {
        case 3: tile_int<3, W16>(a, lda, P0, P1, KG, q0, q1, ldr); break;
        case 2: tile_int<2, W16>(a, lda, P0, P1, KG, q0, q1, ldr); break;
        case 1: tile_int<1, W16>(a, lda, P0, P1, KG, q0, q1, ldr); break;
        default: break;
    }
}

template <int MR, int NP, bool IDX>
LB_AVX512 static inline void tile_f32(const float* X, int64_t ldx, const float* P, int64_t K, float* Y, int32_t* I,
                                      int64_t ldy, int64_t n0, int cnt) {
    __m512 acc[MR][NP];
    __m512i idx[MR][NP];
    for (int r = 0; r < MR; ++r)
        for (int j = 0; j < NP; ++j) {
            acc[r][j] = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
            if (IDX) idx[r][j] = _mm512_setzero_si512();
        }
    for (int64_t k = 0; k < K; ++k) {
        __m512 w[NP];
        for (int j = 0; j < NP; ++j) w[j] = _mm512_load_ps(P + (j * K + k) * NR);
        const __m512i kv = _mm512_set1_epi32(static_cast<int32_t>(k));
        for (int r = 0; r < MR; ++r) {
            const __m512 b = _mm512_set1_ps(X[r * ldx + k]);
            for (int j = 0; j < NP; ++j) {
                const __m512 t = _mm512_add_ps(b, w[j]);
                if (IDX) {
                    const __mmask16 m = _mm512_cmp_ps_mask(t, acc[r][j], _CMP_GT_OQ);
                    acc[r][j] = _mm512_mask_mov_ps(acc[r][j], m, t);
                    idx[r][j] = _mm512_mask_mov_epi32(idx[r][j], m, kv);
                } else {
                    acc[r][j] = _mm512_max_ps(acc[r][j], t);
                }
            }
        }
    }
    for (int j = 0; j < NP; ++j) {
        const int cj = std::min(NR, cnt - j * NR);
        if (cj <= 0) break;
        const __mmask16 m = static_cast<__mmask16>(cj == 16 ? 0xffff : (1u << cj) - 1);
        for (int r = 0; r < MR; ++r) {
            _mm512_mask_storeu_ps(Y + r * ldy + n0 + j * NR, m, acc[r][j]);
            if (IDX) _mm512_mask_storeu_epi32(I + r * ldy + n0 + j * NR, m, idx[r][j]);
        }
    }
}

template <int NP, bool IDX>
LB_AVX512 static void rows_f32(const float* X, int64_t ldx, int64_t rows, const float* P, int64_t K, float* Y,
                               int32_t* I, int64_t ldy, int64_t n0, int cnt) {
    constexpr int MR = NP == 2 ? 6 : 8;
    int64_t r = 0;
    for (; r + MR <= rows; r += MR)
        tile_f32<MR, NP, IDX>(X + r * ldx, ldx, P, K, Y + r * ldy, IDX ? I + r * ldy : nullptr, ldy, n0, cnt);
    for (; r < rows; ++r)
        tile_f32<1, NP, IDX>(X + r * ldx, ldx, P, K, Y + r * ldy, IDX ? I + r * ldy : nullptr, ldy, n0, cnt);
}

template <bool IDX>
LB_AVX512 static void panel_f32(const float* X, int64_t ldx, int64_t rows, const float* P, int np, int64_t K, float* Y,
                                int32_t* I, int64_t ldy, int64_t n0, int cnt) {
    if (np == 2)
        rows_f32<2, IDX>(X, ldx, rows, P, K, Y, I, ldy, n0, cnt);
    else
        rows_f32<1, IDX>(X, ldx, rows, P, K, Y, I, ldy, n0, cnt);
}

Kernel kernel_avx512() {
    Kernel k;
    k.i8 = panel_int<false>;
    k.i16 = panel_int<true>;
    k.f32 = panel_f32<true>;
    k.f32max = panel_f32<false>;
    k.fnp = 2;
    k.name = "avx512bw";
    return k;
}

}  // namespace bm
}  // namespace lowbit
#endif
