// CUDA router against a host reference with the same selection rule (highest logit, ties to the lower
// expert id): ids must match exactly, weights to fp32 rounding. Includes forced ties.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>

#include "cuda_test_util.h"

namespace moex::cuda_test {
namespace {

void reference_route(const std::vector<float>& logits, int64_t n, int64_t experts, int64_t top_k, bool sigmoid,
                     bool normalize, std::vector<int32_t>* ids, std::vector<double>* weights) {
  for (int64_t t = 0; t < n; ++t) {
    const float* row = logits.data() + t * experts;
    std::vector<int32_t> order(static_cast<size_t>(experts));
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return row[a] > row[b]; });
    double mx = *std::max_element(row, row + experts), denom = 0;
    for (int64_t e = 0; e < experts; ++e) denom += std::exp(double(row[e]) - mx);
    double sum = 0;
    std::vector<double> w(static_cast<size_t>(top_k));
    for (int64_t j = 0; j < top_k; ++j) {
      double l = row[order[j]];
      w[j] = sigmoid ? 1.0 / (1.0 + std::exp(-l)) : std::exp(l - mx) / denom;
      sum += w[j];
      ids->push_back(order[j]);
    }
    for (int64_t j = 0; j < top_k; ++j) weights->push_back(normalize ? w[j] / sum : w[j]);
  }
}

TEST(CudaRouter, ExactIdsAndWeights) {
  MOEX_CUDA_BACKEND_OR_SKIP(backend);
  struct Case {
    int64_t experts, top_k;
  };
  // 8/2: Mixtral; 60/4: Qwen2-MoE; 64/8: OLMoE; 128/8: Qwen3-30B-A3B; 256/8: DeepSeek-sized; 3/1, 33/5: odd.
  for (Case c : {Case{8, 2}, Case{60, 4}, Case{64, 8}, Case{128, 8}, Case{256, 8}, Case{3, 1}, Case{33, 5}}) {
    for (int64_t n : {1, 3, 7, 31, 129}) {
      for (int mode = 0; mode < 4; ++mode) {
        bool sigmoid = mode & 1, normalize = mode & 2;
        std::mt19937 rng(static_cast<uint32_t>(c.experts * 1000 + n * 10 + mode));
        SCOPED_TRACE(testing::Message() << "route(experts=" << c.experts << ",k=" << c.top_k << ",n=" << n
                                        << ",sigmoid=" << sigmoid << ",normalize=" << normalize << ")");
        auto logits = random_floats(rng, static_cast<size_t>(n * c.experts), 2.f);
        // Force ties: round some rows to a coarse grid, make one row all equal.
        for (size_t i = 0; i < logits.size() / 2; ++i) logits[i] = std::round(logits[i]);
        std::fill(logits.begin(), logits.begin() + c.experts, 0.5f);
        GuardedTensor ld(*backend, {n, c.experts});
        ld.fill(logits);
        Routing routing;
        backend->route(ld.view(), c.top_k, sigmoid ? RouterScoring::kSigmoid : RouterScoring::kSoftmax, normalize,
                       &routing);
        std::vector<int32_t> ref_ids;
        std::vector<double> ref_w;
        reference_route(logits, n, c.experts, c.top_k, sigmoid, normalize, &ref_ids, &ref_w);
        ASSERT_EQ(routing.num_tokens, n);
        ASSERT_EQ(routing.top_k, c.top_k);
        EXPECT_EQ(routing.expert_ids, ref_ids);
        MOEX_EXPECT_CLOSE(routing.weights, ref_w, 1e-6);
      }
    }
  }
}

}  // namespace
}  // namespace moex::cuda_test
