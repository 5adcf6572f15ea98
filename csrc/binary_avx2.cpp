// Binary AVX2 path: popcount of a XOR w by nibble lookup (vpshufb) on pre-split nibble planes:
// popcount(a ^ w) over a byte = lut[(a_lo ^ w_lo)] + lut[(a_hi ^ w_hi)], where x_lo = x & 0x0f and
// x_hi = (x >> 4) & 0x0f are computed once per operand (weights at pack time, activations once per
// row block) instead of once per pair: 6 instructions per 256 bit-products (2 vpxor, 2 vpshufb,
// 2 vpaddb). Counts accumulate in bytes (<= 4 + 4 = 8 per word step, so at most 31 steps before a
// byte could pass 255) and are widened with vpsadbw. Vectorized across 4 output channels per YMM:
// a panel word index holds 8 channels (two YMM), the activation word is broadcast.
#include "binary.h"

#ifdef LOWBIT_X86
#include <algorithm>

namespace lowbit {
namespace binary {

// up to 31 word steps per byte-accumulator flush (8 * 31 = 248 <= 255)
constexpr int64_t FLUSH = 31;

// 4 x uint64 lane sums (channels 0-3) and (4-7) -> 8 x int32 in channel order
LB_AVX2 static inline __m256i narrow_pair(__m256i s0, __m256i s1) {
    const __m256i idx = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
    const __m256i t = _mm256_permutevar8x32_epi32(s0, idx);
    const __m256i u = _mm256_permutevar8x32_epi32(s1, idx);
    return _mm256_permute2x128_si256(t, u, 0x20);
}

template <int MR>
LB_AVX2 static void tile_avx2_t(const uint64_t* Alo, const uint64_t* Ahi, int64_t lda, const uint64_t* Plo,
                                const uint64_t* Phi, int64_t KW, int32_t Kbits, int64_t m, int64_t n0, int cnt,
                                const wb::Epi& e, const wb::Out& o) {
    const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3,
                                         2, 3, 3, 4);
    const __m256i zero = _mm256_setzero_si256();
    alignas(32) int32_t pc[MR * 8] = {};  // popcounts, channels 0..7 of each row
    for (int64_t k0 = 0; k0 < KW; k0 += FLUSH) {
        const int64_t k1 = std::min<int64_t>(KW, k0 + FLUSH);
        __m256i c0[MR], c1[MR];
#pragma GCC unroll 8
        for (int r = 0; r < MR; ++r) c0[r] = c1[r] = zero;
        for (int64_t k = k0; k < k1; ++k) {
            const __m256i wl0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(Plo + k * NR));
            const __m256i wl1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(Plo + k * NR + 4));
            const __m256i wh0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(Phi + k * NR));
            const __m256i wh1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(Phi + k * NR + 4));
#pragma GCC unroll 8
            for (int r = 0; r < MR; ++r) {
                const __m256i al = _mm256_set1_epi64x(static_cast<long long>(Alo[r * lda + k]));
                const __m256i ah = _mm256_set1_epi64x(static_cast<long long>(Ahi[r * lda + k]));
                c0[r] = _mm256_add_epi8(c0[r], _mm256_shuffle_epi8(lut, _mm256_xor_si256(al, wl0)));
                c1[r] = _mm256_add_epi8(c1[r], _mm256_shuffle_epi8(lut, _mm256_xor_si256(al, wl1)));
                c0[r] = _mm256_add_epi8(c0[r], _mm256_shuffle_epi8(lut, _mm256_xor_si256(ah, wh0)));
                c1[r] = _mm256_add_epi8(c1[r], _mm256_shuffle_epi8(lut, _mm256_xor_si256(ah, wh1)));
            }
        }
#pragma GCC unroll 8
        for (int r = 0; r < MR; ++r) {
            __m256i* d = reinterpret_cast<__m256i*>(pc + r * 8);
            const __m256i s = narrow_pair(_mm256_sad_epu8(c0[r], zero), _mm256_sad_epu8(c1[r], zero));
            _mm256_store_si256(d, _mm256_add_epi32(_mm256_load_si256(d), s));
        }
    }
    // epilogue, fused: dot = K - 2 * popcount
    const __m256i kb = _mm256_set1_epi32(Kbits);
    if (e.kind == wb::EPI_BITS && cnt == 8) {
        const __m256i thr = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(e.thr + n0));
        uint32_t fb = 0;
        if (e.flip)
            for (int j = 0; j < 8; ++j) fb |= static_cast<uint32_t>(e.flip[n0 + j] & 1u) << j;
#pragma GCC unroll 8
        for (int r = 0; r < MR; ++r) {
            const __m256i p = _mm256_load_si256(reinterpret_cast<const __m256i*>(pc + r * 8));
            const __m256i dot = _mm256_sub_epi32(kb, _mm256_slli_epi32(p, 1));
            const uint32_t lt = static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(thr, dot))));
            wb::store_bits8(((~lt) & 0xffu) ^ fb, m + r, n0, 8, o);
        }
        return;
    }
    alignas(32) int32_t dot[8];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
        const __m256i p = _mm256_load_si256(reinterpret_cast<const __m256i*>(pc + r * 8));
        const __m256i d = _mm256_sub_epi32(kb, _mm256_slli_epi32(p, 1));
        if (e.kind == wb::EPI_BITS) {
            wb::store_bits8(wb::threshold_bits8_avx2(d, n0, cnt, e), m + r, n0, cnt, o);
        } else {
            _mm256_store_si256(reinterpret_cast<__m256i*>(dot), d);
            wb::epi_row_avx2(dot, m + r, n0, n0, cnt, e, o);
        }
    }
}

LB_AVX2 static void tile_avx2(const uint64_t* A0, const uint64_t* A1, int64_t lda, int mr, const uint64_t* P0,
                              const uint64_t* P1, int64_t, int, int64_t KW, int32_t Kbits, int64_t m, int64_t n0,
                              int cnt, const wb::Epi& e, const wb::Out& o) {
    switch (mr) {
        case 1: tile_avx2_t<1>(A0, A1, lda, P0, P1, KW, Kbits, m, n0, cnt, e, o); break;
        case 2: tile_avx2_t<2>(A0, A1, lda, P0, P1, KW, Kbits, m, n0, cnt, e, o); break;
        case 3: tile_avx2_t<3>(A0, A1, lda, P0, P1, KW, Kbits, m, n0, cnt, e, o); break;
        default: tile_avx2_t<4>(A0, A1, lda, P0, P1, KW, Kbits, m, n0, cnt, e, o); break;
    }
}

Kernel kernel_avx2() {
    Kernel k;
    k.mr = 3;
    k.np = 1;
    k.planes = true;
    k.tile = tile_avx2;
    k.name = "avx2";
    return k;
}

}  // namespace binary
}  // namespace lowbit
#endif
