#include "parallel.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

namespace lowbit {

namespace {

class Pool {
   public:
    ~Pool() { stop(); }

    void resize(int n) {
        std::lock_guard<std::mutex> run_lock(run_mu_);
        stop();
        stopping_ = false;
        for (int i = 1; i < n; ++i) workers_.emplace_back([this, i] { loop(i); });
        size_ = std::max(1, n);
    }

    int size() const { return size_; }

    void run(int nchunks, const std::function<void(int)>& task) {
        std::lock_guard<std::mutex> run_lock(run_mu_);
        if (nchunks <= 1 || workers_.empty()) {
            for (int c = 0; c < nchunks; ++c) task(c);
            return;
        }
        {
            std::lock_guard<std::mutex> lk(mu_);
            task_ = &task;
            nchunks_ = nchunks;
            next_.store(0);
            pending_ = static_cast<int>(workers_.size());
            ++generation_;
        }
        cv_.notify_all();
        work();
        std::unique_lock<std::mutex> lk(mu_);
        done_cv_.wait(lk, [this] { return pending_ == 0; });
        task_ = nullptr;
    }

   private:
    void work() {
        for (;;) {
            int c = next_.fetch_add(1);
            if (c >= nchunks_) break;
            (*task_)(c);
        }
    }

    void loop(int) {
        uint64_t seen = 0;
        for (;;) {
            {
                std::unique_lock<std::mutex> lk(mu_);
                cv_.wait(lk, [&] { return stopping_ || generation_ != seen; });
                if (stopping_) return;
                seen = generation_;
            }
            work();
            std::lock_guard<std::mutex> lk(mu_);
            if (--pending_ == 0) done_cv_.notify_one();
        }
    }

    void stop() {
        {
            std::lock_guard<std::mutex> lk(mu_);
            stopping_ = true;
        }
        cv_.notify_all();
        for (auto& t : workers_) t.join();
        workers_.clear();
        size_ = 1;
    }

    std::mutex run_mu_, mu_;
    std::condition_variable cv_, done_cv_;
    std::vector<std::thread> workers_;
    const std::function<void(int)>* task_ = nullptr;
    std::atomic<int> next_{0};
    int nchunks_ = 0, pending_ = 0, size_ = 1;
    uint64_t generation_ = 0;
    bool stopping_ = false;
};

Pool& pool() {
    static Pool p;
    return p;
}

std::atomic<int> g_threads{1};
thread_local bool t_inside = false;

}  // namespace

void set_num_threads(int n) {
    n = std::max(1, n);
    if (n == g_threads.load()) return;
    g_threads.store(n);
    pool().resize(n);
}

int num_threads() { return g_threads.load(); }

void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
    if (n <= 0) return;
    grain = std::max<int64_t>(1, grain);
    int nt = num_threads();
    int64_t nchunks = std::min<int64_t>(nt, (n + grain - 1) / grain);
    if (nchunks <= 1 || t_inside) {
        fn(0, n);
        return;
    }
    const int64_t step = (n + nchunks - 1) / nchunks;
    pool().run(static_cast<int>(nchunks), [&](int c) {
        t_inside = true;
        int64_t b = c * step, e = std::min(n, b + step);
        if (b < e) fn(b, e);
        t_inside = false;
    });
}

}  // namespace lowbit
