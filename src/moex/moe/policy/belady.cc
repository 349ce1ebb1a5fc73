// Belady's offline optimum for demand loading: evict the key whose next demand use lies farthest in
// the future (never = infinitely far); with policy admission, also MIN's bypass rule (admit()). It needs the whole future access sequence, so it exists for
// the trace simulator only, as the bound the online policies are measured against.
#include <limits>

#include "moex/core/error.h"
#include "moex/moe/policy/policies.h"

namespace moex {
namespace {

class BeladyPolicy final : public EvictionPolicy {
 public:
  explicit BeladyPolicy(const PolicyOptions& options)
      : num_experts_(options.num_experts),
        future_(options.future_accesses),
        positions_(static_cast<size_t>(options.num_layers) * options.num_experts),
        next_(positions_.size(), 0) {
    for (size_t pos = 0; pos < future_.size(); ++pos) {
      ExpertKey key = future_[pos];
      MOEX_ASSERT(key.layer_idx >= 0 && key.layer_idx < options.num_layers && key.expert_idx >= 0 &&
                      key.expert_idx < options.num_experts,
                  "future access {} = ({}, {}) outside {} layers x {} experts", pos, key.layer_idx,
                  key.expert_idx, options.num_layers, options.num_experts);
      positions_[index(key)].push_back(static_cast<int64_t>(pos));
    }
  }

  std::string_view name() const override { return "belady"; }

  void on_access(ExpertKey key, int64_t) override {
    // The oracle is only right if the replay touches keys in exactly the order it was given.
    MOEX_ASSERT(cursor_ < future_.size() && future_[cursor_] == key,
                "belady: access {} is ({}, {}) but the future sequence says {}", cursor_, key.layer_idx,
                key.expert_idx,
                cursor_ < future_.size() ? fmt::format("({}, {})", future_[cursor_].layer_idx,
                                                       future_[cursor_].expert_idx)
                                         : std::string("end of sequence"));
    ++next_[index(key)];
    ++cursor_;
  }
  void on_insert(ExpertKey, int64_t) override {}
  void on_evict(ExpertKey) override {}

  // MIN with bypass: keep the key only if it is needed again before the victim (the one needed farthest ahead).
  // Every miss costs one read of host memory, copied or run on the host; this choice makes the fewest of them.
  bool admit(ExpertKey key, ExpertKey victim, int64_t) override {
    const std::vector<int64_t>& pos = positions_[index(key)];
    size_t after_this = next_[index(key)] + 1;  // the key's own access is not counted yet
    int64_t key_next = after_this < pos.size() ? pos[after_this] : std::numeric_limits<int64_t>::max();
    return key_next < next_use_of(victim);
  }

  size_t choose_victim(std::span<const ExpertKey> candidates, int64_t) override {
    size_t best = 0;
    int64_t best_next = -1;
    for (size_t idx = 0; idx < candidates.size(); ++idx) {
      int64_t next_use = next_use_of(candidates[idx]);
      if (next_use > best_next) best_next = next_use, best = idx;
    }
    return best;
  }

 private:
  size_t index(ExpertKey key) const { return static_cast<size_t>(key.layer_idx) * num_experts_ + key.expert_idx; }
  int64_t next_use_of(ExpertKey key) const {
    const std::vector<int64_t>& pos = positions_[index(key)];
    size_t next = next_[index(key)];
    return next < pos.size() ? pos[next] : std::numeric_limits<int64_t>::max();
  }

  int32_t num_experts_;
  std::vector<ExpertKey> future_;
  std::vector<std::vector<int64_t>> positions_;  // per key: its positions in future_, ascending
  std::vector<size_t> next_;                     // per key: index into positions_ of its next use
  size_t cursor_ = 0;
};

}  // namespace

std::unique_ptr<EvictionPolicy> make_belady_policy(const PolicyOptions& options) {
  if (options.future_accesses.empty())
    throw UsageError(
        "cache policy \"belady\" needs the future access sequence: it is the offline optimum, for the "
        "trace simulator only (use lru, lfu or activation in the engine)");
  return std::make_unique<BeladyPolicy>(options);
}

}  // namespace moex
