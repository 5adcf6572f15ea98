// Portable int8 GEMM worker: plain C++ over the packed layout (4 x 16 register-style tiles, the
// compiler vectorizes with whatever the baseline ISA offers). Activations are packed per tile as
// int16 (x - x_zp) so no zero-point correction is needed.
#include <algorithm>
#include <cstring>

#include "int8_common.h"

namespace lowbit {
namespace int8 {

namespace {

constexpr int kMr = 4;

// A tile (rows m0..m0+mr) -> [k4][kMr][4] int16 (x - zp); rows >= mr and k >= K are zero.
void pack_a_tile(const GemmJob& j, int64_t m0, int mr, int16_t* dst, uint8_t* rowbuf) {
    const int64_t K = j.a->k, k4 = j.w->k4;
    std::memset(dst, 0, static_cast<size_t>(k4 * kMr * 4) * sizeof(int16_t));
    for (int r = 0; r < mr; ++r) {
        const uint8_t* x = j.a->row(m0 + r, rowbuf);
        for (int64_t k = 0; k < K; ++k)
            dst[((k >> 2) * kMr + r) * 4 + (k & 3)] = static_cast<int16_t>(int32_t(x[k]) - j.zp);
    }
}

void kernel(const int16_t* A, const int8_t* W, int64_t k4, int32_t* T) {
    int32_t acc[kMr][kBlockN];
    std::memset(acc, 0, sizeof(acc));
    for (int64_t q = 0; q < k4; ++q) {
        const int8_t* w = W + q * (kBlockN * kGroupK);
        const int16_t* a = A + q * (kMr * 4);
        for (int r = 0; r < kMr; ++r) {
            const int32_t a0 = a[r * 4], a1 = a[r * 4 + 1], a2 = a[r * 4 + 2], a3 = a[r * 4 + 3];
            for (int c = 0; c < kBlockN; ++c)
                acc[r][c] += a0 * w[c * 4] + a1 * w[c * 4 + 1] + a2 * w[c * 4 + 2] + a3 * w[c * 4 + 3];
        }
    }
    std::memcpy(T, acc, sizeof(acc));
}

}  // namespace

void chunk_portable(const GemmJob& j, int64_t m0, int64_t m1, int64_t b0, int64_t b1) {
    const int64_t k4 = j.w->k4, rows = m1 - m0;
    const int64_t ntiles = (rows + kMr - 1) / kMr;
    const size_t tile_elems = static_cast<size_t>(k4 * kMr * 4);
    int16_t* A = scratch<int16_t>(0, tile_elems * static_cast<size_t>(ntiles));
    int32_t* T = scratch<int32_t>(1, kMr * kBlockN);
    uint8_t* rowbuf = scratch<uint8_t>(2, static_cast<size_t>(std::max<int64_t>(j.a->k, 1)));
    for (int64_t t = 0; t < ntiles; ++t) {
        const int mr = static_cast<int>(std::min<int64_t>(kMr, rows - t * kMr));
        pack_a_tile(j, m0 + t * kMr, mr, A + t * tile_elems, rowbuf);
    }
    for (int64_t b = b0; b < b1; ++b) {
        const int64_t cols = std::min<int64_t>(kBlockN, j.w->n - b * kBlockN);
        for (int64_t t = 0; t < ntiles; ++t) {
            const int64_t mr = std::min<int64_t>(kMr, rows - t * kMr);
            kernel(A + t * tile_elems, j.w->block(b), k4, T);
            epilogue_scalar(j.epi, T, kBlockN, m0 + t * kMr, mr, b * kBlockN, cols, j.corr);
        }
    }
}

}  // namespace int8
}  // namespace lowbit
