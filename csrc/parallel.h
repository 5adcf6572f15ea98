#pragma once
// A small persistent thread pool: parallel_for(n, fn) runs fn(begin, end) over [0, n) split into
// contiguous chunks, one per thread, on at most num_threads() threads (the caller is one of them).
#include <cstdint>
#include <functional>

namespace lowbit {

void set_num_threads(int n);  // n >= 1
int num_threads();

// Calls fn(begin, end) on disjoint chunks covering [0, n). Chunks have at least `grain` items
// (except possibly the last), so tiny problems stay on the calling thread. Not reentrant: a
// nested call runs serially on the calling thread.
void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

}  // namespace lowbit
