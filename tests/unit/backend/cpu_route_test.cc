// route(): expert ids compared exactly with a double-precision reference, weights closely. Logits sit
// on a 1/64 grid, so distinct logits give clearly distinct scores and equal logits give exact ties.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>

#include "backend_test_util.h"
#include "moex/backend/cpu/cpu_backend.h"

namespace moex {
namespace {

struct RouteCase {
  int64_t n, num_experts, top_k;
  RouterScoring scoring;
  bool normalize;
  std::string str() const {
    return fmt::format("route(n={},experts={},top_k={},scoring={},normalize={})", n, num_experts, top_k,
                       scoring == RouterScoring::kSoftmax ? "softmax" : "sigmoid", normalize);
  }
};

void reference_route(const std::vector<float>& logits, const RouteCase& c, std::vector<int32_t>* ids,
                     std::vector<double>* weights) {
  for (int64_t t = 0; t < c.n; ++t) {
    std::vector<double> score(static_cast<size_t>(c.num_experts));
    const float* row = logits.data() + t * c.num_experts;
    if (c.scoring == RouterScoring::kSoftmax) {
      double max = *std::max_element(row, row + c.num_experts), sum = 0.0;
      for (int64_t e = 0; e < c.num_experts; ++e) sum += (score[e] = std::exp(row[e] - max));
      for (double& s : score) s /= sum;
    } else {
      for (int64_t e = 0; e < c.num_experts; ++e) score[e] = 1.0 / (1.0 + std::exp(-static_cast<double>(row[e])));
    }
    std::vector<int32_t> order(static_cast<size_t>(c.num_experts));
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return score[a] > score[b]; });
    double total = 0.0;
    for (int64_t j = 0; j < c.top_k; ++j) total += score[order[j]];
    for (int64_t j = 0; j < c.top_k; ++j) {
      ids->push_back(order[j]);
      weights->push_back(c.normalize ? score[order[j]] / total : score[order[j]]);
    }
  }
}

TEST(CpuRoute, TopKMatchesReferenceExactly) {
  auto backend = make_cpu_backend(2);
  uint64_t seed = 900;
  // 8/2: Mixtral; 60/4: Qwen1.5-MoE-A2.7B; 64/8: OLMoE; 128/8: Qwen3-30B-A3B; 7/3 and 1/1 odd ones.
  std::vector<RouteCase> cases;
  for (auto [experts, k] : {std::pair<int64_t, int64_t>{8, 2}, {60, 4}, {64, 8}, {128, 8}, {7, 3}, {1, 1}, {3, 3}})
    for (RouterScoring scoring : {RouterScoring::kSoftmax, RouterScoring::kSigmoid})
      for (bool normalize : {true, false})
        for (int64_t n : {1, 3, 129}) cases.push_back({n, experts, k, scoring, normalize});
  for (const RouteCase& c : cases) {
    std::string label = c.str() + fmt::format(" seed={}", ++seed);
    std::mt19937_64 rng(seed);
    std::vector<float> logits(static_cast<size_t>(c.n * c.num_experts));
    // Coarse values (many exact ties) on odd seeds, fine ones on even seeds.
    int64_t levels = seed % 2 ? 9 : 1000;
    for (float& l : logits) l = static_cast<float>(static_cast<int64_t>(rng() % levels) - levels / 2) / 64.0f;
    Routing routing;
    backend->route(TensorView(logits.data(), DType::kF32, {c.n, c.num_experts}), c.top_k, c.scoring, c.normalize,
                   &routing);
    std::vector<int32_t> ref_ids;
    std::vector<double> ref_weights;
    reference_route(logits, c, &ref_ids, &ref_weights);
    ASSERT_EQ(routing.num_tokens, c.n) << label;
    ASSERT_EQ(routing.top_k, c.top_k) << label;
    ASSERT_EQ(routing.expert_ids, ref_ids) << label;
    ASSERT_EQ(routing.weights.size(), ref_weights.size()) << label;
    for (size_t i = 0; i < ref_weights.size(); ++i)
      EXPECT_NEAR(routing.weights[i], ref_weights[i], 1e-6 * ref_weights[i] + 1e-7) << label << " slot " << i;
  }
}

TEST(CpuRoute, TiesPickLowerExpertId) {
  auto backend = make_cpu_backend(1);
  std::vector<float> logits = {0.5f, 2.0f, 2.0f, -1.0f, 2.0f, 0.5f};
  Routing routing;
  backend->route(TensorView(logits.data(), DType::kF32, {1, 6}), 4, RouterScoring::kSoftmax, true, &routing);
  EXPECT_EQ(routing.expert_ids, (std::vector<int32_t>{1, 2, 4, 0}));
  backend->route(TensorView(logits.data(), DType::kF32, {1, 6}), 4, RouterScoring::kSigmoid, false, &routing);
  EXPECT_EQ(routing.expert_ids, (std::vector<int32_t>{1, 2, 4, 0}));
}

TEST(CpuRoute, Deterministic) {
  auto backend = make_cpu_backend(2);
  std::mt19937_64 rng(5);
  std::vector<float> logits(31 * 60);
  for (float& l : logits) l = test::uniform_sym(rng, 2.0f);
  Routing first;
  backend->route(TensorView(logits.data(), DType::kF32, {31, 60}), 4, RouterScoring::kSoftmax, false, &first);
  for (int rep = 0; rep < 5; ++rep) {
    Routing again;
    backend->route(TensorView(logits.data(), DType::kF32, {31, 60}), 4, RouterScoring::kSoftmax, false, &again);
    EXPECT_EQ(again.expert_ids, first.expert_ids);
    EXPECT_EQ(0, std::memcmp(again.weights.data(), first.weights.data(), first.weights.size() * 4));
  }
}

}  // namespace
}  // namespace moex
