// The most recent router decision of every layer of one sequence: what stride/recency and affinity
// predictors read. Layer l holds this token's choice once l has run, the previous token's before.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

namespace moex {

class LatestRouting {
 public:
  explicit LatestRouting(int32_t num_layers) : ids_(num_layers), weights_(num_layers) {}

  void observe(int32_t layer_idx, std::span<const int32_t> expert_ids, std::span<const float> weights) {
    ids_[layer_idx].assign(expert_ids.begin(), expert_ids.end());
    weights_[layer_idx].assign(weights.begin(), weights.end());
    last_layer_ = layer_idx;
  }
  void clear() {
    for (auto& ids : ids_) ids.clear();
    for (auto& weights : weights_) weights.clear();
    last_layer_ = -1;
  }

  std::span<const int32_t> ids(int32_t layer_idx) const { return ids_[layer_idx]; }
  // Gate weight of the rank-th choice; without weights, a rank-decreasing stand-in in (0, 1].
  double weight(int32_t layer_idx, size_t rank) const {
    const std::vector<float>& w = weights_[layer_idx];
    if (rank < w.size() && w[rank] > 0) return w[rank];
    return 1.0 / static_cast<double>(rank + 1);
  }
  int32_t last_layer() const { return last_layer_; }

 private:
  std::vector<std::vector<int32_t>> ids_;
  std::vector<std::vector<float>> weights_;
  int32_t last_layer_ = -1;
};

}  // namespace moex
