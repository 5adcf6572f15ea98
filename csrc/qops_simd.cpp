// x86 SIMD paths of the residual add (see qops.h for why doubles are exact here):
//   t = m_a a + m_b b + C, C = -(m_a a_zp + m_b b_zp)       (integers below 2^41: exact)
//   out = clamp(floor(t 2^-rshift + 0.5) + out_zp, lo, hi)
// t 2^-rshift is exact (only the exponent moves). Adding 0.5 is exact for rshift <= 41 (the bits span at
// most 42 places); for rshift >= 42, |t 2^-rshift| < 1/4, so the sum is in (1/4, 3/4) and floors to 0
// however it rounds. out_zp is added after the floor (integers: exact).
// The tail (n not a multiple of the vector width) runs the scalar specification.
#include "qops.h"

#if defined(__x86_64__) || defined(_M_X64)

#include <immintrin.h>

#include <cmath>

namespace lowbit {
namespace qops {

namespace {

struct Consts {
    double ma, mb, c, scale, zo, lo, hi;
};

Consts consts(const AddParams& p) {
    Consts k;
    k.ma = double(p.m_a);
    k.mb = double(p.m_b);
    k.c = -(double(p.m_a) * p.a_zp + double(p.m_b) * p.b_zp);
    k.scale = std::ldexp(1.0, -p.rshift);
    k.zo = p.out_zp;
    k.lo = p.lo;
    k.hi = p.hi;
    return k;
}

}  // namespace

__attribute__((target("avx2,fma"))) void add_u8_avx2(const uint8_t* a, const uint8_t* b, uint8_t* out, int64_t n,
                                                     const AddParams& p) {
    const Consts k = consts(p);
    const __m256d ma = _mm256_set1_pd(k.ma), mb = _mm256_set1_pd(k.mb), c = _mm256_set1_pd(k.c);
    const __m256d sc = _mm256_set1_pd(k.scale), half = _mm256_set1_pd(0.5), zo = _mm256_set1_pd(k.zo);
    const __m256d lo = _mm256_set1_pd(k.lo), hi = _mm256_set1_pd(k.hi);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        int64_t va, vb;
        __builtin_memcpy(&va, a + i, 8);
        __builtin_memcpy(&vb, b + i, 8);
        const __m256i ia = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(va));
        const __m256i ib = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(vb));
        __m128i res[2];
        for (int h = 0; h < 2; ++h) {
            const __m128i ha = h ? _mm256_extracti128_si256(ia, 1) : _mm256_castsi256_si128(ia);
            const __m128i hb = h ? _mm256_extracti128_si256(ib, 1) : _mm256_castsi256_si128(ib);
            __m256d t = _mm256_fmadd_pd(ma, _mm256_cvtepi32_pd(ha), c);
            t = _mm256_fmadd_pd(mb, _mm256_cvtepi32_pd(hb), t);
            t = _mm256_add_pd(_mm256_floor_pd(_mm256_fmadd_pd(t, sc, half)), zo);
            t = _mm256_min_pd(_mm256_max_pd(t, lo), hi);
            res[h] = _mm256_cvttpd_epi32(t);
        }
        const __m128i w16 = _mm_packus_epi32(res[0], res[1]);
        const __m128i w8 = _mm_packus_epi16(w16, w16);
        _mm_storel_epi64(reinterpret_cast<__m128i*>(out + i), w8);
    }
    for (; i < n; ++i) out[i] = add_one(a[i], b[i], p);
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) void add_u8_avx512(const uint8_t* a, const uint8_t* b,
                                                                        uint8_t* out, int64_t n,
                                                                        const AddParams& p) {
    const Consts k = consts(p);
    const __m512d ma = _mm512_set1_pd(k.ma), mb = _mm512_set1_pd(k.mb), c = _mm512_set1_pd(k.c);
    const __m512d sc = _mm512_set1_pd(k.scale), half = _mm512_set1_pd(0.5), zo = _mm512_set1_pd(k.zo);
    const __m512d lo = _mm512_set1_pd(k.lo), hi = _mm512_set1_pd(k.hi);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512i ia = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a + i)));
        const __m512i ib = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + i)));
        __m256i res[2];
        for (int h = 0; h < 2; ++h) {
            const __m256i ha = h ? _mm512_extracti64x4_epi64(ia, 1) : _mm512_castsi512_si256(ia);
            const __m256i hb = h ? _mm512_extracti64x4_epi64(ib, 1) : _mm512_castsi512_si256(ib);
            __m512d t = _mm512_fmadd_pd(ma, _mm512_cvtepi32_pd(ha), c);
            t = _mm512_fmadd_pd(mb, _mm512_cvtepi32_pd(hb), t);
            t = _mm512_roundscale_pd(_mm512_fmadd_pd(t, sc, half), _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
            t = _mm512_add_pd(t, zo);
            t = _mm512_min_pd(_mm512_max_pd(t, lo), hi);
            res[h] = _mm512_cvttpd_epi32(t);
        }
        const __m512i all = _mm512_inserti64x4(_mm512_castsi256_si512(res[0]), res[1], 1);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), _mm512_cvtepi32_epi8(all));
    }
    for (; i < n; ++i) out[i] = add_one(a[i], b[i], p);
}

}  // namespace qops
}  // namespace lowbit

#endif
