#include "cpu/parallel.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <exception>
#include <memory>
#include <mutex>
#include <system_error>
#include <thread>
#include <vector>

#include <unistd.h>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace kd_ext {
namespace {

struct Job {
  const std::function<void(int64_t, int)>* fn = nullptr;
  int64_t n = 0;
  std::atomic<int64_t> next{0};
  std::atomic<int> next_worker{1};  // worker ids handed to helpers (0 is the caller)
  int max_workers = 1;
  std::mutex error_mu;
  std::exception_ptr error;  // first exception thrown by fn, re-thrown by the caller after the join
};

// Claims and runs chunks until none is left. Never throws: the first exception of fn is kept in
// the job and stops further claims, so every thread leaves the job normally.
void run_chunks(Job* job, int worker) noexcept {
  try {
    for (;;) {
      const int64_t i = job->next.fetch_add(1, std::memory_order_relaxed);
      if (i >= job->n) return;
      (*job->fn)(i, worker);
    }
  } catch (...) {
    std::lock_guard<std::mutex> lock(job->error_mu);
    if (!job->error) job->error = std::current_exception();
    job->next.store(job->n, std::memory_order_relaxed);
  }
}

class Pool {
 public:
  // Starts up to `helpers` threads; when the system refuses more (out of memory or thread
  // limits), the pool works with those it got.
  explicit Pool(int helpers) : pid_(getpid()) {
    try {
      threads_.reserve(helpers);
      for (int i = 0; i < helpers; ++i) threads_.emplace_back([this] { worker_loop(); });
    } catch (const std::system_error&) {
    } catch (const std::bad_alloc&) {
    }
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    work_cv_.notify_all();
    for (auto& t : threads_) {
      if (t.joinable()) {
        if (getpid() == pid_) t.join(); else t.detach();
      }
    }
  }

  int size() const { return static_cast<int>(threads_.size()) + 1; }

  // Returns false when the pool cannot be used (busy with another call, or after fork()). The job
  // is unregistered before returning; exceptions stay in job->error.
  bool run(Job* job) {
    if (getpid() != pid_) return false;
    std::unique_lock<std::mutex> lock(mu_, std::try_to_lock);
    if (!lock.owns_lock() || job_ != nullptr) return false;
    job_ = job;
    ++generation_;
    lock.unlock();
    work_cv_.notify_all();
    run_chunks(job, 0);
    lock.lock();
    job_ = nullptr;  // helpers that wake up from now on find nothing to do
    done_cv_.wait(lock, [this] { return active_ == 0; });
    return true;
  }

 private:
  void worker_loop() {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      work_cv_.wait(lock, [&] { return stop_ || (job_ != nullptr && generation_ != seen); });
      if (stop_) return;
      seen = generation_;
      Job* job = job_;
      const int worker = job->next_worker.fetch_add(1);
      if (worker >= job->max_workers) continue;
      ++active_;
      lock.unlock();
      run_chunks(job, worker);
      lock.lock();
      if (--active_ == 0) done_cv_.notify_all();
    }
  }

  const pid_t pid_;
  std::mutex mu_;
  std::condition_variable work_cv_, done_cv_;
  Job* job_ = nullptr;
  uint64_t generation_ = 0;
  int active_ = 0;
  bool stop_ = false;
  std::vector<std::thread> threads_;
};

Pool* get_pool(int threads) {
  // Created once with enough helpers for this machine (or the requested count, if larger);
  // jobs cap how many of them take part, so the pool never has to be replaced while in use.
  static Pool pool(std::max(threads, std::min(64, static_cast<int>(std::thread::hardware_concurrency()))) - 1);
  return &pool;
}

}  // namespace

int max_threads() {
#ifdef _OPENMP
  const int n = omp_get_max_threads();
#else
  const int n = static_cast<int>(std::thread::hardware_concurrency());
#endif
  return n < 1 ? 1 : n;
}

void parallel_for(int64_t n, const std::function<void(int64_t, int)>& fn) {
  if (n <= 0) return;
  const int threads = max_threads();
  Job job;
  job.fn = &fn;
  job.n = n;
  bool ran = false;
  if (threads > 1 && n > 1) {
    static thread_local bool in_pool_call = false;
    if (!in_pool_call) {
      in_pool_call = true;
      Pool* p = get_pool(threads);
      job.max_workers = std::min(threads, p->size());
      ran = p->run(&job);
      in_pool_call = false;
    }
  }
  if (!ran) run_chunks(&job, 0);  // inline (single thread, nested, busy pool, or after fork)
  if (job.error) std::rethrow_exception(job.error);
}

}  // namespace kd_ext
