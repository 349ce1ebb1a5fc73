// Least recently used: evict the key whose last touch (access or insertion) is oldest.
#include <limits>

#include "moex/moe/policy/policies.h"

namespace moex {
namespace {

class LruPolicy final : public EvictionPolicy {
 public:
  explicit LruPolicy(const PolicyOptions& options)
      : num_experts_(options.num_experts),
        last_tick_(static_cast<size_t>(options.num_layers) * options.num_experts, 0) {}

  std::string_view name() const override { return "lru"; }
  void on_access(ExpertKey key, int64_t tick) override { last_tick_[index(key)] = tick; }
  void on_insert(ExpertKey key, int64_t tick) override { last_tick_[index(key)] = tick; }
  void on_evict(ExpertKey) override {}

  size_t choose_victim(std::span<const ExpertKey> candidates, int64_t) override {
    size_t best = 0;
    int64_t best_tick = std::numeric_limits<int64_t>::max();
    for (size_t idx = 0; idx < candidates.size(); ++idx) {
      int64_t tick = last_tick_[index(candidates[idx])];
      if (tick < best_tick) best_tick = tick, best = idx;
    }
    return best;
  }

 private:
  size_t index(ExpertKey key) const { return static_cast<size_t>(key.layer_idx) * num_experts_ + key.expert_idx; }

  int32_t num_experts_;
  std::vector<int64_t> last_tick_;
};

}  // namespace

std::unique_ptr<EvictionPolicy> make_lru_policy(const PolicyOptions& options) {
  return std::make_unique<LruPolicy>(options);
}

}  // namespace moex
