#pragma once
// The int8 epilogue (int8_common.h: Epi) on 16 output channels held in one zmm of int32 accumulators,
// for the AVX-512 kernels: no round trip through a tile buffer. Bit-exact with epilogue_scalar:
//   requant: clamp(((int64(acc) * m0 + 2^(rshift-1)) >> rshift) + zp, qmin, qmax)
//            (when every shift of the 16 channels is >= 32, the high dword of the 64-bit sum is
//            shifted by rshift - 32 on int32 lanes, as in the AVX2 epilogue; otherwise 64-bit lanes)
//   float  : float32(acc) * scale (+ fbias), two roundings (no FMA)
//   none   : acc as int32
// Include only from files that define LB_VNNI (the target attribute of their AVX-512 functions).
#include <immintrin.h>

#include <algorithm>
#include <cmath>

#include "int8_common.h"

namespace lowbit {
namespace int8 {

struct Epi16 {
    EpiKind kind = EpiKind::none;
    bool fast = true;  // every rshift >= 32
    __m512i m0e, m0o, rnde, rndo, rse, rso, rs32, rnd32, zp, lo, hi, lo64, hi64;
    __m512 sc, fb;
    bool has_fb = false;
};

// Parameters of channels [col, col + n) (absolute channel indices, n <= 16; the rest read as channel col).
LB_VNNI inline Epi16 epi16_prepare(const Epi& e, int64_t col, int n) {
    Epi16 p;
    p.kind = e.kind;
    const __mmask16 m = static_cast<__mmask16>((1u << n) - 1);
    if (e.kind == EpiKind::requant_u8 || e.kind == EpiKind::requant_s8) {
        const __m512i m0 = _mm512_maskz_loadu_epi32(m, e.m0 + col);
        const __m512i rs = _mm512_mask_loadu_epi32(_mm512_set1_epi32(32), m, e.rshift + col);
        const __m512i one = _mm512_set1_epi64(1);
        p.m0e = m0;
        p.m0o = _mm512_srli_epi64(m0, 32);
        p.rse = _mm512_and_si512(rs, _mm512_set1_epi64(0xffffffffLL));
        p.rso = _mm512_srli_epi64(rs, 32);
        p.rnde = _mm512_sllv_epi64(one, _mm512_sub_epi64(p.rse, one));
        p.rndo = _mm512_sllv_epi64(one, _mm512_sub_epi64(p.rso, one));
        p.fast = _mm512_cmplt_epi32_mask(rs, _mm512_set1_epi32(32)) == 0;
        p.rs32 = _mm512_sub_epi32(rs, _mm512_set1_epi32(32));
        // 2^(rs-33) for rs >= 33 (epi16_requant_fast), 0 otherwise (unused then)
        p.rnd32 = _mm512_sllv_epi32(_mm512_set1_epi32(1), _mm512_sub_epi32(rs, _mm512_set1_epi32(33)));
        p.zp = _mm512_set1_epi32(e.out_zp);
        p.lo = _mm512_set1_epi32(e.qmin);
        p.hi = _mm512_set1_epi32(e.qmax);
        p.lo64 = _mm512_set1_epi64(int64_t(e.qmin) - e.out_zp);
        p.hi64 = _mm512_set1_epi64(int64_t(e.qmax) - e.out_zp);
    } else if (e.kind == EpiKind::float_out) {
        p.sc = _mm512_maskz_loadu_ps(m, e.scale + col);
        p.has_fb = e.fbias != nullptr;
        p.fb = p.has_fb ? _mm512_maskz_loadu_ps(m, e.fbias + col) : _mm512_setzero_ps();
    }
    return p;
}

// Requantized int32 results (in [qmin, qmax]) of 16 accumulators.
LB_VNNI inline __m512i epi16_requant(const Epi16& p, __m512i acc) {
    __m512i pe = _mm512_add_epi64(_mm512_mul_epi32(acc, p.m0e), p.rnde);
    __m512i po = _mm512_add_epi64(_mm512_mul_epi32(_mm512_srli_epi64(acc, 32), p.m0o), p.rndo);
    if (p.fast) {
        const __m512i h = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(pe, 32), po);
        const __m512i r = _mm512_add_epi32(_mm512_srav_epi32(h, p.rs32), p.zp);
        return _mm512_min_epi32(_mm512_max_epi32(r, p.lo), p.hi);
    }
    pe = _mm512_min_epi64(_mm512_max_epi64(_mm512_srav_epi64(pe, p.rse), p.lo64), p.hi64);
    po = _mm512_min_epi64(_mm512_max_epi64(_mm512_srav_epi64(po, p.rso), p.lo64), p.hi64);
    const __m512i r = _mm512_mask_blend_epi32(0xAAAA, pe, _mm512_slli_epi64(po, 32));
    return _mm512_add_epi32(r, p.zp);
}

// True when channels [col, col + n) requantize with every shift >= 33: then 2^(rshift-1) is a multiple
// of 2^32 and the rounding term can be added to the high dword after the multiply (epi16_requant_fast).
inline bool epi16_fast_ok(const Epi& e, int64_t col, int n) {
    if (e.kind != EpiKind::requant_u8 && e.kind != EpiKind::requant_s8) return false;
    for (int i = 0; i < n; ++i)
        if (e.rshift[col + i] < 33) return false;
    return true;
}

// The fast requantization of a block where epi16_fast_ok holds, as a few flags and constants:
//   (acc m0 + 2^(rs-1)) >> rs = (hi32(acc m0) + 2^(rs-33)) >> (rs - 32)
// (hi32 = arithmetic high dword, |hi32| <= 2^30). When |zp| 2^(rs-32) < 2^28 for every lane, the zero
// point rides along in the rounding term: (h + r + zp 2^s) >> s = ((h + r) >> s) + zp, all in int32.
// Clamps the narrowing store does anyway (saturation to [0, 255] or [-128, 127]) are skipped.
struct Fast16 {
    __m512i m0e, m0o, s, add, zp, lo, hi;
    bool zp_folded, need_lo, need_hi, u8;
};

LB_VNNI inline Fast16 fast16_prepare(const Epi& e, const Epi16& p, int64_t col, int n) {
    Fast16 f;
    f.m0e = p.m0e;
    f.m0o = p.m0o;
    f.s = p.rs32;
    int max_s = 0;
    for (int i = 0; i < n; ++i) max_s = std::max(max_s, e.rshift[col + i] - 32);
    const int64_t zabs = e.out_zp < 0 ? -int64_t(e.out_zp) : int64_t(e.out_zp);
    f.zp_folded = (zabs << max_s) < (int64_t(1) << 28);
    f.add = f.zp_folded ? _mm512_add_epi32(p.rnd32, _mm512_sllv_epi32(p.zp, p.rs32)) : p.rnd32;
    f.zp = p.zp;
    f.lo = p.lo;
    f.hi = p.hi;
    f.u8 = e.kind == EpiKind::requant_u8;
    f.need_lo = e.qmin > (f.u8 ? 0 : -128) || f.u8;  // u8: negative values must not wrap in the store
    f.need_hi = e.qmax < (f.u8 ? 255 : 127);
    return f;
}

LB_VNNI inline __m512i fast16_requant(const Fast16& f, __m512i acc) {
    const __m512i pe = _mm512_mul_epi32(acc, f.m0e);
    const __m512i po = _mm512_mul_epi32(_mm512_srli_epi64(acc, 32), f.m0o);
    // high dwords of the 8 even-lane and 8 odd-lane products, back in lane order: one two-source permute
    const __m512i odd = _mm512_setr_epi32(1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
    __m512i h = _mm512_permutex2var_epi32(pe, odd, po);
    h = _mm512_srav_epi32(_mm512_add_epi32(h, f.add), f.s);
    if (!f.zp_folded) h = _mm512_add_epi32(h, f.zp);
    if (f.need_lo) h = _mm512_max_epi32(h, f.lo);
    if (f.need_hi) h = _mm512_min_epi32(h, f.hi);
    return h;
}

// 16 requantized values -> 16 bytes (saturating: the clamps skipped above happen here).
LB_VNNI inline __m128i fast16_bytes(const Fast16& f, __m512i v) {
    return f.u8 ? _mm512_cvtusepi32_epi8(v) : _mm512_cvtsepi32_epi8(v);
}

// Stores epi(acc) for 16 channels (mask: which ones) at `out`, the address of the first channel's
// element (uint8/int8, float or int32 by kind).
LB_VNNI inline void epi16_store(const Epi16& p, __m512i acc, void* out, __mmask16 mask) {
    switch (p.kind) {
        case EpiKind::requant_u8:
        case EpiKind::requant_s8:
            _mm512_mask_cvtepi32_storeu_epi8(out, mask, epi16_requant(p, acc));
            break;
        case EpiKind::float_out: {
            __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(acc), p.sc);
            if (p.has_fb) f = _mm512_add_ps(f, p.fb);
            _mm512_mask_storeu_ps(out, mask, f);
            break;
        }
        default:
            _mm512_mask_storeu_epi32(out, mask, acc);
            break;
    }
}

// Everything the epilogue of 16 output channels needs, prepared once per call (64-byte aligned: keep
// these in scratch buffers, not in std::vector).
struct ColParams {
    Epi16 p;
    Fast16 f;
    __m512i corr;  // added to the raw dot products (bias, zero-point correction)
    bool fast;
};

// Channels [16 k, 16 k + n) of the local columns (absolute: e.col_off + 16 k), corr indexed locally.
LB_VNNI inline void col_params(const Epi& e, const int32_t* corr, int64_t k, int n, ColParams& q) {
    const int64_t col = e.col_off + 16 * k;
    q.p = epi16_prepare(e, col, n);
    q.fast = epi16_fast_ok(e, col, n);
    if (q.fast) q.f = fast16_prepare(e, q.p, col, n);
    q.corr = _mm512_maskz_loadu_epi32(static_cast<__mmask16>((1u << n) - 1), corr + 16 * k);
}

// The fused residual add (Epi::add_res) of 16 requantized codes c (int32 lanes) and 16 residual codes at
// r (mask: which exist), as bytes. Doubles, exact as in qops_simd.cpp: every product and sum is an
// integer below 2^41, floor(t 2^-R + 0.5) is exact, the output zero point is added after the floor.
LB_VNNI inline __m128i add16(__m512i c, const uint8_t* r, __mmask16 mask, const qops::AddParams& a) {
    const __m512d ma = _mm512_set1_pd(double(a.m_a)), mb = _mm512_set1_pd(double(a.m_b));
    const __m512d k = _mm512_set1_pd(-(double(a.m_a) * a.a_zp + double(a.m_b) * a.b_zp));
    const __m512d sc = _mm512_set1_pd(std::ldexp(1.0, -a.rshift)), half = _mm512_set1_pd(0.5);
    const __m512d zo = _mm512_set1_pd(a.out_zp), lo = _mm512_set1_pd(a.lo), hi = _mm512_set1_pd(a.hi);
    const __m512i ri = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mask, r));
    __m256i res[2];
    for (int h = 0; h < 2; ++h) {
        const __m256i ch = h ? _mm512_extracti64x4_epi64(c, 1) : _mm512_castsi512_si256(c);
        const __m256i rh = h ? _mm512_extracti64x4_epi64(ri, 1) : _mm512_castsi512_si256(ri);
        __m512d t = _mm512_fmadd_pd(ma, _mm512_cvtepi32_pd(ch), k);
        t = _mm512_fmadd_pd(mb, _mm512_cvtepi32_pd(rh), t);
        t = _mm512_roundscale_pd(_mm512_fmadd_pd(t, sc, half), _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
        t = _mm512_min_pd(_mm512_max_pd(_mm512_add_pd(t, zo), lo), hi);
        res[h] = _mm512_cvttpd_epi32(t);
    }
    return _mm512_cvtepi32_epi8(_mm512_inserti64x4(_mm512_castsi256_si512(res[0]), res[1], 1));
}

// Stores epi(acc) (acc already includes the correction) for 16 channels at out; with a fused residual
// add (e.add_res), res points at the residual codes of the same elements.
LB_VNNI inline void col_store_add(const ColParams& q, const Epi& e, __m512i acc, void* out, const uint8_t* res,
                                  __mmask16 mask) {
    __m512i c = q.fast ? fast16_requant(q.f, acc) : epi16_requant(q.p, acc);
    c = _mm512_min_epi32(_mm512_max_epi32(c, q.p.lo), q.p.hi);  // the fast path leaves clamps to the store
    const __m128i v = add16(c, res, mask, e.add);
    _mm_mask_storeu_epi8(out, mask, v);
}

// Stores epi(acc) (acc already includes the correction) for 16 channels at out.
LB_VNNI inline void col_store(const ColParams& q, __m512i acc, void* out, __mmask16 mask) {
    if (q.fast) {
        const __m128i v = fast16_bytes(q.f, fast16_requant(q.f, acc));
        if (mask == 0xFFFF)
            _mm_storeu_si128(reinterpret_cast<__m128i*>(out), v);
        else
            _mm_mask_storeu_epi8(out, mask, v);
    } else {
        epi16_store(q.p, acc, out, mask);
    }
}

inline int64_t epi_elem_size(EpiKind k) {
    return (k == EpiKind::requant_u8 || k == EpiKind::requant_s8) ? 1 : 4;
}

}  // namespace int8
}  // namespace lowbit
