// Least frequently used with counts kept since the start (not reset on eviction, so an expert that
// was popular keeps its rank when it comes back); ties go to the least recently used.
#include "moex/moe/policy/policies.h"

namespace moex {
namespace {

class LfuPolicy final : public EvictionPolicy {
 public:
  explicit LfuPolicy(const PolicyOptions& options)
      : num_experts_(options.num_experts),
        count_(static_cast<size_t>(options.num_layers) * options.num_experts, 0),
        last_tick_(count_.size(), 0) {}

  std::string_view name() const override { return "lfu"; }
  void on_access(ExpertKey key, int64_t tick) override {
    ++count_[index(key)];
    last_tick_[index(key)] = tick;
  }
  // A prefetch does not count as a use: only demand accesses say how popular an expert is.
  void on_insert(ExpertKey key, int64_t tick) override { last_tick_[index(key)] = tick; }
  void on_evict(ExpertKey) override {}

  // TinyLFU's admission rule: a missed key displaces the least frequently used resident only when it has been
  // used more often (this use included); otherwise it is run outside the cache.
  bool admit(ExpertKey key, ExpertKey victim, int64_t) override { return count_[index(key)] + 1 > count_[index(victim)]; }

  size_t choose_victim(std::span<const ExpertKey> candidates, int64_t) override {
    size_t best = 0;
    for (size_t idx = 1; idx < candidates.size(); ++idx) {
      size_t a = index(candidates[idx]);
      size_t b = index(candidates[best]);
      if (count_[a] < count_[b] || (count_[a] == count_[b] && last_tick_[a] < last_tick_[b])) best = idx;
    }
    return best;
  }

 private:
  size_t index(ExpertKey key) const { return static_cast<size_t>(key.layer_idx) * num_experts_ + key.expert_idx; }

  int32_t num_experts_;
  std::vector<int64_t> count_;
  std::vector<int64_t> last_tick_;
};

}  // namespace

std::unique_ptr<EvictionPolicy> make_lfu_policy(const PolicyOptions& options) {
  return std::make_unique<LfuPolicy>(options);
}

}  // namespace moex
