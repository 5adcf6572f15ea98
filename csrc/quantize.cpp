// float32 -> uint8 affine quantization (quantize.h): portable specification, AVX2 path, dispatch.
#include "quantize.h"

#include <algorithm>
#include <cmath>

#include "cpu_features.h"
#include "parallel.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define LOWBIT_QUANT_X86 1
#endif

namespace lowbit {
namespace quant {

namespace {

inline uint8_t one(float x, float scale, const QuantParams& p) {
    float q = std::nearbyint(x / scale) + p.zp;  // default rounding mode: to nearest, ties to even
    q = q > p.lo ? q : p.lo;                      // NaN compares false: lo
    q = q < p.hi ? q : p.hi;
    return static_cast<uint8_t>(static_cast<int32_t>(q));
}

}  // namespace

void quantize_run_portable(const float* x, uint8_t* out, int64_t n, float scale, const QuantParams& p) {
    for (int64_t i = 0; i < n; ++i) out[i] = one(x[i], scale, p);
}

#ifdef LOWBIT_QUANT_X86
namespace {

__attribute__((target("avx2"))) inline __m256i codes8(const float* x, __m256 s, __m256 zp, __m256 lo, __m256 hi) {
    __m256 q = _mm256_div_ps(_mm256_loadu_ps(x), s);
    q = _mm256_round_ps(q, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    q = _mm256_add_ps(q, zp);
    q = _mm256_max_ps(q, lo);  // (q, lo): a NaN q gives lo, as in the portable path
    q = _mm256_min_ps(q, hi);
    return _mm256_cvtps_epi32(q);  // integral values in [0, 255]: exact
}

}  // namespace

__attribute__((target("avx2"))) void quantize_run_avx2(const float* x, uint8_t* out, int64_t n, float scale,
                                                      const QuantParams& p) {
    const __m256 s = _mm256_set1_ps(scale), zp = _mm256_set1_ps(p.zp);
    const __m256 lo = _mm256_set1_ps(p.lo), hi = _mm256_set1_ps(p.hi);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        const __m256i a = codes8(x + i, s, zp, lo, hi), b = codes8(x + i + 8, s, zp, lo, hi);
        const __m256i c = codes8(x + i + 16, s, zp, lo, hi), d = codes8(x + i + 24, s, zp, lo, hi);
        // packs work per 128-bit lane: bytes come out as a0-3 b0-3 c0-3 d0-3 | a4-7 b4-7 c4-7 d4-7
        const __m256i ab = _mm256_packus_epi32(a, b), cd = _mm256_packus_epi32(c, d);
        const __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(ab, cd), order);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), bytes);
    }
    quantize_run_portable(x + i, out + i, n - i, scale, p);
}
#else
void quantize_run_avx2(const float* x, uint8_t* out, int64_t n, float scale, const QuantParams& p) {
    quantize_run_portable(x, out, n, scale, p);
}
#endif

void quantize_u8(const float* x, uint8_t* out, int64_t rows, int64_t cols, const QuantParams& p) {
    if (rows <= 0 || cols <= 0) return;
    auto fn = quantize_run_portable;
#ifdef LOWBIT_QUANT_X86
    if (active_isa() >= Isa::avx2) fn = quantize_run_avx2;
#endif
    if (p.per_row) {
        parallel_for(rows, std::max<int64_t>(1, 32768 / cols), [&](int64_t r0, int64_t r1) {
            for (int64_t r = r0; r < r1; ++r) fn(x + r * cols, out + r * cols, cols, p.scale[r], p);
        });
        return;
    }
    // One scale: chunks of whole 32-element blocks (the same splits on every thread count).
    const int64_t n = rows * cols, blocks = (n + 31) / 32;
    parallel_for(blocks, 1024, [&](int64_t b0, int64_t b1) {
        const int64_t i0 = b0 * 32, i1 = std::min(n, b1 * 32);
        fn(x + i0, out + i0, i1 - i0, p.scale[0], p);
    });
}

}  // namespace quant
}  // namespace lowbit
