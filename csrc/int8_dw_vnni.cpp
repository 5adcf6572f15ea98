// AVX-512 VNNI depthwise convolution (NHWC uint8 in, one int8 filter [kh][kw] per channel).
//
// vpdpbusd multiplies 4 u8 x s8 pairs per int32 lane; here the 4 pairs of a lane are 4 horizontal taps
// of one filter row for one channel. For every input row ih the kernel builds a "tap row"
//   B[ow][g][c][4] = x[ih, ow*sw - pw + (4g + j)*dw, c] for j < 4   (zero point where iw is padding)
// (g: groups of 4 taps of a filter row, ceil(kw/4) of them; taps beyond kw read anything: their weight is
// 0). Output row oh then needs, per 16 channels and output column, kh * ceil(kw/4) vpdpbusd with 64-byte
// memory operands: 3 for a 3x3 filter. A tap row serves every output row whose window covers ih (kh of
// them at stride 1). Tap rows of padding rows are all zero point. Raw u8 codes: the zero point enters
// through the per-channel correction bias[c] - x_zp * sum(w[c]) (computed by the driver).
//
// Channel order inside a tap row: channels come in groups of 32 interleaved with 256-bit unpacks, which
// work within 128-bit lanes, so a group's 128 bytes hold the channels (in 4-channel runs)
//   0-3 16-19 | 4-7 20-23 | 8-11 24-27 | 12-15 28-31      (kPerm32 below)
// A remaining 16 channels use 128-bit unpacks (natural order), fewer than 16 a scalar loop. The weights
// are packed in the same order; the two accumulators of a group are put back in natural channel order
// (two vpermt2d) before the epilogue, which runs on registers (int8_epi_avx512.h).
//
// Tap rows are 4x the size of the input rows they come from, so they are built and used in tiles of
// one channel group (32 or 16 channels) x up to 64 output columns: the kh tap segments an output row
// reads then stay in L1 (3 x 64 x 128 bytes for a 3x3 filter), and each input row is still interleaved
// only once per tile.
#include "int8_common.h"

#ifdef LOWBIT_INT8_X86

#include <algorithm>
#include <cstring>
#include <vector>

#ifndef LB_VNNI
#define LB_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")))
#endif
#include "int8_epi_avx512.h"

namespace lowbit {
namespace int8 {

namespace {

// Channel (within its 32-group) of dword position p of the group's 128 bytes.
constexpr int perm32(int p) { return (p / 8) * 4 + ((p % 8) / 4) * 16 + p % 4; }

// Dword position of channel c (within its group) in a tap row.
inline int64_t tap_pos(int64_t c, int64_t C) {
    const int64_t c32 = C / 32 * 32;
    if (c >= c32) return c;
    const int64_t q = c % 32, base = c - q;
    const int64_t pos = (q % 16) / 4 * 8 + (q / 16) * 4 + q % 4;  // inverse of perm32
    return base + pos;
}

}  // namespace

void dw_pack_vnni(const int8_t* w, int64_t c, int64_t kh, int64_t kw, std::vector<int8_t>& out) {
    const int64_t c16 = (c + 15) / 16 * 16, g4 = (kw + 3) / 4;
    // [c16 / 16 blocks][kh][g4][16 lanes][4 taps], lanes in tap-row order
    out.assign(static_cast<size_t>(std::max<int64_t>(1, c16 * kh * g4 * 4)), 0);
    for (int64_t ch = 0; ch < c; ++ch) {
        const int64_t pos = tap_pos(ch, c), blk = pos / 16, lane = pos % 16;
        for (int64_t i = 0; i < kh; ++i)
            for (int64_t j = 0; j < kw; ++j)
                out[static_cast<size_t>(((blk * kh + i) * g4 + j / 4) * 64 + lane * 4 + j % 4)] =
                    w[(ch * kh + i) * kw + j];
    }
}

namespace {

// Interleaves channels [0, cw) of 4 source pixels (cw = 32: the permuted group order; 16: natural;
// fewer: natural, padded with the zero point to 16) into d[cw or 16][4]. THREE: kw <= 3, the fourth tap
// of every dword has weight 0 and is left 0 (s[3] is not read).
template <bool THREE>
LB_VNNI __attribute__((always_inline)) inline void interleave4(const uint8_t* const s[4], uint8_t* d, int64_t cw, uint8_t zp) {
    if (cw == 32) {
        const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s[0]));
        const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s[1]));
        const __m256i e = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s[2]));
        const __m256i f = THREE ? _mm256_setzero_si256() : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s[3]));
        const __m256i ab0 = _mm256_unpacklo_epi8(a, b), ab1 = _mm256_unpackhi_epi8(a, b);
        const __m256i ef0 = _mm256_unpacklo_epi8(e, f), ef1 = _mm256_unpackhi_epi8(e, f);
        __m256i* o = reinterpret_cast<__m256i*>(d);
        _mm256_storeu_si256(o + 0, _mm256_unpacklo_epi16(ab0, ef0));
        _mm256_storeu_si256(o + 1, _mm256_unpackhi_epi16(ab0, ef0));
        _mm256_storeu_si256(o + 2, _mm256_unpacklo_epi16(ab1, ef1));
        _mm256_storeu_si256(o + 3, _mm256_unpackhi_epi16(ab1, ef1));
    } else if (cw == 16) {
        const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s[0]));
        const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s[1]));
        const __m128i e = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s[2]));
        const __m128i f = THREE ? _mm_setzero_si128() : _mm_loadu_si128(reinterpret_cast<const __m128i*>(s[3]));
        const __m128i ab0 = _mm_unpacklo_epi8(a, b), ab1 = _mm_unpackhi_epi8(a, b);
        const __m128i ef0 = _mm_unpacklo_epi8(e, f), ef1 = _mm_unpackhi_epi8(e, f);
        __m128i* o = reinterpret_cast<__m128i*>(d);
        _mm_storeu_si128(o + 0, _mm_unpacklo_epi16(ab0, ef0));
        _mm_storeu_si128(o + 1, _mm_unpackhi_epi16(ab0, ef0));
        _mm_storeu_si128(o + 2, _mm_unpacklo_epi16(ab1, ef1));
        _mm_storeu_si128(o + 3, _mm_unpackhi_epi16(ab1, ef1));
    } else {
        for (int64_t c = 0; c < 16; ++c)
            for (int j = 0; j < 4; ++j) d[c * 4 + j] = (THREE && j == 3) ? uint8_t(0) : (c < cw ? s[j][c] : zp);
    }
}

// Tap segment of input row ih for channels [c0, c0 + cw) and output columns [t0, t0 + tw):
// dst[ow - t0][g][cwp][4], cwp = max(cw, 16).
LB_VNNI void build_tap_seg(const DwJob& j, int64_t b, int64_t ih, int64_t c0, int64_t cw, int64_t t0, int64_t tw,
                           uint8_t* dst, int64_t g4, const uint8_t* zsrc) {
    const ConvShape& S = *j.s;
    const int64_t C = S.c, cwp = std::max<int64_t>(cw, 16);
    const uint8_t* xr = j.x + (b * S.h + ih) * S.w * C + c0;
    const uint8_t zp = static_cast<uint8_t>(j.zp);
    const bool three = S.kw <= 3;
    // columns whose taps are all inside the row: no padding checks
    const int64_t lo = std::min(S.wo, (S.pw + S.sw - 1) / S.sw);
    const int64_t lim = S.w - 1 - (S.kw - 1) * S.dw + S.pw;
    const int64_t hi = lim < 0 ? lo : std::max(lo, std::min(S.wo, lim / S.sw + 1));
    for (int64_t ow = t0; ow < t0 + tw; ++ow)
        for (int64_t g = 0; g < g4; ++g) {
            const uint8_t* src[4];
            if (three && ow >= lo && ow < hi) {  // the common case, straight-line
                const uint8_t* p0 = xr + (ow * S.sw - S.pw) * C;
                const uint8_t* s3[4] = {p0, p0 + S.dw * C, p0 + 2 * S.dw * C, p0};
                interleave4<true>(s3, dst + (ow - t0) * cwp * 4, cw, zp);
                continue;
            }
            if (ow >= lo && ow < hi) {
                const uint8_t* p0 = xr + (ow * S.sw - S.pw + g * 4 * S.dw) * C;
                for (int t = 0; t < 4; ++t) src[t] = g * 4 + t < S.kw ? p0 + t * S.dw * C : p0;
            } else {
                for (int t = 0; t < 4; ++t) {
                    const int64_t jj = g * 4 + t, iw = ow * S.sw - S.pw + jj * S.dw;
                    src[t] = (jj < S.kw && iw >= 0 && iw < S.w) ? xr + iw * C : (jj < S.kw ? zsrc : src[0]);
                }
            }
            uint8_t* d = dst + ((ow - t0) * g4 + g) * cwp * 4;
            if (three)
                interleave4<true>(src, d, cw, zp);
            else
                interleave4<false>(src, d, cw, zp);
        }
}

// Dot products of output column ow for the 16 lanes of tap-row block `blk` (byte offset blk * 64).
template <int KH, int G4>
LB_VNNI inline __m512i dots(__m512i acc, const uint8_t* const* rows, int64_t kh, int64_t g4, int64_t off,
                            int64_t gstride, const __m512i* wr, const int8_t* wq) {
    if (KH == 3 && G4 == 1) {  // three independent chains: the latency, not the port, limits this loop
        const __m512i z = _mm512_setzero_si512();
        const __m512i a = _mm512_dpbusd_epi32(acc, _mm512_loadu_si512(rows[0] + off), wr[0]);
        const __m512i b = _mm512_dpbusd_epi32(z, _mm512_loadu_si512(rows[1] + off), wr[1]);
        const __m512i c = _mm512_dpbusd_epi32(z, _mm512_loadu_si512(rows[2] + off), wr[2]);
        return _mm512_add_epi32(a, _mm512_add_epi32(b, c));
    }
    for (int64_t i = 0; i < kh; ++i)
        for (int64_t g = 0; g < g4; ++g)
            acc = _mm512_dpbusd_epi32(acc, _mm512_loadu_si512(rows[i] + off + g * gstride),
                                      _mm512_loadu_si512(wq + (i * g4 + g) * 64));
    return acc;
}

// Stores 16 channels' results (natural order) at out (element size esz), fast requantization or the
// general epilogue.
template <bool FAST>
LB_VNNI inline void store16(const Fast16& f, const Epi16& p, __m512i acc, char* out, __mmask16 mask) {
    if (FAST) {
        const __m128i v = fast16_bytes(f, fast16_requant(f, acc));
        if (mask == 0xFFFF)
            _mm_storeu_si128(reinterpret_cast<__m128i*>(out), v);
        else
            _mm_mask_storeu_epi8(out, mask, v);
    } else {
        epi16_store(p, acc, out, mask);
    }
}

// Output row r (= b*ho + oh), channels [c0, c0 + 32) (a permuted 32-group, GROUP) or [c0, c0 + 16)
// (a natural-order block), every output column.
// Epilogue parameters of every 16-channel block (natural order), made once per call and thread.
struct BlockParams {
    Epi16 p;
    Fast16 f, fperm;       // fperm: a 32-group's block in tap-row (permuted) channel order
    __m512i corr, corrperm;
    bool fast;
};

template <int KH, int G4, bool FAST, bool GROUP>
LB_VNNI void dw_block(const DwJob& j, const uint8_t* const* rows, int64_t r, int64_t c0, int64_t t0, int64_t tw,
                      const BlockParams* bp) {
    const ConvShape& S = *j.s;
    const Epi& e = j.epi;
    const int64_t esz = epi_elem_size(e.kind);
    const int64_t kh = KH > 0 ? KH : S.kh, g4 = G4 > 0 ? G4 : (S.kw + 3) / 4, nw = kh * g4;
    constexpr int NB = GROUP ? 2 : 1;
    const int n = static_cast<int>(std::min<int64_t>(16, S.c - c0));
    const __mmask16 mask0 = GROUP ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << n) - 1);
    const BlockParams& b0 = bp[c0 / 16];
    const BlockParams& b1 = bp[c0 / 16 + NB - 1];
    const int8_t* wq[NB];
    constexpr int kRegW = KH == 3 && G4 == 1 ? 3 : 1;
    __m512i wr[NB][kRegW];
    for (int k = 0; k < NB; ++k) {
        wq[k] = j.wq + (c0 / 16 + k) * nw * 64;
        for (int t = 0; t < kRegW; ++t) wr[k][t] = _mm512_loadu_si512(wq[k] + t * 64);
    }
    // tap-row block b holds dwords [16 b, 16 b + 16) of the row: the permuted accumulators of a group
    // come back to natural order with these two-source permutes (see perm32).
    const __m512i lo_idx = _mm512_setr_epi32(0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27);
    const __m512i hi_idx = _mm512_setr_epi32(4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    const int64_t cwp = GROUP ? 32 : 16, step = g4 * cwp * 4, gstride = cwp * 4, ldo = e.ldo * esz;
    char* out = static_cast<char*>(e.out) + ((r * S.wo + t0) * e.ldo + e.col_off + c0) * esz;
    for (int64_t ow = 0; ow < tw; ++ow, out += ldo) {
        const int64_t off = ow * step;
        __m512i acc0 = dots<KH, G4>(GROUP ? _mm512_setzero_si512() : b0.corr, rows, kh, g4, off, gstride,
                                    wr[0], wq[0]);
        if (GROUP && FAST) {  // requantize in tap-row order, put the 32 bytes back in order (one vpermd)
            acc0 = _mm512_add_epi32(acc0, b0.corrperm);
            const __m512i acc1 = dots<KH, G4>(b1.corrperm, rows, kh, g4, off + 64, gstride, wr[NB - 1], wq[NB - 1]);
            const __m128i v0 = fast16_bytes(b0.fperm, fast16_requant(b0.fperm, acc0));
            const __m128i v1 = fast16_bytes(b1.fperm, fast16_requant(b1.fperm, acc1));
            const __m256i v = _mm256_permutevar8x32_epi32(_mm256_inserti128_si256(_mm256_castsi128_si256(v0), v1, 1),
                                                          _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), v);
        } else if (GROUP) {
            __m512i acc1 = dots<KH, G4>(_mm512_setzero_si512(), rows, kh, g4, off + 64, gstride, wr[NB - 1],
                                        wq[NB - 1]);
            const __m512i n0 = _mm512_add_epi32(_mm512_permutex2var_epi32(acc0, lo_idx, acc1), b0.corr);
            const __m512i n1 = _mm512_add_epi32(_mm512_permutex2var_epi32(acc0, hi_idx, acc1), b1.corr);
            store16<FAST>(b0.f, b0.p, n0, out, 0xFFFF);
            store16<FAST>(b1.f, b1.p, n1, out + 16 * esz, 0xFFFF);
        } else {
            store16<FAST>(b0.f, b0.p, acc0, out, mask0);
        }
    }
}

template <int KH, int G4>
LB_VNNI void dw_tile(const DwJob& j, const uint8_t* const* rows, int64_t r, int64_t c0, bool group, int64_t t0,
                     int64_t tw, const BlockParams* bp) {
    const bool fast = bp[c0 / 16].fast && (!group || bp[c0 / 16 + 1].fast);
    if (group) {
        if (fast) dw_block<KH, G4, true, true>(j, rows, r, c0, t0, tw, bp);
        else dw_block<KH, G4, false, true>(j, rows, r, c0, t0, tw, bp);
    } else {
        if (fast) dw_block<KH, G4, true, false>(j, rows, r, c0, t0, tw, bp);
        else dw_block<KH, G4, false, false>(j, rows, r, c0, t0, tw, bp);
    }
}

}  // namespace

LB_VNNI void dw_rows_vnni(const DwJob& j, int64_t r0, int64_t r1) {
    const ConvShape& S = *j.s;
    const int64_t C = S.c, C16 = (C + 15) / 16 * 16, c32 = C / 32 * 32, g4 = (S.kw + 3) / 4;
    const int64_t tile = std::max<int64_t>(1, std::min<int64_t>(S.wo, 64 / g4));
    const int64_t seg_bytes = tile * g4 * 32 * 4;
    const int64_t zbytes = std::max<int64_t>(C16, 32);
    uint8_t* buf = scratch<uint8_t>(6, static_cast<size_t>(seg_bytes * (S.kh + 1) + zbytes));
    uint8_t* zseg = buf + seg_bytes * S.kh;  // tap segment of a padding row
    uint8_t* zsrc = zseg + seg_bytes;        // zero-point bytes (source of padding columns)
    std::memset(zsrc, j.zp, static_cast<size_t>(zbytes));
    std::memset(zseg, j.zp, static_cast<size_t>(seg_bytes));
    BlockParams* bp = scratch<BlockParams>(7, static_cast<size_t>(C16 / 16));  // 64-byte aligned
    // per-channel requantization parameters and corrections of the 32-groups in tap-row order
    const bool req = j.epi.kind == EpiKind::requant_u8 || j.epi.kind == EpiKind::requant_s8;
    int32_t* perm = scratch<int32_t>(5, static_cast<size_t>(3 * std::max<int64_t>(c32, 1)));
    Epi ep = j.epi;
    ep.m0 = perm;
    ep.rshift = perm + c32;
    for (int64_t p = 0; p < c32; ++p) {
        const int64_t c = p - p % 32 + perm32(static_cast<int>(p % 32));
        perm[2 * c32 + p] = j.corr[c];
        if (req) {
            perm[p] = j.epi.m0[j.epi.col_off + c];
            perm[c32 + p] = j.epi.rshift[j.epi.col_off + c];
        }
    }
    for (int64_t k = 0; k < C16 / 16; ++k) {
        const int n = static_cast<int>(std::min<int64_t>(16, C - 16 * k));
        const int64_t col = j.epi.col_off + 16 * k;
        BlockParams& q = bp[k];
        q.p = epi16_prepare(j.epi, col, n);
        q.fast = epi16_fast_ok(j.epi, col, n);
        if (q.fast) q.f = fast16_prepare(j.epi, q.p, col, n);
        q.corr = _mm512_maskz_loadu_epi32(static_cast<__mmask16>((1u << n) - 1), j.corr + 16 * k);
        if (16 * k < c32) {
            q.corrperm = _mm512_loadu_si512(perm + 2 * c32 + 16 * k);
            if (req) {
                const Epi16 pp = epi16_prepare(ep, 16 * k, 16);
                q.fast = q.fast && epi16_fast_ok(ep, 16 * k, 16);
                if (q.fast) q.fperm = fast16_prepare(ep, pp, 16 * k, 16);
            }
        }
    }
    // Tap segments held: kh slots, each keyed by (image, input row). An output row needs at most kh of
    // them; the ones it needs stay, the others (and the empty ones, key -1) are replaced.
    std::vector<int64_t> key(static_cast<size_t>(S.kh)), need(static_cast<size_t>(S.kh));
    std::vector<const uint8_t*> rows(static_cast<size_t>(S.kh));
    for (int64_t c0 = 0; c0 < C16; c0 += (c0 < c32 ? 32 : 16)) {
        const bool group = c0 < c32;
        const int64_t cw = group ? 32 : std::min<int64_t>(16, C - c0);
        for (int64_t t0 = 0; t0 < S.wo; t0 += tile) {
            const int64_t tw = std::min(tile, S.wo - t0);
            std::fill(key.begin(), key.end(), -1);
            for (int64_t r = r0; r < r1; ++r) {
                const int64_t oh = r % S.ho, b = r / S.ho;
                for (int64_t i = 0; i < S.kh; ++i) {
                    const int64_t ih = oh * S.sh - S.ph + i * S.dh;
                    need[static_cast<size_t>(i)] = (ih < 0 || ih >= S.h) ? -2 : b * S.h + ih;  // -2: padding
                }
                for (int64_t i = 0; i < S.kh; ++i) {
                    const int64_t id = need[static_cast<size_t>(i)];
                    if (id == -2) {
                        rows[static_cast<size_t>(i)] = zseg;
                        continue;
                    }
                    auto hit = std::find(key.begin(), key.end(), id);
                    if (hit == key.end()) {  // a slot no input row of this output row needs
                        hit = std::find_if(key.begin(), key.end(), [&](int64_t k) {
                            return std::find(need.begin(), need.end(), k) == need.end();
                        });
                        build_tap_seg(j, b, id - b * S.h, c0, cw, t0, tw, buf + (hit - key.begin()) * seg_bytes, g4,
                                      zsrc);
                        *hit = id;
                    }
                    rows[static_cast<size_t>(i)] = buf + (hit - key.begin()) * seg_bytes;
                }
                if (S.kh == 3 && g4 == 1)
                    dw_tile<3, 1>(j, rows.data(), r, c0, group, t0, tw, bp);
                else
                    dw_tile<0, 0>(j, rows.data(), r, c0, group, t0, tw, bp);
            }
        }
    }
}

}  // namespace int8
}  // namespace lowbit

#endif  // LOWBIT_INT8_X86
