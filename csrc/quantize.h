#pragma once
// float32 -> uint8 codes, the affine rule of lowbit.formats (one pass over the input):
//   q = clamp(round_half_even(x / scale) + zp, lo, hi)
// with the same float32 operations in the same order as the torch reference
// (div, round, add the zero point, clamp), so the codes are identical. A NaN input gives `lo`.
// `scale` holds one value (per tensor) or `rows` values (one per row of `cols` elements).
#include <cstdint>

namespace lowbit {
namespace quant {

struct QuantParams {
    const float* scale = nullptr;
    bool per_row = false;
    float zp = 0.f, lo = 0.f, hi = 255.f;
};

void quantize_u8(const float* x, uint8_t* out, int64_t rows, int64_t cols, const QuantParams& p);

// The paths, exposed for the tests' dispatch checks: n elements with one scale value.
void quantize_run_portable(const float* x, uint8_t* out, int64_t n, float scale, const QuantParams& p);
void quantize_run_avx2(const float* x, uint8_t* out, int64_t n, float scale, const QuantParams& p);

}  // namespace quant
}  // namespace lowbit
