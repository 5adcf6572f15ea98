// Check of the AVX-512 paths of the 4.6-bit and binary kernels on machines without AVX-512: compiles
// csrc/w46_avx512.cpp and csrc/binary_avx512.cpp with the AVX-512 intrinsics they use replaced by scalar
// emulations (same semantics: saturation, lane structure, masks), runs their tile / panel kernels over
// many shapes and extreme values and compares with scalar int64 references bit for bit. Checks the
// logic (layouts, flush intervals, remainders, lane order), not the instruction encodings.
// Not part of the extension (setup.py builds csrc/*.cpp only); tests/test_emulation.py builds and
// runs it (cached by source hash):
//   g++ -std=c++17 -O1 -Icsrc csrc/wb_avx512_emu_check.cc csrc/w46.cpp csrc/w46_avx2.cpp csrc/binary.cpp \
//       csrc/binary_avx2.cpp csrc/parallel.cpp csrc/cpu_features.cpp csrc/epilogue.cpp -pthread
#include <immintrin.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

union emu512 {
    uint8_t u8[64];
    int8_t i8[64];
    int16_t i16[32];
    int32_t i32[16];
    int64_t i64[8];
    uint64_t u64[8];
};
static inline emu512 e_zero() {
    emu512 r;
    std::memset(&r, 0, sizeof r);
    return r;
}
static inline emu512 e_load(const void* p) {
    emu512 r;
    std::memcpy(&r, p, 64);
    return r;
}
static inline void e_store(void* p, emu512 a) { std::memcpy(p, &a, 64); }
static inline emu512 e_set1_16(int v) {
    emu512 r;
    for (int i = 0; i < 32; ++i) r.i16[i] = static_cast<int16_t>(v);
    return r;
}
static inline emu512 e_set1_32(int v) {
    emu512 r;
    for (int i = 0; i < 16; ++i) r.i32[i] = v;
    return r;
}
static inline emu512 e_set1_64(long long v) {
    emu512 r;
    for (int i = 0; i < 8; ++i) r.i64[i] = v;
    return r;
}
static inline emu512 e_add8(emu512 a, emu512 b) {
    for (int i = 0; i < 64; ++i) a.u8[i] = static_cast<uint8_t>(a.u8[i] + b.u8[i]);
    return a;
}
static inline emu512 e_add16(emu512 a, emu512 b) {
    for (int i = 0; i < 32; ++i) a.i16[i] = static_cast<int16_t>(static_cast<uint16_t>(a.i16[i]) + static_cast<uint16_t>(b.i16[i]));
    return a;
}
static inline emu512 e_add32(emu512 a, emu512 b) {
    for (int i = 0; i < 16; ++i) a.i32[i] = static_cast<int32_t>(static_cast<uint32_t>(a.i32[i]) + static_cast<uint32_t>(b.i32[i]));
    return a;
}
static inline emu512 e_add64(emu512 a, emu512 b) {
    for (int i = 0; i < 8; ++i) a.u64[i] += b.u64[i];
    return a;
}
static inline emu512 e_xor(emu512 a, emu512 b) {
    for (int i = 0; i < 8; ++i) a.u64[i] ^= b.u64[i];
    return a;
}
// vpmaddubsw: unsigned bytes of a x signed bytes of b, adjacent pairs summed with signed saturation
static inline emu512 e_maddubs(emu512 a, emu512 b) {
    emu512 r;
    for (int i = 0; i < 32; ++i) {
        int s = int(a.u8[2 * i]) * int(b.i8[2 * i]) + int(a.u8[2 * i + 1]) * int(b.i8[2 * i + 1]);
        r.i16[i] = static_cast<int16_t>(s > 32767 ? 32767 : (s < -32768 ? -32768 : s));
    }
    return r;
}
// vpmaddwd: signed words multiplied, adjacent pairs summed into int32 (wrapping)
static inline emu512 e_madd(emu512 a, emu512 b) {
    emu512 r;
    for (int i = 0; i < 16; ++i) {
        int64_t s = int64_t(a.i16[2 * i]) * b.i16[2 * i] + int64_t(a.i16[2 * i + 1]) * b.i16[2 * i + 1];
        r.i32[i] = static_cast<int32_t>(static_cast<uint32_t>(s));
    }
    return r;
}
// vpdpbusd: src + sum_{j<4} u8(a[4i+j]) * s8(b[4i+j]) per int32 lane (wrapping)
static inline emu512 e_dpbusd(emu512 src, emu512 a, emu512 b) {
    for (int i = 0; i < 16; ++i) {
        int32_t s = 0;
        for (int j = 0; j < 4; ++j) s += int32_t(a.u8[4 * i + j]) * int32_t(b.i8[4 * i + j]);
        src.i32[i] = static_cast<int32_t>(static_cast<uint32_t>(src.i32[i]) + static_cast<uint32_t>(s));
    }
    return src;
}
static inline emu512 e_popcnt64(emu512 a) {
    for (int i = 0; i < 8; ++i) a.u64[i] = static_cast<uint64_t>(__builtin_popcountll(a.u64[i]));
    return a;
}
// vpshufb: within each 128-bit lane, r[i] = idx[i] & 0x80 ? 0 : table[idx[i] & 15]
static inline emu512 e_shuffle8(emu512 table, emu512 idx) {
    emu512 r;
    for (int i = 0; i < 64; ++i) r.u8[i] = (idx.u8[i] & 0x80) ? 0 : table.u8[(i / 16) * 16 + (idx.u8[i] & 15)];
    return r;
}
// vpsadbw: per 64-bit lane, the sum of |a - b| over its 8 bytes
static inline emu512 e_sad(emu512 a, emu512 b) {
    emu512 r;
    for (int l = 0; l < 8; ++l) {
        uint64_t s = 0;
        for (int j = 0; j < 8; ++j) s += static_cast<uint64_t>(std::abs(int(a.u8[8 * l + j]) - int(b.u8[8 * l + j])));
        r.u64[l] = s;
    }
    return r;
}
// vpmovqd with a zero mask: low 32 bits of each 64-bit lane (masked lanes 0) -> 8 x int32
__attribute__((target("avx2,fma"))) static inline __m256i e_maskz_cvt64_32(unsigned mask, emu512 a) {
    alignas(32) int32_t t[8];
    for (int l = 0; l < 8; ++l) t[l] = ((mask >> l) & 1u) ? static_cast<int32_t>(a.i64[l]) : 0;
    return _mm256_load_si256(reinterpret_cast<const __m256i*>(t));
}

#define __m512i emu512
#define _mm512_setzero_si512 e_zero
#define _mm512_load_si512 e_load
#define _mm512_loadu_si512 e_load
#define _mm512_storeu_si512 e_store
#define _mm512_set1_epi16 e_set1_16
#define _mm512_set1_epi32 e_set1_32
#define _mm512_set1_epi64 e_set1_64
#define _mm512_add_epi8 e_add8
#define _mm512_add_epi16 e_add16
#define _mm512_add_epi32 e_add32
#define _mm512_add_epi64 e_add64
#define _mm512_xor_si512 e_xor
#define _mm512_maddubs_epi16 e_maddubs
#define _mm512_madd_epi16 e_madd
#define _mm512_dpbusd_epi32 e_dpbusd
#define _mm512_popcnt_epi64 e_popcnt64
#define _mm512_shuffle_epi8 e_shuffle8
#define _mm512_sad_epu8 e_sad
#define _mm512_maskz_cvtepi64_epi32 e_maskz_cvt64_32
#define LB_AVX512 __attribute__((target("avx2,fma")))
#define LB_VNNI __attribute__((target("avx2,fma")))
#define LB_AVX512POP __attribute__((target("avx2,fma")))
#include "w46_avx512.cpp"
#include "binary_avx512.cpp"
#undef __m512i

using namespace lowbit;

static long g_mismatch = 0, g_cases = 0;

// ------------------------------------------------------------------------------------------ 4.6-bit

static void check_w46(std::mt19937& rng, const w46::Kernel& kn, int Kx, int Kw, int64_t M, int64_t N, int64_t K,
                      bool extreme) {
    std::vector<uint8_t> x(M * K);
    std::vector<int8_t> wv(N * K);
    std::vector<int32_t> bias(N);
    for (auto& v : x) v = extreme ? static_cast<uint8_t>(2 * Kx) : static_cast<uint8_t>(rng() % (2 * Kx + 1));
    for (int64_t i = 0; i < N * K; ++i)
        wv[i] = extreme ? static_cast<int8_t>(((i / K) % 2 ? -Kw : Kw)) : static_cast<int8_t>(int(rng() % (2 * Kw + 1)) - Kw);
    for (auto& b : bias) b = static_cast<int32_t>(rng() % 20001) - 10000;
    auto p = w46::pack(wv.data(), N, K, Kx, Kw, 1);
    const int64_t Kp = p->Kp;
    std::vector<uint8_t> A(M * Kp + 64, 0);
    for (int64_t m = 0; m < M; ++m) std::memcpy(A.data() + m * Kp, x.data() + m * K, K);
    const std::vector<int32_t> corr = w46::make_corr(*p, 0, bias.data());
    std::vector<int32_t> out(M * N, 0);
    wb::Epi e;  // int32
    wb::Out o;
    o.ptr = out.data();
    o.ldo = N;
    for (int64_t pi = 0; pi < p->PG; pi += kn.np) {
        const int np = static_cast<int>(std::min<int64_t>(kn.np, p->PG - pi));
        const int cnt = static_cast<int>(std::min<int64_t>(np * w46::NR, N - pi * w46::NR));
        for (int64_t m = 0; m < M; m += kn.mr) {
            const int mr = static_cast<int>(std::min<int64_t>(kn.mr, M - m));
            kn.tile(A.data() + m * Kp, Kp, mr, p->panel(0, pi), p->panel_stride(), np, p->Kq, p->flush,
                    corr.data() + pi * w46::NR, m, pi * w46::NR, cnt, e, o);
        }
    }
    ++g_cases;
    for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < N; ++n) {
            int64_t s = bias[n];
            for (int64_t k = 0; k < K; ++k) s += (int64_t(x[m * K + k]) - Kx) * wv[n * K + k];
            if (static_cast<int32_t>(s) != out[m * N + n]) {
                if (g_mismatch < 10)
                    std::printf("w46 %s Kx=%d Kw=%d M=%ld N=%ld K=%ld: (%ld,%ld) %d != %ld\n", kn.name, Kx, Kw, (long)M,
                                (long)N, (long)K, (long)m, (long)n, out[m * N + n], (long)s);
                ++g_mismatch;
            }
        }
}

// ------------------------------------------------------------------------------------------- binary

using PanelFn = binary::PanelFn;

static void check_binary(std::mt19937_64& rng, PanelFn panel, bool planes, int mr_np, int64_t M, int64_t N, int64_t K,
                         const char* name) {
    const int64_t KW = (K + 63) / 64;
    std::vector<uint64_t> x(M * KW), wv(N * KW);
    for (auto& v : x) v = rng();
    for (auto& v : wv) v = rng();
    const uint64_t last = (K % 64) ? ((uint64_t(1) << (K % 64)) - 1) : ~uint64_t(0);
    for (int64_t m = 0; m < M; ++m) x[m * KW + KW - 1] &= last;  // the callers clear activation padding bits
    auto p = binary::pack(wv.data(), N, KW, KW, K, 1);
    std::vector<uint64_t> lo(M * KW + 8), hi(M * KW + 8);
    binary::prep_planes_scalar(x.data(), KW, M, KW, lo.data(), hi.data());
    std::vector<int32_t> out(M * N, 0);
    wb::Epi e;
    wb::Out o;
    o.ptr = out.data();
    o.ldo = N;
    const uint64_t* P0 = p->panel(planes ? p->lo : p->raw, 0, 0);
    const uint64_t* P1 = p->panel(planes ? p->hi : p->raw, 0, 0);
    const int64_t ps = p->panel_stride();
    for (int64_t pi = 0; pi < p->PG; pi += mr_np) {
        const int np = static_cast<int>(std::min<int64_t>(mr_np, p->PG - pi));
        const int cnt = static_cast<int>(std::min<int64_t>(np * binary::NR, N - pi * binary::NR));
        panel(planes ? lo.data() : x.data(), planes ? hi.data() : x.data(), KW, M, P0 + pi * ps, P1 + pi * ps, ps, np,
              KW, static_cast<int32_t>(p->Kbits), 0, pi * binary::NR, cnt, e, o);
    }
    // the same panels with the threshold-bits epilogue (bit-packed output, flips)
    const int64_t NW = (N + 63) / 64;
    std::vector<int32_t> thr(N);
    std::vector<uint8_t> flip(N);
    for (int64_t n = 0; n < N; ++n) {
        thr[n] = static_cast<int32_t>(rng() % (2 * K + 3)) - static_cast<int32_t>(K) - 1;
        flip[n] = static_cast<uint8_t>(rng() & 1);
    }
    std::vector<uint64_t> bits(M * NW, 0);
    wb::Epi eb;
    eb.kind = wb::EPI_BITS;
    eb.thr = thr.data();
    eb.flip = flip.data();
    wb::Out ob;
    ob.ptr = bits.data();
    ob.ldo = NW;
    for (int64_t pi = 0; pi < p->PG; pi += mr_np) {
        const int np = static_cast<int>(std::min<int64_t>(mr_np, p->PG - pi));
        const int cnt = static_cast<int>(std::min<int64_t>(np * binary::NR, N - pi * binary::NR));
        panel(planes ? lo.data() : x.data(), planes ? hi.data() : x.data(), KW, M, P0 + pi * ps, P1 + pi * ps, ps, np,
              KW, static_cast<int32_t>(p->Kbits), 0, pi * binary::NR, cnt, eb, ob);
    }
    ++g_cases;
    for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < N; ++n) {
            int64_t pc = 0;
            for (int64_t k = 0; k < KW; ++k) {
                uint64_t wk = wv[n * KW + k];
                if (k == KW - 1) wk &= last;
                pc += __builtin_popcountll(x[m * KW + k] ^ wk);
            }
            const int32_t dot = static_cast<int32_t>(K - 2 * pc);
            if (dot != out[m * N + n]) {
                if (g_mismatch < 10)
                    std::printf("binary %s M=%ld N=%ld K=%ld: (%ld,%ld) %d != %d\n", name, (long)M, (long)N, (long)K,
                                (long)m, (long)n, out[m * N + n], dot);
                ++g_mismatch;
            }
            const unsigned want = (dot >= thr[n] ? 1u : 0u) ^ flip[n];
            const unsigned got = static_cast<unsigned>((bits[m * NW + n / 64] >> (n % 64)) & 1u);
            if (want != got) {
                if (g_mismatch < 10)
                    std::printf("binary bits %s M=%ld N=%ld K=%ld: (%ld,%ld) %u != %u\n", name, (long)M, (long)N,
                                (long)K, (long)m, (long)n, got, want);
                ++g_mismatch;
            }
        }
}

int main() {
    std::mt19937 rng(1);
    const w46::Kernel ks[2] = {w46::kernel_avx512bw(), w46::kernel_vnni()};
    const int levels[][2] = {{14, 9}, {12, 10}, {11, 11}, {127, 1}, {1, 127}};
    for (const auto& kn : ks)
        for (const auto& lv : levels) {
            for (int64_t M : {1, 2, 5, 6, 7, 8, 9, 13})
                for (int64_t N : {1, 16, 17, 33, 48})
                    for (int64_t K : {1, 4, 63, 257}) check_w46(rng, kn, lv[0], lv[1], M, N, K, false);
            check_w46(rng, kn, lv[0], lv[1], 7, 35, 4096, true);  // every int16 lane at the bound
            check_w46(rng, kn, lv[0], lv[1], 9, 20, 4100, false);
        }
    std::mt19937_64 rng64(2);
    for (int64_t M : {1, 3, 5, 6, 7, 8, 9, 17})
        for (int64_t N : {1, 8, 9, 16, 17, 33})
            for (int64_t K : {1, 63, 64, 65, 1984, 2000, 4100}) {
                check_binary(rng64, binary::panel_pop, false, 2, M, N, K, "avx512_vpopcntdq");
                check_binary(rng64, binary::panel_lut, true, 2, M, N, K, "avx512bw");
            }
    std::printf("%ld cases, %ld mismatches\n", g_cases, g_mismatch);
    return g_mismatch == 0 ? 0 : 1;
}
