// CPU kernels for the weight-only quantized linears: matrix-vector products for decoding (a few rows of
// activations), and dequantisers for everything else (qk_dequant_*: the float weight, then torch's matmul).
//
//   y[m, n] = sum_k x[m, k] * W[n, k] + bias[n]      computed in float32 (x, y may be bf16); W never materialised
//
// qk_int8  Int8Linear   w int8 [N, K], scale [N]                   W[n, k] = scale[n] * w[n, k]
// qk_int4  Int4Linear   w uint8 [N, K/2] (input 2i in the low nibble), scale [N, G], zero uint8 [N, G]
//                       W[n, k] = scale[n, g] * (q[n, k] - zero[n, g]),  g = k / group
//          GPTQLinear   the same, on its int32 words stored transposed (see GPTQLinear.kernel_tensors)
// qk_dense FastLinear   w bfloat16 or float32 [N, K] (torch's own GEMV reads bf16 at half the float32 speed)
// qk_attend, qk_add_rms_norm, qk_rope, qk_silu_mul: the attention and elementwise glue of a decode step
// (decode_step.cpp composes all of these into a whole Qwen2-VL decode step; quant_kernels.h declares them)
//
// Decode is bound by reading the weights once. Each thread takes a contiguous range of output rows and reads their
// weights front to back, one sequential stream the hardware prefetcher follows; every decoded weight vector serves up
// to 4 rows of x, and independent partial sums hide the latency of the multiply-adds. (The previous design read 8
// rows interleaved with software prefetch: on an AMD EPYC (Zen 4) it reached half the read bandwidth of this one.)
// Products and sums are float32; int4 zero points are applied once per group through the group sums of x:
//     sum_k x_k s (q_k - z) = s (sum_k x_k q_k - z sum_k x_k).
// With AVX512-VNNI (QK_VNNI), int8 weights meet x split into two int16 halves (see split16): integer multiply-adds
// of 32 weights per instruction with exact integer sums: float32 accuracy at a third of the instructions.
// Built by quant_kernels.py with the vector width of the CPU (QK_LANES: 16 for AVX-512, 8 for AVX2, else 4).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "quant_kernels.h"
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#ifndef QK_LANES
#define QK_LANES 4
#endif
constexpr int L = QK_LANES;
typedef float f32v __attribute__((vector_size(4 * L)));
typedef int32_t i32v __attribute__((vector_size(4 * L)));

template <typename V> struct unaligned { typedef V type __attribute__((aligned(1), may_alias)); };
template <typename V, typename T> static inline V load(const T* p) {
  return *reinterpret_cast<const typename unaligned<V>::type*>(p);
}
static inline f32v to_f32(i32v v) { return __builtin_convertvector(v, f32v); }
static inline float hsum(f32v v) {
#if QK_LANES == 16 && defined(__AVX512F__)
  return _mm512_reduce_add_ps((__m512)v);
#else
  float s = 0.f;
  for (int i = 0; i < L; i++) s += v[i];
  return s;
#endif
}

// L bytes widened to L int32 lanes. GCC 12 scalarises __builtin_convertvector from 8-bit lanes, so x86 uses the
// single instruction that does it; other targets get a loop the compiler may vectorise.
static inline i32v widen_i8(const int8_t* p) {
#if QK_LANES == 16 && defined(__AVX512F__)
  return (i32v)_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#elif QK_LANES == 8 && defined(__AVX2__)
  return (i32v)_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
#else
  i32v v;
  for (int i = 0; i < L; i++) v[i] = p[i];
  return v;
#endif
}
static inline i32v widen_u8(const uint8_t* p) {
#if QK_LANES == 16 && defined(__AVX512F__)
  return (i32v)_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#elif QK_LANES == 8 && defined(__AVX2__)
  return (i32v)_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
#else
  i32v v;
  for (int i = 0; i < L; i++) v[i] = p[i];
  return v;
#endif
}

// Weights as float32 vectors and scalars: int8 codes, bfloat16 bits (exact: a 16-bit shift), float32.
static inline f32v widen_w(const int8_t* p) { return to_f32(widen_i8(p)); }
static inline f32v widen_w(const uint16_t* p) {
#if QK_LANES == 16 && defined(__AVX512F__)
  __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return (f32v)_mm512_slli_epi32(v, 16);
#elif QK_LANES == 8 && defined(__AVX2__)
  __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return (f32v)_mm256_slli_epi32(v, 16);
#else
  f32v v;
  for (int i = 0; i < L; i++) { uint32_t u = (uint32_t)p[i] << 16; std::memcpy(&v[i], &u, 4); }
  return v;
#endif
}
static inline f32v widen_w(const float* p) { return load<f32v>(p); }
static inline float scalar_w(int8_t q) { return (float)q; }
static inline float scalar_w(uint16_t h) { return qk_from_bf16(h); }
static inline float scalar_w(float f) { return f; }

// Runs block<BB>(row offset) over the M rows of x in chunks of 4, 2, 1 (BB = rows sharing each decoded weight).
template <typename F> static void over_rows(int64_t M, F&& block) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) block.template operator()<4>(m);
  for (; m + 2 <= M; m += 2) block.template operator()<2>(m);
  for (; m < M; m++) block.template operator()<1>(m);
}

// Rows of x longer than LONG_K inputs no longer stay in L1 beside the weights, and would be read again from L2 for
// every output row; there 4 output rows share each load of x (4 read streams per thread). Short rows keep one
// stream, which is faster for them. Measured on the AMD EPYC, 2 threads, int8 weights from memory: 1536 x 8960
// 11 -> 21 GB/s with 4 rows; 8960 x 1536 19 GB/s with one row, 14 with 4.
constexpr int64_t LONG_K = 4096;

// Calls tile.operator()<R, BB>(n, m) for every R output rows from n and BB rows of x from m, in parallel over n.
template <typename F> static void over_tiles(int64_t M, int64_t K, int64_t N, int threads, F&& tile) {
  const bool four = M == 1 && K > LONG_K;
  const int64_t R = four ? 4 : 1, blocks = N / R;
  #pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t i = 0; i < blocks; i++) {
    if (four) tile.template operator()<4, 1>(4 * i, 0);
    else over_rows(M, [&]<int BB>(int64_t m) { tile.template operator()<1, BB>(i, m); });
  }
  for (int64_t n = R * blocks; n < N; n++)
    over_rows(M, [&]<int BB>(int64_t m) { tile.template operator()<1, BB>(n, m); });
}

// Partial sums per output: a lone one needs several to keep the multiply-adds in flight.
template <int R, int BB> constexpr int unroll() { return R * BB == 1 ? 4 : R == 1 ? 2 : 1; }

// ------------------------------------------------------------------------------------------ float weights, int8

// out[b][r] = sum_k x[b, k] * w[r, k] for BB rows of x (row stride K) and R rows of weights (row stride K; int8
// codes, bf16 or float32).
template <int R, int BB, typename W>
static inline void dot(const float* x, int64_t K, const W* w, float (&out)[BB][R]) {
  constexpr int U = unroll<R, BB>();
  f32v acc[BB][R][U] = {};
  int64_t k = 0;
  for (; k + U * L <= K; k += U * L)
    for (int u = 0; u < U; u++) {
      f32v xv[BB];
      for (int b = 0; b < BB; b++) xv[b] = load<f32v>(x + b * K + k + u * L);
      for (int r = 0; r < R; r++) {
        const f32v wv = widen_w(w + r * K + k + u * L);
        for (int b = 0; b < BB; b++) acc[b][r][u] += wv * xv[b];
      }
    }
  for (; k + L <= K; k += L)
    for (int r = 0; r < R; r++) {
      const f32v wv = widen_w(w + r * K + k);
      for (int b = 0; b < BB; b++) acc[b][r][0] += wv * load<f32v>(x + b * K + k);
    }
  for (int b = 0; b < BB; b++)
    for (int r = 0; r < R; r++) {
      for (int u = 1; u < U; u++) acc[b][r][0] += acc[b][r][u];
      float s = hsum(acc[b][r][0]);
      for (int64_t kk = k; kk < K; kk++) s += x[b * K + kk] * scalar_w(w[r * K + kk]);     // K % L inputs
      out[b][r] = s;
    }
}

// y [M, N] = x [M, K] @ (scale[:, None] * W).T + bias for W [N, K] (scale may be null: 1).
template <typename W>
static void float_matvec(const float* x, int64_t M, int64_t K, const W* w, const float* scale, const float* bias,
                         float* y, int64_t N, int threads) {
  over_tiles(M, K, N, threads, [&]<int R, int BB>(int64_t n, int64_t m) {
    float s[BB][R];
    dot<R, BB>(x + m * K, K, w + n * K, s);
    for (int b = 0; b < BB; b++)
      for (int r = 0; r < R; r++)
        y[(m + b) * N + n + r] = (scale ? s[b][r] * scale[n + r] : s[b][r]) + (bias ? bias[n + r] : 0.f);
  });
}

#if defined(QK_VNNI) && QK_LANES == 16
// Each row of x as two int16 halves: x[k] = xs * (hi[k] + lo[k] / 32768), xs = max|x| / 32767, |lo| <= 16384, so
// to 2^-24 of max|x| (the rounding of x / xs; a float32 product is exact to 2^-24 of itself). Rows padded with zeros
// to a multiple of 32.
struct Split16 {
  int64_t Kp = 0;
  std::vector<int16_t> hi, lo;
  std::vector<float> xs;
};
static void split16(const float* x, int64_t M, int64_t K, Split16& s) {
  s.Kp = (K + 31) / 32 * 32;
  s.hi.assign(M * s.Kp, 0), s.lo.assign(M * s.Kp, 0), s.xs.assign(M, 1.f);
  for (int64_t m = 0; m < M; m++) {
    const float* row = x + m * K;
    __m512 mx = _mm512_setzero_ps(), probe = _mm512_setzero_ps();          // probe: nan if any x is inf or nan
    for (int64_t k = 0; k < K; k += 16) {
      const __m512 v = _mm512_maskz_loadu_ps(K - k >= 16 ? 0xFFFF : (1u << (K - k)) - 1, row + k);
      mx = _mm512_max_ps(mx, _mm512_abs_ps(v)), probe = _mm512_add_ps(probe, _mm512_mul_ps(v, _mm512_setzero_ps()));
    }
    const float top = _mm512_reduce_max_ps(mx);
    if (std::isnan(_mm512_reduce_add_ps(probe))) s.xs[m] = NAN;     // the row's outputs are nan, not a number
    if (std::isnan(s.xs[m]) || top == 0.f) continue;                // zeros: any scale
    s.xs[m] = top / 32767.f;
    const __m512 inv = _mm512_set1_ps(32767.f / top), half = _mm512_set1_ps(32768.f);
    constexpr int nearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    for (int64_t k = 0; k < K; k += 16) {                   // v - h and (v - h) * 32768 are exact in float32
      const __mmask16 mask = K - k >= 16 ? 0xFFFF : (1u << (K - k)) - 1;
      const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, row + k), inv);
      const __m512 h = _mm512_roundscale_ps(v, nearest);
      const __m512 l = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_sub_ps(v, h), half), nearest);
      _mm256_mask_storeu_epi16(s.hi.data() + m * s.Kp + k, mask, _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(h)));
      _mm256_mask_storeu_epi16(s.lo.data() + m * s.Kp + k, mask, _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(l)));
    }
  }
}

// Integer sums of one multiply-add per pair reach 2 * 128 * 32767 per lane: flushed to float32 every FLUSH inputs
// (128 steps of 32), they stay below 2^31.
constexpr int64_t FLUSH = 4096;
// Codes are prefetched this many bytes ahead in their row (or the rows after it). On the Intel Xeon of session 18 (2
// threads, codes from memory) it lifted 17920 x 1536 from 13.8 to 15.7 GB/s, 1536 x 8960 from 17.2 to 20.1 and the
// 2B lm_head from 15.2 to 16.7; 1-16 KB ahead measured alike.
constexpr int64_t VNNI_AHEAD = 4096;

// out[b][r] = sum_k x[b, k] * w[r, k] for BB split rows of x from row m and R rows of int8 codes (row stride K): whole
// blocks of 32 inputs by integer multiply-adds, the last K % 32 in float32. (One partial sum per output is enough
// here; a second, or masked loads for the end, made GCC keep the sums on the stack: 15-20% slower.)
template <int R, int BB>
static inline void vnni_dot(const Split16& x, int64_t m, const float* xf, int64_t K, const int8_t* w,
                            float (&out)[BB][R]) {
  const int64_t Kp = x.Kp, K32 = K / 32 * 32;
  const int16_t *hi = x.hi.data() + m * Kp, *lo = x.lo.data() + m * Kp;
  __m512 f[BB][R];
  for (int b = 0; b < BB; b++)
    for (int r = 0; r < R; r++) f[b][r] = _mm512_setzero_ps();
  for (int64_t k0 = 0; k0 < K32; k0 += FLUSH) {
    const int64_t k1 = std::min(K32, k0 + FLUSH);
    __m512i h[BB][R], l[BB][R];
    for (int b = 0; b < BB; b++)
      for (int r = 0; r < R; r++) h[b][r] = l[b][r] = _mm512_setzero_si512();
    for (int64_t k = k0; k < k1; k += 32) {
      __m512i xh[BB], xl[BB];
      for (int b = 0; b < BB; b++) {
        xh[b] = _mm512_loadu_si512(hi + b * Kp + k);
        xl[b] = _mm512_loadu_si512(lo + b * Kp + k);
      }
      for (int r = 0; r < R; r++) {
        _mm_prefetch(reinterpret_cast<const char*>(w + r * K + k + VNNI_AHEAD), _MM_HINT_T0);
        const __m512i wv = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * K + k)));
        for (int b = 0; b < BB; b++) {
          h[b][r] = _mm512_dpwssd_epi32(h[b][r], wv, xh[b]);
          l[b][r] = _mm512_dpwssd_epi32(l[b][r], wv, xl[b]);
        }
      }
    }
    for (int b = 0; b < BB; b++)
      for (int r = 0; r < R; r++) {
        f[b][r] = _mm512_add_ps(f[b][r], _mm512_cvtepi32_ps(h[b][r]));
        f[b][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(l[b][r]), _mm512_set1_ps(1.f / 32768), f[b][r]);
      }
  }
  for (int b = 0; b < BB; b++)
    for (int r = 0; r < R; r++) {
      float s = _mm512_reduce_add_ps(f[b][r]) * x.xs[m + b];
      for (int64_t k = K32; k < K; k++) s += xf[b * K + k] * (float)w[r * K + k];
      out[b][r] = s;
    }
}

static int vnni_on = 1;             // qk_switch(QK_SWITCH_INT8_VNNI, 0) turns this path off

static void int8_matvec_vnni(const float* x, int64_t M, int64_t K, const int8_t* w, const float* scale,
                             const float* bias, float* y, int64_t N, int threads) {
  Split16 xs;
  split16(x, M, K, xs);
  over_tiles(M, K, N, threads, [&]<int R, int BB>(int64_t n, int64_t m) {
    float s[BB][R];
    vnni_dot<R, BB>(xs, m, x + m * K, K, w + n * K, s);
    for (int b = 0; b < BB; b++)
      for (int r = 0; r < R; r++) y[(m + b) * N + n + r] = s[b][r] * scale[n + r] + (bias ? bias[n + r] : 0.f);
  });
}
#endif


// ------------------------------------------------------------------------------------------ int4, row-major

// xe / xo: the even / odd inputs of BB rows [BB, K/2]; xsum: their group sums [BB, G]; R rows of codes (row stride
// K/2) with their scales and zero points (row stride G). Per group and row the float codes meet the de-interleaved
// inputs, the scale is applied once to the group's partial sum, and the zero points once per row at the end.
template <int R, int BB>
static void int4_dot(const float* xe, const float* xo, const float* xsum, int64_t K2, int64_t G, int64_t gs2,
                     const uint8_t* w, const float* scale, const uint8_t* zero, float (&out)[BB][R]) {
  f32v acc[BB][R] = {};
  for (int64_t g = 0; g < G; g++) {
    f32v even[BB][R] = {}, odd[BB][R] = {};
    for (int64_t j = g * gs2; j < (g + 1) * gs2; j += L) {
      f32v xev[BB], xov[BB];
      for (int b = 0; b < BB; b++) xev[b] = load<f32v>(xe + b * K2 + j), xov[b] = load<f32v>(xo + b * K2 + j);
      for (int r = 0; r < R; r++) {
        const i32v v = widen_u8(w + r * K2 + j);                 // L bytes: inputs 2j.. in low, 2j+1.. in high
        const f32v lo = to_f32(v & 15), hi = to_f32(v >> 4);
        for (int b = 0; b < BB; b++) even[b][r] += lo * xev[b], odd[b][r] += hi * xov[b];
      }
    }
    for (int b = 0; b < BB; b++)
      for (int r = 0; r < R; r++) acc[b][r] += (even[b][r] + odd[b][r]) * scale[r * G + g];
  }
  for (int b = 0; b < BB; b++)
    for (int r = 0; r < R; r++) {
      float zsum = 0.f;                                          // sum_g s_g z_g xsum_g
      for (int64_t g = 0; g < G; g++) zsum += scale[r * G + g] * (float)zero[r * G + g] * xsum[b * G + g];
      out[b][r] = hsum(acc[b][r]) - zsum;
    }
}

static void group_sums(const float* x, int64_t M, int64_t K, int64_t group, float* xsum) {
  const int64_t G = K / group;
  for (int64_t m = 0; m < M; m++)
    for (int64_t g = 0; g < G; g++) {
      float t = 0.f;
      for (int64_t k = g * group; k < (g + 1) * group; k++) t += x[m * K + k];
      xsum[m * G + g] = t;
    }
}

#if defined(QK_BF16_DOT) && QK_LANES == 16
// One row of bfloat16 x (decoding a bf16 model) with AVX512-BF16: the codes of 32 bytes become 64 exact bf16 values by
// a 16-entry table lookup (vpermw), and vdpbf16ps multiplies pairs of them with the de-interleaved inputs, adding the
// exact products in float32 (as the float path does, in another order). 7 instructions per 64 weights instead of 14:
// the float path is bound by converting codes, this one nearly by the memory. Needs group % 64. One row of x and R
// of codes: out[0][r].
template <int R>
static void int4_dot_bf16(const uint16_t* xe, const uint16_t* xo, const float* xsum, int64_t K2, int64_t G,
                          int64_t gs2, const uint8_t* w, const float* scale, const uint8_t* zero, float (&out)[1][R]) {
  static const uint16_t codes_bf16[32] = {0x0000, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0,
                                          0x4100, 0x4110, 0x4120, 0x4130, 0x4140, 0x4150, 0x4160, 0x4170};  // 0..15
  const __m512i table = _mm512_loadu_si512(codes_bf16), low4 = _mm512_set1_epi16(15);
  __m512 acc[R];
  for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; g++) {
    __m512 even[R], odd[R];
    for (int r = 0; r < R; r++) even[r] = odd[r] = _mm512_setzero_ps();
    for (int64_t j = g * gs2; j < (g + 1) * gs2; j += 32) {
      const __m512bh xev = (__m512bh)_mm512_loadu_si512(xe + j), xov = (__m512bh)_mm512_loadu_si512(xo + j);
      for (int r = 0; r < R; r++) {
        const __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * K2 + j)));
        const __m512i lo = _mm512_permutexvar_epi16(_mm512_and_si512(b, low4), table);   // inputs 2(j+i)
        const __m512i hi = _mm512_permutexvar_epi16(_mm512_srli_epi16(b, 4), table);      // inputs 2(j+i)+1
        even[r] = _mm512_dpbf16_ps(even[r], (__m512bh)lo, xev);
        odd[r] = _mm512_dpbf16_ps(odd[r], (__m512bh)hi, xov);
      }
    }
    for (int r = 0; r < R; r++)
      acc[r] = _mm512_fmadd_ps(_mm512_add_ps(even[r], odd[r]), _mm512_set1_ps(scale[r * G + g]), acc[r]);
  }
  for (int r = 0; r < R; r++) {
    float zsum = 0.f;
    for (int64_t g = 0; g < G; g++) zsum += scale[r * G + g] * (float)zero[r * G + g] * xsum[g];
    out[0][r] = _mm512_reduce_add_ps(acc[r]) - zsum;
  }
}

static int bf16_dot_on = 1;         // qk_switch(QK_SWITCH_BF16_DOT, 0) turns this path off

// x: one row of bf16 [K]; K % group == 0, group % 64 == 0.
static void int4_matvec_bf16(const uint16_t* x, int64_t K, const uint8_t* w, const float* scale, const uint8_t* zero,
                             int64_t group, const float* bias, float* y, int64_t N, int threads) {
  const int64_t K2 = K / 2, G = K / group, gs2 = group / 2;
  std::vector<uint16_t> xeo(K);
  std::vector<float> xsum(G, 0.f);
  uint16_t *xe = xeo.data(), *xo = xe + K2;
  for (int64_t i = 0; i < K2; i++) xe[i] = x[2 * i], xo[i] = x[2 * i + 1];
  for (int64_t k = 0; k < K; k++) {
    const uint32_t u = (uint32_t)x[k] << 16;
    float f;
    std::memcpy(&f, &u, 4);
    xsum[k / group] += f;
  }
  over_tiles(1, K, N, threads, [&]<int R, int BB>(int64_t n, int64_t) {
    float s[1][R];
    int4_dot_bf16<R>(xe, xo, xsum.data(), K2, G, gs2, w + n * K2, scale + n * G, zero + n * G, s);
    for (int r = 0; r < R; r++) y[n + r] = s[0][r] + (bias ? bias[n + r] : 0.f);
  });
}
#endif

// Needs group % (2 * L) == 0 (checked by the caller).
static void int4_matvec(const float* x, int64_t M, int64_t K, const uint8_t* w, const float* scale,
                        const uint8_t* zero, int64_t group, const float* bias, float* y, int64_t N, int threads) {
  const int64_t K2 = K / 2, G = K / group, gs2 = group / 2;
  std::vector<float> scratch(M * (K + G));
  float *xe = scratch.data(), *xo = xe + M * K2, *xsum = xo + M * K2;
  for (int64_t m = 0; m < M; m++)
    for (int64_t i = 0; i < K2; i++) {
      xe[m * K2 + i] = x[m * K + 2 * i];
      xo[m * K2 + i] = x[m * K + 2 * i + 1];
    }
  group_sums(x, M, K, group, xsum);
  over_tiles(M, K, N, threads, [&]<int R, int BB>(int64_t n, int64_t m) {
    float s[BB][R];
    int4_dot<R, BB>(xe + m * K2, xo + m * K2, xsum + m * G, K2, G, gs2, w + n * K2, scale + n * G, zero + n * G, s);
    for (int b = 0; b < BB; b++)
      for (int r = 0; r < R; r++) y[(m + b) * N + n + r] = s[b][r] + (bias ? bias[n + r] : 0.f);
  });
}

#if defined(__AVX2__)
// ------------------------------------------------------------------------------------------ int4, integer (AVX2)

// Without AVX-512, converting every code to float (int4_dot: 28 vector instructions per 64 weights) bounds int4 far
// below the memory. Here x is quantised per group of inputs to integers X (|X| <= 127 * 256^(P-1): to 2^-15 of the
// group's largest |x| with P = 2 bytes for bfloat16 inputs, 2^-23 with P = 3 for float32), written as P signed bytes
// (X = sum_p d_p 256^(P-1-p), each d_p in [-128, 127]), and the codes meet the bytes in vpmaddubsw (32 unsigned codes
// times signed bytes, pairs added in int16): 13 instructions per 64 weights for P = 2, with exact integer sums.
//     sum_k W[n, k] x_k = sum_g s_g xs_g (sum_k q_k X_k - z_g sum_k X_k),   x_k ~ xs_g X_k
// Worked example (P = 2, a group whose largest |x| is 2.0): xs = 2 / 32512; x = 0.75 -> X = 12192 = 48 * 256 - 96:
// the bytes 48 and -96.
constexpr int64_t CHUNK = 64;       // inputs per 32 bytes of codes; a group is a whole number of chunks
// Codes are prefetched this many bytes ahead (into the next rows): the hardware prefetcher alone left this kernel at
// 9-11 GB/s from memory where bf16 GEMVs read 24 (AMD EPYC Zen 3, 2 threads); with it 13-17. 2-16 KB measured alike.
constexpr int64_t AHEAD = 4096;

template <int P> struct ByteSplit {
  int64_t C = 0, G = 0;             // chunks and groups per row
  std::vector<int8_t> bytes;        // [M, C, P, 2, 32]: per chunk and byte, the 32 even inputs then the 32 odd ones
  std::vector<float> xs, zx;        // [M, G]: the group's scale xs, and xs * sum_k X_k (for the zero points)
};

// The largest |x| of n floats (n % 8 == 0), or nan if any is inf or nan.
static inline float abs_max(const float* v, int64_t n) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 top = _mm256_setzero_ps(), probe = _mm256_setzero_ps();
  for (int64_t k = 0; k < n; k += 8) {
    const __m256 x = _mm256_loadu_ps(v + k);
    top = _mm256_max_ps(top, _mm256_andnot_ps(sign, x));
    probe = _mm256_add_ps(probe, _mm256_mul_ps(x, _mm256_setzero_ps()));
  }
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_movehdup_ps(h));
  __m128 q = _mm_add_ps(_mm256_castps256_ps128(probe), _mm256_extractf128_ps(probe, 1));
  q = _mm_add_ps(q, _mm_movehl_ps(q, q));
  q = _mm_add_ss(q, _mm_movehdup_ps(q));
  return std::isnan(_mm_cvtss_f32(q)) ? NAN : _mm_cvtss_f32(h);
}

// The low byte of each int32 lane, in order, to 8 bytes at out.
static inline void store_low_bytes(__m256i v, int8_t* out) {
  const __m256i pick = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                        0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
  const __m256i lanes = _mm256_setr_epi32(0, 4, 0, 0, 0, 0, 0, 0);
  const __m256i b = _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(v, pick), lanes);
  _mm_storel_epi64(reinterpret_cast<__m128i*>(out), _mm256_castsi256_si128(b));
}

template <int P>
static void byte_split(const float* x, int64_t M, int64_t K, int64_t group, ByteSplit<P>& s) {
  constexpr float top_int = P == 2 ? 127.f * 256 : 127.f * 65536;
  s.C = K / CHUNK, s.G = K / group;
  s.bytes.resize(M * s.C * P * CHUNK), s.xs.resize(M * s.G), s.zx.resize(M * s.G);
  for (int64_t m = 0; m < M; m++)
    for (int64_t g = 0; g < s.G; g++) {
      const float* v = x + m * K + g * group;
      const float top = abs_max(v, group);
      const bool finite = !std::isnan(top);
      const __m256 inv = _mm256_set1_ps(finite && top > 0.f ? top_int / top : 0.f);
      __m256i sum = _mm256_setzero_si256();
      for (int64_t k = 0; k < group; k += 16) {                  // 16 inputs: 8 even, 8 odd
        const __m256 a = _mm256_loadu_ps(v + k), b = _mm256_loadu_ps(v + k + 8);
        __m256 even = _mm256_shuffle_ps(a, b, 0x88), odd = _mm256_shuffle_ps(a, b, 0xDD);   // [a0 a2 b0 b2 | a4 ..]
        even = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(even), 0xD8));       // [a0 a2 a4 a6 b0 ..]
        odd = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(odd), 0xD8));
        __m256i X[2] = {_mm256_cvtps_epi32(_mm256_mul_ps(even, inv)), _mm256_cvtps_epi32(_mm256_mul_ps(odd, inv))};
        sum = _mm256_add_epi32(sum, _mm256_add_epi32(X[0], X[1]));
        const int64_t i = g * group + k, c = i / CHUNK, j = (i % CHUNK) / 2;
        int8_t* chunk = s.bytes.data() + ((m * s.C + c) * P) * CHUNK;
        for (int p = P - 1; p >= 0; p--)                           // lowest byte first: X's low byte, signed
          for (int odd_ = 0; odd_ < 2; odd_++) {
            store_low_bytes(X[odd_], chunk + p * CHUNK + odd_ * 32 + j);
            X[odd_] = _mm256_srai_epi32(_mm256_add_epi32(X[odd_], _mm256_set1_epi32(128)), 8);
          }
      }
      int32_t lanes[8];
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(lanes), sum);
      int64_t total = 0;
      for (int32_t t : lanes) total += t;
      s.xs[m * s.G + g] = finite ? top / top_int : NAN;           // a row with inf or nan gives nan outputs
      s.zx[m * s.G + g] = finite ? s.xs[m * s.G + g] * (float)total : NAN;
    }
}

static inline float hsum8(__m256 v) {
  const __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
}

// The zero points' share of one row of outputs: sum_g s_g z_g zx_g (8 groups per step, the rest one by one).
static inline float zero_point_sum(const float* scale, const uint8_t* zero, const float* zx, int64_t G) {
  __m256 acc = _mm256_setzero_ps();
  int64_t g = 0;
  for (; g + 8 <= G; g += 8) {
    const __m128i z8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(zero + g));
    const __m256 z = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(z8));
    acc = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_loadu_ps(scale + g), z), _mm256_loadu_ps(zx + g), acc);
  }
  float sum = hsum8(acc);
  for (; g < G; g++) sum += scale[g] * (float)zero[g] * zx[g];
  return sum;
}

// out[b] = sum_k x[m + b, k] W[k] for one row of codes (32 bytes per chunk of 64 inputs) with its scales and zero
// points, groups of CPG chunks (1, 2 or 4: the int16 sums of a group, 2 * 2 * 15 * 128 = 7680 per chunk and lane,
// stay below 2^15).
template <int P, int BB, int CPG>
static inline void int4_dot_i8(const ByteSplit<P>& x, int64_t m, const uint8_t* w, const float* scale,
                               const uint8_t* zero, float (&out)[BB]) {
  const __m256i low4 = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1), b256 = _mm256_set1_epi16(256);
  const int64_t C = x.C, G = x.G;
  const int8_t* bytes = x.bytes.data() + m * C * P * CHUNK;
  const float* xs = x.xs.data() + m * G;
  __m256 f[BB];
  for (int b = 0; b < BB; b++) f[b] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; g++) {
    __m256i a[BB][P];
    for (int b = 0; b < BB; b++)
      for (int p = 0; p < P; p++) a[b][p] = _mm256_setzero_si256();
    for (int c = 0; c < CPG; c += 2)                                 // one 64-byte line per 2 chunks
      _mm_prefetch(reinterpret_cast<const char*>(w + (g * CPG + c) * 32 + AHEAD), _MM_HINT_T0);
    for (int c = 0; c < CPG; c++) {
      const __m256i codes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + (g * CPG + c) * 32));
      const __m256i even = _mm256_and_si256(codes, low4), odd = _mm256_and_si256(_mm256_srli_epi16(codes, 4), low4);
      for (int b = 0; b < BB; b++) {
        const int8_t* d = bytes + (b * C + g * CPG + c) * P * CHUNK;
        for (int p = 0; p < P; p++) {
          const __m256i de = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(d + p * CHUNK));
          const __m256i dod = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(d + p * CHUNK + 32));
          a[b][p] = _mm256_add_epi16(a[b][p], _mm256_add_epi16(_mm256_maddubs_epi16(even, de),
                                                               _mm256_maddubs_epi16(odd, dod)));
        }
      }
    }
    for (int b = 0; b < BB; b++) {                   // int32: 256 * (first byte's sums) + second's; then the third
      const __m256i first = _mm256_madd_epi16(a[b][0], b256), second = _mm256_madd_epi16(a[b][1], ones);
      __m256 t = _mm256_cvtepi32_ps(_mm256_add_epi32(first, second));
      if constexpr (P == 3)
        t = _mm256_fmadd_ps(t, _mm256_set1_ps(256.f), _mm256_cvtepi32_ps(_mm256_madd_epi16(a[b][2], ones)));
      f[b] = _mm256_fmadd_ps(t, _mm256_set1_ps(scale[g] * xs[b * G + g]), f[b]);
    }
  }
  for (int b = 0; b < BB; b++) out[b] = hsum8(f[b]) - zero_point_sum(scale, zero, x.zx.data() + (m + b) * G, G);
}

static int int4_i8_on = 1;          // qk_switch(QK_SWITCH_INT4_I8, 0) turns this path off

#if defined(QK_VNNI) && QK_LANES == 16
// int4_dot_i8 with AVX512-VNNI: per chunk the 32 code bytes are loaded into both halves of a register, the low half
// shifted by 0 and the high half by 4 bits, so one mask gives [32 even codes | 32 odd codes], which is ByteSplit's
// order of one chunk's byte plane; vpdpbusd then multiplies 64 codes by 64 signed bytes and adds them in fours into
// int32 lanes, exactly. 3 + P instructions per 64 weights against 13 for P = 2 in 256-bit AVX2. Sums per lane and
// chunk reach 4 * 15 * 128 = 7680: a group's (4 chunks at most) times 256 stays far below 2^24 (exact in float32).
template <int P, int BB, int CPG>
static inline void int4_dot_vnni(const ByteSplit<P>& x, int64_t m, const uint8_t* w, const float* scale,
                                 const uint8_t* zero, float (&out)[BB]) {
  const __m512i low4 = _mm512_set1_epi8(15);
  const __m512i shifts = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(4), 1);   // 0 x 16, 4 x 16
  const int64_t C = x.C, G = x.G;
  const int8_t* bytes = x.bytes.data() + m * C * P * CHUNK;
  const float* xs = x.xs.data() + m * G;
  __m512 f[BB];
  for (int b = 0; b < BB; b++) f[b] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; g++) {
    __m512i a[BB][P];
    for (int b = 0; b < BB; b++)
      for (int p = 0; p < P; p++) a[b][p] = _mm512_setzero_si512();
    for (int c = 0; c < CPG; c += 2)                                 // one 64-byte line per 2 chunks
      _mm_prefetch(reinterpret_cast<const char*>(w + (g * CPG + c) * 32 + AHEAD), _MM_HINT_T0);
    for (int c = 0; c < CPG; c++) {
      const __m512i both = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(
          w + (g * CPG + c) * 32)));
      const __m512i codes = _mm512_and_si512(_mm512_srlv_epi16(both, shifts), low4);   // [even | odd] codes
      for (int b = 0; b < BB; b++) {
        const int8_t* d = bytes + (b * C + g * CPG + c) * P * CHUNK;
        for (int p = 0; p < P; p++)
          a[b][p] = _mm512_dpbusd_epi32(a[b][p], codes, _mm512_loadu_si512(d + p * CHUNK));
      }
    }
    for (int b = 0; b < BB; b++) {                   // 256 * (first byte's sums) + second's; then the third
      __m512 t = _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_slli_epi32(a[b][0], 8), a[b][1]));
      if constexpr (P == 3) t = _mm512_fmadd_ps(t, _mm512_set1_ps(256.f), _mm512_cvtepi32_ps(a[b][2]));
      f[b] = _mm512_fmadd_ps(t, _mm512_set1_ps(scale[g] * xs[b * G + g]), f[b]);
    }
  }
  for (int b = 0; b < BB; b++)
    out[b] = _mm512_reduce_add_ps(f[b]) - zero_point_sum(scale, zero, x.zx.data() + (m + b) * G, G);
}
static int int4_vnni_on = 1;        // qk_switch(QK_SWITCH_INT4_VNNI, 0): int4_i8 on 256-bit AVX2 instructions instead
#endif

// One row of codes and BB rows of x: the VNNI dot where built and on, else the AVX2 one.
template <int P, int BB, int CPG>
static inline void int4_dot_int(const ByteSplit<P>& x, int64_t m, const uint8_t* w, const float* scale,
                                const uint8_t* zero, float (&out)[BB]) {
#if defined(QK_VNNI) && QK_LANES == 16
  if (int4_vnni_on) return int4_dot_vnni<P, BB, CPG>(x, m, w, scale, zero, out);
#endif
  int4_dot_i8<P, BB, CPG>(x, m, w, scale, zero, out);
}

// Takes groups of 64, 128 or 256 inputs.
template <int P>
static void int4_matvec_i8(const float* x, int64_t M, int64_t K, const uint8_t* w, const float* scale,
                           const uint8_t* zero, int64_t group, const float* bias, float* y, int64_t N, int threads) {
  ByteSplit<P> xs;
  byte_split<P>(x, M, K, group, xs);
  const int64_t K2 = K / 2, G = K / group;
  #pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t n = 0; n < N; n++)
    over_rows(M, [&]<int BB>(int64_t m) {
      float s[BB];
      const uint8_t* row = w + n * K2;
      if (group == 64) int4_dot_int<P, BB, 1>(xs, m, row, scale + n * G, zero + n * G, s);
      else if (group == 128) int4_dot_int<P, BB, 2>(xs, m, row, scale + n * G, zero + n * G, s);
      else int4_dot_int<P, BB, 4>(xs, m, row, scale + n * G, zero + n * G, s);
      for (int b = 0; b < BB; b++) y[(m + b) * N + n] = s[b] + (bias ? bias[n] : 0.f);
    });
}
#endif

#if defined(__AVX2__)
// ------------------------------------------------------------------------------------------ int8, integer (AVX2)

// bfloat16 x without AVX512-VNNI: converting codes to float (24 vector instructions per 64 weights) bounds int8 below
// the memory. Here x is quantised per group of 128 inputs to int16 (X = round(x / xs), |X| <= 32767: to 2^-16 of the
// group's largest |x|, where bf16 x carries 2^-8 of itself), codes are widened to int16 and vpmaddwd multiplies 16 of
// them with X, adding pairs exactly in int32: 12 instructions per 64 weights. (float32 x keeps the float path: it
// would need two int16 halves, as many instructions as converting.)
constexpr int64_t XGROUP = 128;

struct Int16Split {
  int64_t G = 0;                    // groups per row (the last may be shorter)
  std::vector<int16_t> q;           // [M, K]
  std::vector<float> xs;            // [M, G]
};

static void int16_split(const float* x, int64_t M, int64_t K, Int16Split& s) {
  s.G = (K + XGROUP - 1) / XGROUP;
  s.q.resize(M * K), s.xs.resize(M * s.G);
  for (int64_t m = 0; m < M; m++)
    for (int64_t g = 0; g < s.G; g++) {                           // K % 16 == 0
      const int64_t k0 = g * XGROUP, k1 = std::min(K, k0 + XGROUP);
      const float* v = x + m * K;
      const float top = abs_max(v + k0, k1 - k0);
      const bool finite = !std::isnan(top);
      const __m256 inv = _mm256_set1_ps(finite && top > 0.f ? 32767.f / top : 0.f);
      for (int64_t k = k0; k < k1; k += 16) {
        const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(v + k), inv));
        const __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(v + k + 8), inv));
        const __m256i q = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8);     // packs works per 128 bits
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(s.q.data() + m * K + k), q);
      }
      s.xs[m * s.G + g] = finite ? top / 32767.f : NAN;           // a row with inf or nan gives nan outputs
    }
}

// out[b] = sum_k x[m + b, k] w[k] for one row of int8 codes, K % 16 == 0. int32 sums of a group: 8 multiply-adds of
// at most 2 * 128 * 32767 per lane.
template <int BB>
static inline void int8_dot_i16(const Int16Split& x, int64_t m, int64_t K, const int8_t* w, float (&out)[BB]) {
  const int64_t G = x.G;
  __m256 f[BB];
  for (int b = 0; b < BB; b++) f[b] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; g++) {
    const int64_t k0 = g * XGROUP, k1 = std::min(K, k0 + XGROUP);
    for (int64_t k = k0; k < k1; k += 64) _mm_prefetch(reinterpret_cast<const char*>(w + k + AHEAD), _MM_HINT_T0);
    __m256i a[BB];
    for (int b = 0; b < BB; b++) a[b] = _mm256_setzero_si256();
    for (int64_t k = k0; k < k1; k += 16) {
      const __m256i codes = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k)));
      for (int b = 0; b < BB; b++) {
        const __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q.data() + (m + b) * K + k));
        a[b] = _mm256_add_epi32(a[b], _mm256_madd_epi16(codes, xq));
      }
    }
    for (int b = 0; b < BB; b++)
      f[b] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a[b]), _mm256_set1_ps(x.xs[(m + b) * G + g]), f[b]);
  }
  for (int b = 0; b < BB; b++) out[b] = hsum8(f[b]);
}

static int int8_i16_on = 1;         // qk_switch(QK_SWITCH_INT8_I16, 0) turns this path off

static void int8_matvec_i16(const float* x, int64_t M, int64_t K, const int8_t* w, const float* scale,
                            const float* bias, float* y, int64_t N, int threads) {
  Int16Split xs;
  int16_split(x, M, K, xs);
  #pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t n = 0; n < N; n++)
    over_rows(M, [&]<int BB>(int64_t m) {
      float s[BB];
      int8_dot_i16<BB>(xs, m, K, w + n * K, s);
      for (int b = 0; b < BB; b++) y[(m + b) * N + n] = s[b] * scale[n] + (bias ? bias[n] : 0.f);
    });
}
#endif

// int8 decoding: AVX512-VNNI where built, else int16 x on AVX2 for bfloat16 x (x_bf16: x holds bf16 values), else
// float.
static void int8_matvec(const float* x, int x_bf16, int64_t M, int64_t K, const int8_t* w, const float* scale,
                        const float* bias, float* y, int64_t N, int threads) {
#if defined(QK_VNNI) && QK_LANES == 16
  if (vnni_on) return int8_matvec_vnni(x, M, K, w, scale, bias, y, N, threads);
#endif
#if defined(__AVX2__)
  if (x_bf16 && int8_i16_on && K % 16 == 0) return int8_matvec_i16(x, M, K, w, scale, bias, y, N, threads);
#endif
  float_matvec(x, M, K, w, scale, bias, y, N, threads);
}

// ------------------------------------------------------------------------------------------ decode attention

// One query row per (batch, head) against the cached keys and values, the attention of a decode step:
//   out[b, h] = sum_j p_j v[b, hk, j],  p = softmax_j(scale * q[b, h] . k[b, hk, j]; hidden keys -inf)
// with hk = h / (H / Hk) (grouped-query heads share a KV head). float32 products and sums on bf16 or float32 keys
// and values (bf16 -> float32 is exact). SDPA's CPU kernel pays a large cost per (row, head) block in bfloat16
// (Qwen-VL's 32 heads, 300 cached tokens: 1.5 ms a layer); this reads the cache once.
template <typename T> static inline float dot_q(const float* q, const T* k, int64_t D) {
  f32v acc = {};
  int64_t d = 0;
  for (; d + L <= D; d += L) acc += load<f32v>(q + d) * widen_w(k + d);
  float s = hsum(acc);
  for (; d < D; d++) s += q[d] * scalar_w(k[d]);
  return s;
}

template <typename T> static inline void add_scaled(float* out, float p, const T* v, int64_t D) {
  int64_t d = 0;
  const f32v pv = f32v{} + p;
  for (; d + L <= D; d += L) {
    const f32v o = load<f32v>(out + d) + pv * widen_w(v + d);
    std::memcpy(out + d, &o, sizeof(o));
  }
  for (; d < D; d++) out[d] += p * scalar_w(v[d]);
}

// q [B, H, D] float32; k, v: element strides (batch, head, row), rows of D contiguous; visible [B, S] or null;
// out [B, H, D] float32.
template <typename T>
static void attend(const float* q, const T* k, const T* v, const int64_t* ks, const int64_t* vs, const uint8_t* visible,
                   int64_t B, int64_t H, int64_t Hk, int64_t S, int64_t D, float scale, float* out, int threads) {
  #pragma omp parallel num_threads(threads)
  {
    std::vector<float> p(S);
    #pragma omp for schedule(static)
    for (int64_t bh = 0; bh < B * H; bh++) {
      const int64_t b = bh / H, hk = bh % H / (H / Hk);
      const float* qv = q + bh * D;
      const T *kb = k + b * ks[0] + hk * ks[1], *vb = v + b * vs[0] + hk * vs[1];
      const uint8_t* vis = visible ? visible + b * S : nullptr;
      float top = -INFINITY;
      for (int64_t j = 0; j < S; j++) {
        p[j] = vis && !vis[j] ? -INFINITY : dot_q(qv, kb + j * ks[2], D) * scale;
        top = std::max(top, p[j]);
      }
      float* o = out + bh * D;
      std::fill(o, o + D, 0.f);
      if (top == -INFINITY) {                        // no visible key: nan, as softmax over nothing is
        std::fill(o, o + D, NAN);
        continue;
      }
      float sum = 0.f;
      for (int64_t j = 0; j < S; j++) sum += (p[j] = std::exp(p[j] - top));
      for (int64_t j = 0; j < S; j++)
        if (p[j] != 0.f) add_scaled(o, p[j], vb + j * vs[2], D);
      const float inv = 1.f / sum;
      for (int64_t d = 0; d < D; d++) o[d] *= inv;
    }
  }
}

// ------------------------------------------------------------------------------------------ entry points

// bfloat16 activations (the usual CPU inference dtype) are converted here rather than by two more framework ops
// per call: bf16 -> float32 is exact, float32 -> bf16 (qk_to_bf16) rounds to nearest even as torch does.
static const float* as_f32(const void* x, int64_t n, int bf16, std::vector<float>& buf) {
  if (!bf16) return static_cast<const float*>(x);
  buf.resize(n);
  const uint16_t* h = static_cast<const uint16_t*>(x);
  for (int64_t i = 0; i < n; i++) {
    const uint32_t u = (uint32_t)h[i] << 16;
    std::memcpy(&buf[i], &u, 4);
  }
  return buf.data();
}

static void store_bf16(const float* y, int64_t n, void* out) {
  uint16_t* h = static_cast<uint16_t*>(out);
  for (int64_t i = 0; i < n; i++) h[i] = qk_to_bf16(y[i]);
}

// x [M, K] and y [M, N] are float32, or bfloat16 when bf16 != 0.
extern "C" void qk_int8(const void* x, int64_t M, int64_t K, const int8_t* w, const float* scale, const float* bias,
                        void* y, int64_t N, int bf16, int threads) {
  std::vector<float> xbuf, ybuf(bf16 ? M * N : 0);
  float* yf = bf16 ? ybuf.data() : static_cast<float*>(y);
  int8_matvec(as_f32(x, M * K, bf16, xbuf), bf16, M, K, w, scale, bias, yf, N, threads);
  if (bf16) store_bf16(yf, M * N, y);
}

extern "C" void qk_int4(const void* x, int64_t M, int64_t K, const uint8_t* w, const float* scale,
                        const uint8_t* zero, int64_t group, const float* bias, void* y, int64_t N, int bf16,
                        int threads) {
  std::vector<float> xbuf, ybuf(bf16 ? M * N : 0);
  float* yf = bf16 ? ybuf.data() : static_cast<float*>(y);
#if defined(QK_BF16_DOT) && QK_LANES == 16
  if (bf16 && M == 1 && group % 64 == 0 && bf16_dot_on) {
    int4_matvec_bf16(static_cast<const uint16_t*>(x), K, w, scale, zero, group, bias, yf, N, threads);
    store_bf16(yf, N, y);
    return;
  }
#endif
#if defined(__AVX2__)
  if (int4_i8_on && (group == 64 || group == 128 || group == 256)) {
    const float* xf = as_f32(x, M * K, bf16, xbuf);
    if (bf16) int4_matvec_i8<2>(xf, M, K, w, scale, zero, group, bias, yf, N, threads);
    else int4_matvec_i8<3>(xf, M, K, w, scale, zero, group, bias, yf, N, threads);
    if (bf16) store_bf16(yf, M * N, y);
    return;
  }
#endif
  int4_matvec(as_f32(x, M * K, bf16, xbuf), M, K, w, scale, zero, group, bias, yf, N, threads);
  if (bf16) store_bf16(yf, M * N, y);
}

// Float weights: w is bfloat16 [N, K] when w_bf16 != 0, else float32. x / y as in qk_int8.
extern "C" void qk_dense(const void* x, int64_t M, int64_t K, const void* w, int w_bf16, const float* bias, void* y,
                         int64_t N, int bf16, int threads) {
  std::vector<float> xbuf, ybuf(bf16 ? M * N : 0);
  float* yf = bf16 ? ybuf.data() : static_cast<float*>(y);
  const float* xf = as_f32(x, M * K, bf16, xbuf);
  if (w_bf16) float_matvec(xf, M, K, static_cast<const uint16_t*>(w), nullptr, bias, yf, N, threads);
  else float_matvec(xf, M, K, static_cast<const float*>(w), nullptr, bias, yf, N, threads);
  if (bf16) store_bf16(yf, M * N, y);
}

// ------------------------------------------------------------------------------------------ decode-step glue
// The elementwise work between the linears of a decode step (qwen2_vl_fast.FastDecoder), one call each instead of
// 4-10 framework ops on a few thousand numbers (each op ~2-20 us of dispatch on this CPU). Values are rounded where
// the reference rounds them (bfloat16 after every op that returns bf16), computed in float32 in between.
template <typename T> static inline float get(const T* p, int64_t i) { return scalar_w(p[i]); }
static inline void put(float* p, int64_t i, float v) { p[i] = v; }
static inline void put(uint16_t* p, int64_t i, float v) { p[i] = qk_to_bf16(v); }
static inline float round_as(const float*, float v) { return v; }
static inline float round_as(const uint16_t*, float v) { return scalar_w(qk_to_bf16(v)); }

// h [rows, C] += delta (skipped when null), then normed = rms_norm(h) * weight as text.RMSNorm computes it:
// float32 norm, rounded to h's dtype, times the weight (rounded again).
template <typename T>
static void add_rms_norm(T* h, const T* delta, const T* weight, int64_t rows, int64_t C, float eps, T* normed) {
  for (int64_t r = 0; r < rows; r++) {
    T* x = h + r * C;
    float ss = 0.f;
    for (int64_t c = 0; c < C; c++) {
      const float v = delta ? round_as(x, get(x, c) + get(delta + r * C, c)) : get(x, c);
      if (delta) put(x, c, v);
      ss += v * v;
    }
    const float inv = 1.f / std::sqrt(ss / (float)C + eps);
    for (int64_t c = 0; c < C; c++) put(normed + r * C, c, round_as(x, get(x, c) * inv) * get(weight, c));
  }
}

// out [B, H, D] = x * cos + [x2, x1] * signed_sin per row of D (qwen2_vl_fast.rotate), x [B, H, D] with batch stride
// xb (rows of D contiguous), cos / signed_sin [B, D] float32. Two rounded products, then their sum, as torch computes
// it: GCC would fuse them into one multiply-add (other bits), so contraction is off here (clang does not fuse across
// statements by default).
#if defined(__GNUC__) && !defined(__clang__)
#define QK_NO_CONTRACT __attribute__((optimize("fp-contract=off")))
#else
#define QK_NO_CONTRACT
#endif
template <typename T>
QK_NO_CONTRACT static void rope(const T* x, int64_t xb, int64_t B, int64_t H, int64_t D, const float* cos, const float* ssin, T* out) {
  const int64_t half = D / 2;
  for (int64_t b = 0; b < B; b++)
    for (int64_t hh = 0; hh < H; hh++) {
      const T* xr = x + b * xb + hh * D;
      T* o = out + (b * H + hh) * D;
      for (int64_t d = 0; d < D; d++) {
        const float a = get(xr, d) * cos[b * D + d];
        const float s = get(xr, d < half ? d + half : d - half) * ssin[b * D + d];
        put(o, d, a + s);
      }
    }
}

// out [rows, I] = silu(gate) * up for gate_up [rows, 2I] (gate first): silu rounded, then the product.
template <typename T> static void silu_mul(const T* gu, int64_t rows, int64_t I, T* out) {
  for (int64_t r = 0; r < rows; r++)
    for (int64_t i = 0; i < I; i++) {
      const float g = get(gu + r * 2 * I, i);
      put(out + r * I, i, round_as(out, g / (1.f + std::exp(-g))) * get(gu + r * 2 * I + I, i));
    }
}

extern "C" void qk_add_rms_norm(void* h, const void* delta, const void* weight, int64_t rows, int64_t C, float eps,
                                int bf16, void* normed) {
  if (bf16)
    add_rms_norm(static_cast<uint16_t*>(h), static_cast<const uint16_t*>(delta), static_cast<const uint16_t*>(weight),
                 rows, C, eps, static_cast<uint16_t*>(normed));
  else
    add_rms_norm(static_cast<float*>(h), static_cast<const float*>(delta), static_cast<const float*>(weight), rows, C,
                 eps, static_cast<float*>(normed));
}

extern "C" void qk_rope(const void* x, int64_t xb, int64_t B, int64_t H, int64_t D, const float* cos,
                        const float* ssin, int bf16, void* out) {
  if (bf16) rope(static_cast<const uint16_t*>(x), xb, B, H, D, cos, ssin, static_cast<uint16_t*>(out));
  else rope(static_cast<const float*>(x), xb, B, H, D, cos, ssin, static_cast<float*>(out));
}

extern "C" void qk_silu_mul(const void* gu, int64_t rows, int64_t I, int bf16, void* out) {
  if (bf16) silu_mul(static_cast<const uint16_t*>(gu), rows, I, static_cast<uint16_t*>(out));
  else silu_mul(static_cast<const float*>(gu), rows, I, static_cast<float*>(out));
}

// The whole weight [N, K] as float32 (bf16 == 0) or bfloat16, for many rows of x (a prefill), where torch's matmul
// then does the work. The same float32 operations as the reference dequantisation, so the same bits.
template <typename F> static void write_rows(void* out, int64_t N, int64_t K, int bf16, int threads, F&& fill_row) {
  #pragma omp parallel num_threads(threads)
  {
    std::vector<float> tmp(bf16 ? K : 0);
    #pragma omp for schedule(static)
    for (int64_t n = 0; n < N; n++) {
      float* row = bf16 ? tmp.data() : static_cast<float*>(out) + n * K;
      fill_row(n, row);
      if (bf16) {
        uint16_t* o = static_cast<uint16_t*>(out) + n * K;
        for (int64_t k = 0; k < K; k++) o[k] = qk_to_bf16(row[k]);
      }
    }
  }
}

extern "C" void qk_dequant_int8(const int8_t* w, const float* scale, void* out, int64_t N, int64_t K, int bf16,
                                int threads) {
  write_rows(out, N, K, bf16, threads, [&](int64_t n, float* row) {
    for (int64_t k = 0; k < K; k++) row[k] = (float)w[n * K + k] * scale[n];
  });
}

extern "C" void qk_dequant_int4(const uint8_t* w, const float* scale, const uint8_t* zero, int64_t group, void* out,
                                int64_t N, int64_t K, int bf16, int threads) {
  const int64_t G = K / group;
  write_rows(out, N, K, bf16, threads, [&](int64_t n, float* row) {
    for (int64_t g = 0; g < G; g++) {
      const float s = scale[n * G + g], z = (float)zero[n * G + g];
      for (int64_t i = g * group / 2; i < (g + 1) * group / 2; i++) {
        const uint8_t byte = w[n * (K / 2) + i];
        row[2 * i] = ((float)(byte & 15) - z) * s;
        row[2 * i + 1] = ((float)(byte >> 4) - z) * s;
      }
    }
  });
}

extern "C" int qk_lanes() { return L; }

// The optional kernels, each on by default where it was built; tests and benchmarks compare them with the path under
// them. qk_switch(which, on) sets one (on = -1 only asks) and returns its state, or -1 where it was not built.
//   QK_BF16_DOT  int4 with one bfloat16 row on AVX512-BF16   QK_INT8_VNNI  int8 on AVX512-VNNI
//   QK_INT4_I8   int4 by integer multiply-adds on AVX2       QK_INT8_I16   int8 with bf16 x in int16 on AVX2
//   QK_INT4_VNNI int4_i8's multiply-adds on AVX512-VNNI (under QK_INT4_I8)
enum { QK_SWITCH_BF16_DOT = 0, QK_SWITCH_INT8_VNNI = 1, QK_SWITCH_INT4_I8 = 2, QK_SWITCH_INT8_I16 = 3,
       QK_SWITCH_INT4_VNNI = 4 };
extern "C" int qk_switch(int which, int on) {
  int* state = nullptr;
#if defined(QK_BF16_DOT) && QK_LANES == 16
  if (which == QK_SWITCH_BF16_DOT) state = &bf16_dot_on;
#endif
#if defined(QK_VNNI) && QK_LANES == 16
  if (which == QK_SWITCH_INT8_VNNI) state = &vnni_on;
  if (which == QK_SWITCH_INT4_VNNI) state = &int4_vnni_on;
#endif
#if defined(__AVX2__)
  if (which == QK_SWITCH_INT4_I8) state = &int4_i8_on;
  if (which == QK_SWITCH_INT8_I16) state = &int8_i16_on;
#endif
  if (!state) return -1;
  if (on >= 0) *state = on;
  return *state;
}

// Decode attention (see attend): kv_bf16 selects bfloat16 keys / values, else float32. strides: 6 element strides,
// keys (batch, head, row) then values.
extern "C" void qk_attend(const float* q, const void* k, const void* v, int kv_bf16, const int64_t* strides,
                          const uint8_t* visible, int64_t B, int64_t H, int64_t Hk, int64_t S, int64_t D, float scale,
                          float* out, int threads) {
  if (kv_bf16)
    attend(q, static_cast<const uint16_t*>(k), static_cast<const uint16_t*>(v), strides, strides + 3, visible, B, H,
           Hk, S, D, scale, out, threads);
  else
    attend(q, static_cast<const float*>(k), static_cast<const float*>(v), strides, strides + 3, visible, B, H, Hk, S,
           D, scale, out, threads);
}
