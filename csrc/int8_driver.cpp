// int8 kernels: weight packing, the scalar epilogue, ISA dispatch, blocking over threads, and the
// convolution drivers (implicit im2col from NHWC rows; direct depthwise).
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <new>
#include <stdexcept>

#include "int8_common.h"
#include "parallel.h"

namespace lowbit {
namespace int8 {

void AlignedFree::operator()(void* p) const noexcept { std::free(p); }

void* aligned_alloc64(size_t bytes) {
    size_t rounded = (std::max<size_t>(bytes, 1) + 63) & ~size_t(63);
    void* p = std::aligned_alloc(64, rounded);
    if (!p) throw std::bad_alloc();
    return p;
}

void* scratch_bytes(int slot, size_t bytes) {
    struct Buf {
        void* p = nullptr;
        size_t size = 0;
        ~Buf() { std::free(p); }
    };
    static thread_local Buf bufs[8];
    Buf& b = bufs[slot];
    if (b.size < bytes) {
        const size_t want = std::max(bytes, b.size * 3 / 2);
        std::free(b.p);
        b.p = nullptr;
        b.size = 0;
        b.p = aligned_alloc64(want);
        b.size = want;
    }
    return b.p;
}

std::unique_ptr<Packed> pack(const int8_t* w, int64_t n, int64_t k, int64_t ldw) {
    auto p = std::make_unique<Packed>();
    p->n = n;
    p->k = k;
    p->k4 = (k + kGroupK - 1) / kGroupK;
    p->nblocks = (n + kBlockN - 1) / kBlockN;
    p->data.reset(static_cast<int8_t*>(aligned_alloc64(p->nbytes())));
    std::memset(p->data.get(), 0, p->nbytes());
    p->colsum.assign(static_cast<size_t>(p->nblocks * kBlockN), 0);
    p->l1.assign(static_cast<size_t>(n), 0);
    for (int64_t i = 0; i < n; ++i) {
        const int8_t* src = w + i * ldw;
        int8_t* dst = p->data.get() + (i / kBlockN) * p->k4 * (kBlockN * kGroupK) + (i % kBlockN) * kGroupK;
        int64_t s = 0, a = 0;
        for (int64_t kk = 0; kk < k; ++kk) {
            dst[(kk / kGroupK) * (kBlockN * kGroupK) + (kk % kGroupK)] = src[kk];
            s += src[kk];
            a += src[kk] < 0 ? -int64_t(src[kk]) : int64_t(src[kk]);
        }
        p->colsum[static_cast<size_t>(i)] = static_cast<int32_t>(static_cast<uint32_t>(s));  // wraps like acc
        p->l1[static_cast<size_t>(i)] = a;
    }
    return p;
}

namespace {

inline int32_t wrap_add(int32_t a, int32_t b) {
    return static_cast<int32_t>(static_cast<uint32_t>(a) + static_cast<uint32_t>(b));
}

}  // namespace

void epilogue_scalar(const Epi& e, const int32_t* T, int64_t ldt, int64_t row0, int64_t rows, int64_t n0,
                     int64_t cols, const int32_t* corr) {
    const int64_t co = e.col_off + n0;
    for (int64_t r = 0; r < rows; ++r) {
        const int32_t* t = T + r * ldt;
        const int64_t o = (row0 + r) * e.ldo + co;
        for (int64_t c = 0; c < cols; ++c) {
            const int32_t acc = wrap_add(t[c], corr[n0 + c]);
            switch (e.kind) {
                case EpiKind::none:
                    static_cast<int32_t*>(e.out)[o + c] = acc;
                    break;
                case EpiKind::requant_u8:
                case EpiKind::requant_s8: {
                    const int32_t rs = e.rshift[co + c];
                    int64_t v = static_cast<int64_t>(acc) * e.m0[co + c] + (int64_t(1) << (rs - 1));
                    v = (v >> rs) + e.out_zp;  // arithmetic shift (GCC/Clang/MSVC)
                    v = std::min<int64_t>(std::max<int64_t>(v, e.qmin), e.qmax);
                    if (e.add_res)
                        static_cast<uint8_t*>(e.out)[o + c] =
                            qops::add_one(static_cast<uint8_t>(v), e.add_res[o + c], e.add);
                    else if (e.kind == EpiKind::requant_u8)
                        static_cast<uint8_t*>(e.out)[o + c] = static_cast<uint8_t>(v);
                    else
                        static_cast<int8_t*>(e.out)[o + c] = static_cast<int8_t>(v);
                    break;
                }
                case EpiKind::float_out: {
                    float f = static_cast<float>(acc) * e.scale[co + c];
                    if (e.fbias) f = f + e.fbias[co + c];
                    static_cast<float*>(e.out)[o + c] = f;
                    break;
                }
            }
        }
    }
}

namespace {
thread_local KernelPath t_path;
void note_path(Isa isa, const char* kind, const Epi& e) { t_path = KernelPath{isa, kind, e.add_res != nullptr}; }
}  // namespace

KernelPath last_kernel_path() { return t_path; }

Isa int8_isa() {
    const Isa a = active_isa();
#ifdef LOWBIT_INT8_X86
    if (a >= Isa::vnni) return Isa::vnni;
    if (a >= Isa::avx2) return Isa::avx2;
#endif
    (void)a;
    return Isa::portable;
}

namespace {

using ChunkFn = void (*)(const GemmJob&, int64_t, int64_t, int64_t, int64_t);

// Largest rows per chunk (a multiple of the micro-tile height mr), chosen so that the packed activation
// panel (rows x K) stays in L2.
struct RowBlocking {
    int64_t mr, mc;
};

RowBlocking chunk_rows(Isa isa, int64_t k4) {
    int64_t mr = 4, bytes_per_row = k4 * 4 * 2, cap = 64;
    if (isa == Isa::avx2) {
        mr = 6;
        cap = 96;
    } else if (isa == Isa::vnni) {
        mr = 8;
        bytes_per_row = k4 * 4;
        cap = 128;
    }
    int64_t mc = (192 * 1024) / std::max<int64_t>(bytes_per_row, 1);
    mc = std::min(cap, std::max(mr, mc / mr * mr));
    return {mr, mc};
}

}  // namespace

void gemm(const Rows& a, int64_t m, int32_t zp, const Packed& w, const int32_t* bias, const Epi& e) {
    if (m <= 0 || w.n <= 0) return;
    const Isa isa = int8_isa();
    std::vector<int32_t> corr(static_cast<size_t>(w.nblocks * kBlockN), 0);
    const bool u8_operand = isa == Isa::vnni;
    for (int64_t n = 0; n < w.n; ++n) {
        int32_t c = bias ? bias[e.col_off + n] : 0;
        if (u8_operand)
            c = static_cast<int32_t>(static_cast<uint32_t>(c) -
                                     static_cast<uint32_t>(zp) * static_cast<uint32_t>(w.colsum[n]));
        corr[static_cast<size_t>(n)] = c;
    }
    GemmJob job;
    job.a = &a;
    job.m = m;
    job.zp = zp;
    job.w = &w;
    job.corr = corr.data();
    job.epi = e;

    ChunkFn fn = chunk_portable;
#ifdef LOWBIT_INT8_X86
    if (isa == Isa::vnni) fn = chunk_vnni;
    else if (isa == Isa::avx2) fn = chunk_avx2;
#endif
    note_path(isa, "gemm", e);
    // Work split: mchunks row chunks x ngroups column groups, every job about the same size, so that the
    // contiguous split of the jobs over the threads is balanced. With several threads the row chunks
    // are a multiple of the thread count (rows dealt in units of mr); a product with fewer rows than
    // threads x chunk is split over the output columns as well.
    const RowBlocking rb = chunk_rows(isa, w.k4);
    const int64_t units = (m + rb.mr - 1) / rb.mr;
    int64_t mchunks = std::min(units, (m + rb.mc - 1) / rb.mc);
    const int nt = num_threads();
    const int64_t nb = w.nblocks;
    int64_t ngroups = 1;
    if (nt > 1) {
        if (mchunks >= nt)
            mchunks = std::min(units, (mchunks + nt - 1) / nt * nt);
        else
            ngroups = std::min<int64_t>(nb, (nt + mchunks - 1) / mchunks);
    }
    const int64_t njobs = mchunks * ngroups;
    // Hand a thread at least ~256k multiply-adds (several microseconds): waking a worker costs more than
    // the work for tiny products.
    const int64_t job_macs =
        std::max<int64_t>(1, (m / mchunks) * (nb * kBlockN / ngroups) * std::max<int64_t>(w.k, 1));
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / job_macs);
    parallel_for(njobs, grain, [&](int64_t j0, int64_t j1) {
        for (int64_t jj = j0; jj < j1; ++jj) {
            const int64_t mi = jj / ngroups, gi = jj % ngroups;
            const int64_t m0 = (mi * units / mchunks) * rb.mr, m1 = std::min(m, ((mi + 1) * units / mchunks) * rb.mr);
            const int64_t b0 = gi * nb / ngroups, b1 = (gi + 1) * nb / ngroups;
            if (m0 < m1 && b0 < b1) fn(job, m0, m1, b0, b1);
        }
    });
}

namespace {

// memcpy is a library call for sizes unknown at compile time (and GCC turns byte loops back into one);
// im2col copies many tiny runs (e.g. 3 channels), so small sizes use fixed-size overlapping moves.
inline void copy_run(uint8_t* d, const uint8_t* s, int64_t n) {
    if (n >= 32) {
        std::memcpy(d, s, static_cast<size_t>(n));
    } else if (n >= 16) {
        std::memcpy(d, s, 16);
        std::memcpy(d + n - 16, s + n - 16, 16);
    } else if (n >= 8) {
        std::memcpy(d, s, 8);
        std::memcpy(d + n - 8, s + n - 8, 8);
    } else if (n >= 4) {
        std::memcpy(d, s, 4);
        std::memcpy(d + n - 4, s + n - 4, 4);
    } else if (n > 0) {
        d[0] = s[0];
        d[n / 2] = s[n / 2];
        d[n - 1] = s[n - 1];
    }
}

inline void fill_run(uint8_t* d, uint8_t v, int64_t n) {
    if (n >= 8) {
        std::memset(d, v, static_cast<size_t>(n));
        return;
    }
    for (int64_t i = 0; i < n; ++i) d[i] = v;
}

// Implicit im2col: row m = output pixel (b, oh, ow); K order (kh, kw, channel of the group). With
// `kpad` > 0 (groups == 1 only), each kernel row's kw*c bytes are followed by kpad zero-weight bytes so
// that every kernel row starts on a k-group of 4 (the packed weights are laid out the same way).
//
// Direct access (Rows::runs): one run per kernel row (kw*c [+ kpad] bytes, contiguous in NHWC) when
// groups == 1 and there is no horizontal dilation, else one run per tap (c/groups bytes). A run that
// touches padding, or that would read past the end of the input, is assembled in the caller's buffer.
struct ConvRows final : Rows {
    const uint8_t* x = nullptr;
    const uint8_t* x_end = nullptr;  // end of the input tensor
    const ConvShape* s = nullptr;
    int64_t c0 = 0, cg = 0, kpad = 0;
    uint8_t zp = 0;
    bool direct = false;  // runs() available
    bool row_runs() const { return s->groups == 1 && s->dw == 1; }
    int64_t runs() const override { return direct ? (row_runs() ? s->kh : s->kh * s->kw) : 0; }
    int64_t run_len() const override { return row_runs() ? s->kw * cg + kpad : cg; }
    void run_ptrs(int64_t m, const uint8_t** p, uint8_t* buf) const override {
        const ConvShape& S = *s;
        const int64_t ow = m % S.wo;
        const int64_t t = m / S.wo;
        const int64_t oh = t % S.ho, b = t / S.ho;
        const int64_t ih0 = oh * S.sh - S.ph, iw0 = ow * S.sw - S.pw;
        const uint8_t* xb = x + b * S.h * S.w * S.c + c0;
        const int64_t len = run_len();
        const bool cols_in = iw0 >= 0 && iw0 + (S.kw - 1) * S.dw < S.w;
        for (int64_t i = 0; i < S.kh; ++i) {
            const int64_t ih = ih0 + i * S.dh;
            const bool row_in = ih >= 0 && ih < S.h;
            if (row_runs()) {
                const uint8_t* src = xb + (ih * S.w + iw0) * S.c;
                if (row_in && cols_in && src + len <= x_end) {
                    *p++ = src;
                } else {
                    fill_conv_row(buf, xb, ih, iw0);
                    std::memset(buf + S.kw * cg, zp, static_cast<size_t>(kpad));
                    *p++ = buf;
                }
                buf += len;
                continue;
            }
            for (int64_t jj = 0; jj < S.kw; ++jj, buf += len) {
                const int64_t iw = iw0 + jj * S.dw;
                if (row_in && iw >= 0 && iw < S.w) {
                    *p++ = xb + (ih * S.w + iw) * S.c;
                } else {
                    std::memset(buf, zp, static_cast<size_t>(len));
                    *p++ = buf;
                }
            }
        }
    }
    void run_ptrs_many(int64_t m, int64_t count, const uint8_t** p, uint8_t* buf) const override {
        const ConvShape& S = *s;
        const int64_t nr = runs(), len = run_len();
        int64_t ow = m % S.wo, t = m / S.wo;
        int64_t oh = t % S.ho, b = t / S.ho;
        const int64_t step_r = S.dh * S.w * S.c, step_t = S.dw * S.c;
        for (int64_t r = 0; r < count; ++r, p += nr, buf += nr * len) {
            const int64_t ih0 = oh * S.sh - S.ph, iw0 = ow * S.sw - S.pw;
            const bool inside = ih0 >= 0 && ih0 + (S.kh - 1) * S.dh < S.h && iw0 >= 0 &&
                                iw0 + (S.kw - 1) * S.dw < S.w;
            const uint8_t* base = x + ((b * S.h + ih0) * S.w + iw0) * S.c + c0;
            // every run in the source (the last one must not read past the end of the input)
            if (inside && base + (S.kh - 1) * step_r + (row_runs() ? len : (S.kw - 1) * step_t + len) <= x_end) {
                const uint8_t** q = p;
                for (int64_t i = 0; i < S.kh; ++i) {
                    if (row_runs()) {
                        *q++ = base + i * step_r;
                        continue;
                    }
                    for (int64_t jj = 0; jj < S.kw; ++jj) *q++ = base + i * step_r + jj * step_t;
                }
            } else {
                run_ptrs(m + r, p, buf);
            }
            if (++ow == S.wo) {
                ow = 0;
                if (++oh == S.ho) {
                    oh = 0;
                    ++b;
                }
            }
        }
    }
    // The kw*cg bytes of kernel row ih of the window starting at column iw0 (zero point for padding).
    void fill_conv_row(uint8_t* d, const uint8_t* xb, int64_t ih, int64_t iw0) const {
        const ConvShape& S = *s;
        if (ih < 0 || ih >= S.h) {
            fill_run(d, zp, S.kw * cg);
            return;
        }
        const uint8_t* xr = xb + ih * S.w * S.c;
        if (iw0 >= 0 && iw0 + (S.kw - 1) * S.dw < S.w && S.dw == 1 && cg == S.c) {  // one contiguous run
            copy_run(d, xr + iw0 * S.c, S.kw * cg);
            return;
        }
        for (int64_t jj = 0; jj < S.kw; ++jj, d += cg) {
            const int64_t iw = iw0 + jj * S.dw;
            if (iw < 0 || iw >= S.w)
                fill_run(d, zp, cg);
            else
                copy_run(d, xr + iw * S.c, cg);
        }
    }
    const uint8_t* row(int64_t m, uint8_t* scratch) const override {
        const ConvShape& S = *s;
        const int64_t ow = m % S.wo;
        const int64_t t = m / S.wo;
        const int64_t oh = t % S.ho, b = t / S.ho;
        const int64_t ih0 = oh * S.sh - S.ph, iw0 = ow * S.sw - S.pw;
        const uint8_t* xb = x + b * S.h * S.w * S.c + c0;
        if (S.kh == 1 && S.kw == 1 && kpad == 0 && ih0 >= 0 && ih0 < S.h && iw0 >= 0 && iw0 < S.w)
            return xb + (ih0 * S.w + iw0) * S.c;
        uint8_t* d = scratch;
        for (int64_t i = 0; i < S.kh; ++i) {
            fill_conv_row(d, xb, ih0 + i * S.dh, iw0);
            d += S.kw * cg;
            fill_run(d, zp, kpad);
            d += kpad;
        }
        return scratch;
    }
};

}  // namespace

void conv2d_gemm(const uint8_t* x, const ConvShape& s, int32_t zp, const std::vector<const Packed*>& w,
                 const int32_t* bias, const Epi& e) {
    const int64_t m = s.b * s.ho * s.wo;
    const int64_t cg = s.c / s.groups, ng = s.n / s.groups;
    if (m <= 0) return;
    const bool dense = s.groups == 1 && s.kh == 1 && s.kw == 1 && s.sh == 1 && s.sw == 1 && s.ph == 0 && s.pw == 0;
    for (int64_t g = 0; g < s.groups; ++g) {
        Epi eg = e;
        eg.col_off = e.col_off + g * ng;
        if (dense) {
            DenseRows rows;
            rows.k = s.c;
            rows.x = x;
            rows.ld = s.c;
            gemm(rows, m, zp, *w[0], bias, eg);
        } else {
            ConvRows rows;
            rows.x = x;
            rows.s = &s;
            rows.c0 = g * cg;
            rows.cg = cg;
            rows.zp = static_cast<uint8_t>(zp);
            rows.x_end = x + s.b * s.h * s.w * s.c;
            rows.kpad = w[static_cast<size_t>(g)]->k / s.kh - s.kw * cg;  // 0, or the row padding (groups == 1)
            rows.k = w[static_cast<size_t>(g)]->k;
            rows.direct = rows.run_len() % 4 == 0;
            gemm(rows, m, zp, *w[static_cast<size_t>(g)], bias, eg);
        }
    }
    note_path(int8_isa(), dense ? "conv-1x1" : "conv-im2col", e);
}

void dw_rows_portable(const DwJob& j, int64_t r0, int64_t r1) {
    const ConvShape& S = *j.s;
    const int64_t C = S.c, taps = S.kh * S.kw;
    int32_t* T = scratch<int32_t>(1, static_cast<size_t>(S.wo * C));
    for (int64_t r = r0; r < r1; ++r) {
        const int64_t oh = r % S.ho, b = r / S.ho;
        const uint8_t* xb = j.x + b * S.h * S.w * C;
        std::fill(T, T + S.wo * C, 0);
        for (int64_t ow = 0; ow < S.wo; ++ow) {
            int32_t* t = T + ow * C;
            for (int64_t i = 0; i < S.kh; ++i) {
                const int64_t ih = oh * S.sh - S.ph + i * S.dh;
                if (ih < 0 || ih >= S.h) continue;
                for (int64_t jj = 0; jj < S.kw; ++jj) {
                    const int64_t iw = ow * S.sw - S.pw + jj * S.dw;
                    if (iw < 0 || iw >= S.w) continue;
                    const uint8_t* px = xb + (ih * S.w + iw) * C;
                    const int64_t tap = i * S.kw + jj;
                    for (int64_t c = 0; c < C; ++c)
                        t[c] += (int32_t(px[c]) - j.zp) * int32_t(j.w[c * taps + tap]);
                }
            }
        }
        epilogue_scalar(j.epi, T, C, r * S.wo, S.wo, 0, C, j.corr);
    }
}

void conv2d_depthwise(const uint8_t* x, const ConvShape& s, int32_t zp, const int8_t* w, const int32_t* bias,
                      const Epi& e) {
    const int64_t rows = s.b * s.ho;
    if (rows <= 0 || s.wo <= 0 || s.c <= 0) return;
    std::vector<int32_t> corr(static_cast<size_t>(s.c), 0);
    if (bias)
        for (int64_t c = 0; c < s.c; ++c) corr[static_cast<size_t>(c)] = bias[e.col_off + c];
    const int64_t taps = s.kh * s.kw;
#ifdef LOWBIT_INT8_X86
    const bool raw_u8 = int8_isa() >= Isa::avx2;  // the AVX2 path multiplies raw codes
#else
    const bool raw_u8 = false;
#endif
    if (raw_u8)
        for (int64_t c = 0; c < s.c; ++c) {
            int32_t sw = 0;
            for (int64_t t = 0; t < taps; ++t) sw += w[c * taps + t];
            corr[static_cast<size_t>(c)] = static_cast<int32_t>(static_cast<uint32_t>(corr[static_cast<size_t>(c)]) -
                                                                static_cast<uint32_t>(zp) * static_cast<uint32_t>(sw));
        }
    DwJob job;
    job.x = x;
    job.s = &s;
    job.zp = zp;
    job.w = w;
    job.corr = corr.data();
    job.epi = e;
    void (*fn)(const DwJob&, int64_t, int64_t) = dw_rows_portable;
#ifdef LOWBIT_INT8_X86
    std::vector<int16_t> wpair;
    std::vector<int8_t> wq;
    Isa ran = Isa::portable;
    if (int8_isa() == Isa::vnni && !e.add_res) {  // (a fused residual add: the AVX2 path)
        dw_pack_vnni(w, s.c, s.kh, s.kw, wq);
        job.wq = wq.data();
        fn = dw_rows_vnni;
        ran = Isa::vnni;
    } else if (raw_u8) {
        dw_pack_avx2(w, s.c, s.kh * s.kw, wpair);
        job.wpair = wpair.data();
        fn = dw_rows_avx2;
        ran = Isa::avx2;
    }
    note_path(ran, "depthwise", e);
#else
    note_path(Isa::portable, "depthwise", e);
#endif
    // Enough output rows per chunk to amortize the hand-off (~64k MACs).
    const int64_t per_row = std::max<int64_t>(1, s.wo * s.c * s.kh * s.kw);
    const int64_t grain = std::max<int64_t>(1, 65536 / per_row);
    parallel_for(rows, grain, [&](int64_t r0, int64_t r1) { fn(job, r0, r1); });
}

}  // namespace int8
}  // namespace lowbit
