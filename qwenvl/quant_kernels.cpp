// CPU kernels for the weight-only quantized linears: matrix-vector products for decoding (a few rows of
// activations), and dequantisers for everything else (qk_dequant_*: the float weight, then torch's matmul).
//
//   y[m, n] = sum_k x[m, k] * W[n, k] + bias[n]      computed in float32 (x, y may be bf16); W never materialised
//
// qk_int8  Int8Linear   w int8 [N, K], scale [N]                   W[n, k] = scale[n] * w[n, k]
// qk_int4  Int4Linear   w uint8 [N, K/2] (input 2i in the low nibble), scale [N, G], zero uint8 [N, G]
//                       W[n, k] = scale[n, g] * (q[n, k] - zero[n, g]),  g = k / group
//          GPTQLinear   the same, on its int32 words stored transposed (see GPTQLinear.kernel_tensors)
//
// Decode is bound by reading the weights once, so each kernel keeps 8 rows of W in flight (with software
// prefetch across row blocks) and reuses every decoded weight vector for up to 4 rows of x. Products and sums are
// float32; int4 zero points are applied once per group through the group sums of x:
//     sum_k x_k s (q_k - z) = s (sum_k x_k q_k - z sum_k x_k).
// Built by quant_kernels.py with the vector width of the CPU (QK_LANES: 16 for AVX-512, 8 for AVX2, else 4).
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>
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

// Rows of W are read as R interleaved streams, and a block of R rows is short when K is (1536 bytes of int8 in a
// 2B model): the hardware prefetcher restarts on every block. So each stream requests, once per cache line, the line
// it will read PREFETCH bytes later, which past the end of its row is the same stream's row in the next block
// (R rows further on). Measured on 1536 x 1536 int8 weights: 3.8 -> 6.4-8.7 GB/s at one thread.
constexpr int64_t PREFETCH = 512;
template <int R, typename T> static inline void prefetch_ahead(const T* row, int64_t K, int64_t k) {
  const int64_t ahead = k + PREFETCH, jump = ahead >= K ? (R - 1) * K : 0;
  for (int r = 0; r < R; r++) __builtin_prefetch(row + r * K + ahead + jump);
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

// Runs block<BB>(row offset) over the M rows of x in chunks of 4, 2, 1 (BB = rows sharing each decoded weight).
template <typename F> static void over_rows(int64_t M, F&& block) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) block.template operator()<4>(m);
  for (; m + 2 <= M; m += 2) block.template operator()<2>(m);
  for (; m < M; m++) block.template operator()<1>(m);
}

// ------------------------------------------------------------------------------------------ int8, row-major

// Output rows n0 .. n0+R-1 for BB rows of x starting at x (row stride K); y row stride N.
template <int R, int BB>
static void int8_block(const float* x, int64_t K, const int8_t* w, const float* scale, const float* bias,
                       float* y, int64_t N, int64_t n0) {
  f32v acc[BB][R] = {};
  const int8_t* row = w + n0 * K;
  int64_t k = 0;
  for (; k + L <= K; k += L) {
    if (k % 64 < L) prefetch_ahead<R>(row, K, k);
    f32v wv[R];
    for (int r = 0; r < R; r++) wv[r] = to_f32(widen_i8(row + r * K + k));
    for (int b = 0; b < BB; b++) {
      f32v xv = load<f32v>(x + b * K + k);
      for (int r = 0; r < R; r++) acc[b][r] += wv[r] * xv;
    }
  }
  for (int b = 0; b < BB; b++)
    for (int r = 0; r < R; r++) {
      float s = hsum(acc[b][r]);
      for (int64_t kk = k; kk < K; kk++) s += x[b * K + kk] * (float)row[r * K + kk];   // K % L inputs
      y[b * N + n0 + r] = s * scale[n0 + r] + (bias ? bias[n0 + r] : 0.f);
    }
}

template <int R>
static void int8_rows(const float* x, int64_t M, int64_t K, const int8_t* w, const float* scale, const float* bias,
                      float* y, int64_t N, int64_t n0) {
  over_rows(M, [&]<int BB>(int64_t m) { int8_block<R, BB>(x + m * K, K, w, scale, bias, y + m * N, N, n0); });
}

static void int8_matvec(const float* x, int64_t M, int64_t K, const int8_t* w, const float* scale,
                        const float* bias, float* y, int64_t N, int threads) {
  const int64_t blocks = N / 8;                       // 8 rows of W in flight; 4 when 4 rows of x share them
  #pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t i = 0; i < blocks; i++) {
    if (M == 1) {
      int8_block<8, 1>(x, K, w, scale, bias, y, N, 8 * i);
    } else {
      int8_rows<4>(x, M, K, w, scale, bias, y, N, 8 * i);
      int8_rows<4>(x, M, K, w, scale, bias, y, N, 8 * i + 4);
    }
  }
  for (int64_t n = 8 * blocks; n < N; n++) int8_rows<1>(x, M, K, w, scale, bias, y, N, n);
}

// ------------------------------------------------------------------------------------------ int4, row-major

// xe / xo: the even / odd inputs of BB rows [BB, K/2]; xsum: their group sums [BB, G]. Per group and row the float
// codes meet the de-interleaved inputs, the scale is applied once to the group's partial sum, and the zero points
// once per row at the end.
template <int R, int BB>
static void int4_block(const float* xe, const float* xo, const float* xsum, int64_t K2, int64_t G, int64_t gs2,
                       const uint8_t* w, const float* scale, const uint8_t* zero, const float* bias,
                       float* y, int64_t N, int64_t n0) {
  f32v acc[BB][R] = {};
  const uint8_t* row = w + n0 * K2;
  for (int64_t g = 0; g < G; g++) {
    f32v part[BB][R] = {};
    for (int64_t j = g * gs2; j < (g + 1) * gs2; j += L) {
      if (j % 64 < L) prefetch_ahead<R>(row, K2, j);
      for (int r = 0; r < R; r++) {
        i32v v = widen_u8(row + r * K2 + j);                     // L bytes: inputs 2j.. in low, 2j+1.. in high
        f32v lo = to_f32(v & 15), hi = to_f32(v >> 4);
        for (int b = 0; b < BB; b++) {
          part[b][r] += lo * load<f32v>(xe + b * K2 + j);
          part[b][r] += hi * load<f32v>(xo + b * K2 + j);
        }
      }
    }
    for (int r = 0; r < R; r++)
      for (int b = 0; b < BB; b++) acc[b][r] += part[b][r] * scale[(n0 + r) * G + g];
  }
  for (int r = 0; r < R; r++) {
    const float* s = scale + (n0 + r) * G;
    const uint8_t* z = zero + (n0 + r) * G;
    for (int b = 0; b < BB; b++) {
      float zsum = 0.f;                                          // sum_g s_g z_g xsum_g
      for (int64_t g = 0; g < G; g++) zsum += s[g] * (float)z[g] * xsum[b * G + g];
      y[b * N + n0 + r] = hsum(acc[b][r]) - zsum + (bias ? bias[n0 + r] : 0.f);
    }
  }
}

template <int R>
static void int4_rows(const float* xe, const float* xo, const float* xsum, int64_t M, int64_t K2, int64_t G,
                      int64_t gs2, const uint8_t* w, const float* scale, const uint8_t* zero, const float* bias,
                      float* y, int64_t N, int64_t n0) {
  over_rows(M, [&]<int BB>(int64_t m) {
    int4_block<R, BB>(xe + m * K2, xo + m * K2, xsum + m * G, K2, G, gs2, w, scale, zero, bias, y + m * N, N, n0);
  });
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
// the float path is bound by converting codes (~11 GB/s of int4 per core), this one by the memory. Needs group % 64.
template <int R>
static void int4_block_bf16(const uint16_t* xe, const uint16_t* xo, const float* xsum, int64_t K2, int64_t G,
                            int64_t gs2, const uint8_t* w, const float* scale, const uint8_t* zero, const float* bias,
                            float* y, int64_t n0) {
  static const uint16_t codes_bf16[32] = {0x0000, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0,
                                          0x4100, 0x4110, 0x4120, 0x4130, 0x4140, 0x4150, 0x4160, 0x4170};  // 0..15
  const __m512i table = _mm512_loadu_si512(codes_bf16), low4 = _mm512_set1_epi16(15);
  __m512 acc[R];
  for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
  const uint8_t* row = w + n0 * K2;
  for (int64_t g = 0; g < G; g++) {
    __m512 part[R];
    for (int r = 0; r < R; r++) part[r] = _mm512_setzero_ps();
    for (int64_t j = g * gs2; j < (g + 1) * gs2; j += 32) {
      if (j % 64 < 32) prefetch_ahead<R>(row, K2, j);
      const __m512bh xev = (__m512bh)_mm512_loadu_si512(xe + j), xov = (__m512bh)_mm512_loadu_si512(xo + j);
      for (int r = 0; r < R; r++) {
        const __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + r * K2 + j)));
        const __m512i lo = _mm512_permutexvar_epi16(_mm512_and_si512(b, low4), table);   // inputs 2(j+i)
        const __m512i hi = _mm512_permutexvar_epi16(_mm512_srli_epi16(b, 4), table);      // inputs 2(j+i)+1
        part[r] = _mm512_dpbf16_ps(part[r], (__m512bh)lo, xev);
        part[r] = _mm512_dpbf16_ps(part[r], (__m512bh)hi, xov);
      }
    }
    for (int r = 0; r < R; r++) acc[r] = _mm512_fmadd_ps(part[r], _mm512_set1_ps(scale[(n0 + r) * G + g]), acc[r]);
  }
  for (int r = 0; r < R; r++) {
    const float* s = scale + (n0 + r) * G;
    const uint8_t* z = zero + (n0 + r) * G;
    float zsum = 0.f;
    for (int64_t g = 0; g < G; g++) zsum += s[g] * (float)z[g] * xsum[g];
    y[n0 + r] = _mm512_reduce_add_ps(acc[r]) - zsum + (bias ? bias[n0 + r] : 0.f);
  }
}

static int bf16_dot_on = 1;         // qk_bf16_dot(0) turns this path off (tests compare both, benchmarks time both)

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
  const int64_t blocks = N / 8;
  #pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t i = 0; i < blocks; i++) int4_block_bf16<8>(xe, xo, xsum.data(), K2, G, gs2, w, scale, zero, bias, y, 8 * i);
  for (int64_t n = 8 * blocks; n < N; n++) int4_block_bf16<1>(xe, xo, xsum.data(), K2, G, gs2, w, scale, zero, bias, y, n);
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
  const int64_t blocks = N / 8;
  #pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t i = 0; i < blocks; i++) {
    if (M == 1) {
      int4_block<8, 1>(xe, xo, xsum, K2, G, gs2, w, scale, zero, bias, y, N, 8 * i);
    } else {
      int4_rows<4>(xe, xo, xsum, M, K2, G, gs2, w, scale, zero, bias, y, N, 8 * i);
      int4_rows<4>(xe, xo, xsum, M, K2, G, gs2, w, scale, zero, bias, y, N, 8 * i + 4);
    }
  }
  for (int64_t n = 8 * blocks; n < N; n++) int4_rows<1>(xe, xo, xsum, M, K2, G, gs2, w, scale, zero, bias, y, N, n);
}

// ------------------------------------------------------------------------------------------ bf16 / float32 weights

// Float weights for decoding (qwenvl/fast_linear.py): torch's own GEMV reads float32 at ~22 GB/s and bfloat16 at
// ~11 GB/s on the 2-core AVX-512 machine (it converts bf16 in a slow loop); these read both near the bandwidth.
// bf16 -> float32 is exact (a 16-bit shift), so y is float32 sums of the exact products, as in torch's matmul.
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
static inline float scalar_w(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; std::memcpy(&f, &u, 4); return f; }
static inline float scalar_w(float f) { return f; }

template <int R, int BB, typename W>
static void dense_block(const float* x, int64_t K, const W* w, const float* bias, float* y, int64_t N, int64_t n0) {
  f32v acc[BB][R] = {};
  const W* row = w + n0 * K;
  int64_t k = 0;
  for (; k + L <= K; k += L) {
    if (k % (64 / sizeof(W)) < L) prefetch_ahead<R>(row, K, k);
    f32v wv[R];
    for (int r = 0; r < R; r++) wv[r] = widen_w(row + r * K + k);
    for (int b = 0; b < BB; b++) {
      f32v xv = load<f32v>(x + b * K + k);
      for (int r = 0; r < R; r++) acc[b][r] += wv[r] * xv;
    }
  }
  for (int b = 0; b < BB; b++)
    for (int r = 0; r < R; r++) {
      float s = hsum(acc[b][r]);
      for (int64_t kk = k; kk < K; kk++) s += x[b * K + kk] * scalar_w(row[r * K + kk]);
      y[b * N + n0 + r] = s + (bias ? bias[n0 + r] : 0.f);
    }
}

template <int R, typename W>
static void dense_rows(const float* x, int64_t M, int64_t K, const W* w, const float* bias, float* y, int64_t N,
                       int64_t n0) {
  over_rows(M, [&]<int BB>(int64_t m) { dense_block<R, BB, W>(x + m * K, K, w, bias, y + m * N, N, n0); });
}

template <typename W>
static void dense_matvec(const float* x, int64_t M, int64_t K, const W* w, const float* bias, float* y, int64_t N,
                         int threads) {
  const int64_t blocks = N / 8;
  #pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t i = 0; i < blocks; i++) {
    if (M == 1) {
      dense_block<8, 1, W>(x, K, w, bias, y, N, 8 * i);
    } else {
      dense_rows<4, W>(x, M, K, w, bias, y, N, 8 * i);
      dense_rows<4, W>(x, M, K, w, bias, y, N, 8 * i + 4);
    }
  }
  for (int64_t n = 8 * blocks; n < N; n++) dense_rows<1, W>(x, M, K, w, bias, y, N, n);
}

// ------------------------------------------------------------------------------------------ entry points

// bfloat16 activations (the usual CPU inference dtype) are converted here rather than by two more framework ops
// per call: bf16 -> float32 is exact, float32 -> bf16 rounds to nearest even as torch does.
static inline uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const bool nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  return nan ? (uint16_t)((u >> 16) | 0x40) : (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1)) >> 16);
}

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
  for (int64_t i = 0; i < n; i++) h[i] = to_bf16(y[i]);
}

// x [M, K] and y [M, N] are float32, or bfloat16 when bf16 != 0.
extern "C" void qk_int8(const void* x, int64_t M, int64_t K, const int8_t* w, const float* scale, const float* bias,
                        void* y, int64_t N, int bf16, int threads) {
  std::vector<float> xbuf, ybuf(bf16 ? M * N : 0);
  float* yf = bf16 ? ybuf.data() : static_cast<float*>(y);
  int8_matvec(as_f32(x, M * K, bf16, xbuf), M, K, w, scale, bias, yf, N, threads);
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
  int4_matvec(as_f32(x, M * K, bf16, xbuf), M, K, w, scale, zero, group, bias, yf, N, threads);
  if (bf16) store_bf16(yf, M * N, y);
}

// Float weights: w is bfloat16 [N, K] when w_bf16 != 0, else float32. x / y as in qk_int8.
extern "C" void qk_dense(const void* x, int64_t M, int64_t K, const void* w, int w_bf16, const float* bias, void* y,
                         int64_t N, int bf16, int threads) {
  std::vector<float> xbuf, ybuf(bf16 ? M * N : 0);
  float* yf = bf16 ? ybuf.data() : static_cast<float*>(y);
  const float* xf = as_f32(x, M * K, bf16, xbuf);
  if (w_bf16) dense_matvec(xf, M, K, static_cast<const uint16_t*>(w), bias, yf, N, threads);
  else dense_matvec(xf, M, K, static_cast<const float*>(w), bias, yf, N, threads);
  if (bf16) store_bf16(yf, M * N, y);
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
        for (int64_t k = 0; k < K; k++) o[k] = to_bf16(row[k]);
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

// Whether bf16 decoding uses the AVX512-BF16 int4 kernel (set to `on`; -1 only asks). -1 when it was not built.
extern "C" int qk_bf16_dot(int on) {
#if defined(QK_BF16_DOT) && QK_LANES == 16
  if (on >= 0) bf16_dot_on = on;
  return bf16_dot_on;
#else
  (void)on;
  return -1;
#endif
}
