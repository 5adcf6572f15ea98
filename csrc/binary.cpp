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
                    L[base + k * NR + c] = lo_plane(v);
                    H[base + k * NR + c] = hi_plane(v);
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
    }

LB_BINARY_PORTABLE_TILE(tile_portable, )
#ifdef LOWBIT_X86
LB_BINARY_PORTABLE_TILE(tile_portable_popcnt, __attribute__((target("popcnt"))))
#endif

Kernel kernel_portable() {
    Kernel k;
    k.mr = 4;
    k.np = 1;
    k.planes = false;
    k.tile = tile_portable;
#ifdef LOWBIT_X86
    if (cpu().popcnt) k.tile = tile_portable_popcnt;
#endif
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
    const Kernel kn = select_kernel();
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
                for (int64_t r = 0; r < m1 - m0; ++r)
                    for (int64_t k = 0; k < KW; ++k) {
                        const uint64_t v = A[r * lda + k];
                        lbuf[r * KW + k] = lo_plane(v);
                        hbuf[r * KW + k] = hi_plane(v);
                    }
                A0 = lbuf.data();
                A1 = hbuf.data();
                lda = KW;
            }
            for (int64_t p = p0; p < p1; p += kn.np) {
                const int np = static_cast<int>(std::min<int64_t>(kn.np, p1 - p));
                const int cnt = static_cast<int>(std::min<int64_t>(np * NR, Ng - p * NR));
                for (int64_t m = m0; m < m1; m += kn.mr) {
                    const int mr = static_cast<int>(std::min<int64_t>(kn.mr, m1 - m));
                    kn.tile(A0 + (m - m0) * lda, A1 + (m - m0) * lda, lda, mr, P0 + p * ps, P1 + p * ps, ps, np, KW,
                            Kbits, m, nbase + p * NR, cnt, e, o);
                }
            }
        }
    });
}

void linear(const uint64_t* x, int64_t M, int64_t ldx, const Packed& w, const wb::Epi& e, const wb::Out& o) {
    if (w.G != 1) throw std::invalid_argument("binary linear: weights packed with groups != 1");
    const int64_t KW = w.KW, sw = w.seg_words, sb = w.seg_bits;
    std::vector<uint64_t> masks(static_cast<size_t>(KW));
    for (int64_t k = 0; k < KW; ++k) masks[k] = seg_mask(k % sw, sb);
    AFill fill = [&](int64_t m0, int64_t m1, uint64_t* buf, int64_t* lda) -> const uint64_t* {
        *lda = KW;
        for (int64_t m = m0; m < m1; ++m)
            for (int64_t k = 0; k < KW; ++k) buf[(m - m0) * KW + k] = x[m * ldx + k] & masks[k];
        return buf;
    };
    gemm(w, 0, M, fill, e, o);
}

void conv2d(const uint64_t* x, const ConvGeom& gm, const Packed& w, const wb::Epi& e, const wb::Out& o) {
    const int64_t G = gm.groups, Cg = gm.C / G, CgW = (Cg + 63) / 64, H = gm.H, W = gm.W;
    if (G != w.G || gm.C % G != 0 || w.seg_words != CgW || w.seg_bits != Cg || w.KW != gm.kh * gm.kw * CgW)
        throw std::invalid_argument("binary conv2d: weight does not match the input channels / groups");
    if (gm.pad_value != 1 && gm.pad_value != -1) throw std::invalid_argument("binary conv2d: pad_value must be +1 or -1");
    std::vector<uint64_t> mask(static_cast<size_t>(CgW)), padw(static_cast<size_t>(CgW));
    for (int64_t t = 0; t < CgW; ++t) {
        mask[t] = seg_mask(t, Cg);
        padw[t] = gm.pad_value > 0 ? mask[t] : 0;  // +1 -> all valid bits set; -1 -> all clear
    }
    const int64_t HWo = gm.Ho * gm.Wo, M = gm.B * HWo, KW = w.KW;
    for (int64_t g = 0; g < G; ++g) {
        AFill fill = [&](int64_t m0, int64_t m1, uint64_t* buf, int64_t* lda) -> const uint64_t* {
            *lda = KW;
            for (int64_t m = m0; m < m1; ++m) {
                const int64_t b = m / HWo, pix = m % HWo, oh = pix / gm.Wo, ow = pix % gm.Wo;
                uint64_t* d = buf + (m - m0) * KW;
                for (int64_t i = 0; i < gm.kh; ++i) {
                    const int64_t ih = oh * gm.sh - gm.ph + i * gm.dh;
                    for (int64_t j = 0; j < gm.kw; ++j, d += CgW) {
                        const int64_t iw = ow * gm.sw - gm.pw + j * gm.dw;
                        if (ih < 0 || ih >= H || iw < 0 || iw >= W) {
                            for (int64_t t = 0; t < CgW; ++t) d[t] = padw[t];
                        } else {
                            const uint64_t* s = x + (((b * H + ih) * W + iw) * G + g) * CgW;
                            for (int64_t t = 0; t < CgW; ++t) d[t] = s[t] & mask[t];
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
