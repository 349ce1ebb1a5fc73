// Predictors on synthetic routing whose answer is known, and the registry.
#include <gtest/gtest.h>

#include "moex/core/error.h"
#include "moex/moe/predictor/expert_predictor.h"

namespace moex {
namespace {

PredictorOptions options(int32_t num_layers, int32_t num_experts, int32_t top_k) {
  PredictorOptions o;
  o.num_layers = num_layers;
  o.num_experts = num_experts;
  o.top_k = top_k;
  return o;
}

std::vector<int32_t> top(ExpertPredictor& predictor, int32_t target_layer, size_t count) {
  std::vector<ScoredExpert> scored;
  predictor.predict(target_layer, &scored);
  std::vector<int32_t> ids;
  for (size_t idx = 0; idx < scored.size() && idx < count; ++idx) ids.push_back(scored[idx].expert_idx);
  return ids;
}

void observe(ExpertPredictor& predictor, int32_t layer_idx, std::vector<int32_t> ids, std::vector<float> weights = {}) {
  predictor.observe(layer_idx, ids, weights);
}

TEST(Predictors, FrequencyRanksByCountPerLayer) {
  auto predictor = make_expert_predictor("frequency", options(2, 4, 1));
  EXPECT_TRUE(top(*predictor, 0, 4).empty());
  for (int32_t id : {3, 3, 1, 3, 1, 2}) {
    observe(*predictor, 0, {id});
    observe(*predictor, 1, {0});
  }
  EXPECT_EQ(top(*predictor, 0, 4), (std::vector<int32_t>{3, 1, 2}));
  EXPECT_EQ(top(*predictor, 1, 4), (std::vector<int32_t>{0}));
}

TEST(Predictors, StridePredictsTheLatestChoiceByGateWeight) {
  auto predictor = make_expert_predictor("stride", options(2, 8, 2));
  observe(*predictor, 0, {5, 2}, {0.3f, 0.7f});
  observe(*predictor, 1, {1, 6}, {0.6f, 0.4f});
  EXPECT_EQ(top(*predictor, 0, 2), (std::vector<int32_t>{2, 5}));  // next token's layer 0
  observe(*predictor, 0, {4, 2}, {0.8f, 0.2f});
  EXPECT_EQ(top(*predictor, 1, 2), (std::vector<int32_t>{1, 6}));  // this token's layer 1: last token's
  EXPECT_EQ(top(*predictor, 0, 2), (std::vector<int32_t>{4, 2}));
  predictor->begin_request();
  EXPECT_TRUE(top(*predictor, 0, 2).empty());
  EXPECT_NE(make_expert_predictor("recency", options(2, 8, 2)), nullptr);
}

TEST(Predictors, AffinityLearnsLayerToLayerTransitions) {
  // Layer 1 always picks expert (layer-0 expert + 1) % 4, layer 0 cycles.
  auto predictor = make_expert_predictor("affinity", options(2, 4, 1));
  for (int token = 0; token < 12; ++token) {
    observe(*predictor, 0, {token % 4});
    observe(*predictor, 1, {(token % 4 + 1) % 4});
  }
  observe(*predictor, 0, {2});
  EXPECT_EQ(top(*predictor, 1, 1), (std::vector<int32_t>{3}));
  // Two layers ahead (layer 0 of the next token): layer 1 -> next layer 0 transitions, chained.
  // Layer 1 = x+1 is followed by layer 0 = (x+1) % 4, so from layer-0 expert 2: 3 then 3.
  EXPECT_EQ(top(*predictor, 0, 1), (std::vector<int32_t>{3}));
}

// Layer 2 repeats layer 0's expert; layers 0 and 1 are noise, independent from token to token. Affinity, which
// chains layer-to-layer transitions, cannot see past layer 1, and the previous token says nothing; naive Bayes
// over earlier layers takes layer 0 as a feature of layer 2.
TEST(Predictors, BayesLearnsFromLayersFurtherBack) {
  auto bayes = make_expert_predictor("bayes", options(3, 8, 1));
  auto affinity = make_expert_predictor("affinity", options(3, 8, 1));
  uint32_t noise = 12345;
  auto route = [&](bool score, int* bayes_right, int* affinity_right) {
    noise = noise * 1664525u + 1013904223u;
    const int32_t first = static_cast<int32_t>(noise >> 29);
    noise = noise * 1664525u + 1013904223u;
    for (ExpertPredictor* p : {bayes.get(), affinity.get()}) {
      observe(*p, 0, {first});
      observe(*p, 1, {static_cast<int32_t>(noise >> 29)});
    }
    if (score) {
      *bayes_right += top(*bayes, 2, 1) == std::vector<int32_t>{first};
      *affinity_right += top(*affinity, 2, 1) == std::vector<int32_t>{first};
    }
    for (ExpertPredictor* p : {bayes.get(), affinity.get()}) observe(*p, 2, {first});
  };
  int bayes_right = 0, affinity_right = 0;
  for (int token = 0; token < 400; ++token) route(false, nullptr, nullptr);
  for (int token = 0; token < 100; ++token) route(true, &bayes_right, &affinity_right);
  EXPECT_GE(bayes_right, 95);
  EXPECT_LE(affinity_right, 50);
}

// Every layer picks (token + layer) % 8. Predicting the next token's layer 0 after a whole token has run, no
// earlier layer of that token is known: the current token's layer 0 (the previous token's, for the next one)
// is the feature. Before anything is observed, and after begin_request, there is no opinion.
TEST(Predictors, BayesPredictsTheNextTokenFromThisOne) {
  auto predictor = make_expert_predictor("bayes", options(4, 8, 1));
  EXPECT_TRUE(top(*predictor, 0, 1).empty());
  for (int token = 0; token < 64; ++token)
    for (int32_t layer = 0; layer < 4; ++layer) observe(*predictor, layer, {(token + layer) % 8});
  // The last token was 63: its layer 0 chose 7, so the next token's layer 0 chooses 0; its layer 3 chose 2, so
  // the next token's layer 3 chooses 3 (this token's layers 0-2 are not the next token's earlier layers).
  EXPECT_EQ(top(*predictor, 0, 1), (std::vector<int32_t>{0}));
  EXPECT_EQ(top(*predictor, 3, 1), (std::vector<int32_t>{3}));
  // This token's later layers, mid-token: layer 0 of token 64 chose 0, so layer 3 chooses 3.
  observe(*predictor, 0, {0});
  EXPECT_EQ(top(*predictor, 3, 1), (std::vector<int32_t>{3}));
  predictor->begin_request();
  EXPECT_TRUE(top(*predictor, 0, 1).empty());
  // DeepSeek-V3's shape: no earlier layer as a feature, so the tables stay bounded; it still predicts.
  auto wide = make_expert_predictor("bayes", options(58, 256, 8));
  observe(*wide, 0, {1, 2, 3, 4, 5, 6, 7, 8});
  observe(*wide, 1, {9, 10, 11, 12, 13, 14, 15, 16});
  observe(*wide, 0, {1, 2, 3, 4, 5, 6, 7, 8});
  EXPECT_EQ(top(*wide, 1, 8), (std::vector<int32_t>{9, 10, 11, 12, 13, 14, 15, 16}));
}

TEST(Predictors, EamMatchesTheMostSimilarPastRequest) {
  // Two past request types: A uses experts {0} everywhere, B uses {1} at layer 0 and {3} at layer 1.
  auto predictor = make_expert_predictor("eam", options(2, 4, 1));
  auto request = [&](int32_t first, int32_t second, int tokens) {
    predictor->begin_request();
    for (int token = 0; token < tokens; ++token) {
      observe(*predictor, 0, {first});
      observe(*predictor, 1, {second});
    }
    predictor->end_request();
  };
  request(0, 0, 5);
  request(1, 3, 5);
  // A new request that starts like B: layer 1 should come out as 3, from B's matrix.
  predictor->begin_request();
  observe(*predictor, 0, {1});
  EXPECT_EQ(top(*predictor, 1, 1), (std::vector<int32_t>{3}));
  // Own counts join in: layer 0's own activation of 1 ranks first.
  EXPECT_EQ(top(*predictor, 0, 1), (std::vector<int32_t>{1}));
}

TEST(Predictors, PregateUsesLookaheadLogitsUntilTheLayerRuns) {
  auto predictor = make_expert_predictor("pregate", options(3, 4, 2));
  EXPECT_TRUE(top(*predictor, 1, 2).empty());
  std::vector<float> logits = {0.5f, -1.0f, 2.0f, 1.0f};
  predictor->observe_lookahead_logits(1, logits);
  EXPECT_EQ(top(*predictor, 1, 2), (std::vector<int32_t>{2, 3}));
  std::vector<ScoredExpert> scored;
  predictor->predict(1, &scored);
  double total = 0;
  for (const ScoredExpert& s : scored) total += s.score;
  EXPECT_NEAR(total, 1.0, 1e-9);  // softmax
  observe(*predictor, 1, {2, 3});
  EXPECT_TRUE(top(*predictor, 1, 2).empty());  // consumed
}

TEST(Predictors, RegistryRejectsUnknownNamesAndBadShapes) {
  try {
    make_expert_predictor("oracle", options(2, 4, 1));
    FAIL() << "expected UsageError";
  } catch (const UsageError& e) {
    EXPECT_STREQ(e.what(),
                 "unknown expert predictor \"oracle\"; expected one of: frequency, stride, recency, affinity, eam, "
                 "bayes, pregate");
  }
  EXPECT_THROW(make_expert_predictor("frequency", options(2, 4, 5)), UsageError);
  // bayes' count tables are layers x experts^2 per feature group: 64 layers of 512 experts would need 33.6 M cells.
  EXPECT_THROW(make_expert_predictor("bayes", options(64, 512, 8)), UsageError);
}

TEST(PredictionStats, PrecisionAndRecall) {
  PredictionStats stats;
  stats.add(std::vector<int32_t>{1, 2, 3}, std::vector<int32_t>{2, 4});
  stats.add(std::vector<int32_t>{}, std::vector<int32_t>{5, 6});
  EXPECT_EQ(stats.num_correct, 1);
  EXPECT_DOUBLE_EQ(stats.precision(), 1.0 / 3);
  EXPECT_DOUBLE_EQ(stats.recall(), 1.0 / 4);
}

}  // namespace
}  // namespace moex
