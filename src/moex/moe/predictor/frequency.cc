// Per-layer frequency prior: how often each expert of the layer was chosen since the start (all
// requests). Cheap and stable; it wins only where routing is skewed.
#include "moex/moe/predictor/predictors.h"

namespace moex {
namespace {

class FrequencyPredictor final : public ExpertPredictor {
 public:
  explicit FrequencyPredictor(const PredictorOptions& options)
      : num_experts_(options.num_experts),
        counts_(static_cast<size_t>(options.num_layers) * options.num_experts, 0.0) {}

  std::string_view name() const override { return "frequency"; }
  void observe(int32_t layer_idx, std::span<const int32_t> expert_ids, std::span<const float>) override {
    for (int32_t expert_idx : expert_ids) counts_[row(layer_idx) + expert_idx] += 1.0;
  }
  void predict(int32_t target_layer, std::vector<ScoredExpert>* out) override {
    ranked_experts(std::span<const double>(counts_).subspan(row(target_layer), num_experts_), out);
  }

 private:
  size_t row(int32_t layer_idx) const { return static_cast<size_t>(layer_idx) * num_experts_; }

  int32_t num_experts_;
  std::vector<double> counts_;  // [layer][expert]
};

}  // namespace

std::unique_ptr<ExpertPredictor> make_frequency_predictor(const PredictorOptions& options) {
  return std::make_unique<FrequencyPredictor>(options);
}

}  // namespace moex
