// SIMD building blocks of the CPU kernels: 8-wide loads that widen bf16/f16/f32 weights to fp32,
// horizontal sums and a vectorised exp. Built for x86-64-v3 (AVX2, FMA, F16C); every kernel keeps a
// scalar path for other targets, chosen at compile time by MOEX_CPU_AVX2.
#pragma once

#include <cstdint>
#include <cstring>

#include "moex/core/dtype.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define MOEX_CPU_AVX2 1
#include <immintrin.h>
#endif

namespace moex::cpu {

// Distinct element types for the two 16-bit formats, so templates can dispatch on them.
struct Bf16 {
  uint16_t bits;
};
struct F16 {
  uint16_t bits;
};

inline float to_f32(float value) { return value; }
inline float to_f32(Bf16 value) { return bf16_to_f32(value.bits); }
inline float to_f32(F16 value) {
#ifdef MOEX_CPU_AVX2
  return _cvtsh_ss(value.bits);
#else
  return f16_to_f32(value.bits);
#endif
}

// Reads element idx of a weight/bias tensor of any float dtype as fp32 (slow path: tails, scalars).
inline float load_f32(const void* data, DType dtype, int64_t idx) {
  switch (dtype) {
    case DType::kF32: return static_cast<const float*>(data)[idx];
    case DType::kF16: return to_f32(static_cast<const F16*>(data)[idx]);
    case DType::kBF16: return to_f32(static_cast<const Bf16*>(data)[idx]);
    case DType::kI32:
    case DType::kI64: break;
  }
  return 0.0f;
}

#ifdef MOEX_CPU_AVX2
inline __m256 load8(const float* ptr) { return _mm256_loadu_ps(ptr); }
// bf16 is the top half of an fp32: widen and shift, exact.
inline __m256 load8(const Bf16* ptr) {
  __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(ptr));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}
inline __m256 load8(const F16* ptr) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(ptr)));
}

inline float hsum(__m256 v) {
  __m128 sum = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  sum = _mm_add_ps(sum, _mm_movehl_ps(sum, sum));
  sum = _mm_add_ss(sum, _mm_movehdup_ps(sum));
  return _mm_cvtss_f32(sum);
}

// The four horizontal sums of a, b, c, d as one vector, lanes reduced as ((0+1)+(2+3)) + ((4+5)+(6+7)).
inline __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
  __m256 abcd = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

// exp(x), Cephes polynomial after range reduction by ln 2; ~1-2 ulp on [-87, 88]. Inputs below
// -87.3 flush to 0, above 88 saturate near FLT_MAX; NaN propagates (the min/max operand order keeps it).
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_set1_ps(88.0f), x);
  x = _mm256_max_ps(_mm256_set1_ps(-88.3762626647949f), x);
  __m256 fx = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f));
  fx = _mm256_floor_ps(fx);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  __m256 x2 = _mm256_mul_ps(x, x);
  y = _mm256_fmadd_ps(y, x2, _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  __m256i n = _mm256_cvttps_epi32(fx);
  n = _mm256_slli_epi32(_mm256_add_epi32(n, _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(n));
}

// silu(x) = x * sigmoid(x) = x / (1 + exp(-x)).
inline __m256 silu8(__m256 x) {
  __m256 denom = _mm256_add_ps(_mm256_set1_ps(1.0f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), x)));
  return _mm256_div_ps(x, denom);
}
#endif

}  // namespace moex::cpu
