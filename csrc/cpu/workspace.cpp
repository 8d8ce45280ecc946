// Per-thread reusable workspace blocks (see pyattn/cpu_workspace.h).
#include "pyattn/cpu_workspace.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>

namespace pyattn {
namespace cpu {
namespace {

constexpr size_t kAlign = 64;

float* alloc_floats(size_t floats) {
  const size_t bytes = (floats * sizeof(float) + kAlign - 1) / kAlign * kAlign;
  void* p = std::aligned_alloc(kAlign, bytes == 0 ? kAlign : bytes);
  if (p == nullptr) throw std::bad_alloc();
  return static_cast<float*>(p);
}

// The calling thread's kept block.
struct Kept {
  float* p = nullptr;
  size_t floats = 0;
  bool busy = false;
  ~Kept() { std::free(p); }
};
thread_local Kept kept;

}  // namespace

Workspace::Workspace(size_t floats) : cap_(floats) {
  if (floats * sizeof(float) > kWorkspaceKeepBytes || kept.busy) {
    base_ = alloc_floats(floats);
    owned_ = true;
    return;
  }
  if (kept.floats < floats) {
    std::free(kept.p);
    kept.p = nullptr;
    kept.floats = 0;
    kept.p = alloc_floats(floats);
    kept.floats = floats;
  }
  kept.busy = true;
  base_ = kept.p;
}

Workspace::~Workspace() {
  if (owned_)
    std::free(base_);
  else
    kept.busy = false;
}

float* Workspace::take(size_t n) {
  const size_t r = round_floats(n);
  if (used_ + r > cap_) {
    std::fprintf(stderr, "pyattn: Workspace overrun (%zu + %zu > %zu floats)\n", used_, r, cap_);
    std::abort();
  }
  float* p = base_ + used_;
  used_ += r;
  return p;
}

float* Workspace::take_zeroed(size_t n) {
  float* p = take(n);
  std::memset(p, 0, n * sizeof(float));
  return p;
}

}  // namespace cpu
}  // namespace pyattn
