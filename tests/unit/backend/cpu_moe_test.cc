// moe_experts(): grouped SwiGLU experts against a double-precision per-token reference, across weight
// dtypes, GEMV- and GEMM-sized expert batches, experts that receive no tokens and absent experts.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>

#include "backend_test_util.h"
#include "moex/backend/cpu/cpu_backend.h"

namespace moex {
namespace {

using test::GuardedF32;
using test::RandomTensor;

struct MoeCase {
  int64_t n, hidden, ffn, num_experts, top_k;
  DType dtype;
  bool skewed;  // route most tokens to expert 0 (a GEMM-sized batch next to GEMV-sized ones)
  std::string str() const {
    return fmt::format("moe_experts(dtype={},n={},hidden={},ffn={},experts={},top_k={},skewed={})", dtype_name(dtype),
                       n, hidden, ffn, num_experts, top_k, skewed);
  }
};

struct ExpertData {
  RandomTensor gate, up, down;
};

void run_moe_case(Backend& backend, const MoeCase& c, uint64_t seed) {
  std::string label = c.str() + fmt::format(" seed={} backend={}", seed, backend.name());
  std::mt19937_64 rng(seed);
  RandomTensor x = test::random_tensor(rng, DType::kF32, {c.n, c.hidden});
  // The last expert is never routed to and has no weights (an expert the provider did not load).
  int64_t routable = c.num_experts > 1 ? c.num_experts - 1 : 1;
  std::vector<ExpertData> data(static_cast<size_t>(c.num_experts));
  std::vector<ExpertWeights> experts(static_cast<size_t>(c.num_experts));
  // Only the first half of the routable experts (at most 8) get tokens (unless skewed), so some get none; those
  // share expert 0's weights, which keeps real-shape cases with many experts cheap to build.
  int64_t used = c.skewed ? routable : std::max(c.top_k, std::min<int64_t>(8, (routable + 1) / 2));
  for (int64_t e = 0; e < routable; ++e) {
    if (e >= used) {
      experts[e] = experts[0];
      continue;
    }
    data[e].gate = test::random_tensor(rng, c.dtype, {c.ffn, c.hidden}, 1.0 / std::sqrt(double(c.hidden)));
    data[e].up = test::random_tensor(rng, c.dtype, {c.ffn, c.hidden}, 1.0 / std::sqrt(double(c.hidden)));
    data[e].down = test::random_tensor(rng, c.dtype, {c.hidden, c.ffn}, 1.0 / std::sqrt(double(c.ffn)));
    experts[e] = {data[e].gate.view(), data[e].up.view(), data[e].down.view()};
  }
  ASSERT_LE(c.top_k, routable) << label;

  Routing routing;
  routing.num_tokens = c.n;
  routing.top_k = c.top_k;
  for (int64_t t = 0; t < c.n; ++t) {
    std::vector<int32_t> pool(static_cast<size_t>(used));
    std::iota(pool.begin(), pool.end(), 0);
    for (int64_t j = 0; j < c.top_k; ++j) {
      int64_t pick = j + static_cast<int64_t>(rng() % static_cast<uint64_t>(used - j));
      if (c.skewed && j == 0 && rng() % 8 != 0) pick = std::find(pool.begin(), pool.end(), 0) - pool.begin();
      std::swap(pool[j], pool[pick]);
      routing.expert_ids.push_back(pool[j]);
      routing.weights.push_back(static_cast<float>(0.1 + 0.9 * (rng() % 1000) / 1000.0));
    }
  }

  GuardedF32 out({c.n, c.hidden});
  backend.moe_experts(x.view(), routing, experts, out.view());

  std::vector<double> ref(static_cast<size_t>(c.n * c.hidden), 0.0), tol(ref.size(), 1e-30);
  for (int64_t t = 0; t < c.n; ++t)
    for (int64_t j = 0; j < c.top_k; ++j) {
      const ExpertData& d = data[routing.expert_ids[t * c.top_k + j]];
      double weight = routing.weights[t * c.top_k + j];
      std::vector<double> h(static_cast<size_t>(c.ffn)), h_mass(h.size());
      for (int64_t f = 0; f < c.ffn; ++f) {
        double g = 0.0, u = 0.0, g_mass = 0.0, u_mass = 0.0;
        for (int64_t k = 0; k < c.hidden; ++k) {
          double xv = x.values[t * c.hidden + k];
          g += d.gate.values[f * c.hidden + k] * xv;
          u += d.up.values[f * c.hidden + k] * xv;
          g_mass += std::fabs(d.gate.values[f * c.hidden + k] * xv);
          u_mass += std::fabs(d.up.values[f * c.hidden + k] * xv);
        }
        double silu = g / (1.0 + std::exp(-g));
        h[f] = silu * u;
        // |d silu(g) u| <= ~1.1 |u| |dg| + |silu(g)| |du|
        h_mass[f] = 1.1 * std::fabs(u) * g_mass + std::fabs(silu) * u_mass + std::fabs(h[f]);
      }
      for (int64_t o = 0; o < c.hidden; ++o) {
        double y = 0.0, y_mass = 0.0;
        for (int64_t f = 0; f < c.ffn; ++f) {
          y += d.down.values[o * c.ffn + f] * h[f];
          y_mass += std::fabs(d.down.values[o * c.ffn + f]) * h_mass[f];
        }
        ref[t * c.hidden + o] += weight * y;
        tol[t * c.hidden + o] += 1e-5 * weight * y_mass;
      }
    }
  test::expect_close(out, ref, tol, label);
}

TEST(CpuMoe, OddShapesAllDtypes) {
  uint64_t seed = 2000;
  for (int threads : {1, 2, 3}) {
    auto backend = make_cpu_backend(threads);
    for (DType dtype : {DType::kF32, DType::kBF16, DType::kF16})
      for (int64_t n : {1, 2, 4, 5, 31})
        for (auto [experts, k] : {std::pair<int64_t, int64_t>{2, 1}, {4, 2}, {9, 2}, {7, 3}})
          for (auto [hidden, ffn] : {std::pair<int64_t, int64_t>{7, 3}, {31, 13}, {64, 96}})
            run_moe_case(*backend, {n, hidden, ffn, experts, k, dtype, false}, ++seed);
  }
}

TEST(CpuMoe, SkewedBatchesMixGemvAndGemmExperts) {
  auto backend = make_cpu_backend(2);
  uint64_t seed = 3000;
  for (DType dtype : {DType::kBF16, DType::kF16})
    for (int64_t n : {7, 129}) run_moe_case(*backend, {n, 129, 200, 9, 2, dtype, true}, ++seed);
}

TEST(CpuMoe, RealShapes) {
  // Mixtral-shaped bench model (hidden 1024, ffn 2816, 8 experts top-2) at decode and a short prefill;
  // Qwen1.5-MoE-A2.7B-like 60 experts top-4 with ffn 1408 at decode.
  auto backend = make_cpu_backend(0);
  run_moe_case(*backend, {1, 1024, 2816, 8, 2, DType::kBF16, false}, 4001);
  run_moe_case(*backend, {6, 1024, 2816, 4, 2, DType::kBF16, false}, 4002);
  run_moe_case(*backend, {2, 2048, 1408, 61, 4, DType::kBF16, false}, 4003);
}

TEST(CpuMoe, NoTokens) {
  auto backend = make_cpu_backend(2);
  Routing routing;
  routing.num_tokens = 0;
  routing.top_k = 2;
  std::vector<ExpertWeights> experts(4);
  GuardedF32 x({0, 16}), out({0, 16});
  backend->moe_experts(x.view(), routing, experts, out.view());
  EXPECT_TRUE(out.guards_intact());
}

TEST(CpuMoe, DeterministicAcrossRunsAndThreads) {
  std::mt19937_64 rng(11);
  int64_t n = 37, hidden = 96, ffn = 80;
  RandomTensor x = test::random_tensor(rng, DType::kF32, {n, hidden});
  std::vector<RandomTensor> weights;
  std::vector<ExpertWeights> experts;
  for (int e = 0; e < 5; ++e) {
    weights.push_back(test::random_tensor(rng, DType::kBF16, {ffn, hidden}, 0.1));
    weights.push_back(test::random_tensor(rng, DType::kBF16, {ffn, hidden}, 0.1));
    weights.push_back(test::random_tensor(rng, DType::kBF16, {hidden, ffn}, 0.1));
  }
  for (int e = 0; e < 5; ++e) experts.push_back({weights[3 * e].view(), weights[3 * e + 1].view(), weights[3 * e + 2].view()});
  Routing routing;
  routing.num_tokens = n;
  routing.top_k = 2;
  for (int64_t t = 0; t < n; ++t) {
    routing.expert_ids.push_back(static_cast<int32_t>(t % 5));
    routing.expert_ids.push_back(static_cast<int32_t>((t * 3 + 1) % 5 == t % 5 ? (t + 1) % 5 : (t * 3 + 1) % 5));
    routing.weights.push_back(0.7f);
    routing.weights.push_back(0.3f);
  }
  std::vector<float> first;
  for (int threads : {1, 2, 3})
    for (int rep = 0; rep < 5; ++rep) {
      auto backend = make_cpu_backend(threads);
      GuardedF32 out({n, hidden});
      backend->moe_experts(x.view(), routing, experts, out.view());
      std::vector<float> got(out.data(), out.data() + out.numel());
      if (first.empty()) first = got;
      EXPECT_EQ(0, std::memcmp(first.data(), got.data(), got.size() * 4)) << "threads=" << threads << " rep=" << rep;
    }
}

}  // namespace
}  // namespace moex
