// pyattn's CUDA emulator: the scheduler, warp collectives, cp.async and launches (see cuda_emu.h).
#include "cuda_emu.h"

#include <ucontext.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

namespace pyattn_emu {

namespace {
constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kDefaultSmemLimit = 48 * 1024;  // without cudaFuncAttributeMaxDynamicSharedMemorySize
constexpr size_t kSmemOptinLimit = 227 * 1024;   // sm_90

enum class State { Ready, AtBarrier, AtWarp, AtMbarrier, AtNamedBarrier, AtGrid, Done };
struct Copy {
  void* dst;
  const void* src;
};
struct BulkReduce {  // dst[i] += src[i], i < n
  float* dst;
  const float* src;
  uint32_t n;
};
}  // namespace

struct Thread {
  ucontext_t ctx;
  uint3 idx;
  int linear = 0;
  State state = State::Ready;
  const char* bar_file = "";  // where an AtBarrier / AtGrid thread waits
  int bar_line = 0;
  std::vector<Copy> pending;               // cp.async not yet committed
  std::vector<std::vector<Copy>> groups;  // committed, oldest first
  std::vector<BulkReduce> bulk_open;                  // bulk reductions not yet committed
  std::vector<std::vector<BulkReduce>> bulk_groups;  // committed, oldest first
  const uint64_t* waits_on = nullptr;     // the mbarrier an AtMbarrier thread waits on
  int named_bar = 0;                       // the named barrier an AtNamedBarrier thread waits on
};

struct NamedBarrier {
  int expected = 0, arrived = 0;
};

// The emulated cuTensorMapEncodeTiled's map, kept in CUtensorMap's 128 opaque bytes.
struct EmuTensorMap {
  uint64_t magic;
  const unsigned char* addr;
  uint32_t rank, esize, swizzle128, pad;
  uint32_t dims[5];
  uint64_t strides[4];  // bytes, dims 1..rank-1
  uint32_t box[5];
};
static_assert(sizeof(EmuTensorMap) <= sizeof(CUtensorMap), "fits the opaque map");
constexpr uint64_t kTensorMapMagic = 0x70796174746e6d61ull;

struct PendingTma {
  unsigned char* dst;
  EmuTensorMap map;
  int c[4];
};
struct Mbarrier {
  uint32_t count = 0, pending = 0, phase = 0;
  int64_t tx = 0;                 // bytes announced by expect_tx minus bytes written
  std::vector<PendingTma> copies;  // issued, not landed (late mode)
};

// One issued wgmma of a warp: what it reads and where its 32 lanes' accumulators are (executed at the wait_group
// that covers it: the latest moment hardware may finish it).
struct PendingWgmma {
  int n = 0, wq = 0;  // N, the warp's place in its warpgroup
  bool acc = false, trans_a = false, trans_b = false, bf16 = false, a_smem = false;
  uint64_t a_desc = 0, b_desc = 0;
  float* d[32] = {};
  uint32_t a[32][4] = {};
};

struct Warp {
  int size = 32, arrived = 0, exited = 0;
  Op op = Op::Shfl;
  uint64_t param = 0;
  uint64_t in[32][12];
  uint32_t out[32][4];
  std::vector<PendingWgmma> wgmma_open;                 // issued, not committed
  std::vector<std::vector<PendingWgmma>> wgmma_groups;  // committed, oldest first
};

struct Block {
  ucontext_t sched;
  std::vector<Thread> threads;
  std::vector<Warp> warps;
  uint3 idx;
  dim3 dim, grid;
  unsigned char* smem = nullptr;
  size_t smem_size = 0;
  const std::function<void()>* body = nullptr;
  bool failed = false;
  std::string error;
  std::map<const uint64_t*, Mbarrier> mbars;  // by address in shared memory
  NamedBarrier named[16];
  bool cooperative = false;  // in a cooperative launch (grid_sync allowed)
  std::vector<int> ready_ids;  // scratch of the random order
};

namespace {
void complete_if_done(const uint64_t* bar, Mbarrier& m);  // (mbarriers and bulk copies, below)
void land_copies(Mbarrier& m);
thread_local Block* g_block = nullptr;
thread_local std::vector<Block>* g_grid_blocks = nullptr;  // the running cooperative launch's blocks (block_smem)
thread_local Thread* g_thread = nullptr;
thread_local cudaError_t g_last_error = cudaSuccess;
thread_local std::string g_last_message;
std::map<const void*, int> g_max_dyn_smem;
long long g_counters[kNumCounters] = {};
std::vector<std::unique_ptr<char[]>> g_stacks;

std::string where(const Block& b, const Thread& t) {
  return "thread (" + std::to_string(t.idx.x) + ", " + std::to_string(t.idx.y) + ", " + std::to_string(t.idx.z) +
         ") of block (" + std::to_string(b.idx.x) + ", " + std::to_string(b.idx.y) + ", " + std::to_string(b.idx.z) +
         ")";
}
std::string where(const Thread& t) { return where(*g_block, t); }

void yield(State s) {
  Thread* t = g_thread;
  t->state = s;
  swapcontext(&t->ctx, &g_block->sched);
}

void run_copies(std::vector<Copy>& cs) {
  for (const Copy& c : cs) std::memcpy(c.dst, c.src, 16);
  cs.clear();
}

// A thread's groups of asynchronous operations (cp.async copies, bulk reductions): commit_group closes the open
// group; wait_groups runs (oldest first) all but the n most recent committed ones.
template <class Op>
void commit_group(std::vector<Op>& open, std::vector<std::vector<Op>>& groups) {
  groups.push_back(std::move(open));
  open.clear();
}
template <class Op>
void wait_groups(std::vector<std::vector<Op>>& groups, int n, void (*run)(std::vector<Op>&)) {
  while (static_cast<int>(groups.size()) > n) {
    run(groups.front());
    groups.erase(groups.begin());
  }
}

void fiber_main() {
  (*g_block->body)();
  Thread* t = g_thread;
  // copies still in flight complete after the thread (harmless; the kernel never waited for them)
  for (auto& g : t->groups) run_copies(g);
  run_copies(t->pending);
  bool bulk_in_flight = !t->bulk_open.empty();
  for (const auto& g : t->bulk_groups) bulk_in_flight |= !g.empty();
  if (bulk_in_flight)
    fail("a thread exited with bulk reductions not waited for (cp.async.bulk.wait_group.read)", __FILE__, __LINE__);
  Warp& w = g_block->warps[t->linear / 32];
  ++w.exited;
  if (!w.wgmma_open.empty() || !w.wgmma_groups.empty())
    fail("a lane exited with wgmma of its warp not waited for (wgmma.wait_group)", __FILE__, __LINE__);
  if (w.arrived > 0)
    fail("a lane exited while other lanes of its warp wait at a warp collective (full-mask shuffle/ldmatrix/mma)",
         __FILE__, __LINE__);
  t->state = State::Done;
  // returning switches to uc_link (the scheduler)
}

// Order in which a pass runs the ready threads: PYATTN_EMU_ORDER=forward (default) | reverse | random.
int order_mode() {
  const char* e = std::getenv("PYATTN_EMU_ORDER");
  if (e == nullptr || std::strcmp(e, "forward") == 0) return 0;
  if (std::strcmp(e, "reverse") == 0) return 1;
  return 2;
}

// Resets block b for a run of its threads: fibers on the stacks g_stacks[first_stack ..], fresh warps and barriers,
// dynamic shared memory filled with 0xff bytes.
void start_block(Block& b, size_t first_stack) {
  const int n = static_cast<int>(b.threads.size());
  for (int i = 0; i < n; ++i) {
    Thread& t = b.threads[i];
    t = Thread();
    t.linear = i;
    t.idx = uint3{unsigned(i % b.dim.x), unsigned((i / b.dim.x) % b.dim.y), unsigned(i / (b.dim.x * b.dim.y))};
    getcontext(&t.ctx);
    t.ctx.uc_stack.ss_sp = g_stacks[first_stack + i].get();
    t.ctx.uc_stack.ss_size = kStackBytes;
    t.ctx.uc_link = &b.sched;
    makecontext(&t.ctx, fiber_main, 0);
  }
  for (size_t w = 0; w < b.warps.size(); ++w) {
    b.warps[w] = Warp();
    b.warps[w].size = std::min(32, n - int(w) * 32);
  }
  if (b.smem_size > 0) std::memset(b.smem, 0xff, b.smem_size);
  b.mbars.clear();
  for (NamedBarrier& nb : b.named) nb = NamedBarrier();
  b.ready_ids.reserve(n);
}

// What step_block left the block at: Ran (it ran `picks` threads; more may be ready), Blocked (no thread can run
// until grid_sync releases: some wait there, the others have exited or wait elsewhere), Done (every thread exited),
// Failed (b.error says why).
enum class Step { Ran, Blocked, Done, Failed };

// Runs block b (g_block) until it is done, fails or waits at grid_sync, or, when picks >= 0, until it has run that
// many threads. Each pick runs one ready thread until it blocks: the lowest-numbered ready one (forward), the highest
// (reverse) or one drawn at random. Forward / reverse let a warp run as far ahead of the others as barriers allow.
// When no thread is ready: __syncthreads releases, late bulk copies land, or it is a deadlock (unless threads wait at
// grid_sync: the cooperative launch decides).
Step step_block(Block& b, int mode, std::mt19937& rng, int picks) {
  const int n = static_cast<int>(b.threads.size());
  std::vector<int>& ready_ids = b.ready_ids;
  int ran = 0;
  for (;;) {
    while (picks < 0 || ran < picks) {
      int pick = -1;
      if (mode == 2) {
        ready_ids.clear();
        for (int i = 0; i < n; ++i)
          if (b.threads[i].state == State::Ready) ready_ids.push_back(i);
        if (!ready_ids.empty()) pick = ready_ids[std::uniform_int_distribution<int>(0, int(ready_ids.size()) - 1)(rng)];
      } else {
        for (int k = 0; k < n && pick < 0; ++k) {
          const int i = mode == 1 ? n - 1 - k : k;
          if (b.threads[i].state == State::Ready) pick = i;
        }
      }
      if (pick < 0) break;
      Thread& t = b.threads[pick];
      g_thread = &t;
      swapcontext(&b.sched, &t.ctx);
      g_thread = nullptr;
      if (b.failed) return Step::Failed;
      ++ran;
    }
    if (ran == picks) return Step::Ran;
    int done = 0, ready = 0, at_barrier = 0, at_grid = 0;
    const Thread* first_bar = nullptr;
    for (const Thread& t : b.threads) {
      done += t.state == State::Done;
      ready += t.state == State::Ready;
      at_grid += t.state == State::AtGrid;
      if (t.state == State::AtBarrier) {
        ++at_barrier;
        if (first_bar == nullptr) first_bar = &t;
      }
    }
    if (done == n) {
      for (const auto& kv : b.mbars)
        if (!kv.second.copies.empty()) {
          b.error = "a bulk tensor copy was never waited for (its mbarrier's phase) when the block ended";
          return Step::Failed;
        }
      return Step::Done;
    }
    if (ready > 0) continue;
    if (at_barrier == n - done) {  // every live thread is at __syncthreads: release (exited threads count as there)
      for (Thread& t : b.threads) {
        if (t.state != State::AtBarrier) continue;
        if (t.bar_line != first_bar->bar_line || std::strcmp(t.bar_file, first_bar->bar_file) != 0) {
          b.error = "divergent __syncthreads: " + where(*first_bar) + " at " + first_bar->bar_file + ":" +
                    std::to_string(first_bar->bar_line) + ", " + where(t) + " at " + t.bar_file + ":" +
                    std::to_string(t.bar_line);
          return Step::Failed;
        }
        t.state = State::Ready;
      }
      continue;
    }
    // Late copies (PYATTN_EMU_CP_ASYNC=late) land when their barrier is waited on; a thread that began waiting
    // before the copy was issued is still waiting, and nothing else can run: the copies land now, the latest moment
    // the hardware may complete them, and wake it.
    bool landed = false;
    for (auto& kv : b.mbars)
      if (!kv.second.copies.empty()) {
        land_copies(kv.second);
        complete_if_done(kv.first, kv.second);
        landed = true;
      }
    if (landed) continue;
    if (at_grid > 0) return Step::Blocked;
    for (const Thread& t : b.threads)
      if (t.state == State::AtNamedBarrier) {
        b.error = "deadlock: " + where(t) + " waits at named barrier " + std::to_string(t.named_bar) +
                  " for arrivals that never come";
        return Step::Failed;
      }
    for (const Thread& t : b.threads)
      if (t.state == State::AtMbarrier) {
        b.error = "deadlock: " + where(t) + " waits on an mbarrier phase that never completes";
        return Step::Failed;
      }
    for (const Thread& t : b.threads)
      if (t.state == State::AtWarp) {
        b.error = "deadlock: " + where(t) + " waits at a warp collective while other lanes of its warp wait at "
                  "__syncthreads or have exited";
        return Step::Failed;
      }
    b.error = "deadlock";
    return Step::Failed;
  }
}

bool run_block(Block& b, int mode, std::mt19937& rng) {
  start_block(b, 0);
  return step_block(b, mode, rng, -1) == Step::Done;
}

// What a thread that keeps a grid_sync from releasing does, for the deadlock message.
std::string blocked_at(const Thread& t) {
  switch (t.state) {
    case State::Done:
      return "has exited";
    case State::AtBarrier:
      return std::string("waits at __syncthreads (") + t.bar_file + ":" + std::to_string(t.bar_line) + ")";
    case State::AtNamedBarrier:
      return "waits at named barrier " + std::to_string(t.named_bar);
    case State::AtMbarrier:
      return "waits on an mbarrier phase";
    case State::AtWarp:
      return "waits at a warp collective";
    default:
      return "is blocked";
  }
}
}  // namespace

uint3 thread_idx() { return g_thread->idx; }
uint3 block_idx() { return g_block->idx; }
dim3 block_dim() { return g_block->dim; }
dim3 grid_dim() { return g_block->grid; }
unsigned char* dynamic_smem() { return g_block->smem; }
bool in_dynamic_smem(const void* p, size_t bytes) {
  const auto* c = static_cast<const unsigned char*>(p);
  return g_block != nullptr && c >= g_block->smem && c + bytes <= g_block->smem + g_block->smem_size;
}

cudaError_t take_last_error() {
  const cudaError_t e = g_last_error;
  g_last_error = cudaSuccess;
  return e;
}
const char* last_error_message() { return g_last_message.c_str(); }
void set_max_dynamic_smem(const void* kernel, int bytes) { g_max_dyn_smem[kernel] = bytes; }

void fail(const char* what, const char* file, int line) {
  if (g_thread == nullptr || g_block == nullptr) {
    std::fprintf(stderr, "pyattn_emu: %s (%s:%d) outside a kernel\n", what, file, line);
    std::abort();
  }
  g_block->failed = true;
  g_block->error = std::string(what) + " (" + where(*g_thread) + ", " + file + ":" + std::to_string(line) + ")";
  swapcontext(&g_thread->ctx, &g_block->sched);  // never resumed
  std::abort();
}

void syncthreads(const char* file, int line) {
  g_thread->bar_file = file;
  g_thread->bar_line = line;
  yield(State::AtBarrier);
}

void grid_sync(const char* file, int line) {
  if (g_block == nullptr || !g_block->cooperative)
    fail("grid_sync outside a cooperative launch (cudaLaunchCooperativeKernel)", file, line);
  g_thread->bar_file = file;
  g_thread->bar_line = line;
  yield(State::AtGrid);
}

unsigned char* block_smem(unsigned rank, const char* file, int line) {
  if (g_block == nullptr || !g_block->cooperative || g_grid_blocks == nullptr)
    fail("distributed shared memory outside a cooperative launch (the emulator's stand-in for a cluster)", file, line);
  if (rank >= g_grid_blocks->size()) fail("distributed shared memory of a block past the grid", file, line);
  return (*g_grid_blocks)[rank].smem;
}

void check_launch_bounds(long long max_threads, const char* file, int line) {
  const dim3 d = g_block->dim;
  const long long n = static_cast<long long>(d.x) * d.y * d.z;
  if (n > max_threads) {
    const std::string m = "launch with " + std::to_string(n) + " threads per block exceeds the kernel's "
                          "__launch_bounds__(" + std::to_string(max_threads) + ")";
    fail(m.c_str(), file, line);
  }
}

const long long* counters() { return g_counters; }
void reset_counters() { std::fill(g_counters, g_counters + kNumCounters, 0LL); }

void check_full_mask(unsigned mask, const char* what, const char* file, int line) {
  if (mask != 0xffffffffu) {
    const std::string m = std::string(what) + " with a partial mask: the emulator takes full warps only";
    fail(m.c_str(), file, line);
  }
}

void warp_collective(Op op, uint64_t param, const uint64_t (&in)[12], uint32_t (&out)[4], Collective fn) {
  Thread* t = g_thread;
  Warp& w = g_block->warps[t->linear / 32];
  const int lane = t->linear % 32;
  if (w.size != 32) fail("warp collective in a partial warp (block size not a multiple of 32)", __FILE__, __LINE__);
  if (w.exited > 0) fail("warp collective after lanes of the warp exited", __FILE__, __LINE__);
  if (w.arrived == 0) {
    w.op = op;
    w.param = param;
  } else if (w.op != op || w.param != param) {
    fail("lanes of one warp at different warp collectives", __FILE__, __LINE__);
  }
  std::memcpy(w.in[lane], in, sizeof(in));
  if (++w.arrived == 32) {
    fn(w.in, w.out, param);
    w.arrived = 0;
    for (int l = 0; l < 32; ++l) {
      Thread& o = g_block->threads[(t->linear / 32) * 32 + l];
      if (&o != t) o.state = State::Ready;
    }
  } else {
    yield(State::AtWarp);
  }
  std::memcpy(out, w.out[lane], sizeof(out));
}

void shfl_collective(int mode, int arg, const uint64_t (&in)[12], uint32_t (&out)[4]) {
  uint64_t v[12] = {in[0], static_cast<uint64_t>(static_cast<uint32_t>(arg))};
  warp_collective(Op::Shfl, static_cast<uint64_t>(mode), v, out,
                  [](const uint64_t (*i)[12], uint32_t (*o)[4], uint64_t m) {
                    for (int l = 0; l < 32; ++l) {
                      const int a = static_cast<int>(static_cast<uint32_t>(i[l][1]));
                      int src = m == 0 ? (l ^ a) : m == 1 ? (a & 31) : l + a;
                      if (src < 0 || src >= 32) src = l;  // out of range: own value (also for a mask >= 32)
                      o[l][0] = static_cast<uint32_t>(i[src][0]);
                      o[l][1] = static_cast<uint32_t>(i[src][0] >> 32);
                    }
                  });
}

void ldmatrix_x4(uint32_t (&r)[4], const void* p, bool trans) {
  uint64_t in[12] = {reinterpret_cast<uintptr_t>(p)};
  warp_collective(trans ? Op::LdsmTrans : Op::Ldsm, 0, in, r,
                  [](const uint64_t (*i)[12], uint32_t (*o)[4], uint64_t) {
                    const bool tr = g_block->warps[g_thread->linear / 32].op == Op::LdsmTrans;
                    uint16_t m[4][8][8];
                    for (int mat = 0; mat < 4; ++mat) {
                      // one phase per matrix: its 8 rows take as many wavefronts as the most rows (distinct
                      // addresses) that share a 16-byte bank group (address / 16 mod 8)
                      uintptr_t seen[8][8];
                      int count[8] = {};
                      int wavefronts = 1;
                      for (int row = 0; row < 8; ++row) {
                        const uintptr_t a = static_cast<uintptr_t>(i[8 * mat + row][0]);
                        const int g = static_cast<int>((a / 16) % 8);
                        bool dup = false;
                        for (int k = 0; k < count[g]; ++k) dup |= seen[g][k] == a;
                        if (!dup) seen[g][count[g]++] = a;
                        wavefronts = std::max(wavefronts, count[g]);
                      }
                      g_counters[kLdsmPhases] += 1;
                      g_counters[kLdsmWavefronts] += wavefronts;
                      for (int row = 0; row < 8; ++row) {
                        const void* a = reinterpret_cast<const void*>(i[8 * mat + row][0]);
                        if (reinterpret_cast<uintptr_t>(a) % 16 != 0)
                          fail("ldmatrix: row address not 16-byte aligned", __FILE__, __LINE__);
                        if (!in_dynamic_smem(a, 16))
                          fail("ldmatrix: row address outside the block's shared memory", __FILE__, __LINE__);
                        std::memcpy(m[mat][row], a, 16);
                      }
                    }
                    for (int l = 0; l < 32; ++l) {
                      const int g = l / 4, t = l % 4;
                      for (int mat = 0; mat < 4; ++mat) {
                        const uint16_t lo = tr ? m[mat][2 * t][g] : m[mat][g][2 * t];
                        const uint16_t hi = tr ? m[mat][2 * t + 1][g] : m[mat][g][2 * t + 1];
                        o[l][mat] = uint32_t(lo) | (uint32_t(hi) << 16);
                      }
                    }
                  });
}

// One 16-bit element of a wgmma shared-memory operand: (row, col) of the canonical layout the descriptor describes,
// at the pre-swizzle byte address `logical` (shared-window offset); the 128-byte swizzle XORs address bits [4, 7)
// with bits [7, 10).
static uint16_t wgmma_smem_elem(uint64_t logical) {
  const uint64_t phys = logical ^ (((logical >> 7) & 7u) << 4);
  const unsigned char* p = dynamic_smem() + phys;
  if (!in_dynamic_smem(p, 2)) fail("wgmma: operand element outside the block's shared memory", __FILE__, __LINE__);
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

struct WgmmaDesc {
  uint64_t start, lbo, sbo;  // bytes
};
static WgmmaDesc wgmma_decode(uint64_t desc) {
  if ((desc >> 62) != 1u) fail("wgmma: the emulator takes 128-byte-swizzle descriptors only", __FILE__, __LINE__);
  if (((desc >> 49) & 7u) != 0u) fail("wgmma: descriptor base offset != 0", __FILE__, __LINE__);
  return WgmmaDesc{(desc & 0x3FFFu) << 4, ((desc >> 16) & 0x3FFFu) << 4, ((desc >> 32) & 0x3FFFu) << 4};
}

static void wgmma_execute(const PendingWgmma& w) {
  const int N = w.n;
  auto cv = [&w](uint16_t h) { return w.bf16 ? bf16_to_float(h) : half_to_float(h); };
  float A[16][16];
  if (w.a_smem) {  // K-major: (row m, k) at start + (m / 8) SBO + (m % 8) 128 + 2 k;
                   // M-major: (m, k) at start + (m / 64) LBO + (k / 8) SBO + (k % 8) 128 + 2 (m % 64) (B's N-major)
    const WgmmaDesc da = wgmma_decode(w.a_desc);
    for (int r = 0; r < 16; ++r)
      for (int k = 0; k < 16; ++k) {
        const uint64_t m = 16 * w.wq + r;
        const uint64_t addr = w.trans_a ? da.start + (m / 64) * da.lbo + uint64_t(k / 8) * da.sbo +
                                              uint64_t(k % 8) * 128 + 2 * (m % 64)
                                        : da.start + (m / 8) * da.sbo + (m % 8) * 128 + 2 * uint64_t(k);
        A[r][k] = cv(wgmma_smem_elem(addr));
      }
  } else {
    for (int l = 0; l < 32; ++l) {
      const int g = l / 4, t = l % 4;
      for (int h = 0; h < 2; ++h) {
        A[g][2 * t + h] = cv(uint16_t(w.a[l][0] >> (16 * h)));
        A[g + 8][2 * t + h] = cv(uint16_t(w.a[l][1] >> (16 * h)));
        A[g][2 * t + 8 + h] = cv(uint16_t(w.a[l][2] >> (16 * h)));
        A[g + 8][2 * t + 8 + h] = cv(uint16_t(w.a[l][3] >> (16 * h)));
      }
    }
  }
  // B (16 x N): K-major (n, k) at start + (n / 8) SBO + (n % 8) 128 + 2 k;
  //             N-major (k, n) at start + (n / 64) LBO + (k / 8) SBO + (k % 8) 128 + 2 (n % 64)
  const WgmmaDesc db = wgmma_decode(w.b_desc);
  std::vector<float> B(size_t(16) * N);
  for (int k = 0; k < 16; ++k)
    for (int c = 0; c < N; ++c) {
      const uint64_t addr = w.trans_b ? db.start + uint64_t(c / 64) * db.lbo + uint64_t(k / 8) * db.sbo +
                                            uint64_t(k % 8) * 128 + 2 * uint64_t(c % 64)
                                      : db.start + uint64_t(c / 8) * db.sbo + uint64_t(c % 8) * 128 + 2 * uint64_t(k);
      B[size_t(k) * N + c] = cv(wgmma_smem_elem(addr));
    }
  for (int l = 0; l < 32; ++l) {
    float* dl = w.d[l];
    const int g = l / 4, t = l % 4;
    for (int j = 0; j < N / 8; ++j)
      for (int e = 0; e < 4; ++e) {
        const int r = g + 8 * (e >> 1), c = 8 * j + 2 * t + (e & 1);
        double s = 0.0;
        for (int k = 0; k < 16; ++k) s += double(A[r][k]) * double(B[size_t(k) * N + c]);
        dl[4 * j + e] = static_cast<float>(w.acc ? s + double(dl[4 * j + e]) : s);
      }
  }
}

void wgmma_m64k16(float* d, int n, const uint32_t* a, uint64_t a_desc, uint64_t b_desc, bool scale_d, bool trans_b,
                  bool bf16, bool trans_a) {
  if (trans_a && a != nullptr) fail("wgmma: a transposed A must come from shared memory", __FILE__, __LINE__);
  if (n % 8 != 0 || n < 8 || n > 256) fail("wgmma: N must be a multiple of 8 in [8, 256]", __FILE__, __LINE__);
  if (g_block->warps.size() % 4 != 0) fail("wgmma: the block is not whole warpgroups", __FILE__, __LINE__);
  uint64_t in[12] = {reinterpret_cast<uintptr_t>(d), a ? a[0] : 0u, a ? a[1] : 0u, a ? a[2] : 0u, a ? a[3] : 0u,
                     a_desc, b_desc};
  const uint64_t param = uint64_t(n) | (uint64_t(scale_d) << 16) | (uint64_t(trans_b) << 17) |
                         (uint64_t(bf16) << 18) | (uint64_t(a == nullptr) << 19) | (uint64_t(trans_a) << 20);
  uint32_t out[4];
  warp_collective(Op::Wgmma, param, in, out, [](const uint64_t (*i)[12], uint32_t (*)[4], uint64_t prm) {
    PendingWgmma w;
    w.n = int(prm & 0xffffu);
    w.acc = (prm >> 16) & 1u;
    w.trans_b = (prm >> 17) & 1u;
    w.trans_a = (prm >> 20) & 1u;
    w.bf16 = (prm >> 18) & 1u;
    w.a_smem = (prm >> 19) & 1u;
    w.wq = int((g_thread->linear / 32) % 4);  // the warp's place in its warpgroup: rows 16 wq..
    w.a_desc = i[0][5];
    w.b_desc = i[0][6];
    for (int l = 0; l < 32; ++l) {
      if (i[l][6] != w.b_desc || (w.a_smem && i[l][5] != w.a_desc))
        fail("wgmma: lanes of one warp with different descriptors", __FILE__, __LINE__);
      w.d[l] = reinterpret_cast<float*>(static_cast<uintptr_t>(i[l][0]));
      for (int r = 0; r < 4; ++r) w.a[l][r] = static_cast<uint32_t>(i[l][1 + r]);
    }
    wgmma_decode(w.b_desc);  // a bad descriptor fails at issue
    if (w.a_smem) wgmma_decode(w.a_desc);
    g_counters[kWgmma] += 1;
    g_block->warps[g_thread->linear / 32].wgmma_open.push_back(w);
  });
}

void wgmma_commit() {
  uint64_t in[12] = {};
  uint32_t out[4];
  warp_collective(Op::WgmmaCommit, 0, in, out, [](const uint64_t (*)[12], uint32_t (*)[4], uint64_t) {
    Warp& w = g_block->warps[g_thread->linear / 32];
    w.wgmma_groups.push_back(std::move(w.wgmma_open));
    w.wgmma_open.clear();
  });
}

void wgmma_wait(int n) {
  uint64_t in[12] = {};
  uint32_t out[4];
  warp_collective(Op::WgmmaWait, uint64_t(n), in, out, [](const uint64_t (*)[12], uint32_t (*)[4], uint64_t keep) {
    Warp& w = g_block->warps[g_thread->linear / 32];
    while (w.wgmma_groups.size() > keep) {
      for (const PendingWgmma& op : w.wgmma_groups.front()) wgmma_execute(op);
      w.wgmma_groups.erase(w.wgmma_groups.begin());
    }
  });
}

void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16) {
  uint64_t in[12] = {a[0], a[1], a[2], a[3], b0, b1, f2u(c[0]), f2u(c[1]), f2u(c[2]), f2u(c[3])};
  uint32_t out[4];
  warp_collective(bf16 ? Op::MmaBF16 : Op::MmaF16, 0, in, out,
                  [](const uint64_t (*i)[12], uint32_t (*o)[4], uint64_t) {
                    const bool bf = g_block->warps[g_thread->linear / 32].op == Op::MmaBF16;
                    auto cv = [bf](uint64_t w, int half) {
                      const uint16_t h = static_cast<uint16_t>(w >> (16 * half));
                      return bf ? bf16_to_float(h) : half_to_float(h);
                    };
                    float A[16][16], B[16][8], C[16][8];
                    for (int l = 0; l < 32; ++l) {
                      const int g = l / 4, t = l % 4;
                      for (int h = 0; h < 2; ++h) {
                        A[g][2 * t + h] = cv(i[l][0], h);
                        A[g + 8][2 * t + h] = cv(i[l][1], h);
                        A[g][2 * t + 8 + h] = cv(i[l][2], h);
                        A[g + 8][2 * t + 8 + h] = cv(i[l][3], h);
                        B[2 * t + h][g] = cv(i[l][4], h);
                        B[2 * t + 8 + h][g] = cv(i[l][5], h);
                        C[g][2 * t + h] = u2f(static_cast<uint32_t>(i[l][6 + h]));
                        C[g + 8][2 * t + h] = u2f(static_cast<uint32_t>(i[l][8 + h]));
                      }
                    }
                    float D[16][8];
                    for (int r = 0; r < 16; ++r)
                      for (int n = 0; n < 8; ++n) {
                        double s = 0.0;
                        for (int k = 0; k < 16; ++k) s += double(A[r][k]) * double(B[k][n]);
                        D[r][n] = static_cast<float>(s + double(C[r][n]));
                      }
                    for (int l = 0; l < 32; ++l) {
                      const int g = l / 4, t = l % 4;
                      o[l][0] = f2u(D[g][2 * t]);
                      o[l][1] = f2u(D[g][2 * t + 1]);
                      o[l][2] = f2u(D[g + 8][2 * t]);
                      o[l][3] = f2u(D[g + 8][2 * t + 1]);
                    }
                  });
  for (int k = 0; k < 4; ++k) c[k] = u2f(out[k]);
}

// PYATTN_EMU_CP_ASYNC=late (default): a copy lands at the cp.async.wait_group that covers it, the latest moment
// hardware may complete it (a read before the wait sees stale data); early: at issue, the earliest (a copy issued
// into memory other threads still read shows up). Read once per launch.
bool g_cp_async_early = false;

void cp_async16(void* smem, const void* gmem) {
  if (reinterpret_cast<uintptr_t>(smem) % 16 != 0 || reinterpret_cast<uintptr_t>(gmem) % 16 != 0)
    fail("cp.async (16 bytes): source or destination not 16-byte aligned", __FILE__, __LINE__);
  if (!in_dynamic_smem(smem, 16)) fail("cp.async: destination outside the block's shared memory", __FILE__, __LINE__);
  if (g_cp_async_early)
    std::memcpy(smem, gmem, 16);
  else
    g_thread->pending.push_back(Copy{smem, gmem});
}
void cp_async_commit() { commit_group(g_thread->pending, g_thread->groups); }
void cp_async_wait(int n) { wait_groups(g_thread->groups, n, run_copies); }

// ---- mbarriers and bulk tensor copies ---------------------------------------------------------------------------
namespace {
Mbarrier& mbar_of(const uint64_t* bar, const char* what) {
  if (!in_dynamic_smem(bar, 8) || reinterpret_cast<uintptr_t>(bar) % 8 != 0)
    fail((std::string(what) + ": mbarrier not an 8-byte-aligned shared-memory address").c_str(), __FILE__, __LINE__);
  auto it = g_block->mbars.find(bar);
  if (it == g_block->mbars.end())
    fail((std::string(what) + ": mbarrier used before mbarrier.init").c_str(), __FILE__, __LINE__);
  return it->second;
}

void complete_if_done(const uint64_t* bar, Mbarrier& m) {
  if (m.pending != 0 || m.tx != 0) return;
  m.phase ^= 1u;
  m.pending = m.count;
  for (Thread& t : g_block->threads)
    if (t.state == State::AtMbarrier && t.waits_on == bar) t.state = State::Ready;
}

// One box: element (i0, i1, i2, i3) of the box from global coordinates c + i (zero outside the tensor) to
// dst + ((i3 box2 + i2) box1 + i1) rowbytes + i0 esize, through the 128-byte swizzle of the shared-window address.
void tma_copy(const PendingTma& c) {
  const EmuTensorMap& m = c.map;
  const uint32_t b0 = m.box[0], b1 = m.rank > 1 ? m.box[1] : 1, b2 = m.rank > 2 ? m.box[2] : 1,
                 b3 = m.rank > 3 ? m.box[3] : 1;
  const uint64_t row_bytes = uint64_t(b0) * m.esize, base = uint64_t(c.dst - dynamic_smem());
  for (uint32_t i3 = 0; i3 < b3; ++i3)
    for (uint32_t i2 = 0; i2 < b2; ++i2)
      for (uint32_t i1 = 0; i1 < b1; ++i1)
        for (uint32_t i0 = 0; i0 < b0; ++i0) {
          const int64_t g[4] = {int64_t(c.c[0]) + i0, int64_t(c.c[1]) + i1, int64_t(c.c[2]) + i2, int64_t(c.c[3]) + i3};
          bool inside = true;
          uint64_t off = 0;
          for (uint32_t d = 0; d < m.rank; ++d) {
            inside &= g[d] >= 0 && g[d] < int64_t(m.dims[d]);
            off += d == 0 ? uint64_t(g[0]) * m.esize : uint64_t(g[d]) * m.strides[d - 1];
          }
          uint64_t dst = base + ((uint64_t(i3) * b2 + i2) * b1 + i1) * row_bytes + uint64_t(i0) * m.esize;
          if (m.swizzle128) dst ^= ((dst >> 7) & 7u) << 4;
          unsigned char* p = dynamic_smem() + dst;
          if (!in_dynamic_smem(p, m.esize)) fail("cp.async.bulk.tensor: box outside shared memory", __FILE__, __LINE__);
          if (inside)
            std::memcpy(p, m.addr + off, m.esize);
          else
            std::memset(p, 0, m.esize);
        }
}

uint64_t box_bytes(const EmuTensorMap& m) {
  uint64_t n = m.esize;
  for (uint32_t d = 0; d < m.rank; ++d) n *= m.box[d];
  return n;
}

void land_copies(Mbarrier& m) {
  for (const PendingTma& c : m.copies) {
    tma_copy(c);
    m.tx -= int64_t(box_bytes(c.map));
  }
  m.copies.clear();
}
}  // namespace

namespace {
// One thread's arrival at named barrier id (expecting n threads in all): true when it completed the phase.
bool named_arrive(int id, int n, const char* what) {
  if (id < 1 || id > 15 || n <= 0 || n % 32 != 0 || n > int(g_block->threads.size()))
    fail((std::string(what) + ": barrier id must be 1..15 and the thread count a multiple of 32 within the block")
             .c_str(),
         __FILE__, __LINE__);
  NamedBarrier& nb = g_block->named[id];
  if (nb.arrived > 0 && nb.expected != n)
    fail((std::string(what) + ": threads of one phase disagree on the barrier's thread count").c_str(), __FILE__,
         __LINE__);
  nb.expected = n;
  if (++nb.arrived < n) return false;
  nb.arrived = 0;
  for (Thread& t : g_block->threads)
    if (t.state == State::AtNamedBarrier && t.named_bar == id) t.state = State::Ready;
  return true;
}
}  // namespace

void bar_sync(int id, int n) {
  if (named_arrive(id, n, "bar.sync")) return;
  g_thread->named_bar = id;
  yield(State::AtNamedBarrier);
}

void bar_arrive(int id, int n) { named_arrive(id, n, "bar.arrive"); }

void mbar_init(uint64_t* bar, uint32_t count) {
  if (!in_dynamic_smem(bar, 8) || reinterpret_cast<uintptr_t>(bar) % 8 != 0)
    fail("mbarrier.init: not an 8-byte-aligned shared-memory address", __FILE__, __LINE__);
  if (count == 0) fail("mbarrier.init: count 0", __FILE__, __LINE__);
  Mbarrier m;
  m.count = m.pending = count;
  g_block->mbars[bar] = m;
}

void mbar_arrive(uint64_t* bar, uint32_t tx_bytes) {
  Mbarrier& m = mbar_of(bar, "mbarrier.arrive");
  if (m.pending == 0) fail("mbarrier.arrive: more arrivals than the barrier's count in one phase", __FILE__, __LINE__);
  m.tx += tx_bytes;
  m.pending -= 1;
  complete_if_done(bar, m);
}

void mbar_wait(uint64_t* bar, uint32_t parity) {
  for (;;) {
    Mbarrier& m = mbar_of(bar, "mbarrier.try_wait");
    if (!g_cp_async_early && !m.copies.empty()) {  // late: the copies land when their barrier is waited on
      land_copies(m);
      complete_if_done(bar, m);
    }
    if ((m.phase & 1u) != (parity & 1u)) return;  // the phase of this parity has completed
    g_thread->waits_on = bar;
    yield(State::AtMbarrier);
  }
}

void tma_load_4d(void* dst, const CUtensorMap* map, uint64_t* bar, int c0, int c1, int c2, int c3) {
  PendingTma c;
  std::memcpy(&c.map, map, sizeof(EmuTensorMap));
  if (c.map.magic != kTensorMapMagic || c.map.rank != 4)
    fail("cp.async.bulk.tensor.4d: not a 4-D tensor map of the emulated cuTensorMapEncodeTiled", __FILE__, __LINE__);
  c.dst = static_cast<unsigned char*>(dst);
  if (!in_dynamic_smem(dst, 1) || (c.dst - dynamic_smem()) % (c.map.swizzle128 ? 1024 : 128) != 0)
    fail("cp.async.bulk.tensor: destination not in shared memory or misaligned (128 bytes; 1024 for the 128-byte "
         "swizzle)", __FILE__, __LINE__);
  c.c[0] = c0;
  c.c[1] = c1;
  c.c[2] = c2;
  c.c[3] = c3;
  Mbarrier& m = mbar_of(bar, "cp.async.bulk.tensor");
  if (g_cp_async_early) {
    tma_copy(c);
    m.tx -= int64_t(box_bytes(c.map));
    complete_if_done(bar, m);
  } else {
    m.copies.push_back(c);
  }
}

namespace {
void run_reductions(std::vector<BulkReduce>& rs) {
  for (const BulkReduce& r : rs)
    for (uint32_t i = 0; i < r.n; ++i) r.dst[i] += r.src[i];
  rs.clear();
}
}  // namespace

void bulk_reduce_add_f32(float* gdst, const float* ssrc, uint32_t bytes) {
  if (bytes == 0 || bytes % 16 != 0 || reinterpret_cast<uintptr_t>(gdst) % 16 != 0 ||
      reinterpret_cast<uintptr_t>(ssrc) % 16 != 0)
    fail("cp.reduce.async.bulk: size not a positive multiple of 16 bytes or an address not 16-byte aligned", __FILE__,
         __LINE__);
  if (!in_dynamic_smem(ssrc, bytes))
    fail("cp.reduce.async.bulk: source outside the block's shared memory", __FILE__, __LINE__);
  std::vector<BulkReduce> one{BulkReduce{gdst, ssrc, bytes / 4}};
  if (g_cp_async_early)
    run_reductions(one);
  else
    g_thread->bulk_open.push_back(one[0]);
}
void bulk_commit() { commit_group(g_thread->bulk_open, g_thread->bulk_groups); }
void bulk_wait_read(int n) { wait_groups(g_thread->bulk_groups, n, run_reductions); }

CUresult encode_tiled(CUtensorMap* map, CUtensorMapDataType dtype, cuuint32_t rank, void* addr, const cuuint64_t* dims,
                      const cuuint64_t* strides, const cuuint32_t* box, const cuuint32_t* elem_strides,
                      CUtensorMapInterleave interleave, CUtensorMapSwizzle swizzle, CUtensorMapL2promotion,
                      CUtensorMapFloatOOBfill) {
  EmuTensorMap m{};
  m.magic = kTensorMapMagic;
  m.addr = static_cast<const unsigned char*>(addr);
  m.rank = rank;
  m.esize = dtype == CU_TENSOR_MAP_DATA_TYPE_FLOAT16 || dtype == CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 ? 2 : 0;
  m.swizzle128 = swizzle == CU_TENSOR_MAP_SWIZZLE_128B;
  if (m.esize == 0 || rank < 1 || rank > 5 || reinterpret_cast<uintptr_t>(addr) % 16 != 0 ||
      interleave != CU_TENSOR_MAP_INTERLEAVE_NONE || (swizzle != CU_TENSOR_MAP_SWIZZLE_NONE && !m.swizzle128))
    return CUDA_ERROR_INVALID_VALUE;
  for (uint32_t d = 0; d < rank; ++d) {
    if (dims[d] == 0 || dims[d] > (1ull << 32) || box[d] == 0 || box[d] > 256 || elem_strides[d] != 1)
      return CUDA_ERROR_INVALID_VALUE;
    m.dims[d] = uint32_t(dims[d]);
    m.box[d] = box[d];
    if (d > 0) {
      if (strides[d - 1] == 0 || strides[d - 1] % 16 != 0 || strides[d - 1] >= (1ull << 40))
        return CUDA_ERROR_INVALID_VALUE;
      m.strides[d - 1] = strides[d - 1];
    }
  }
  if ((uint64_t(box[0]) * m.esize) % 16 != 0 || (m.swizzle128 && uint64_t(box[0]) * m.esize != 128))
    return CUDA_ERROR_INVALID_VALUE;
  std::memset(map, 0, sizeof(CUtensorMap));
  std::memcpy(map, &m, sizeof(m));
  return CUDA_SUCCESS;
}

namespace {
cudaError_t refuse(cudaError_t e, const std::string& m) {
  if (g_last_error == cudaSuccess) g_last_error = e;
  g_last_message = m;
  return e;
}

// The checks of every launch: configuration and dynamic shared memory.
cudaError_t check_launch(const void* kernel, dim3 grid, dim3 block, size_t smem) {
  const uint64_t nthreads = uint64_t(block.x) * block.y * block.z;
  if (nthreads == 0 || nthreads > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535)
    return refuse(cudaErrorInvalidConfiguration,
                  "invalid launch configuration: grid (" + std::to_string(grid.x) + ", " + std::to_string(grid.y) +
                      ", " + std::to_string(grid.z) + "), block (" + std::to_string(block.x) + ", " +
                      std::to_string(block.y) + ", " + std::to_string(block.z) + ")");
  size_t limit = kDefaultSmemLimit;
  auto it = g_max_dyn_smem.find(kernel);
  if (it != g_max_dyn_smem.end()) limit = std::max(limit, size_t(it->second));
  if (smem > std::min(limit, kSmemOptinLimit))
    return refuse(cudaErrorInvalidValue, "launch with " + std::to_string(smem) +
                                             " bytes of dynamic shared memory; the kernel's limit is " +
                                             std::to_string(limit) + " (cudaFuncAttributeMaxDynamicSharedMemorySize)");
  return cudaSuccess;
}

using SmemBuffer = std::unique_ptr<void, void (*)(void*)>;

// Exactly `smem` bytes, 128-byte aligned: under AddressSanitizer (scripts/cuda_emu.py --memcheck) the first byte past
// the end is a redzone. Null when out of memory.
SmemBuffer alloc_smem(size_t smem) {
  void* raw = nullptr;
  if (posix_memalign(&raw, 128, smem > 0 ? smem : 1) != 0) raw = nullptr;
  return SmemBuffer(raw, std::free);
}

// What every launch reads from the environment and counts; returns the thread order (order_mode()).
int begin_launch(dim3 grid, size_t smem, std::mt19937& rng) {
  const char* cp = std::getenv("PYATTN_EMU_CP_ASYNC");
  g_cp_async_early = cp != nullptr && std::strcmp(cp, "early") == 0;
  const char* seed = std::getenv("PYATTN_EMU_SEED");
  rng.seed(seed != nullptr ? static_cast<unsigned>(std::atoi(seed)) : 1234u);
  g_counters[kLaunches] += 1;
  g_counters[kBlocks] += static_cast<long long>(grid.x) * grid.y * grid.z;
  g_counters[kMaxDynamicSmem] = std::max(g_counters[kMaxDynamicSmem], static_cast<long long>(smem));
  return order_mode();
}
}  // namespace

cudaError_t run_grid(const void* kernel, dim3 grid, dim3 block, size_t smem, const std::function<void()>& body) {
  const cudaError_t checked = check_launch(kernel, grid, block, smem);
  if (checked != cudaSuccess) return checked;
  const uint64_t nthreads = uint64_t(block.x) * block.y * block.z;
  while (g_stacks.size() < nthreads) g_stacks.emplace_back(new char[kStackBytes]);
  SmemBuffer smem_buf = alloc_smem(smem);
  if (smem_buf == nullptr) return refuse(cudaErrorLaunchFailure, "out of memory");
  Block b;
  b.threads.resize(nthreads);
  b.warps.resize((nthreads + 31) / 32);
  b.dim = block;
  b.grid = grid;
  b.smem = static_cast<unsigned char*>(smem_buf.get());
  b.smem_size = smem;
  b.body = &body;
  std::mt19937 rng;
  const int mode = begin_launch(grid, smem, rng);
  Block* const outer = g_block;
  g_block = &b;
  bool ok = true;
  for (unsigned z = 0; z < grid.z && ok; ++z)
    for (unsigned y = 0; y < grid.y && ok; ++y)
      for (unsigned x = 0; x < grid.x && ok; ++x) {
        b.idx = uint3{x, y, z};
        ok = run_block(b, mode, rng);
      }
  g_block = outer;
  if (!ok) return refuse(cudaErrorLaunchFailure, "kernel failed in the emulator: " + b.error);
  return cudaSuccess;
}

// All blocks at once: each has its threads' fibers (stacks g_stacks[k n ..] for block k), warps, barriers and shared
// memory. Forward / reverse run the blocks in increasing / decreasing order, each until it is done or waits at
// grid_sync (step_block); random runs one thread of a random unfinished block at a time. When no block can run,
// grid_sync releases if every thread of the grid waits there at one line; anything else is a deadlock.
cudaError_t run_cooperative(const void* kernel, dim3 grid, dim3 block, size_t smem,
                            const std::function<void()>& body) {
  const cudaError_t checked = check_launch(kernel, grid, block, smem);
  if (checked != cudaSuccess) return checked;
  const uint64_t nthreads = uint64_t(block.x) * block.y * block.z;
  const uint64_t nblocks = uint64_t(grid.x) * grid.y * grid.z;
  int per_sm = 0;
  max_active_blocks(&per_sm, int(nthreads), smem);
  uint64_t resident = uint64_t(std::max(sm_count(), 0)) * uint64_t(per_sm);
  // PYATTN_EMU_COOP_LIMIT: fewer co-resident blocks than the occupancy model says (as when other work or an MPS
  // share holds SMs), so that tests reach a caller's handling of cudaErrorCooperativeLaunchTooLarge
  const char* limit = std::getenv("PYATTN_EMU_COOP_LIMIT");
  if (limit != nullptr) resident = std::min<uint64_t>(resident, uint64_t(std::max(std::atoi(limit), 0)));
  if (nblocks > resident)
    return refuse(cudaErrorCooperativeLaunchTooLarge,
                  "cooperative launch of " + std::to_string(nblocks) + " blocks: at most " + std::to_string(resident) +
                      " can be co-resident (" + std::to_string(sm_count()) + " SMs x " + std::to_string(per_sm) +
                      " blocks of " + std::to_string(nthreads) + " threads and " + std::to_string(smem) +
                      " bytes of dynamic shared memory an SM, cudaOccupancyMaxActiveBlocksPerMultiprocessor" +
                      (limit != nullptr ? ", PYATTN_EMU_COOP_LIMIT)" : ")"));
  while (g_stacks.size() < nblocks * nthreads) g_stacks.emplace_back(new char[kStackBytes]);
  std::vector<SmemBuffer> smem_bufs;
  std::vector<Block> blocks(nblocks);
  for (uint64_t k = 0; k < nblocks; ++k) {
    smem_bufs.push_back(alloc_smem(smem));
    if (smem_bufs.back() == nullptr) return refuse(cudaErrorLaunchFailure, "out of memory");
    Block& b = blocks[k];
    b.threads.resize(nthreads);
    b.warps.resize((nthreads + 31) / 32);
    b.idx = uint3{unsigned(k % grid.x), unsigned((k / grid.x) % grid.y), unsigned(k / (uint64_t(grid.x) * grid.y))};
    b.dim = block;
    b.grid = grid;
    b.smem = static_cast<unsigned char*>(smem_bufs.back().get());
    b.smem_size = smem;
    b.body = &body;
    b.cooperative = true;
    start_block(b, k * nthreads);
  }
  std::mt19937 rng;
  const int mode = begin_launch(grid, smem, rng);
  Block* const outer = g_block;
  std::vector<Block>* const outer_grid = g_grid_blocks;
  g_grid_blocks = &blocks;
  std::string error;
  std::vector<Step> state(nblocks, Step::Ran);
  std::vector<size_t> runnable;  // random order: the blocks that may still run before the next release
  for (;;) {
    if (mode != 2) {
      for (uint64_t i = 0; i < nblocks && error.empty(); ++i) {
        const uint64_t k = mode == 1 ? nblocks - 1 - i : i;
        if (state[k] != Step::Ran) continue;
        g_block = &blocks[k];
        state[k] = step_block(blocks[k], mode, rng, -1);
        if (state[k] == Step::Failed) error = blocks[k].error;
      }
    } else {
      runnable.clear();
      for (size_t k = 0; k < nblocks; ++k)
        if (state[k] == Step::Ran) runnable.push_back(k);
      while (!runnable.empty() && error.empty()) {
        const size_t r = std::uniform_int_distribution<size_t>(0, runnable.size() - 1)(rng);
        const size_t k = runnable[r];
        g_block = &blocks[k];
        state[k] = step_block(blocks[k], mode, rng, 1);
        if (state[k] == Step::Failed) error = blocks[k].error;
        if (state[k] != Step::Ran) runnable.erase(runnable.begin() + std::ptrdiff_t(r));
      }
    }
    if (!error.empty()) break;
    if (std::all_of(state.begin(), state.end(), [](Step s) { return s == Step::Done; })) break;
    // Every block is done or waits at grid_sync: it releases only when every thread of the grid waits there.
    const Block* wait_block = nullptr;
    const Thread* waiter = nullptr;
    for (const Block& b : blocks) {
      for (const Thread& t : b.threads)
        if (t.state == State::AtGrid) {
          wait_block = &b;
          waiter = &t;
          break;
        }
      if (waiter != nullptr) break;
    }
    const std::string wait_at = std::string(waiter->bar_file) + ":" + std::to_string(waiter->bar_line);
    for (const Block& b : blocks) {
      for (const Thread& t : b.threads) {
        if (t.state != State::AtGrid) {
          error = "deadlock: " + where(*wait_block, *waiter) + " waits at grid_sync (" + wait_at + ") while " +
                  where(b, t) + " " + blocked_at(t) + " (every thread of the grid must reach each grid_sync)";
        } else if (t.bar_line != waiter->bar_line || std::strcmp(t.bar_file, waiter->bar_file) != 0) {
          error = "divergent grid_sync: " + where(*wait_block, *waiter) + " at " + wait_at + ", " + where(b, t) +
                  " at " + t.bar_file + ":" + std::to_string(t.bar_line);
        }
        if (!error.empty()) break;
      }
      if (!error.empty()) break;
    }
    if (!error.empty()) break;
    for (size_t k = 0; k < nblocks; ++k) {
      for (Thread& t : blocks[k].threads) t.state = State::Ready;
      state[k] = Step::Ran;
    }
  }
  g_block = outer;
  g_grid_blocks = outer_grid;
  if (!error.empty()) return refuse(cudaErrorLaunchFailure, "kernel failed in the emulator: " + error);
  return cudaSuccess;
}

}  // namespace pyattn_emu
