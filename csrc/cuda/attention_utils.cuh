// Device helpers of the CUDA attention kernels (csrc/cuda/attention.cu): element types, tensor-core mma
// (mma.sync m16n8k16, fp32 accumulation), ldmatrix, cp.async, global <-> shared tile copies, masks.
// Torch-free. The inline PTX has PYATTN_CUDA_EMU branches: the CPU emulator's version of the same instruction
// (csrc/emu/cuda_emu.h), used only by the emulator build (scripts/cuda_emu.py), never by nvcc. Element data is handled as raw 16-bit patterns (uint16_t) everywhere except in the conversions
// below, so the code compiles with and without -D__CUDA_NO_HALF_CONVERSIONS__ and friends.
//
// Fragment layouts of mma.sync.aligned.m16n8k16.row.col (lane = 4 * g + t, g = lane / 4, t = lane % 4):
//   A (16 x 16, row-major) a[0] = A[g][2t, 2t+1]   a[1] = A[g+8][2t, 2t+1]   a[2] = A[g][2t+8, 2t+9]   a[3] = A[g+8][2t+8, 2t+9]
//   B (16 x 8,  k x n)     b[0] = B[2t, 2t+1][g]   b[1] = B[2t+8, 2t+9][g]
//   C (16 x 8, fp32)       c[0..1] = C[g][2t, 2t+1]                   c[2..3] = C[g+8][2t, 2t+1]
// A C fragment pair (n-tiles 2k, 2k+1) is therefore the A fragment of k-step k once packed to 16 bits: that is how
// P = exp(S - m) goes from the first GEMM's accumulators into the second GEMM without touching shared memory.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cstdint>

#include "pyattn/params.h"

namespace pyattn {
namespace cuda {
namespace attn {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kPad = 8;                   // shared-memory row padding (elements): conflict-free ldmatrix / cp.async

__device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
__device__ __forceinline__ int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

// 2^x (ex2.approx: 2 ulp; exp2(-inf) = 0, NaN stays NaN), whatever the compiler's math flags.
__device__ __forceinline__ float fast_exp2(float x) {
#ifdef PYATTN_CUDA_EMU
  return ::pyattn_emu::ex2_approx_ftz(x);
#else
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#endif
}

// Per-call values computed on the host from the params.
struct Derived {
  float scale_log2 = 1.0f;  // scale * log2(e)
  float inv_keep = 1.0f;    // 1 / (1 - dropout_p)
  uint32_t drop_thr = 0;    // keep iff hash >= drop_thr
  bool dropout = false;
  int64_t shift = 0;  // causal: query i sees keys j <= i + shift
  int64_t group = 1;  // Hq / Hkv
  // 16-byte vector path allowed (aligned rows and a column count % 8 == 0) per tensor
  bool vec_q = false, vec_k = false, vec_v = false, vec_o = false, vec_do = false;
  bool vec_dq = false, vec_dk = false, vec_dv = false;
  // Heads per L2 section of the grids (l2_section_tile): of those whose tiles stream K / V (query heads: forward,
  // dQ) and of those whose tiles stream Q and dO (kv heads: dK / dV). derive() sets them.
  int64_t sec_q = 1, sec_kv = 1;
};

// Tile blk of a grid of `levels` x `heads` tiles whose tiles of one head stream the same data, in L2 sections
// (FA3's "L2 swizzle"): sections of `per` consecutive heads (the last one may have fewer), each level-major (heads
// fastest) over its heads. per = 1: a head's tiles back to back (its data read from DRAM once, what the non-causal
// grids do); per = heads: level by level over all heads (a causal grid's heaviest tiles first everywhere). A causal
// grid's sections keep the heaviest-first order within each and their heads' data small enough to stay in L2.
struct GridTile {
  uint32_t level, head;
};
__device__ __forceinline__ GridTile l2_section_tile(int64_t blk, int64_t levels, int64_t heads, int64_t per) {
  // (32-bit arithmetic: a grid has fewer than 2^31 tiles, and the warp-specialized forward's producer, which calls
  // this on 24 registers, spills with 64-bit divisions)
  const uint32_t b = uint32_t(blk), lv = uint32_t(levels), hs = uint32_t(heads), pr = uint32_t(per);
  const uint32_t sec = b / (pr * lv), t = b - sec * pr * lv;
  const uint32_t n = pr < hs - sec * pr ? pr : hs - sec * pr;  // heads in this section
  const uint32_t level = t / n;
  return {level, sec * pr + (t - level * n)};
}

// What one block of a forward kernel handles: query rows [i0, i0 + nq) (BM a block) of (b, h) (bh = b * Hq + h), kv
// head hk, and the nkb key blocks of BN that some of those rows see. The grid has one block per (query block, b, h):
// non-causal, a head's query blocks back to back; causal, in L2 sections of d.sec_q heads, the blocks of the last
// query rows, which see the most keys, first in each.
struct FwdBlock {
  int64_t b, h, hk, bh, i0;
  int nq, nkb;
};
template <bool CAUSAL, int BM, int BN>
__device__ __forceinline__ FwdBlock fwd_block(const AttnCommon& p, const Derived& d, int64_t blk) {
  const int64_t BH = p.B * p.Hq, nqb = (p.Lq + BM - 1) / BM;
  FwdBlock f;
  int64_t qb;
  if (CAUSAL) {
    const GridTile g = l2_section_tile(blk, nqb, BH, d.sec_q);
    qb = nqb - 1 - g.level;
    f.bh = g.head;
    f.b = g.head / uint32_t(p.Hq);
    f.h = g.head % uint32_t(p.Hq);
  } else {
    qb = blk % nqb;
    f.bh = blk / nqb;
    f.b = f.bh / p.Hq;
    f.h = f.bh % p.Hq;
  }
  f.hk = f.h / d.group;
  f.i0 = qb * BM;
  f.nq = int(imin(BM, p.Lq - f.i0));
  const int64_t jend = CAUSAL ? imax(0, imin(p.Lk, f.i0 + f.nq + d.shift)) : p.Lk;  // keys [0, jend) are seen
  f.nkb = int((jend + BN - 1) / BN);
  return f;
}

// The Hopper backward's fused dQ accumulator (fp32; attn_bwd_pre_kernel zeroes it): per (b, h) = bh the query rows
// in blocks of 64 (the last one padded), each block in HD / 64 chunks of 64 rows x 64 columns (chunk (bh, query
// block qb, columns 64 cc..) at ((bh * ceil(Lq / 64) + qb) * HD / 64 + cc) * kDqChunkFloats), each chunk in the order
// of a warpgroup's wgmma accumulator (FA3's dQaccum idea): thread w (0..127) of the warpgroup holds register
// v = 4 n + 2 r + c (n 0..7) of row 16 (w / 32) + (w % 32) / 4 + 8 r, column 8 n + 2 (w % 4) + c, and its registers
// 4 n .. 4 n + 3 sit at float4 n * 128 + w of the chunk. So a warpgroup adds its block with 8 coalesced float4 atomics
// a thread, or stores it to shared memory without bank conflicts and adds it with one bulk reduction of 16 KB.
constexpr int64_t kDqChunkFloats = 64 * 64;
__host__ __device__ inline int64_t dq_acc_floats(int64_t BH, int64_t Lq, int64_t D) {
  return BH * ((Lq + 63) / 64) * 64 * D;
}

// Masks of a key block in the Hopper kernels' C fragments: this thread holds rows r0 and r0 + 8, keys j0 + 8 n + 2 t
// + e % 2; element (n, e) is masked (j >= Lk, or causal j > i + shift) iff 8 n + e % 2 >= lim[e / 2] with lim from
// key_limits: one compare with a constant an element, where 64-bit index arithmetic took 5-6 instructions.
template <bool CAUSAL, int BN>
__device__ __forceinline__ void key_limits(int (&lim)[2], int64_t r0, int64_t j0, int t, int64_t Lk, int64_t shift) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t jend = CAUSAL ? imin(Lk, r0 + 8 * r + shift + 1) : Lk;  // the row's first masked key
    lim[r] = int(imax(-2, imin(BN, jend - j0))) - 2 * t;
  }
}
__device__ __forceinline__ bool key_masked(const int (&lim)[2], int n, int e) { return n * 8 + (e & 1) >= lim[e >> 1]; }

// The Hopper forward (attention_sm90.cu: wgmma, built for sm_90a): launches it and returns true (its status in *err)
// when it takes p (an sm_90a build, a compute capability 9.0 device, fp16 / bf16, D == Dv in {64, 128}, no mask, no
// dropout, 16-byte-aligned rows of q, k, v and out; PYATTN_CUDA_ATTN_SM90=0 in the environment turns it off), else
// returns false and attention_fwd (attention.cu) launches its own mma.sync kernel.
bool fwd_sm90(const AttnFwdParams& p, const Derived& d, cudaStream_t stream, cudaError_t* err);
// What fwd_sm90 does with p (one decision for it and for attention_fwd_workspace): take it or not, and how.
struct Sm90Plan {
  bool take = false;        // the Hopper forward runs p
  bool cp = false;          // the cp.async kernel (else the warp-specialized one)
  bool persistent = false;  // a block per SM, each taking tiles in turn (else a block per tile)
  bool dynamic = false;     // ... the next tile from a grid-wide counter, p.tile_counter (else round-robin)
  bool bn176 = false;       // key blocks of 176 (non-causal HD 128)
};
Sm90Plan sm90_plan(const AttnFwdParams& p, const Derived& d);

// The Hopper backward (attention_sm90_bwd.cu: wgmma kernels, built for sm_90a). sm90_bwd_plan says whether it takes
// p (an sm_90a build, a compute capability 9.0 device, fp16 / bf16, D == Dv in {64, 128}, no mask, no dropout,
// 16-byte-aligned rows of every tensor; PYATTN_CUDA_ATTN_SM90_BWD=0 in the environment turns it off) and how;
// bwd_sm90 launches its kernels after attn_bwd_pre_kernel's row statistics (which zeroes dq_acc when pl.fused).
// Otherwise run_attn_bwd (attention.cu) launches its own mma.sync kernels.
struct Sm90BwdPlan {
  bool take = false;
  bool ws = false;     // the warp-specialized dK / dV kernel (else the cp.async one)
  bool fused = false;  // ... which also adds dQ into a zeroed fp32 accumulator (B, Hq, Lq, D) (else a dQ kernel
                       // computes it): not p.deterministic
  bool bulk = false;   // ... with bulk reductions from shared memory (else float2 atomics)
};
Sm90BwdPlan sm90_bwd_plan(const AttnBwdParams& p, const Derived& d);
cudaError_t bwd_sm90(const AttnBwdParams& p, const Derived& d, const Sm90BwdPlan& pl, const float* lse2,
                     const float* l2, const float* delta, float* dq_acc, cudaStream_t stream);
// The decoding forward (attention_decode.cu: split-KV, CUDA cores): decode_plan says whether it takes p (fp16 /
// bf16, D == Dv in {64, 128}, no mask, no dropout, 16-byte-aligned rows of q, k, v, group * Lq <= kDecodeMaxRows,
// Lk >= kDecodeMinKeys, B and Hkv <= 65535; PYATTN_CUDA_ATTN_DECODE=0 in the environment turns it off: n_splits 0)
// and how it splits the keys; fwd_decode launches it and returns true (its status in *err) when it takes p and
// p.workspace holds the plan's workspace_floats, else returns false.
constexpr int kDecodeMaxRows = 8;
constexpr int64_t kDecodeMinKeys = 256;
struct DecodePlan {
  int n_splits = 0;  // 0: not taken
  int64_t chunk = 0;  // keys per split
  int64_t workspace_floats = 0;
};
DecodePlan decode_plan(const AttnFwdParams& p, const Derived& d);
bool fwd_decode(const AttnFwdParams& p, const Derived& d, cudaStream_t stream, cudaError_t* err);

// ------------------------------------------------------------------------------------------------------------
// Element types: tags with the conversions and the mma of each 16-bit type
// ------------------------------------------------------------------------------------------------------------
struct F16 {
  static constexpr bool kIsBF16 = false;
  static __device__ __forceinline__ float to_float(uint16_t u) { return __half2float(__ushort_as_half(u)); }
  static __device__ __forceinline__ uint16_t from_float(float x) { return __half_as_ushort(__float2half_rn(x)); }
  // Two floats -> one register (lo = a: the element with the smaller column index).
  static __device__ __forceinline__ uint32_t pack(float a, float b) {
#ifdef PYATTN_CUDA_EMU
    return ::pyattn_emu::cvt_rn_f16x2(b, a);  // same operands as the PTX below: upper half, lower half
#else
    uint32_t r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(b), "f"(a));
    return r;
#endif
  }
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#ifdef PYATTN_CUDA_EMU
    ::pyattn_emu::mma_m16n8k16(c, a, b0, b1, /*bf16=*/false);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
  }
};

struct BF16 {
  static constexpr bool kIsBF16 = true;
  static __device__ __forceinline__ float to_float(uint16_t u) { return __uint_as_float(uint32_t(u) << 16); }
  static __device__ __forceinline__ uint16_t from_float(float x) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(x));
  }
  static __device__ __forceinline__ uint32_t pack(float a, float b) {
#ifdef PYATTN_CUDA_EMU
    return ::pyattn_emu::cvt_rn_bf16x2(b, a);  // same operands as the PTX below: upper half, lower half
#else
    uint32_t r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(b), "f"(a));
    return r;
#endif
  }
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#ifdef PYATTN_CUDA_EMU
    ::pyattn_emu::mma_m16n8k16(c, a, b0, b1, /*bf16=*/true);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
  }
};

// ------------------------------------------------------------------------------------------------------------
// Shared memory: ldmatrix, cp.async
// ------------------------------------------------------------------------------------------------------------
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8x8 b16 matrices; lanes 8m..8m+7 give the row addresses of matrix m; r[m] = matrix m's fragment.
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const uint16_t* p) {
#ifdef PYATTN_CUDA_EMU
  ::pyattn_emu::ldmatrix_x4(r, p, /*trans=*/false);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
#endif
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const uint16_t* p) {
#ifdef PYATTN_CUDA_EMU
  ::pyattn_emu::ldmatrix_x4(r, p, /*trans=*/true);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
#endif
}

// Row-major tiles in shared memory with row stride LD (elements). For a 16 x 16 block at (r0, c0):
// A operand (rows = M, cols = K): a[0..3] as in the table above.
template <int LD>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const uint16_t* s, int r0, int c0, int lane) {
  ldsm_x4(a, s + (r0 + (lane & 15)) * LD + c0 + (lane >> 4) * 8);
}
// B operand from a tile stored (n, k) row-major (B = tile^T: K in S = Q K^T): rows r0..r0+15 are TWO n-tiles,
// cols c0..c0+15 one k-step. b[0], b[1]: n-tile r0; b[2], b[3]: n-tile r0 + 8.
template <int LD>
__device__ __forceinline__ void load_b_nk(uint32_t (&b)[4], const uint16_t* s, int r0, int c0, int lane) {
  ldsm_x4(b, s + (r0 + (lane & 7) + ((lane >> 4) << 3)) * LD + c0 + ((lane >> 3) & 1) * 8);
}
// B operand from a tile stored (k, n) row-major (V in O = P V): rows r0..r0+15 one k-step, cols c0..c0+15 TWO
// n-tiles. b[0], b[1]: n-tile c0; b[2], b[3]: n-tile c0 + 8.
template <int LD>
__device__ __forceinline__ void load_b_kn(uint32_t (&b)[4], const uint16_t* s, int r0, int c0, int lane) {
  ldsm_x4_trans(b, s + (r0 + (lane & 15)) * LD + c0 + (lane >> 4) * 8);
}

#ifdef PYATTN_CUDA_EMU
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) { ::pyattn_emu::cp_async16(smem, gmem); }
__device__ __forceinline__ void cp_async_commit() { ::pyattn_emu::cp_async_commit(); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  ::pyattn_emu::cp_async_wait(N);
}
#else
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(smem)), "l"(gmem));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
#endif

// Global (rows of `ncols` valid elements, row stride `stride` elements, unit column stride) -> shared tile
// ROWS x COLS (row stride LD). Rows >= nrows and columns >= ncols become 0. vec: the row pointers are 16-byte aligned
// and ncols % 8 == 0 -> asynchronous 16-byte copies (complete at the next cp_async_wait + __syncthreads); otherwise
// synchronous 2-byte loads (visible after the same barrier). ncols may be <= 0 (all zeros).
template <int ROWS, int COLS, int LD, int NT>
__device__ __forceinline__ void load_tile(uint16_t* s, const uint16_t* g, int64_t stride, int nrows, int ncols,
                                          bool vec, int tid) {
  if (vec) {
    constexpr int CPR = COLS / 8;  // 16-byte chunks per row
    constexpr int N = ROWS * CPR;
#pragma unroll
    for (int k = 0; k < (N + NT - 1) / NT; ++k) {
      const int c = tid + k * NT;
      if (N % NT != 0 && c >= N) break;
      const int r = c / CPR, cc = (c % CPR) * 8;
      uint16_t* dst = s + r * LD + cc;
      if (r < nrows && cc < ncols)
        cp_async16(dst, g + r * stride + cc);
      else
        *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
    }
  } else {
    constexpr int N = ROWS * COLS;
#pragma unroll 4
    for (int k = 0; k < (N + NT - 1) / NT; ++k) {
      const int e = tid + k * NT;
      if (N % NT != 0 && e >= N) break;
      const int r = e / COLS, c = e % COLS;
      s[r * LD + c] = (r < nrows && c < ncols) ? g[r * stride + c] : uint16_t(0);
    }
  }
}

// Shared tile (row stride LD) -> global rows [0, nrows) x columns [0, ncols) (ncols <= COLS; may be <= 0).
// vec: 16-byte stores (aligned rows, ncols % 8 == 0); otherwise 2-byte stores.
template <int ROWS, int COLS, int LD, int NT>
__device__ __forceinline__ void store_tile(uint16_t* g, int64_t stride, const uint16_t* s, int nrows, int ncols,
                                           bool vec, int tid) {
  if (vec) {
    constexpr int CPR = COLS / 8;
    constexpr int N = ROWS * CPR;
#pragma unroll
    for (int k = 0; k < (N + NT - 1) / NT; ++k) {
      const int c = tid + k * NT;
      if (N % NT != 0 && c >= N) break;
      const int r = c / CPR, cc = (c % CPR) * 8;
      if (r < nrows && cc < ncols)
        *reinterpret_cast<uint4*>(g + r * stride + cc) = *reinterpret_cast<const uint4*>(s + r * LD + cc);
    }
  } else {
    constexpr int N = ROWS * COLS;
#pragma unroll 4
    for (int k = 0; k < (N + NT - 1) / NT; ++k) {
      const int e = tid + k * NT;
      if (N % NT != 0 && e >= N) break;
      const int r = e / COLS, c = e % COLS;
      if (r < nrows && c < ncols) g[r * stride + c] = s[r * LD + c];
    }
  }
}

// The warpgroup of this thread (threadIdx.x / 128), broadcast from lane 0 so that ptxas knows it is warp-uniform
// (CUTLASS's canonical_warp_group_idx): a role branch on it is not divergent, so the code inside may keep warp-uniform
// values (the wgmma descriptors and their k-step offsets) in uniform registers; on threadIdx.x itself ptxas computes
// them in per-thread registers and moves each into a uniform one before every wgmma.
__device__ __forceinline__ int warpgroup_uniform() { return __shfl_sync(0xffffffffu, int(threadIdx.x) / 128, 0); }

// ------------------------------------------------------------------------------------------------------------
// Warp reductions: over the 4 lanes of a quad (the lanes that hold one row of a C fragment) ...
// ------------------------------------------------------------------------------------------------------------
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}
// ... and over a whole warp (butterflies: every lane gets the result)
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}
__device__ __forceinline__ double warp_sum(double x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}
__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

// ------------------------------------------------------------------------------------------------------------
// Masks (same rules as csrc/cpu/attention.cpp, in base-2 logits x = scale * log2(e) * q.k)
// ------------------------------------------------------------------------------------------------------------
// Log2-domain additive mask value m * log2(e); finite values stay finite (finfo.min * log2(e) would overflow to
// -inf and turn a row of "very negative" logits, which softmax treats as uniform, into a dead row).
__device__ __forceinline__ float mask_log2(float m) {
  const float v = m * kLog2e;
  return (isinf(v) && !isinf(m)) ? copysignf(3.402823466e38f, v) : v;
}

// The attention mask of one (batch, query head): element (i, j) at base + (i * si + j * sj) * element size.
struct MaskView {
  const unsigned char* base = nullptr;
  int64_t si = 0, sj = 0;
  MaskKind kind = MaskKind::None;
  DType dtype = DType::F32;
};

__device__ __forceinline__ MaskView make_mask_view(const AttnCommon& p, int64_t b, int64_t h) {
  MaskView m;
  m.kind = p.mask_kind;
  if (p.mask_kind == MaskKind::None) return m;
  m.dtype = p.mask_dtype;
  const int64_t esize = p.mask_kind == MaskKind::Bool ? 1 : (p.mask_dtype == DType::F32 ? 4 : 2);
  m.base = static_cast<const unsigned char*>(p.mask) + (b * p.mask_stride[0] + h * p.mask_stride[1]) * esize;
  m.si = p.mask_stride[2];
  m.sj = p.mask_stride[3];
  return m;
}

__device__ __forceinline__ float apply_mask(const MaskView& m, int64_t i, int64_t j, float x) {
  const int64_t off = i * m.si + j * m.sj;
  if (m.kind == MaskKind::Bool) return m.base[off] != 0 ? x : -INFINITY;
  float v;
  if (m.dtype == DType::F32)
    v = reinterpret_cast<const float*>(m.base)[off];
  else if (m.dtype == DType::BF16)
    v = BF16::to_float(reinterpret_cast<const uint16_t*>(m.base)[off]);
  else
    v = F16::to_float(reinterpret_cast<const uint16_t*>(m.base)[off]);
  return x + mask_log2(v);
}

// Everything that hides key j from query i, applied to the base-2 logit x: out-of-range (i >= Lq or j >= Lk:
// -inf, no memory access), causal (j > i + shift: -inf), then the attention mask.
template <bool CAUSAL>
__device__ __forceinline__ float masked_logit(float x, int64_t i, int64_t j, int64_t Lq, int64_t Lk, int64_t shift,
                                              const MaskView& m) {
  if (i >= Lq || j >= Lk) return -INFINITY;
  if (CAUSAL && j > i + shift) return -INFINITY;
  if (m.kind != MaskKind::None) x = apply_mask(m, i, j, x);
  return x;
}

}  // namespace attn
}  // namespace cuda
}  // namespace pyattn
