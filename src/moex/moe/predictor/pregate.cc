// Pre-gating (Pre-gated MoE, ProMoE): the engine applies the routers of the next layers to the current
// hidden state; the softmax of those logits predicts the experts those layers will pick. The residual
// stream changes little from layer to layer, which is why this beats any id-only predictor on real
// models. A lookahead holds until its target layer runs; then the next one must come.
#include <algorithm>
#include <cmath>

#include "moex/core/error.h"
#include "moex/moe/predictor/predictors.h"

namespace moex {
namespace {

class PregatePredictor final : public ExpertPredictor {
 public:
  explicit PregatePredictor(const PredictorOptions& options)
      : num_experts_(options.num_experts),
        probs_(static_cast<size_t>(options.num_layers) * options.num_experts, 0.0),
        valid_(options.num_layers, 0) {}

  std::string_view name() const override { return "pregate"; }
  void begin_request() override { std::fill(valid_.begin(), valid_.end(), 0); }
  void observe(int32_t layer_idx, std::span<const int32_t>, std::span<const float>) override {
    valid_[layer_idx] = 0;
  }
  void observe_lookahead_logits(int32_t target_layer, std::span<const float> logits) override {
    MOEX_ASSERT(static_cast<int32_t>(logits.size()) == num_experts_, "pregate: {} logits for {} experts",
                logits.size(), num_experts_);
    float peak = *std::max_element(logits.begin(), logits.end());
    double total = 0;
    double* probs = &probs_[static_cast<size_t>(target_layer) * num_experts_];
    for (int32_t expert_idx = 0; expert_idx < num_experts_; ++expert_idx)
      total += probs[expert_idx] = std::exp(static_cast<double>(logits[expert_idx]) - peak);
    for (int32_t expert_idx = 0; expert_idx < num_experts_; ++expert_idx) probs[expert_idx] /= total;
    valid_[target_layer] = 1;
  }
  void predict(int32_t target_layer, std::vector<ScoredExpert>* out) override {
    out->clear();
    if (!valid_[target_layer]) return;
    ranked_experts(std::span<const double>(probs_).subspan(static_cast<size_t>(target_layer) * num_experts_,
                                                           num_experts_),
                   out);
  }

 private:
  int32_t num_experts_;
  std::vector<double> probs_;  // [layer][expert], softmax of the latest lookahead logits
  std::vector<uint8_t> valid_;
};

}  // namespace

std::unique_ptr<ExpertPredictor> make_pregate_predictor(const PredictorOptions& options) {
  return std::make_unique<PregatePredictor>(options);
}

}  // namespace moex
