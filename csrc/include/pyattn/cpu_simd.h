// Torch-free SIMD layer shared by the C++ CPU kernels (csrc/cpu/): V holds NB fp32 lanes of the widest ISA the
// build targets (chosen at compile time: AVX-512 NB = 16, AVX2 + FMA NB = 8, else portable 128-bit vector extensions
// NB = 4), with loads/stores (tail-masked: vldn/vstn), arithmetic and Cephes-style exp/sigmoid/tanh (a few ulp;
// NaN propagates). MRMAX / ACC_MAX: the micro-kernel row and accumulator-register budgets of that ISA.
#pragma once
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 false positive inside _mm512_undefined_ps

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "pyattn/cpu_util.h"

#if defined(__AVX512F__)
#define PYATTN_CPU_ISA 512
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__)
#define PYATTN_CPU_ISA 256
#include <immintrin.h>
#else
#define PYATTN_CPU_ISA 0
#endif

namespace pyattn {
namespace cpu {
namespace simd {

// ------------------------------------------------------------------------------------------------------------
// Vector layer: V holds NB fp32 lanes
// ------------------------------------------------------------------------------------------------------------
#if PYATTN_CPU_ISA == 512

constexpr int NB = 16;       // lanes
constexpr int MRMAX = 8;     // rows of the micro-kernel
constexpr int ACC_MAX = 24;  // accumulators (of 32 zmm registers)
using V = __m512;
inline __mmask16 lane_mask(int n) { return static_cast<__mmask16>((1u << n) - 1u); }
inline V vzero() { return _mm512_setzero_ps(); }
inline V vset(float a) { return _mm512_set1_ps(a); }
inline V vld(const float* p) { return _mm512_loadu_ps(p); }
inline V vldn(const float* p, int n) { return n >= NB ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(lane_mask(n), p); }
inline void vst(float* p, V a) { _mm512_storeu_ps(p, a); }
inline void vstn(float* p, V a, int n) {
  if (n >= NB)
    _mm512_storeu_ps(p, a);
  else
    _mm512_mask_storeu_ps(p, lane_mask(n), a);
}
inline V vadd(V a, V b) { return _mm512_add_ps(a, b); }
inline V vsub(V a, V b) { return _mm512_sub_ps(a, b); }
inline V vmul(V a, V b) { return _mm512_mul_ps(a, b); }
inline V vdiv(V a, V b) { return _mm512_div_ps(a, b); }
inline V vfma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }    // a * b + c
inline V vfnma(V a, V b, V c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a * b
inline V vmax(V a, V b) { return _mm512_max_ps(a, b); }  // b when either is NaN
inline float vhsum(V a) { return _mm512_reduce_add_ps(a); }
// max/min return their SECOND operand when either is NaN: clamp(x) = min(hi, max(lo, x)) keeps a NaN x.
inline V vclamp(V x, float lo, float hi) { return _mm512_min_ps(vset(hi), _mm512_max_ps(vset(lo), x)); }
inline V vabs(V a) { return _mm512_abs_ps(a); }
inline V vsign_of(V a) {
  return _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(a), _mm512_set1_epi32(INT32_MIN)));
}
inline V vor(V a, V b) { return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(a), _mm512_castps_si512(b))); }
inline V vround(V a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline V vpow2i(V p, V n) { return _mm512_scalef_ps(p, n); }  // p * 2^n, n integral in [-126, 127]
inline V vselect_lt(V x, float thr, V a, V b) {                // x < thr ? a : b (NaN -> b)
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, vset(thr), _CMP_LT_OQ), b, a);
}
// The all-lanes zero-masked forms of unpack/shuffle: the same instructions, without the _mm512_undefined_ps()
// operand that GCC 12 reports as uninitialized under -Wall.
inline __m512 unpacklo(__m512 a, __m512 b) { return _mm512_maskz_unpacklo_ps(0xFFFF, a, b); }
inline __m512 unpackhi(__m512 a, __m512 b) { return _mm512_maskz_unpackhi_ps(0xFFFF, a, b); }
template <int IMM>
inline __m512 shuffle_ps(__m512 a, __m512 b) { return _mm512_maskz_shuffle_ps(0xFFFF, a, b, IMM); }
template <int IMM>
inline __m512 shuffle_lanes(__m512 a, __m512 b) { return _mm512_maskz_shuffle_f32x4(0xFFFF, a, b, IMM); }
// dst[c * ds + r] = src[r * ss + c] for r, c < NB (an NB x NB block, transposed in registers). Each 128-bit lane is
// a 4 x 4 transpose (unpack, shuffle); then the lanes are exchanged in two shuffle_f32x4 rounds.
inline void transpose_nb(const float* src, int64_t ss, float* dst, int64_t ds) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * ss);
  for (int g = 0; g < 4; ++g) {  // rows 4g..4g+3 -> t[4g + c] = their column 4k + c in lane k
    const __m512 lo01 = unpacklo(r[4 * g], r[4 * g + 1]), hi01 = unpackhi(r[4 * g], r[4 * g + 1]);
    const __m512 lo23 = unpacklo(r[4 * g + 2], r[4 * g + 3]);
    const __m512 hi23 = unpackhi(r[4 * g + 2], r[4 * g + 3]);
    t[4 * g] = shuffle_ps<0x44>(lo01, lo23);
    t[4 * g + 1] = shuffle_ps<0xEE>(lo01, lo23);
    t[4 * g + 2] = shuffle_ps<0x44>(hi01, hi23);
    t[4 * g + 3] = shuffle_ps<0xEE>(hi01, hi23);
  }
  for (int c = 0; c < 4; ++c) {  // out row 4k + c = lane k of t[c], t[4 + c], t[8 + c], t[12 + c]
    const __m512 u0 = shuffle_lanes<0x88>(t[c], t[4 + c]), u1 = shuffle_lanes<0xDD>(t[c], t[4 + c]);
    const __m512 u2 = shuffle_lanes<0x88>(t[8 + c], t[12 + c]);
    const __m512 u3 = shuffle_lanes<0xDD>(t[8 + c], t[12 + c]);
    _mm512_storeu_ps(dst + c * ds, shuffle_lanes<0x88>(u0, u2));
    _mm512_storeu_ps(dst + (4 + c) * ds, shuffle_lanes<0x88>(u1, u3));
    _mm512_storeu_ps(dst + (8 + c) * ds, shuffle_lanes<0xDD>(u0, u2));
    _mm512_storeu_ps(dst + (12 + c) * ds, shuffle_lanes<0xDD>(u1, u3));
  }
}

#elif PYATTN_CPU_ISA == 256

constexpr int NB = 8;
constexpr int MRMAX = 4;
constexpr int ACC_MAX = 12;  // of 16 ymm registers
using V = __m256;
inline __m256i lane_mask(int n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline V vzero() { return _mm256_setzero_ps(); }
inline V vset(float a) { return _mm256_set1_ps(a); }
inline V vld(const float* p) { return _mm256_loadu_ps(p); }
inline V vldn(const float* p, int n) { return n >= NB ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, lane_mask(n)); }
inline void vst(float* p, V a) { _mm256_storeu_ps(p, a); }
inline void vstn(float* p, V a, int n) {
  if (n >= NB)
    _mm256_storeu_ps(p, a);
  else
    _mm256_maskstore_ps(p, lane_mask(n), a);
}
inline V vadd(V a, V b) { return _mm256_add_ps(a, b); }
inline V vsub(V a, V b) { return _mm256_sub_ps(a, b); }
inline V vmul(V a, V b) { return _mm256_mul_ps(a, b); }
inline V vdiv(V a, V b) { return _mm256_div_ps(a, b); }
inline V vfma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
inline V vfnma(V a, V b, V c) { return _mm256_fnmadd_ps(a, b, c); }
inline V vmax(V a, V b) { return _mm256_max_ps(a, b); }  // b when either is NaN
inline float vhsum(V a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline V vclamp(V x, float lo, float hi) { return _mm256_min_ps(vset(hi), _mm256_max_ps(vset(lo), x)); }
inline V vabs(V a) { return _mm256_andnot_ps(vset(-0.0f), a); }
inline V vsign_of(V a) { return _mm256_and_ps(vset(-0.0f), a); }
inline V vor(V a, V b) { return _mm256_or_ps(a, b); }
inline V vround(V a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline V vpow2i(V p, V n) {
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
inline V vselect_lt(V x, float thr, V a, V b) {
  return _mm256_blendv_ps(b, a, _mm256_cmp_ps(x, vset(thr), _CMP_LT_OQ));
}
// dst[c * ds + r] = src[r * ss + c] for r, c < NB: 4 x 4 transposes per 128-bit lane, then the lanes exchanged.
inline void transpose_nb(const float* src, int64_t ss, float* dst, int64_t ds) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * ss);
  for (int g = 0; g < 2; ++g) {
    const __m256 lo01 = _mm256_unpacklo_ps(r[4 * g], r[4 * g + 1]), hi01 = _mm256_unpackhi_ps(r[4 * g], r[4 * g + 1]);
    const __m256 lo23 = _mm256_unpacklo_ps(r[4 * g + 2], r[4 * g + 3]);
    const __m256 hi23 = _mm256_unpackhi_ps(r[4 * g + 2], r[4 * g + 3]);
    t[4 * g] = _mm256_shuffle_ps(lo01, lo23, 0x44);
    t[4 * g + 1] = _mm256_shuffle_ps(lo01, lo23, 0xEE);
    t[4 * g + 2] = _mm256_shuffle_ps(hi01, hi23, 0x44);
    t[4 * g + 3] = _mm256_shuffle_ps(hi01, hi23, 0xEE);
  }
  for (int c = 0; c < 4; ++c) {
    _mm256_storeu_ps(dst + c * ds, _mm256_permute2f128_ps(t[c], t[4 + c], 0x20));
    _mm256_storeu_ps(dst + (4 + c) * ds, _mm256_permute2f128_ps(t[c], t[4 + c], 0x31));
  }
}

#else  // portable: GCC/Clang vector extensions (lowered to whatever SIMD the target has, SSE2 on any x86-64)

constexpr int NB = 4;  // one 128-bit register (SSE2 / NEON)
constexpr int MRMAX = 4;
constexpr int ACC_MAX = 12;
typedef float V __attribute__((vector_size(16)));
inline V vzero() { return V{}; }
inline V vset(float a) { return V{} + a; }
inline V vldn(const float* p, int n) {
  V r{};
  std::memcpy(&r, p, sizeof(float) * size_t(n < NB ? n : NB));
  return r;
}
inline V vld(const float* p) {
  V r;
  std::memcpy(&r, p, sizeof(r));
  return r;
}
inline void vstn(float* p, V a, int n) { std::memcpy(p, &a, sizeof(float) * size_t(n < NB ? n : NB)); }
inline void vst(float* p, V a) { std::memcpy(p, &a, sizeof(a)); }
inline V vadd(V a, V b) { return a + b; }
inline V vsub(V a, V b) { return a - b; }
inline V vmul(V a, V b) { return a * b; }
inline V vdiv(V a, V b) { return a / b; }
inline V vfma(V a, V b, V c) { return a * b + c; }
inline V vmax(V a, V b) { return a > b ? a : b; }  // b when either is NaN
inline V vselect_lt(V x, float thr, V a, V b) { return x < vset(thr) ? a : b; }  // x < thr ? a : b (NaN -> b)
inline float vhsum(V a) { return (a[0] + a[1]) + (a[2] + a[3]); }
// dst[c * ds + r] = src[r * ss + c] for r, c < NB.
inline void transpose_nb(const float* src, int64_t ss, float* dst, int64_t ds) {
  for (int r = 0; r < NB; ++r)
    for (int c = 0; c < NB; ++c) dst[c * ds + r] = src[r * ss + c];
}

#endif

#if PYATTN_CPU_ISA != 0
// exp(x) for x clamped to [-87, 88] (so 2^n stays normal): Cephes expf, n = round(x log2 e), x - n ln2 in two
// parts, a degree-6 polynomial; about 1 ulp. NaN propagates.
inline V vexp(V x) {
  x = vclamp(x, -87.0f, 88.0f);
  const V n = vround(vmul(x, vset(1.44269504088896341f)));
  V r = vfnma(n, vset(0.693359375f), x);
  r = vfnma(n, vset(-2.12194440e-4f), r);
  V p = vset(1.9875691500e-4f);
  p = vfma(p, r, vset(1.3981999507e-3f));
  p = vfma(p, r, vset(8.3334519073e-3f));
  p = vfma(p, r, vset(4.1665795894e-2f));
  p = vfma(p, r, vset(1.6666665459e-1f));
  p = vfma(p, r, vset(5.0000001201e-1f));
  p = vfma(vmul(p, r), r, vadd(r, vset(1.0f)));
  return vpow2i(p, n);
}
// 2^x: Cephes exp2f (n = round(x), 2^f = 1 + f P(f) on [-0.5, 0.5]; about 1 ulp), exactly 0 for x < -126 (so
// -inf gives 0, as softmax of a masked logit must); NaN propagates. AVX-512's scalef handles any n (overflow to
// +inf, -inf lanes are replaced by the final select; x = +inf gives NaN there), so only the AVX2 path, which builds 2^n from exponent
// bits, clamps x to 127 first.
inline V vexp2(V x) {
#if PYATTN_CPU_ISA == 512
  const V xc = x;
#else
  const V xc = vclamp(x, -127.0f, 127.0f);
#endif
  const V n = vround(xc);
  const V f = vsub(xc, n);
  V p = vset(1.535336188319500e-4f);
  p = vfma(p, f, vset(1.339887440266574e-3f));
  p = vfma(p, f, vset(9.618437357674640e-3f));
  p = vfma(p, f, vset(5.550332471162809e-2f));
  p = vfma(p, f, vset(2.402264791363012e-1f));
  p = vfma(p, f, vset(6.931472028550421e-1f));
  p = vfma(p, f, vset(1.0f));
  return vselect_lt(x, -126.0f, vzero(), vpow2i(p, n));
}
inline V vsigmoid(V x) { return vdiv(vset(1.0f), vadd(vset(1.0f), vexp(vsub(vzero(), x)))); }
// tanh: Cephes tanhf. |x| < 0.625: x + x^3 P(x^2); else sign(x) (1 - 2 / (exp(2|x|) + 1)).
inline V vtanh(V x) {
  const V ax = vabs(x);
  const V s = vmul(x, x);
  V p = vset(-5.70498872745e-3f);
  p = vfma(p, s, vset(2.06390887954e-2f));
  p = vfma(p, s, vset(-5.37397155531e-2f));
  p = vfma(p, s, vset(1.33314422036e-1f));
  p = vfma(p, s, vset(-3.33332819422e-1f));
  const V small = vfma(vmul(p, s), x, x);
  const V e = vexp(vadd(ax, ax));
  const V big = vor(vsub(vset(1.0f), vdiv(vset(2.0f), vadd(e, vset(1.0f)))), vsign_of(x));
  return vselect_lt(ax, 0.625f, small, big);
}
#else
inline V vexp2(V x) {
  V r;
  for (int l = 0; l < NB; ++l) r[l] = x[l] < -126.0f ? 0.0f : std::exp2(x[l]);
  return r;
}
inline V vsigmoid(V x) {
  V r;
  for (int l = 0; l < NB; ++l) r[l] = 1.0f / (1.0f + std::exp(-x[l]));
  return r;
}
inline V vtanh(V x) {
  V r;
  for (int l = 0; l < NB; ++l) r[l] = std::tanh(x[l]);
  return r;
}
#endif

// ------------------------------------------------------------------------------------------------------------
// The element types of a GEMM micro-kernel
// ------------------------------------------------------------------------------------------------------------
// fp32 (A's scalars broadcast, one FMA per k), or, where the CPU has AVX512_BF16 (PYATTN_CPU_BF16_DOT), bf16 pairs:
// a "word" of A or a lane of B holds two bf16 values adjacent along k; one vdpbf16ps adds both products per lane,
// twice the fp32 FMA's work per instruction (inputs' denormals read as zero). B's rows are NB words either way:
// loaded as floats.
struct F32Ops {
  using E = float;
  static constexpr int kPer = 1;  // values per E
  static V bcast(const float* p) { return vset(*p); }
  static V fma(V a, V b, V c) { return vfma(a, b, c); }
};
#if defined(__AVX512BF16__) && PYATTN_CPU_ISA == 512
#define PYATTN_CPU_BF16_DOT 1
struct BF16PairOps {
  using E = uint32_t;
  static constexpr int kPer = 2;
  static V bcast(const uint32_t* p) { return _mm512_castsi512_ps(_mm512_set1_epi32(int(*p))); }
  static V fma(V a, V b, V c) { return _mm512_dpbf16_ps(c, (__m512bh)a, (__m512bh)b); }
};
#else
#define PYATTN_CPU_BF16_DOT 0
#endif

// ------------------------------------------------------------------------------------------------------------
// 16-bit storage rows (T = bf16_t / f16_t, pyattn/cpu_util.h)
// ------------------------------------------------------------------------------------------------------------
// n 16-bit values -> fp32 (exact: the bits of to_f32), NB at a time with AVX-512.
template <class T>
void row_to_f32(const T* s, float* d, int64_t n) {
  int64_t x = 0;
#if PYATTN_CPU_ISA == 512
  for (; x + NB <= n; x += NB) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + x));
    if constexpr (std::is_same<T, bf16_t>::value)
      vst(d + x, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
    else
      vst(d + x, _mm512_cvtph_ps(h));
  }
#endif
  for (; x < n; ++x) d[x] = to_f32(s[x]);
}

#if PYATTN_CPU_ISA == 512
// The NB lanes of v as 16-bit values, rounded to nearest even (the bits of from_f32: NaN -> 0x7FC0 for bf16).
template <class T>
inline __m256i v_to_16(V v) {
  if constexpr (std::is_same<T, bf16_t>::value) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd)), 16);
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                   _mm512_set1_epi32(0x7f800000));
    return _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7fc0)));
  } else {
    return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
}
#endif

// n fp32 values -> 16-bit, rounded to nearest even (the bits of from_f32), NB at a time with AVX-512.
template <class T>
void row_from_f32(const float* s, T* d, int64_t n) {
  int64_t x = 0;
#if PYATTN_CPU_ISA == 512
  for (; x + NB <= n; x += NB) _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + x), v_to_16<T>(vld(s + x)));
#endif
  for (; x < n; ++x) d[x] = from_f32<T>(s[x]);
}

// The first n lanes of v -> 16-bit at d (row_from_f32's bits).
template <class T>
inline void vst16(T* d, V v, int n) {
#if PYATTN_CPU_ISA == 512
  const __m256i h = v_to_16<T>(v);
  if (n >= NB)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(d), h);
  else
    _mm256_mask_storeu_epi16(d, static_cast<__mmask16>((1u << n) - 1u), h);
#else
  alignas(64) float t[NB];
  vst(t, v);
  row_from_f32(t, d, n < NB ? n : NB);
#endif
}

}  // namespace simd
}  // namespace cpu
}  // namespace pyattn
