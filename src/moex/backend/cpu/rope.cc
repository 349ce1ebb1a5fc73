// Rotary embedding. The angles follow transformers bit for bit where it can be done: inv_freq =
// 1 / theta^(2i/d) in fp32, angle = float(position) * inv_freq in fp32; cos/sin are then taken in
// double and rounded once, which is within an ulp of torch's fp32 cos/sin.
#include <algorithm>
#include <cmath>

#include "moex/backend/cpu/ops.h"
#include "moex/core/error.h"

namespace moex::cpu {
namespace {
// Rotary dims up to this size keep their per-token cos/sin tables on the stack.
constexpr int64_t kMaxStackHalf = 512;
}  // namespace

void rope(ThreadPool& pool, float* x, std::span<const int32_t> positions, int64_t heads, int64_t head_dim,
          int64_t rotary_dim, double theta) {
  MOEX_ASSERT(rotary_dim > 0 && rotary_dim % 2 == 0 && rotary_dim <= head_dim, "rotary_dim {} with head_dim {}",
              rotary_dim, head_dim);
  int64_t half = rotary_dim / 2;
  MOEX_ASSERT(half <= kMaxStackHalf, "rotary_dim {} > {}", rotary_dim, 2 * kMaxStackHalf);
  float inv_freq[kMaxStackHalf];
  float theta_f = static_cast<float>(theta);
  for (int64_t i = 0; i < half; ++i) {
    float exponent = static_cast<float>(2 * i) / static_cast<float>(rotary_dim);
    inv_freq[i] = 1.0f / std::pow(theta_f, exponent);
  }
  int64_t n = static_cast<int64_t>(positions.size());
  int64_t min_tokens = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, heads * head_dim));
  pool.parallel_for(n, min_tokens, [&](int64_t begin, int64_t end) {
    float cos_table[kMaxStackHalf];
    float sin_table[kMaxStackHalf];
    for (int64_t token = begin; token < end; ++token) {
      float position = static_cast<float>(positions[token]);
      for (int64_t i = 0; i < half; ++i) {
        double angle = static_cast<double>(position * inv_freq[i]);
        cos_table[i] = static_cast<float>(std::cos(angle));
        sin_table[i] = static_cast<float>(std::sin(angle));
      }
      for (int64_t head = 0; head < heads; ++head) {
        float* vec = x + (token * heads + head) * head_dim;
        for (int64_t i = 0; i < half; ++i) {
          float x1 = vec[i];
          float x2 = vec[i + half];
          // Two rounded products then one add, as torch evaluates q * cos + rotate_half(q) * sin.
          float a1 = x1 * cos_table[i];
          float b1 = x2 * sin_table[i];
          float a2 = x2 * cos_table[i];
          float b2 = x1 * sin_table[i];
          vec[i] = a1 - b1;
          vec[i + half] = a2 + b2;
        }
      }
    }
  });
}

}  // namespace moex::cpu
