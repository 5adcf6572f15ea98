// 4.6-bit kernels: packing, the portable path, the GEMM driver, linear and conv2d (see w46.h).
#include "w46.h"

#include <algorithm>
#include <stdexcept>
#include <string>

#include "cpu_features.h"
#include "parallel.h"

namespace lowbit {
namespace w46 {

// ------------------------------------------------------------------------------------------------
// int16 flush interval. The SIMD paths multiply unsigned activation codes a in [0, 2*K_x] by signed
// weight codes w in [-K_w, K_w] with vpmaddubsw, which adds adjacent products into int16 with
// saturation: p = a0*w0 + a1*w1, so |p| <= 2 * (2*K_x) * K_w = 4*K_x*K_w <= 4*127 = 508 < 32767.
// That sum can never saturate. Each k-quad step adds exactly one such pair sum to every int16
// accumulator lane (vpaddw, wrapping), so after t steps a lane holds at most t * 4*K_x*K_w in
// magnitude: it stays exact while t <= floor(32767 / (4*K_x*K_w)). We widen (vpmaddwd with ones,
// which sums the two pair lanes of a channel into int32 without saturation: |2 * 32767| < 2^31)
// and restart after `flush` = floor(32767 / (4*K_x*K_w)) steps. Worst case K_x*K_w = 127:
// floor(32767 / 508) = 64 steps = 256 k per flush; (N_x, N_w) = (29, 19): K_w = 9, K_x = 14,
// 4*126 = 504 -> 65; (23, 23): K_x = K_w = 11, 484 -> 67; (255, 1): K_x = 127, 508 -> 64.
// The range of the activation codes is checked before every call (max_code), the weights' at pack.
// ------------------------------------------------------------------------------------------------
static int flush_interval(int K_x, int K_w) { return 32767 / (4 * K_x * K_w); }

std::shared_ptr<Packed> pack(const int8_t* w, int64_t N, int64_t K, int K_x, int K_w, int64_t groups) {
    if (K_x < 1 || K_w < 1)
        throw std::invalid_argument("4.6-bit: K_x and K_w must be >= 1 (got K_x=" + std::to_string(K_x) +
                                    ", K_w=" + std::to_string(K_w) + ")");
    if (K_x * K_w > 127)
        throw std::invalid_argument("4.6-bit: K_x * K_w = " + std::to_string(K_x * K_w) +
                                    " exceeds 127 (every centred product must fit in int8)");
    if (N < 1 || K < 1) throw std::invalid_argument("4.6-bit: empty weight");
    if (groups < 1 || N % groups != 0) throw std::invalid_argument("4.6-bit: N must be a multiple of groups");
    for (int64_t i = 0; i < N * K; ++i)
        if (w[i] < -K_w || w[i] > K_w)
            throw std::invalid_argument("4.6-bit: weight code " + std::to_string(int(w[i])) + " outside [-K_w, K_w] = [" +
                                        std::to_string(-K_w) + ", " + std::to_string(K_w) + "]");
    auto p = std::make_shared<Packed>();
    p->N = N;
    p->K = K;
    p->Kq = (K + 3) / 4;
    p->Kp = p->Kq * 4;
    p->G = groups;
    p->Ng = N / groups;
    p->PG = (p->Ng + NR - 1) / NR;
    p->K_x = K_x;
    p->K_w = K_w;
    p->flush = flush_interval(K_x, K_w);
    p->raw.assign(w, w + N * K);
    p->colsum.assign(N, 0);
    p->l1.assign(N, 0);
    for (int64_t n = 0; n < N; ++n) {
        int64_t s = 0, a = 0;
        for (int64_t k = 0; k < K; ++k) {
            s += w[n * K + k];
            a += w[n * K + k] < 0 ? -int64_t(w[n * K + k]) : int64_t(w[n * K + k]);
        }
        p->colsum[n] = static_cast<int32_t>(s);  // |s| <= l1 < 2^31 after the check below
        p->l1[n] = a;
    }
    check_acc_bound("4.6-bit pack", K_x, p->l1.data(), nullptr, N);
    p->panels.alloc(static_cast<size_t>(groups * p->PG * p->Kq * 64));
    int8_t* dst = reinterpret_cast<int8_t*>(p->panels.data());
    for (int64_t g = 0; g < groups; ++g)
        for (int64_t pi = 0; pi < p->PG; ++pi) {
            int8_t* P = dst + (g * p->PG + pi) * p->Kq * 64;
            for (int64_t q = 0; q < p->Kq; ++q)
                for (int c = 0; c < NR; ++c) {
                    const int64_t nl = pi * NR + c;
                    for (int t = 0; t < 4; ++t) {
                        const int64_t k = 4 * q + t;
                        P[q * 64 + c * 4 + t] = (nl < p->Ng && k < K) ? w[(g * p->Ng + nl) * K + k] : 0;
                    }
                }
        }
    return p;
}

// ------------------------------------------------------------------------------------------ portable
// Plain C++ on the row-major codes (w.raw): one int32 dot product per output, a loop the compiler
// vectorizes with the baseline instruction set (SSE2 / NEON). tile == nullptr selects it in gemm().

// sum_k a*w in wrapping 32-bit arithmetic (well defined for any K; exact when the accumulator bound
// checked at pack time holds, since then the centred result fits int32).
static int32_t dot_u8s8(const uint8_t* a, const int8_t* w, int64_t K) {
    uint32_t s = 0;
    for (int64_t k = 0; k < K; ++k) s += static_cast<uint32_t>(static_cast<int32_t>(a[k]) * static_cast<int32_t>(w[k]));
    return static_cast<int32_t>(s);
}

static void rows_portable(const Packed& w, int64_t g, const uint8_t* A, int64_t lda, int64_t m0, int64_t m1, int64_t p0,
                          int64_t p1, const int32_t* corr, const wb::Epi& e, const wb::Out& o) {
    const int64_t n0 = p0 * NR, n1 = std::min(w.Ng, p1 * NR);
    std::vector<int32_t> acc(static_cast<size_t>(n1 - n0));
    for (int64_t m = m0; m < m1; ++m) {
        const uint8_t* a = A + (m - m0) * lda;
        for (int64_t n = n0; n < n1; ++n)
            acc[n - n0] = static_cast<int32_t>(static_cast<uint32_t>(corr[n]) +
                                               static_cast<uint32_t>(dot_u8s8(a, w.raw.data() + (g * w.Ng + n) * w.K, w.K)));
        wb::epi_row_scalar(acc.data(), m, g * w.Ng + n0, g * w.Ng + n0, static_cast<int>(n1 - n0), e, o);
    }
}

Kernel kernel_portable() {
    Kernel k;
    k.mr = 4;
    k.np = 1;
    k.tile = nullptr;  // rows_portable
    k.name = "portable";
    return k;
}

Kernel select_kernel() {
#ifdef LOWBIT_X86
    const Isa isa = active_isa();
    if (isa >= Isa::vnni) return kernel_vnni();
    if (isa >= Isa::avx512bw) return kernel_avx512bw();
    if (isa >= Isa::avx2) return kernel_avx2();
#endif
    return kernel_portable();
}

const char* active_path() { return select_kernel().name; }

// -------------------------------------------------------------------------------------------- driver

int act_zero_point(const Packed& w, int zp) {
    if (zp < 0) return w.K_x;
    if (zp > 2 * w.K_x)
        throw std::invalid_argument("4.6-bit: activation zero point " + std::to_string(zp) + " outside [0, 2*K_x] = [0, " +
                                    std::to_string(2 * w.K_x) + "]");
    return zp;
}

std::vector<int32_t> make_corr(const Packed& w, int64_t g, const int32_t* bias, int zp) {
    // sum_k (a - zp) * w = sum_k a * w - zp * colsum: the SIMD paths multiply the raw codes a in
    // [0, 2*K_x] (the flush bound does not depend on zp) and start from corr.
    // int32 arithmetic wrapping like the accumulator (exact whenever the final value fits int32)
    const uint32_t z = static_cast<uint32_t>(act_zero_point(w, zp));
    std::vector<int32_t> corr(static_cast<size_t>(w.PG * NR + ACC_LD), 0);
    for (int64_t n = 0; n < w.Ng; ++n) {
        const uint32_t b = bias ? static_cast<uint32_t>(bias[n]) : 0u;
        corr[n] = static_cast<int32_t>(b - z * static_cast<uint32_t>(w.colsum[g * w.Ng + n]));
    }
    return corr;
}

void gemm(const Packed& w, int64_t g, int64_t M, const AFill& fill, const int32_t* bias, const wb::Epi& e,
          const wb::Out& o, int zp) {
    if (M <= 0) return;
    const Kernel kn = select_kernel();
    const int64_t Ng = w.Ng, PG = w.PG, Kp = w.Kp, Kq = w.Kq;
    const int64_t nbase = g * Ng;
    const std::vector<int32_t> corr = make_corr(w, g, bias, zp);
    const wb::Plan pl = wb::make_plan(M, PG, Kp, kn.mr, num_threads());
    parallel_for(pl.tasks(), 1, [&](int64_t tb, int64_t te) {
        thread_local std::vector<uint8_t> buf;
        for (int64_t t = tb; t < te; ++t) {
            const int64_t m0 = (t / pl.ngroups) * pl.mb, m1 = std::min(M, m0 + pl.mb);
            const int64_t p0 = (t % pl.ngroups) * pl.pg, p1 = std::min(PG, p0 + pl.pg);
            if (m0 >= m1 || p0 >= p1) continue;
            if (buf.size() < static_cast<size_t>((m1 - m0) * Kp + 64)) buf.resize((m1 - m0) * Kp + 64);
            int64_t lda = Kp;
            const uint8_t* A = fill(m0, m1, buf.data(), &lda);
            if (!kn.tile) {
                rows_portable(w, g, A, lda, m0, m1, p0, p1, corr.data(), e, o);
                continue;
            }
            for (int64_t p = p0; p < p1; p += kn.np) {
                const int np = static_cast<int>(std::min<int64_t>(kn.np, p1 - p));
                const int cnt = static_cast<int>(std::min<int64_t>(np * NR, Ng - p * NR));
                for (int64_t m = m0; m < m1; m += kn.mr) {
                    const int mr = static_cast<int>(std::min<int64_t>(kn.mr, m1 - m));
                    kn.tile(A + (m - m0) * lda, lda, mr, w.panel(g, p), w.panel_stride(), np, Kq, w.flush,
                            corr.data() + p * NR, m, nbase + p * NR, cnt, e, o);
                }
            }
        }
    });
}

uint8_t max_code(const uint8_t* x, int64_t n) {
    uint8_t mx = 0;
    for (int64_t i = 0; i < n; ++i) mx = x[i] > mx ? x[i] : mx;  // vectorized by the compiler (pmaxub)
    return mx;
}

static void check_codes(uint8_t mx, const Packed& w) {
    if (mx > 2 * w.K_x)
        throw std::invalid_argument("4.6-bit: activation code " + std::to_string(int(mx)) + " outside [0, 2*K_x] = [0, " +
                                    std::to_string(2 * w.K_x) + "]");
}

void linear(const uint8_t* x, int64_t M, int64_t ldx, const Packed& w, const int32_t* bias, const wb::Epi& e,
            const wb::Out& o, int zp) {
    if (w.G != 1) throw std::invalid_argument("4.6-bit linear: weights packed with groups != 1");
    zp = act_zero_point(w, zp);
    const int64_t K = w.K, Kp = w.Kp;
    uint8_t mx = 0;
    if (ldx == K) {
        mx = max_code(x, M * K);
    } else {
        for (int64_t m = 0; m < M; ++m) mx = std::max(mx, max_code(x + m * ldx, K));
    }
    check_codes(mx, w);
    AFill fill;
    if (K == Kp) {
        fill = [&](int64_t m0, int64_t, uint8_t*, int64_t* lda) -> const uint8_t* {
            *lda = ldx;
            return x + m0 * ldx;
        };
    } else {
        fill = [&](int64_t m0, int64_t m1, uint8_t* buf, int64_t* lda) -> const uint8_t* {
            *lda = Kp;
            for (int64_t m = m0; m < m1; ++m) {
                uint8_t* d = buf + (m - m0) * Kp;
                std::memcpy(d, x + m * ldx, K);
                std::memset(d + K, 0, Kp - K);
            }
            return buf;
        };
    }
    gemm(w, 0, M, fill, bias, e, o, zp);
}

// ---------------------------------------------------------------------------------------------- conv

static void conv_depthwise(const uint8_t* x, const ConvGeom& gm, const Packed& w, const int32_t* bias, const wb::Epi& e,
                           const wb::Out& o) {
    const int64_t N = w.N, Ng = w.Ng, HWo = gm.Ho * gm.Wo;
    // element (b, c, h, w) of the input at b*sB + c*sC + h*sH + w*sW
    const int64_t sB = gm.C * gm.H * gm.W;
    const int64_t sC = gm.nhwc ? 1 : gm.H * gm.W, sH = gm.nhwc ? gm.W * gm.C : gm.W, sW = gm.nhwc ? gm.C : 1;
    const int32_t Kx = act_zero_point(w, gm.zp);
    parallel_for(gm.B * N, 1, [&](int64_t b0, int64_t b1) {
        std::vector<int32_t> row(static_cast<size_t>(gm.Wo));
        for (int64_t bn = b0; bn < b1; ++bn) {
            const int64_t b = bn / N, n = bn % N, c = n / Ng;
            const int8_t* wn = w.raw.data() + n * w.K;  // [kh, kw]
            const int32_t bn_bias = bias ? bias[n] : 0;
            for (int64_t oh = 0; oh < gm.Ho; ++oh) {
                std::fill(row.begin(), row.end(), 0);
                for (int64_t i = 0; i < gm.kh; ++i) {
                    const int64_t ih = oh * gm.sh - gm.ph + i * gm.dh;
                    if (ih < 0 || ih >= gm.H) continue;  // padding holds the zero point: (zp - zp) * w = 0
                    const uint8_t* xr = x + b * sB + c * sC + ih * sH;
                    for (int64_t j = 0; j < gm.kw; ++j) {
                        const int32_t wv = wn[i * gm.kw + j];
                        if (wv == 0) continue;
                        const int64_t off = j * gm.dw - gm.pw;  // iw = ow*sw + off
                        const int64_t lo = off >= 0 ? 0 : (-off + gm.sw - 1) / gm.sw;
                        const int64_t num = gm.W - 1 - off;
                        if (num < 0) continue;
                        const int64_t hi = std::min<int64_t>(gm.Wo - 1, num / gm.sw);
                        for (int64_t ow = lo; ow <= hi; ++ow)
                            row[ow] += (static_cast<int32_t>(xr[(ow * gm.sw + off) * sW]) - Kx) * wv;
                    }
                }
                for (int64_t ow = 0; ow < gm.Wo; ++ow) {
                    const int32_t a = static_cast<int32_t>(static_cast<uint32_t>(row[ow]) + static_cast<uint32_t>(bn_bias));
                    wb::epi_row_scalar(&a, b * HWo + oh * gm.Wo + ow, n, n, 1, e, o);
                }
            }
        }
    });
}

// dst[j * dstride + i] = src[i * sstride + j] for a 16 x 16 byte block (SSE2 on x86: four rounds of
// the perfect shuffle, unpack lo/hi of rows i and i+8).
static inline void transpose16_u8(const uint8_t* src, int64_t sstride, uint8_t* dst, int64_t dstride) {
#ifdef LOWBIT_X86
    __m128i r[16], t[16];
    for (int i = 0; i < 16; ++i) r[i] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i * sstride));
    for (int round = 0; round < 4; ++round) {
        for (int i = 0; i < 8; ++i) {
            t[2 * i] = _mm_unpacklo_epi8(r[i], r[i + 8]);
            t[2 * i + 1] = _mm_unpackhi_epi8(r[i], r[i + 8]);
        }
        for (int i = 0; i < 16; ++i) r[i] = t[i];
    }
    for (int j = 0; j < 16; ++j) _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + j * dstride), r[j]);
#else
    for (int i = 0; i < 16; ++i)
        for (int j = 0; j < 16; ++j) dst[j * dstride + i] = src[i * sstride + j];
#endif
}

void conv2d(const uint8_t* x, const ConvGeom& gm, const Packed& w, const int32_t* bias, const wb::Epi& e,
            const wb::Out& o) {
    const int64_t G = gm.groups, C = gm.C, Cg = C / G, H = gm.H, W = gm.W;
    if (G != w.G || C % G != 0 || w.K != gm.kh * gm.kw * Cg)
        throw std::invalid_argument("4.6-bit conv2d: weight does not match the input channels / groups");
    check_codes(max_code(x, gm.B * C * H * W), w);
    const int zp = act_zero_point(w, gm.zp);
    if (Cg == 1 && G > 1) {
        conv_depthwise(x, gm, w, bias, e, o);
        return;
    }
    // NCHW -> padded NHWC (padding = zp, real zero), so that a patch row (K order (i, j, c)) is
    // kh*kw runs of Cg bytes and, for dilation 1 and one group, kh runs of kw*Cg bytes.
    const uint8_t Kx = static_cast<uint8_t>(zp);
    const int64_t Hp = H + 2 * gm.ph, Wp = W + 2 * gm.pw;
    const int64_t nimg = gm.B * Hp * Wp * C, slack = (8 * gm.sw + gm.kw + 8) * C + 64;
    std::vector<uint8_t> xp(static_cast<size_t>(nimg + slack), Kx);
    parallel_for(gm.B * H, 4, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
            const int64_t b = r / H, h = r % H;
            uint8_t* d = xp.data() + ((b * Hp + h + gm.ph) * Wp + gm.pw) * C;
            if (gm.nhwc) {
                std::memcpy(d, x + r * W * C, W * C);
                continue;
            }
            const uint8_t* s = x + (b * C * H + h) * W;  // channel c at s + c*H*W
            const int64_t W16 = W / 16 * 16, C16 = C / 16 * 16;
            for (int64_t w0 = 0; w0 < W16; w0 += 16)
                for (int64_t c0 = 0; c0 < C16; c0 += 16) transpose16_u8(s + c0 * H * W + w0, H * W, d + w0 * C + c0, C);
            for (int64_t ww = 0; ww < W; ++ww)
                for (int64_t c = (ww < W16 ? C16 : 0); c < C; ++c) d[ww * C + c] = s[c * H * W + ww];
        }
    });
    const Kernel kn = select_kernel();
    ConvGeom gz = gm;
    gz.zp = zp;
    if (kn.conv && kn.conv(xp.data(), Hp, Wp, gz, w, bias, e, o)) return;
    const int64_t HWo = gm.Ho * gm.Wo, M = gm.B * HWo, K = w.K, Kp = w.Kp;
    const uint8_t* xpp = xp.data();
    const ConvGeom g2 = gm;
    for (int64_t g = 0; g < G; ++g) {
        AFill fill = [xpp, g2, g, G, Cg, C, Hp, Wp, HWo, K, Kp](int64_t m0, int64_t m1, uint8_t* buf,
                                                           int64_t* lda) -> const uint8_t* {
            *lda = Kp;
            for (int64_t m = m0; m < m1; ++m) {
                const int64_t b = m / HWo, pix = m % HWo, oh = pix / g2.Wo, ow = pix % g2.Wo;
                uint8_t* d = buf + (m - m0) * Kp;
                for (int64_t i = 0; i < g2.kh; ++i) {
                    const uint8_t* srow = xpp + ((b * Hp + oh * g2.sh + i * g2.dh) * Wp + ow * g2.sw) * C + g * Cg;
                    if (g2.dw == 1 && G == 1) {  // the kernel row is one run of kw*C bytes
                        const int64_t run = g2.kw * C;
                        if (run <= 16) {
                            for (int64_t t = 0; t < run; ++t) d[t] = srow[t];  // few bytes: no memcpy call
                        } else {
                            std::memcpy(d, srow, run);
                        }
                        d += run;
                        continue;
                    }
                    for (int64_t j = 0; j < g2.kw; ++j, d += Cg) std::memcpy(d, srow + j * g2.dw * C, Cg);
                }
                for (int64_t t = K; t < Kp; ++t) *d++ = 0;
            }
            return buf;
        };
        gemm(w, g, M, fill, bias ? bias + g * w.Ng : nullptr, e, o, zp);
    }
}

}  // namespace w46
}  // namespace lowbit
