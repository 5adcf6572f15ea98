// 4.6-bit AVX2 path: vpmaddubsw (unsigned activation codes x signed weight codes -> int16 pair sums,
// which cannot saturate under K_x*K_w <= 127), vpaddw into int16 accumulators for `flush` steps, then
// vpmaddwd with ones into int32 (interval proven in w46.cpp). Tile: up to 6 rows x 16 channels
// (12 int16 accumulators + 2 weight registers + 1 broadcast).
#include "w46.h"

#ifdef LOWBIT_X86
#include <algorithm>
#include <vector>

#include "parallel.h"

namespace lowbit {
namespace w46 {

// One flush block of the full 6-row tile in inline assembly (GCC keeps 12 int16 accumulators in
// registers only with a reg-reg copy after every vpaddw, or spills them): zero ymm4-15, n >= 1 k-quad
// steps of 6 rows x (vpbroadcastd, 2 vpmaddubsw, 2 vpaddw), then widen with vpmaddwd(ones) and add
// into acc (int32, row stride ACC_LD = 32, 32-byte aligned). a: row 0 at the first k-quad; p: the
// panel at that k-quad.
LB_AVX2 static inline void block6_asm(const uint8_t* a, int64_t lda, const int8_t* p, int64_t n, int32_t* acc) {
    static_assert(ACC_LD == 32, "asm offsets assume ACC_LD == 32");
    const uint8_t* a3 = a + 3 * lda;
    __asm__ volatile(
        "vpxor %%xmm4, %%xmm4, %%xmm4\n\t"
        "vpxor %%xmm5, %%xmm5, %%xmm5\n\t"
        "vpxor %%xmm6, %%xmm6, %%xmm6\n\t"
        "vpxor %%xmm7, %%xmm7, %%xmm7\n\t"
        "vpxor %%xmm8, %%xmm8, %%xmm8\n\t"
        "vpxor %%xmm9, %%xmm9, %%xmm9\n\t"
        "vpxor %%xmm10, %%xmm10, %%xmm10\n\t"
        "vpxor %%xmm11, %%xmm11, %%xmm11\n\t"
        "vpxor %%xmm12, %%xmm12, %%xmm12\n\t"
        "vpxor %%xmm13, %%xmm13, %%xmm13\n\t"
        "vpxor %%xmm14, %%xmm14, %%xmm14\n\t"
        "vpxor %%xmm15, %%xmm15, %%xmm15\n\t"
        "1:\n\t"
        "vmovdqa (%[p]), %%ymm0\n\t"
        "vmovdqa 32(%[p]), %%ymm1\n\t"
        "vpbroadcastd (%[a]), %%ymm2\n\t"
        "vpmaddubsw %%ymm0, %%ymm2, %%ymm3\n\t"
        "vpaddw %%ymm3, %%ymm4, %%ymm4\n\t"
        "vpmaddubsw %%ymm1, %%ymm2, %%ymm3\n\t"
        "vpaddw %%ymm3, %%ymm5, %%ymm5\n\t"
        "vpbroadcastd (%[a],%[lda]), %%ymm2\n\t"
        "vpmaddubsw %%ymm0, %%ymm2, %%ymm3\n\t"
        "vpaddw %%ymm3, %%ymm6, %%ymm6\n\t"
        "vpmaddubsw %%ymm1, %%ymm2, %%ymm3\n\t"
        "vpaddw %%ymm3, %%ymm7, %%ymm7\n\t"
        "vpbroadcastd (%[a],%[lda],2), %%ymm2\n\t"
        "vpmaddubsw %%ymm0, %%ymm2, %%ymm3\n\t"
        "vpaddw %%ymm3, %%ymm8, %%ymm8\n\t"
        "vpmaddubsw %%ymm1, %%ymm2, %%ymm3\n\t"
        "vpaddw %%ymm3, %%ymm9, %%ymm9\n\t"
        "vpbroadcastd (%[a3]), %%ymm2\n\t"
        "vpmaddubsw %%ymm0, %%ymm2, %%ymm3\n\t"
        "vpaddw %%ymm3, %%ymm10, %%ymm10\n\t"
        "vpmaddubsw %%ymm1, %%ymm2, %%ymm3\n\t"
        "vpaddw %%ymm3, %%ymm11, %%ymm11\n\t"
        "vpbroadcastd (%[a3],%[lda]), %%ymm2\n\t"
        "vpmaddubsw %%ymm0, %%ymm2, %%ymm3\n\t"
        "vpaddw %%ymm3, %%ymm12, %%ymm12\n\t"
        "vpmaddubsw %%ymm1, %%ymm2, %%ymm3\n\t"
        "vpaddw %%ymm3, %%ymm13, %%ymm13\n\t"
        "vpbroadcastd (%[a3],%[lda],2), %%ymm2\n\t"
        "vpmaddubsw %%ymm0, %%ymm2, %%ymm3\n\t"
        "vpaddw %%ymm3, %%ymm14, %%ymm14\n\t"
        "vpmaddubsw %%ymm1, %%ymm2, %%ymm3\n\t"
        "vpaddw %%ymm3, %%ymm15, %%ymm15\n\t"
        "add $4, %[a]\n\t"
        "add $4, %[a3]\n\t"
        "add $64, %[p]\n\t"
        "dec %[n]\n\t"
        "jnz 1b\n\t"
        "vpcmpeqw %%ymm0, %%ymm0, %%ymm0\n\t"
        "vpsrlw $15, %%ymm0, %%ymm0\n\t"  // 16-bit ones
        "vpmaddwd %%ymm0, %%ymm4, %%ymm4\n\t"
        "vpaddd 0(%[acc]), %%ymm4, %%ymm4\n\t"
        "vmovdqa %%ymm4, 0(%[acc])\n\t"
        "vpmaddwd %%ymm0, %%ymm5, %%ymm5\n\t"
        "vpaddd 32(%[acc]), %%ymm5, %%ymm5\n\t"
        "vmovdqa %%ymm5, 32(%[acc])\n\t"
        "vpmaddwd %%ymm0, %%ymm6, %%ymm6\n\t"
        "vpaddd 128(%[acc]), %%ymm6, %%ymm6\n\t"
        "vmovdqa %%ymm6, 128(%[acc])\n\t"
        "vpmaddwd %%ymm0, %%ymm7, %%ymm7\n\t"
        "vpaddd 160(%[acc]), %%ymm7, %%ymm7\n\t"
        "vmovdqa %%ymm7, 160(%[acc])\n\t"
        "vpmaddwd %%ymm0, %%ymm8, %%ymm8\n\t"
        "vpaddd 256(%[acc]), %%ymm8, %%ymm8\n\t"
        "vmovdqa %%ymm8, 256(%[acc])\n\t"
        "vpmaddwd %%ymm0, %%ymm9, %%ymm9\n\t"
        "vpaddd 288(%[acc]), %%ymm9, %%ymm9\n\t"
        "vmovdqa %%ymm9, 288(%[acc])\n\t"
        "vpmaddwd %%ymm0, %%ymm10, %%ymm10\n\t"
        "vpaddd 384(%[acc]), %%ymm10, %%ymm10\n\t"
        "vmovdqa %%ymm10, 384(%[acc])\n\t"
        "vpmaddwd %%ymm0, %%ymm11, %%ymm11\n\t"
        "vpaddd 416(%[acc]), %%ymm11, %%ymm11\n\t"
        "vmovdqa %%ymm11, 416(%[acc])\n\t"
        "vpmaddwd %%ymm0, %%ymm12, %%ymm12\n\t"
        "vpaddd 512(%[acc]), %%ymm12, %%ymm12\n\t"
        "vmovdqa %%ymm12, 512(%[acc])\n\t"
        "vpmaddwd %%ymm0, %%ymm13, %%ymm13\n\t"
        "vpaddd 544(%[acc]), %%ymm13, %%ymm13\n\t"
        "vmovdqa %%ymm13, 544(%[acc])\n\t"
        "vpmaddwd %%ymm0, %%ymm14, %%ymm14\n\t"
        "vpaddd 640(%[acc]), %%ymm14, %%ymm14\n\t"
        "vmovdqa %%ymm14, 640(%[acc])\n\t"
        "vpmaddwd %%ymm0, %%ymm15, %%ymm15\n\t"
        "vpaddd 672(%[acc]), %%ymm15, %%ymm15\n\t"
        "vmovdqa %%ymm15, 672(%[acc])\n\t"
        : [a] "+r"(a), [a3] "+r"(a3), [p] "+r"(p), [n] "+r"(n)
        : [lda] "r"(lda), [acc] "r"(acc)
        : "cc", "memory", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10",
          "xmm11", "xmm12", "xmm13", "xmm14", "xmm15");
}

template <int MR>
LB_AVX2 static void tile_avx2_t(const uint8_t* A, int64_t lda, const int8_t* P, int64_t Kq, int flush,
                                const int32_t* corr, int64_t m, int64_t n0, int cnt, const wb::Epi& e,
                                const wb::Out& o) {
    alignas(32) int32_t acc[MR * ACC_LD];
    const __m256i ones = _mm256_set1_epi16(1);
    {
        const __m256i k0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(corr));
        const __m256i k1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(corr + 8));
#pragma GCC unroll 8
        for (int r = 0; r < MR; ++r) {
            _mm256_store_si256(reinterpret_cast<__m256i*>(acc + r * ACC_LD), k0);
            _mm256_store_si256(reinterpret_cast<__m256i*>(acc + r * ACC_LD + 8), k1);
        }
    }
    for (int64_t q0 = 0; q0 < Kq; q0 += flush) {
        const int64_t q1 = std::min<int64_t>(Kq, q0 + flush);
        __m256i c0[MR], c1[MR];
#pragma GCC unroll 8
        for (int r = 0; r < MR; ++r) c0[r] = c1[r] = _mm256_setzero_si256();
        const uint8_t* a = A + q0 * 4;
        const int8_t* p = P + q0 * 64;
        if constexpr (MR == 6) {
            block6_asm(a, lda, p, q1 - q0, acc);
            continue;
        }
        for (int64_t q = q0; q < q1; ++q, a += 4, p += 64) {
            const __m256i w0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(p));
            const __m256i w1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(p + 32));
#pragma GCC unroll 8
            for (int r = 0; r < MR; ++r) {
                int32_t v;
                std::memcpy(&v, a + r * lda, 4);
                const __m256i av = _mm256_set1_epi32(v);
                c0[r] = _mm256_add_epi16(c0[r], _mm256_maddubs_epi16(av, w0));
                c1[r] = _mm256_add_epi16(c1[r], _mm256_maddubs_epi16(av, w1));
            }
        }
#pragma GCC unroll 8
        for (int r = 0; r < MR; ++r) {
            __m256i* d = reinterpret_cast<__m256i*>(acc + r * ACC_LD);
            _mm256_store_si256(d, _mm256_add_epi32(_mm256_load_si256(d), _mm256_madd_epi16(c0[r], ones)));
            _mm256_store_si256(d + 1, _mm256_add_epi32(_mm256_load_si256(d + 1), _mm256_madd_epi16(c1[r], ones)));
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) wb::epi_row_avx2(acc + r * ACC_LD, m + r, n0, n0, cnt, e, o);
}

LB_AVX2 static void tile_avx2(const uint8_t* A, int64_t lda, int mr, const int8_t* P, int64_t, int, int64_t Kq,
                              int flush, const int32_t* corr, int64_t m, int64_t n0, int cnt, const wb::Epi& e,
                              const wb::Out& o) {
    switch (mr) {
        case 1: tile_avx2_t<1>(A, lda, P, Kq, flush, corr, m, n0, cnt, e, o); break;
        case 2: tile_avx2_t<2>(A, lda, P, Kq, flush, corr, m, n0, cnt, e, o); break;
        case 3: tile_avx2_t<3>(A, lda, P, Kq, flush, corr, m, n0, cnt, e, o); break;
        case 4: tile_avx2_t<4>(A, lda, P, Kq, flush, corr, m, n0, cnt, e, o); break;
        case 5: tile_avx2_t<5>(A, lda, P, Kq, flush, corr, m, n0, cnt, e, o); break;
        default: tile_avx2_t<6>(A, lda, P, Kq, flush, corr, m, n0, cnt, e, o); break;
    }
}

// Direct convolution (groups == 1, dilation 1, C % 4 == 0) on the padded NHWC image: tiles of 6
// neighbouring output pixels of one output row x 16 channels; each kernel row i is a contiguous run
// of kw*C bytes (whole k-quads), processed in chunks of at most `flush` k-quads by block6_asm. The
// extra pixels of a row's last tile read the image's slack and are not stored.
struct ConvTask {
    const uint8_t* xp;
    int64_t Hp, Wp, C, lda, segq;
    const int32_t* corr;
};

LB_AVX2 static void conv_rows_avx2(const ConvTask& ct, const ConvGeom& gm, const Packed& w, int64_t r0, int64_t r1,
                                   int64_t p0, int64_t p1, const wb::Epi& e, const wb::Out& o) {
    alignas(32) int32_t acc[6 * ACC_LD];
    for (int64_t p = p0; p < p1; ++p) {
        const int cnt = static_cast<int>(std::min<int64_t>(NR, w.Ng - p * NR));
        const int64_t n0 = p * NR;
        const int8_t* P = w.panel(0, p);
        const __m256i k0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ct.corr + n0));
        const __m256i k1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ct.corr + n0 + 8));
        for (int64_t row = r0; row < r1; ++row) {
            const int64_t b = row / gm.Ho, oh = row % gm.Ho;
            const uint8_t* base = ct.xp + (b * ct.Hp + oh * gm.sh) * ct.Wp * ct.C;
            for (int64_t ow = 0; ow < gm.Wo; ow += 6) {
                for (int r = 0; r < 6; ++r) {
                    _mm256_store_si256(reinterpret_cast<__m256i*>(acc + r * ACC_LD), k0);
                    _mm256_store_si256(reinterpret_cast<__m256i*>(acc + r * ACC_LD + 8), k1);
                }
                const uint8_t* a = base + ow * gm.sw * ct.C;
                for (int64_t i = 0; i < gm.kh; ++i) {
                    const uint8_t* seg = a + i * ct.Wp * ct.C;
                    const int8_t* Pi = P + i * ct.segq * 64;
                    for (int64_t q0 = 0; q0 < ct.segq; q0 += w.flush) {
                        const int64_t n = std::min<int64_t>(w.flush, ct.segq - q0);
                        block6_asm(seg + q0 * 4, ct.lda, Pi + q0 * 64, n, acc);
                    }
                }
                const int nv = static_cast<int>(std::min<int64_t>(6, gm.Wo - ow));
                const int64_t m = row * gm.Wo + ow;
                for (int r = 0; r < nv; ++r) wb::epi_row_avx2(acc + r * ACC_LD, m + r, n0, n0, cnt, e, o);
            }
        }
    }
}

static bool conv_avx2(const uint8_t* xp, int64_t Hp, int64_t Wp, const ConvGeom& gm, const Packed& w,
                      const int32_t* bias, const wb::Epi& e, const wb::Out& o) {
    if (gm.groups != 1 || gm.dh != 1 || gm.dw != 1 || gm.C % 4 != 0) return false;
    const int64_t PG = w.PG, rows = gm.B * gm.Ho;
    const int nt = num_threads();
    int64_t ngroups = 1;
    const int64_t rb = std::max<int64_t>(1, (rows + 4 * nt - 1) / (4 * nt));
    if (nt > 1 && rows < 4 * nt) ngroups = std::min<int64_t>(PG, (4 * nt + rows - 1) / rows);
    const int64_t pg = (PG + ngroups - 1) / ngroups;
    ngroups = (PG + pg - 1) / pg;
    const int64_t rblocks = (rows + rb - 1) / rb;
    const std::vector<int32_t> corr = make_corr(w, 0, bias, gm.zp);
    ConvTask ct;
    ct.xp = xp;
    ct.Hp = Hp;
    ct.Wp = Wp;
    ct.C = gm.C;
    ct.lda = gm.sw * gm.C;
    ct.segq = gm.kw * gm.C / 4;
    ct.corr = corr.data();
    parallel_for(rblocks * ngroups, 1, [&](int64_t tb, int64_t te) {
        for (int64_t t = tb; t < te; ++t) {
            const int64_t r0 = (t / ngroups) * rb, r1 = std::min(rows, r0 + rb);
            const int64_t p0 = (t % ngroups) * pg, p1 = std::min(PG, p0 + pg);
            if (r0 < r1 && p0 < p1) conv_rows_avx2(ct, gm, w, r0, r1, p0, p1, e, o);
        }
    });
    return true;
}

Kernel kernel_avx2() {
    Kernel k;
    k.mr = 6;
    k.np = 1;
    k.tile = tile_avx2;
    k.conv = conv_avx2;
    k.name = "avx2";
    return k;
}

}  // namespace w46
}  // namespace lowbit
#endif
