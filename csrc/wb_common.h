#pragma once
// Shared pieces of the 4.6-bit (w46_*.cpp) and binary (binary_*.cpp) kernel families:
// epilogue descriptions, output addressing, aligned buffers and the portable / AVX2 epilogues.
//
// Epilogues: the shared description in epilogue.h (bit-exact with lowbit/kernels/reference.py::
// apply_epilogue); EPI_* below are its kinds as plain ints. For bits, bit n%64 of word n/64
// (little-endian), padding bits beyond N left 0.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>

#include "epilogue.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define LOWBIT_X86 1
#endif

namespace lowbit {
namespace wb {

constexpr int EPI_I32 = static_cast<int>(EpiKind::none);
constexpr int EPI_F32 = static_cast<int>(EpiKind::float_out);
constexpr int EPI_REQ_U8 = static_cast<int>(EpiKind::requant_u8);
constexpr int EPI_REQ_S8 = static_cast<int>(EpiKind::requant_s8);
constexpr int EPI_BITS = static_cast<int>(EpiKind::bits);

struct Epi {
    int kind = EPI_I32;
    // f32
    const float* scale = nullptr;
    const float* fbias = nullptr;  // may be null
    // requant
    const int32_t* m0 = nullptr;
    const int32_t* rshift = nullptr;
    int32_t zp = 0, qmin = 0, qmax = 255;
    // bits
    const int32_t* thr = nullptr;
    const uint8_t* flip = nullptr;  // may be null (no flip)
};

// Where output element (m, n) goes. Row-major: ptr + m*ldo + n. NCHW mode (hw > 0): row m is
// pixel m%hw of image m/hw, so (m, n) -> ptr + (m/hw)*nch*hw + n*hw + m%hw. For EPI_BITS the
// output is always row-major in uint64 words: bit n of row m is bit n%64 of word m*ldo + n/64.
struct Out {
    void* ptr = nullptr;
    int64_t ldo = 0;
    int64_t hw = 0;
    int64_t nch = 0;
};

inline int64_t out_index(const Out& o, int64_t m, int64_t n) {
    if (o.hw > 0) return (m / o.hw) * o.nch * o.hw + n * o.hw + (m % o.hw);
    return m * o.ldo + n;
}

// Address of row m: element (m, n) is at base + n * cs (one division per row, not per element).
struct RowAddr {
    int64_t base, cs;
};
inline RowAddr row_addr(const Out& o, int64_t m) {
    if (o.hw > 0) return {(m / o.hw) * o.nch * o.hw + (m % o.hw), o.hw};
    return {m * o.ldo, 1};
}

inline int elem_size(int kind) {
    switch (kind) {
        case EPI_I32:
        case EPI_F32: return 4;
        case EPI_REQ_U8:
        case EPI_REQ_S8: return 1;
        default: return 8;
    }
}

// 64-byte aligned heap buffer.
struct AlignedBuf {
    struct Free {
        void operator()(void* p) const { std::free(p); }
    };
    std::unique_ptr<uint8_t, Free> p;
    size_t n = 0;
    void alloc(size_t bytes) {
        size_t sz = (bytes + 63) / 64 * 64;
        if (sz == 0) sz = 64;
        p.reset(static_cast<uint8_t*>(std::aligned_alloc(64, sz)));
        if (!p) throw std::bad_alloc();
        std::memset(p.get(), 0, sz);
        n = sz;
    }
    uint8_t* data() const { return p.get(); }
};

// ---------------------------------------------------------------- scalar epilogue (one value)

// The byte stored for a requantized code: saturated to the output type, as the SIMD paths' packs do
// (the bindings keep [qmin, qmax] inside that range, so this only matters for direct C++ callers).
inline uint8_t code_byte(int32_t q, bool is_signed) {
    if (is_signed) return static_cast<uint8_t>(static_cast<int8_t>(q < -128 ? -128 : (q > 127 ? 127 : q)));
    return static_cast<uint8_t>(q < 0 ? 0 : (q > 255 ? 255 : q));
}

inline int32_t requant_one(int32_t acc, int32_t m0, int32_t rshift, int32_t zp, int32_t qmin, int32_t qmax) {
    int64_t v = static_cast<int64_t>(acc) * m0 + (int64_t(1) << (rshift - 1));
    v >>= rshift;  // arithmetic (C++20 guarantees it; GCC/Clang/MSVC always did)
    v += zp;
    if (v < qmin) v = qmin;
    if (v > qmax) v = qmax;
    return static_cast<int32_t>(v);
}

// Applies the epilogue to acc[0..cnt) = output row m, channels n0..n0+cnt (channel index n0 is the
// index into the epilogue parameter arrays; `nout` is the output channel index written).
inline void epi_row_scalar(const int32_t* acc, int64_t m, int64_t n0, int64_t nout, int cnt, const Epi& e,
                           const Out& o) {
    const RowAddr ra = row_addr(o, m);
    switch (e.kind) {
        case EPI_I32: {
            int32_t* p = static_cast<int32_t*>(o.ptr);
            for (int c = 0; c < cnt; ++c) p[ra.base + (nout + c) * ra.cs] = acc[c];
            break;
        }
        case EPI_F32: {
            float* p = static_cast<float*>(o.ptr);
            for (int c = 0; c < cnt; ++c) {
                float y = static_cast<float>(acc[c]) * e.scale[n0 + c];
                if (e.fbias) y = y + e.fbias[n0 + c];
                p[ra.base + (nout + c) * ra.cs] = y;
            }
            break;
        }
        case EPI_REQ_U8:
        case EPI_REQ_S8: {
            uint8_t* p = static_cast<uint8_t*>(o.ptr);
            const bool sgn = e.kind == EPI_REQ_S8;
            for (int c = 0; c < cnt; ++c) {
                int32_t q = requant_one(acc[c], e.m0[n0 + c], e.rshift[n0 + c], e.zp, e.qmin, e.qmax);
                p[ra.base + (nout + c) * ra.cs] = code_byte(q, sgn);
            }
            break;
        }
        default: break;
    }
}

// Packs threshold bits of cnt (<= 8) channels into the bit output. bits8: bit c = channel nout+c.
inline void store_bits8(uint32_t bits8, int64_t m, int64_t nout, int cnt, const Out& o) {
    bits8 &= (cnt >= 8) ? 0xffu : ((1u << cnt) - 1u);
    uint64_t* row = static_cast<uint64_t*>(o.ptr) + m * o.ldo;
    const int64_t w = nout >> 6;
    const int sh = static_cast<int>(nout & 63);
    if ((sh & 7) == 0 && cnt == 8) {
        // byte-aligned full byte: a plain byte store (little-endian word layout); no other tile
        // writes this byte, so there is no race between threads.
        reinterpret_cast<uint8_t*>(row + w)[sh >> 3] = static_cast<uint8_t>(bits8);
        return;
    }
    // unaligned (grouped layers whose per-group channel count is not a multiple of 8) or partial:
    // atomic OR into the zero-initialized output, so neighbouring tiles may run on other threads.
    if (bits8 == 0) return;
    __atomic_fetch_or(row + w, static_cast<uint64_t>(bits8) << sh, __ATOMIC_RELAXED);
    if (sh > 56) __atomic_fetch_or(row + w + 1, static_cast<uint64_t>(bits8) >> (64 - sh), __ATOMIC_RELAXED);
}

inline uint32_t threshold_bits_scalar(const int32_t* acc, int64_t n0, int cnt, const Epi& e) {
    uint32_t b = 0;
    for (int c = 0; c < cnt; ++c) {
        uint32_t bit = acc[c] >= e.thr[n0 + c] ? 1u : 0u;
        if (e.flip) bit ^= (e.flip[n0 + c] ? 1u : 0u);
        b |= bit << c;
    }
    return b;
}

#ifdef LOWBIT_X86
// ---------------------------------------------------------------- AVX2 epilogue (8 lanes)
// Used by the AVX2 kernels and, on AVX-512 machines (which all have AVX2), by the AVX-512 kernels.

#define LB_AVX2 __attribute__((target("avx2,fma")))

// Arithmetic right shift of int64 lanes by per-lane counts (AVX2 lacks vpsravq):
// sra(x, r) = srl(x ^ s, r) ^ s with s = (x < 0 ? ~0 : 0).
LB_AVX2 static inline __m256i sra_epi64_avx2(__m256i x, __m256i r) {
    const __m256i s = _mm256_cmpgt_epi64(_mm256_setzero_si256(), x);
    return _mm256_xor_si256(_mm256_srlv_epi64(_mm256_xor_si256(x, s), r), s);
}

LB_AVX2 static inline __m256i clamp_epi64_avx2(__m256i x, __m256i lo, __m256i hi) {
    x = _mm256_blendv_epi8(x, lo, _mm256_cmpgt_epi64(lo, x));
    x = _mm256_blendv_epi8(x, hi, _mm256_cmpgt_epi64(x, hi));
    return x;
}

// 8 int32 accumulators -> 8 requantized int32 codes.
LB_AVX2 static inline __m256i requant8_avx2(__m256i acc, const int32_t* m0p, const int32_t* rsp, const Epi& e) {
    const __m256i m0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(m0p));
    const __m256i rs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rsp));
    const __m256i lo32 = _mm256_set1_epi64x(0xffffffffLL);
    const __m256i one = _mm256_set1_epi64x(1);
    const __m256i lo = _mm256_set1_epi64x(static_cast<int64_t>(e.qmin) - e.zp);
    const __m256i hi = _mm256_set1_epi64x(static_cast<int64_t>(e.qmax) - e.zp);
    // even lanes 0,2,4,6
    __m256i r_e = _mm256_and_si256(rs, lo32);
    __m256i p_e = _mm256_mul_epi32(acc, m0);
    p_e = _mm256_add_epi64(p_e, _mm256_sllv_epi64(one, _mm256_sub_epi64(r_e, one)));
    p_e = clamp_epi64_avx2(sra_epi64_avx2(p_e, r_e), lo, hi);
    // odd lanes 1,3,5,7
    __m256i r_o = _mm256_srli_epi64(rs, 32);
    __m256i p_o = _mm256_mul_epi32(_mm256_srli_epi64(acc, 32), _mm256_srli_epi64(m0, 32));
    p_o = _mm256_add_epi64(p_o, _mm256_sllv_epi64(one, _mm256_sub_epi64(r_o, one)));
    p_o = clamp_epi64_avx2(sra_epi64_avx2(p_o, r_o), lo, hi);
    __m256i q = _mm256_blend_epi32(p_e, _mm256_slli_epi64(p_o, 32), 0xaa);
    return _mm256_add_epi32(q, _mm256_set1_epi32(e.zp));
}

LB_AVX2 static inline void store8_i8_avx2(uint8_t* dst, __m256i q, bool is_signed) {
    const __m128i w16 = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
    const __m128i b = is_signed ? _mm_packs_epi16(w16, w16) : _mm_packus_epi16(w16, w16);
    _mm_storel_epi64(reinterpret_cast<__m128i*>(dst), b);
}

// Vectorized epi_row_scalar (same contract). Row-major outputs get vector stores; NCHW outputs
// are scattered from a small buffer.
LB_AVX2 static inline void epi_row_avx2(const int32_t* acc, int64_t m, int64_t n0, int64_t nout, int cnt,
                                        const Epi& e, const Out& o) {
    const bool rowmajor = o.hw <= 0;
    const RowAddr ra = row_addr(o, m);
    int c = 0;
    switch (e.kind) {
        case EPI_I32: {
            int32_t* p = static_cast<int32_t*>(o.ptr);
            if (rowmajor) {
                int32_t* d = p + m * o.ldo + nout;
                for (; c + 8 <= cnt; c += 8)
                    _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + c),
                                        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc + c)));
            }
            for (; c < cnt; ++c) p[ra.base + (nout + c) * ra.cs] = acc[c];
            break;
        }
        case EPI_F32: {
            float* p = static_cast<float*>(o.ptr);
            for (; c + 8 <= cnt; c += 8) {
                __m256 y = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc + c))),
                                         _mm256_loadu_ps(e.scale + n0 + c));
                if (e.fbias) y = _mm256_add_ps(y, _mm256_loadu_ps(e.fbias + n0 + c));
                if (rowmajor) {
                    _mm256_storeu_ps(p + m * o.ldo + nout + c, y);
                } else {
                    alignas(32) float t[8];
                    _mm256_store_ps(t, y);
                    for (int j = 0; j < 8; ++j) p[ra.base + (nout + c + j) * ra.cs] = t[j];
                }
            }
            for (; c < cnt; ++c) {
                float y = static_cast<float>(acc[c]) * e.scale[n0 + c];
                if (e.fbias) y = y + e.fbias[n0 + c];
                p[ra.base + (nout + c) * ra.cs] = y;
            }
            break;
        }
        case EPI_REQ_U8:
        case EPI_REQ_S8: {
            uint8_t* p = static_cast<uint8_t*>(o.ptr);
            const bool sgn = e.kind == EPI_REQ_S8;
            for (; c + 8 <= cnt; c += 8) {
                __m256i q = requant8_avx2(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc + c)), e.m0 + n0 + c,
                                          e.rshift + n0 + c, e);
                if (rowmajor) {
                    store8_i8_avx2(p + m * o.ldo + nout + c, q, sgn);
                } else {
                    alignas(16) uint8_t t[16];
                    store8_i8_avx2(t, q, sgn);
                    for (int j = 0; j < 8; ++j) p[ra.base + (nout + c + j) * ra.cs] = t[j];
                }
            }
            for (; c < cnt; ++c) {
                int32_t q = requant_one(acc[c], e.m0[n0 + c], e.rshift[n0 + c], e.zp, e.qmin, e.qmax);
                p[ra.base + (nout + c) * ra.cs] = code_byte(q, sgn);
            }
            break;
        }
        default: break;
    }
}

// Threshold bits of 8 channels: bit c = (acc[c] >= thr[n0+c]) ^ flip[n0+c]; cnt <= 8 valid.
LB_AVX2 static inline uint32_t threshold_bits8_avx2(__m256i acc, int64_t n0, int cnt, const Epi& e) {
    if (cnt < 8) {
        alignas(32) int32_t t[8];
        _mm256_store_si256(reinterpret_cast<__m256i*>(t), acc);
        return threshold_bits_scalar(t, n0, cnt, e);
    }
    const __m256i thr = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(e.thr + n0));
    // acc >= thr  <=>  !(thr > acc): no thr-1 overflow at INT32_MIN
    uint32_t lt = static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(thr, acc))));
    uint32_t b = (~lt) & 0xffu;
    if (e.flip) {
        uint64_t f8;
        std::memcpy(&f8, e.flip + n0, 8);
        // gather bit 0 of each flip byte (values 0/1)
        uint32_t fb = 0;
        for (int j = 0; j < 8; ++j) fb |= static_cast<uint32_t>((f8 >> (8 * j)) & 1u) << j;
        b ^= fb;
    }
    return b;
}
#endif  // LOWBIT_X86

}  // namespace wb
}  // namespace lowbit

namespace lowbit {
namespace wb {

// Work split of a GEMM over (row block, panel group) tasks for the thread pool. Rows are cut in
// blocks of `mb` (a multiple of the kernel's row tile) sized for L2; when there are fewer row
// blocks than 4 tasks per thread, the panels are split into groups as well.
struct Plan {
    int64_t mb = 1, mblocks = 1, ngroups = 1, pg = 1;  // pg: panels per group
    int64_t tasks() const { return mblocks * ngroups; }
};

inline Plan make_plan(int64_t M, int64_t panels, int64_t row_bytes, int mr, int nthreads, int64_t l2_bytes = 160 * 1024) {
    Plan p;
    int64_t mb = row_bytes > 0 ? l2_bytes / row_bytes : M;
    mb = mb / mr * mr;
    if (mb < mr) mb = mr;
    if (mb > 384) mb = 384 / mr * mr;
    if (mb > M) mb = (M + mr - 1) / mr * mr;
    if (mb < 1) mb = 1;
    p.mb = mb;
    p.mblocks = (M + mb - 1) / mb;
    const int64_t want = 4 * static_cast<int64_t>(nthreads);
    p.ngroups = 1;
    if (nthreads > 1 && p.mblocks < want && panels > 1) {
        p.ngroups = (want + p.mblocks - 1) / p.mblocks;
        if (p.ngroups > panels) p.ngroups = panels;
    }
    p.pg = (panels + p.ngroups - 1) / p.ngroups;
    p.ngroups = panels > 0 ? (panels + p.pg - 1) / p.pg : 1;
    return p;
}

}  // namespace wb
}  // namespace lowbit

namespace lowbit {
namespace wb {

// Epilogue from the flat binding arguments: f32 (p0 = scale, p1 = bias or 0), requant
// (p0 = m0, p1 = rshift), bits (p0 = thresholds int32, p1 = flip uint8 or 0).
inline Epi make_epi(int kind, uintptr_t p0, uintptr_t p1, int32_t zp, int32_t qmin, int32_t qmax) {
    Epi e;
    e.kind = kind;
    switch (kind) {
        case EPI_F32:
            e.scale = reinterpret_cast<const float*>(p0);
            e.fbias = reinterpret_cast<const float*>(p1);
            break;
        case EPI_REQ_U8:
        case EPI_REQ_S8:
            e.m0 = reinterpret_cast<const int32_t*>(p0);
            e.rshift = reinterpret_cast<const int32_t*>(p1);
            e.zp = zp;
            e.qmin = qmin;
            e.qmax = qmax;
            break;
        case EPI_BITS:
            e.thr = reinterpret_cast<const int32_t*>(p0);
            e.flip = reinterpret_cast<const uint8_t*>(p1);
            break;
        default: break;
    }
    return e;
}

inline int64_t conv_out_size(int64_t in, int64_t k, int64_t s, int64_t p, int64_t d) {
    return (in + 2 * p - d * (k - 1) - 1) / s + 1;
}

}  // namespace wb
}  // namespace lowbit
