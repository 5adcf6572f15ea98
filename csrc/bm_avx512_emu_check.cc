// Check of the AVX-512 path of the BM kernels on machines without AVX-512: compiles csrc/bm_avx512.cpp
// with the AVX-512 intrinsics it uses replaced by scalar emulations (same semantics: saturation, lane
// structure, masks), runs its integer and float panel kernels over many shapes and extreme codes and
// compares them with the portable panels bit for bit (the portable path is itself checked against the
// plain-PyTorch reference by tests/test_kernels_bm.py). Checks the logic, not the instruction encodings.
// Not part of the extension (setup.py builds csrc/*.cpp only); tests/test_kernels_bm.py builds and runs it:
//   g++ -std=c++17 -O1 -Icsrc csrc/bm_avx512_emu_check.cc csrc/bm.cpp csrc/bm_avx2.cpp csrc/parallel.cpp \
//       csrc/cpu_features.cpp -pthread
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

union emu512i {
    int8_t i8[64];
    int16_t i16[32];
    int32_t i32[16];
    uint32_t u32[16];
};
union emu512f {
    float f[16];
};

static inline emu512i ei_zero() {
    emu512i r;
    std::memset(&r, 0, sizeof r);
    return r;
}
static inline emu512i ei_load(const void* p) {
    emu512i r;
    std::memcpy(&r, p, 64);
    return r;
}
static inline void ei_store(void* p, emu512i a) { std::memcpy(p, &a, 64); }
static inline emu512i ei_set1_8(int v) {
    emu512i r;
    for (auto& x : r.i8) x = static_cast<int8_t>(v);
    return r;
}
static inline emu512i ei_set1_16(int v) {
    emu512i r;
    for (auto& x : r.i16) x = static_cast<int16_t>(v);
    return r;
}
static inline emu512i ei_set1_32(int v) {
    emu512i r;
    for (auto& x : r.i32) x = v;
    return r;
}
template <typename T, int L>
static inline emu512i sat_add(emu512i a, emu512i b, T* pa, T* pb) {
    (void)pa, (void)pb;
    emu512i r;
    for (int i = 0; i < L; ++i) {
        T x, y;
        std::memcpy(&x, reinterpret_cast<const char*>(&a) + i * sizeof(T), sizeof(T));
        std::memcpy(&y, reinterpret_cast<const char*>(&b) + i * sizeof(T), sizeof(T));
        int32_t s = int32_t(x) + int32_t(y);
        s = std::min<int32_t>(std::max<int32_t>(s, std::numeric_limits<T>::min()), std::numeric_limits<T>::max());
        const T t = static_cast<T>(s);
        std::memcpy(reinterpret_cast<char*>(&r) + i * sizeof(T), &t, sizeof(T));
    }
    return r;
}
static inline emu512i ei_adds8(emu512i a, emu512i b) { return sat_add<int8_t, 64>(a, b, nullptr, nullptr); }
static inline emu512i ei_adds16(emu512i a, emu512i b) { return sat_add<int16_t, 32>(a, b, nullptr, nullptr); }
static inline emu512i ei_max8(emu512i a, emu512i b) {
    for (int i = 0; i < 64; ++i) a.i8[i] = std::max(a.i8[i], b.i8[i]);
    return a;
}
static inline emu512i ei_max16(emu512i a, emu512i b) {
    for (int i = 0; i < 32; ++i) a.i16[i] = std::max(a.i16[i], b.i16[i]);
    return a;
}
static inline emu512i ei_srli32(emu512i a, int s) {
    for (auto& x : a.u32) x >>= s;
    return a;
}
static inline emu512i ei_slli32(emu512i a, int s) {
    for (auto& x : a.u32) x <<= s;
    return a;
}
static inline emu512i ei_srai32(emu512i a, int s) {
    for (auto& x : a.i32) x >>= s;
    return a;
}
static inline emu512i ei_mask_mov32(emu512i src, unsigned m, emu512i a) {
    for (int i = 0; i < 16; ++i)
        if ((m >> i) & 1u) src.i32[i] = a.i32[i];
    return src;
}
static inline void ei_mask_store32(void* p, unsigned m, emu512i a) {
    for (int i = 0; i < 16; ++i)
        if ((m >> i) & 1u) std::memcpy(static_cast<char*>(p) + 4 * i, &a.i32[i], 4);
}
static inline emu512f ef_set1(float v) {
    emu512f r;
    for (auto& x : r.f) x = v;
    return r;
}
static inline emu512f ef_load(const float* p) {
    emu512f r;
    std::memcpy(&r, p, 64);
    return r;
}
static inline emu512f ef_add(emu512f a, emu512f b) {
    for (int i = 0; i < 16; ++i) a.f[i] = a.f[i] + b.f[i];
    return a;
}
static inline emu512f ef_max(emu512f a, emu512f b) {  // vmaxps: the second operand unless a > b
    for (int i = 0; i < 16; ++i) a.f[i] = a.f[i] > b.f[i] ? a.f[i] : b.f[i];
    return a;
}
static inline unsigned ef_cmp_gt(emu512f a, emu512f b, int) {  // only _CMP_GT_OQ is used
    unsigned m = 0;
    for (int i = 0; i < 16; ++i) m |= unsigned(a.f[i] > b.f[i]) << i;
    return m;
}
static inline emu512f ef_mask_mov(emu512f src, unsigned m, emu512f a) {
    for (int i = 0; i < 16; ++i)
        if ((m >> i) & 1u) src.f[i] = a.f[i];
    return src;
}
static inline void ef_mask_store(float* p, unsigned m, emu512f a) {
    for (int i = 0; i < 16; ++i)
        if ((m >> i) & 1u) p[i] = a.f[i];
}

#define __m512i emu512i
#define __m512 emu512f
#define __mmask16 unsigned
#define _mm512_setzero_si512 ei_zero
#define _mm512_load_si512 ei_load
#define _mm512_storeu_si512 ei_store
#define _mm512_set1_epi8 ei_set1_8
#define _mm512_set1_epi16 ei_set1_16
#define _mm512_set1_epi32 ei_set1_32
#define _mm512_adds_epi8 ei_adds8
#define _mm512_adds_epi16 ei_adds16
#define _mm512_max_epi8 ei_max8
#define _mm512_max_epi16 ei_max16
#define _mm512_srli_epi32 ei_srli32
#define _mm512_slli_epi32 ei_slli32
#define _mm512_srai_epi32 ei_srai32
#define _mm512_mask_mov_epi32 ei_mask_mov32
#define _mm512_mask_storeu_epi32 ei_mask_store32
#define _mm512_set1_ps ef_set1
#define _mm512_load_ps ef_load
#define _mm512_add_ps ef_add
#define _mm512_max_ps ef_max
#define _mm512_cmp_ps_mask ef_cmp_gt
#define _mm512_mask_mov_ps ef_mask_mov
#define _mm512_mask_storeu_ps ef_mask_store
#define LB_AVX512 __attribute__((target("avx2,fma")))
#include "bm_avx512.cpp"
#undef __m512i
#undef __m512
#undef __mmask16

using namespace lowbit;

static long g_mismatch = 0, g_cases = 0;

static void check_int(std::mt19937& rng, int bits, int64_t rows, int64_t KG, bool extreme) {
    const bm::Kernel emu = bm::kernel_avx512(), ref = bm::kernel_portable();
    const int mn = -(1 << (bits - 1));
    std::vector<int32_t> A(rows * KG), P0(KG * bm::NR), P1(KG * bm::NR);
    auto code = [&](int kind) -> int {
        if (extreme) return kind ? mn + 1 : 0;
        const int r = static_cast<int>(rng() % 10);
        if (r == 0) return mn;
        if (r == 1) return 0;
        return -static_cast<int>(rng() % static_cast<unsigned>(-mn));
    };
    auto fill = [&](std::vector<int32_t>& v, int kind) {
        for (auto& d : v) {
            uint8_t b[4];
            for (int i = 0; i < 4 / (bits / 8); ++i) {
                const int c = code(kind);
                if (bits == 8)
                    b[i] = static_cast<uint8_t>(static_cast<int8_t>(c));
                else {
                    const int16_t c16 = static_cast<int16_t>(c);
                    std::memcpy(b + 2 * i, &c16, 2);
                }
            }
            std::memcpy(&d, b, 4);
        }
    };
    fill(A, 1);
    fill(P0, 0);
    fill(P1, 1);
    std::vector<int32_t> r0(rows * bm::NR), r1(rows * bm::NR), q0(rows * bm::NR), q1(rows * bm::NR);
    auto fe = bits == 8 ? emu.i8 : emu.i16;
    auto fr = bits == 8 ? ref.i8 : ref.i16;
    const uint8_t* a = reinterpret_cast<const uint8_t*>(A.data());
    fe(a, KG * 4, rows, P0.data(), P1.data(), KG, r0.data(), r1.data(), bm::NR);
    fr(a, KG * 4, rows, P0.data(), P1.data(), KG, q0.data(), q1.data(), bm::NR);
    ++g_cases;
    for (size_t i = 0; i < r0.size(); ++i)
        if (r0[i] != q0[i] || r1[i] != q1[i]) {
            if (g_mismatch < 10)
                std::printf("int%d rows=%ld KG=%ld: [%zu] %d/%d != %d/%d\n", bits, (long)rows, (long)KG, i, r0[i],
                            r1[i], q0[i], q1[i]);
            ++g_mismatch;
        }
}

static void check_f32(std::mt19937& rng, bool idx, int64_t rows, int64_t K, int np, int cnt) {
    const bm::Kernel emu = bm::kernel_avx512(), ref = bm::kernel_portable();
    std::uniform_real_distribution<float> u(-4.f, 4.f);
    std::vector<float> X(rows * K), P(np * K * bm::NR);
    for (auto& v : X) v = (rng() % 7 == 0) ? -std::numeric_limits<float>::infinity() : u(rng);
    for (auto& v : P) v = (rng() % 5 == 0) ? 1.0f : u(rng);  // repeated values: ties
    const int64_t N = 40;
    std::vector<float> y0(rows * N, 0), y1(rows * N, 0);
    std::vector<int32_t> i0(rows * N, -1), i1(rows * N, -1);
    (idx ? emu.f32 : emu.f32max)(X.data(), K, rows, P.data(), np, K, y0.data(), idx ? i0.data() : nullptr, N, 3, cnt);
    (idx ? ref.f32 : ref.f32max)(X.data(), K, rows, P.data(), np, K, y1.data(), idx ? i1.data() : nullptr, N, 3, cnt);
    ++g_cases;
    for (size_t i = 0; i < y0.size(); ++i)
        if (std::memcmp(&y0[i], &y1[i], 4) != 0 || i0[i] != i1[i]) {
            if (g_mismatch < 10)
                std::printf("f32 idx=%d rows=%ld K=%ld np=%d cnt=%d: [%zu] %g/%d != %g/%d\n", int(idx), (long)rows,
                            (long)K, np, cnt, i, y0[i], i0[i], y1[i], i1[i]);
            ++g_mismatch;
        }
}

int main() {
    std::mt19937 rng(11);
    for (int bits : {8, 16})
        for (int64_t rows : {1, 2, 3, 4, 5, 7, 8, 9, 12, 13, 17, 24})
            for (int64_t KG : {1, 2, 5, 33}) {
                check_int(rng, bits, rows, KG, false);
                check_int(rng, bits, rows, KG, true);
            }
    for (bool idx : {true, false})
        for (int64_t rows : {1, 5, 6, 7, 13})
            for (int64_t K : {1, 3, 40})
                for (int np : {1, 2})
                    for (int cnt : {1, 16, 17, 32})
                        if (cnt <= np * bm::NR) check_f32(rng, idx, rows, K, np, cnt);
    std::printf("%ld cases, %ld mismatches\n", g_cases, g_mismatch);
    return g_mismatch == 0 ? 0 : 1;
}
