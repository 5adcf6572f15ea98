// Pooling on uint8 codes (NHWC and NCHW) and the element-wise residual add: drivers, portable code.
#include "qops.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu_features.h"
#include "parallel.h"

namespace lowbit {
namespace qops {

namespace {

// Valid input indices of every output index along one axis.
std::vector<std::vector<int64_t>> taps(int64_t n_in, int64_t n_out, const PoolShape& s, bool rows) {
    std::vector<std::vector<int64_t>> t(static_cast<size_t>(n_out));
    const int64_t k = rows ? s.kh : s.kw, st = rows ? s.sh : s.sw, p = rows ? s.ph : s.pw, d = rows ? s.dh : s.dw;
    for (int64_t o = 0; o < n_out; ++o) {
        auto& v = t[static_cast<size_t>(o)];
        if (s.fixed) {
            for (int64_t i = 0; i < k; ++i) {
                const int64_t idx = o * st - p + i * d;
                if (idx >= 0 && idx < n_in) v.push_back(idx);
            }
        } else {
            const int64_t lo = o * n_in / n_out, hi = ((o + 1) * n_in + n_out - 1) / n_out;
            for (int64_t idx = lo; idx < hi; ++idx) v.push_back(idx);
        }
    }
    return t;
}

// out[i] = round-half-up(sum[i] / n) for sums in [0, 255 n]. While the numerators stay below 2^24 a
// double quotient is exact enough to truncate (the fraction of a non-integer quotient is >= 1/n, far
// above double's rounding error), and it vectorizes; larger windows divide in integers.
void round_div(const int32_t* sum, int64_t count, int32_t n, uint8_t* out) {
    const int32_t half = n / 2;
    if (int64_t(n) * 256 < (int64_t(1) << 24)) {
        const double dn = n;
        for (int64_t i = 0; i < count; ++i) out[i] = static_cast<uint8_t>(static_cast<int32_t>(double(sum[i] + half) / dn));
    } else {
        for (int64_t i = 0; i < count; ++i) out[i] = static_cast<uint8_t>((sum[i] + half) / n);
    }
}

struct Ctx {
    const uint8_t* x;
    uint8_t* y;
    const PoolShape* s;
    PoolOp op;
    int32_t zp;
    std::vector<std::vector<int64_t>> th, tw;
};

void rows_nhwc(const Ctx& c, int64_t r0, int64_t r1) {
    const PoolShape& S = *c.s;
    const int64_t C = S.c;
    std::vector<int32_t> acc(c.op == PoolOp::avg ? static_cast<size_t>(C) : 0);
    for (int64_t r = r0; r < r1; ++r) {
        const int64_t oh = r % S.ho, b = r / S.ho;
        const auto& lh = c.th[static_cast<size_t>(oh)];
        const uint8_t* xb = c.x + b * S.h * S.w * C;
        for (int64_t ow = 0; ow < S.wo; ++ow) {
            const auto& lw = c.tw[static_cast<size_t>(ow)];
            uint8_t* out = c.y + (r * S.wo + ow) * C;
            if (c.op == PoolOp::max) {
                std::memset(out, 0, static_cast<size_t>(C));  // every window has a valid position
                for (int64_t ih : lh)
                    for (int64_t iw : lw) {
                        const uint8_t* px = xb + (ih * S.w + iw) * C;
                        for (int64_t ch = 0; ch < C; ++ch) out[ch] = std::max(out[ch], px[ch]);
                    }
                continue;
            }
            const int64_t valid = static_cast<int64_t>(lh.size() * lw.size());
            const int32_t n = static_cast<int32_t>(S.fixed ? S.kh * S.kw : valid);
            const int32_t init = static_cast<int32_t>((n - valid) * c.zp);  // padded positions hold zp
            int32_t* a = acc.data();
            for (int64_t ch = 0; ch < C; ++ch) a[ch] = init;
            for (int64_t ih : lh)
                for (int64_t iw : lw) {
                    const uint8_t* px = xb + (ih * S.w + iw) * C;
                    for (int64_t ch = 0; ch < C; ++ch) a[ch] += px[ch];
                }
            round_div(a, C, n, out);
        }
    }
}

void planes_nchw(const Ctx& c, int64_t p0, int64_t p1) {
    const PoolShape& S = *c.s;
    for (int64_t p = p0; p < p1; ++p) {
        const uint8_t* xp = c.x + p * S.h * S.w;
        uint8_t* yp = c.y + p * S.ho * S.wo;
        for (int64_t oh = 0; oh < S.ho; ++oh) {
            const auto& lh = c.th[static_cast<size_t>(oh)];
            for (int64_t ow = 0; ow < S.wo; ++ow) {
                const auto& lw = c.tw[static_cast<size_t>(ow)];
                if (c.op == PoolOp::max) {
                    uint8_t m = 0;
                    for (int64_t ih : lh)
                        for (int64_t iw : lw) m = std::max(m, xp[ih * S.w + iw]);
                    yp[oh * S.wo + ow] = m;
                    continue;
                }
                const int64_t valid = static_cast<int64_t>(lh.size() * lw.size());
                const int32_t n = static_cast<int32_t>(S.fixed ? S.kh * S.kw : valid);
                int32_t sum = static_cast<int32_t>((n - valid) * c.zp);
                for (int64_t ih : lh)
                    for (int64_t iw : lw) sum += xp[ih * S.w + iw];
                round_div(&sum, 1, n, yp + oh * S.wo + ow);
            }
        }
    }
}

}  // namespace

void pool2d(const uint8_t* x, uint8_t* y, const PoolShape& s, PoolOp op, int32_t zp, bool nhwc) {
    if (s.b <= 0 || s.c <= 0 || s.ho <= 0 || s.wo <= 0) return;
    Ctx c{x, y, &s, op, zp, taps(s.h, s.ho, s, true), taps(s.w, s.wo, s, false)};
    int64_t win = 1;
    for (const auto& v : c.th) win = std::max<int64_t>(win, static_cast<int64_t>(v.size()));
    int64_t ww = 1;
    for (const auto& v : c.tw) ww = std::max<int64_t>(ww, static_cast<int64_t>(v.size()));
    win *= ww;
    if (nhwc) {
        const int64_t per_row = std::max<int64_t>(1, s.wo * s.c * win);
        parallel_for(s.b * s.ho, std::max<int64_t>(1, 32768 / per_row),
                     [&](int64_t r0, int64_t r1) { rows_nhwc(c, r0, r1); });
    } else {
        const int64_t per_plane = std::max<int64_t>(1, s.ho * s.wo * win);
        parallel_for(s.b * s.c, std::max<int64_t>(1, 32768 / per_plane),
                     [&](int64_t p0, int64_t p1) { planes_nchw(c, p0, p1); });
    }
}

void add_u8(const uint8_t* a, const uint8_t* b, uint8_t* out, int64_t n, const AddParams& p) {
    if (n <= 0) return;
    void (*fn)(const uint8_t*, const uint8_t*, uint8_t*, int64_t, const AddParams&) = nullptr;
#if defined(__x86_64__) || defined(_M_X64)
    const Isa isa = active_isa();
    if (isa >= Isa::avx512bw) fn = add_u8_avx512;
    else if (isa >= Isa::avx2) fn = add_u8_avx2;
#endif
    // Chunks of whole 64-byte blocks, so that the SIMD paths see the same splits on every thread count.
    const int64_t blocks = (n + 63) / 64;
    parallel_for(blocks, 512, [&](int64_t b0, int64_t b1) {
        const int64_t i0 = b0 * 64, i1 = std::min(n, b1 * 64);
        if (fn) {
            fn(a + i0, b + i0, out + i0, i1 - i0, p);
            return;
        }
        for (int64_t i = i0; i < i1; ++i) out[i] = add_one(a[i], b[i], p);
    });
}

}  // namespace qops
}  // namespace lowbit
