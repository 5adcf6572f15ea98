#include "cpu_features.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#include <cstdint>
#endif

namespace lowbit {

namespace {

CpuFeatures detect() {
    CpuFeatures f;
#if defined(__x86_64__) || defined(_M_X64)
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
    const bool osxsave = (c >> 27) & 1;
    f.popcnt = (c >> 23) & 1;
    f.fma = (c >> 12) & 1;
    uint64_t xcr0 = 0;
    if (osxsave) {
        unsigned lo = 0, hi = 0;
        __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
        xcr0 = (uint64_t(hi) << 32) | lo;
    }
    const bool ymm_ok = (xcr0 & 0x6) == 0x6;       // SSE + AVX state saved by the OS
    const bool zmm_ok = (xcr0 & 0xe6) == 0xe6;     // + opmask, ZMM_Hi256, Hi16_ZMM
    if (__get_cpuid_max(0, nullptr) >= 7) {
        __cpuid_count(7, 0, a, b, c, d);
        f.avx2 = ymm_ok && ((b >> 5) & 1);
        f.fma = f.fma && ymm_ok;
        f.avx512f = zmm_ok && ((b >> 16) & 1);
        f.avx512bw = f.avx512f && ((b >> 30) & 1);
        f.avx512vl = f.avx512f && ((b >> 31) & 1);
        f.avx512vnni = f.avx512f && ((c >> 11) & 1);
        f.avx512vpopcntdq = f.avx512f && ((c >> 14) & 1);
    }
#elif defined(__aarch64__)
    f.neon = true;
#endif
    return f;
}

}  // namespace

const CpuFeatures& cpu() {
    static const CpuFeatures f = detect();
    return f;
}

}  // namespace lowbit

#include <atomic>
#include <cstdlib>

namespace lowbit {

Isa best_isa() {
    const auto& f = cpu();
    if (f.neon) return Isa::neon;
    if (f.avx512vnni && f.avx512bw && f.avx512vl) return Isa::vnni;
    if (f.avx512bw && f.avx512vl) return Isa::avx512bw;
    if (f.avx2 && f.fma) return Isa::avx2;
    return Isa::portable;
}

namespace {
std::atomic<int> g_cap{-1};
thread_local int t_cap = -1;

int initial_cap() {
    const char* env = std::getenv("LOWBIT_ISA");
    Isa isa;
    if (env && *env && parse_isa(env, &isa)) return static_cast<int>(isa);
    return static_cast<int>(Isa::vnni);
}

int process_cap() {
    int cap = g_cap.load(std::memory_order_relaxed);
    if (cap < 0) {
        cap = initial_cap();
        g_cap.store(cap, std::memory_order_relaxed);
    }
    return cap;
}
}  // namespace

Isa isa_cap() { return static_cast<Isa>(process_cap()); }

int set_thread_isa_cap(int cap) {
    const int prev = t_cap;
    t_cap = cap < 0 ? -1 : cap;
    return prev;
}

Isa active_isa() {
    int cap = process_cap();
    if (t_cap >= 0 && t_cap < cap) cap = t_cap;
    const Isa best = best_isa();
    if (best == Isa::neon) return cap >= static_cast<int>(Isa::neon) ? Isa::neon : Isa::portable;
    return static_cast<int>(best) < cap ? best : static_cast<Isa>(cap);
}

void set_isa_cap(Isa cap) { g_cap.store(static_cast<int>(cap), std::memory_order_relaxed); }

bool parse_isa(const std::string& name, Isa* out) {
    if (name == "portable") *out = Isa::portable;
    else if (name == "neon") *out = Isa::neon;
    else if (name == "avx2") *out = Isa::avx2;
    else if (name == "avx512bw") *out = Isa::avx512bw;
    else if (name == "vnni" || name == "avx512vnni") *out = Isa::vnni;
    else return false;
    return true;
}

const char* isa_name(Isa isa) {
    switch (isa) {
        case Isa::portable: return "portable";
        case Isa::neon: return "neon";
        case Isa::avx2: return "avx2";
        case Isa::avx512bw: return "avx512bw";
        case Isa::vnni: return "vnni";
    }
    return "portable";
}

}  // namespace lowbit
