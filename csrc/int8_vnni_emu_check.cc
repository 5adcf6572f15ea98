#define LB_VNNI_NO_DIRECT 1  // the direct path uses intrinsics this harness does not emulate
// Check of the AVX-512 VNNI int8 path on machines without AVX-512: compiles csrc/int8_vnni.cpp with the
// few AVX-512 intrinsics it uses replaced by scalar emulations, runs chunk_vnni (packing, K blocking,
// tiles, zero-point correction, epilogue) and compares with chunk_portable bit for bit.
// Not part of the extension (setup.py builds csrc/*.cpp only); tests/test_emulation.py builds and runs
// it (cached by source hash):
//   g++ -std=c++17 -O1 -ffp-contract=off -Icsrc csrc/int8_vnni_emu_check.cc csrc/int8_driver.cpp csrc/int8_dw_vnni.cpp \
//       csrc/int8_portable.cpp csrc/int8_avx2.cpp csrc/parallel.cpp csrc/cpu_features.cpp csrc/epilogue.cpp -pthread
#include <immintrin.h>
#include <cstdint>
#include <cstring>
#include <cstdio>
#include <random>
struct emu512 { int32_t v[16]; };
static inline emu512 emu_setzero() { emu512 r; std::memset(&r, 0, sizeof r); return r; }
static inline emu512 emu_loadu(const void* p) { emu512 r; std::memcpy(&r, p, 64); return r; }
static inline void emu_storeu(void* p, emu512 a) { std::memcpy(p, &a, 64); }
static inline emu512 emu_set1(int32_t v) { emu512 r; for (int i = 0; i < 16; ++i) r.v[i] = v; return r; }
static inline emu512 emu_add(emu512 a, emu512 b) { for (int i = 0; i < 16; ++i) a.v[i] = int32_t(uint32_t(a.v[i]) + uint32_t(b.v[i])); return a; }
// vpdpbusd: src + sum_{j<4} u8(a.byte[4i+j]) * s8(b.byte[4i+j]) per lane (wrapping)
static inline emu512 emu_dpbusd(emu512 src, emu512 a, emu512 b) {
  const uint8_t* pa = reinterpret_cast<const uint8_t*>(a.v); const int8_t* pb = reinterpret_cast<const int8_t*>(b.v);
  for (int i = 0; i < 16; ++i) { int32_t s = 0; for (int j = 0; j < 4; ++j) s += int32_t(pa[4*i+j]) * int32_t(pb[4*i+j]);
    src.v[i] = int32_t(uint32_t(src.v[i]) + uint32_t(s)); }
  return src;
}
#define __m512i emu512
#define _mm512_setzero_si512 emu_setzero
#define _mm512_loadu_si512 emu_loadu
#define _mm512_storeu_si512 emu_storeu
#define _mm512_set1_epi32 emu_set1
#define _mm512_add_epi32 emu_add
#define _mm512_dpbusd_epi32 emu_dpbusd
#define LB_VNNI
#include "int8_vnni.cpp"
#undef __m512i

#include "int8_common.h"
using namespace lowbit::int8;
using lowbit::EpiKind;
// epilogue kinds by the loop index ek (1 and 2 write bytes)
static const EpiKind kKinds[4] = {EpiKind::none, EpiKind::requant_u8, EpiKind::requant_s8, EpiKind::float_out};
int main() {
  std::mt19937 rng(1);
  int fails = 0, runs = 0;
  const int shapes[][3] = {{1,1,1},{1,17,3},{3,33,17},{8,16,64},{9,32,65},{17,48,257},{13,100,600},{100,40,1030},{7,5,4096}};
  for (auto& sh : shapes) for (int ek = 0; ek < 4; ++ek) for (int zp : {0, 255, 77}) {
    int64_t M = sh[0], N = sh[1], K = sh[2];
    std::vector<uint8_t> x(M*K); std::vector<int8_t> w(N*K); std::vector<int32_t> bias(N), m0(N), rs(N); std::vector<float> sc(N), fb(N);
    for (auto& v : x) v = (zp == 0 && ek == 1) ? 255 : rng() % 256;
    for (auto& v : w) v = (zp == 0 && ek == 1) ? -128 : int8_t(int(rng() % 256) - 128);
    for (int n = 0; n < N; ++n) { bias[n] = int(rng() % 200001) - 100000; m0[n] = 1073741824 + rng() % 1000000; rs[n] = 20 + rng() % 12; sc[n] = 1e-3f * (rng() % 1000); fb[n] = float(int(rng() % 100) - 50); }
    auto P = pack(w.data(), N, K, K);
    DenseRows rows; rows.k = K; rows.x = x.data(); rows.ld = K;
    size_t esz = (ek == 1 || ek == 2) ? 1 : 4;
    std::vector<uint8_t> out_v(M*N*esz), out_p(M*N*esz);
    for (int variant = 0; variant < 2; ++variant) {
      Epi e; e.kind = kKinds[ek]; e.m0 = m0.data(); e.rshift = rs.data(); e.out_zp = ek == 2 ? -5 : 5; e.qmin = ek == 2 ? -128 : 0; e.qmax = ek == 2 ? 127 : 255;
      e.scale = sc.data(); e.fbias = fb.data(); e.ldo = N; e.out = variant ? out_v.data() : out_p.data();
      std::vector<int32_t> corr(P->nblocks * 16, 0);
      for (int n = 0; n < N; ++n) corr[n] = variant ? int32_t(uint32_t(bias[n]) - uint32_t(zp) * uint32_t(P->colsum[n])) : bias[n];
      GemmJob j; j.a = &rows; j.m = M; j.zp = zp; j.w = P.get(); j.corr = corr.data(); j.epi = e;
      // chunks of 24 rows x 3 blocks, like the driver might split them
      for (int64_t m0_ = 0; m0_ < M; m0_ += 24) for (int64_t b = 0; b < P->nblocks; b += 3) {
        int64_t m1 = std::min<int64_t>(M, m0_ + 24), b1 = std::min<int64_t>(P->nblocks, b + 3);
        if (variant) chunk_vnni(j, m0_, m1, b, b1); else chunk_portable(j, m0_, m1, b, b1);
      }
    }
    ++runs;
    if (out_v != out_p) { ++fails; printf("MISMATCH M=%ld N=%ld K=%ld epi=%d zp=%d\n", (long)M, (long)N, (long)K, ek, zp); }
  }
  printf("%d runs, %d mismatches\n", runs, fails);
  return fails != 0;
}
