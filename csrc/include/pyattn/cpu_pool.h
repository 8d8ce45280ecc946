// Torch-free thread pool shared by the C++ CPU kernels (csrc/cpu/; implementation in csrc/cpu/pool.cpp).
//
// Every parallel loop here is a set of independent items (e.g. GEMM blocks, GRU batch-row blocks, attention query blocks), claimed in order from one atomic
// counter. There is no static split, no barrier, and the caller never waits for a worker that has not started:
// these machines are shared and oversubscribed, and an OpenMP team's fork/join (or a barrier per time step) waits
// for every thread to be scheduled; measured here, a 2-thread OpenMP region or per-step barrier cost milliseconds
// whenever other processes held the cores. With this queue a descheduled worker delays the caller by at most the
// item it holds, and a worker that wakes late finds the work done and leaves. Which thread runs an item never
// changes its result: the results do not depend on the threads.
constexpr double kMinParallelGemm = double(1 << 23);  // multiply-adds below which a GEMM runs on one thread
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>

namespace pyattn {
namespace cpu {

// Calls one item of a job per call: step(tid) returns false once no item is left to claim.
struct PoolJob {
  virtual bool step(int tid) = 0;
  virtual ~PoolJob() = default;
};

// Runs `job` on the caller (tid 0) and on up to nth - 1 pool workers (tids 1 .. nth-1) that are free to join, until
// its step() returns false; returns when no worker is inside a step of it. One process-wide pool, one job at a time:
// a second concurrent caller (or a forked child) runs its job alone on the calling thread.
void pool_run(int nth, PoolJob& job);

// Runs work(g, tid) for g in [0, total) on up to nth threads (tid < nth), items in any order and concurrently.
template <class Work>
void run_items(int nth, int64_t total, Work work) {
  if (total <= 0) return;
  if (nth <= 1 || total == 1) {
    for (int64_t g = 0; g < total; ++g) work(g, 0);
    return;
  }
  struct Job final : PoolJob {
    Work& work;
    int64_t total;
    std::atomic<int64_t> next{0};
    Job(Work& w, int64_t n) : work(w), total(n) {}
    bool step(int tid) override {
      const int64_t g = next.fetch_add(1, std::memory_order_relaxed);
      if (g >= total) return false;
      work(g, tid);
      return true;
    }
  } job(work, total);
  pool_run(int(std::min<int64_t>(nth, total)), job);
}

}  // namespace cpu
}  // namespace pyattn
