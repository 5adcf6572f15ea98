#pragma once
#include <string>

namespace lowbit {

struct CpuFeatures {
    bool avx2 = false, fma = false, popcnt = false;
    bool avx512f = false, avx512bw = false, avx512vl = false, avx512vnni = false, avx512vpopcntdq = false;
    bool neon = false;
};

// Detected once (cpuid + xgetbv on x86, compile-time on AArch64).
const CpuFeatures& cpu();

// Instruction-set levels, ordered: a kernel family picks the highest level it implements that is
// <= active_isa(). active_isa() is the best the CPU supports, lowered by set_isa_cap() or by the
// LOWBIT_ISA environment variable (read once at first use) so that every path can be tested.
enum class Isa : int { portable = 0, neon = 1, avx2 = 2, avx512bw = 3, vnni = 4 };

// active_isa() is what the calling thread's kernel calls dispatch to; every kernel family picks its
// path on the calling thread (never inside a worker), so a per-thread cap scopes a whole call.
Isa best_isa();                  // what this CPU supports
Isa active_isa();                // min(best_isa, process cap, this thread's cap)
void set_isa_cap(Isa cap);       // process-wide cap (raises nothing; a cap above best_isa is clamped)
Isa isa_cap();                   // the process-wide cap
// Cap for the calling thread only, on top of the process cap (lowbit.kernels.native.isa()); returns
// the previous thread cap, -1 meaning none. set_thread_isa_cap(-1) removes it.
int set_thread_isa_cap(int cap);
bool parse_isa(const std::string& name, Isa* out);
const char* isa_name(Isa isa);

}  // namespace lowbit
