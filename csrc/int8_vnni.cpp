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
#ifndef LB_VNNI_NO_DIRECT
#include "int8_epi_avx512.h"
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

#ifndef LB_VNNI_NO_DIRECT
// ----------------------------------------------------------------------------------------------------
// Direct path: no packed activation panel. The activations are broadcast straight from their rows (a
// dense matrix, or the NHWC input of a convolution: one run of C bytes per filter tap, with a run of
// zero points for padding), so a convolution needs no im2col pass and a GEMM no packing pass. Needs
// runs whose length is a multiple of 4 (then the k-groups of the packed weights never straddle two
// runs). Tile: MR rows x NB blocks of 16 channels, accumulators in registers from the first k to the
// epilogue (int8_epi_avx512.h), which stores straight to the output.

constexpr int kDirectMr = 8;

// Dot products of an MR x NB tile over the k-groups [g0, g1) of K (run t = g / rq, group q = g % rq of
// the run). first: start from the correction, else from T; the sums go to T.
template <int MR, int NB>
LB_VNNI void direct_dots(const uint8_t* const* ptr, int64_t g0, int64_t g1, int64_t rq, const int8_t* W,
                         int64_t bstride, const ColParams* cp, __m512i* T, bool first) {
    __m512i acc[MR][NB];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
        for (int b = 0; b < NB; ++b) acc[r][b] = first ? cp[b].corr : _mm512_load_si512(T + r * NB + b);
    for (int64_t g = g0, t = g0 / rq, q0 = g0 % rq; g < g1; ++t, q0 = 0) {
        const int64_t q1 = std::min(rq, q0 + (g1 - g));
        const uint8_t* p[MR];
#pragma GCC unroll 8
        for (int r = 0; r < MR; ++r) p[r] = ptr[t * MR + r];
        const int8_t* wt = W + t * rq * 64;
        for (int64_t q = q0; q < q1; ++q) {
            __m512i w[NB];
#pragma GCC unroll 4
            for (int b = 0; b < NB; ++b) w[b] = _mm512_loadu_si512(wt + q * 64 + b * bstride);
#pragma GCC unroll 8
            for (int r = 0; r < MR; ++r) {
                int32_t v;
                std::memcpy(&v, p[r] + 4 * q, sizeof(v));
                const __m512i x = _mm512_set1_epi32(v);
#pragma GCC unroll 4
                for (int b = 0; b < NB; ++b) acc[r][b] = _mm512_dpbusd_epi32(acc[r][b], x, w[b]);
            }
        }
        g += q1 - q0;
    }
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
        for (int b = 0; b < NB; ++b) _mm512_store_si512(T + r * NB + b, acc[r][b]);
}

// The epilogue of an MR x NB tile of finished sums in T (kept apart from the dot products: in the same
// body GCC keeps the accumulator array in memory), straight to the output.
template <int MR, int NB>
LB_VNNI void direct_tile(const uint8_t* const* ptr, int64_t g0, int64_t g1, int64_t rq, const int8_t* W,
                         int64_t bstride, const ColParams* cp, __m512i* T, bool first, bool last, char* out,
                         int64_t ldo_bytes, int64_t esz, int last_n, const Epi* add) {
    direct_dots<MR, NB>(ptr, g0, g1, rq, W, bstride, cp, T, first);
    if (!last) return;
    const __mmask16 lastm = static_cast<__mmask16>((1u << last_n) - 1);
    for (int r = 0; r < MR; ++r)
        for (int b = 0; b < NB; ++b) {
            char* o = out + r * ldo_bytes + b * 16 * esz;
            const __mmask16 m = b == NB - 1 ? lastm : 0xFFFF;
            if (add)  // fused residual add: u8 output, the residual at the same offset as the output
                col_store_add(cp[b], *add, T[r * NB + b], o,
                              add->add_res + (o - static_cast<const char*>(add->out)), m);
            else
                col_store(cp[b], T[r * NB + b], o, m);
        }
}

using DirectFn = void (*)(const uint8_t* const*, int64_t, int64_t, int64_t, const int8_t*, int64_t, const ColParams*,
                          __m512i*, bool, bool, char*, int64_t, int64_t, int, const Epi*);

#define LB_ROWS(NB)                                                                                         \
    {nullptr, direct_tile<1, NB>, direct_tile<2, NB>, direct_tile<3, NB>, direct_tile<4, NB>, direct_tile<5, NB>, \
     direct_tile<6, NB>, direct_tile<7, NB>, direct_tile<8, NB>}
constexpr DirectFn kDirect[3][kDirectMr + 1] = {LB_ROWS(1), LB_ROWS(2), LB_ROWS(3)};
#undef LB_ROWS

void chunk_vnni_direct(const GemmJob& j, int64_t m0, int64_t m1, int64_t b0, int64_t b1) {
    const Rows& A = *j.a;
    const int64_t runs = A.runs(), rq = A.run_len() / 4, k4 = j.w->k4;
    const Epi& e = j.epi;
    const int64_t esz = epi_elem_size(e.kind);
    const int64_t nblk = b1 - b0;
    ColParams* cp = scratch<ColParams>(7, static_cast<size_t>(nblk));
    for (int64_t b = b0; b < b1; ++b)
        col_params(e, j.corr, b, static_cast<int>(std::min<int64_t>(16, j.w->n - 16 * b)), cp[b - b0]);
    // Run pointers of every row of the chunk, tile by tile: [tile][run][row of the tile].
    const int64_t rows = m1 - m0, ntiles = (rows + kDirectMr - 1) / kDirectMr;
    const uint8_t** rp = scratch<const uint8_t*>(4, static_cast<size_t>(runs * (ntiles * kDirectMr + 1)));
    const uint8_t** ptrs = rp + runs;
    // assembled runs (padding): room for every run of every row of the chunk (+ 64 bytes: a 4-byte
    // broadcast of the last group never reads past the buffer)
    const int64_t row_bytes = runs * A.run_len();
    uint8_t* rbuf = scratch<uint8_t>(2, static_cast<size_t>(rows * row_bytes + 64));
    const uint8_t** rp_rows = scratch<const uint8_t*>(5, static_cast<size_t>(runs * kDirectMr));
    for (int64_t t = 0; t < ntiles; ++t) {
        const int mr = static_cast<int>(std::min<int64_t>(kDirectMr, rows - t * kDirectMr));
        const uint8_t** ptr = ptrs + t * runs * kDirectMr;
        A.run_ptrs_many(m0 + t * kDirectMr, mr, rp_rows, rbuf + t * kDirectMr * row_bytes);
        for (int r = 0; r < mr; ++r)
            for (int64_t u = 0; u < runs; ++u) ptr[u * mr + r] = rp_rows[r * runs + u];
    }
    // Block groups outer, K blocks next, row tiles inner: a block group's weights for one K block
    // (<= 160 k-groups x 3 x 64 bytes = 30 KB) stay in L1 across the chunk's rows; partial sums wait in T.
    constexpr int kNb = 3;  // 8 x 3 tile: 24 accumulators, 3 weight registers, 1 broadcast
    const int64_t ng = runs * rq, nkb = (ng + 159) / 160, kc = (ng + nkb - 1) / nkb;
    const int64_t ngrp = (nblk + kNb - 1) / kNb;  // block groups of as equal sizes as possible (4 -> 2 + 2)
    __m512i* T = scratch<__m512i>(3, static_cast<size_t>(ntiles * kDirectMr * kNb));
    for (int64_t gi = 0; gi < ngrp; ++gi) {
        const int64_t b = b0 + gi * nblk / ngrp;
        const int nb = static_cast<int>(b0 + (gi + 1) * nblk / ngrp - b);
        const int last_n = static_cast<int>(std::min<int64_t>(16, j.w->n - 16 * (b + nb - 1)));
        for (int64_t g0 = 0; g0 < ng; g0 += kc) {
            const int64_t g1 = std::min(ng, g0 + kc);
            for (int64_t t = 0; t < ntiles; ++t) {
                const int mr = static_cast<int>(std::min<int64_t>(kDirectMr, rows - t * kDirectMr));
                const int64_t m = m0 + t * kDirectMr;
                char* orow = static_cast<char*>(e.out) + (m * e.ldo + e.col_off + b * 16) * esz;
                kDirect[nb - 1][mr](ptrs + t * runs * kDirectMr, g0, g1, rq, j.w->block(b), k4 * 64, cp + (b - b0),
                                    T + t * kDirectMr * kNb, g0 == 0, g1 == ng, orow, e.ldo * esz, esz, last_n,
                                    e.add_res ? &e : nullptr);
            }
        }
    }
}
#endif  // LB_VNNI_NO_DIRECT

}  // namespace

void chunk_vnni(const GemmJob& j, int64_t m0, int64_t m1, int64_t b0, int64_t b1) {
#ifndef LB_VNNI_NO_DIRECT
    if (j.a->runs() > 0 && j.a->run_len() % 4 == 0 && j.a->run_len() > 0) {
        chunk_vnni_direct(j, m0, m1, b0, b1);
        return;
    }
#endif
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
