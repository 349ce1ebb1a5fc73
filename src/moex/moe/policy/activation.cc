// Activation-aware eviction (MoE-Infinity): rank resident experts by how often the current request
// has activated them (its expert activation matrix, EAM) and by how soon their layer runs again.
// The layer term only matters with a global budget: right after layer l runs, l is the layer needed
// last, while the layers just ahead (and, at the end of a token, the first layers) are needed first.
#include <algorithm>

#include "moex/moe/policy/policies.h"

namespace moex {
namespace {

// A since-start frequency share breaks ties between experts the request has not used yet; it is kept
// far below one activation so the request's own counts always dominate.
constexpr double kPriorWeight = 0.01;

class ActivationPolicy final : public EvictionPolicy {
 public:
  explicit ActivationPolicy(const PolicyOptions& options)
      : num_layers_(options.num_layers),
        num_experts_(options.num_experts),
        request_count_(static_cast<size_t>(options.num_layers) * options.num_experts, 0),
        total_count_(request_count_.size(), 0),
        layer_total_(options.num_layers, 0),
        last_tick_(request_count_.size(), 0) {}

  std::string_view name() const override { return "activation"; }

  void on_access(ExpertKey key, int64_t tick) override {
    size_t idx = index(key);
    ++request_count_[idx];
    ++total_count_[idx];
    ++layer_total_[key.layer_idx];
    last_tick_[idx] = tick;
    current_layer_ = key.layer_idx;
  }
  void on_insert(ExpertKey key, int64_t tick) override { last_tick_[index(key)] = tick; }
  void on_evict(ExpertKey) override {}
  void on_request_begin() override { std::fill(request_count_.begin(), request_count_.end(), 0); }

  size_t choose_victim(std::span<const ExpertKey> candidates, int64_t) override {
    size_t best = 0;
    double best_priority = priority(candidates[0]);
    for (size_t idx = 1; idx < candidates.size(); ++idx) {
      double p = priority(candidates[idx]);
      if (p < best_priority ||
          (p == best_priority && last_tick_[index(candidates[idx])] < last_tick_[index(candidates[best])]))
        best_priority = p, best = idx;
    }
    return best;
  }

 private:
  size_t index(ExpertKey key) const { return static_cast<size_t>(key.layer_idx) * num_experts_ + key.expert_idx; }

  double priority(ExpertKey key) const {
    size_t idx = index(key);
    double prior = layer_total_[key.layer_idx] > 0
                       ? kPriorWeight * static_cast<double>(total_count_[idx]) / layer_total_[key.layer_idx]
                       : 0.0;
    // Layers until this one runs again: 0 for the next layer, num_layers - 1 for the current one.
    int32_t distance = ((key.layer_idx - current_layer_ - 1) % num_layers_ + num_layers_) % num_layers_;
    double proximity = 1.0 - static_cast<double>(distance) / num_layers_;
    return (static_cast<double>(request_count_[idx]) + prior + kPriorWeight) * proximity;
  }

  int32_t num_layers_;
  int32_t num_experts_;
  std::vector<int64_t> request_count_;  // the current request's EAM, [layer][expert]
  std::vector<int64_t> total_count_;
  std::vector<int64_t> layer_total_;
  std::vector<int64_t> last_tick_;
  int32_t current_layer_ = 0;
};

}  // namespace

std::unique_ptr<EvictionPolicy> make_activation_policy(const PolicyOptions& options) {
  return std::make_unique<ActivationPolicy>(options);
}

}  // namespace moex
