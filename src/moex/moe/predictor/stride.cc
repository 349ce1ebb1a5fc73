// Stride / recency (ProMoE's observation): a token tends to reuse the experts the previous token chose
// at the same layer, so predict the layer's latest choice, ranked by its gate weights.
#include <algorithm>

#include "moex/moe/predictor/latest_routing.h"
#include "moex/moe/predictor/predictors.h"

namespace moex {
namespace {

class StridePredictor final : public ExpertPredictor {
 public:
  explicit StridePredictor(const PredictorOptions& options)
      : latest_(options.num_layers), scores_(options.num_experts, 0.0) {}

  std::string_view name() const override { return "stride"; }
  // Requests are independent: the previous request's last token says nothing about this one.
  void begin_request() override { latest_.clear(); }
  void observe(int32_t layer_idx, std::span<const int32_t> expert_ids, std::span<const float> weights) override {
    latest_.observe(layer_idx, expert_ids, weights);
  }
  void predict(int32_t target_layer, std::vector<ScoredExpert>* out) override {
    std::fill(scores_.begin(), scores_.end(), 0.0);
    std::span<const int32_t> ids = latest_.ids(target_layer);
    for (size_t rank = 0; rank < ids.size(); ++rank) scores_[ids[rank]] = latest_.weight(target_layer, rank);
    ranked_experts(scores_, out);
  }

 private:
  LatestRouting latest_;
  std::vector<double> scores_;
};

}  // namespace

std::unique_ptr<ExpertPredictor> make_stride_predictor(const PredictorOptions& options) {
  return std::make_unique<StridePredictor>(options);
}

}  // namespace moex
