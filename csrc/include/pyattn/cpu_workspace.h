// Torch-free workspace for the temporaries of one CPU kernel call (implementation in csrc/cpu/workspace.cpp).
//
// Why not std::vector per call: glibc serves blocks of more than a few hundred KiB with mmap (or trims them off the
// heap top on free), so every call paid one page fault per 4 KiB of temporaries, and zeroing, again. Measured on an
// attention backward of B=8, H=8, L=64, D=64 on one thread: 6.4 ms with per-call vectors, 2.7 ms without the faults.
// A calling thread keeps one block and reuses it; the block grows to the largest request up to kWorkspaceKeepBytes
// and is kept for the thread's life. Bigger requests (where the call's own O(L^2) work dwarfs the faults) get a block
// of their own, freed with the Workspace. A Workspace made while another is alive on the same thread gets its own
// block too, so nesting is safe.
#pragma once

#include <cstddef>

namespace pyattn {
namespace cpu {

constexpr size_t kWorkspaceKeepBytes = size_t(256) << 20;  // what a thread keeps between calls, at most

class Workspace {
 public:
  // Room for `floats` floats, counted with round_floats() per take().
  explicit Workspace(size_t floats);
  ~Workspace();
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;

  // The next n floats, 64-byte aligned, uninitialised (take) or zeroed (take_zeroed). Aborts if the total taken
  // exceeds what the constructor was told.
  float* take(size_t n);
  float* take_zeroed(size_t n);

  // Floats one take(n) uses (n rounded up to whole 64-byte lines): sum these for the constructor.
  static constexpr size_t round_floats(size_t n) { return (n + 15) / 16 * 16; }

 private:
  float* base_ = nullptr;
  size_t cap_ = 0, used_ = 0;
  bool owned_ = false;  // a block of its own (too big to keep, or nested), freed by the destructor
};

}  // namespace cpu
}  // namespace pyattn
