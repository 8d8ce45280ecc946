// Kernels with one deliberate defect each, for tests/test_cuda_emu.py: every check of the emulator (cuda_emu.h) must
// fire on its defect, so a clean run of the real kernels means something. Written in CUDA C++ against the emulator's
// runtime (launches through pyattn_emu::launch, as scripts/cuda_emu.py rewrites them). Exposed as
// torch.ops.pyattn_emu.emu_selftest(name) -> int (csrc/emu/library.cpp).
#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda_emu.h"

namespace pyattn_emu {
namespace {

__global__ void divergent_barrier(int* out) {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

__global__ void shuffle_after_exit(int* out) {
  if (threadIdx.x == 0) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, static_cast<int>(threadIdx.x), 1);
}

__global__ void partial_mask(int* out) {
  out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, static_cast<int>(threadIdx.x), 1);
}

// Half a warp at a full-mask shuffle, the other half at a barrier: neither can complete.
__global__ void shuffle_vs_barrier(int* out) {
  if (threadIdx.x < 16) {
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, static_cast<int>(threadIdx.x), 1);
  } else {
    __syncthreads();
  }
}

__global__ void bounded(int* out) {
  check_launch_bounds(64, __FILE__, __LINE__);  // what scripts/cuda_emu.py adds for __launch_bounds__(64)
  out[threadIdx.x] = 1;
}

__global__ void ldmatrix_misaligned(int* out) {
  uint32_t r[4];
  ldmatrix_x4(r, dynamic_smem() + 2 + 16 * (threadIdx.x % 8), false);
  out[threadIdx.x] = static_cast<int>(r[0]);
}

__global__ void ldmatrix_outside_smem(int* out) {
  alignas(16) static uint16_t global_rows[32 * 8];
  uint32_t r[4];
  ldmatrix_x4(r, global_rows + 8 * threadIdx.x, false);
  out[threadIdx.x] = static_cast<int>(r[0]);
}

// Thread 0 writes a shared value that thread 63 (another warp) reads without a barrier in between: 0 or 42
// depending on which warp runs first.
__global__ void missing_barrier(int* out) {
  __shared__ int flag;
  if (threadIdx.x == 0) flag = 0;
  __syncthreads();
  if (threadIdx.x == 0) flag = 42;
  // __syncthreads() missing here
  if (threadIdx.x == 63) out[0] = flag;
  __syncthreads();
}

// cp.async read before its wait_group: the late model shows the old contents (0xff bytes = -1).
__global__ void read_before_wait(int* out, const int* src) {
  int* s = reinterpret_cast<int*>(dynamic_smem());
  if (threadIdx.x == 0) {
    cp_async16(s, src);
    cp_async_commit();
    out[0] = s[0];  // cp_async_wait<0>() missing before this read
    cp_async_wait(0);
  }
}

// One warpgroup, D (64 x 8) = A B with A (64 x 16) and B (16 x 8) K-major in 128-byte-swizzled shared memory, all
// ones: every D element is 16 once the wgmma has been waited for. Returns D[0][0] read before the wait (defect:
// the emulator has not run it yet, so the value the accumulator held: -1), after it (16), or, when `skip_wait`, lets
// the threads exit with it in flight (an error).
template <int kCase>
__global__ void wgmma_ones(int* out) {
  uint16_t* s = reinterpret_cast<uint16_t*>(dynamic_smem());  // A: 64 rows of 128 bytes, B: 8 rows at 8192
  for (int i = threadIdx.x; i < (64 + 8) * 64; i += 128) s[i] = 0x3c00;  // fp16 1.0 (the swizzle keeps all ones)
  __syncthreads();
  const auto desc = [](uint32_t byte) {
    return uint64_t(byte >> 4) | (uint64_t(16 >> 4) << 16) | (uint64_t(1024 >> 4) << 32) | (1ull << 62);
  };
  float d[4] = {-1.0f, -1.0f, -1.0f, -1.0f};
  wgmma_m64k16(d, 8, nullptr, desc(0), desc(8192), false, false, false);
  wgmma_commit();
  if (kCase == 0) out[threadIdx.x] = static_cast<int>(d[0]);  // read before wgmma_wait: the defect
  if (kCase != 2) wgmma_wait(0);
  if (kCase == 1) out[threadIdx.x] = static_cast<int>(d[0] + d[1] + d[2] + d[3]) / 4;
}

// One bulk tensor copy of an 8 x 64 fp16 box (all 7.0 = 0x4700) into 128-byte-swizzled shared memory: returns the first
// element read before the mbarrier wait (defect: stale 0xffff in the late model), after it (0x4700), or waits on a
// phase that never completes (a barrier of count 2 that gets one arrival: deadlock).
template <int kCase>
__global__ void tma_box(int* out, const CUtensorMap* map) {
  auto* s = reinterpret_cast<uint16_t*>(dynamic_smem());
  auto* bar = reinterpret_cast<uint64_t*>(dynamic_smem() + 1024);
  if (threadIdx.x == 0) {
    mbar_init(bar, kCase == 2 ? 2 : 1);
    mbar_arrive(bar, 8 * 64 * 2);
    tma_load_4d(s, map, bar, 0, 0, 0, 0);
    if (kCase == 0) out[0] = s[0];  // mbar_wait missing before this read
    mbar_wait(bar, 0);
    if (kCase != 0) out[0] = s[0];
  }
}

// Named barrier 1 of 64 threads: warp 1 writes 42 then arrives, warp 0 syncs then reads it (42 in every schedule);
// the defect leaves out the arrive (deadlock).
template <bool kArrive>
__global__ void named_barrier(int* out) {
  __shared__ int value;
  if (threadIdx.x >= 32) {
    if (threadIdx.x == 32) value = 42;
    if (kArrive) bar_arrive(1, 64);
  } else {
    bar_sync(1, 64);
    if (threadIdx.x == 0) out[0] = value;
  }
}

// Cooperative launches: each round, every thread of every block writes its element of its block's slot of `data`,
// then (after a grid_sync) adds up one element of every other block's slot, and (after another, so that no block
// overwrites a slot still being read) goes on to the next round. Each block's dynamic shared memory holds its own
// block index throughout (a block seeing another's adds 1000000). kBarriers: 1 the two grid_syncs (the sum is right
// in every schedule), 0 none (a block reads slots before or after their round), 2 block 1 leaves the last round
// before its last grid_sync (deadlock), 3 block 1 waits at a grid_sync of another line (divergent).
struct GridExchange {
  int* data;  // [gridDim.x][blockDim.x]
  int* out;   // [gridDim.x][blockDim.x]: each thread's sum
  int rounds;
};

template <int kBarriers>
__global__ void grid_exchange(const GridExchange p) {
  const int b = blockIdx.x, i = threadIdx.x, n = blockDim.x;
  int* own = reinterpret_cast<int*>(dynamic_smem());
  own[i] = b;
  int sum = 0;
  for (int t = 0; t < p.rounds; ++t) {
    __stcg(p.data + b * n + i, (t + 1) * (b * n + i + 1));
    __syncthreads();
    if (kBarriers == 3 && b == 1) {
      grid_sync(__FILE__, __LINE__);
    } else if (kBarriers != 0) {
      grid_sync(__FILE__, __LINE__);
    }
    for (int o = 0; o < int(gridDim.x); ++o)
      if (o != b) sum += __ldcg(p.data + o * n + (i + t) % n);
    sum += own[(i + 1) % n] == b ? 0 : 1000000;
    if (kBarriers == 2 && b == 1 && t == p.rounds - 1) break;
    __threadfence();
    if (kBarriers != 0) grid_sync(__FILE__, __LINE__);
  }
  p.out[b * n + i] = sum;
}

// The sum of every thread's sum (3 blocks of 64 threads, 4 rounds), or the launch's error code and message.
template <int kBarriers>
int grid_exchange_sum(bool cooperative, int blocks = 3) {
  static int data[3 * 64], sums[3 * 64];
  std::fill(data, data + 3 * 64, 0);
  std::fill(sums, sums + 3 * 64, 0);
  GridExchange p{data, sums, 4};
  cudaError_t err;
  if (cooperative) {
    void* args[] = {&p};
    err = cudaLaunchCooperativeKernel(grid_exchange<kBarriers>, dim3(blocks), dim3(64), args, 64 * sizeof(int),
                                      nullptr);
    if (cudaGetLastError() != err)  // returned and recorded, as CUDA does
      throw std::runtime_error("emu_selftest: the cooperative launch's error not recorded for cudaGetLastError");
  } else {
    launch(grid_exchange<kBarriers>, blocks, 64, 64 * sizeof(int))(p);
    err = cudaGetLastError();
  }
  if (err != cudaSuccess) throw std::runtime_error("error " + std::to_string(int(err)) + ": " + last_error_message());
  int total = 0;
  for (int v : sums) total += v;
  return total;
}

int run(const std::string& name) {
  alignas(16) static int out[1024];
  alignas(16) static const int src[4] = {7, 7, 7, 7};
  std::fill(out, out + 1024, 0);
  take_last_error();
  if (name.rfind("grid_", 0) == 0 || name.rfind("coop_", 0) == 0) {
    if (name == "grid_exchange") return grid_exchange_sum<1>(true);
    if (name == "grid_exchange_no_barrier") return grid_exchange_sum<0>(true);
    if (name == "grid_sync_deadlock") return grid_exchange_sum<2>(true);
    if (name == "grid_sync_divergent") return grid_exchange_sum<3>(true);
    if (name == "grid_sync_not_cooperative") return grid_exchange_sum<1>(false);
    int per_sm = 0, sms = 0, coop = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, grid_exchange<1>, 64, 64 * sizeof(int)) !=
            cudaSuccess ||
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0) != cudaSuccess ||
        cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, 0) != cudaSuccess || coop != 1)
      throw std::runtime_error("emu_selftest: occupancy / device attribute query failed");
    if (name == "coop_too_large") return grid_exchange_sum<1>(true, sms * per_sm + 1);  // refused before it runs
    if (name == "coop_sm_count") return sms;
    if (name == "coop_occupancy") {  // blocks per SM for (threads, dynamic smem): 3 numbers, 2 decimal digits each
      int a = 0, b = 0, c = 0;
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&a, grid_exchange<1>, 256, 0);
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&b, grid_exchange<1>, 512, 220 * 1024);
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&c, grid_exchange<1>, 32, 1024);
      if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&c, grid_exchange<1>, 2048, 0) != cudaErrorInvalidValue)
        throw std::runtime_error("emu_selftest: occupancy of a 2048-thread block not refused");
      return a * 10000 + b * 100 + c;
    }
    throw std::invalid_argument("emu_selftest: unknown case " + name);
  }
  if (name == "divergent_barrier") launch(divergent_barrier, 1, 32)(out);
  else if (name == "shuffle_after_exit") launch(shuffle_after_exit, 1, 32)(out);
  else if (name == "partial_mask") launch(partial_mask, 1, 32)(out);
  else if (name == "shuffle_vs_barrier") launch(shuffle_vs_barrier, 1, 32)(out);
  else if (name == "launch_bounds") launch(bounded, 1, 128)(out);
  else if (name == "ldmatrix_misaligned") launch(ldmatrix_misaligned, 1, 32, 1024)(out);
  else if (name == "ldmatrix_outside_smem") launch(ldmatrix_outside_smem, 1, 32, 1024)(out);
  else if (name == "too_much_smem") launch(bounded, 1, 32, 100 * 1024)(out);
  else if (name == "bad_block") launch(bounded, 1, 2048)(out);
  else if (name == "missing_barrier") launch(missing_barrier, 1, 64)(out);
  else if (name == "read_before_wait") launch(read_before_wait, 1, 32, 64)(out, src);
  else if (name == "wgmma_read_before_wait") launch(wgmma_ones<0>, 1, 128, 9216)(out);
  else if (name == "wgmma_ones") launch(wgmma_ones<1>, 1, 128, 9216)(out);
  else if (name == "wgmma_exit_in_flight") launch(wgmma_ones<2>, 1, 128, 9216)(out);
  else if (name == "named_barrier") launch(named_barrier<true>, 1, 64)(out);
  else if (name == "named_barrier_deadlock") launch(named_barrier<false>, 1, 64)(out);
  else if (name.rfind("tma_", 0) == 0) {
    alignas(16) static uint16_t src[8 * 64];
    std::fill(src, src + 8 * 64, uint16_t(0x4700));
    const cuuint64_t dims[4] = {64, 8, 1, 1}, strides[3] = {128, 1024, 1024};
    const cuuint32_t box[4] = {64, 8, 1, 1}, one[4] = {1, 1, 1, 1};
    CUtensorMap map;
    if (encode_tiled(&map, CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 4, src, dims, strides, box, one,
                     CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_NONE,
                     CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) != CUDA_SUCCESS)
      throw std::runtime_error("emu_selftest: encode_tiled refused the map");
    if (name == "tma_read_before_wait") launch(tma_box<0>, 1, 32, 1032)(out, &map);
    else if (name == "tma_box") launch(tma_box<1>, 1, 32, 1032)(out, &map);
    else if (name == "tma_deadlock") launch(tma_box<2>, 1, 32, 1032)(out, &map);
    else throw std::invalid_argument("emu_selftest: unknown case " + name);
  }
  else throw std::invalid_argument("emu_selftest: unknown case " + name);
  if (take_last_error() != cudaSuccess) throw std::runtime_error(last_error_message());
  return out[0];
}

}  // namespace

int64_t selftest(const std::string& name) { return run(name); }

}  // namespace pyattn_emu
