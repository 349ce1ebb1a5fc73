// CUDA kv_write + causal GQA attention against a double-precision reference: prefill (many queries, one
// split), decode (one query, split-K over the keys) and chunked prefill at a non-zero start position.
#include <gtest/gtest.h>

#include <cmath>

#include "cuda_test_util.h"

namespace moex::cuda_test {
namespace {

struct AttnCase {
  int64_t n, start_pos, heads, kv_heads, head_dim;
};

class CudaAttention : public ::testing::TestWithParam<AttnCase> {};

TEST_P(CudaAttention, MatchesReference) {
  MOEX_CUDA_BACKEND_OR_SKIP(backend);
  const AttnCase c = GetParam();
  SCOPED_TRACE(testing::Message() << "attention(n=" << c.n << ",start=" << c.start_pos << ",heads=" << c.heads
                                  << ",kv=" << c.kv_heads << ",d=" << c.head_dim << ")");
  std::mt19937 rng(static_cast<uint32_t>(c.n * 97 + c.start_pos * 13 + c.head_dim));
  const int64_t keys = c.start_pos + c.n, capacity = keys + 5;
  const int64_t kv_row = c.kv_heads * c.head_dim;
  // Earlier rows are put in directly; the last n go through kv_write like a real step.
  auto k_all = random_floats(rng, static_cast<size_t>(keys * kv_row));
  auto v_all = random_floats(rng, static_cast<size_t>(keys * kv_row));
  auto q = random_floats(rng, static_cast<size_t>(c.n * c.heads * c.head_dim));
  std::vector<float> k_cache(static_cast<size_t>(capacity * kv_row), std::nanf("")), v_cache = k_cache;
  std::copy(k_all.begin(), k_all.begin() + c.start_pos * kv_row, k_cache.begin());
  std::copy(v_all.begin(), v_all.begin() + c.start_pos * kv_row, v_cache.begin());
  auto kc = backend->alloc(DType::kF32, {capacity, c.kv_heads, c.head_dim});
  auto vc = backend->alloc(DType::kF32, {capacity, c.kv_heads, c.head_dim});
  backend->copy_from_host(k_cache.data(), kc->view);
  backend->copy_from_host(v_cache.data(), vc->view);
  GuardedTensor kn(*backend, {c.n, c.kv_heads, c.head_dim}), vn(*backend, {c.n, c.kv_heads, c.head_dim});
  kn.fill(std::vector<float>(k_all.begin() + c.start_pos * kv_row, k_all.end()));
  vn.fill(std::vector<float>(v_all.begin() + c.start_pos * kv_row, v_all.end()));
  backend->kv_write(kn.view(), vn.view(), kc->view, vc->view, c.start_pos);
  GuardedTensor qd(*backend, {c.n, c.heads, c.head_dim}), od(*backend, {c.n, c.heads, c.head_dim});
  qd.fill(q);
  const float scale = 1.f / std::sqrt(float(c.head_dim));
  backend->attention(qd.view(), kc->view, vc->view, c.start_pos, scale, od.view());

  const int64_t group = c.heads / c.kv_heads, D = c.head_dim;
  std::vector<double> ref(q.size());
  for (int64_t i = 0; i < c.n; ++i)
    for (int64_t h = 0; h < c.heads; ++h) {
      int64_t g = h / group, visible = c.start_pos + i + 1;
      std::vector<double> s(static_cast<size_t>(visible));
      double m = -INFINITY;
      for (int64_t j = 0; j < visible; ++j) {
        double dot = 0;
        for (int64_t d = 0; d < D; ++d) dot += double(q[(i * c.heads + h) * D + d]) * k_all[(j * c.kv_heads + g) * D + d];
        s[j] = dot * scale;
        m = std::max(m, s[j]);
      }
      double l = 0;
      for (auto& v : s) l += (v = std::exp(v - m));
      for (int64_t d = 0; d < D; ++d) {
        double acc = 0;
        for (int64_t j = 0; j < visible; ++j) acc += s[j] * v_all[(j * c.kv_heads + g) * D + d];
        ref[(i * c.heads + h) * D + d] = acc / l;
      }
    }
  MOEX_EXPECT_CLOSE(od.read(), ref, 1e-5);
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, CudaAttention,
    ::testing::Values(AttnCase{1, 0, 4, 4, 64}, AttnCase{3, 0, 6, 2, 32}, AttnCase{7, 0, 2, 1, 256},
                      AttnCase{31, 5, 4, 2, 16}, AttnCase{129, 0, 4, 1, 64}, AttnCase{1, 1000, 8, 8, 40},
                      AttnCase{7, 300, 4, 2, 128},
                      // Model A (16 heads / 8 kv, head_dim 128): decode at 1 and 777 keys, prefill 129
                      AttnCase{1, 0, 16, 8, 128}, AttnCase{1, 776, 16, 8, 128}, AttnCase{129, 0, 16, 8, 128},
                      // Model B (Qwen3-30B-A3B: 32 heads / 4 kv, head_dim 128): decode at 2048 keys
                      AttnCase{1, 2047, 32, 4, 128}, AttnCase{3, 64, 32, 4, 128}));

}  // namespace
}  // namespace moex::cuda_test
