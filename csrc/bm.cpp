// BM kernels: packing, the portable path, the epilogue, the drivers of linear / conv2d and the float
// max-plus used in training (see bm.h).
#include "bm.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu_features.h"
#include "parallel.h"

namespace lowbit {
namespace bm {

// ------------------------------------------------------------------------------------------- packing

std::shared_ptr<Packed> pack(const int16_t* cpos, const int16_t* cneg, int64_t N, int64_t K, int64_t groups, int bits) {
    if (bits != 8 && bits != 16) throw std::invalid_argument("bm: code width must be 8 or 16 bits");
    if (N < 1 || K < 1) throw std::invalid_argument("bm: empty weight");
    if (groups < 1 || N % groups != 0) throw std::invalid_argument("bm: N must be a multiple of groups");
    if (K > (int64_t(1) << 28)) throw std::invalid_argument("bm: K too large");
    auto p = std::make_shared<Packed>();
    p->N = N;
    p->K = K;
    p->G = groups;
    p->Ng = N / groups;
    p->PG = (p->Ng + NR - 1) / NR;
    p->bits = bits;
    p->per = bits == 8 ? 4 : 2;
    p->KG = (K + p->per - 1) / p->per;
    const int32_t mn = p->min_code();
    for (const int16_t* src : {cpos, cneg})
        for (int64_t i = 0; i < N * K; ++i)
            if (src[i] < mn || src[i] > 0)
                throw std::invalid_argument("bm: weight code " + std::to_string(src[i]) + " outside [" +
                                            std::to_string(mn) + ", 0]");
    p->buf.alloc(static_cast<size_t>(2 * groups * p->PG * p->KG * NR * 4));
    uint8_t* base = p->buf.data();
    for (int s = 0; s < 2; ++s) {
        const int16_t* src = s == 0 ? cpos : cneg;
        for (int64_t g = 0; g < groups; ++g)
            for (int64_t pi = 0; pi < p->PG; ++pi) {
                uint8_t* pan = base + ((s * groups + g) * p->PG + pi) * p->KG * NR * 4;
                for (int64_t kg = 0; kg < p->KG; ++kg)
                    for (int c = 0; c < NR; ++c) {
                        const int64_t nl = pi * NR + c;
                        for (int i = 0; i < p->per; ++i) {
                            const int64_t k = kg * p->per + i;
                            int32_t v = mn;
                            if (nl < p->Ng && k < K) v = src[(g * p->Ng + nl) * K + k];
                            uint8_t* d = pan + (kg * NR + c) * 4;
                            if (bits == 8) {
                                d[i] = static_cast<uint8_t>(static_cast<int8_t>(v));
                            } else {
                                const int16_t v16 = static_cast<int16_t>(v);
                                std::memcpy(d + 2 * i, &v16, 2);
                            }
                        }
                    }
            }
    }
    return p;
}

// ------------------------------------------------------------------------------------------ epilogue

static inline int64_t exp_term(int32_t r, int32_t minv, const Epi& e) {
    if (r <= minv) return 0;
    const int32_t t = r & ((1 << e.f) - 1);
    const int64_t s = static_cast<int64_t>(e.sh) - (r >> e.f);  // r >> f: floor (arithmetic shift)
    if (s >= 63) return 0;
    const int64_t v = e.T[t];
    if (s <= 0) return v << (-s);  // never for a converted layer (sh >= 1, r <= 0); defined anyway
    return (v + (int64_t(1) << (s - 1))) >> s;
}

int32_t combine(int32_t rpp, int32_t rpm, int32_t rmp, int32_t rmm, int32_t bias, int32_t minv, const Epi& e) {
    int64_t y = exp_term(rpp, minv, e) - exp_term(rpm, minv, e) - exp_term(rmp, minv, e) + exp_term(rmm, minv, e) +
                bias;
    if (e.F > 0) y = (y + (int64_t(1) << (e.F - 1))) >> e.F;
    y += e.zp;
    if (y < e.lo) y = e.lo;
    if (y > e.hi) y = e.hi;
    return static_cast<int32_t>(y);
}

// ------------------------------------------------------------------------------------------ portable

template <typename T>
static void int_panel_portable1(const uint8_t* A, int64_t lda, int64_t rows, const int32_t* P, int64_t KG, int32_t* R,
                                int64_t ldr) {
    constexpr int per = 4 / sizeof(T);
    constexpr int32_t MN = std::numeric_limits<T>::min(), MX = std::numeric_limits<T>::max();
    const T* W = reinterpret_cast<const T*>(P);
    for (int64_t r = 0; r < rows; ++r) {
        const T* a = reinterpret_cast<const T*>(A + r * lda);
        int32_t acc[NR];
        for (int c = 0; c < NR; ++c) acc[c] = MN;
        for (int64_t g = 0; g < KG; ++g)
            for (int c = 0; c < NR; ++c)
                for (int i = 0; i < per; ++i) {
                    int32_t s = int32_t(a[g * per + i]) + int32_t(W[(g * NR + c) * per + i]);
                    s = s < MN ? MN : (s > MX ? MX : s);
                    acc[c] = s > acc[c] ? s : acc[c];
                }
        for (int c = 0; c < NR; ++c) R[r * ldr + c] = acc[c];
    }
}

template <typename T>
static void int_panel_portable(const uint8_t* A, int64_t lda, int64_t rows, const int32_t* P0, const int32_t* P1,
                               int64_t KG, int32_t* R0, int32_t* R1, int64_t ldr) {
    int_panel_portable1<T>(A, lda, rows, P0, KG, R0, ldr);
    int_panel_portable1<T>(A, lda, rows, P1, KG, R1, ldr);
}

static void f32_panel_portable(const float* X, int64_t ldx, int64_t rows, const float* P, int np, int64_t K, float* Y,
                               int32_t* I, int64_t ldy, int64_t n0, int cnt) {
    for (int j = 0; j < np; ++j) {
        const float* Pj = P + j * K * NR;
        const int cj = std::min(NR, cnt - j * NR);
        for (int64_t r = 0; r < rows; ++r) {
            const float* x = X + r * ldx;
            float acc[NR];
            int32_t idx[NR];
            for (int c = 0; c < NR; ++c) acc[c] = -std::numeric_limits<float>::infinity(), idx[c] = 0;
            for (int64_t k = 0; k < K; ++k) {
                const float xv = x[k];
                for (int c = 0; c < NR; ++c) {
                    const float t = xv + Pj[k * NR + c];
                    if (t > acc[c]) acc[c] = t, idx[c] = static_cast<int32_t>(k);
                }
            }
            for (int c = 0; c < cj; ++c) {
                Y[r * ldy + n0 + j * NR + c] = acc[c];
                if (I) I[r * ldy + n0 + j * NR + c] = idx[c];
            }
        }
    }
}

Kernel kernel_portable() {
    Kernel k;
    k.i8 = int_panel_portable<int8_t>;
    k.i16 = int_panel_portable<int16_t>;
    k.f32 = f32_panel_portable;
    k.f32max = f32_panel_portable;
    k.fnp = 1;
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

// ------------------------------------------------------------------------------------ integer driver

static void run_int(const Packed& w, int64_t g, int64_t M, bool sgn, const AFill& fill, const Epi& e, void* out,
                    int64_t ldo) {
    if (M <= 0) return;
    const Kernel kn = select_kernel();
    const IntPanelFn panel = w.bits == 8 ? kn.i8 : kn.i16;
    const int64_t KG = w.KG, PG = w.PG, Ng = w.Ng, nbase = g * Ng, N = w.N;
    const int nsg = sgn ? 2 : 1;
    const int32_t minv = w.min_code();
    const int64_t lda = KG * 4;
    const wb::Plan pl = wb::make_plan(M, PG, lda * nsg, 8, num_threads());
    parallel_for(pl.tasks(), 1, [&](int64_t tb, int64_t te) {
        thread_local std::vector<uint8_t> abuf;
        thread_local std::vector<int32_t> rbuf;
        for (int64_t t = tb; t < te; ++t) {
            const int64_t m0 = (t / pl.ngroups) * pl.mb, m1 = std::min(M, m0 + pl.mb);
            const int64_t p0 = (t % pl.ngroups) * pl.pg, p1 = std::min(PG, p0 + pl.pg);
            if (m0 >= m1 || p0 >= p1) continue;
            const int64_t mr = m1 - m0, rows = mr * nsg;
            if (abuf.size() < static_cast<size_t>(rows * lda + 64)) abuf.resize(static_cast<size_t>(rows * lda + 64));
            if (rbuf.size() < static_cast<size_t>(2 * rows * NR)) rbuf.resize(static_cast<size_t>(2 * rows * NR));
            fill(m0, m1, abuf.data(), lda);
            // one panel at a time: both weight signs for every row (a+ rows, then a- rows), then the
            // epilogue of its NR channels, so the maxima stay in a small (L1) buffer
            int32_t* R0 = rbuf.data();
            int32_t* R1 = R0 + rows * NR;
            for (int64_t p = p0; p < p1; ++p) {
                panel(abuf.data(), lda, rows, w.panel(0, g, p), w.panel(1, g, p), KG, R0, R1, NR);
                const int64_t cnt = std::min<int64_t>(NR, Ng - p * NR), nb = nbase + p * NR;
                for (int64_t r = 0; r < mr; ++r) {
                    const int32_t* pp = R0 + r * NR;
                    const int32_t* pm = R1 + r * NR;
                    const int32_t* mp = sgn ? R0 + (mr + r) * NR : nullptr;
                    const int32_t* mm = sgn ? R1 + (mr + r) * NR : nullptr;
                    const int64_t m = m0 + r;
                    if (e.raw) {
                        int32_t* o = static_cast<int32_t*>(out) + m * 4 * N + nb;
                        for (int64_t c = 0; c < cnt; ++c) {
                            o[c] = pp[c];
                            o[N + c] = pm[c];
                            o[2 * N + c] = sgn ? mp[c] : minv;
                            o[3 * N + c] = sgn ? mm[c] : minv;
                        }
                    } else {
                        uint8_t* o = static_cast<uint8_t*>(out) + m * ldo + nb;
                        for (int64_t c = 0; c < cnt; ++c) {
                            const int32_t b = e.bias ? e.bias[nb + c] : 0;
                            o[c] = static_cast<uint8_t>(
                                combine(pp[c], pm[c], sgn ? mp[c] : minv, sgn ? mm[c] : minv, b, minv, e));
                        }
                    }
                }
            }
        }
    });
}

template <typename T>
static inline void log_codes(const uint8_t* x, int64_t n, const Epi& e, T* ap, T* am, int32_t minv) {
    for (int64_t k = 0; k < n; ++k) {
        const int32_t d = int32_t(x[k]) - e.zin;
        ap[k] = static_cast<T>(d > 0 ? e.L[d] : minv);
        if (am) am[k] = static_cast<T>(d < 0 ? e.L[-d] : minv);
    }
}

template <typename T>
static void linear_t(const uint8_t* x, int64_t M, int64_t ldx, const Packed& w, const Epi& e, void* out, int64_t ldo) {
    const bool sgn = e.zin != 0;
    const int32_t minv = w.min_code();
    const int64_t K = w.K, KP = w.KG * w.per;
    AFill fill = [&](int64_t m0, int64_t m1, uint8_t* buf, int64_t lda) {
        const int64_t mr = m1 - m0;
        for (int64_t m = m0; m < m1; ++m) {
            T* ap = reinterpret_cast<T*>(buf + (m - m0) * lda);
            T* am = sgn ? reinterpret_cast<T*>(buf + (mr + m - m0) * lda) : nullptr;
            log_codes<T>(x + m * ldx, K, e, ap, am, minv);
            for (int64_t k = K; k < KP; ++k) {
                ap[k] = static_cast<T>(minv);
                if (am) am[k] = static_cast<T>(minv);
            }
        }
    };
    run_int(w, 0, M, sgn, fill, e, out, ldo);
}

static void check_epi(const Packed& w, const Epi& e) {
    if (e.f < 0 || e.f > 14 || e.sh < 0 || e.sh > 62 || e.F < 0 || e.F > 30)
        throw std::invalid_argument("bm: epilogue shift parameters out of range");
    if (!e.L || (!e.raw && !e.T)) throw std::invalid_argument("bm: missing lookup table");
    if (e.zin < 0 || e.zin > 255) throw std::invalid_argument("bm: input zero point outside [0, 255]");
    if (!e.raw && (e.lo < 0 || e.hi > 255 || e.lo > e.hi)) throw std::invalid_argument("bm: bad output clamp");
    const int32_t minv = w.min_code();
    for (int i = 0; i < 256; ++i)
        if (e.L[i] < minv || e.L[i] > 0) throw std::invalid_argument("bm: log table entry outside [MIN, 0]");
}

void linear(const uint8_t* x, int64_t M, int64_t ldx, const Packed& w, const Epi& e, void* out, int64_t ldo) {
    if (w.G != 1) throw std::invalid_argument("bm linear: weights packed for a grouped conv");
    check_epi(w, e);
    if (w.bits == 8)
        linear_t<int8_t>(x, M, ldx, w, e, out, ldo);
    else
        linear_t<int16_t>(x, M, ldx, w, e, out, ldo);
}

template <typename T>
static void conv_t(const uint8_t* x, const ConvGeom& gm, const Packed& w, const Epi& e, void* out) {
    const bool sgn = e.zin != 0;
    const int32_t minv = w.min_code();
    const int64_t G = gm.groups, Cg = gm.C / G, npix = gm.B * gm.H * gm.W;
    // log codes of the whole input once (NHWC), then im2col from them (padding: MIN, i.e. zero input)
    std::vector<T> lp(static_cast<size_t>(npix * gm.C)), lm(sgn ? static_cast<size_t>(npix * gm.C) : 0);
    parallel_for(npix, 256, [&](int64_t p0, int64_t p1) {
        log_codes<T>(x + p0 * gm.C, (p1 - p0) * gm.C, e, lp.data() + p0 * gm.C,
                     sgn ? lm.data() + p0 * gm.C : nullptr, minv);
    });
    const int64_t HWo = gm.Ho * gm.Wo, M = gm.B * HWo, K = w.K, KP = w.KG * w.per;
    const ConvGeom G2 = gm;
    for (int64_t g = 0; g < G; ++g) {
        AFill fill = [&, g](int64_t m0, int64_t m1, uint8_t* buf, int64_t lda) {
            const int64_t mr = m1 - m0;
            for (int s = 0; s < (sgn ? 2 : 1); ++s) {
                const T* src = s == 0 ? lp.data() : lm.data();
                for (int64_t m = m0; m < m1; ++m) {
                    T* d = reinterpret_cast<T*>(buf + (s * mr + m - m0) * lda);
                    const int64_t b = m / HWo, pix = m % HWo, oh = pix / G2.Wo, ow = pix % G2.Wo;
                    for (int64_t i = 0; i < G2.kh; ++i) {
                        const int64_t ih = oh * G2.sh - G2.ph + i * G2.dh;
                        for (int64_t j = 0; j < G2.kw; ++j, d += Cg) {
                            const int64_t iw = ow * G2.sw - G2.pw + j * G2.dw;
                            if (ih < 0 || ih >= G2.H || iw < 0 || iw >= G2.W) {
                                for (int64_t c = 0; c < Cg; ++c) d[c] = static_cast<T>(minv);
                            } else {
                                std::memcpy(d, src + ((b * G2.H + ih) * G2.W + iw) * G2.C + g * Cg, sizeof(T) * Cg);
                            }
                        }
                    }
                    for (int64_t k = K; k < KP; ++k) d[k - K] = static_cast<T>(minv);
                }
            }
        };
        run_int(w, g, M, sgn, fill, e, out, w.N);
    }
}

void conv2d(const uint8_t* x, const ConvGeom& gm, const Packed& w, const Epi& e, void* out) {
    const int64_t G = gm.groups;
    if (G < 1 || gm.C % G != 0 || w.G != G || w.K != gm.kh * gm.kw * (gm.C / G))
        throw std::invalid_argument("bm conv2d: weight does not match the input channels / groups / kernel size");
    check_epi(w, e);
    if (w.bits == 8)
        conv_t<int8_t>(x, gm, w, e, out);
    else
        conv_t<int16_t>(x, gm, w, e, out);
}

// -------------------------------------------------------------------------------------- float driver

void f32_maxplus(const float* X, int64_t M, int64_t K, int64_t ldx, const float* V, int64_t N, float* Y, int32_t* I) {
    if (M <= 0 || N <= 0) return;
    if (K < 1) throw std::invalid_argument("bm f32_maxplus: K must be >= 1");
    if (K >= (int64_t(1) << 31)) throw std::invalid_argument("bm f32_maxplus: K too large");
    const Kernel kn = select_kernel();
    const F32PanelFn fn = I ? kn.f32 : kn.f32max;
    const int64_t PN = (N + NR - 1) / NR;
    wb::AlignedBuf pb;
    pb.alloc(static_cast<size_t>(PN * K * NR * 4));
    float* P = reinterpret_cast<float*>(pb.data());
    const float ninf = -std::numeric_limits<float>::infinity();
    parallel_for(PN, 1, [&](int64_t q0, int64_t q1) {
        for (int64_t p = q0; p < q1; ++p)
            for (int64_t k = 0; k < K; ++k)
                for (int c = 0; c < NR; ++c) {
                    const int64_t n = p * NR + c;
                    P[(p * K + k) * NR + c] = n < N ? V[n * K + k] : ninf;
                }
    });
    const wb::Plan pl = wb::make_plan(M, (PN + kn.fnp - 1) / kn.fnp, K * 4, 8, num_threads());
    parallel_for(pl.tasks(), 1, [&](int64_t tb, int64_t te) {
        for (int64_t t = tb; t < te; ++t) {
            const int64_t m0 = (t / pl.ngroups) * pl.mb, m1 = std::min(M, m0 + pl.mb);
            const int64_t q0 = (t % pl.ngroups) * pl.pg * kn.fnp, q1 = std::min(PN, q0 + pl.pg * kn.fnp);
            if (m0 >= m1 || q0 >= q1) continue;
            for (int64_t p = q0; p < q1; p += kn.fnp) {
                const int np = static_cast<int>(std::min<int64_t>(kn.fnp, q1 - p));
                const int cnt = static_cast<int>(std::min<int64_t>(np * NR, N - p * NR));
                fn(X + m0 * ldx, ldx, m1 - m0, P + p * K * NR, np, K, Y + m0 * N, I ? I + m0 * N : nullptr, N,
                   p * NR, cnt);
            }
        }
    });
}

void f32_maxplus_backward(const int32_t* I, const float* G, int64_t M, int64_t N, int64_t K, float* gX, float* gV) {
    for (int64_t i = 0; i < M * N; ++i)
        if (I[i] < 0 || I[i] >= K) throw std::invalid_argument("bm f32_maxplus_backward: index out of range");
    if (gX)
        parallel_for(M, 64, [&](int64_t m0, int64_t m1) {
            for (int64_t m = m0; m < m1; ++m)
                for (int64_t n = 0; n < N; ++n) gX[m * K + I[m * N + n]] += G[m * N + n];
        });
    if (gV)  // serial: the sum order over m is fixed, so results do not depend on the thread count
        for (int64_t m = 0; m < M; ++m)
            for (int64_t n = 0; n < N; ++n) gV[n * K + I[m * N + n]] += G[m * N + n];
}

}  // namespace bm
}  // namespace lowbit
