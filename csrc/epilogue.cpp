// Validation of the shared epilogue description (epilogue.h), used by every binding.
#include "epilogue.h"

#include <stdexcept>
#include <string>

namespace lowbit {

void check_epilogue(const char* what, const EpiArgs& a, int64_t n, unsigned allowed) {
    const std::string w = std::string(what) + ": ";
    if (a.kind < 0 || a.kind > static_cast<int>(EpiKind::bits) || !(allowed & (1u << a.kind)))
        throw std::invalid_argument(w + "epilogue kind " + std::to_string(a.kind) + " is not supported here");
    const EpiKind k = static_cast<EpiKind>(a.kind);
    if (k == EpiKind::float_out && a.p0 == 0) throw std::invalid_argument(w + "float epilogue needs a scale");
    if (k == EpiKind::bits && a.p0 == 0) throw std::invalid_argument(w + "threshold epilogue needs thresholds");
    if (k != EpiKind::requant_u8 && k != EpiKind::requant_s8) return;
    if (a.p0 == 0 || a.p1 == 0) throw std::invalid_argument(w + "requantization needs m0 and rshift");
    const int lo = k == EpiKind::requant_u8 ? 0 : -128, hi = k == EpiKind::requant_u8 ? 255 : 127;
    if (!(lo <= a.qmin && a.qmin <= a.qmax && a.qmax <= hi))
        throw std::invalid_argument(w + "requantization clamp [" + std::to_string(a.qmin) + ", " +
                                    std::to_string(a.qmax) + "] is outside the output range [" + std::to_string(lo) +
                                    ", " + std::to_string(hi) + "]");
    if (a.zp < -kMaxEpiZeroPoint || a.zp > kMaxEpiZeroPoint)
        throw std::invalid_argument(w + "output zero point " + std::to_string(a.zp) + " out of range");
    const int32_t* rs = reinterpret_cast<const int32_t*>(a.p1);
    for (int64_t i = 0; i < n; ++i)
        if (rs[i] < 1 || rs[i] > 62)
            throw std::invalid_argument(w + "rshift[" + std::to_string(i) + "] = " + std::to_string(rs[i]) +
                                        " outside [1, 62]");
}

void check_acc_bound(const char* what, int64_t amax, const int64_t* l1, const int32_t* bias, int64_t count) {
    constexpr int64_t kMax = (int64_t(1) << 31) - 1;
    for (int64_t n = 0; n < count; ++n) {
        const int64_t b = bias ? bias[n] : 0;
        const int64_t worst = amax * l1[n] + (b < 0 ? -b : b);
        if (worst > kMax)
            throw std::invalid_argument(
                std::string(what) + ": output channel " + std::to_string(n) + " can overflow the int32 accumulator (" +
                std::to_string(amax) + " * sum|w| = " + std::to_string(amax * l1[n]) + ", |bias| = " +
                std::to_string(b < 0 ? -b : b) + ", limit 2^31 - 1); split the layer along K");
    }
}

}  // namespace lowbit
