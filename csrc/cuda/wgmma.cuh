// Hopper warpgroup MMA (wgmma, sm_90a) for the attention kernels of attention_sm90.cu and attention_sm90_bwd.cu: the
// instruction wrappers, the shared-memory matrix descriptors they read, the fences around them, and the tile loads and
// GEMMs built from them. Torch-free. Each PTX wrapper has a PYATTN_CUDA_EMU branch (csrc/emu/cuda_emu.h: the CPU
// emulator computes the same product from the same descriptors).
//
// wgmma.mma_async.sync.aligned.m64nNk16.f32.{f16,bf16}: the 4 warps of a warpgroup (128 threads) compute
// D (64 x N, fp32) (+)= A (64 x 16) B (16 x N). Warp w (= warp index % 4) owns rows 16w..16w+15 of D and A, laid out
// like mma.sync m16n8k16 per 8-column n-tile j (g = lane / 4, t = lane % 4):
//   D  d[4j + 0..1] = D[16w + g][8j + 2t, +1]      d[4j + 2..3] = D[16w + g + 8][8j + 2t, +1]      (N / 2 floats)
//   A  (registers) a[0] = A[g][2t, +1]  a[1] = A[g + 8][2t, +1]  a[2] = A[g][2t + 8, +1]  a[3] = A[g + 8][2t + 8, +1]
// so two n-tiles 2k, 2k + 1 of an fp32 result, packed to 16 bits, are the A registers of k-step k (P = softmax(S)).
//
// Shared-memory operands: tiles of 128-byte rows (64 16-bit elements) with the 128-byte swizzle: in each
// 1024-byte-aligned atom of 8 rows, the 16-byte chunk c of row r sits at chunk c ^ r (swizzle128: address bits
// [4, 7) XOR bits [7, 10)). A tile wider than 64 columns is stored as 64-column sub-tiles one after the other.
//   K-major (trans 0; A = Q, B = K; element (row, k) at row * 128 + 2k before the swizzle): descriptor SBO = 1024
//     (8-row groups), LBO unused (16); k-step kk of a sub-tile starts 32 * kk bytes in (the hardware applies the
//     swizzle to the address it computes, as swizzle128 does).
//   N-major (trans-b 1; B = V stored (key k, column n), element (k, n) at k * 128 + 2n): LBO = the byte distance of
//     the 64-column sub-tiles, SBO = 1024 (8 keys); k-step kk starts 16 * 128 * kk bytes in.
//   M-major A (trans-a 1; A = dS stored as dS^T (key k, query m), element (m, k) at k * 128 + 2m): as N-major B
//     with m for n (the backward's fused dQ; the PTX ISA's canonical MN-major layout is the same for A and B).
// Ordering: wgmma_fence() before a wgmma whose accumulator or A registers ordinary instructions wrote; commit + wait
// before its results are read (fence_operands keeps the compiler from moving register reads and writes across
// these); shared memory written by ordinary stores or cp.async needs fence_proxy_async() in each writing thread, then
// a barrier, before a wgmma reads it.
#pragma once

#include <cstdint>

#include "attention_utils.cuh"

namespace pyattn {
namespace cuda {
namespace attn {
namespace sm90 {

__host__ __device__ __forceinline__ uint32_t swizzle128(uint32_t byte) { return byte ^ (((byte >> 7) & 7u) << 4); }

// Shared-memory matrix descriptor: start address / 16 (bits 0-13), leading byte offset / 16 (bits 16-29), stride
// byte offset / 16 (bits 32-45), 128-byte swizzle (mode 1, bit 62). Every tile here has SBO = 1024 (8-row groups of
// 128-byte rows), so the high word is always kDescHi: the PTX wrappers below take the low word and write kDescHi as
// an immediate (ptxas then keeps it in a uniform register instead of moving it into one before every wgmma).
constexpr uint32_t kDescSbo = 1024, kDescHi = (kDescSbo >> 4) | (1u << 30);
#define PYATTN_WGMMA_DESC_HI "0x40000040"
static_assert(kDescHi == 0x40000040u, "PYATTN_WGMMA_DESC_HI");
__host__ __device__ constexpr uint64_t make_desc(uint32_t smem_byte_addr, uint32_t lbo) {
  return uint64_t((smem_byte_addr & 0x3FFFFu) >> 4) | (uint64_t(lbo >> 4) << 16) | (uint64_t(kDescHi) << 32);
}
// The descriptor of the address `bytes` (a multiple of 16) past desc's: the start-address field plus bytes / 16, a
// 32-bit add that never carries out of the field (shared-memory addresses are below 2^18). CUTLASS's form: one
// descriptor a tile and constant k-step offsets (a make_desc per k-step put ~12 masks, shifts and register moves
// between consecutive wgmmas).
__device__ __forceinline__ uint64_t desc_at(uint64_t desc, uint32_t bytes) {
  return (uint64_t(kDescHi) << 32) | uint32_t(uint32_t(desc) + (bytes >> 4));
}

#ifdef PYATTN_CUDA_EMU
__device__ __forceinline__ void wgmma_fence() {}
__device__ __forceinline__ void wgmma_commit() { ::pyattn_emu::wgmma_commit(); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  ::pyattn_emu::wgmma_wait(N);
}
template <class T, int n>
__device__ __forceinline__ void fence_operands(T (&)[n]) {}
__device__ __forceinline__ void fence_proxy_async() {}

// D (+)= A B with A and B from shared memory, both K-major; scale_d == 0: D = A B.
template <class E, int N>
__device__ __forceinline__ void wgmma_ss(float (&d)[N / 2], uint64_t da, uint64_t db, int scale_d) {
  ::pyattn_emu::wgmma_m64k16(d, N, nullptr, da, db, scale_d != 0, /*trans_b=*/false, E::kIsBF16);
}
// D += A B with A from registers and B from shared memory, N-major.
template <class E, int N>
__device__ __forceinline__ void wgmma_rs_nmajor(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t db) {
  ::pyattn_emu::wgmma_m64k16(d, N, a, 0, db, /*scale_d=*/true, /*trans_b=*/true, E::kIsBF16);
}
// D (+)= A B with A from shared memory M-major and B from shared memory N-major; scale_d == 0: D = A B.
template <class E, int N>
__device__ __forceinline__ void wgmma_ss_mn(float (&d)[N / 2], uint64_t da, uint64_t db, int scale_d) {
  ::pyattn_emu::wgmma_m64k16(d, N, nullptr, da, db, scale_d != 0, /*trans_b=*/true, E::kIsBF16, /*trans_a=*/true);
}
#else
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
template <int n>
__device__ __forceinline__ void fence_operands(float (&r)[n]) {
#pragma unroll
  for (int i = 0; i < n; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
template <int n>
__device__ __forceinline__ void fence_operands(uint32_t (&r)[n]) {
#pragma unroll
  for (int i = 0; i < n; ++i) asm volatile("" : "+r"(r[i])::"memory");
}
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// Accumulator operand lists "{%0, ..., %n-1}" and the matching "+f" constraints on d[0..n), for n = 32, 64, 88, built
// from runs of registers / constraints: [0, 32), [32, 64), [64, 88).
#define PYATTN_WGMMA_R0 \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define PYATTN_WGMMA_R32 \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define PYATTN_WGMMA_R64 \
  "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, " \
  "%80, %81, %82, %83, %84, %85, %86, %87"
#define PYATTN_WGMMA_D0 \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
  "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
  "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define PYATTN_WGMMA_D32 \
  "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
  "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
  "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
  "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
#define PYATTN_WGMMA_D64 \
  "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), \
  "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), \
  "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87])
#define PYATTN_WGMMA_DREGS32 "{" PYATTN_WGMMA_R0 "}"
#define PYATTN_WGMMA_DREGS64 "{" PYATTN_WGMMA_R0 ", " PYATTN_WGMMA_R32 "}"
#define PYATTN_WGMMA_DREGS88 "{" PYATTN_WGMMA_R0 ", " PYATTN_WGMMA_R32 ", " PYATTN_WGMMA_R64 "}"
#define PYATTN_WGMMA_DOPS32 PYATTN_WGMMA_D0
#define PYATTN_WGMMA_DOPS64 PYATTN_WGMMA_D0, PYATTN_WGMMA_D32
#define PYATTN_WGMMA_DOPS88 PYATTN_WGMMA_D0, PYATTN_WGMMA_D32, PYATTN_WGMMA_D64

// wgmma_ss: D (+)= A B, A and B from shared memory, both K-major (imm-trans-a = imm-trans-b = 0); scale_d == 0: D = A B.
// wgmma_rs_nmajor: D += A B, A from registers, B from shared memory N-major (imm-trans-b = 1).
template <class E, int N>
__device__ __forceinline__ void wgmma_ss(float (&d)[N / 2], uint64_t da, uint64_t db, int scale_d);
template <class E, int N>
__device__ __forceinline__ void wgmma_rs_nmajor(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t db);
// wgmma_ss_mn: D (+)= A B, A from shared memory M-major, B N-major (imm-trans-a = imm-trans-b = 1).
template <class E, int N>
__device__ __forceinline__ void wgmma_ss_mn(float (&d)[N / 2], uint64_t da, uint64_t db, int scale_d);

// FN: wgmma_ss (TRANS "0, 0") or wgmma_ss_mn (TRANS "1, 1": imm-trans-a, imm-trans-b)
#define PYATTN_WGMMA_SMEM(FN, TRANS, E, N, TY, DREGS, DOPS, A0, A1, A2)                                      \
  template <>                                                                                            \
  __device__ __forceinline__ void FN<E, N>(float(&d)[N / 2], uint64_t da, uint64_t db, int scale_d) {        \
    asm volatile("{\n.reg .pred p;\n.reg .b64 da, db;\nsetp.ne.b32 p, " A2 ", 0;\n"                        \
                 "mov.b64 da, {" A0 ", " PYATTN_WGMMA_DESC_HI "};\n"                                          \
                 "mov.b64 db, {" A1 ", " PYATTN_WGMMA_DESC_HI "};\n"                                          \
                 "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TY "." TY " " DREGS ", da, db, p, 1, 1, " TRANS \
                 ";\n}\n"                                                                                  \
                 : DOPS                                                                                   \
                 : "r"(uint32_t(da)), "r"(uint32_t(db)), "r"(scale_d));                                   \
  }
#define PYATTN_WGMMA_RS(E, N, TY, DREGS, DOPS, A0, A1, A2, A3, B, S)                                        \
  template <>                                                                                            \
  __device__ __forceinline__ void wgmma_rs_nmajor<E, N>(float(&d)[N / 2], const uint32_t(&a)[4], uint64_t db) { \
    asm volatile("{\n.reg .pred p;\n.reg .b64 db;\nsetp.ne.b32 p, " S ", 0;\n"                              \
                 "mov.b64 db, {" B ", " PYATTN_WGMMA_DESC_HI "};\n"                                            \
                 "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TY "." TY " " DREGS ", {" A0 ", " A1 ", " A2 \
                 ", " A3 "}, db, p, 1, 1, 1;\n}\n"                                                        \
                 : DOPS                                                                                   \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(uint32_t(db)), "r"(1));                \
  }
PYATTN_WGMMA_SMEM(wgmma_ss, "0, 0", F16, 128, "f16", PYATTN_WGMMA_DREGS64, PYATTN_WGMMA_DOPS64, "%64", "%65", "%66")
PYATTN_WGMMA_SMEM(wgmma_ss, "0, 0", BF16, 128, "bf16", PYATTN_WGMMA_DREGS64, PYATTN_WGMMA_DOPS64, "%64", "%65", "%66")
PYATTN_WGMMA_SMEM(wgmma_ss, "0, 0", F16, 64, "f16", PYATTN_WGMMA_DREGS32, PYATTN_WGMMA_DOPS32, "%32", "%33", "%34")
PYATTN_WGMMA_SMEM(wgmma_ss, "0, 0", BF16, 64, "bf16", PYATTN_WGMMA_DREGS32, PYATTN_WGMMA_DOPS32, "%32", "%33", "%34")
PYATTN_WGMMA_SMEM(wgmma_ss, "0, 0", F16, 176, "f16", PYATTN_WGMMA_DREGS88, PYATTN_WGMMA_DOPS88, "%88", "%89", "%90")
PYATTN_WGMMA_SMEM(wgmma_ss, "0, 0", BF16, 176, "bf16", PYATTN_WGMMA_DREGS88, PYATTN_WGMMA_DOPS88, "%88", "%89", "%90")
PYATTN_WGMMA_RS(F16, 128, "f16", PYATTN_WGMMA_DREGS64, PYATTN_WGMMA_DOPS64, "%64", "%65", "%66", "%67", "%68", "%69")
PYATTN_WGMMA_RS(BF16, 128, "bf16", PYATTN_WGMMA_DREGS64, PYATTN_WGMMA_DOPS64, "%64", "%65", "%66", "%67", "%68", "%69")
PYATTN_WGMMA_RS(F16, 64, "f16", PYATTN_WGMMA_DREGS32, PYATTN_WGMMA_DOPS32, "%32", "%33", "%34", "%35", "%36", "%37")
PYATTN_WGMMA_RS(BF16, 64, "bf16", PYATTN_WGMMA_DREGS32, PYATTN_WGMMA_DOPS32, "%32", "%33", "%34", "%35", "%36", "%37")
PYATTN_WGMMA_SMEM(wgmma_ss_mn, "1, 1", F16, 64, "f16", PYATTN_WGMMA_DREGS32, PYATTN_WGMMA_DOPS32, "%32", "%33", "%34")
PYATTN_WGMMA_SMEM(wgmma_ss_mn, "1, 1", BF16, 64, "bf16", PYATTN_WGMMA_DREGS32, PYATTN_WGMMA_DOPS32, "%32", "%33", "%34")
#undef PYATTN_WGMMA_SMEM
#undef PYATTN_WGMMA_RS
#endif

// ---- the GEMMs of the attention kernels, built from the instructions above ----
// Shared-memory tiles: ROWS rows of HD 16-bit columns as HD / 64 swizzled 64-column sub-tiles of ROWS * 128 bytes.

// The first 1024-byte-aligned byte of dynamic shared memory (the 128-byte swizzle's atoms and TMA's destinations
// need it; the kernels' shared-memory sizes include 1 KB of slack for it).
__device__ __forceinline__ unsigned char* align1024(unsigned char* smem) {
  return smem + (1024 - smem_addr(smem) % 1024) % 1024;
}

// Global rows [0, nrows) of HD elements (row stride `stride` elements, 16-byte aligned) -> the swizzled tile of ROWS
// rows at s (1024-byte aligned): sub-tile c / 8 holds the 16-byte chunk c of row r at r * 128 + 16 ((c % 8) ^ (r % 8)).
// Rows >= nrows become zeros. Consecutive threads copy consecutive chunks of a row (coalesced; conflict-free stores).
template <int ROWS, int HD, int NT>
__device__ __forceinline__ void load_tile_sw128(unsigned char* s, const uint16_t* g, int64_t stride, int nrows,
                                                int tid) {
  constexpr int CPR = HD / 8, N = ROWS * CPR;
  static_assert(N % NT == 0, "whole passes");
#pragma unroll
  for (int k = 0; k < N / NT; ++k) {
    const int c = tid + k * NT, r = c / CPR, ch = c % CPR;
    unsigned char* dst = s + (ch / 8) * (ROWS * 128) + swizzle128(uint32_t(r * 128 + (ch % 8) * 16));
    if (r < nrows)
      cp_async16(dst, g + r * stride + ch * 8);
    else
      *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
  }
}

// Issues acc (64 x N, fp32) = A B^T over HD columns (async; one commit group): A = the 64 rows at a_addr of a tile of
// A_ROWS rows, B = the N rows at b_addr of a tile of B_ROWS rows (both K-major). k-step kk reads columns 16 kk.. of
// both: sub-tile kk / 4, 32 (kk % 4) bytes in.
template <class E, int N, int HD, int A_ROWS, int B_ROWS>
__device__ __forceinline__ void issue_abt(float (&acc)[N / 2], uint32_t a_addr, uint32_t b_addr) {
#pragma unroll
  for (int i = 0; i < N / 2; ++i) acc[i] = 0.0f;
  const uint64_t da = make_desc(a_addr, 16), db = make_desc(b_addr, 16);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < HD / 16; ++kk) {
    const uint32_t col = (kk % 4) * 32;
    wgmma_ss<E, N>(acc, desc_at(da, (kk / 4) * (A_ROWS * 128) + col), desc_at(db, (kk / 4) * (B_ROWS * 128) + col),
                   kk > 0);
  }
  wgmma_commit();
}

// Issues acc (64 x HD, fp32) += A B (async; one commit group): A (64 x K) from registers (a[k]: k-step k, as pack_a
// gives), B = the tile of K rows at b_addr read N-major (row k, column n): k-step k reads rows 16 k.. of each
// sub-tile (16 rows of 128 bytes in), the sub-tiles K * 128 bytes apart. KU < K: only the first KU rows of B and
// columns of A (the rest of A must be zero: the attention forward's tail key block).
template <class E, int HD, int K, int KU = K>
__device__ __forceinline__ void issue_ab(float (&acc)[HD / 2], uint32_t (&a)[K / 16][4], uint32_t b_addr) {
  static_assert(KU % 16 == 0 && KU <= K, "whole k-steps");
#pragma unroll
  for (int k = 0; k < K / 16; ++k) fence_operands(a[k]);
  fence_operands(acc);
  wgmma_fence();
  const uint64_t db = make_desc(b_addr, K * 128);
#pragma unroll
  for (int k = 0; k < KU / 16; ++k) wgmma_rs_nmajor<E, HD>(acc, a[k], desc_at(db, k * 16 * 128));
  wgmma_commit();
}

// Issues acc (64 x N, fp32) = A B (async; one commit group) with both operands from shared memory stored K rows by
// 64 columns (A^T and B: M-major and N-major, N <= 64): the tiles of K rows at a_addr and b_addr; k-step k reads rows
// 16 k.. of both (16 rows of 128 bytes in).
template <class E, int N, int K>
__device__ __forceinline__ void issue_ab_mn(float (&acc)[N / 2], uint32_t a_addr, uint32_t b_addr) {
  static_assert(N <= 64, "one 64-column sub-tile of B");
#pragma unroll
  for (int i = 0; i < N / 2; ++i) acc[i] = 0.0f;
  const uint64_t da = make_desc(a_addr, K * 128), db = make_desc(b_addr, K * 128);
  wgmma_fence();
#pragma unroll
  for (int k = 0; k < K / 16; ++k) wgmma_ss_mn<E, N>(acc, desc_at(da, k * 16 * 128), desc_at(db, k * 16 * 128), k > 0);
  wgmma_commit();
}

// An fp32 result (64 x N) packed to 16 bits as the A registers of a 64 x N left operand: n-tiles 2k, 2k + 1 are
// k-step k.
template <class E, int N>
__device__ __forceinline__ void pack_a(uint32_t (&a)[N / 16][4], const float (&x)[N / 2]) {
#pragma unroll
  for (int k = 0; k < N / 16; ++k) {
    a[k][0] = E::pack(x[8 * k], x[8 * k + 1]);
    a[k][1] = E::pack(x[8 * k + 2], x[8 * k + 3]);
    a[k][2] = E::pack(x[8 * k + 4], x[8 * k + 5]);
    a[k][3] = E::pack(x[8 * k + 6], x[8 * k + 7]);
  }
}

}  // namespace sm90
}  // namespace attn
}  // namespace cuda
}  // namespace pyattn
