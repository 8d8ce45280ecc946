// CUDA attention forward for Hopper (sm_90a): the FlashAttention-2 forward of attention.cu on warpgroup MMA
// (wgmma.mma_async, csrc/cuda/wgmma.cuh) instead of mma.sync. Same contract and semantics as attn_fwd_kernel there
// (causal with both alignments, GQA, any Lq / Lk, lse; a row that sees no key: out 0, lse +inf); it takes the common
// case only (fwd_sm90: fp16 / bf16, D == Dv in {64, 128}, no mask, no dropout, 16-byte-aligned rows) and
// attention.cu's kernel takes the rest.
//
// Block: NWG warpgroups (HD 128: 2, HD 64: 1; see fwd_sm90), BM = 64 NWG query rows of one (b, h) (warpgroup wg
// owns rows 64 wg..64 wg + 63, its warp w rows 16 w.. of those), key blocks of BN = 128:
//   Q [BM][HD], K and V [2 stages][BN][HD] in shared memory, 128-byte swizzled 64-column sub-tiles (wgmma.cuh),
//   filled with cp.async by all threads; the next key block is copied while this one is computed.
//   per key block: S (64 x BN per warpgroup, fp32 registers) = Q K^T   (HD / 16 wgmma m64nBNk16, A and B K-major)
//                  online softmax of S in registers (base 2), P = exp2(S - m) packed to 16 bits
//                  O (64 x HD per warpgroup) = O * alpha + P V           (BN / 16 wgmma m64nHDk16, A = P from
//                  registers, B = V N-major)
//   with the P V of one key block in flight during the softmax of the next (the kernel's comment).
// Registers per thread: S BN / 2 + O HD / 2 fp32, P BN / 4 (ptxas: 224-255, no spills).
// Shared memory: 1 KB alignment slack + (BM + 4 BN) HD 2 bytes + 8 NT bytes (Steps::pin) = 163 KB (HD 128: one
// block per SM), 74 KB (HD 64: two blocks per SM, which the scheduler interleaves).
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "attention_utils.cuh"
#include "launch.cuh"
#include "pyattn/params.h"
#include "tma.cuh"
#include "wgmma.cuh"

#if defined(PYATTN_CUDA_EMU) || (defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL))
#define PYATTN_SM90_KERNEL 1  // the device code of this pass can run the kernel (sm_90a, or the CPU emulator)
#endif

namespace pyattn {
namespace cuda {
namespace attn {
namespace sm90 {

// Tile shape: NWG warpgroups (64 query rows each) per block, BN keys per iteration.
template <int HD_, int NWG_, int BN_>
struct Cfg {
  static constexpr int HD = HD_, NWG = NWG_, BN = BN_;
  static constexpr int NT = 128 * NWG;
  static constexpr int BM = 64 * NWG;  // query rows per block
  static constexpr uint32_t kQBytes = BM * HD * 2, kKVBytes = BN * HD * 2;
  static constexpr size_t smem = 1024 + kQBytes + 4 * size_t(kKVBytes) + NT * 8;  // + Steps::pin's scratch
  static constexpr int kMinBlocks = NWG == 1 ? 2 : 1;  // blocks per SM the registers are sized for
};

// The per-key-block steps of one warpgroup (64 query rows; this thread: rows r0, r0 + 8).
template <class E, int HD, int BN, int BM>
struct Steps {
  // issue S = Q K^T (async) / O += P V (async; V read N-major)
  static __device__ __forceinline__ void issue_qk(float (&s)[BN / 2], uint32_t q_addr, uint32_t k_addr) {
    issue_abt<E, BN, HD, BM, BN>(s, q_addr, k_addr);
  }
  static __device__ __forceinline__ void issue_pv(float (&o)[HD / 2], uint32_t (&pa)[BN / 16][4], uint32_t v_addr) {
    issue_ab<E, HD, BN>(o, pa, v_addr);
  }
  // O += P V over the first `width` keys of the block only (64 / 128 of 176 or 128: issue_pv_width), for a key block
  // whose first `live` keys are the only ones the warpgroup's rows see (the key tail, the causal diagonal's right
  // edge): P is 0 in the k-steps left out, so O gets the same bits. At L = 4096 the last of 24 blocks of 176 keys
  // has 48 live ones: 7 of its 11 P V k-steps skipped, 1.3% of the tile's GEMM work. (S over the live keys only made
  // ptxas serialize the kernels' wgmmas: a narrower wgmma into part of S's registers C7511, into registers of its
  // own copied to S after the wait C7515 and 264 bytes of spills.)
  static __device__ __forceinline__ int live_width(int live) {
    return BN > 64 && live <= 64 ? 64 : BN > 128 && live <= 128 ? 128 : BN;
  }
  static __device__ __forceinline__ void issue_pv_width(float (&o)[HD / 2], uint32_t (&pa)[BN / 16][4],
                                                        uint32_t v_addr, int width) {
    if (BN > 64 && width == 64)
      issue_ab<E, HD, BN, 64>(o, pa, v_addr);
    else if (BN > 128 && width == 128)
      issue_ab<E, HD, BN, (BN > 128 ? 128 : BN)>(o, pa, v_addr);
    else
      issue_pv(o, pa, v_addr);
  }
  // S (landed) -> masked where the causal diagonal or the key tail cuts the block (check), then the online softmax
  // in base 2 with the scale folded into one FFMA per element (FA3's): m_run (raw logits, the scale is > 0: fwd_sm90)
  // and l_run updated, s = exp2(s c - m c) with c = scale log2(e), alpha = exp2((m_old - m_new) c) per row. A row
  // that has seen only -inf keeps max -inf and subtracts 0 (exp2(-inf) = 0, no NaN). The row max is a tree of four
  // partial maxima (a chain of BN / 4 fmaxf would sit in the softmax's critical path).
  // softmax: two copies of the code, masked and not (as one, the compiler predicates the mask into every block);
  // softmax_compact: one copy, for the cp.async kernel (ptxas spills the causal HD 128 kernel with two).
  template <bool CAUSAL>
  static __device__ __forceinline__ void softmax(float (&s)[BN / 2], float (&m_run)[2], float (&l_run)[2],
                                                 float (&alpha)[2], bool check, int64_t r0, int64_t j0, int t,
                                                 const AttnFwdParams& p, const Derived& d) {
    if (check)
      softmax_impl<CAUSAL, true>(s, m_run, l_run, alpha, true, r0, j0, t, p, d);
    else
      softmax_impl<CAUSAL, false>(s, m_run, l_run, alpha, false, r0, j0, t, p, d);
  }
  template <bool CAUSAL>
  static __device__ __forceinline__ void softmax_compact(float (&s)[BN / 2], float (&m_run)[2], float (&l_run)[2],
                                                         float (&alpha)[2], bool check, int64_t r0, int64_t j0, int t,
                                                         const AttnFwdParams& p, const Derived& d) {
    softmax_impl<CAUSAL, true>(s, m_run, l_run, alpha, check, r0, j0, t, p, d);
  }
  template <bool CAUSAL, bool MAY_MASK>
  static __device__ __forceinline__ void softmax_impl(float (&s)[BN / 2], float (&m_run)[2], float (&l_run)[2],
                                                      float (&alpha)[2], bool check, int64_t r0, int64_t j0, int t,
                                                      const AttnFwdParams& p, const Derived& d) {
    if (MAY_MASK && check) {  // (key_limits: the masked path was 631 SASS instructions with 64-bit indices, now 446)
      int lim[2];
      key_limits<CAUSAL, BN>(lim, r0, j0, t, p.Lk, d.shift);
#pragma unroll
      for (int n = 0; n < BN / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (key_masked(lim, n, e)) s[4 * n + e] = -INFINITY;
    }
    const float c = d.scale_log2;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float part[4] = {m_run[r], s[2 * r], s[2 * r + 1], s[4 + 2 * r]};
#pragma unroll
      for (int n = 0; n < BN / 8; ++n)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int k = 2 * n + e;  // element k of this row; 0..2 seeded part[1..3] above
          if (k >= 3) part[k % 4] = fmaxf(part[k % 4], s[4 * n + 2 * r + e]);
        }
      const float mx = quad_max(fmaxf(fmaxf(part[0], part[1]), fmaxf(part[2], part[3])));
      const float mu = mx == -INFINITY ? 0.0f : mx;
      const float mc = mu * c;
      alpha[r] = fast_exp2((m_run[r] - mu) * c);  // exactly 1 where the max stays (a block masked for this row)
      m_run[r] = mx;
      float sum[2] = {0.0f, 0.0f};
#pragma unroll
      for (int n = 0; n < BN / 8; ++n)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          s[4 * n + 2 * r + e] = fast_exp2(fmaf(s[4 * n + 2 * r + e], c, -mc));
          sum[e] += s[4 * n + 2 * r + e];
        }
      l_run[r] = fmaf(l_run[r], alpha[r], sum[0] + sum[1]);
    }
  }
  // Keeps ptxas from issuing the next wgmma wait (the P V's) before the softmax: a shared-memory store of l_run (it
  // depends on every exp2) stays before the wait, which ptxas orders after memory operations; without it ptxas
  // hoists the wait above the exp2s and the softmax waits for the P V (seen in the SASS). slot: this thread's 8
  // bytes of shared scratch, never read.
  static __device__ __forceinline__ void pin(float2* slot, const float (&l_run)[2]) {
#ifdef PYATTN_CUDA_EMU
    *slot = make_float2(l_run[0], l_run[1]);
#else
    asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(smem_addr(slot)), "f"(l_run[0]), "f"(l_run[1]) : "memory");
#endif
  }
  static __device__ __forceinline__ void rescale(float (&o)[HD / 2], const float (&alpha)[2]) {
#pragma unroll
    for (int n = 0; n < HD / 8; ++n) {
      o[4 * n] *= alpha[0];
      o[4 * n + 1] *= alpha[0];
      o[4 * n + 2] *= alpha[1];
      o[4 * n + 3] *= alpha[1];
    }
  }
  // P: n-tiles 2k, 2k + 1 of S are the A registers of k-step k
  static __device__ __forceinline__ void pack(uint32_t (&pa)[BN / 16][4], const float (&s)[BN / 2]) {
    pack_a<E, BN>(pa, s);
  }
};

// Epilogue of one thread (rows r0, r0 + 8): out = O / l (0 for a row that saw nothing), lse = (m c + log2 l) ln 2
// with m the raw row max and c = scale log2(e) (+inf for such a row).
template <class E, int HD>
__device__ __forceinline__ void store_out(const AttnFwdParams& p, const float (&o)[HD / 2], const float (&m_run)[2],
                                          const float (&l_run)[2], float c, int64_t r0, int64_t b, int64_t h,
                                          int64_t bh, int t) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float l = quad_sum(l_run[r]);
    const bool dead = !(l > 0.0f) && !isnan(l);
    const float inv = dead ? 0.0f : 1.0f / l;
    const int64_t row = r0 + 8 * r;
    if (row >= p.Lq) continue;
    if (t == 0) p.lse[bh * p.Lq + row] = dead ? INFINITY : fmaf(m_run[r], c, log2f(l)) * kLn2;
    uint16_t* og = static_cast<uint16_t*>(p.out) + b * p.out_stride[0] + h * p.out_stride[1] + row * p.out_stride[2];
#pragma unroll
    for (int n = 0; n < HD / 8; ++n)
      *reinterpret_cast<uint32_t*>(og + n * 8 + 2 * t) = E::pack(o[4 * n + 2 * r] * inv, o[4 * n + 2 * r + 1] * inv);
  }
}

// FA3's intra-warpgroup pipelining: iteration j issues S_j = Q K_j^T and O += P_{j-1} V_{j-1} together and runs the
// softmax of S_j while the second is in flight; K_{j+1} and V_j are copied meanwhile (the K and V stages are one key
// block apart). (Measured on the H200 against S_j, softmax, O += P_j V_j in turn: 313 -> 330 TFLOP/s at HD 128.)
template <class E, class C, bool CAUSAL>
__global__ void __launch_bounds__(C::NT, C::kMinBlocks) attn_fwd_sm90_kernel(const AttnFwdParams p, const Derived d) {
#ifdef PYATTN_SM90_KERNEL
  constexpr int HD = C::HD, BM = C::BM, BN = C::BN, NT = C::NT;
  using St = Steps<E, HD, BN, BM>;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  unsigned char* Qs = align1024(smem_raw);  // [SUB][BM][64] swizzled
  unsigned char* Ks = Qs + C::kQBytes;                                       // [2][SUB][BN][64]
  unsigned char* Vs = Ks + 2 * C::kKVBytes;                                  // [2][SUB][BN][64]
  float2* pin_slot = reinterpret_cast<float2*>(Vs + 2 * C::kKVBytes) + threadIdx.x;  // [NT] Steps::pin's scratch

  const int tid = threadIdx.x, wg = warpgroup_uniform();
  const int warp = (tid / 32) % 4, lane = tid % 32, g = lane / 4, t = lane % 4;
  const FwdBlock fb = fwd_block<CAUSAL, BM, BN>(p, d, blockIdx.x);
  const int64_t b = fb.b, h = fb.h, hk = fb.hk, bh = fb.bh, i0 = fb.i0;
  const int nq = fb.nq, nkb = fb.nkb;

  const uint16_t* qg = static_cast<const uint16_t*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1] + i0 * p.q_stride[2];
  const uint16_t* kg = static_cast<const uint16_t*>(p.k) + b * p.k_stride[0] + hk * p.k_stride[1];
  const uint16_t* vg = static_cast<const uint16_t*>(p.v) + b * p.v_stride[0] + hk * p.v_stride[1];
  auto load = [&](const uint16_t* base, int64_t stride, unsigned char* tiles, int kb) {  // key block kb, stage kb % 2
    const int64_t j0 = int64_t(kb) * BN;
    load_tile_sw128<BN, HD, NT>(tiles + (kb & 1) * C::kKVBytes, base + j0 * stride, stride, int(imin(BN, p.Lk - j0)),
                                tid);
  };
  auto k_addr = [&](int kb) { return smem_addr(Ks + (kb & 1) * C::kKVBytes); };
  auto v_addr = [&](int kb) { return smem_addr(Vs + (kb & 1) * C::kKVBytes); };
  // mask elements of key block kb only where the causal diagonal or the key tail cuts it
  auto needs_check = [&](int64_t j0) { return j0 + BN > p.Lk || (CAUSAL && j0 + BN - 1 > i0 + d.shift); };
  auto landed = [&]() {   // after cp_async_wait: this thread's copies are visible to the tensor cores, then to all
    fence_proxy_async();
    __syncthreads();
  };

  load_tile_sw128<BM, HD, NT>(Qs, qg, p.q_stride[2], nq, tid);
  if (nkb > 0) load(kg, p.k_stride[2], Ks, 0);
  cp_async_commit();

  const int64_t r0 = i0 + 64 * wg + 16 * warp + g;        // this thread's rows r0 and r0 + 8
  const uint32_t q_addr = smem_addr(Qs) + wg * 64 * 128;  // the warpgroup's 64 rows of Q sub-tile 0
  float o[HD / 2];
  float s[BN / 2];
  uint32_t pa[BN / 16][4];
  float m_run[2] = {-INFINITY, -INFINITY};  // running max (log2 units), quad-uniform
  float l_run[2] = {0.0f, 0.0f};            // running sum of this thread's columns (quad-summed at the end)
  float alpha[2];
#pragma unroll
  for (int i = 0; i < HD / 2; ++i) o[i] = 0.0f;

  for (int kb = 0; kb < nkb; ++kb) {
    const int64_t j0 = int64_t(kb) * BN;
    if (kb + 1 < nkb) load(kg, p.k_stride[2], Ks, kb + 1);  // stage of K_{kb-1} (its S done last iteration)
    load(vg, p.v_stride[2], Vs, kb);                         // stage of V_{kb-2} (its P V done last iteration)
    cp_async_commit();
    cp_async_wait<1>();  // Q, K_kb and V_{kb-1} have landed
    landed();
    St::issue_qk(s, q_addr, k_addr(kb));
    if (kb > 0) {
      St::issue_pv(o, pa, v_addr(kb - 1));
      wgmma_wait<1>();  // S_kb has landed (the P V may still run)
    } else {
      wgmma_wait<0>();  // S_0, the only group in flight
    }
    fence_operands(s);
    St::template softmax_compact<CAUSAL>(s, m_run, l_run, alpha, needs_check(j0), r0, j0, t, p, d);
    St::pin(pin_slot, l_run);
    wgmma_wait<0>();  // P_{kb-1} V_{kb-1}: o and pa are free
    fence_operands(o);
    St::rescale(o, alpha);
    St::pack(pa, s);
    __syncthreads();  // every warpgroup is done with the stages the next iteration refills
  }
  if (nkb > 0) {  // the last P V
    cp_async_wait<0>();
    landed();
    St::issue_pv(o, pa, v_addr(nkb - 1));
    wgmma_wait<0>();
    fence_operands(o);
  }
  cp_async_wait<0>();  // (no key block: the Q copy is still in flight)

  store_out<E, HD>(p, o, m_run, l_run, d.scale_log2, r0, b, h, bh, t);
#else
  __trap();  // not an sm_90a pass: fwd_sm90 never launches this
#endif
}

// ---- warp-specialized kernel (FA3's structure; the default) --------------------------------------------------------
// Block: 3 warpgroups. Tiles are 128 query rows of one (b, h), numbered in fwd_block's order (causal: heaviest
// first). Block x takes tile x first; then, static, x + gridDim.x, x + 2 gridDim.x, ...; or, dynamic (FA3's
// scheduler for causal), gridDim.x + the next ticket of a grid-wide counter (p.tile_counter, zero at launch), so a
// block that finishes early takes the heaviest tile left. The grid is persistent, the SM count (the default), or a
// block per tile (sm90_plan). The producer picks each tile and hands its number to the consumers in a shared-memory
// slot written before the tile's Q arrival on q_full (its release orders the slot before the consumers' wait); a
// number past the last tile, arrived without a copy, ends the consumers' loop.
// Warpgroup 0 is the producer: after setmaxnreg.dec its first thread issues every copy with TMA (each tile's Q once
// its buffer is free; K and V of each key block into a 2-stage ring that runs on across tiles, each stage behind a
// "full" mbarrier that the copy completes and an "empty" one that all 256 consumer threads arrive on when they are
// done with it), so the next tile's copies overlap this tile's last GEMMs and epilogue. Warpgroups 1 and 2
// (setmaxnreg.inc) each own 64 query rows and run the consumer loop of attn_fwd_sm90_kernel, waiting on mbarriers
// instead of block barriers and taking turns at issuing their GEMMs (ping-pong, below). Shared memory: Q
// [HD / 64][128][64], K and V [2 stages][HD / 64][128][64] (the same swizzled sub-tiles, written by the copy engine),
// 10 mbarriers, 2 tile slots, Steps::pin's scratch: 163 KB (HD 128), 83 KB (HD 64), 211 KB (HD 128 with BN 176) with
// the 1 KB alignment slack.
template <int HD_, int BN_ = 128>
struct WsCfg {
  static constexpr int HD = HD_, BM = 128, BN = BN_, NT = 384, NCONS = 256, SUB = HD / 64;
  static constexpr uint32_t kQBytes = BM * HD * 2, kKVBytes = BN * HD * 2;
  static constexpr size_t smem = 1024 + kQBytes + 4 * size_t(kKVBytes) + 10 * 8 + 2 * 8 + NCONS * 8;
};

// A ticket of the dynamic tile scheduler: the counter's value before this call's increment.
__device__ __forceinline__ unsigned next_ticket(unsigned* counter) {
#ifdef PYATTN_CUDA_EMU
  return (*counter)++;  // (the emulator runs one thread at a time)
#else
  return atomicAdd(counter, 1u);
#endif
}

template <class E, int HD_, int BN_, bool CAUSAL, bool DYN /* the dynamic tile scheduler */>
__global__ void __launch_bounds__(384, 1)
    attn_fwd_sm90_ws_kernel(const __grid_constant__ CUtensorMap tq, const __grid_constant__ CUtensorMap tk,
                            const __grid_constant__ CUtensorMap tv, const AttnFwdParams p, const Derived d) {
#ifdef PYATTN_SM90_KERNEL
  using C = WsCfg<HD_, BN_>;
  constexpr int HD = C::HD, BM = C::BM, BN = C::BN;
  using St = Steps<E, HD, BN, BM>;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  unsigned char* Qs = align1024(smem_raw);  // [SUB][BM][64] swizzled
  unsigned char* Ks = Qs + C::kQBytes;                                       // [2 stages][SUB][BN][64]
  unsigned char* Vs = Ks + 2 * C::kKVBytes;                                  // [2 stages][SUB][BN][64]
  uint64_t* bars = reinterpret_cast<uint64_t*>(Vs + 2 * C::kKVBytes);
  uint64_t* q_full = bars;        // Q landed
  uint64_t* q_empty = bars + 1;   // Q read by every consumer (its last S = Q K^T done)
  uint64_t* k_full = bars + 2;    // [2] K stage landed
  uint64_t* v_full = bars + 4;    // [2] V stage landed
  uint64_t* k_empty = bars + 6;   // [2] K stage read by every consumer
  uint64_t* v_empty = bars + 8;   // [2] V stage read by every consumer
  int* tile_slot = reinterpret_cast<int*>(bars + 10);  // [2] the block's n-th tile in slot n % 2
  float2* pin_slot = reinterpret_cast<float2*>(bars + 12) + (threadIdx.x - 128);  // [NCONS] (consumers only)

  const int tid = threadIdx.x;
  const int64_t ntiles = (p.Lq + BM - 1) / BM * p.B * p.Hq;
  if (tid == 0) {
    tma_prefetch(&tq);
    tma_prefetch(&tk);
    tma_prefetch(&tv);
    mbar_init(q_full, 1);
    mbar_init(q_empty, C::NCONS);
    for (int st = 0; st < 2; ++st) {
      mbar_init(k_full + st, 1);
      mbar_init(v_full + st, 1);
      mbar_init(k_empty + st, C::NCONS);
      mbar_init(v_empty + st, C::NCONS);
    }
    mbar_init_fence();
  }
  __syncthreads();

  // Key block `it` of the block's whole sequence (all its tiles) uses stage it % 2 for the (it / 2)-th time; each
  // mbarrier completes one phase per use, so a wait for use u is on parity u % 2 (an empty stage's: the previous use,
  // which passes at once the first time). Q is used once per tile: the block's n-th tile waits q_full on parity
  // n % 2, and the producer waits q_empty for tile n - 1 before loading tile n's Q (and before writing slot n % 2,
  // which the consumers read for tile n - 2, or the end mark: q_full must not complete phase n before every consumer
  // has passed its wait for phase n - 1).
  auto use = [](uint32_t it) { return (it >> 1) & 1u; };
  if (warpgroup_uniform() == 0) {  // producer warpgroup
    setmaxnreg_dec<24>();
    if (tid == 0) {
      uint32_t it = 0;
      int tile = blockIdx.x;  // (32 bits: the producer runs on 24 registers; tiles < 2^31, a grid's limit)
      for (uint32_t n = 0;; ++n) {
        if (n > 0) mbar_wait(q_empty, (n - 1) & 1);
        tile_slot[n & 1] = tile;
        if (tile >= ntiles) {  // the end: the consumers see the mark and stop
          mbar_arrive(q_full);
          break;
        }
        const FwdBlock fb = fwd_block<CAUSAL, BM, BN>(p, d, tile);
        mbar_arrive_expect_tx(q_full, C::kQBytes);
        for (int sub = 0; sub < C::SUB; ++sub)
          tma_load_4d(Qs + sub * (BM * 128), &tq, q_full, sub * 64, int(fb.i0), int(fb.h), int(fb.b), l2_evict_first());
        for (int kb = 0; kb < fb.nkb; ++kb, ++it) {
          const int st = it & 1, j0 = kb * BN;
          mbar_wait(k_empty + st, use(it) ^ 1);
          mbar_arrive_expect_tx(k_full + st, C::kKVBytes);
          for (int sub = 0; sub < C::SUB; ++sub)
            tma_load_4d(Ks + st * C::kKVBytes + sub * (BN * 128), &tk, k_full + st, sub * 64, j0, int(fb.hk),
                        int(fb.b), l2_evict_last());
          mbar_wait(v_empty + st, use(it) ^ 1);
          mbar_arrive_expect_tx(v_full + st, C::kKVBytes);
          for (int sub = 0; sub < C::SUB; ++sub)
            tma_load_4d(Vs + st * C::kKVBytes + sub * (BN * 128), &tv, v_full + st, sub * 64, j0, int(fb.hk),
                        int(fb.b), l2_evict_last());
        }
        // the next tile (the ticket's latency is hidden: the producer now waits for this tile's last S anyway)
        tile = int(gridDim.x + (DYN ? next_ticket(p.tile_counter) : unsigned(tile)));
      }
    }
  } else {  // consumer warpgroups 1, 2: query rows 64 (wg - 1).. of each tile
    setmaxnreg_inc<240>();
    const int wg = warpgroup_uniform() - 1, warp = (tid / 32) % 4, lane = tid % 32, g = lane / 4, t = lane % 4;
    const uint32_t q_addr = smem_addr(Qs) + wg * 64 * 128;  // the warpgroup's 64 rows of Q sub-tile 0
    auto k_addr = [&](uint32_t it) { return smem_addr(Ks + (it & 1) * C::kKVBytes); };
    auto v_addr = [&](uint32_t it) { return smem_addr(Vs + (it & 1) * C::kKVBytes); };
    uint32_t it0 = 0;  // key blocks of this block before this tile
    for (uint32_t n = 0;; ++n) {  // the block's n-th tile
      mbar_wait(q_full, n & 1);
      const int tile = __shfl_sync(0xffffffffu, tile_slot[n & 1], 0);  // (warp-uniform to ptxas: warpgroup_uniform)
      if (tile >= ntiles) break;
      const FwdBlock fb = fwd_block<CAUSAL, BM, BN>(p, d, tile);
      const int64_t i0 = fb.i0;
      const int nkb = fb.nkb;
      const int64_t r0 = i0 + 64 * wg + 16 * warp + g;  // this thread's rows r0 and r0 + 8
      // keys of the tile's last key block that this warpgroup's rows see (the key tail; causal: on the diagonal of
      // 128-key blocks the first warpgroup's 64 rows see only the first 64 keys)
      const int64_t jend = CAUSAL ? imin(p.Lk, i0 + imin(fb.nq, 64 * (wg + 1)) + d.shift) : p.Lk;
      const int live = int(imax(0, jend - int64_t(nkb - 1) * BN));
      float o[HD / 2];
      float s[BN / 2];
      uint32_t pa[BN / 16][4];
      float m_run[2] = {-INFINITY, -INFINITY};
      float l_run[2] = {0.0f, 0.0f};
      float alpha[2];
#pragma unroll
      for (int i = 0; i < HD / 2; ++i) o[i] = 0.0f;
      auto needs_check = [&](int64_t j0) { return j0 + BN > p.Lk || (CAUSAL && j0 + BN - 1 > i0 + d.shift); };
      // S_kb landed: K_kb's stage is free, and after the tile's last S so is Q
      auto s_landed = [&](int kb) {
        fence_operands(s);
        mbar_arrive(k_empty + ((it0 + kb) & 1));
        if (kb == nkb - 1) mbar_arrive(q_empty);
      };
      // Ping-pong (FA3): the two consumer warpgroups take turns issuing their GEMMs, so that one's softmax runs
      // under the other's GEMMs. Named barrier 1 + wg means "warpgroup wg may issue" (256 threads: its own 128
      // syncing, the other's 128 arriving); every issue point syncs on its own barrier before and arrives on the
      // other's after. Both warpgroups have the same nkb + 1 issue points in a tile; warpgroup 1 opens warpgroup 0's
      // first turn and skips the arrive after its last one, so that no arrival is left over when the tile ends.
      const int n_issue = nkb > 0 ? nkb + 1 : 0;
      int issued = 0;
      auto my_turn = [&]() { named_bar_sync(1 + wg, 256); };
      auto pass_turn = [&]() {
        if (wg == 0 || ++issued < n_issue) named_bar_arrive(1 + (wg ^ 1), 256);
      };
      if (wg == 1 && n_issue > 0) named_bar_arrive(1, 256);
      if (nkb == 0) mbar_arrive(q_empty);  // (a tile whose rows see no key: Q unread)
      if (nkb > 0) {  // key block 0: S_0 alone (no P V yet)
        mbar_wait(k_full + (it0 & 1), use(it0));
        my_turn();
        St::issue_qk(s, q_addr, k_addr(it0));
        pass_turn();
        wgmma_wait<0>();
        s_landed(0);
        St::template softmax<CAUSAL>(s, m_run, l_run, alpha, needs_check(0), r0, 0, t, p, d);
        St::pack(pa, s);
      }
      for (int kb = 1; kb < nkb; ++kb) {
        const int64_t j0 = int64_t(kb) * BN;
        const uint32_t it = it0 + kb;
        mbar_wait(k_full + (it & 1), use(it));
        my_turn();
        St::issue_qk(s, q_addr, k_addr(it));
        St::rescale(o, alpha);  // by P_{kb-1}'s row scale, while S_kb runs (FA3's order)
        mbar_wait(v_full + ((it - 1) & 1), use(it - 1));
        St::issue_pv(o, pa, v_addr(it - 1));
        pass_turn();
        wgmma_wait<1>();  // S_kb has landed (the P V may still run)
        s_landed(kb);
        St::template softmax<CAUSAL>(s, m_run, l_run, alpha, needs_check(j0), r0, j0, t, p, d);
        St::pin(pin_slot, l_run);
        wgmma_wait<0>();  // P_{kb-1} V_{kb-1}: o and pa are free
        fence_operands(o);
        mbar_arrive(v_empty + ((it - 1) & 1));  // V_{kb-1} read
        St::pack(pa, s);
      }
      if (nkb > 0) {  // the last P V
        const uint32_t it = it0 + nkb - 1;
        mbar_wait(v_full + (it & 1), use(it));
        my_turn();
        St::rescale(o, alpha);
        St::issue_pv_width(o, pa, v_addr(it), St::live_width(live));  // (P is 0 past the live keys)
        pass_turn();
        wgmma_wait<0>();
        fence_operands(o);
        mbar_arrive(v_empty + (it & 1));
      }
      store_out<E, HD>(p, o, m_run, l_run, d.scale_log2, r0, fb.b, fb.h, fb.bh, t);
      it0 += nkb;
    }
  }
#else
  __trap();  // not an sm_90a pass: fwd_sm90 never launches this
#endif
}

template <class E, class C, bool CAUSAL>
cudaError_t launch(const AttnFwdParams& p, const Derived& d, cudaStream_t stream) {
  auto kernel = attn_fwd_sm90_kernel<E, C, CAUSAL>;
  cudaError_t err = fit_kernel(kernel, C::smem);
  if (err != cudaSuccess) return err;
  const int64_t blocks = (p.Lq + C::BM - 1) / C::BM * p.B * p.Hq;
  kernel<<<unsigned(blocks), C::NT, C::smem, stream>>>(p, d);
  return cudaGetLastError();
}

template <class E, class C64, class C128>
cudaError_t launch_hd(const AttnFwdParams& p, const Derived& d, cudaStream_t stream) {
  if (p.D == 64) return p.causal ? launch<E, C64, true>(p, d, stream) : launch<E, C64, false>(p, d, stream);
  return p.causal ? launch<E, C128, true>(p, d, stream) : launch<E, C128, false>(p, d, stream);
}

template <class C64, class C128>
cudaError_t launch_cfg(const AttnFwdParams& p, const Derived& d, cudaStream_t stream) {
  return p.dtype == DType::F16 ? launch_hd<F16, C64, C128>(p, d, stream) : launch_hd<BF16, C64, C128>(p, d, stream);
}

// ---- host side of the warp-specialized variant ----
using EncodeTiledFn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                   const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                   CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

// cuTensorMapEncodeTiled of the driver, found through the runtime (no -lcuda); nullptr when there is none.
EncodeTiledFn encode_tiled() {
  static const EncodeTiledFn fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
#if defined(PYATTN_CUDA_EMU) || CUDART_VERSION >= 12050
    const cudaError_t err =
        cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &found);
#else  // (toolkits before 12.5; the call was deprecated in 12.5 and dropped in 13)
    const cudaError_t err = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &f, cudaEnableDefault, &found);
#endif
    if (err != cudaSuccess || found != cudaDriverEntryPointSuccess) return EncodeTiledFn(nullptr);
    return reinterpret_cast<EncodeTiledFn>(f);
  }();
  return fn;
}

// The TMA map of a (B, H, L, D) 16-bit tensor (element strides s = {b, h, l}, unit column stride) as the 4-D tensor
// (D, L, H, B), boxes of 64 columns x `rows` rows, 128-byte swizzle, zeros outside. A dim of size 1 gets the stride
// of a packed layout (its own never matters). false when the driver has no encoder or refuses the strides.
bool make_map(CUtensorMap* map, const void* ptr, DType dtype, int64_t B, int64_t H, int64_t L, int64_t D,
              const int64_t* s, uint32_t rows) {
  const EncodeTiledFn encode = encode_tiled();
  if (encode == nullptr) return false;
  const int64_t sl = L > 1 ? s[2] : ((D + 7) / 8) * 8, sh = H > 1 ? s[1] : L * sl, sb = B > 1 ? s[0] : H * sh;
  if (sl <= 0 || sh <= 0 || sb <= 0) return false;  // broadcast (stride 0) dims: the cp.async kernel takes them
  const cuuint64_t dims[4] = {cuuint64_t(D), cuuint64_t(L), cuuint64_t(H), cuuint64_t(B)};
  const cuuint64_t strides[3] = {cuuint64_t(sl) * 2, cuuint64_t(sh) * 2, cuuint64_t(sb) * 2};  // bytes
  const cuuint32_t box[4] = {64, rows, 1, 1}, elem_strides[4] = {1, 1, 1, 1};
  return encode(map, dtype == DType::BF16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 4,
                const_cast<void*>(ptr), dims, strides, box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// pl.persistent: a block per SM (one block fits an SM), else a block per tile; pl.dynamic (causal only): the tile
// scheduler's counter is p.tile_counter
template <class E, int HD, int BN, bool CAUSAL>
cudaError_t launch_ws(const AttnFwdParams& p, const Derived& d, const CUtensorMap& tq, const CUtensorMap& tk,
                      const CUtensorMap& tv, const Sm90Plan& pl, cudaStream_t stream) {
  using C = WsCfg<HD, BN>;
  auto kernel = attn_fwd_sm90_ws_kernel<E, HD, BN, CAUSAL, false>;
  if constexpr (CAUSAL)  // (non-causal tiles are all alike: round-robin balances them; its ticket code spills)
    if (pl.dynamic) kernel = attn_fwd_sm90_ws_kernel<E, HD, BN, CAUSAL, true>;
  cudaError_t err = fit_kernel(kernel, C::smem);
  if (err != cudaSuccess) return err;
  const int64_t tiles = (p.Lq + C::BM - 1) / C::BM * p.B * p.Hq;
  const int64_t blocks = pl.persistent && p.num_sms > 0 && p.num_sms < tiles ? p.num_sms : tiles;
  kernel<<<unsigned(blocks), C::NT, C::smem, stream>>>(tq, tk, tv, p, d);
  return cudaGetLastError();
}

// pl.bn176: key blocks of 176 at HD 128 (FA3's for non-causal, the default there; sm90_plan sets it only there)
template <class E, bool CAUSAL>
cudaError_t launch_ws_hd(const AttnFwdParams& p, const Derived& d, const CUtensorMap& tq, const CUtensorMap& tk,
                         const CUtensorMap& tv, const Sm90Plan& pl, cudaStream_t stream) {
  if (p.D == 64) return launch_ws<E, 64, 128, CAUSAL>(p, d, tq, tk, tv, pl, stream);
  if constexpr (!CAUSAL)
    if (pl.bn176) return launch_ws<E, 128, 176, false>(p, d, tq, tk, tv, pl, stream);
  return launch_ws<E, 128, 128, CAUSAL>(p, d, tq, tk, tv, pl, stream);
}

// The warp-specialized forward: false when the TMA maps cannot be made (then the caller launches the cp.async
// kernel), else true with the launch's status in *err.
bool fwd_ws(const AttnFwdParams& p, const Derived& d, const Sm90Plan& pl, cudaStream_t stream, cudaError_t* err) {
  const uint32_t q_rows = 128, kv_rows = pl.bn176 ? 176 : 128;  // WsCfg's BM and BN
  CUtensorMap tq, tk, tv;
  if (!make_map(&tq, p.q, p.dtype, p.B, p.Hq, p.Lq, p.D, p.q_stride, q_rows) ||
      !make_map(&tk, p.k, p.dtype, p.B, p.Hkv, p.Lk, p.D, p.k_stride, kv_rows) ||
      !make_map(&tv, p.v, p.dtype, p.B, p.Hkv, p.Lk, p.Dv, p.v_stride, kv_rows))
    return false;
  if (pl.dynamic && p.tile_counter == nullptr) {  // (the bindings allocate it when sm90_plan asks)
    *err = cudaErrorInvalidValue;
    return true;
  }
  if (p.dtype == DType::F16)
    *err = p.causal ? launch_ws_hd<F16, true>(p, d, tq, tk, tv, pl, stream)
                    : launch_ws_hd<F16, false>(p, d, tq, tk, tv, pl, stream);
  else
    *err = p.causal ? launch_ws_hd<BF16, true>(p, d, tq, tk, tv, pl, stream)
                    : launch_ws_hd<BF16, false>(p, d, tq, tk, tv, pl, stream);
  return true;
}

}  // namespace sm90

// Default: the warp-specialized kernel (the cp.async kernel when the TMA maps cannot be made), persistent (a block per
// SM), causal calls taking their tiles from the dynamic scheduler's counter (FA3's choice there), non-causal HD 128
// with key blocks of 176. Measured on the H200 (bf16, TFLOP/s, two runs in one lease, same code:
// benchmarks/results/nvidia-h200/gpu-attn-variants.log and -runI.log, run H / I):
//   L = 4096  non-causal HD 128: persistent 610 / 608, a block per tile 586 / 585 (cuDNN 616 / 616)
//             causal     HD 128: dynamic 542 / 538, round-robin 519 / 523, a block per tile 529 / 521 (cuDNN 534 / 531)
//             causal     HD 64:  dynamic 403 / 398, round-robin 374 / 363, a block per tile 371 / 385 (cuDNN 424 / 420)
//             non-causal HD 64:  all grids 440-450 (cuDNN 463 / 459)
//   L = 1024  HD 128: non-causal persistent 513 / 508, a block per tile 483 / 480; causal dynamic 376 / 375, a block
//             per tile 343 / 343
// (one kernel measured under two names differed by up to 3% in one run: differences below that are noise). The L2
// sections of causal grids (derive) pay 9-10% at causal HD 128, L = 4096 (PYATTN_CUDA_ATTN_L2=0: 486 / 490).
// Earlier: the fourth H200 session measured 176-key blocks 6% / 5% faster than 128 at non-causal HD 128.
// PYATTN_CUDA_ATTN_SM90=ws1: a block per tile; =wsp: persistent, causal tiles round-robin (static); =wsd: the default
// (named, for the variants script); =ws128: key blocks of 128 for non-causal HD 128 too; =cp: the cp.async kernel;
// =0: off (attention.cu's mma.sync kernel).
Sm90Plan sm90_plan(const AttnFwdParams& p, const Derived& d) {
  Sm90Plan pl;
#if defined(PYATTN_SM90A) || defined(PYATTN_CUDA_EMU)
  const char* env = std::getenv("PYATTN_CUDA_ATTN_SM90");  // read once per call: tests and benchmarks switch it
  auto is = [&](const char* v) { return env != nullptr && std::strcmp(env, v) == 0; };
  // (the softmax takes the row max of the raw logits: a positive scale)
  pl.take = !is("0") && p.arch == 90 && (p.dtype == DType::F16 || p.dtype == DType::BF16) &&
            (p.D == 64 || p.D == 128) && p.Dv == p.D && p.mask_kind == MaskKind::None && !d.dropout && d.vec_q &&
            d.vec_k && d.vec_v && d.vec_o && d.scale_log2 > 0.0f;
  if (!pl.take) return pl;
  pl.cp = is("cp");
  pl.persistent = !is("ws1");
  pl.dynamic = !pl.cp && pl.persistent && !is("wsp") && p.causal;
  pl.bn176 = !is("ws128") && p.D == 128 && !p.causal;
#else
  (void)p;
  (void)d;  // no sm_90a code in this build (TORCH_CUDA_ARCH_LIST without 9.0a)
#endif
  return pl;
}

bool fwd_sm90(const AttnFwdParams& p, const Derived& d, cudaStream_t stream, cudaError_t* err) {
  const Sm90Plan pl = sm90_plan(p, d);
  if (!pl.take) return false;
#if defined(PYATTN_SM90A) || defined(PYATTN_CUDA_EMU)
  if (!pl.cp && sm90::fwd_ws(p, d, pl, stream, err)) return true;
  *err = sm90::launch_cfg<sm90::Cfg<64, 1, 128>, sm90::Cfg<128, 2, 128>>(p, d, stream);
  return true;
#else
  (void)stream;
  (void)err;
  return false;
#endif
}

}  // namespace attn
}  // namespace cuda
}  // namespace pyattn
