// Row-wise and elementwise ops. They are cheap next to the linears, so threading only kicks in
// above a few thousand elements; below that a pool wake-up costs more than the work.
#include <algorithm>
#include <cmath>

#include "moex/backend/cpu/ops.h"
#include "moex/backend/cpu/simd.h"
#include "moex/core/error.h"

namespace moex::cpu {
namespace {

constexpr int64_t kMinElementsPerTask = 16384;

template <typename W>
void rms_norm_row(const float* x, const W* weight, float eps, int64_t cols, float* out) {
  int64_t col = 0;
  double sum_sq = 0.0;
#ifdef MOEX_CPU_AVX2
  __m256d acc0 = _mm256_setzero_pd();
  __m256d acc1 = _mm256_setzero_pd();
  for (; col + 8 <= cols; col += 8) {
    __m256 v = _mm256_loadu_ps(x + col);
    __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
    __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
    acc0 = _mm256_fmadd_pd(lo, lo, acc0);
    acc1 = _mm256_fmadd_pd(hi, hi, acc1);
  }
  alignas(32) double lanes[4];
  _mm256_store_pd(lanes, _mm256_add_pd(acc0, acc1));
  sum_sq = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
#endif
  for (; col < cols; ++col) sum_sq += static_cast<double>(x[col]) * x[col];
  // transformers: variance in fp32, then x * rsqrt(variance + eps), then weight * that.
  float variance = static_cast<float>(sum_sq / static_cast<double>(cols));
  float inv_rms = static_cast<float>(1.0 / std::sqrt(static_cast<double>(variance + eps)));
  col = 0;
#ifdef MOEX_CPU_AVX2
  __m256 scale = _mm256_set1_ps(inv_rms);
  for (; col + 8 <= cols; col += 8) {
    __m256 normed = _mm256_mul_ps(_mm256_loadu_ps(x + col), scale);
    _mm256_storeu_ps(out + col, _mm256_mul_ps(load8(weight + col), normed));
  }
#endif
  for (; col < cols; ++col) out[col] = to_f32(weight[col]) * (x[col] * inv_rms);
}

template <typename W>
void rms_norm_typed(ThreadPool& pool, const float* x, const W* weight, float eps, int64_t rows, int64_t cols,
                    float* out) {
  int64_t min_rows = std::max<int64_t>(1, kMinElementsPerTask / std::max<int64_t>(1, cols));
  pool.parallel_for(rows, min_rows, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) rms_norm_row(x + row * cols, weight, eps, cols, out + row * cols);
  });
}

template <typename T>
void embedding_rows(std::span<const int32_t> ids, const T* table, int64_t hidden, float* out) {
  for (size_t i = 0; i < ids.size(); ++i) {
    const T* src = table + static_cast<int64_t>(ids[i]) * hidden;
    float* dst = out + static_cast<int64_t>(i) * hidden;
    for (int64_t col = 0; col < hidden; ++col) dst[col] = to_f32(src[col]);
  }
}

}  // namespace

void rms_norm(ThreadPool& pool, const float* x, const void* weight, DType weight_dtype, float eps, int64_t rows,
              int64_t cols, float* out) {
  switch (weight_dtype) {
    case DType::kF32: rms_norm_typed(pool, x, static_cast<const float*>(weight), eps, rows, cols, out); break;
    case DType::kF16: rms_norm_typed(pool, x, static_cast<const F16*>(weight), eps, rows, cols, out); break;
    case DType::kBF16: rms_norm_typed(pool, x, static_cast<const Bf16*>(weight), eps, rows, cols, out); break;
    case DType::kI32:
    case DType::kI64: MOEX_ASSERT(false, "rms_norm weight dtype {}", dtype_name(weight_dtype));
  }
}

void add(ThreadPool& pool, const float* a, const float* b, float* out, int64_t count) {
  pool.parallel_for(count, kMinElementsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t idx = begin; idx < end; ++idx) out[idx] = a[idx] + b[idx];
  });
}

void clamp(ThreadPool& pool, float* x, int64_t count, float limit) {
  pool.parallel_for(count, kMinElementsPerTask, [&](int64_t begin, int64_t end) {
    // NaN stays NaN, as torch.clamp leaves it.
    for (int64_t idx = begin; idx < end; ++idx) {
      float v = x[idx];
      x[idx] = v < -limit ? -limit : (v > limit ? limit : v);
    }
  });
}

void silu_mul_span(const float* gate, const float* up, float* out, int64_t count) {
  int64_t idx = 0;
#ifdef MOEX_CPU_AVX2
  for (; idx + 8 <= count; idx += 8) {
    __m256 g = _mm256_loadu_ps(gate + idx);
    _mm256_storeu_ps(out + idx, _mm256_mul_ps(silu8(g), _mm256_loadu_ps(up + idx)));
  }
#endif
  for (; idx < count; ++idx) {
    float g = gate[idx];
    out[idx] = g / (1.0f + std::exp(-g)) * up[idx];
  }
}

void silu_mul(ThreadPool& pool, const float* gate, const float* up, float* out, int64_t count) {
  pool.parallel_for(count, kMinElementsPerTask,
                    [&](int64_t begin, int64_t end) { silu_mul_span(gate + begin, up + begin, out + begin, end - begin); });
}

void add_sigmoid_gated(float* acc, const float* x, const float* gate_logit, int64_t rows, int64_t cols) {
  for (int64_t row = 0; row < rows; ++row) {
    float gate = 1.0f / (1.0f + std::exp(-gate_logit[row]));
    float* dst = acc + row * cols;
    const float* src = x + row * cols;
    for (int64_t col = 0; col < cols; ++col) dst[col] += gate * src[col];
  }
}

void embedding(std::span<const int32_t> ids, const void* table, DType table_dtype, int64_t vocab, int64_t hidden,
               float* out) {
  for (size_t i = 0; i < ids.size(); ++i) {
    if (ids[i] < 0 || ids[i] >= vocab)
      throw UsageError(fmt::format("token id {} at position {} is out of range: the vocabulary has {} tokens "
                                   "(ids 0..{})",
                                   ids[i], i, vocab, vocab - 1));
  }
  switch (table_dtype) {
    case DType::kF32: embedding_rows(ids, static_cast<const float*>(table), hidden, out); break;
    case DType::kF16: embedding_rows(ids, static_cast<const F16*>(table), hidden, out); break;
    case DType::kBF16: embedding_rows(ids, static_cast<const Bf16*>(table), hidden, out); break;
    case DType::kI32:
    case DType::kI64: MOEX_ASSERT(false, "embedding table dtype {}", dtype_name(table_dtype));
  }
}

}  // namespace moex::cpu
