// Elementwise, normalisation, embedding and RoPE ops of the CPU backend against double-precision references
// written here, on seeded random data at tiny, odd and real shapes (KV cache and attention:
// cpu_paged_attention_test.cc).
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "backend_test_util.h"
#include "moex/backend/cpu/cpu_backend.h"

namespace moex {
namespace {

using test::GuardedF32;
using test::RandomTensor;

constexpr DType kAllDtypes[] = {DType::kF32, DType::kBF16, DType::kF16};

TEST(CpuOps, RmsNorm) {
  auto backend = make_cpu_backend(2);
  uint64_t seed = 100;
  for (DType dtype : kAllDtypes)
    for (int64_t rows : {1, 3, 7, 31, 129})
      for (int64_t cols : {1, 3, 7, 31, 129, 4096}) {  // 4096: Mixtral-8x7B hidden
        std::string label = fmt::format("rms_norm(dtype={},rows={},cols={}) seed={}", dtype_name(dtype), rows, cols, ++seed);
        std::mt19937_64 rng(seed);
        RandomTensor x = test::random_tensor(rng, DType::kF32, {rows, cols}, 3.0);
        RandomTensor w = test::random_tensor(rng, dtype, {cols});
        float eps = 1e-5f;
        GuardedF32 out({rows, cols});
        backend->rms_norm(x.view(), w.view(), eps, out.view());
        std::vector<double> ref(static_cast<size_t>(rows * cols)), tol(ref.size());
        for (int64_t r = 0; r < rows; ++r) {
          double ss = 0.0;
          for (int64_t c = 0; c < cols; ++c) ss += x.values[r * cols + c] * x.values[r * cols + c];
          double inv = 1.0 / std::sqrt(ss / static_cast<double>(cols) + eps);
          for (int64_t c = 0; c < cols; ++c) {
            ref[r * cols + c] = x.values[r * cols + c] * inv * w.values[c];
            tol[r * cols + c] = 2e-6 * std::fabs(ref[r * cols + c]) + 1e-7;
          }
        }
        test::expect_close(out, ref, tol, label);

        // In place gives the same bits.
        GuardedF32 inplace({rows, cols}, x.values);
        backend->rms_norm(inplace.view(), w.view(), eps, inplace.view());
        ASSERT_TRUE(inplace.guards_intact()) << label;
        EXPECT_EQ(0, std::memcmp(inplace.data(), out.data(), static_cast<size_t>(rows * cols) * 4)) << label;
      }
}

TEST(CpuOps, AddClampSiluMul) {
  auto backend = make_cpu_backend(2);
  uint64_t seed = 200;
  for (int64_t count : {1, 3, 7, 31, 129, 20000, 14336 * 3}) {
    std::string label = fmt::format("(count={}) seed={}", count, ++seed);
    std::mt19937_64 rng(seed);
    RandomTensor a = test::random_tensor(rng, DType::kF32, {count}, 10.0);
    RandomTensor b = test::random_tensor(rng, DType::kF32, {count}, 10.0);
    // Saturating silu inputs at both ends.
    float extreme[] = {-100.0f, 100.0f, -88.5f, 88.5f, -20.0f, 20.0f, 0.0f};
    for (int64_t i = 0; i < std::min<int64_t>(count, 7); ++i) {
      std::memcpy(a.bytes.data() + 4 * i, &extreme[i], 4);
      a.values[i] = extreme[i];
    }

    GuardedF32 sum({count});
    backend->add(a.view(), b.view(), sum.view());
    std::vector<double> ref(static_cast<size_t>(count));
    for (int64_t i = 0; i < count; ++i) ref[i] = static_cast<float>(a.values[i] + b.values[i]);
    test::expect_close(sum, ref, 0.0, "add" + label);

    GuardedF32 silu({count});
    backend->silu_mul(a.view(), b.view(), silu.view());
    std::vector<double> tol(ref.size());
    for (int64_t i = 0; i < count; ++i) {
      double g = a.values[i];
      ref[i] = g / (1.0 + std::exp(-g)) * b.values[i];
      tol[i] = 2e-6 * std::fabs(ref[i]) + 1e-30;
    }
    test::expect_close(silu, ref, tol, "silu_mul" + label);

    GuardedF32 clamped({count}, a.values);
    backend->clamp(clamped.view(), 7.5f);
    for (int64_t i = 0; i < count; ++i) ref[i] = std::clamp(a.values[i], -7.5, 7.5);
    test::expect_close(clamped, ref, 0.0, "clamp" + label);
  }
}

TEST(CpuOps, ClampKeepsNaN) {
  auto backend = make_cpu_backend(1);
  GuardedF32 x({3}, {std::nan(""), 5.0, -5.0});
  backend->clamp(x.view(), 1.0f);
  EXPECT_TRUE(std::isnan(x[0]));
  EXPECT_EQ(x[1], 1.0f);
  EXPECT_EQ(x[2], -1.0f);
}

TEST(CpuOps, AddSigmoidGated) {
  auto backend = make_cpu_backend(2);
  uint64_t seed = 300;
  for (int64_t rows : {1, 3, 7, 31})
    for (int64_t cols : {1, 7, 129, 2048}) {  // 2048: Qwen2-57B-A14B hidden is 3584; 2048 Qwen1.5-MoE
      std::string label = fmt::format("add_sigmoid_gated(rows={},cols={}) seed={}", rows, cols, ++seed);
      std::mt19937_64 rng(seed);
      RandomTensor acc = test::random_tensor(rng, DType::kF32, {rows, cols});
      RandomTensor x = test::random_tensor(rng, DType::kF32, {rows, cols});
      RandomTensor gate = test::random_tensor(rng, DType::kF32, {rows, 1}, 4.0);
      GuardedF32 out({rows, cols}, acc.values);
      backend->add_sigmoid_gated(out.view(), x.view(), gate.view());
      std::vector<double> ref(acc.values.size()), tol(ref.size());
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c) {
          double g = 1.0 / (1.0 + std::exp(-gate.values[r]));
          ref[r * cols + c] = acc.values[r * cols + c] + g * x.values[r * cols + c];
          tol[r * cols + c] = 1e-6 * (std::fabs(acc.values[r * cols + c]) + std::fabs(x.values[r * cols + c]));
        }
      test::expect_close(out, ref, tol, label);
    }
}

TEST(CpuOps, Embedding) {
  auto backend = make_cpu_backend(2);
  uint64_t seed = 400;
  for (DType dtype : kAllDtypes)
    for (int64_t hidden : {1, 7, 129}) {
      std::string label = fmt::format("embedding(dtype={},hidden={}) seed={}", dtype_name(dtype), hidden, ++seed);
      std::mt19937_64 rng(seed);
      int64_t vocab = 50;
      RandomTensor table = test::random_tensor(rng, dtype, {vocab, hidden});
      std::vector<int32_t> ids = {0, 49, 7, 7, 13};
      GuardedF32 out({static_cast<int64_t>(ids.size()), hidden});
      backend->embedding(ids, table.view(), out.view());
      std::vector<double> ref;
      for (int32_t id : ids)
        for (int64_t c = 0; c < hidden; ++c) ref.push_back(table.values[id * hidden + c]);
      test::expect_close(out, ref, 0.0, label);
    }
}

TEST(CpuOps, EmbeddingRejectsOutOfRangeIds) {
  auto backend = make_cpu_backend(1);
  std::mt19937_64 rng(1);
  RandomTensor table = test::random_tensor(rng, DType::kBF16, {10, 4});
  GuardedF32 out({2, 4});
  for (int32_t bad : {10, -1}) {
    std::vector<int32_t> ids = {3, bad};
    try {
      backend->embedding(ids, table.view(), out.view());
      ADD_FAILURE() << "id " << bad << " accepted";
    } catch (const UsageError& e) {
      EXPECT_NE(std::string(e.what()).find(fmt::format("token id {} at position 1 is out of range", bad)),
                std::string::npos)
          << e.what();
      EXPECT_NE(std::string(e.what()).find("10 tokens"), std::string::npos) << e.what();
    }
  }
}

// transformers' angle: inv_freq = 1 / theta^(2i/d) and position * inv_freq, both in fp32.
double hf_angle(int32_t position, int64_t i, int64_t rotary_dim, double theta) {
  float exponent = static_cast<float>(2 * i) / static_cast<float>(rotary_dim);
  float inv_freq = 1.0f / std::pow(static_cast<float>(theta), exponent);
  return static_cast<double>(static_cast<float>(position) * inv_freq);
}

TEST(CpuOps, Rope) {
  auto backend = make_cpu_backend(2);
  uint64_t seed = 500;
  struct Case {
    int64_t n, heads, head_dim, rotary_dim;
    double theta;
  };
  // 128/1e6: Mixtral; 64/1e4: OLMoE; partial rotary (rotary_dim < head_dim) as some checkpoints use.
  for (Case c : {Case{1, 1, 2, 2, 10000.0}, Case{3, 7, 8, 8, 10000.0}, Case{7, 4, 64, 64, 10000.0},
                 Case{31, 8, 128, 128, 1e6}, Case{5, 3, 64, 32, 500000.0}, Case{129, 2, 16, 16, 10000.0}}) {
    std::string label = fmt::format("rope(n={},heads={},head_dim={},rotary_dim={},theta={}) seed={}", c.n, c.heads,
                                    c.head_dim, c.rotary_dim, c.theta, ++seed);
    std::mt19937_64 rng(seed);
    RandomTensor x = test::random_tensor(rng, DType::kF32, {c.n, c.heads, c.head_dim});
    std::vector<int32_t> positions(static_cast<size_t>(c.n));
    for (int64_t i = 0; i < c.n; ++i) positions[i] = static_cast<int32_t>(i == 0 ? 0 : rng() % 5000);
    GuardedF32 out({c.n, c.heads, c.head_dim}, x.values);
    backend->rope(out.view(), positions, c.rotary_dim, c.theta);

    std::vector<double> ref(x.values), tol(ref.size()), exact(x.values), exact_tol(ref.size());
    int64_t half = c.rotary_dim / 2;
    for (int64_t t = 0; t < c.n; ++t)
      for (int64_t h = 0; h < c.heads; ++h) {
        int64_t base = (t * c.heads + h) * c.head_dim;
        for (int64_t i = 0; i < half; ++i) {
          double x1 = x.values[base + i], x2 = x.values[base + i + half];
          double angle = hf_angle(positions[t], i, c.rotary_dim, c.theta);
          ref[base + i] = x1 * std::cos(angle) - x2 * std::sin(angle);
          ref[base + i + half] = x2 * std::cos(angle) + x1 * std::sin(angle);
          tol[base + i] = tol[base + i + half] = 1e-6 * (std::fabs(x1) + std::fabs(x2));
          // The mathematically exact angle differs by fp32 rounding of position * inv_freq.
          double true_angle = positions[t] / std::pow(c.theta, static_cast<double>(2 * i) / c.rotary_dim);
          exact[base + i] = x1 * std::cos(true_angle) - x2 * std::sin(true_angle);
          exact[base + i + half] = x2 * std::cos(true_angle) + x1 * std::sin(true_angle);
          exact_tol[base + i] = exact_tol[base + i + half] =
              (4e-7 * positions[t] + 1e-6) * (std::fabs(x1) + std::fabs(x2));
        }
        // Dims beyond rotary_dim pass through untouched (tolerance 0 from the copy above).
      }
    test::expect_close(out, ref, tol, label);
    test::expect_close(out, exact, exact_tol, label + " vs exact angles");
  }
}

}  // namespace
}  // namespace moex
