#pragma once
// The one description of what a kernel does with its int32 accumulator, shared by every kernel family
// (int8: int8_common.h; 4.6-bit and binary: wb_common.h). The numbers are the `kind` argument of every
// binding and are mirrored in lowbit/kernels/epilogue.py (EPI_KIND); lowbit._native.epilogue_kinds()
// exposes them so that a test checks both sides agree.
//
//   none       (0): out = acc, int32
//   float_out  (1): out = float32(acc) * scale[n] (+ fbias[n]); two float32 roundings, never fused (no FMA)
//   requant_u8 (2), requant_s8 (3):
//                   out = clamp(((int64(acc) * m0[n] + 2^(rshift[n]-1)) >> rshift[n]) + zp, qmin, qmax),
//                   arithmetic shift (rounds half up), rshift in [1, 62], [qmin, qmax] inside the range of
//                   the output type (uint8 / int8), so every path stores the clamped value as is
//                   (a scalar store and a saturating SIMD pack give the same bytes)
//   bits       (4): binary kernels only: bit = (acc >= thr[n]) XOR flip[n], packed 64 per uint64 word
#include <cstdint>

namespace lowbit {

enum class EpiKind : int { none = 0, float_out = 1, requant_u8 = 2, requant_s8 = 3, bits = 4 };

constexpr const char* epi_kind_name(EpiKind k) {
    return k == EpiKind::none         ? "none"
           : k == EpiKind::float_out  ? "float_out"
           : k == EpiKind::requant_u8 ? "requant_u8"
           : k == EpiKind::requant_s8 ? "requant_s8"
                                      : "bits";
}

// Largest |zero point| a requantizing epilogue accepts: the kernels add it in int32 after the shift.
constexpr int32_t kMaxEpiZeroPoint = 1 << 24;

// The flat binding arguments of an epilogue over `n` output channels. p0 / p1 are data pointers (as
// integers, 0 = none): float_out (scale, fbias or 0), requant (m0, rshift), bits (thr, flip or 0).
struct EpiArgs {
    int kind = 0;
    uintptr_t p0 = 0, p1 = 0;
    int32_t zp = 0, qmin = 0, qmax = 0;
};

// Throws std::invalid_argument (a Python ValueError) naming the problem unless the epilogue is one
// of `allowed` (a bit mask of 1 << kind) and its arguments are usable for n channels: the pointers it
// needs are not null, every rshift[i] (i < n) is in [1, 62], lo <= qmin <= qmax <= hi for the output
// type and |zp| <= kMaxEpiZeroPoint. `what` prefixes the message (the binding's name).
void check_epilogue(const char* what, const EpiArgs& a, int64_t n, unsigned allowed);

// Accumulator bound: output channel n accumulates bias[n] + sum_k (a_k - zp) * w[n, k] in int32 with
// |a_k - zp| <= amax, so |acc| <= amax * l1[n] + |bias[n]| where l1[n] = sum_k |w[n, k]|. Throws
// std::invalid_argument naming the channel unless that is <= 2^31 - 1 for every n < count (bias may
// be null). With it every kernel's int32 arithmetic is exact: no wrap-around, no signed overflow.
void check_acc_bound(const char* what, int64_t amax, const int64_t* l1, const int32_t* bias, int64_t count);

constexpr unsigned epi_mask(EpiKind k) { return 1u << static_cast<int>(k); }

}  // namespace lowbit
