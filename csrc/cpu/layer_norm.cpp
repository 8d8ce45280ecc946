// LayerNorm / RMSNorm (+ fused residual add) CPU kernels. Torch-free: see pyattn/params.h for the contract.
//
// Forward, one row at a time; the row stays in L1 (N = 1024 fp32 is 4 KB) between the passes:
//   pass 1  s = round_to_dtype(x + residual) (stored to residual_out), and sum(s) [RMS: sum(s^2)]. Each row is
//           read from memory once: passes 2-3 re-read s from the x row, the residual_out row, or an fp32 scratch
//           row, all in L1.
//   pass 2  corrected two-pass variance (Bjorck): m1 = sum/N, d = s - m1, c = mean(d), var = mean(d^2) - c^2.
//           (s - m1) is exact when s is close to m1 (Sterbenz), so inputs offset by +1000 keep full accuracy.
//   pass 3  y = ((s - m1) - c) * rstd * w + b
// Rows are split into one contiguous block per OpenMP thread and software-pipelined (pass 1 of row i + 1 runs
// between the statistics and pass 3 of row i). Very large problems write their outputs with non-temporal stores.
// Backward, one row at a time: pass 1 gathers mean(g), mean(g * xhat) and the dweight/dbias partial sums of the
// row's chunk; pass 2 writes dx. dweight/dbias: fp32 partial sums per chunk of rows, where the chunks depend only
// on (M, N) (never on the thread count), then a fixed-order sum over chunks: bitwise reproducible.
//
// Vectorisation: 16 fp32 lanes. AVX-512 intrinsics when the build targets AVX-512 (F+BW+VL; +BF16/DQ for the
// one-instruction bf16 rounding); otherwise plain 16-lane loops the compiler auto-vectorises (AVX2, SSE or
// scalar): the same algorithm, up to last-bit differences. The reduction order inside a row depends only on N (no
// alignment peeling), so strided/padded rows give bit-identical results to contiguous ones, and every result is
// independent of the number of threads.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ < 13
// GCC 12's AVX-512 intrinsic headers trip -W(maybe-)uninitialized (_mm512_undefined_*; GCC bug 105593).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <type_traits>

#if defined(_OPENMP)
#include <omp.h>
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define PYATTN_LN_AVX512 1
#include <immintrin.h>
#else
#define PYATTN_LN_AVX512 0
#endif

#include "pyattn/cpu_kernels.h"
#include "pyattn/cpu_util.h"
#include "pyattn/params.h"

namespace pyattn {
namespace cpu {
namespace {

constexpr int64_t kW = 16;                         // fp32 lanes per vector
constexpr int64_t kParallelMinElems = 32768;       // below this many elements, run on one thread
constexpr int64_t kMinChunkRows = 16;              // dweight/dbias: at least this many rows per chunk
constexpr int64_t kMaxChunks = 128;                // ... and at most this many chunks
constexpr int64_t kMaxWorkspaceFloats = 1 << 24;   // ... and at most 64 MiB of partial sums
// A forward that moves more than this many bytes in total (inputs + outputs) writes its outputs with non-temporal
// stores: they cannot stay in a typical L3 anyway, and streaming them saves the read-for-ownership traffic (as
// glibc's memcpy does above the shared cache size). Results are bit-identical either way. PYATTN_LN_STREAM_BYTES
// overrides the threshold (read once; for benchmarking).
inline int64_t stream_bytes() {
  static const int64_t v = [] {
    const char* e = std::getenv("PYATTN_LN_STREAM_BYTES");
    return e != nullptr ? static_cast<int64_t>(std::atoll(e)) : (int64_t(48) << 20);
  }();
  return v;
}

// ------------------------------------------------------------------------------------------------------------
// 16-lane fp32 vector
// ------------------------------------------------------------------------------------------------------------
#if PYATTN_LN_AVX512

using vf = __m512;
inline __mmask16 lanes(int64_t n) { return static_cast<__mmask16>((1u << n) - 1u); }  // 1 <= n <= 16
inline vf vzero() { return _mm512_setzero_ps(); }
inline vf vset(float a) { return _mm512_set1_ps(a); }
inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
inline vf vsub(vf a, vf b) { return _mm512_sub_ps(a, b); }
inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }  // a * b + c
inline vf vmaskz(vf a, int64_t n) { return n == kW ? a : _mm512_maskz_mov_ps(lanes(n), a); }
inline float vsum(vf a) { return _mm512_reduce_add_ps(a); }

inline vf bf16x16_to_vf(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }
// fp32 -> bf16, round to nearest even, NaN -> 0x7FC0: the same bits as c10::BFloat16 / f32_to_bf16.
inline __m256i vf_to_bf16x16_exact(vf v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
  return _mm512_cvtepi32_epi16(r);
}
inline __m256i vf_to_bf16x16(vf v) {
#if defined(__AVX512BF16__) && defined(__AVX512DQ__)
  // One instruction (RNE) for the common case; it treats subnormals as zero and keeps NaN payloads, so lanes that
  // are subnormal (0x20) or NaN (0x01 | 0x80) take the exact path: the result is the same bits either way.
  if (__builtin_expect(_mm512_fpclass_ps_mask(v, 0xA1) == 0, 1)) return (__m256i)_mm512_cvtneps_pbh(v);
#endif
  return vf_to_bf16x16_exact(v);
}
constexpr int kF16Round = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
// 16-bit storage <-> fp32 vector
inline __m256i pack16(vf v, const bf16_t*) { return vf_to_bf16x16(v); }
inline __m256i pack16(vf v, const f16_t*) { return _mm512_cvtps_ph(v, kF16Round); }
inline vf unpack16(__m256i h, const bf16_t*) { return bf16x16_to_vf(h); }
inline vf unpack16(__m256i h, const f16_t*) { return _mm512_cvtph_ps(h); }
inline __m256i load16(const void* p, int64_t n) {
  return n == kW ? _mm256_loadu_si256(static_cast<const __m256i*>(p)) : _mm256_maskz_loadu_epi16(lanes(n), p);
}
// stream: non-temporal store (n == kW and p 32-byte aligned).
inline void store16(void* p, __m256i h, int64_t n, bool stream) {
  if (n == kW) {
    if (stream) _mm256_stream_si256(static_cast<__m256i*>(p), h);
    else _mm256_storeu_si256(static_cast<__m256i*>(p), h);
  } else {
    _mm256_mask_storeu_epi16(p, lanes(n), h);
  }
}

// Load n (1..16) elements as fp32; lanes >= n are 0. Never touches memory past p[n-1].
inline vf vload(const float* p, int64_t n) { return n == kW ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(lanes(n), p); }
template <class T>
inline vf vload(const T* p, int64_t n) { return unpack16(load16(p, n), p); }
// Store n (1..16) lanes, converting to the storage type. stream: non-temporal (n == kW, p 64-byte aligned).
inline void vstore(float* p, vf v, int64_t n, bool stream = false) {
  if (n == kW) {
    if (stream) _mm512_stream_ps(p, v);
    else _mm512_storeu_ps(p, v);
  } else {
    _mm512_mask_storeu_ps(p, lanes(n), v);
  }
}
template <class T>
inline void vstore(T* p, vf v, int64_t n, bool stream = false) { store16(p, pack16(v, p), n, stream); }
// For computed outputs (y, dx): bf16 may use the bare one-instruction conversion, which flushes results below
// 2^-126 (fp32 subnormals, |error| < 1.2e-38) to zero and keeps NaN payloads. Inputs' copies (residual_out) use the
// exact vstore.
template <class T>
inline void vstore_out(T* p, vf v, int64_t n, bool stream = false) { vstore(p, v, n, stream); }
#if defined(__AVX512BF16__)
template <>
inline void vstore_out<bf16_t>(bf16_t* p, vf v, int64_t n, bool stream) {
  store16(p, (__m256i)_mm512_cvtneps_pbh(v), n, stream);
}
#endif
// v rounded to T (returned in fp32), also stored to dst when dst != nullptr.
inline vf vround_store(vf v, float* dst, int64_t n, bool stream) {
  if (dst != nullptr) vstore(dst, v, n, stream);
  return v;
}
template <class T>
inline vf vround_store(vf v, T* dst, int64_t n, bool stream) {
  const __m256i h = pack16(v, dst);
  if (dst != nullptr) store16(dst, h, n, stream);
  return unpack16(h, dst);
}
inline void stream_fence() { _mm_sfence(); }
constexpr bool kHasStream = true;

#else  // portable 16-lane loops, auto-vectorised by the compiler

struct vf {
  float v[kW];
};
inline vf vzero() {
  vf r;
  for (int64_t k = 0; k < kW; ++k) r.v[k] = 0.f;
  return r;
}
inline vf vset(float a) {
  vf r;
  for (int64_t k = 0; k < kW; ++k) r.v[k] = a;
  return r;
}
#define PYATTN_LN_BINOP(name, expr)                          \
  inline vf name(vf a, vf b) {                               \
    vf r;                                                    \
    for (int64_t k = 0; k < kW; ++k) r.v[k] = (expr);        \
    return r;                                                \
  }
PYATTN_LN_BINOP(vadd, a.v[k] + b.v[k])
PYATTN_LN_BINOP(vsub, a.v[k] - b.v[k])
PYATTN_LN_BINOP(vmul, a.v[k] * b.v[k])
#undef PYATTN_LN_BINOP
inline vf vfma(vf a, vf b, vf c) {
  vf r;
  for (int64_t k = 0; k < kW; ++k) r.v[k] = std::fma(a.v[k], b.v[k], c.v[k]);
  return r;
}
inline vf vmaskz(vf a, int64_t n) {
  for (int64_t k = n; k < kW; ++k) a.v[k] = 0.f;
  return a;
}
inline float vsum(vf a) {  // fixed tree order
  for (int64_t w = kW / 2; w > 0; w /= 2)
    for (int64_t k = 0; k < w; ++k) a.v[k] += a.v[k + w];
  return a.v[0];
}
template <class T>
inline vf vload(const T* p, int64_t n) {
  vf r;
  if (n == kW) {
    for (int64_t k = 0; k < kW; ++k) r.v[k] = to_f32(p[k]);
  } else {
    for (int64_t k = 0; k < kW; ++k) r.v[k] = k < n ? to_f32(p[k]) : 0.f;
  }
  return r;
}
template <class T>
inline void vstore(T* p, vf v, int64_t n, bool /*stream*/ = false) {
  for (int64_t k = 0; k < n; ++k) p[k] = from_f32<T>(v.v[k]);
}
template <class T>
inline void vstore_out(T* p, vf v, int64_t n, bool stream = false) { vstore(p, v, n, stream); }
template <class T>
inline vf vround_store(vf v, T* dst, int64_t n, bool /*stream*/) {
  for (int64_t k = 0; k < kW; ++k) v.v[k] = to_f32(from_f32<T>(v.v[k]));
  if (dst != nullptr) vstore(dst, v, n);
  return v;
}
inline void stream_fence() {}
constexpr bool kHasStream = false;

#endif

// Row loops. body(j, n, acc) handles elements [j, j + n) (n == kW except for the tail) and adds its
// contributions into acc[0..NA). Four independent accumulator sets hide the add latency; the reduction order
// depends only on N.
template <int NA, class F>
inline void row_reduce(int64_t N, F&& body, float* out) {
  vf acc[4][NA];
  for (int u = 0; u < 4; ++u)
    for (int a = 0; a < NA; ++a) acc[u][a] = vzero();
  int64_t j = 0;
  for (; j + 4 * kW <= N; j += 4 * kW) {
    body(j, kW, acc[0]);
    body(j + kW, kW, acc[1]);
    body(j + 2 * kW, kW, acc[2]);
    body(j + 3 * kW, kW, acc[3]);
  }
  for (; j + kW <= N; j += kW) body(j, kW, acc[0]);
  if (j < N) body(j, N - j, acc[1]);
  for (int a = 0; a < NA; ++a) out[a] = vsum(vadd(vadd(acc[0][a], acc[1][a]), vadd(acc[2][a], acc[3][a])));
}

template <class F>
inline void row_map(int64_t N, F&& body) {
  int64_t j = 0;
  for (; j + kW <= N; j += kW) body(j, kW);
  if (j < N) body(j, N - j);
}

// dst[0..N) = value(j, n) for each vector, with non-temporal stores when `stream` and dst is 64-byte aligned.
template <class T, class F>
inline void row_store(T* dst, int64_t N, bool stream, F&& value) {
  if (stream && (reinterpret_cast<uintptr_t>(dst) & 63) == 0) {
    row_map(N, [&](int64_t j, int64_t n) { vstore_out(dst + j, value(j, n), n, true); });
  } else {
    row_map(N, [&](int64_t j, int64_t n) { vstore_out(dst + j, value(j, n), n); });
  }
}

inline int max_threads(int requested) {
#if defined(_OPENMP)
  return requested > 0 ? requested : omp_get_max_threads();
#else
  (void)requested;
  return 1;
#endif
}
inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// fp32 copy of an (N,) parameter vector; `fill` where absent. Returns p directly when it is already fp32.
inline const float* param_as_f32(const void* p, DType dt, int64_t N, float fill, float* buf) {
  if (p != nullptr && dt == DType::F32) return static_cast<const float*>(p);
  if (p == nullptr) {
    std::fill(buf, buf + N, fill);
  } else if (dt == DType::BF16) {
    const auto* h = static_cast<const bf16_t*>(p);
    for (int64_t j = 0; j < N; ++j) buf[j] = to_f32(h[j]);
  } else {
    const auto* h = static_cast<const f16_t*>(p);
    for (int64_t j = 0; j < N; ++j) buf[j] = to_f32(h[j]);
  }
  return buf;
}

// ------------------------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------------------------
// Where passes 2 and 3 re-read the row s from, while it is still in cache (each the faster one measured):
enum class SrcMode {
  kInput,         // no residual: the input row x itself (16-bit rows converted again in each pass)
  kScratchInput,  // 16-bit rows of up to kScratchMaxN, no residual: an fp32 scratch row (converted once)
  kResOut,        // residual: the residual_out row just written
  kScratch,       // residual, residual_out absent or streamed (not in cache): an fp32 scratch row
};
// 16-bit rows longer than this re-read the input row in passes 2-3 (kInput) instead of an fp32 copy of it: the
// copy doubles the row's bytes and, with its double buffer, pushed N = 4096 out of L1. Measured 2026-11-27
// (interleaved A/B in one process, M = 1024 / 4096, bf16 and fp16, p50): N <= 256 the copy 10-15% faster, N = 512
// mixed, N = 768-16384 the input row 20-45% faster (LayerNorm bf16 N = 4096: 0.88 -> 0.73 ms, RMSNorm 0.75 -> 0.52).
// (The residual's scratch row stays fp32: a bf16 one, converted in each pass, measured 5-40% slower.)
constexpr int64_t kScratchMaxN = 512;

// Pass 1 of row i: s = x (+ residual, rounded to T; stored to residual_out), and sum(s) (LN) or sum(s^2) (RMS).
// Returns the sum; *src is where passes 2-3 read s.
template <class T, bool RMS, SrcMode MODE, class S>
inline float norm_fwd_pass1(const T* xr, const T* rr, T* ro, float* scratch, int64_t N, bool stream, const S** src) {
  float sum1;
  if (MODE == SrcMode::kInput) {
    row_reduce<1>(N, [&](int64_t j, int64_t n, vf* acc) {
      const vf v = vload(xr + j, n);
      acc[0] = RMS ? vfma(v, v, acc[0]) : vadd(acc[0], v);
    }, &sum1);
    *src = reinterpret_cast<const S*>(xr);
  } else if (MODE == SrcMode::kResOut) {
    row_reduce<1>(N, [&](int64_t j, int64_t n, vf* acc) {
      const vf v = vround_store(vadd(vload(xr + j, n), vload(rr + j, n)), ro + j, n, false);
      acc[0] = RMS ? vfma(v, v, acc[0]) : vadd(acc[0], v);
    }, &sum1);
    *src = reinterpret_cast<const S*>(ro);
  } else if (MODE == SrcMode::kScratchInput) {
    row_reduce<1>(N, [&](int64_t j, int64_t n, vf* acc) {
      const vf v = vload(xr + j, n);
      vstore(scratch + j, v, n);
      acc[0] = RMS ? vfma(v, v, acc[0]) : vadd(acc[0], v);
    }, &sum1);
    *src = reinterpret_cast<const S*>(scratch);
  } else {
    const bool stream_ro = stream && (reinterpret_cast<uintptr_t>(ro) & 63) == 0;
    row_reduce<1>(N, [&](int64_t j, int64_t n, vf* acc) {
      const vf v = vround_store(vadd(vload(xr + j, n), vload(rr + j, n)), ro != nullptr ? ro + j : nullptr, n,
                                stream_ro);
      vstore(scratch + j, v, n);
      acc[0] = RMS ? vfma(v, v, acc[0]) : vadd(acc[0], v);
    }, &sum1);
    *src = reinterpret_cast<const S*>(scratch);
  }
  return sum1;
}

struct RowStats {
  float m1 = 0.f;   // LN: fp32 mean estimate from pass 1
  float c = 0.f;    // LN: correction, mean = m1 + c
  float rstd = 0.f;
};

// Pass 2 (LN: corrected two-pass variance around m1 = sum / N) and the row's statistics.
template <bool RMS, class S>
inline RowStats norm_fwd_stats(const S* s, float sum1, int64_t N, float eps) {
  RowStats st;
  const float fn = static_cast<float>(N);
  if (RMS) {
    st.rstd = static_cast<float>(1.0 / std::sqrt(static_cast<double>(sum1 / fn) + eps));
    return st;
  }
  st.m1 = sum1 / fn;  // a division: exact for constant rows whose sum is exact
  const vf vm1 = vset(st.m1);
  float cq[2];
  row_reduce<2>(N, [&](int64_t j, int64_t n, vf* acc) {
    const vf d = vmaskz(vsub(vload(s + j, n), vm1), n);  // exact when s is near m1 (Sterbenz)
    acc[0] = vadd(acc[0], d);
    acc[1] = vfma(d, d, acc[1]);
  }, cq);
  st.c = cq[0] / fn;
  const float var = std::max(cq[1] / fn - st.c * st.c, 0.f);
  st.rstd = static_cast<float>(1.0 / std::sqrt(static_cast<double>(var) + eps));
  return st;
}

// Pass 3: LN y = ((s - m1) - c) * rstd * w + b, computed as (s - m1) * rstd + (-c * rstd): s - m1 is exact near
// the mean and c is tiny, so this keeps the accuracy of the corrected two-pass form. RMS: y = s * rstd * w.
template <bool RMS, class S, class T>
inline void norm_fwd_pass3(const S* s, const RowStats& st, T* yr, const float* w, const float* b, int64_t N,
                           bool stream) {
  const vf vr = vset(st.rstd);
  if (RMS) {
    row_store(yr, N, stream, [&](int64_t j, int64_t n) { return vmul(vmul(vload(s + j, n), vr), vload(w + j, n)); });
    return;
  }
  const vf vm1 = vset(st.m1), vcr = vset(-st.c * st.rstd);
  row_store(yr, N, stream, [&](int64_t j, int64_t n) {
    const vf t = vfma(vsub(vload(s + j, n), vm1), vr, vcr);
    return vfma(t, vload(w + j, n), vload(b + j, n));
  });
}

// Rows [begin, end) on one thread, software-pipelined: pass 1 of row i + 1 is issued between the statistics of
// row i (a latency-bound chain of reductions, divisions and a square root) and pass 3 of row i, so the
// out-of-order core overlaps them (about 10% faster on rows in cache). Everything is passed by value so pointers
// stay in registers.
template <class T, bool RMS, SrcMode MODE>
void norm_fwd_rows(const NormFwdParams q, int64_t begin, int64_t end, const float* w, const float* b,
                   float* scratch2 /* 2 x scratch_stride floats (kScratch) */, int64_t scratch_stride, bool stream) {
  constexpr bool kScratch = MODE == SrcMode::kScratch || MODE == SrcMode::kScratchInput;
  using S = typename std::conditional<kScratch, float, T>::type;
  const int64_t N = q.N;
  const T* x = static_cast<const T*>(q.x);
  const T* res = static_cast<const T*>(q.residual);
  T* y = static_cast<T*>(q.y);
  T* res_out = static_cast<T*>(q.residual_out);
  auto pass1 = [&](int64_t i, const S** src) {
    return norm_fwd_pass1<T, RMS, MODE>(x + i * q.x_row_stride,
                                        res != nullptr ? res + i * q.residual_row_stride : nullptr,
                                        res_out != nullptr ? res_out + i * q.residual_out_row_stride : nullptr,
                                        scratch2 != nullptr ? scratch2 + (i & 1) * scratch_stride : nullptr, N,
                                        stream, src);
  };
  if (begin >= end) return;
  const S* s = nullptr;
  float sum1 = pass1(begin, &s);
  for (int64_t i = begin; i < end; ++i) {
    const RowStats st = norm_fwd_stats<RMS>(s, sum1, N, q.eps);
    if (q.mean != nullptr && !RMS) q.mean[i] = st.m1 + st.c;
    if (q.rstd != nullptr) q.rstd[i] = st.rstd;
    const S* s_next = nullptr;
    float sum_next = 0.f;
    if (i + 1 < end) sum_next = pass1(i + 1, &s_next);
    norm_fwd_pass3<RMS>(s, st, y + i * q.y_row_stride, w, b, N, stream);
    s = s_next;
    sum1 = sum_next;
  }
}

template <class T, bool RMS, SrcMode MODE>
void norm_fwd_impl(const NormFwdParams& p, bool stream) {
  const int64_t M = p.M, N = p.N;
  std::unique_ptr<float[]> pbuf(new float[2 * N]);
  const float* w = param_as_f32(p.weight, p.weight_dtype, N, 1.f, pbuf.get());
  const float* b = RMS ? nullptr : param_as_f32(p.bias, p.bias_dtype, N, 0.f, pbuf.get() + N);

  const bool parallel = M > 1 && M * N >= kParallelMinElems;
  const int nthreads = parallel ? max_threads(p.num_threads) : 1;
  // Two fp32 scratch rows per thread (rows i and i + 1 are in flight together).
  const int64_t scratch_stride = round_up(N, kW);
  constexpr bool kScratch = MODE == SrcMode::kScratch || MODE == SrcMode::kScratchInput;
  std::unique_ptr<float[]> scratch_all(kScratch ? new float[2 * scratch_stride * nthreads] : nullptr);

#pragma omp parallel num_threads(nthreads) if (parallel)
  {
    // The same contiguous blocks of rows as schedule(static).
    int nt = 1, tid = 0;
#if defined(_OPENMP)
    nt = omp_get_num_threads();
    tid = omp_get_thread_num();
#endif
    const int64_t per = M / nt, extra = M % nt;
    const int64_t begin = tid * per + std::min<int64_t>(tid, extra);
    const int64_t end = begin + per + (tid < extra ? 1 : 0);
    float* scratch2 = scratch_all ? scratch_all.get() + 2 * scratch_stride * tid : nullptr;
    norm_fwd_rows<T, RMS, MODE>(p, begin, end, w, b, scratch2, scratch_stride, stream);
    if (stream) stream_fence();
  }
}

template <class T, bool RMS>
void norm_fwd_mode(const NormFwdParams& p) {
  if (p.M == 0) return;
  const bool res = p.residual != nullptr, res_out = p.residual_out != nullptr;
  const int64_t bytes = p.M * p.N * static_cast<int64_t>(sizeof(T)) * (2 + (res ? 1 : 0) + (res_out ? 1 : 0));
  const bool stream = kHasStream && bytes >= stream_bytes();
  constexpr bool kF32 = std::is_same<T, float>::value;
  if (!res && (kF32 || p.N > kScratchMaxN)) norm_fwd_impl<T, RMS, SrcMode::kInput>(p, stream);
  else if (!res) norm_fwd_impl<T, RMS, SrcMode::kScratchInput>(p, stream);
  else if (res_out && !stream) norm_fwd_impl<T, RMS, SrcMode::kResOut>(p, stream);
  else norm_fwd_impl<T, RMS, SrcMode::kScratch>(p, stream);
}

template <class T>
void norm_fwd_dispatch(const NormFwdParams& p) {
  p.rms ? norm_fwd_mode<T, true>(p) : norm_fwd_mode<T, false>(p);
}

// ------------------------------------------------------------------------------------------------------------
// Backward
// ------------------------------------------------------------------------------------------------------------
struct Chunking {
  int64_t rows_per_chunk = 1;
  int64_t nchunks = 0;
};
// Depends only on (M, N): the partition of rows for dweight/dbias partial sums is fixed for a given shape.
inline Chunking bwd_chunking(int64_t M, int64_t N) {
  Chunking c;
  if (M <= 0) return c;
  const int64_t max_chunks = std::max<int64_t>(1, std::min<int64_t>(kMaxChunks, kMaxWorkspaceFloats / (2 * N)));
  c.rows_per_chunk = std::max<int64_t>(kMinChunkRows, (M + max_chunks - 1) / max_chunks);
  c.nchunks = (M + c.rows_per_chunk - 1) / c.rows_per_chunk;
  return c;
}

// g = dy * w rounded to fp32, as an explicit FMA with a zero addend: GCC contracts a * b - c into one FMA in C++
// (-ffp-contract=fast), which in pass 2 would subtract mean(g) of the rounded products from the exact product,
// leaving their rounding difference times rstd where the gradient is 0 (N = 1: dx = rstd (g - g)).
inline vf rounded_product(vf a, vf b) { return vfma(a, b, vzero()); }

// One row of the backward. PARTIAL: accumulate dy * xhat into dwp and (LN) dy into dbp.
template <class T, bool RMS, bool PARTIAL>
inline void norm_bwd_row(const NormBwdParams& p, int64_t i, const float* w, float* dwp, float* dbp) {
  const int64_t N = p.N;
  const T* sr = static_cast<const T*>(p.s) + i * p.s_row_stride;
  const T* dyr = static_cast<const T*>(p.dy) + i * p.dy_row_stride;
  T* dxr = static_cast<T*>(p.dx) + i * p.dx_row_stride;
  const T* dres = p.dresidual_out ? static_cast<const T*>(p.dresidual_out) + i * p.dresidual_out_row_stride : nullptr;
  const vf vmean = vset(RMS ? 0.f : p.mean[i]);
  const vf vr = vset(p.rstd[i]);
  const float inv_n = 1.0f / static_cast<float>(N);

  // pass 1: sums of g and g * xhat, dweight/dbias partials
  float sums[2];
  row_reduce<2>(N, [&](int64_t j, int64_t n, vf* acc) {
    const vf dy = vload(dyr + j, n);
    const vf xhat = vmaskz(RMS ? vmul(vload(sr + j, n), vr) : vmul(vsub(vload(sr + j, n), vmean), vr), n);
    const vf g = rounded_product(dy, vload(w + j, n));
    if (!RMS) acc[0] = vadd(acc[0], g);
    acc[1] = vfma(g, xhat, acc[1]);
    if (PARTIAL) {
      vstore(dwp + j, vfma(dy, xhat, vload(dwp + j, n)), n);
      if (!RMS) vstore(dbp + j, vadd(vload(dbp + j, n), dy), n);
    }
  }, sums);
  const vf va = vset(RMS ? 0.f : sums[0] * inv_n);
  const vf vb = vset(sums[1] * inv_n);

  // pass 2: dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) (+ dresidual_out)
  row_map(N, [&](int64_t j, int64_t n) {
    const vf s = vload(sr + j, n);
    const vf xhat = RMS ? vmul(s, vr) : vmul(vsub(s, vmean), vr);
    const vf g = rounded_product(vload(dyr + j, n), vload(w + j, n));
    vf dx = vmul(vsub(g, vfma(xhat, vb, va)), vr);
    if (dres != nullptr) dx = vadd(dx, vload(dres + j, n));
    vstore_out(dxr + j, dx, n);
  });
}

template <class T, bool RMS>
void norm_bwd_impl(const NormBwdParams& p) {
  const int64_t M = p.M, N = p.N;
  const bool want_dw = p.dweight != nullptr, want_db = !RMS && p.dbias != nullptr;
  const bool partial = want_dw || want_db;

  std::unique_ptr<float[]> pbuf(new float[N]);
  const float* w = param_as_f32(p.weight, p.weight_dtype, N, 1.f, pbuf.get());

  const bool parallel = M > 1 && M * N >= kParallelMinElems;
  [[maybe_unused]] const int nthreads = parallel ? max_threads(p.num_threads) : 1;

  if (!partial) {
#pragma omp parallel for schedule(static) num_threads(nthreads) if (parallel)
    for (int64_t i = 0; i < M; ++i) norm_bwd_row<T, RMS, false>(p, i, w, nullptr, nullptr);
    return;
  }

  const Chunking ch = bwd_chunking(M, N);
  std::unique_ptr<float[]> own_ws;
  float* ws = p.workspace;
  if (ws == nullptr && ch.nchunks > 0) {
    own_ws.reset(new float[2 * ch.nchunks * N]);
    ws = own_ws.get();
  }
  float* dw_part = ws;                     // (nchunks, N)
  float* db_part = ws + ch.nchunks * N;    // (nchunks, N)

  if (M > 0) {
    [[maybe_unused]] const bool par_chunks = parallel && ch.nchunks > 1;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (par_chunks)
    for (int64_t k = 0; k < ch.nchunks; ++k) {
      float* dwp = dw_part + k * N;
      float* dbp = db_part + k * N;
      std::fill(dwp, dwp + N, 0.f);
      if (!RMS) std::fill(dbp, dbp + N, 0.f);
      const int64_t i_end = std::min(M, (k + 1) * ch.rows_per_chunk);
      for (int64_t i = k * ch.rows_per_chunk; i < i_end; ++i) norm_bwd_row<T, RMS, true>(p, i, w, dwp, dbp);
    }
  }

  // Fixed-order sum over chunks, column by column (independent of the thread count).
  auto reduce = [&](const float* part, void* out, DType dt) {
    const int64_t nblocks = (N + kW - 1) / kW;
    [[maybe_unused]] const bool par_red = parallel && ch.nchunks * N >= kParallelMinElems;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (par_red)
    for (int64_t blk = 0; blk < nblocks; ++blk) {
      const int64_t j = blk * kW, n = std::min(kW, N - j);
      vf acc = vzero();
      for (int64_t k = 0; k < ch.nchunks; ++k) acc = vadd(acc, vload(part + k * N + j, n));
      switch (dt) {
        case DType::F32: vstore(static_cast<float*>(out) + j, acc, n); break;
        case DType::BF16: vstore(static_cast<bf16_t*>(out) + j, acc, n); break;
        case DType::F16: vstore(static_cast<f16_t*>(out) + j, acc, n); break;
      }
    }
  };
  if (want_dw) reduce(dw_part, p.dweight, p.dweight_dtype);
  if (want_db) reduce(db_part, p.dbias, p.dbias_dtype);
}

template <class T>
void norm_bwd_dispatch(const NormBwdParams& p) {
  p.rms ? norm_bwd_impl<T, true>(p) : norm_bwd_impl<T, false>(p);
}

}  // namespace

void layer_norm_fwd(const NormFwdParams& p) {
  switch (p.dtype) {
    case DType::F32: norm_fwd_dispatch<float>(p); break;
    case DType::BF16: norm_fwd_dispatch<bf16_t>(p); break;
    case DType::F16: norm_fwd_dispatch<f16_t>(p); break;
  }
}

void layer_norm_bwd(const NormBwdParams& p) {
  switch (p.dtype) {
    case DType::F32: norm_bwd_dispatch<float>(p); break;
    case DType::BF16: norm_bwd_dispatch<bf16_t>(p); break;
    case DType::F16: norm_bwd_dispatch<f16_t>(p); break;
  }
}

int64_t layer_norm_bwd_workspace_floats(const NormBwdParams& p) {
  if (p.dweight == nullptr && (p.rms || p.dbias == nullptr)) return 0;
  return 2 * bwd_chunking(p.M, p.N).nchunks * p.N;
}

}  // namespace cpu
}  // namespace pyattn
