// Binary kernels: packing, the portable path, the GEMM driver, linear and conv2d (see binary.h).
#include "binary.h"

#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu_features.h"
#include "parallel.h"

namespace lowbit {
namespace binary {

#ifdef LOWBIT_X86
#define LB_IS_X86 1
#else
#define LB_IS_X86 0
#endif

static inline uint64_t seg_mask(int64_t word_in_seg, int64_t seg_bits) {
    const int64_t lo = word_in_seg * 64;
    if (seg_bits >= lo + 64) return ~uint64_t(0);
    if (seg_bits <= lo) return 0;
    return (uint64_t(1) << (seg_bits - lo)) - 1;
}

static inline uint64_t lo_plane(uint64_t v) { return v & 0x0f0f0f0f0f0f0f0fULL; }
static inline uint64_t hi_plane(uint64_t v) { return (v >> 4) & 0x0f0f0f0f0f0f0f0fULL; }

std::shared_ptr<Packed> pack(const uint64_t* w, int64_t N, int64_t KW, int64_t seg_words, int64_t seg_bits,
                             int64_t groups) {
    if (N < 1 || KW < 1) throw std::invalid_argument("binary: empty weight");
    if (seg_words < 1 || KW % seg_words != 0 || seg_bits < 1 || seg_bits > 64 * seg_words ||
        seg_bits <= 64 * (seg_words - 1))
        throw std::invalid_argument("binary: inconsistent segment layout (seg_words=" + std::to_string(seg_words) +
                                    ", seg_bits=" + std::to_string(seg_bits) + ", KW=" + std::to_string(KW) + ")");
    if (groups < 1 || N % groups != 0) throw std::invalid_argument("binary: N must be a multiple of groups");
    auto p = std::make_shared<Packed>();
    p->N = N;
    p->KW = KW;
    p->seg_words = seg_words;
    p->seg_bits = seg_bits;
    p->Kbits = (KW / seg_words) * seg_bits;
    if (p->Kbits > (int64_t(1) << 30)) throw std::invalid_argument("binary: K too large");
    p->G = groups;
    p->Ng = N / groups;
    p->PG = (p->Ng + NR - 1) / NR;
    const size_t bytes = static_cast<size_t>(groups * p->PG * KW * NR * 8);
    p->raw.alloc(bytes);
    p->lo.alloc(bytes);
    p->hi.alloc(bytes);
    uint64_t* R = reinterpret_cast<uint64_t*>(p->raw.data());
    uint64_t* L = reinterpret_cast<uint64_t*>(p->lo.data());
    uint64_t* H = reinterpret_cast<uint64_t*>(p->hi.data());
    for (int64_t g = 0; g < groups; ++g)
        for (int64_t pi = 0; pi < p->PG; ++pi) {
            const int64_t base = (g * p->PG + pi) * KW * NR;
            for (int64_t k = 0; k < KW; ++k)
                for (int c = 0; c < NR; ++c) {
                    const int64_t nl = pi * NR + c;
                    uint64_t v = 0;
                    if (nl < p->Ng) v = w[(g * p->Ng + nl) * KW + k] & seg_mask(k % seg_words, seg_bits);
                    R[base + k * NR + c] = v;
                    L[base + k * NR + kPlaneSlot[c]] = lo_plane(v);
                    H[base + k * NR + kPlaneSlot[c]] = hi_plane(v);
                }
        }
    return p;
}

// ------------------------------------------------------------------------------------------ portable

static void epi_portable(const int32_t* pc, int64_t m, int64_t n0, int cnt, int32_t Kbits, const wb::Epi& e,
                         const wb::Out& o) {
    int32_t dot[ACC_LD];
    for (int c = 0; c < cnt; ++c) dot[c] = Kbits - 2 * pc[c];
    if (e.kind == wb::EPI_BITS) {
        for (int c = 0; c < cnt; c += 8) {
            const int k = std::min(8, cnt - c);
            wb::store_bits8(wb::threshold_bits_scalar(dot + c, n0 + c, k, e), m, n0 + c, k, o);
        }
    } else {
        wb::epi_row_scalar(dot, m, n0, n0, cnt, e, o);
    }
}

// The portable tile, instantiated twice: plain C++ and, on x86, with the scalar POPCNT instruction
// allowed (target attribute) for CPUs that have it.
#define LB_BINARY_PORTABLE_TILE(NAME, ATTR)                                                                        \
    ATTR static void NAME(const uint64_t* A, const uint64_t*, int64_t lda, int mr, const uint64_t* P,              \
                          const uint64_t*, int64_t pstride, int np, int64_t KW, int32_t Kbits, int64_t m,          \
                          int64_t n0, int cnt, const wb::Epi& e, const wb::Out& o) {                               \
        int32_t pc[MAX_MR * ACC_LD] = {0};                                                                         \
        for (int j = 0; j < np; ++j) {                                                                             \
            const uint64_t* Pj = P + j * pstride;                                                                  \
            for (int r = 0; r < mr; ++r) {                                                                         \
                const uint64_t* a = A + r * lda;                                                                   \
                int32_t s[NR] = {0};                                                                               \
                for (int64_t k = 0; k < KW; ++k) {                                                                 \
                    const uint64_t av = a[k];                                                                      \
                    for (int c = 0; c < NR; ++c) s[c] += __builtin_popcountll(av ^ Pj[k * NR + c]);                \
                }                                                                                                  \
                for (int c = 0; c < NR; ++c) pc[r * ACC_LD + j * NR + c] += s[c];                                  \
            }                                                                                                      \
        }                                                                                                          \
        for (int r = 0; r < mr; ++r) epi_portable(pc + r * ACC_LD, m + r, n0, cnt, Kbits, e, o);                  \
    }                                                                                                              \
    ATTR static void NAME##_panel(const uint64_t* A, const uint64_t* A1, int64_t lda, int64_t rows,                 \
                                  const uint64_t* P, const uint64_t* P1, int64_t pstride, int np, int64_t KW,       \
                                  int32_t Kbits, int64_t m, int64_t n0, int cnt, const wb::Epi& e,                 \
                                  const wb::Out& o) {                                                              \
        for (int64_t r = 0; r < rows; r += 4) {                                                                    \
            const int mr = static_cast<int>(std::min<int64_t>(4, rows - r));                                      \
            NAME(A + r * lda, A1, lda, mr, P, P1, pstride, np, KW, Kbits, m + r, n0, cnt, e, o);                  \
        }                                                                                                          \
    }

LB_BINARY_PORTABLE_TILE(tile_portable, )
#ifdef LOWBIT_X86
LB_BINARY_PORTABLE_TILE(tile_portable_popcnt, __attribute__((target("popcnt"))))
#endif

void prep_planes_scalar(const uint64_t* A, int64_t lda, int64_t rows, int64_t KW, uint64_t* lo, uint64_t* hi) {
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t k = 0; k < KW; ++k) {
            const uint64_t v = A[r * lda + k];
            lo[r * KW + k] = lo_plane(v);
            hi[r * KW + k] = hi_plane(v);
        }
}

Kernel kernel_portable() {
    Kernel k;
    k.mr = 4;
    k.np = 1;
    k.planes = false;
    k.panel = tile_portable_panel;
#ifdef LOWBIT_X86
    if (cpu().popcnt) k.panel = tile_portable_popcnt_panel;
#endif
    k.prep = prep_planes_scalar;
    k.name = "portable";
    return k;
}

Kernel select_kernel() {
#ifdef LOWBIT_X86
    const Isa isa = active_isa();
    if (isa >= Isa::avx512bw) return kernel_avx512();
    if (isa >= Isa::avx2) return kernel_avx2();
#endif
    return kernel_portable();
}

const char* active_path() { return select_kernel().name; }

// -------------------------------------------------------------------------------------------- driver

void gemm(const Packed& w, int64_t g, int64_t M, const AFill& fill, const wb::Epi& e, const wb::Out& o) {
    if (M <= 0) return;
    Kernel kn = select_kernel();
    // A few rows (a GEMV): the weights are streamed once, so the nibble planes (twice the bytes) do not
    // pay; the scalar POPCNT tile on the raw words is faster there.
    if (kn.planes && M < kn.mr && (cpu().popcnt || !LB_IS_X86)) kn = kernel_portable();
    const int64_t KW = w.KW, PG = w.PG, Ng = w.Ng, nbase = g * Ng;
    const int32_t Kbits = static_cast<int32_t>(w.Kbits);
    const wb::Plan pl = wb::make_plan(M, PG, KW * 8 * (kn.planes ? 3 : 1), kn.mr, num_threads());
    const uint64_t* P0 = w.panel(kn.planes ? w.lo : w.raw, g, 0);
    const uint64_t* P1 = w.panel(kn.planes ? w.hi : w.raw, g, 0);
    const int64_t ps = w.panel_stride();
    parallel_for(pl.tasks(), 1, [&](int64_t tb, int64_t te) {
        thread_local std::vector<uint64_t> rbuf, lbuf, hbuf;
        for (int64_t t = tb; t < te; ++t) {
            const int64_t m0 = (t / pl.ngroups) * pl.mb, m1 = std::min(M, m0 + pl.mb);
            const int64_t p0 = (t % pl.ngroups) * pl.pg, p1 = std::min(PG, p0 + pl.pg);
            if (m0 >= m1 || p0 >= p1) continue;
            const size_t need = static_cast<size_t>((m1 - m0) * KW + 8);
            if (rbuf.size() < need) rbuf.resize(need);
            int64_t lda = KW;
            const uint64_t* A = fill(m0, m1, rbuf.data(), &lda);
            const uint64_t *A0 = A, *A1 = A;
            if (kn.planes) {
                if (lbuf.size() < need) lbuf.resize(need), hbuf.resize(need);
                kn.prep(A, lda, m1 - m0, KW, lbuf.data(), hbuf.data());
                A0 = lbuf.data();
                A1 = hbuf.data();
                lda = KW;
            }
            for (int64_t p = p0; p < p1; p += kn.np) {
                const int np = static_cast<int>(std::min<int64_t>(kn.np, p1 - p));
                const int cnt = static_cast<int>(std::min<int64_t>(np * NR, Ng - p * NR));
                kn.panel(A0, A1, lda, m1 - m0, P0 + p * ps, P1 + p * ps, ps, np, KW, Kbits, m0, nbase + p * NR, cnt, e,
                         o);
            }
        }
    });
}

void linear(const uint64_t* x, int64_t M, int64_t ldx, const Packed& w, const wb::Epi& e, const wb::Out& o) {
    if (w.G != 1 || w.seg_words != w.KW) throw std::invalid_argument("binary linear: weights packed for a conv");
    const int64_t KW = w.KW;
    const uint64_t last = seg_mask(KW - 1, w.seg_bits);
    AFill fill;
    if (last == ~uint64_t(0)) {  // K % 64 == 0: no padding bits, read the rows in place
        fill = [x, ldx](int64_t m0, int64_t, uint64_t*, int64_t* lda) -> const uint64_t* {
            *lda = ldx;
            return x + m0 * ldx;
        };
    } else {  // copy, clearing the padding bits of the last word
        fill = [x, ldx, KW, last](int64_t m0, int64_t m1, uint64_t* buf, int64_t* lda) -> const uint64_t* {
            *lda = KW;
            for (int64_t m = m0; m < m1; ++m) {
                uint64_t* d = buf + (m - m0) * KW;
                std::memcpy(d, x + m * ldx, sizeof(uint64_t) * KW);
                d[KW - 1] &= last;
            }
            return buf;
        };
    }
    gemm(w, 0, M, fill, e, o);
}

void conv2d(const uint64_t* x, const ConvGeom& gm, const Packed& w, const wb::Epi& e, const wb::Out& o) {
    const int64_t G = gm.groups, Cg = gm.C / G, CgW = (Cg + 63) / 64;
    if (G != w.G || gm.C % G != 0 || w.seg_words != CgW || w.seg_bits != Cg || w.KW != gm.kh * gm.kw * CgW)
        throw std::invalid_argument("binary conv2d: weight does not match the input channels / groups");
    if (gm.pad_value != 1 && gm.pad_value != -1) throw std::invalid_argument("binary conv2d: pad_value must be +1 or -1");
    std::vector<uint64_t> mask(static_cast<size_t>(CgW)), padw(static_cast<size_t>(CgW));
    for (int64_t t = 0; t < CgW; ++t) {
        mask[t] = seg_mask(t, Cg);
        padw[t] = gm.pad_value > 0 ? mask[t] : 0;  // +1 -> all valid bits set; -1 -> all clear
    }
    const Kernel kn = select_kernel();
    if (kn.conv && G == 1 && gm.dh == 1 && gm.dw == 1) {
        // the padded NHWC image, padding bits cleared (+ slack for the pixels past a row's last tile)
        const int64_t Hp = gm.H + 2 * gm.ph, Wp = gm.W + 2 * gm.pw;
        const int64_t nimg = gm.B * Hp * Wp * CgW, slack = (4 * gm.sw + gm.kw + 8) * CgW;
        std::vector<uint64_t> img(static_cast<size_t>(nimg + slack), 0);
        parallel_for(gm.B * Hp, 16, [&](int64_t r0, int64_t r1) {
            for (int64_t r = r0; r < r1; ++r) {
                const int64_t b = r / Hp, hp = r % Hp, ih = hp - gm.ph;
                for (int64_t wp = 0; wp < Wp; ++wp) {
                    const int64_t iw = wp - gm.pw;
                    const bool in = ih >= 0 && ih < gm.H && iw >= 0 && iw < gm.W;
                    const uint64_t* s = in ? x + ((b * gm.H + ih) * gm.W + iw) * CgW : nullptr;
                    uint64_t* d = img.data() + (r * Wp + wp) * CgW;
                    for (int64_t t = 0; t < CgW; ++t) d[t] = in ? (s[t] & mask[t]) : padw[t];
                }
            }
        });
        if (kn.conv(img.data(), nimg + slack, Hp, Wp, gm, w, e, o)) return;
    }
    const int64_t HWo = gm.Ho * gm.Wo, M = gm.B * HWo, KW = w.KW;
    for (int64_t g = 0; g < G; ++g) {
        const uint64_t* mk = mask.data();
        const uint64_t* pd = padw.data();
        const ConvGeom G2 = gm;
        AFill fill = [x, G2, g, G, CgW, KW, HWo, mk, pd](int64_t m0, int64_t m1, uint64_t* buf,
                                                        int64_t* lda) -> const uint64_t* {
            *lda = KW;
            const int64_t H = G2.H, W = G2.W;
            for (int64_t m = m0; m < m1; ++m) {
                const int64_t b = m / HWo, pix = m % HWo, oh = pix / G2.Wo, ow = pix % G2.Wo;
                uint64_t* d = buf + (m - m0) * KW;
                for (int64_t i = 0; i < G2.kh; ++i) {
                    const int64_t ih = oh * G2.sh - G2.ph + i * G2.dh;
                    const bool row_ok = ih >= 0 && ih < H;
                    const uint64_t* xrow = x + ((b * H + (row_ok ? ih : 0)) * W * G + g) * CgW;
                    for (int64_t j = 0; j < G2.kw; ++j, d += CgW) {
                        const int64_t iw = ow * G2.sw - G2.pw + j * G2.dw;
                        if (!row_ok || iw < 0 || iw >= W) {
                            for (int64_t t = 0; t < CgW; ++t) d[t] = pd[t];
                        } else {
                            const uint64_t* s = xrow + iw * G * CgW;
                            for (int64_t t = 0; t < CgW; ++t) d[t] = s[t] & mk[t];
                        }
                    }
                }
            }
            return buf;
        };
        gemm(w, g, M, fill, e, o);
    }
}

void pack_bits_u8(const uint8_t* src, int64_t R, int64_t K, int64_t lds, uint64_t* dst) {
    const int64_t KW = (K + 63) / 64;
    parallel_for(R, 256, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
            const uint8_t* s = src + r * lds;
            uint64_t* d = dst + r * KW;
            for (int64_t wi = 0; wi < KW; ++wi) {
                const int64_t k0 = wi * 64, k1 = std::min(K, k0 + 64);
                uint64_t v = 0;
                for (int64_t k = k0; k < k1; ++k) v |= static_cast<uint64_t>(s[k] != 0) << (k - k0);
                d[wi] = v;
            }
        }
    });
}

}  // namespace binary
}  // namespace lowbit
