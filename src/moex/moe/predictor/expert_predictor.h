// Expert predictors: from the routing seen so far, score the experts a layer will select the next time
// it runs, so the prefetcher can copy them ahead of use. One interface and a registry by name; pure
// logic over expert ids, like the cache policies, so the trace simulator and the engine share them.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace moex {

struct ScoredExpert {
  int32_t expert_idx = 0;
  double score = 0;
};

struct PredictorOptions {
  int32_t num_layers = 0;
  int32_t num_experts = 0;
  int32_t top_k = 0;
  // eam: how many past requests' activation matrices to keep (oldest dropped first).
  int32_t eam_capacity = 512;
};

// One predictor follows one sequence: observe() is called for layers 0..L-1 of a token, then again
// from layer 0 for the next token. Not thread-safe.
class ExpertPredictor {
 public:
  virtual ~ExpertPredictor() = default;
  virtual std::string_view name() const = 0;

  virtual void begin_request() {}
  virtual void end_request() {}
  // The router of layer_idx chose expert_ids (best first) with gate weights (same length, or empty).
  virtual void observe(int32_t layer_idx, std::span<const int32_t> expert_ids, std::span<const float> weights) = 0;
  // Pre-gating: router logits [num_experts] that the engine got by applying target_layer's router to
  // the current hidden state, ahead of time. Predictors that do not use them ignore them.
  virtual void observe_lookahead_logits(int32_t target_layer, std::span<const float> logits) {
    (void)target_layer, (void)logits;
  }
  // Scores for the experts the next run of target_layer will select: this token's if target_layer
  // comes after the last observed layer, the next token's otherwise. Writes the experts with a
  // positive score, best first (ties: lower expert id); empty when the predictor has no opinion.
  virtual void predict(int32_t target_layer, std::vector<ScoredExpert>* out) = 0;
};

// Names: "frequency", "stride" (alias "recency"), "affinity", "eam", "bayes", "pregate". Throws UsageError on an
// unknown name, listing the known ones.
std::unique_ptr<ExpertPredictor> make_expert_predictor(std::string_view name, const PredictorOptions& options);
std::vector<std::string> expert_predictor_names();

// Sorts scores [num_experts] into *out: positive scores only, best first, ties to the lower id.
void ranked_experts(std::span<const double> scores, std::vector<ScoredExpert>* out);

// Precision/recall of predicted expert sets against the sets the router then chose.
struct PredictionStats {
  int64_t num_predicted = 0;
  int64_t num_actual = 0;
  int64_t num_correct = 0;

  void add(std::span<const int32_t> predicted, std::span<const int32_t> actual);
  double precision() const { return num_predicted ? static_cast<double>(num_correct) / num_predicted : 0.0; }
  double recall() const { return num_actual ? static_cast<double>(num_correct) / num_actual : 0.0; }
};

}  // namespace moex
