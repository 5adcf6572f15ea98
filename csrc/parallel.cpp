#include "parallel.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <shared_mutex>
#include <thread>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#define LOWBIT_HAVE_ATFORK 1
#endif
#if defined(__x86_64__) || defined(__i386__) || defined(_M_X64)
#include <immintrin.h>
#define LOWBIT_CPU_RELAX() _mm_pause()
#else
#define LOWBIT_CPU_RELAX() std::this_thread::yield()
#endif

namespace lowbit {

namespace {

std::atomic<int> g_spin_us{200};  // see set_spin_us()

// Spins (with a CPU pause) until done() or until g_spin_us microseconds have passed; true if done().
template <class Done>
bool spin_until(Done done) {
    const int us = g_spin_us.load(std::memory_order_relaxed);
    if (us <= 0) return done();
    const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(us);
    for (;;) {
        for (int i = 0; i < 64; ++i) {
            if (done()) return true;
            LOWBIT_CPU_RELAX();
        }
        if (std::chrono::steady_clock::now() >= until) return done();
    }
}

// One parallel_for call: its chunks, how many workers are inside it, its first error. Lives on the
// caller's stack; the caller unlinks it from the pool and waits for helpers == 0 before returning.
struct Job {
    const std::function<void(int)>* task = nullptr;
    int nchunks = 0;
    std::atomic<int> next{0};
    std::atomic<int> helpers{0};  // workers working on this job (changed under Pool::mu_)
    std::exception_ptr error;   // first exception (guarded by err_mu)
    std::mutex err_mu;

    bool has_work() const { return next.load(std::memory_order_relaxed) < nchunks; }

    // Claims and runs chunks until none is left. Never throws: the first exception is kept and the
    // chunks not yet claimed are cancelled.
    void work() {
        for (;;) {
            const int c = next.fetch_add(1);
            if (c >= nchunks) return;
            try {
                (*task)(c);
            } catch (...) {
                {
                    std::lock_guard<std::mutex> lk(err_mu);
                    if (!error) error = std::current_exception();
                }
                next.store(nchunks);
            }
        }
    }
};

class Pool {
   public:
    explicit Pool(int n) { start(n); }
    Pool(const Pool&) = delete;
    Pool& operator=(const Pool&) = delete;

    void resize(int n) {
        std::unique_lock<std::shared_mutex> rl(resize_mu_);  // waits for the calls in flight
        stop();
        start(n);
    }

    void run(int nchunks, const std::function<void(int)>& task) {
        std::shared_lock<std::shared_mutex> rl(resize_mu_);
        Job job;
        job.task = &task;
        job.nchunks = nchunks;
        if (nchunks <= 1 || workers_.empty()) {
            job.work();
        } else {
            {
                std::lock_guard<std::mutex> lk(mu_);
                jobs_.push_back(&job);
                epoch_.fetch_add(1, std::memory_order_release);  // wakes the spinning workers
            }
            cv_.notify_all();  // the sleeping ones (no system call when none sleeps)
            job.work();
            std::unique_lock<std::mutex> lk(mu_);
            jobs_.erase(std::find(jobs_.begin(), jobs_.end(), &job));  // no new helper can join now
            lk.unlock();
            // The helpers are finishing their last chunks: wait for them spinning, then sleeping.
            if (!spin_until([&] { return job.helpers.load(std::memory_order_acquire) == 0; })) {
                lk.lock();
                done_cv_.wait(lk, [&] { return job.helpers.load() == 0; });
            }
        }
        if (job.error) std::rethrow_exception(job.error);
    }

   private:
    void start(int n) {
        stopping_ = false;
        for (int i = 1; i < n; ++i) workers_.emplace_back([this] { loop(); });
    }

    void stop() {
        {
            std::lock_guard<std::mutex> lk(mu_);
            stopping_ = true;
        }
        cv_.notify_all();
        for (auto& t : workers_) t.join();
        workers_.clear();
    }

    Job* find_job() const {
        for (Job* j : jobs_)
            if (j->has_work()) return j;
        return nullptr;
    }

    // A worker: helps the active jobs; when there is none it spins for up to g_spin_us (a new job is
    // announced by epoch_, so the next kernel call of a model finds it awake), then sleeps on cv_.
    void loop() {
        std::unique_lock<std::mutex> lk(mu_);
        for (;;) {
            Job* j = find_job();
            if (!j && !stopping_) {
                const uint64_t seen = epoch_.load(std::memory_order_acquire);
                lk.unlock();
                spin_until([&] { return epoch_.load(std::memory_order_acquire) != seen; });
                lk.lock();
                cv_.wait(lk, [&] { return stopping_ || (j = find_job()) != nullptr; });
            }
            if (stopping_) return;
            j->helpers.fetch_add(1);
            lk.unlock();
            j->work();
            lk.lock();
            if (j->helpers.fetch_sub(1) == 1) done_cv_.notify_all();  // j may be gone after this line
        }
    }

    std::shared_mutex resize_mu_;  // shared: run; exclusive: resize
    std::mutex mu_;                // jobs_, helpers counts, stopping_
    std::condition_variable cv_, done_cv_;
    std::vector<std::thread> workers_;
    std::vector<Job*> jobs_;
    std::atomic<uint64_t> epoch_{0};  // incremented (under mu_) when a job is added
    bool stopping_ = false;
};

std::atomic<int> g_threads{1};
std::mutex g_pool_mu;      // guards g_pool (creation, and the fork handlers)
Pool* g_pool = nullptr;    // created on first use, never destroyed (see the fork handlers)
thread_local bool t_inside = false;

#ifdef LOWBIT_HAVE_ATFORK
// fork() copies only the calling thread: in the child the workers of g_pool do not exist and its
// mutexes may be held by threads that vanished. The child abandons it (a small leak) and creates a
// new pool at the next parallel_for. g_pool_mu is held across fork() so that g_pool is consistent.
void atfork_prepare() { g_pool_mu.lock(); }
void atfork_parent() { g_pool_mu.unlock(); }
void atfork_child() {
    g_pool = nullptr;
    g_pool_mu.unlock();
}
struct AtforkRegistration {
    AtforkRegistration() { pthread_atfork(atfork_prepare, atfork_parent, atfork_child); }
} g_atfork_registration;
#endif

Pool& pool() {
    std::lock_guard<std::mutex> lk(g_pool_mu);
    if (!g_pool) g_pool = new Pool(g_threads.load());
    return *g_pool;
}

// Marks the current thread as inside a chunk for the lifetime of the guard (exception-safe).
struct InsideGuard {
    bool prev;
    InsideGuard() : prev(t_inside) { t_inside = true; }
    ~InsideGuard() { t_inside = prev; }
};

}  // namespace

void set_num_threads(int n) {
    n = std::max(1, n);
    std::lock_guard<std::mutex> lk(g_pool_mu);
    if (n == g_threads.load()) return;
    g_threads.store(n);
    if (g_pool) g_pool->resize(n);
}

int num_threads() { return g_threads.load(); }

void set_spin_us(int us) { g_spin_us.store(std::max(0, std::min(us, 100000))); }

int spin_us() { return g_spin_us.load(); }

bool in_parallel_region() { return t_inside; }

void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
    if (n <= 0) return;
    grain = std::max<int64_t>(1, grain);
    const int nt = num_threads();
    const int64_t nchunks = std::min<int64_t>(nt, (n + grain - 1) / grain);
    if (nchunks <= 1 || t_inside) {
        fn(0, n);
        return;
    }
    const int64_t step = (n + nchunks - 1) / nchunks;
    pool().run(static_cast<int>(nchunks), [&](int c) {
        InsideGuard g;
        const int64_t b = c * step, e = std::min(n, b + step);
        if (b < e) fn(b, e);
    });
}

}  // namespace lowbit
