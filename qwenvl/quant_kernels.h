// The extern "C" entry points of quant_kernels.cpp, for the other sources of the same library (decode_step.cpp).
// Argument conventions are documented beside each definition in quant_kernels.cpp.
#pragma once
#include <cstdint>
#include <cstring>

// bfloat16 -> float32 (exact: a 16-bit shift).
static inline float qk_from_bf16(uint16_t h) {
  const uint32_t u = (uint32_t)h << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// float32 -> bfloat16, rounded to nearest even as torch rounds (nan stays a quiet nan).
static inline uint16_t qk_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const bool nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  return nan ? (uint16_t)((u >> 16) | 0x40) : (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1)) >> 16);
}

extern "C" {
void qk_int8(const void* x, int64_t M, int64_t K, const int8_t* w, const float* scale, const float* bias, void* y,
             int64_t N, int bf16, int threads);
void qk_int4(const void* x, int64_t M, int64_t K, const uint8_t* w, const float* scale, const uint8_t* zero,
             int64_t group, const float* bias, void* y, int64_t N, int bf16, int threads);
void qk_dense(const void* x, int64_t M, int64_t K, const void* w, int w_bf16, const float* bias, void* y, int64_t N,
              int bf16, int threads);
void qk_attend(const float* q, const void* k, const void* v, int kv_bf16, const int64_t* strides,
               const uint8_t* visible, int64_t B, int64_t H, int64_t Hk, int64_t S, int64_t D, float scale,
               float* out, int threads);
void qk_add_rms_norm(void* h, const void* delta, const void* weight, int64_t rows, int64_t C, float eps, int bf16,
                     void* normed);
void qk_rope(const void* x, int64_t xb, int64_t B, int64_t H, int64_t D, const float* cos, const float* ssin,
             int bf16, void* out);
void qk_silu_mul(const void* gu, int64_t rows, int64_t I, int bf16, void* out);
}
