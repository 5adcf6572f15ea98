#pragma once
// A small persistent thread pool: parallel_for(n, fn) runs fn(begin, end) over [0, n) split into
// contiguous chunks, one per thread, on at most num_threads() threads (the caller is one of them).
//
// Guarantees (tests/test_native_runtime.py):
// - Exceptions: a chunk that throws (on the calling thread or on a worker) never terminates the
//   process; the remaining chunks are skipped, every chunk already started is waited for, and the
//   first exception is rethrown on the calling thread (pybind11 turns it into a Python error).
// - Concurrency: independent parallel_for calls from several threads run at the same time; each call
//   is its own task group (its chunks, its completion count, its error), and the workers help every
//   active group. Only set_num_threads() waits for the calls in flight.
// - Idle workers: after its last chunk a worker spins (pausing the CPU) for at most spin_us()
//   microseconds waiting for the next parallel_for, then sleeps on a condition variable; a caller
//   waiting for its helpers spins as long, then sleeps. So the back-to-back kernel calls of a model
//   find the workers awake, and an idle pool uses no CPU after spin_us().
// - Fork: in a child created by fork() the pool of the parent (whose threads do not exist there) is
//   abandoned and a new one is created at the next call, with the same thread count.
#include <cstdint>
#include <functional>

namespace lowbit {

void set_num_threads(int n);  // n >= 1
int num_threads();

// How long an idle worker (and a caller waiting for its helpers) spins before sleeping, in
// microseconds (default 200, clamped to [0, 100000]; 0 = sleep at once). Process-wide.
void set_spin_us(int us);
int spin_us();

// Calls fn(begin, end) on disjoint chunks covering [0, n). Chunks have at least `grain` items
// (except possibly the last), so tiny problems stay on the calling thread. Not reentrant: a
// nested call runs serially on the calling thread.
void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

// True while the calling thread executes a chunk of a parallel_for (used by the tests).
bool in_parallel_region();

}  // namespace lowbit
