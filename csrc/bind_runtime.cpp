// Python binding of the runtime pieces beside the kernels: the per-thread ISA cap, the shared epilogue
// numbering (epilogue.h) and lowbit._native._testing, small hooks into the thread pool that the test
// suite uses to check its guarantees (exceptions, concurrency, fork; see parallel.h).
#include <pybind11/pybind11.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <new>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>

#include "cpu_features.h"
#include "epilogue.h"
#include "int8_common.h"
#include "parallel.h"

namespace py = pybind11;

namespace lowbit {

namespace {

std::atomic<int> g_rendezvous{0};

}  // namespace

void register_runtime(py::module_& m) {
    m.def("isa_cap", []() { return std::string(isa_name(isa_cap())); }, "The process-wide ISA cap.");
    m.def(
        "set_thread_isa_cap",
        [](const std::string& name) -> py::object {
            int cap = -1;
            if (!name.empty()) {
                Isa isa;
                if (!parse_isa(name, &isa))
                    throw std::invalid_argument("unknown ISA '" + name + "' (portable, neon, avx2, avx512bw, vnni)");
                cap = static_cast<int>(isa);
            }
            const int prev = set_thread_isa_cap(cap);
            if (prev < 0) return py::str("");
            return py::str(isa_name(static_cast<Isa>(prev)));
        },
        py::arg("name"),
        "Cap the ISA for kernel calls made from this thread ('' removes the cap); returns the previous thread "
        "cap ('' for none).");
    m.def("set_spin_us", &set_spin_us, py::arg("us"),
          "How long idle pool workers spin before sleeping, in microseconds (0..100000).");
    m.def("spin_us", &spin_us);
    m.def(
        "last_kernel_path",
        []() {
            const int8::KernelPath p = int8::last_kernel_path();
            return py::make_tuple(std::string(isa_name(p.isa)), std::string(p.kind), p.fused_add);
        },
        "(isa, driver, fused residual add) of the last int8 kernel call made by this thread.");
    m.def("epilogue_kinds", []() {
        py::dict d;
        for (int k = 0; k <= static_cast<int>(EpiKind::bits); ++k) d[epi_kind_name(static_cast<EpiKind>(k))] = k;
        return d;
    });

    py::module_ t = m.def_submodule("_testing", "Hooks into lowbit's thread pool for the test suite.");
    t.def(
        "parallel_run",
        [](int64_t nchunks, int64_t throw_at, int64_t alloc_bytes, int sleep_us) {
            // parallel_for over nchunks items, grain 1 (so min(nchunks, num_threads) chunks); item i sleeps
            // sleep_us, allocates alloc_bytes (std::bad_alloc when that fails) and throws when i == throw_at.
            // Returns how many distinct threads ran items.
            std::mutex mu;
            std::set<std::thread::id> ids;
            py::gil_scoped_release rel;
            parallel_for(nchunks, 1, [&](int64_t b, int64_t e) {
                {
                    std::lock_guard<std::mutex> lk(mu);
                    ids.insert(std::this_thread::get_id());
                }
                for (int64_t i = b; i < e; ++i) {
                    if (sleep_us > 0) std::this_thread::sleep_for(std::chrono::microseconds(sleep_us));
                    if (alloc_bytes > 0) {
                        std::unique_ptr<void, void (*)(void*)> p(std::malloc(static_cast<size_t>(alloc_bytes)), std::free);
                        if (!p) throw std::bad_alloc();
                    }
                    if (i == throw_at) throw std::runtime_error("lowbit test: forced throw in item " + std::to_string(i));
                }
            });
            return static_cast<int>(ids.size());
        },
        py::arg("n"), py::arg("throw_at") = -1, py::arg("alloc_bytes") = 0, py::arg("sleep_us") = 0);
    t.def("in_parallel_region", &in_parallel_region, "True inside a parallel_for chunk on this thread.");
    t.def("rendezvous_reset", []() { g_rendezvous.store(0); });
    t.def(
        "rendezvous",
        [](int parties, int timeout_ms) {
            // A parallel_for whose first item arrives at a shared counter and waits until `parties` callers
            // have arrived (or the timeout): True only if the calls ran at the same time.
            bool met = false;
            py::gil_scoped_release rel;
            parallel_for(2, 1, [&](int64_t b, int64_t) {
                if (b != 0) return;
                g_rendezvous.fetch_add(1);
                const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
                while (g_rendezvous.load() < parties && std::chrono::steady_clock::now() < until)
                    std::this_thread::sleep_for(std::chrono::microseconds(200));
                met = g_rendezvous.load() >= parties;
            });
            return met;
        },
        py::arg("parties"), py::arg("timeout_ms"));
}

}  // namespace lowbit
