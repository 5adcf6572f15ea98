// AVX-512 VNNI int8 GEMM worker: vpdpbusd multiplies the u8 activations directly with the s8 weights
// (4 k per int32 lane, no intermediate saturation). The zero point is applied through the per-channel
// correction bias[n] - x_zp * colsum[n] (computed by the driver), so activations are packed as raw
// bytes: per tile [k4][mr][4] u8. Tile: up to 8 rows x 32 channels (two packed blocks, 16 zmm
// accumulators). The epilogue is the AVX2 one (8 channels per step).
#include "int8_common.h"

#ifdef LOWBIT_INT8_X86

#include <immintrin.h>

#include <algorithm>
#include <cstring>

#ifndef LB_VNNI  // (a test harness may substitute emulated intrinsics and its own attribute)
#define LB_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")))
#endif

namespace lowbit {
namespace int8 {

namespace {

constexpr int kMr = 8;
constexpr int64_t kKcMax = 128;  // k4 groups per K block
constexpr int64_t kLdt = 2 * kBlockN;

void pack_a_tile_u8(const GemmJob& j, int64_t m0, int mr, uint8_t* dst, uint8_t* rowbuf) {
    const int64_t K = j.a->k, k4 = j.w->k4, full = K / 4;
    for (int r = 0; r < mr; ++r) {
        const uint8_t* x = j.a->row(m0 + r, rowbuf);
        uint8_t* d = dst + r * 4;
        for (int64_t q = 0; q < full; ++q) std::memcpy(d + q * mr * 4, x + q * 4, 4);
        for (int64_t q = full; q < k4; ++q)
            for (int i = 0; i < 4; ++i) d[q * mr * 4 + i] = q * 4 + i < K ? x[q * 4 + i] : uint8_t(0);
    }
}

template <int MR, int NBK>
LB_VNNI void kernel(const uint8_t* A, const int8_t* W0, const int8_t* W1, int64_t kq, int32_t* T, bool first) {
    __m512i acc[MR][NBK];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
        for (int b = 0; b < NBK; ++b) acc[r][b] = _mm512_setzero_si512();
    for (int64_t q = 0; q < kq; ++q) {
        __m512i w[NBK];
        w[0] = _mm512_loadu_si512(W0 + q * 64);
        if (NBK > 1) w[NBK - 1] = _mm512_loadu_si512(W1 + q * 64);
        const uint8_t* aq = A + q * (MR * 4);
#pragma GCC unroll 8
        for (int r = 0; r < MR; ++r) {
            int32_t v;
            std::memcpy(&v, aq + r * 4, sizeof(v));
            const __m512i x = _mm512_set1_epi32(v);
#pragma GCC unroll 2
            for (int b = 0; b < NBK; ++b) acc[r][b] = _mm512_dpbusd_epi32(acc[r][b], x, w[b]);
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
        for (int b = 0; b < NBK; ++b) {
            int32_t* dst = T + r * kLdt + b * kBlockN;
            __m512i s = acc[r][b];
            if (!first) s = _mm512_add_epi32(s, _mm512_loadu_si512(dst));
            _mm512_storeu_si512(dst, s);
        }
}

using KernelFn = void (*)(const uint8_t*, const int8_t*, const int8_t*, int64_t, int32_t*, bool);

constexpr KernelFn kKernels[2][kMr + 1] = {
    {nullptr, kernel<1, 1>, kernel<2, 1>, kernel<3, 1>, kernel<4, 1>, kernel<5, 1>, kernel<6, 1>, kernel<7, 1>,
     kernel<8, 1>},
    {nullptr, kernel<1, 2>, kernel<2, 2>, kernel<3, 2>, kernel<4, 2>, kernel<5, 2>, kernel<6, 2>, kernel<7, 2>,
     kernel<8, 2>},
};

}  // namespace

void chunk_vnni(const GemmJob& j, int64_t m0, int64_t m1, int64_t b0, int64_t b1) {
    const int64_t k4 = j.w->k4, rows = m1 - m0;
    const int64_t ntiles = (rows + kMr - 1) / kMr;
    const size_t tile_bytes = static_cast<size_t>(k4 * kMr * 4);
    uint8_t* A = scratch<uint8_t>(0, tile_bytes * static_cast<size_t>(ntiles));
    int32_t* T = scratch<int32_t>(1, static_cast<size_t>(ntiles * kMr * kLdt));
    uint8_t* rowbuf = scratch<uint8_t>(2, static_cast<size_t>(std::max<int64_t>(j.a->k, 1)));
    for (int64_t t = 0; t < ntiles; ++t) {
        const int mr = static_cast<int>(std::min<int64_t>(kMr, rows - t * kMr));
        pack_a_tile_u8(j, m0 + t * kMr, mr, A + t * tile_bytes, rowbuf);
    }
    const int64_t nkc = std::max<int64_t>(1, (k4 + kKcMax - 1) / kKcMax);
    const int64_t kc = std::max<int64_t>(1, (k4 + nkc - 1) / nkc);
    for (int64_t b = b0; b < b1; b += 2) {
        const int nbk = static_cast<int>(std::min<int64_t>(2, b1 - b));
        const int64_t cols = std::min<int64_t>(nbk * kBlockN, j.w->n - b * kBlockN);
        const int8_t* W0 = j.w->block(b);
        const int8_t* W1 = nbk > 1 ? j.w->block(b + 1) : W0;
        if (k4 == 0) std::memset(T, 0, static_cast<size_t>(ntiles * kMr * kLdt) * sizeof(int32_t));
        for (int64_t kb = 0; kb < k4; kb += kc) {
            const int64_t kq = std::min(kc, k4 - kb);
            const int64_t off = kb * (kBlockN * kGroupK);
            for (int64_t t = 0; t < ntiles; ++t) {
                const int mr = static_cast<int>(std::min<int64_t>(kMr, rows - t * kMr));
                kKernels[nbk - 1][mr](A + t * tile_bytes + kb * mr * 4, W0 + off, W1 + off, kq,
                                      T + t * kMr * kLdt, kb == 0);
            }
        }
        epilogue_avx2(j.epi, T, kLdt, m0, rows, b * kBlockN, cols, j.corr);
    }
}

}  // namespace int8
}  // namespace lowbit

#endif  // LOWBIT_INT8_X86
