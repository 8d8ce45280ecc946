// The process-wide worker pool behind pyattn::cpu::run_items (cpu_pool.h): see the header for the scheduling model.
#include <thread>

#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>
#endif

#include "pyattn/cpu_pool.h"

namespace pyattn {
namespace cpu {
namespace {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

class Pool {
 public:
  static Pool& get() {
    static Pool* pool = new Pool();  // never destroyed: its threads are detached and may outlive static destructors
    return *pool;
  }

  // Runs `job` on the caller (tid 0) and on up to nth - 1 workers (tids 1 .. nth-1) that are free to join, until
  // its step() returns false; returns when no worker is inside a step of it.
  void run(int nth, PoolJob& job) {
    if (nth <= 1 || !usable() || !run_mutex_.try_lock()) {  // busy (another caller) or forked: run here
      while (job.step(0)) {
      }
      return;
    }
    ensure_workers(nth - 1);
    job_ = &job;
    job_nth_ = nth;
    const uint64_t g = gen_.load() + 1;
    open_.store(g);
    gen_.store(g);
    {
      std::lock_guard<std::mutex> lk(mutex_);
    }
    cv_.notify_all();
    while (job.step(0)) {
    }
    open_.store(0);  // late workers no longer enter; wait for those inside a step
    for (int spin = 0; active_.load() != 0; ++spin) {
      if (spin < 4096)
        cpu_relax();
      else
        std::this_thread::yield();
    }
    run_mutex_.unlock();
  }

 private:
  Pool() : pid_(current_pid()) {}

  static long current_pid() {
#if defined(__unix__) || defined(__APPLE__)
    return static_cast<long>(getpid());
#else
    return 0;
#endif
  }
  bool usable() const { return current_pid() == pid_; }  // a forked child has no workers: never wait for them

  void ensure_workers(int n) {
    std::lock_guard<std::mutex> lk(mutex_);
    while (nworkers_ < n) {
      try {
        std::thread([this, id = nworkers_ + 1] { worker(id); }).detach();
      } catch (...) {  // no more threads: the caller runs what the workers would have
        return;
      }
      ++nworkers_;
    }
  }

  void worker(int tid) {
    uint64_t seen = 0;
    for (;;) {
      for (int spin = 0; gen_.load() == seen && spin < 4000; ++spin) cpu_relax();  // ~50 us, then sleep
      if (gen_.load() == seen) {
        std::unique_lock<std::mutex> lk(mutex_);
        cv_.wait(lk, [&] { return gen_.load() != seen; });
      }
      seen = gen_.load();
      for (;;) {  // one step at a time, each inside an active window opened only while job `seen` is open
        active_.fetch_add(1);
        if (open_.load() != seen || tid >= job_nth_) {
          active_.fetch_sub(1);
          break;
        }
        const bool more = job_->step(tid);
        active_.fetch_sub(1);
        if (!more) break;
      }
    }
  }

  std::mutex run_mutex_;  // one job at a time
  std::mutex mutex_;      // guards nworkers_ and the sleeping workers' wake-up
  std::condition_variable cv_;
  std::atomic<uint64_t> gen_{0};   // the last job posted
  std::atomic<uint64_t> open_{0};  // the job workers may enter (0: none)
  std::atomic<int> active_{0};     // workers inside a step
  PoolJob* job_ = nullptr;
  int job_nth_ = 0;
  int nworkers_ = 0;
  const long pid_;
};

}  // namespace

void pool_run(int nth, PoolJob& job) { Pool::get().run(nth, job); }

}  // namespace cpu
}  // namespace pyattn
