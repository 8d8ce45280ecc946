// Torch-free parallel loop of the C++ CPU kernels (csrc/cpu/): run_items on the OpenMP team that torch's own CPU ops
// use (pyattn._C links the libgomp torch loaded), so pyattn's kernels and torch's never hold two sets of threads.
//
// Every parallel loop here is a set of independent items (GEMM blocks, GRU batch-row blocks, attention query blocks)
// claimed in order from one atomic counter: no static split, so a thread that starts late finds less work. Which
// thread runs an item never changes its result: the results do not depend on the thread count.
//
// Why not a pool of our own (what this was until 2026-11): between two ops of a model, torch's OpenMP threads spin
// waiting for their next region while a separate pool's workers spin waiting for theirs, and on a machine with as
// many cores as threads each set steals the other's cores. Measured on the 2-core development machine, torch.mm
// (64 x 128 x 128) followed by a causal attention forward (B=8, H=4, L=32, D=32): 47 + 76 us alone, 233-261 us
// back to back with the pool, 126 us on the shared team; GRU and attention timed alone were unchanged.
// Without OpenMP (a compiler without -fopenmp) the loop runs on the calling thread.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace pyattn {
namespace cpu {

// Runs work(g, tid) for g in [0, total) on up to nth threads (tid < nth), items in any order and concurrently.
template <class Work>
void run_items(int nth, int64_t total, Work work) {
  if (total <= 0) return;
  const int n = int(std::min<int64_t>(std::max(nth, 1), total));
#if defined(_OPENMP)
  if (n > 1) {
    std::atomic<int64_t> next{0};
#pragma omp parallel num_threads(n)
    {
      const int tid = omp_get_thread_num();
      for (int64_t g = next.fetch_add(1, std::memory_order_relaxed); g < total;
           g = next.fetch_add(1, std::memory_order_relaxed))
        work(g, tid);
    }
    return;
  }
#endif
  for (int64_t g = 0; g < total; ++g) work(g, 0);
}

}  // namespace cpu
}  // namespace pyattn
