// Cross-layer affinity (ExFlow's observation: a token's experts at layer l say much about its experts
// at layer l+1). Learns transition counts between consecutive layers of the same token online (the
// last layer links to layer 0 of the next token) and predicts a target several layers ahead by
// chaining the transitions from the latest observed layer.
#include <algorithm>

#include "moex/moe/predictor/latest_routing.h"
#include "moex/moe/predictor/predictors.h"

namespace moex {
namespace {

class AffinityPredictor final : public ExpertPredictor {
 public:
  explicit AffinityPredictor(const PredictorOptions& options)
      : num_layers_(options.num_layers),
        num_experts_(options.num_experts),
        latest_(options.num_layers),
        transitions_(static_cast<size_t>(options.num_layers) * options.num_experts * options.num_experts, 0.0),
        dist_(options.num_experts),
        next_(options.num_experts) {}

  std::string_view name() const override { return "affinity"; }
  void begin_request() override { latest_.clear(); }

  void observe(int32_t layer_idx, std::span<const int32_t> expert_ids, std::span<const float> weights) override {
    int32_t prev_layer = (layer_idx + num_layers_ - 1) % num_layers_;
    bool has_prev = latest_.last_layer() == prev_layer && !latest_.ids(prev_layer).empty();
    if (has_prev)
      for (int32_t from : latest_.ids(prev_layer))
        for (int32_t to : expert_ids) transitions_[cell(layer_idx, from, to)] += 1.0;
    latest_.observe(layer_idx, expert_ids, weights);
  }

  void predict(int32_t target_layer, std::vector<ScoredExpert>* out) override {
    int32_t layer_idx = latest_.last_layer();
    out->clear();
    if (layer_idx < 0) return;
    // Distribution over the latest layer's experts: its actual choice.
    std::fill(dist_.begin(), dist_.end(), 0.0);
    std::span<const int32_t> ids = latest_.ids(layer_idx);
    for (size_t rank = 0; rank < ids.size(); ++rank) dist_[ids[rank]] = latest_.weight(layer_idx, rank);
    int32_t steps = ((target_layer - layer_idx) % num_layers_ + num_layers_) % num_layers_;
    if (steps == 0) steps = num_layers_;
    for (int32_t step = 1; step <= steps; ++step) {
      int32_t to_layer = (layer_idx + step) % num_layers_;
      std::fill(next_.begin(), next_.end(), 0.0);
      for (int32_t from = 0; from < num_experts_; ++from) {
        if (dist_[from] <= 0) continue;
        const double* row = &transitions_[cell(to_layer, from, 0)];
        double total = 0;
        for (int32_t to = 0; to < num_experts_; ++to) total += row[to];
        if (total <= 0) continue;
        for (int32_t to = 0; to < num_experts_; ++to) next_[to] += dist_[from] * row[to] / total;
      }
      dist_.swap(next_);
    }
    ranked_experts(dist_, out);
  }

 private:
  // transitions_[to_layer][from_expert at to_layer - 1][to_expert]
  size_t cell(int32_t to_layer, int32_t from, int32_t to) const {
    return (static_cast<size_t>(to_layer) * num_experts_ + from) * num_experts_ + to;
  }

  int32_t num_layers_;
  int32_t num_experts_;
  LatestRouting latest_;
  std::vector<double> transitions_;
  std::vector<double> dist_;
  std::vector<double> next_;
};

}  // namespace

std::unique_ptr<ExpertPredictor> make_affinity_predictor(const PredictorOptions& options) {
  return std::make_unique<AffinityPredictor>(options);
}

}  // namespace moex
