// GRU CPU kernels: one direction of one layer, forward and BPTT (a cell is T = 1). Torch-free: see the GRU section
// of pyattn/params.h for the contract and the formulas.
//
// Forward
//   1. gi = X W_ih^T for all T * B rows at once (one GEMM; the biases are added in step 3).
//   2. W_hh is packed once per call, gate-interleaved: panel p holds hidden units [p*NB, p*NB + NB) of all three
//      gates, laid out [k][r | z | n][NB], so one register tile computes gh_r, gh_z and gh_n of the same units and
//      the gate math runs on the accumulators (no gh round trip through memory).
//   3. Per step: one small GEMM h (B, H) @ packed W_hh with the fused epilogue (biases, sigmoid, tanh, h', the
//      workspace [r | z | n | hn]). Batch rows never interact, so the work items are blocks of MRMAX batch rows,
//      each running the whole sequence: threads never wait for each other between steps. Small problems (e.g.
//      B = 1, H = 128) run on the calling thread alone.
//   A single step (a cell, T = 1) packs nothing whole (cell_fwd): its work items are panels of NB hidden units,
//   each packing its rows of W_ih and W_hh into a thread buffer and running every batch sliver through the same
//   micro-kernel, so a cell keeps the bits of a layer's step.
// Backward
//   Per step (processing order reversed): dh_prev = dGh_t W_hh (W_hh packed once in [panel][k][NB] form) with the
//   epilogue dh_prev += dh z, += dout of the step before, then that step's gate-gradient math; again one work item
//   per block of batch rows. After the loop: dx = dGi W_ih, dW_ih = dGi^T X, dW_hh = dGh^T Hprev as big GEMMs,
//   db = column sums. A single step (T = 1) uses W_hh and W_ih once: the micro-kernel reads their rows in place
//   (they are already the k-major panels it wants) and only a partial last panel is copied; same summation order.
//   Its dGh W_hh runs in two phases (every row's gate math, then groups of panels, each used by all batch slivers)
//   so that W_hh is read from memory once rather than once per sliver.
// GEMM: Goto-style, K blocked (KC depends only on K), B packed in NB-wide panels, A packed in MR-row slivers, an
// MR x (NV * NB) register-tiled FMA micro-kernel (MR * NV accumulators); work items are groups of slivers x chunks
// of 256 columns (a chunk's K block stays in L2 for the group's slivers). Every output element is summed in a fixed
// order (k ascending within a K block, blocks in order) whatever the thread count: results are deterministic and
// independent of the number of threads.
// SIMD: the shared vector layer pyattn/cpu_simd.h (AVX-512 NB = 16, AVX2 + FMA NB = 8, or portable NB = 4).
// dtypes: fp32; fp16 / bf16 through fp32 copies, or for bf16 on AVX512_BF16 CPUs with every GEMM on bf16 pairs
// (vdpbf16ps): the "16-bit storage" section at the end.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "pyattn/cpu_kernels.h"
#include "pyattn/cpu_parallel.h"
#include "pyattn/cpu_simd.h"
#include "pyattn/params.h"

namespace pyattn {
namespace cpu {
namespace {

using namespace simd;

// Parallel loops: run_items (pyattn/cpu_parallel.h), independent items claimed from one atomic counter.
constexpr double kMinParallelGemm = double(1 << 21);  // multiply-adds below which a GEMM runs on one thread
constexpr double kMinParallelStep = double(1 << 19);  // multiply-adds per recurrent step, same
constexpr double kMinParallelCell = double(1 << 17);  // same for one step (a cell): at small B it is bound by
                                                      // reading W, which two cores do faster than one

inline int64_t round16(int64_t n) { return (n + 15) / 16 * 16; }  // keeps workspace regions 64-byte aligned

// ------------------------------------------------------------------------------------------------------------
// Micro-kernel: tile (MR x NV*NB) = A sliver (K x MR, packed: a[k * MR + i]) times NV vectors of B per k
// (vector q at bq[q] + k * ldb). Written to `tile` with row stride TLD.
// ------------------------------------------------------------------------------------------------------------
constexpr int NVMAX = 6;
constexpr int TLD = NVMAX * NB;

// Ops (pyattn/cpu_simd.h): F32Ops, or BF16PairOps for bf16 layers where the CPU has AVX512_BF16; then a, the B
// vectors and K count words of two bf16 values adjacent along k (stored as floats: the packers only move bits).
template <class Ops, int MR, int NV>
void micro_kernel(const float* __restrict a, int64_t K, const float* const* bq, int64_t ldb, float* __restrict tile) {
  const auto* ae = reinterpret_cast<const typename Ops::E*>(a);
  V acc[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 6
    for (int q = 0; q < NV; ++q) acc[i][q] = vzero();
  const float* b[NV];
#pragma GCC unroll 6
  for (int q = 0; q < NV; ++q) b[q] = bq[q];
  for (int64_t k = 0; k < K; ++k) {
    V w[NV];
#pragma GCC unroll 6
    for (int q = 0; q < NV; ++q) w[q] = vld(b[q] + k * ldb);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const V s = Ops::bcast(ae + k * MR + i);
#pragma GCC unroll 6
      for (int q = 0; q < NV; ++q) acc[i][q] = Ops::fma(s, w[q], acc[i][q]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 6
    for (int q = 0; q < NV; ++q) vst(tile + i * TLD + q * NB, acc[i][q]);
}

using MicroKernel = void (*)(const float*, int64_t, const float* const*, int64_t, float*);

#define PYATTN_GRU_MK_ROW(MR)                                                                                    \
  {                                                                                                              \
    nullptr, &micro_kernel<Ops, MR, 1>, &micro_kernel<Ops, MR, 2>, &micro_kernel<Ops, MR, 3>,                     \
        &micro_kernel<Ops, MR, 4>, &micro_kernel<Ops, MR, 5>, &micro_kernel<Ops, MR, 6>                           \
  }
template <class Ops>
#if PYATTN_CPU_ISA == 512
const MicroKernel kMicroKernels[MRMAX + 1][NVMAX + 1] = {
    {nullptr},           PYATTN_GRU_MK_ROW(1), PYATTN_GRU_MK_ROW(2), PYATTN_GRU_MK_ROW(3), PYATTN_GRU_MK_ROW(4),
    PYATTN_GRU_MK_ROW(5), PYATTN_GRU_MK_ROW(6), PYATTN_GRU_MK_ROW(7), PYATTN_GRU_MK_ROW(8)};
#else
const MicroKernel kMicroKernels[MRMAX + 1][NVMAX + 1] = {
    {nullptr}, PYATTN_GRU_MK_ROW(1), PYATTN_GRU_MK_ROW(2), PYATTN_GRU_MK_ROW(3), PYATTN_GRU_MK_ROW(4)};
#endif
#undef PYATTN_GRU_MK_ROW

inline int nv_max(int mr) { return std::min(NVMAX, ACC_MAX / mr); }
// End of the panel group of one micro-kernel call that starts at panel pn: at most nvm panels, never across the
// border p0 between panels read in place and packed ones (np panels in all), nor past `end`.
inline int64_t group_end(int64_t pn, int nvm, int64_t p0, int64_t np, int64_t end) {
  return std::min<int64_t>({pn + nvm, pn < p0 ? p0 : np, end});
}

// A matrix view for packing: element (r, c) at p[row(r) + c * cs], row(r) = (r / rin) * rs_out + (r % rin) * rs_in.
// The two-level row lets a (T, B, I) tensor with any t/b strides act as a (T * B, I) matrix.
struct Mat {
  const float* p;
  int64_t rs_out, rs_in, rin, cs;
  int64_t row(int64_t r) const { return rin == 1 ? r * rs_out : (r / rin) * rs_out + (r % rin) * rs_in; }
};
inline Mat row_major(const float* p, int64_t ld) { return Mat{p, ld, 0, 1, 1}; }
inline Mat col_major(const float* p, int64_t ld) { return Mat{p, 1, 0, 1, ld}; }  // the transpose of row_major

// A sliver: dst[kk * mr + i] = A(m0 + i, k0 + kk).
// Full slivers of row-major rows are transposed a square block at a time (8 x 8 with AVX, 4 x 4 with SSE).
#if PYATTN_CPU_ISA == 512
constexpr int kTransposeBlock = 8;
inline void transpose_block(const float* const* src, int64_t kk, float* dst) {  // dst[j * 8 + i] = src[i][kk + j]
  const __m256 r0 = _mm256_loadu_ps(src[0] + kk), r1 = _mm256_loadu_ps(src[1] + kk);
  const __m256 r2 = _mm256_loadu_ps(src[2] + kk), r3 = _mm256_loadu_ps(src[3] + kk);
  const __m256 r4 = _mm256_loadu_ps(src[4] + kk), r5 = _mm256_loadu_ps(src[5] + kk);
  const __m256 r6 = _mm256_loadu_ps(src[6] + kk), r7 = _mm256_loadu_ps(src[7] + kk);
  const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
  const __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
  const __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
  const __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
  _mm256_storeu_ps(dst + 0, _mm256_permute2f128_ps(s0, s4, 0x20));
  _mm256_storeu_ps(dst + 8, _mm256_permute2f128_ps(s1, s5, 0x20));
  _mm256_storeu_ps(dst + 16, _mm256_permute2f128_ps(s2, s6, 0x20));
  _mm256_storeu_ps(dst + 24, _mm256_permute2f128_ps(s3, s7, 0x20));
  _mm256_storeu_ps(dst + 32, _mm256_permute2f128_ps(s0, s4, 0x31));
  _mm256_storeu_ps(dst + 40, _mm256_permute2f128_ps(s1, s5, 0x31));
  _mm256_storeu_ps(dst + 48, _mm256_permute2f128_ps(s2, s6, 0x31));
  _mm256_storeu_ps(dst + 56, _mm256_permute2f128_ps(s3, s7, 0x31));
}
#elif PYATTN_CPU_ISA == 256
constexpr int kTransposeBlock = 4;
inline void transpose_block(const float* const* src, int64_t kk, float* dst) {  // dst[j * 4 + i] = src[i][kk + j]
  __m128 r0 = _mm_loadu_ps(src[0] + kk), r1 = _mm_loadu_ps(src[1] + kk);
  __m128 r2 = _mm_loadu_ps(src[2] + kk), r3 = _mm_loadu_ps(src[3] + kk);
  _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
  _mm_storeu_ps(dst + 0, r0);
  _mm_storeu_ps(dst + 4, r1);
  _mm_storeu_ps(dst + 8, r2);
  _mm_storeu_ps(dst + 12, r3);
}
#else
constexpr int kTransposeBlock = 0;
inline void transpose_block(const float* const*, int64_t, float*) {}
#endif

void pack_a(const Mat& A, int64_t m0, int mr, int64_t k0, int64_t kc, float* __restrict dst) {
  if (A.rin == 1 && A.rs_out == 1) {  // rows adjacent (a transposed row-major matrix): mr contiguous values per k
    const float* s = A.p + m0 + k0 * A.cs;
    for (int64_t kk = 0; kk < kc; ++kk) vstn(dst + kk * mr, vldn(s + kk * A.cs, mr), mr);
    return;
  }
  const float* src[MRMAX];
  for (int i = 0; i < mr; ++i) src[i] = A.p + A.row(m0 + i) + k0 * A.cs;
  if (A.cs == 1) {
    int64_t kk = 0;
    if (kTransposeBlock == MRMAX && mr == MRMAX)
      for (; kk + kTransposeBlock <= kc; kk += kTransposeBlock) transpose_block(src, kk, dst + kk * MRMAX);
    for (; kk < kc; ++kk)
      for (int i = 0; i < mr; ++i) dst[kk * mr + i] = src[i][kk];
  } else {
    for (int64_t kk = 0; kk < kc; ++kk)
      for (int i = 0; i < mr; ++i) dst[kk * mr + i] = src[i][kk * A.cs];
  }
}

// A B panel: dst[kk * NB + j] = B(k0 + kk, n0 + j) for j < nn, 0 for nn <= j < NB.
void pack_b(const Mat& B, int64_t k0, int64_t kc, int64_t n0, int nn, float* __restrict dst) {
  if (B.cs == 1) {
    for (int64_t kk = 0; kk < kc; ++kk) vst(dst + kk * NB, vldn(B.p + B.row(k0 + kk) + n0, nn));
  } else {
    for (int64_t kk = 0; kk < kc; ++kk) {
      const float* s = B.p + B.row(k0 + kk) + n0 * B.cs;
      float* d = dst + kk * NB;
      for (int j = 0; j < nn; ++j) d[j] = s[j * B.cs];
      for (int j = nn; j < NB; ++j) d[j] = 0.0f;
    }
  }
}

// ------------------------------------------------------------------------------------------------------------
// GEMM: C (M, N), row stride ldc, = A (M, K) B (K, N)
// ------------------------------------------------------------------------------------------------------------
inline int64_t gemm_kc(int64_t K) { return K <= 384 ? K : 256; }
constexpr int64_t kGemmChunkPanels = 256 / NB;  // sgemm's column chunk: 256 columns

// Scratch of sgemm: the whole of B packed (K x N rounded up to panels) and one A sliver (MRMAX x KC) per thread.
int64_t sgemm_scratch_floats(int64_t N, int64_t K, int nt) {
  return round16(std::max<int64_t>(K, 1) * ceil_div(N, NB) * NB) + std::max(nt, 1) * round16(MRMAX * gemm_kc(K));
}

// B is packed by the caller (a few percent of the GEMM at most: it is K x N against M x N x K multiply-adds), then
// the items are groups of MRMAX-row slivers, each over all K blocks in order (C = block 0, then C += block 1, ...),
// so every C element is summed in the same order whatever the threads. b_in_place (for a B used by few rows): a
// row-major B's full NB-wide panels are read where they are (its rows are k-major already), only a partial last
// panel is packed; the same products in the same order.
// With BF16PairOps, K counts words (A's and B's elements are words of two bf16 along k; the packers move bits).
// c16 (a 16-bit C with row stride ldc, else nullptr): the last K block stores C rounded there (from_f32's bits)
// instead of into the fp32 C, which then holds only the partial sums of earlier blocks (untouched with one block).
template <class Ops = F32Ops, class T16 = bf16_t>
void sgemm(int64_t M, int64_t N, int64_t K, const Mat& A, const Mat& B, float* C, int64_t ldc, float* scratch,
           int nt, bool b_in_place = false, T16* c16 = nullptr) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    for (int64_t m = 0; m < M; ++m) {
      if (c16)
        std::memset(static_cast<void*>(c16 + m * ldc), 0, sizeof(T16) * N);  // +0 in both 16-bit formats
      else
        std::memset(C + m * ldc, 0, sizeof(float) * N);
    }
    return;
  }
  const int64_t kc_full = gemm_kc(K), np = ceil_div(N, NB), npad = np * NB;
  const int64_t nsliver = ceil_div(M, MRMAX);
  const int64_t p0 = b_in_place && B.cs == 1 && B.rin == 1 ? N / NB : 0;  // panels [0, p0) read in place
  float* bpack = scratch;  // K block starting at k0 (kc rows), panel pn: bpack + k0 * npad + pn * kc * NB
  float* apack0 = scratch + round16(K * npad);
  for (int64_t k0 = 0; k0 < K; k0 += kc_full) {
    const int64_t kc = std::min(kc_full, K - k0);
    for (int64_t pn = p0; pn < np; ++pn)
      pack_b(B, k0, kc, pn * NB, int(std::min<int64_t>(NB, N - pn * NB)), bpack + k0 * npad + pn * kc * NB);
  }
  const int nth = double(M) * double(N) * double(K) < kMinParallelGemm ? 1 : std::max(nt, 1);
  // Items: groups of sg slivers x chunks of kGemmChunkPanels panels. A chunk's K block (kc x 256 floats, 256 KB)
  // stays in L2 while the group's slivers use it, so a large B (a cell's weights in the backward: W_ih is 12 MB at
  // I = H = 1024) is read from memory once per group, not once per sliver.
  const int64_t nchunk = ceil_div(np, kGemmChunkPanels);
  const int64_t sg = nth == 1 ? nsliver
                              : std::max<int64_t>(1, std::min<int64_t>(32, nsliver * nchunk / (4 * nth)));
  const int64_t ngroup = ceil_div(nsliver, sg);
  run_items(nth, ngroup * nchunk, [&](int64_t g, int tid) {
    float* apack = apack0 + tid * round16(MRMAX * kc_full);
    alignas(64) float tile[MRMAX * TLD];
    const float* bq[NVMAX];
    const int64_t s0 = g % ngroup * sg, s1 = std::min(nsliver, s0 + sg);
    const int64_t c0 = g / ngroup * kGemmChunkPanels, c1 = std::min(np, c0 + kGemmChunkPanels);
    for (int64_t k0 = 0; k0 < K; k0 += kc_full) {
      const int64_t kc = std::min(kc_full, K - k0);
      const float* bk = bpack + k0 * npad;
      for (int64_t sl = s0; sl < s1; ++sl) {
        const int64_t m0 = sl * MRMAX;
        const int mr = int(std::min<int64_t>(MRMAX, M - m0));
        pack_a(A, m0, mr, k0, kc, apack);
        const int nvm = nv_max(mr);
        for (int64_t pn = c0; pn < c1;) {
          const bool in_place = pn < p0;  // a group of panels is all in place or all packed
          const int nv = int(group_end(pn, nvm, p0, np, c1) - pn);
          for (int q = 0; q < nv; ++q) bq[q] = in_place ? B.p + B.row(k0) + (pn + q) * NB : bk + (pn + q) * kc * NB;
          kMicroKernels<Ops>[mr][nv](apack, kc, bq, in_place ? B.rs_out : NB, tile);
          const bool to16 = c16 && k0 + kc == K;
          for (int i = 0; i < mr; ++i) {
            float* crow = C + (m0 + i) * ldc;
            for (int q = 0; q < nv; ++q) {
              const int64_t c0 = (pn + q) * NB;
              const int nn = int(std::min<int64_t>(NB, N - c0));
              V v = vld(tile + i * TLD + q * NB);
              if (k0 > 0) v = vadd(vldn(crow + c0, nn), v);
              if (to16)
                vst16(c16 + (m0 + i) * ldc + c0, v, nn);
              else
                vstn(crow + c0, v, nn);
            }
          }
          pn += nv;
        }
      }
    }
  });
}

// dst[c] = sum over rows r (ascending) of src[r * ld + c], c < C.
void col_sums(const float* src, int64_t R, int64_t C, int64_t ld, float* dst, int nt) {
  constexpr int CH = 4;  // vectors per column chunk
  const int64_t nchunk = ceil_div(C, CH * NB);
  const int nth = double(R) * double(C) < kMinParallelGemm ? 1 : std::max(nt, 1);
  run_items(
      nth, nchunk,
      [&](int64_t ch, int) {
        const int64_t c0 = ch * CH * NB;
        V acc[CH];
        int nn[CH];
        for (int q = 0; q < CH; ++q) {
          acc[q] = vzero();
          nn[q] = int(std::max<int64_t>(0, std::min<int64_t>(NB, C - c0 - q * NB)));
        }
        for (int64_t r = 0; r < R; ++r) {
          const float* s = src + r * ld + c0;
          for (int q = 0; q < CH; ++q)
            if (nn[q] > 0) acc[q] = vadd(acc[q], vldn(s + q * NB, nn[q]));
        }
        for (int q = 0; q < CH; ++q)
          if (nn[q] > 0) vstn(dst + c0 + q * NB, acc[q], nn[q]);
      });
}

// Biases of nj hidden units [j0, j0 + nj), one vector per gate and side (0 without that bias).
struct GateBias {
  V ir, iz, in, hr, hz, hn;
};

GateBias gate_bias(const float* b_ih, const float* b_hh, int64_t H, int64_t j0, int nj) {
  auto ld = [&](const float* b, int gate) { return b ? vldn(b + gate * H + j0, nj) : vzero(); };
  return {ld(b_ih, 0), ld(b_ih, 1), ld(b_ih, 2), ld(b_hh, 0), ld(b_hh, 1), ld(b_hh, 2)};
}

// h rounded to the storage type `st` (kept in fp32): the 16-bit path's state (see "16-bit storage" below).
inline V round_to(V h, DType st) {
  if (st == DType::F32) return h;
  alignas(64) float t[NB];
  alignas(32) uint16_t b[NB];
  if (st == DType::BF16) {
    vst16(reinterpret_cast<bf16_t*>(b), h, NB);
    row_to_f32(reinterpret_cast<const bf16_t*>(b), t, NB);
  } else {
    vst16(reinterpret_cast<f16_t*>(b), h, NB);
    row_to_f32(reinterpret_cast<const f16_t*>(b), t, NB);
  }
  return vld(t);
}

// The gate math of nj hidden units of one batch row: gi / gh without biases (gate g at gi + g * gis, gh + g * ghs),
// hp the state before the step; writes h' (rounded to the storage type st) and, with w != nullptr, the workspace
// row [r | z | n | hn] (stride H).
inline void gate_fwd(const float* gi, int64_t gis, const float* gh, int64_t ghs, const GateBias& b, const float* hp,
                     float* hout, float* w, int64_t H, int nj, DType st) {
  const V r = vsigmoid(vadd(vadd(vldn(gi, nj), b.ir), vadd(vldn(gh, nj), b.hr)));
  const V z = vsigmoid(vadd(vadd(vldn(gi + gis, nj), b.iz), vadd(vldn(gh + ghs, nj), b.hz)));
  const V hn = vadd(vldn(gh + 2 * ghs, nj), b.hn);
  const V n = vtanh(vfma(r, hn, vadd(vldn(gi + 2 * gis, nj), b.in)));
  vstn(hout, round_to(vfma(z, vsub(vldn(hp, nj), n), n), st), nj);  // n + z (h - n)
  if (w) {
    vstn(w, r, nj);
    vstn(w + H, z, nj);
    vstn(w + 2 * H, n, nj);
    vstn(w + 3 * H, hn, nj);
  }
}

// Threads for the recurrence. Its items are blocks of MRMAX batch rows, each running the whole sequence (batch rows
// never interact), so the threads never wait for each other between steps. Batches of one row block, and small
// steps (e.g. B = 1, H = 128), run on the calling thread.
int step_threads(int64_t B, int64_t H, int nt) {
  const double work = double(B) * double(3 * H) * double(H);
  return work < kMinParallelStep ? 1 : int(std::min<int64_t>(std::max(nt, 1), ceil_div(B, MRMAX)));
}

// ------------------------------------------------------------------------------------------------------------
// bf16 pairs (BF16PairOps): bf16 layers on AVX512_BF16 CPUs run their GEMMs on words of two bf16 adjacent along k
// ------------------------------------------------------------------------------------------------------------
// Taken for every bf16 call where the build has PYATTN_CPU_BF16_DOT. x, W_ih and W_hh are read as words where they
// are (fwd16's pair_operands) or interleaved in pairs of rows (the backward), the state's rows are converted at every
// step (exact: gate_fwd rounded them to bf16), the backward's gate gradients are rounded to bf16 (bwd_impl).
// Products are exact and summed in fp32, as in the fp32 path.
template <class Params>
bool use_pairs(const Params& p) { return PYATTN_CPU_BF16_DOT && p.dtype == DType::BF16; }

// Elements along k of a GEMM over K values: K, or ceil(K / 2) words for BF16PairOps.
template <class Ops>
int64_t kdim(int64_t K) { return (K + Ops::kPer - 1) / Ops::kPer; }

// Threads for a conversion pass over n elements (copies, pairs, widening, narrowing).
int conversion_threads(int64_t n, int nt) { return double(n) < kMinParallelCell ? 1 : std::max(nt, 1); }

inline uint32_t bf16_pair(float lo, float hi) { return uint32_t(f32_to_bf16(lo)) | uint32_t(f32_to_bf16(hi)) << 16; }

// d[c2] = the pair (s[2 c2], s[2 c2 + 1]) rounded to bf16 (0 past C), c2 < ceil(C / 2); d holds words.
void row_to_pairs(const float* s, int64_t C, float* d) {
  uint32_t* w = reinterpret_cast<uint32_t*>(d);
  int64_t c = 0;
#if PYATTN_CPU_BF16_DOT
  for (; c + 2 * NB <= C; c += 2 * NB)
    _mm512_storeu_si512(w + c / 2, (__m512i)_mm512_cvtne2ps_pbh(vld(s + c + NB), vld(s + c)));
#endif
  for (; c < C; c += 2) w[c / 2] = bf16_pair(s[c], c + 1 < C ? s[c + 1] : 0.0f);
}

// The words (lo[l], hi[l]) rounded to bf16, l < NB.
inline V pair_vec(V lo, V hi) {
#if PYATTN_CPU_BF16_DOT
  const __m512i l = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(lo));
  const __m512i h = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(hi));
  return _mm512_castsi512_ps(_mm512_or_si512(l, _mm512_slli_epi32(h, 16)));
#else
  alignas(64) float a[NB], b[NB];
  vst(a, lo);
  vst(b, hi);
  for (int l = 0; l < NB; ++l) a[l] = bits_to_f32(bf16_pair(a[l], b[l]));
  return vld(a);
#endif
}

// The words (lo[l], hi[l]) of nn fp32 values each rounded to bf16 (hi nullptr: 0), lanes >= nn 0.
inline V pair_vec(const float* lo, const float* hi, int nn) {
  return pair_vec(vldn(lo, nn), hi ? vldn(hi, nn) : vzero());
}

// The words (lo[l], hi[l]) of nn bf16 values each (hi nullptr: 0), lanes >= nn 0.
inline V pair_vec(const bf16_t* lo, const bf16_t* hi, int nn) {
#if PYATTN_CPU_BF16_DOT
  const __mmask16 m = lane_mask(nn);
  const __m512i l = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, lo));
  const __m512i h = hi ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, hi)) : _mm512_setzero_si512();
  return _mm512_castsi512_ps(_mm512_or_si512(l, _mm512_slli_epi32(h, 16)));
#else
  alignas(64) uint32_t w[NB] = {};
  for (int j = 0; j < nn; ++j) w[j] = uint32_t(lo[j].bits) | uint32_t(hi ? hi[j].bits : 0) << 16;
  return vld(reinterpret_cast<const float*>(w));
#endif
}

// d[k2 * N + n] = the pair (row(2 k2)[n], row(2 k2 + 1)[n]) (row K reads as 0 when K is odd), k2 < ceil(K / 2): a
// (K, N) matrix, fp32 (rounded to bf16) or bf16 (exact), whose row k is at row(k), as the B operand of a pair GEMM
// over k (rows k2 of N words).
template <class Row>
void rows_interleaved(Row row, int64_t K, int64_t N, float* d, int nt) {
  run_items(conversion_threads(K * N, nt), (K + 1) / 2, [&](int64_t k2, int) {
    const auto* lo = row(2 * k2);
    const decltype(lo) hi = 2 * k2 + 1 < K ? row(2 * k2 + 1) : nullptr;
    for (int64_t n = 0; n < N; n += NB) {
      const int nn = int(std::min<int64_t>(NB, N - n));
      vstn(d + k2 * N + n, pair_vec(lo + n, hi ? hi + n : nullptr, nn), nn);
    }
  });
}
// The rows of a matrix at s with row stride rs, for rows_interleaved.
template <class T>
auto rows_at(const T* s, int64_t rs) {
  return [s, rs](int64_t k) { return s + k * rs; };
}

// The panel of NB columns of a bf16 (K, N) matrix starting at src (row stride rs; nn <= NB valid columns) as
// pairs of rows: dst[k2 * NB + l] = the words (src[2 k2][l], src[2 k2 + 1][l]), k2 < ceil(K / 2).
void pair_panel(const bf16_t* src, int64_t rs, int64_t K, int nn, float* dst) {
  for (int64_t k2 = 0; 2 * k2 < K; ++k2)
    vst(dst + k2 * NB, pair_vec(src + 2 * k2 * rs, 2 * k2 + 1 < K ? src + (2 * k2 + 1) * rs : nullptr, nn));
}

// Rows r < R of s (row stride rs, C values) as rows of ceil(C / 2) words at d.
void rows_to_pairs(const float* s, int64_t rs, int64_t R, int64_t C, float* d, int nt) {
  const int64_t C2 = (C + 1) / 2;
  run_items(conversion_threads(R * C, nt), R, [&](int64_t r, int) { row_to_pairs(s + r * rs, C, d + r * C2); });
}

// ------------------------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------------------------
struct FwdLayout {
  int64_t wp, gi, gemm, sliver, xs, hs, xw, hw, wiw, whw, total;  // *w: the pair path's word copies
};

// A single step (a cell): forward and backward use each weight once, so neither packs a whole weight matrix.
template <class Params>
bool one_step(const Params& p) { return p.T == 1; }

// Floats of one thread's W panels in cell_fwd: NB hidden units of all three gates of W_ih (I rows) and W_hh (H).
int64_t cell_panel_floats(int64_t I, int64_t H) { return round16(3 * NB * (I + H)); }

FwdLayout fwd_layout(const GRUFwdParams& p) {
  const int kp = use_pairs(p) ? 2 : 1;
  const int64_t P = ceil_div(p.H, NB), I = ceil_div(p.I, kp), H = ceil_div(p.H, kp), G = 3 * p.H;
  const int nt = std::max(p.num_threads, 1);
  FwdLayout l{};
  int64_t end = 0;
  if (one_step(p)) {  // cell_fwd: x and h as batch slivers, W panels per thread
    l.xs = 0;
    l.hs = l.xs + round16(p.B * I);
    l.wp = l.hs + round16(p.B * H);
    end = l.wp + nt * cell_panel_floats(I, H);
  } else {
    l.wp = 0;
    l.gi = l.wp + round16(P * H * 3 * NB);
    l.gemm = l.gi + round16(p.T * p.B * G);
    l.sliver = l.gemm + sgemm_scratch_floats(G, I, nt);
    end = l.sliver + nt * round16(MRMAX * H) * kp;  // a sliver per thread (pairs: and the rows it is packed from)
  }
  if (kp == 2) {  // copies of the operands as words, where they cannot be read in place (fwd16)
    l.xw = end;
    l.hw = l.xw + round16(p.T * p.B * I);
    l.wiw = l.hw + round16(p.B * H);
    l.whw = l.wiw + round16(G * I);
    end = l.whw + round16(G * H);
  }
  l.total = end;
  return l;
}

// The rows of W (3H, K; row stride wrs) for hidden units [j0, j0 + NB) of all three gates, as the recurrence's
// packed panel: dst[k * 3NB + gate * NB + l] = W[gate * H + j0 + l][k], 0 past H.
void pack_gate_panel(const float* w, int64_t wrs, int64_t H, int64_t K, int64_t j0, float* __restrict dst) {
  const int nn = int(std::min<int64_t>(NB, H - j0));
  for (int gate = 0; gate < 3; ++gate) {
    const float* src = w + (gate * H + j0) * wrs;
    float* d = dst + gate * NB;
    int64_t k = 0;
    if (nn == NB)
      for (; k + NB <= K; k += NB) transpose_nb(src + k, wrs, d + k * 3 * NB, 3 * NB);
    for (; k < K; ++k)
      for (int l = 0; l < NB; ++l) d[k * 3 * NB + l] = l < nn ? src[l * wrs + k] : 0.0f;
  }
}

// The 16-bit storage type T's values at src (n of them) widened into dst, by dtype.
inline void row_to_f32_dt(const void* src, DType dt, float* dst, int64_t n) {
  if (dt == DType::BF16)
    row_to_f32(static_cast<const bf16_t*>(src), dst, n);
  else
    row_to_f32(static_cast<const f16_t*>(src), dst, n);
}

// pack_gate_panel from a 16-bit W (dtype dt, element strides), widened on the way: a block of NB rows x NB k at a
// time is widened into a buffer and transposed from there.
void pack_gate_panel16(const void* w, DType dt, int64_t wrs, int64_t H, int64_t K, int64_t j0, float* __restrict dst) {
  const int nn = int(std::min<int64_t>(NB, H - j0));
  const size_t esz = 2;  // bytes of a 16-bit element
  alignas(64) float blk[NB * NB];
  for (int gate = 0; gate < 3; ++gate) {
    const char* src = static_cast<const char*>(w) + (gate * H + j0) * wrs * esz;
    float* d = dst + gate * NB;
    for (int64_t k = 0; k < K; k += NB) {
      const int kk = int(std::min<int64_t>(NB, K - k));
      for (int l = 0; l < NB; ++l) {
        if (l < nn)
          row_to_f32_dt(src + (l * wrs + k) * esz, dt, blk + l * NB, kk);
        for (int c = l < nn ? kk : 0; c < NB; ++c) blk[l * NB + c] = 0.0f;
      }
      if (kk == NB) {
        transpose_nb(blk, NB, d + k * 3 * NB, 3 * NB);
      } else {
        for (int c = 0; c < kk; ++c)
          for (int l = 0; l < NB; ++l) d[(k + c) * 3 * NB + l] = blk[l * NB + c];
      }
    }
  }
}

// The forward's tensors, typed.
struct FwdTensors {  // x and the weights reach the GEMMs as FwdOperands
  const float *h0, *b_ih, *b_hh;
  float* out;
  explicit FwdTensors(const GRUFwdParams& p)
      : h0(static_cast<const float*>(p.h0)), b_ih(static_cast<const float*>(p.b_ih)),
        b_hh(static_cast<const float*>(p.b_hh)), out(static_cast<float*>(p.out)) {}
};

// The forward's GEMM operands as Ops' elements (rows of fp32 values, or of bf16 pairs as words): x as the rows
// t * B + b, h0, W_ih, W_hh.
struct FwdOperands {
  Mat x, h0, w_ih, w_hh;
  const void *w16_ih = nullptr, *w16_hh = nullptr;  // a cell's 16-bit weights (fp32 Ops): panels widened per item
};
FwdOperands fp32_operands(const GRUFwdParams& p) {
  return {Mat{static_cast<const float*>(p.x), p.x_t_stride, p.x_b_stride, p.B, 1},
          row_major(static_cast<const float*>(p.h0), p.h0_row_stride),
          row_major(static_cast<const float*>(p.w_ih), p.w_ih_row_stride),
          row_major(static_cast<const float*>(p.w_hh), p.w_hh_row_stride)};
}

// One step (a cell). x and h are packed as batch slivers once; the work items are panels of NB hidden units (each
// split into chunks of slivers when there are fewer panels than 2 per thread). An item packs its panel of W_ih and
// W_hh (pack_gate_panel) into its thread's buffer and runs every sliver through the micro-kernel, gi in gemm_kc(I)
// K blocks summed as sgemm sums them and gh in one block as the recurrence, then the gate math on the two tiles:
// W is read once, gi and gh never go to memory, and h' has the bits of fwd_impl's packed path.
template <class Ops>
void cell_fwd(const GRUFwdParams& p, const FwdLayout& L, const FwdOperands& op) {
  const int64_t B = p.B, H = p.H, P = ceil_div(H, NB), ns = ceil_div(B, MRMAX);
  const int64_t I = kdim<Ops>(p.I), Hk = kdim<Ops>(H), kc = gemm_kc(I);  // K dims in Ops' elements
  const int nt = std::max(p.num_threads, 1);
  const int nth = double(B) * double(3 * H) * double(p.I + H) < kMinParallelCell ? 1 : nt;
  const FwdTensors io(p);
  float* ws0 = p.workspace;
  float* xs = ws0 + L.xs;  // sliver of rows [m0, m0 + mr): xs + m0 * I, [k][mr]
  float* hs = ws0 + L.hs;  // the same for h: hs + m0 * Hk
  run_items(nth, ns, [&](int64_t sl, int) {
    const int64_t m0 = sl * MRMAX;
    const int mr = int(std::min<int64_t>(MRMAX, B - m0));
    pack_a(op.x, m0, mr, 0, I, xs + m0 * I);
    pack_a(op.h0, m0, mr, 0, Hk, hs + m0 * Hk);
  });
  const int64_t nchunk = nth == 1 ? 1 : std::min<int64_t>(ns, ceil_div(2 * nth, P));
  const int64_t per = ceil_div(ns, nchunk);  // slivers per chunk
  run_items(nth, P * nchunk, [&](int64_t item, int tid) {
    const int64_t j0 = item / nchunk * NB, s0 = item % nchunk * per, s1 = std::min(ns, s0 + per);
    const int nj = int(std::min<int64_t>(NB, H - j0));
    float* wi = ws0 + L.wp + tid * cell_panel_floats(I, Hk);  // [k][r | z | n][NB], I rows of W_ih
    float* wh = wi + 3 * NB * I;                                // and Hk rows of W_hh
    if (op.w16_ih) {
      pack_gate_panel16(op.w16_ih, p.dtype, p.w_ih_row_stride, H, I, j0, wi);
      pack_gate_panel16(op.w16_hh, p.dtype, p.w_hh_row_stride, H, Hk, j0, wh);
    } else {
      pack_gate_panel(op.w_ih.p, op.w_ih.rs_out, H, I, j0, wi);
      pack_gate_panel(op.w_hh.p, op.w_hh.rs_out, H, Hk, j0, wh);
    }
    const GateBias bias = gate_bias(io.b_ih, io.b_hh, H, j0, nj);
    alignas(64) float gi[MRMAX * TLD], gh[MRMAX * TLD];  // row i, gate g at i * TLD + g * NB
    const float* bq[3];
    for (int64_t sl = s0; sl < s1; ++sl) {
      const int64_t m0 = sl * MRMAX;
      const int mr = int(std::min<int64_t>(MRMAX, B - m0));
      if (I == 0) std::memset(gi, 0, sizeof(gi));
      for (int64_t k0 = 0; k0 < I; k0 += kc) {  // gi: block 0, then += each next block (gh as scratch)
        for (int g = 0; g < 3; ++g) bq[g] = wi + k0 * 3 * NB + g * NB;
        kMicroKernels<Ops>[mr][3](xs + m0 * I + k0 * mr, std::min(kc, I - k0), bq, 3 * NB, k0 == 0 ? gi : gh);
        for (int i = 0; i < mr && k0 > 0; ++i) {
          float* acc = gi + i * TLD;
          for (int c = 0; c < 3 * NB; c += NB) vst(acc + c, vadd(vld(acc + c), vld(gh + i * TLD + c)));
        }
      }
      for (int g = 0; g < 3; ++g) bq[g] = wh + g * NB;
      kMicroKernels<Ops>[mr][3](hs + m0 * Hk, Hk, bq, 3 * NB, gh);
      for (int i = 0; i < mr; ++i) {
        const int64_t row = m0 + i;
        gate_fwd(gi + i * TLD, NB, gh + i * TLD, NB, bias, io.h0 + row * p.h0_row_stride + j0, io.out + row * H + j0,
                 p.ws ? p.ws + row * 4 * H + j0 : nullptr, H, nj, p.dtype);
      }
    }
  });
}

// The forward: the GEMM operands `op`, h0 (fp32: the state before step 0), biases, out and scratch fp32; p.dtype
// says how gate_fwd rounds the state.
template <class Ops>
void fwd_impl(const GRUFwdParams& p, const FwdOperands& op) {
  const int64_t T = p.T, B = p.B, H = p.H, G = 3 * H, P = ceil_div(H, NB);
  const FwdLayout L = fwd_layout(p);
  if (one_step(p)) return cell_fwd<Ops>(p, L, op);
  const int64_t I = kdim<Ops>(p.I), Hk = kdim<Ops>(H);  // K dims in Ops' elements
  constexpr bool kPairs = Ops::kPer == 2;
  float* wp = p.workspace + L.wp;  // [P][Hk][3][NB]: W_hh gate-interleaved
  float* gi = p.workspace + L.gi;  // (T * B, 3H): X W_ih^T (no bias)
  const FwdTensors io(p);
  float* ws = p.ws;
  const int nt = std::max(p.num_threads, 1);

  // 1. the input projection of every step at once
  sgemm<Ops>(T * B, G, I, op.x, col_major(op.w_ih.p, op.w_ih.rs_out), gi, G, p.workspace + L.gemm, nt);

  // 2. W_hh, gate-interleaved: wp[pn][k][gate][l] = W_hh[gate * H + pn * NB + l][k] (0 past H)
  for (int64_t pn = 0; pn < P; ++pn)
    pack_gate_panel(op.w_hh.p, op.w_hh.rs_out, H, Hk, pn * NB, wp + pn * Hk * 3 * NB);

  // 3. the recurrence, one item per block of batch rows [m0, m0 + mr)
  run_items(step_threads(B, H, nt), ceil_div(B, MRMAX), [&](int64_t blk, int tid) {
    const int64_t m0 = blk * MRMAX;
    const int mr = int(std::min<int64_t>(MRMAX, B - m0));
    float* sliver = p.workspace + L.sliver + tid * round16(MRMAX * Hk) * Ops::kPer;
    float* rows = sliver + round16(MRMAX * Hk);  // pairs: the state's rows as words, before packing
    alignas(64) float tile[MRMAX * TLD];
    const float* bq[NVMAX];
    const bool two = nv_max(mr) >= 6;  // two hidden panels (6 vectors) per micro-kernel call
    for (int64_t s = 0; s < T; ++s) {
      const int64_t t = p.reverse ? T - 1 - s : s;
      const float* hp = s == 0 ? io.h0 : io.out + (p.reverse ? t + 1 : t - 1) * B * H;  // the state before the step
      const int64_t hrs = s == 0 ? p.h0_row_stride : H;
      Mat h = row_major(hp + m0 * hrs, hrs);  // the sliver's rows
      if (kPairs) {
        for (int i = 0; i < mr; ++i) row_to_pairs(hp + (m0 + i) * hrs, H, rows + i * Hk);
        h = row_major(rows, Hk);
      }
      const float* a = h.p;
      if (mr > 1) {
        pack_a(h, 0, mr, 0, Hk, sliver);
        a = sliver;
      }
      const float* git = gi + t * B * G;
      float* outt = io.out + t * B * H;
      float* wst = ws ? ws + t * B * 4 * H : nullptr;
      for (int64_t pn = 0; pn < P;) {
        const int np = (two && pn + 1 < P) ? 2 : 1;
        for (int q = 0; q < np; ++q)
          for (int gate = 0; gate < 3; ++gate) bq[q * 3 + gate] = wp + (pn + q) * Hk * 3 * NB + gate * NB;
        kMicroKernels<Ops>[mr][3 * np](a, Hk, bq, 3 * NB, tile);  // gh_r | gh_z | gh_n (no bias) of np panels
        for (int q = 0; q < np; ++q) {
          const int64_t j0 = (pn + q) * NB;
          const int nj = int(std::min<int64_t>(NB, H - j0));
          const GateBias bias = gate_bias(io.b_ih, io.b_hh, H, j0, nj);
          for (int i = 0; i < mr; ++i) {
            const int64_t row = m0 + i;
            gate_fwd(git + row * G + j0, H, tile + i * TLD + q * 3 * NB, NB, bias, hp + row * hrs + j0,
                     outt + row * H + j0, wst ? wst + row * 4 * H + j0 : nullptr, H, nj, p.dtype);
          }
        }
        pn += np;
      }
    }
  });
}

}  // namespace

// ------------------------------------------------------------------------------------------------------------
// Backward
// ------------------------------------------------------------------------------------------------------------
namespace {

struct BwdLayout {
  int64_t wq, dgi, dgh, dh, hprev, gemm, sliver, aw, bw, ww, total;  // aw, bw, ww: the pair path's word copies
};

// Panels of W_hh the backward reads in place (one step: its full panels; W_hh's rows are k-major already).
int64_t in_place_panels(const GRUBwdParams& p) { return one_step(p) && p.dtype == DType::F32 ? p.H / NB : 0; }

// A 16-bit one-step backward (bwd16 leaves a cell's weights 16-bit): each work item converts its group of weight
// panels (to pairs, or widened to fp32) right before its slivers use it, so the weights are read once and the
// converted panels stay in cache.
bool panels_per_item(const GRUBwdParams& p) { return one_step(p) && p.dtype != DType::F32; }

// The wq region: W_hh's packed panels, or (panels_per_item) a group of panels per thread.
int64_t wq_floats(const GRUBwdParams& p) {
  const int64_t P = ceil_div(p.H, NB), Gk = ceil_div(3 * p.H, use_pairs(p) ? 2 : 1);
  if (panels_per_item(p)) return std::max(p.num_threads, 1) * round16(int64_t(nv_max(MRMAX)) * Gk * NB);
  return round16((P - in_place_panels(p)) * Gk * NB);
}

// Floats of a thread's sliver in the BPTT loop (pairs: and the rows of words it is packed from).
int64_t bwd_sliver_floats(const GRUBwdParams& p) {
  return use_pairs(p) ? 2 * round16(MRMAX * ceil_div(3 * p.H, 2)) : round16(MRMAX * 3 * p.H);
}

BwdLayout bwd_layout(const GRUBwdParams& p) {
  const int kp = use_pairs(p) ? 2 : 1;
  const int64_t G = 3 * p.H, TB = p.T * p.B, Gk = ceil_div(G, kp), TBk = ceil_div(TB, kp);
  const int nt = std::max(p.num_threads, 1);
  const bool need_w = p.need_weights && p.dw_ih != nullptr;
  BwdLayout l{};
  l.wq = 0;
  l.dgi = l.wq + wq_floats(p);
  l.dgh = l.dgi + round16(TB * G);
  l.dh = l.dgh + round16((need_w ? TB : 2 * p.B) * G);
  l.hprev = l.dh + round16(p.B * p.H);
  l.gemm = l.hprev + (need_w ? round16(TB * p.H) : 0);
  int64_t g = sgemm_scratch_floats(p.I, Gk, nt);
  if (need_w) g = std::max({g, sgemm_scratch_floats(p.I, TBk, nt), sgemm_scratch_floats(p.H, TBk, nt)});
  l.sliver = l.gemm + g;  // a packed sliver per thread; one step: every sliver
  l.aw = l.sliver + (one_step(p) ? round16(ceil_div(p.B, MRMAX) * MRMAX * Gk) : nt * bwd_sliver_floats(p));
  l.total = l.aw;
  if (kp == 2) {  // aw: dGi's rows (or a step's dGh rows) as words, later dGi^T / dGh^T; bw: X / Hprev; ww: W_ih
    l.bw = l.aw + round16(std::max(TB * Gk, TBk * G));
    l.ww = l.bw + round16(TBk * std::max(p.I, p.H));
    l.total = l.ww + round16(Gk * p.I);
  }
  return l;
}

// The pair path's 16-bit results, written by the GEMMs' last K block (sgemm's c16); nullptr: fp32 into p's.
struct Out16 {
  bf16_t *dx = nullptr, *dw_ih = nullptr, *dw_hh = nullptr;
};

// The backward (every operand and result fp32). With BF16PairOps (bf16 layers) its GEMMs run on bf16 pairs: the
// weights, inputs and states are bf16 values already, the gate gradients dGi / dGh are rounded to bf16 for the
// GEMMs (as torch's bf16 autograd stores them); the bias gradients sum them in fp32. Then x, W_ih and W_hh are the
// caller's bf16 tensors, read only by the pair packers; everything else is the 16-bit path's fp32 copies, and dx,
// dW_ih, dW_hh go to o16 (p's fp32 buffers hold only partial sums of earlier K blocks).
template <class Ops>
void bwd_impl(const GRUBwdParams& p, const Out16& o16 = {}) {
  const int64_t T = p.T, B = p.B, I = p.I, H = p.H, G = 3 * H, P = ceil_div(H, NB), TB = T * B;
  constexpr bool kPairs = Ops::kPer == 2;
  const int64_t Gk = kdim<Ops>(G);  // K of dGh W_hh and dGi W_ih in Ops' elements
  const BwdLayout L = bwd_layout(p);
  const int64_t P0 = in_place_panels(p);  // W_hh panels [0, P0) are read in place, [P0, P) from wq
  const bool need_w = p.need_weights && p.dw_ih != nullptr;
  float* wq = p.workspace + L.wq;    // [P - P0][3H][NB]: W_hh (3H, H) as NB-wide column panels
  float* dgi = p.workspace + L.dgi;  // (T * B, 3H), rows t * B + b
  float* dgh = p.workspace + L.dgh;  // (T * B, 3H) when need_w, else two (B, 3H) buffers used alternately
  float* dhb = p.workspace + L.dh;   // (B, H): dL/dh after the step being processed
  const float* dout = static_cast<const float*>(p.dout);
  const float* dh_last = static_cast<const float*>(p.dh_last);
  const float* x = static_cast<const float*>(p.x);
  const float* h0 = static_cast<const float*>(p.h0);
  const float* w_ih = static_cast<const float*>(p.w_ih);
  const float* w_hh = static_cast<const float*>(p.w_hh);
  const float* out = static_cast<const float*>(p.out);
  const float* ws = p.ws;
  float* dh0 = static_cast<float*>(p.dh0);
  const int nt = std::max(p.num_threads, 1);

  auto tt = [&](int64_t s) { return p.reverse ? T - 1 - s : s; };  // processing position -> time index
  auto hprev = [&](int64_t s, int64_t row) -> const float* {     // the state step s started from
    return s == 0 ? h0 + row * p.h0_row_stride : out + tt(s - 1) * p.out_t_stride + row * p.out_b_stride;
  };
  auto dgh_of = [&](int64_t s) { return need_w ? dgh + tt(s) * B * G : dgh + (s & 1) * B * G; };
  // Gate gradients of step s for row `row`, hidden units [j0, j0 + nj), given dh (the gradient after the step).
  auto gate_bwd = [&](int64_t s, int64_t row, int64_t j0, int nj, V dh) {
    const int64_t t = tt(s);
    const float* w = ws + (t * B + row) * 4 * H + j0;
    const V r = vldn(w, nj), z = vldn(w + H, nj), n = vldn(w + 2 * H, nj), hn = vldn(w + 3 * H, nj);
    const V hp = vldn(hprev(s, row) + j0, nj);
    const V one = vset(1.0f);
    const V dn = vmul(dh, vsub(one, z));
    const V dz = vmul(dh, vsub(hp, n));
    const V dnp = vmul(dn, vsub(one, vmul(n, n)));
    const V drp = vmul(vmul(vmul(dnp, hn), r), vsub(one, r));
    const V dzp = vmul(vmul(dz, z), vsub(one, z));
    float* gi_row = dgi + (t * B + row) * G + j0;
    vstn(gi_row, drp, nj);
    vstn(gi_row + H, dzp, nj);
    vstn(gi_row + 2 * H, dnp, nj);
    float* gh_row = dgh_of(s) + row * G + j0;
    vstn(gh_row, drp, nj);
    vstn(gh_row + H, dzp, nj);
    vstn(gh_row + 2 * H, vmul(dnp, r), nj);
  };

  // W_hh as NB-wide column panels: wq[pn - P0][k][l] = W_hh[k][pn * NB + l] (0 past H); pairs: the words of rows
  // 2 k and 2 k + 1 (one step on pairs: per item, below)
  const bool per_item = panels_per_item(p);  // then (and with pairs) W_ih and W_hh are 16-bit
  auto panel_nn = [&](int64_t pn, int64_t n) { return int(std::min<int64_t>(NB, n - pn * NB)); };
  // Panel pn (NB columns of n) of a 16-bit weight w (G rows, row stride rs): pairs of rows, or widened.
  auto panel16 = [&](const void* w, int64_t rs, int64_t pn, int64_t n, float* dst) {
    if (kPairs) {
      pair_panel(static_cast<const bf16_t*>(w) + pn * NB, rs, G, panel_nn(pn, n), dst);
    } else {
      const int nn = panel_nn(pn, n);
      for (int64_t k = 0; k < G; ++k) {
        row_to_f32_dt(static_cast<const char*>(w) + (k * rs + pn * NB) * 2, p.dtype, dst + k * NB, nn);
        for (int l = nn; l < NB; ++l) dst[k * NB + l] = 0.0f;
      }
    }
  };
  for (int64_t pn = P0; pn < P && !per_item; ++pn) {
    float* dst = wq + (pn - P0) * Gk * NB;
    if (kPairs) {
      panel16(p.w_hh, p.w_hh_row_stride, pn, H, dst);
    } else {
      for (int64_t k = 0; k < G; ++k) vst(dst + k * NB, vldn(w_hh + k * p.w_hh_row_stride + pn * NB, panel_nn(pn, H)));
    }
  }

  // The step processed first (s = T - 1) starts from dh = dh_last + dout: its gate math for rows [m0, m0 + mr).
  auto first_step = [&](int64_t m0, int mr) {
    const int64_t s = T - 1, t = tt(s);
    for (int64_t row = m0; row < m0 + mr; ++row)
      for (int64_t pn = 0; pn < P; ++pn) {
        const int64_t j0 = pn * NB;
        const int nj = int(std::min<int64_t>(NB, H - j0));
        const V d0 = dh_last ? vldn(dh_last + row * p.dh_last_row_stride + j0, nj) : vzero();
        const V dh = vadd(d0, vldn(dout + t * p.dout_t_stride + row * p.dout_b_stride + j0, nj));
        vstn(dhb + row * H + j0, dh, nj);
        gate_bwd(s, row, j0, nj, dh);
      }
  };
  // dh_prev = dGh_s W_hh + dh z for rows [m0, m0 + mr) and panels [pn, pn + nv), from the packed sliver a (a row
  // when mr == 1); then (s > 0) dh_prev += dout of step s - 1 and the gate math of step s - 1, or (s == 0)
  // dh0 = dh_prev.
  // The packed panels come from `panels`, where panel pb is first (wq and P0, or one step on pairs an item's).
  auto step_tile = [&](int64_t s, int64_t m0, int mr, const float* a, int64_t pn, int nv, float* tile,
                       const float* panels, int64_t pb) {
    const int64_t t = tt(s);
    const float* bq[NVMAX];
    const bool in_place = pn < P0;  // a group of panels is all in place or all packed
    for (int q = 0; q < nv; ++q) bq[q] = in_place ? w_hh + (pn + q) * NB : panels + (pn + q - pb) * Gk * NB;
    kMicroKernels<Ops>[mr][nv](a, Gk, bq, in_place ? p.w_hh_row_stride : NB, tile);
    for (int q = 0; q < nv; ++q) {
      const int64_t j0 = (pn + q) * NB;
      const int nj = int(std::min<int64_t>(NB, H - j0));
      for (int i = 0; i < mr; ++i) {
        const int64_t row = m0 + i;
        const V z = vldn(ws + (t * B + row) * 4 * H + H + j0, nj);
        const V dhc = vldn(dhb + row * H + j0, nj);
        V dh = vfma(dhc, z, vld(tile + i * TLD + q * NB));  // dGh W_hh + dh z
        if (s > 0) {
          dh = vadd(dh, vldn(dout + tt(s - 1) * p.dout_t_stride + row * p.dout_b_stride + j0, nj));
          vstn(dhb + row * H + j0, dh, nj);
          gate_bwd(s - 1, row, j0, nj, dh);
        } else {
          vstn(dh0 + row * H + j0, dh, nj);
        }
      }
    }
  };
  if (one_step(p)) {
    // One step (a cell): every row's gate math, its sliver packed, then dGh W_hh by groups of panels, each group
    // used by all slivers in turn, so W_hh (12 MB at H = 1024) is read from memory once, not once per sliver. The
    // same micro-kernel calls as the sequence path below, so the same bits.
    const int64_t ns = ceil_div(B, MRMAX), npg = ceil_div(P, nv_max(MRMAX));
    const int nth = double(B) * double(G) * double(H) < kMinParallelCell ? 1 : nt;
    float* slivers = p.workspace + L.sliver;  // sliver sl: slivers + sl * MRMAX * Gk, [k][mr]
    float* rows = p.workspace + L.aw;         // pairs: dGh's rows as words
    run_items(nth, ns, [&](int64_t sl, int) {
      const int64_t m0 = sl * MRMAX;
      const int mr = int(std::min<int64_t>(MRMAX, B - m0));
      first_step(m0, mr);
      const float* src = dgh_of(0);
      if (kPairs) {
        for (int64_t r = m0; r < m0 + mr; ++r) row_to_pairs(dgh_of(0) + r * G, G, rows + r * Gk);
        src = rows;
      }
      pack_a(row_major(src, Gk), m0, mr, 0, Gk, slivers + m0 * Gk);
    });
    run_items(nth, npg, [&](int64_t c, int tid) {  // chunk c: panels [c * nv_max(MRMAX), ...), in groups
      const int64_t c0 = c * nv_max(MRMAX), c1 = std::min(P, c0 + nv_max(MRMAX));
      const float* panels = wq;
      int64_t pb = P0;
      if (per_item) {  // this chunk's panels, converted into the thread's part of wq (they stay in cache)
        float* buf = wq + tid * round16(int64_t(nv_max(MRMAX)) * Gk * NB);
        for (int64_t pn = c0; pn < c1; ++pn) panel16(p.w_hh, p.w_hh_row_stride, pn, H, buf + (pn - c0) * Gk * NB);
        panels = buf;
        pb = c0;
      }
      alignas(64) float tile[MRMAX * TLD] = {};
      for (int64_t sl = 0; sl < ns; ++sl) {
        const int64_t m0 = sl * MRMAX;
        const int mr = int(std::min<int64_t>(MRMAX, B - m0));
        for (int64_t pn = c0; pn < c1;) {
          const int64_t pe = group_end(pn, nv_max(mr), P0, P, c1);
          step_tile(0, m0, mr, slivers + m0 * Gk, pn, int(pe - pn), tile, panels, pb);
          pn = pe;
        }
      }
    });
  } else {
    // BPTT, one item per block of batch rows [m0, m0 + mr), all steps (the rows are independent through time).
    run_items(step_threads(B, H, nt), ceil_div(B, MRMAX), [&](int64_t blk, int tid) {
      const int64_t m0 = blk * MRMAX;
      const int mr = int(std::min<int64_t>(MRMAX, B - m0));
      first_step(m0, mr);
      float* sliver = p.workspace + L.sliver + tid * bwd_sliver_floats(p);
      float* rows = sliver + round16(MRMAX * Gk);  // pairs: the step's dGh rows as words
      alignas(64) float tile[MRMAX * TLD] = {};
      for (int64_t s = T - 1; s >= 0; --s) {
        Mat d = row_major(dgh_of(s) + m0 * G, G);  // the sliver's rows
        if (kPairs) {
          for (int i = 0; i < mr; ++i) row_to_pairs(d.p + i * G, G, rows + i * Gk);
          d = row_major(rows, Gk);
        }
        const float* a = d.p;
        if (mr > 1) {
          pack_a(d, 0, mr, 0, Gk, sliver);
          a = sliver;
        }
        for (int64_t pn = 0; pn < P;) {
          const int64_t pe = group_end(pn, nv_max(mr), P0, P, P);
          step_tile(s, m0, mr, a, pn, int(pe - pn), tile, wq, P0);
          pn = pe;
        }
      }
    });
  }

  float* gemm_ws = p.workspace + L.gemm;
  float* dx = static_cast<float*>(p.dx);
  if (!kPairs && !per_item) {
    sgemm(TB, I, G, row_major(dgi, G), row_major(w_ih, p.w_ih_row_stride), dx, I, gemm_ws, nt, one_step(p));
  } else if (!per_item) {  // dGi's rows as words (pairs along 3H) times W_ih's rows interleaved in pairs
    float* aw = p.workspace + L.aw;
    float* ww = p.workspace + L.ww;
    rows_to_pairs(dgi, G, TB, G, aw, nt);
    const bf16_t* w16 = static_cast<const bf16_t*>(p.w_ih);
    rows_interleaved(rows_at(w16, p.w_ih_row_stride), G, I, ww, nt);
    sgemm<Ops>(TB, I, Gk, row_major(aw, Gk), row_major(ww, I), dx, I, gemm_ws, nt, false, o16.dx);
  } else {  // one 16-bit step: as dGh W_hh above, W_ih's panels converted per item, used by every sliver
    const float* rows = dgi;  // dGi's rows (pairs: as words)
    float* slivers = p.workspace + L.sliver;
    const int64_t ns = ceil_div(B, MRMAX), PI = ceil_div(I, NB), npg = ceil_div(PI, nv_max(MRMAX));
    const int nth = double(B) * double(G) * double(I) < kMinParallelCell ? 1 : nt;
    if (kPairs) {
      rows_to_pairs(dgi, G, B, G, p.workspace + L.aw, nth);
      rows = p.workspace + L.aw;
    }
    run_items(nth, ns, [&](int64_t sl, int) {
      const int64_t m0 = sl * MRMAX;
      pack_a(row_major(rows, Gk), m0, int(std::min<int64_t>(MRMAX, B - m0)), 0, Gk, slivers + m0 * Gk);
    });
    run_items(nth, npg, [&](int64_t c, int tid) {
      const int64_t c0 = c * nv_max(MRMAX), c1 = std::min(PI, c0 + nv_max(MRMAX));
      float* buf = wq + tid * round16(int64_t(nv_max(MRMAX)) * Gk * NB);
      for (int64_t pn = c0; pn < c1; ++pn) panel16(p.w_ih, p.w_ih_row_stride, pn, I, buf + (pn - c0) * Gk * NB);
      alignas(64) float tile[MRMAX * TLD];
      const float* bq[NVMAX];
      for (int64_t sl = 0; sl < ns; ++sl) {
        const int64_t m0 = sl * MRMAX;
        const int mr = int(std::min<int64_t>(MRMAX, B - m0));
        for (int64_t pn = c0; pn < c1;) {
          const int nv = int(group_end(pn, nv_max(mr), 0, PI, c1) - pn);
          for (int q = 0; q < nv; ++q) bq[q] = buf + (pn + q - c0) * Gk * NB;
          kMicroKernels<Ops>[mr][nv](slivers + m0 * Gk, Gk, bq, NB, tile);
          for (int i = 0; i < mr; ++i)
            for (int q = 0; q < nv; ++q) {
              const int64_t j0 = (pn + q) * NB, row = m0 + i;
              const V v = vld(tile + i * TLD + q * NB);
              if (o16.dx)
                vst16(o16.dx + row * I + j0, v, panel_nn(pn + q, I));
              else
                vstn(dx + row * I + j0, v, panel_nn(pn + q, I));
            }
          pn += nv;
        }
      }
    });
  }
  if (!need_w) return;
  float* hp_all = p.workspace + L.hprev;  // (T * B, H): the state each (t, b) row started from
  for (int64_t t = 0; t < T; ++t) {
    const int64_t s = p.reverse ? T - 1 - t : t;
    for (int64_t b = 0; b < B; ++b) std::memcpy(hp_all + (t * B + b) * H, hprev(s, b), sizeof(float) * H);
  }
  float* dw_ih = static_cast<float*>(p.dw_ih);
  float* dw_hh = static_cast<float*>(p.dw_hh);
  if (!kPairs) {
    const Mat X{x, p.x_t_stride, p.x_b_stride, B, 1};
    sgemm(G, I, TB, col_major(dgi, G), X, dw_ih, I, gemm_ws, nt);
    sgemm(G, H, TB, col_major(dgh, G), row_major(hp_all, H), dw_hh, H, gemm_ws, nt);
  } else {  // dG^T (words along the T * B rows) times X / Hprev interleaved the same way
    const int64_t TBk = kdim<Ops>(TB);
    float* aw = p.workspace + L.aw;
    float* bw = p.workspace + L.bw;
    rows_interleaved(rows_at(dgi, G), TB, G, aw, nt);
    const bf16_t* x16 = static_cast<const bf16_t*>(p.x);
    rows_interleaved([&](int64_t r) { return x16 + r / B * p.x_t_stride + r % B * p.x_b_stride; }, TB, I, bw, nt);
    sgemm<Ops>(G, I, TBk, col_major(aw, G), row_major(bw, I), dw_ih, I, gemm_ws, nt, false, o16.dw_ih);
    rows_interleaved(rows_at(dgh, G), TB, G, aw, nt);
    rows_interleaved(rows_at(hp_all, H), TB, H, bw, nt);
    sgemm<Ops>(G, H, TBk, col_major(aw, G), row_major(bw, H), dw_hh, H, gemm_ws, nt, false, o16.dw_hh);
  }
  if (p.db_ih) col_sums(dgi, TB, G, G, static_cast<float*>(p.db_ih), nt);
  if (p.db_hh) col_sums(dgh, TB, G, G, static_cast<float*>(p.db_hh), nt);
}

}  // namespace

// ------------------------------------------------------------------------------------------------------------
// 16-bit storage (F16, BF16)
// ------------------------------------------------------------------------------------------------------------
// Every 16-bit operand is widened into fp32 scratch once per call (an element then feeds O(H) multiply-adds in
// fp32, as a 16-bit GEMM with fp32 accumulation computes them), the fp32 kernels above run on the copies, and the
// results are narrowed once at the end. The forward rounds each step's state to the storage type before anything
// reads it (gate_fwd), as torch's 16-bit GRU stores h' in its dtype: out and the next step see the same values.
// The backward keeps dh in fp32 through the steps and rounds each gradient once. bf16 on AVX512_BF16 CPUs: the
// GEMMs on bf16 pairs (fwd_impl / bwd_impl with BF16PairOps), which read x, W_ih and W_hh without fp32 copies and
// round dx and the weight gradients as their GEMMs store them.
namespace {

// Regions carved one after another from a buffer (base nullptr: only counts the floats).
struct Carve {
  float* base;
  int64_t used = 0;
  float* take(int64_t n) {
    float* r = base ? base + used : nullptr;
    used += round16(n);
    return r;
  }
};

// dst (R x C, contiguous) = the 16-bit matrix whose row r is at src + (r / rin) * rs_out + (r % rin) * rs_in.
template <class T>
void widen(const void* src, int64_t R, int64_t C, int64_t rs_out, int64_t rs_in, int64_t rin, float* dst, int nt) {
  const T* s = static_cast<const T*>(src);
  run_items(conversion_threads(R * C, nt), R, [&](int64_t r, int) {
    row_to_f32(s + (r / rin) * rs_out + (r % rin) * rs_in, dst + r * C, C);
  });
}
template <class T>
void widen(const void* src, int64_t R, int64_t C, int64_t rs, float* dst, int nt) {
  widen<T>(src, R, C, rs, 0, 1, dst, nt);
}

// n contiguous fp32 values -> 16-bit at dst.
template <class T>
void narrow(const float* src, int64_t n, void* dst, int nt) {
  constexpr int64_t kChunk = 4096;
  T* d = static_cast<T*>(dst);
  run_items(conversion_threads(n, nt), ceil_div(n, kChunk), [&](int64_t c, int) {
    row_from_f32(src + c * kChunk, d + c * kChunk, std::min(kChunk, n - c * kChunk));
  });
}

// The forward's fp32 copies, carved from the workspace's start (the fp32 kernel's scratch follows). The pair path
// reads x, W_ih and W_hh as words instead (pair_operands).
struct Fwd16 {
  float *x, *h0, *w_ih, *w_hh, *b_ih, *b_hh, *out;
  int64_t floats;
};
Fwd16 fwd16_layout(const GRUFwdParams& p, float* base) {
  const bool pairs = use_pairs(p);
  Carve c{base};
  Fwd16 l{};
  const bool w_copies = !pairs && !one_step(p);  // a cell widens its weights' panels as it packs them
  l.x = pairs ? nullptr : c.take(p.T * p.B * p.I);
  l.h0 = c.take(p.B * p.H);
  l.w_ih = w_copies ? c.take(3 * p.H * p.I) : nullptr;
  l.w_hh = w_copies ? c.take(3 * p.H * p.H) : nullptr;
  l.b_ih = p.b_ih ? c.take(3 * p.H) : nullptr;
  l.b_hh = p.b_hh ? c.take(3 * p.H) : nullptr;
  l.out = c.take(p.T * p.B * p.H);
  l.floats = c.used;
  return l;
}

// A bf16 (R, C) matrix (row r at src + (r / rin) * rs_out + (r % rin) * rs_in, in elements) as rows of ceil(C / 2)
// words: read in place when C and the strides are even and src is on a 4-byte boundary, else copied to dst (an odd
// C padded with a zero).
Mat words_of(const void* src, int64_t R, int64_t C, int64_t rs_out, int64_t rs_in, int64_t rin, float* dst, int nt) {
  if (C % 2 == 0 && rs_out % 2 == 0 && (rin == 1 || rs_in % 2 == 0) && reinterpret_cast<uintptr_t>(src) % 4 == 0)
    return Mat{static_cast<const float*>(src), rs_out / 2, rs_in / 2, rin, 1};
  const int64_t C2 = (C + 1) / 2;
  const bf16_t* s = static_cast<const bf16_t*>(src);
  run_items(conversion_threads(R * C, nt), R, [&](int64_t r, int) {
    bf16_t* d = reinterpret_cast<bf16_t*>(dst + r * C2);
    std::memcpy(d, s + (r / rin) * rs_out + (r % rin) * rs_in, sizeof(bf16_t) * C);
    if (C % 2) d[C] = bf16_t{0};
  });
  return row_major(dst, C2);
}

// The pair path's operands: the bf16 inputs themselves (or padded copies in the layout's word regions).
FwdOperands pair_operands(const GRUFwdParams& p, const FwdLayout& L, float* ws, int nt) {
  const int64_t B = p.B, I = p.I, H = p.H;
  return {words_of(p.x, p.T * B, I, p.x_t_stride, p.x_b_stride, B, ws + L.xw, nt),
          words_of(p.h0, B, H, p.h0_row_stride, 0, 1, ws + L.hw, nt),
          words_of(p.w_ih, 3 * H, I, p.w_ih_row_stride, 0, 1, ws + L.wiw, nt),
          words_of(p.w_hh, 3 * H, H, p.w_hh_row_stride, 0, 1, ws + L.whw, nt)};
}

template <class T>
void fwd16(const GRUFwdParams& p) {
  const int64_t TT = p.T, B = p.B, I = p.I, H = p.H;
  const int nt = std::max(p.num_threads, 1);
  const Fwd16 l = fwd16_layout(p, p.workspace);
  widen<T>(p.h0, B, H, p.h0_row_stride, l.h0, nt);
  if (p.b_ih) widen<T>(p.b_ih, 1, 3 * H, 0, l.b_ih, nt);
  if (p.b_hh) widen<T>(p.b_hh, 1, 3 * H, 0, l.b_hh, nt);
  GRUFwdParams q = p;  // the same problem on the copies; q.dtype still rounds the state
  q.h0 = l.h0;
  q.h0_row_stride = H;
  q.b_ih = l.b_ih;
  q.b_hh = l.b_hh;
  q.out = l.out;
  q.workspace = p.workspace + l.floats;
#if PYATTN_CPU_BF16_DOT
  if (use_pairs(p)) {
    fwd_impl<BF16PairOps>(q, pair_operands(p, fwd_layout(q), q.workspace, nt));
    return narrow<T>(l.out, TT * B * H, p.out, nt);
  }
#endif
  widen<T>(p.x, TT * B, I, p.x_t_stride, p.x_b_stride, B, l.x, nt);
  q.x = l.x;
  q.x_t_stride = B * I;
  q.x_b_stride = I;
  if (l.w_ih) {
    widen<T>(p.w_ih, 3 * H, I, p.w_ih_row_stride, l.w_ih, nt);
    widen<T>(p.w_hh, 3 * H, H, p.w_hh_row_stride, l.w_hh, nt);
    q.w_ih = l.w_ih;
    q.w_hh = l.w_hh;
    q.w_ih_row_stride = I;
    q.w_hh_row_stride = H;
    fwd_impl<F32Ops>(q, fp32_operands(q));
  } else {  // a cell: q's weights stay the caller's 16-bit ones
    FwdOperands op{Mat{l.x, B * I, I, B, 1}, row_major(l.h0, H), {}, {}, p.w_ih, p.w_hh};
    fwd_impl<F32Ops>(q, op);
  }
  narrow<T>(l.out, TT * B * H, p.out, nt);
}

// The backward's fp32 copies and fp32 results.
struct Bwd16 {
  float *dout, *dh_last, *x, *h0, *w_ih, *w_hh, *out;
  float *dx, *dh0, *dw_ih, *dw_hh, *db_ih, *db_hh;
  int64_t floats;
};
Bwd16 bwd16_layout(const GRUBwdParams& p, float* base) {
  const int64_t TB = p.T * p.B, G = 3 * p.H;
  const bool pairs = use_pairs(p);
  const bool need_w = p.need_weights && p.dw_ih != nullptr;
  Carve c{base};
  Bwd16 l;
  l.dout = c.take(TB * p.H);
  l.dh_last = p.dh_last ? c.take(p.B * p.H) : nullptr;
  const bool w_copies = !pairs && !one_step(p);  // pairs read W_ih, W_hh as they are, and a cell converts per item
  l.x = pairs ? nullptr : c.take(TB * p.I);       // pairs read x as it is
  l.h0 = c.take(p.B * p.H);
  l.w_ih = w_copies ? c.take(G * p.I) : nullptr;
  l.w_hh = w_copies ? c.take(G * p.H) : nullptr;
  l.out = p.out ? c.take(TB * p.H) : nullptr;
  l.dx = c.take(TB * p.I);
  l.dh0 = c.take(p.B * p.H);
  l.dw_ih = need_w ? c.take(G * p.I) : nullptr;
  l.dw_hh = need_w ? c.take(G * p.H) : nullptr;
  l.db_ih = need_w && p.db_ih ? c.take(G) : nullptr;
  l.db_hh = need_w && p.db_hh ? c.take(G) : nullptr;
  l.floats = c.used;
  return l;
}

template <class T>
void bwd16(const GRUBwdParams& p) {
  const int64_t TT = p.T, B = p.B, I = p.I, H = p.H, G = 3 * H;
  const int nt = std::max(p.num_threads, 1);
  const Bwd16 l = bwd16_layout(p, p.workspace);
  widen<T>(p.dout, TT * B, H, p.dout_t_stride, p.dout_b_stride, B, l.dout, nt);
  if (p.dh_last) widen<T>(p.dh_last, B, H, p.dh_last_row_stride, l.dh_last, nt);
  widen<T>(p.h0, B, H, p.h0_row_stride, l.h0, nt);
  if (p.out) widen<T>(p.out, TT * B, H, p.out_t_stride, p.out_b_stride, B, l.out, nt);
  GRUBwdParams q = p;
  if (l.x) {  // else (pairs) x stays the caller's
    widen<T>(p.x, TT * B, I, p.x_t_stride, p.x_b_stride, B, l.x, nt);
    q.x = l.x;
    q.x_t_stride = B * I;
    q.x_b_stride = I;
  }
  if (l.w_ih) {  // else W_ih and W_hh stay the caller's (pairs, or a cell: panels converted per item)
    widen<T>(p.w_ih, G, I, p.w_ih_row_stride, l.w_ih, nt);
    widen<T>(p.w_hh, G, H, p.w_hh_row_stride, l.w_hh, nt);
    q.w_ih = l.w_ih;
    q.w_hh = l.w_hh;
    q.w_ih_row_stride = I;
    q.w_hh_row_stride = H;
  }
  q.dout = l.dout;
  q.dh_last = l.dh_last;
  q.h0 = l.h0;
  q.out = l.out;
  q.dx = l.dx;
  q.dh0 = l.dh0;
  q.dw_ih = l.dw_ih;
  q.dw_hh = l.dw_hh;
  q.db_ih = l.db_ih;
  q.db_hh = l.db_hh;
  q.dout_t_stride = B * H;
  q.dout_b_stride = H;
  q.dh_last_row_stride = H;
  q.h0_row_stride = H;
  q.out_t_stride = B * H;
  q.out_b_stride = H;
  q.workspace = p.workspace + l.floats;
#if PYATTN_CPU_BF16_DOT
  if (use_pairs(p)) {  // dx, dW_ih and dW_hh rounded as their GEMMs store them
    bwd_impl<BF16PairOps>(q, Out16{static_cast<bf16_t*>(p.dx), static_cast<bf16_t*>(p.dw_ih),
                                   static_cast<bf16_t*>(p.dw_hh)});
  } else
#endif
  {
    bwd_impl<F32Ops>(q);
    narrow<T>(l.dx, TT * B * I, p.dx, nt);
    if (l.dw_ih) narrow<T>(l.dw_ih, G * I, p.dw_ih, nt);
    if (l.dw_hh) narrow<T>(l.dw_hh, G * H, p.dw_hh, nt);
  }
  narrow<T>(l.dh0, B * H, p.dh0, nt);
  if (l.db_ih) narrow<T>(l.db_ih, G, p.db_ih, nt);
  if (l.db_hh) narrow<T>(l.db_hh, G, p.db_hh, nt);
}

}  // namespace

int64_t gru_fwd_workspace_floats(const GRUFwdParams& p) {
  return (p.dtype == DType::F32 ? 0 : fwd16_layout(p, nullptr).floats) + fwd_layout(p).total;
}

void gru_fwd(const GRUFwdParams& p) {
  if (p.T <= 0 || p.B <= 0 || p.H <= 0) return;
  switch (p.dtype) {
    case DType::F32:
      return fwd_impl<F32Ops>(p, fp32_operands(p));
    case DType::BF16:
      return fwd16<bf16_t>(p);
    case DType::F16:
      return fwd16<f16_t>(p);
  }
}

int64_t gru_bwd_workspace_floats(const GRUBwdParams& p) {
  return (p.dtype == DType::F32 ? 0 : bwd16_layout(p, nullptr).floats) + bwd_layout(p).total;
}

void gru_bwd(const GRUBwdParams& p) {
  if (p.T <= 0 || p.B <= 0 || p.H <= 0) return;
  switch (p.dtype) {
    case DType::F32:
      return bwd_impl<F32Ops>(p);
    case DType::BF16:
      return bwd16<bf16_t>(p);
    case DType::F16:
      return bwd16<f16_t>(p);
  }
}

}  // namespace cpu
}  // namespace pyattn
