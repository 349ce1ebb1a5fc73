#include "moex/moe/offload_provider.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>

#include "moex/core/error.h"
#include "moex/moe/policy/eviction_policy.h"

namespace moex {
namespace {
std::string human_bytes(int64_t bytes) {
  const char* units[] = {"bytes", "KiB", "MiB", "GiB", "TiB"};
  double value = static_cast<double>(bytes);
  int unit = 0;
  while (value >= 1024 && unit < 4) {
    value /= 1024;
    ++unit;
  }
  return unit == 0 ? fmt::format("{} bytes", bytes) : fmt::format("{:.1f} {}", value, units[unit]);
}
}  // namespace

OffloadingExpertProvider::OffloadingExpertProvider(std::unique_ptr<ExpertStore> store, int64_t top_k,
                                                   const OffloadConfig& config)
    : store_(std::move(store)), top_k_(top_k), config_(config) {
  const int32_t num_layers = store_->num_layers();
  MOEX_ASSERT(num_layers > 0, "offloading a model without MoE layers");
  const int32_t num_experts = store_->num_experts(0);
  int64_t max_expert_bytes = 0;
  ExpertCacheConfig cache_config;
  cache_config.num_layers = num_layers;
  cache_config.num_experts = num_experts;
  cache_config.scope = config.scope;
  for (int32_t layer_idx = 0; layer_idx < num_layers; ++layer_idx) {
    cache_config.expert_bytes.push_back(store_->expert_bytes(layer_idx));
    max_expert_bytes = std::max(max_expert_bytes, store_->expert_bytes(layer_idx));
  }
  int64_t budget = config.budget_bytes;
  if (config.scope == CacheScope::kPerLayer) budget /= num_layers;
  const int64_t minimum = top_k * max_expert_bytes * (config.scope == CacheScope::kPerLayer ? num_layers : 1);
  if (config.budget_bytes < minimum)
    throw BudgetError(fmt::format(
        "the expert memory budget of {} cannot hold one layer's top-{} experts; the minimum is {} ({} bytes){}",
        human_bytes(config.budget_bytes), top_k, human_bytes(minimum), minimum,
        config.scope == CacheScope::kPerLayer ? " with per-layer budgets" : ""));
  cache_config.capacity_bytes = budget;
  PolicyOptions policy_options;
  policy_options.num_layers = num_layers;
  policy_options.num_experts = num_experts;
  cache_ = std::make_unique<ExpertCache>(cache_config, make_eviction_policy(config.policy, policy_options));
  seen_.assign(static_cast<size_t>(num_experts), 0);
  if (config.predictor != "none") {
    PredictorOptions predictor_options;
    predictor_options.num_layers = num_layers;
    predictor_options.num_experts = num_experts;
    predictor_options.top_k = static_cast<int32_t>(top_k);
    predictor_ = make_expert_predictor(config.predictor, predictor_options);
  }
  last_prediction_.resize(static_cast<size_t>(num_layers));
}

void OffloadingExpertProvider::settle_prefetches(int32_t layer_idx, std::span<const ExpertKey> wanted) {
  size_t kept = 0;
  for (const ExpertKey& key : outstanding_) {
    if (key.layer_idx != layer_idx) {
      outstanding_[kept++] = key;
      continue;
    }
    const bool is_wanted = std::find(wanted.begin(), wanted.end(), key) != wanted.end();
    if (is_wanted || store_->ready(key)) {
      auto start = std::chrono::steady_clock::now();
      store_->wait(key);  // a wanted copy still in flight stalls this step
      stats_.stall_ms += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
      cache_->unpin(key);
    } else {  // stale: this layer runs now without it
      store_->cancel(key);
      cache_->unpin(key);
      cache_->erase(key);
    }
  }
  outstanding_.resize(kept);
}

void OffloadingExpertProvider::observe_and_prefetch(int32_t layer_idx, const Routing& routing) {
  if (!predictor_ || routing.num_tokens == 0) return;
  // The predictor follows one token through the layers; in a prefill the last token is the one the
  // next decode step continues from.
  const int64_t last = routing.num_tokens - 1;
  predictor_->observe(layer_idx, std::span<const int32_t>(routing.expert_ids).subspan(last * routing.top_k, routing.top_k),
                      std::span<const float>(routing.weights).subspan(last * routing.top_k, routing.top_k));
  const int32_t num_layers = store_->num_layers();
  // With CPU execution of misses, PCIe carries only the best guess per layer: a copied expert takes
  // ~1.7x as long as a CPU read of it, so one copy per layer ahead plus the CPU for the rest balances
  // the two paths at batch 1; prefetching every guess would leave the CPU idle behind a full link.
  const int32_t per_layer = config_.prefetch_per_layer > 0 ? config_.prefetch_per_layer
                            : config_.cpu_experts         ? 1
                                                          : static_cast<int32_t>(top_k_);
  for (int32_t ahead = 1; ahead <= config_.lookahead_layers; ++ahead) {
    const int32_t target = (layer_idx + ahead) % num_layers;
    predictor_->predict(target, &scored_);
    auto& predicted = last_prediction_[target];
    predicted.clear();
    for (const ScoredExpert& guess : scored_) {
      if (static_cast<int32_t>(predicted.size()) >= per_layer) break;
      predicted.push_back(guess.expert_idx);
      const ExpertKey key{target, guess.expert_idx};
      if (cache_->contains(key)) continue;
      evicted_.clear();
      if (cache_->insert(key, &evicted_) != InsertOutcome::kInserted) break;  // everything else is pinned
      for (const ExpertKey& gone : evicted_) store_->free(gone);
      store_->load_async(key);
      cache_->pin(key);
      outstanding_.push_back(key);
      ++stats_.prefetch_issued;
    }
  }
}

void OffloadingExpertProvider::acquire(int32_t layer_idx, const Routing& routing, const TensorView& /*hidden*/,
                                       std::vector<ExpertWeights>* experts) {
  if (!request_open_) {
    cache_->begin_request();
    if (predictor_) predictor_->begin_request();
    request_open_ = true;
  }
  const int32_t num_experts = store_->num_experts(layer_idx);
  keys_.clear();
  for (int32_t id : routing.expert_ids)
    if (id >= 0 && !seen_[id]) {
      seen_[id] = 1;
      keys_.push_back(ExpertKey{layer_idx, id});
    }
  for (const ExpertKey& key : keys_) seen_[key.expert_idx] = 0;
  std::sort(keys_.begin(), keys_.end(),
            [](const ExpertKey& a, const ExpertKey& b) { return a.expert_idx < b.expert_idx; });
  // A wave (the rest of a prefill step that did not fit) carries -1 for the entries already run.
  const bool first_wave = std::none_of(routing.expert_ids.begin(), routing.expert_ids.end(),
                                       [](int32_t id) { return id < 0; });
  if (first_wave && predictor_) {
    std::vector<int32_t> actual;
    for (const ExpertKey& key : keys_) actual.push_back(key.expert_idx);
    if (!last_prediction_[layer_idx].empty()) prediction_.add(last_prediction_[layer_idx], actual);
  }
  settle_prefetches(layer_idx, keys_);
  outcomes_.assign(keys_.size(), CacheOutcome::kNoRoom);
  evicted_.clear();
  cache_->acquire(keys_, outcomes_, &evicted_);
  for (const ExpertKey& key : evicted_) store_->free(key);

  experts->assign(static_cast<size_t>(num_experts), ExpertWeights{});
  // Misses that run on the host CPU: balance the step's missed bytes between the CPU reading them and
  // PCIe copying them, each path's finish time = bytes assigned / its bandwidth.
  to_cpu_.clear();
  if (config_.cpu_experts) {
    tokens_per_expert_.assign(static_cast<size_t>(num_experts), 0);
    for (int32_t id : routing.expert_ids)
      if (id >= 0) ++tokens_per_expert_[id];
    double cpu_ms = 0, copy_ms = 0;
    for (size_t idx = 0; idx < keys_.size(); ++idx) {
      if (outcomes_[idx] != CacheOutcome::kMiss) continue;
      const ExpertKey key = keys_[idx];
      const double bytes = static_cast<double>(store_->expert_bytes(layer_idx));
      const double on_cpu = bytes / (config_.host_read_gbs * 1e6), on_copy = bytes / (config_.copy_gbs * 1e6);
      if (tokens_per_expert_[key.expert_idx] <= config_.cpu_max_tokens && cpu_ms + on_cpu <= copy_ms + on_copy) {
        cpu_ms += on_cpu;
        outcomes_[idx] = CacheOutcome::kNoRoom;  // handled below, not loaded
        to_cpu_.push_back(key);
      } else {
        copy_ms += on_copy;
      }
    }
    // The cache made room for these; give it back: a CPU-run expert is not cached.
    cache_->release(to_cpu_);
    for (const ExpertKey& key : to_cpu_) {
      cache_->erase(key);
      ++stats_.misses;
      ++stats_.cpu_computed;
      (*experts)[key.expert_idx] = store_->source(key);
    }
  }
  auto start = std::chrono::steady_clock::now();
  bool loaded_any = false;
  for (size_t idx = 0; idx < keys_.size(); ++idx) {
    const ExpertKey key = keys_[idx];
    switch (outcomes_[idx]) {
      case CacheOutcome::kHit:
        ++stats_.hits;
        (*experts)[key.expert_idx] = store_->resident(key);
        pinned_.push_back(key);
        break;
      case CacheOutcome::kMiss:
        ++stats_.misses;
        (*experts)[key.expert_idx] = store_->load(key);
        pinned_.push_back(key);
        loaded_any = true;
        break;
      case CacheOutcome::kNoRoom:
        break;  // runs in a later wave, after release() frees this wave's slots
    }
  }
  if (loaded_any)
    stats_.stall_ms += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  if (pinned_.empty() && to_cpu_.empty() && !keys_.empty())
    throw BudgetError(fmt::format("MoE layer {}: no expert fits in the expert memory budget ({} bytes in use of {})",
                                  layer_idx, cache_->used(layer_idx), cache_->capacity()));
  if (first_wave) observe_and_prefetch(layer_idx, routing);
}

int32_t OffloadingExpertProvider::lookahead_layers() const {
  return predictor_ && predictor_->name() == "pregate" ? config_.lookahead_layers : 0;
}

void OffloadingExpertProvider::observe_lookahead(int32_t target_layer_idx, std::span<const float> logits) {
  if (predictor_) predictor_->observe_lookahead_logits(target_layer_idx, logits);
}

void OffloadingExpertProvider::release(int32_t /*layer_idx*/) {
  cache_->release(pinned_);
  pinned_.clear();
}

void OffloadingExpertProvider::end_sequence() {
  for (const ExpertKey& key : outstanding_) {  // nothing of this request is in flight past its end
    store_->cancel(key);
    cache_->unpin(key);
    cache_->erase(key);
  }
  outstanding_.clear();
  if (request_open_) {
    cache_->end_request();
    if (predictor_) predictor_->end_request();
  }
  request_open_ = false;
}

ExpertProviderStats OffloadingExpertProvider::stats() const {
  ExpertProviderStats out = stats_;
  out.bytes_moved = store_->stats().bytes_moved;
  out.prefetch_used = cache_->stats().prefetch_used;
  return out;
}

int64_t parse_byte_size(const std::string& text, const std::string& flag) {
  char* end = nullptr;
  errno = 0;
  double value = std::strtod(text.c_str(), &end);
  std::string unit = end ? std::string(end) : "";
  unit.erase(0, unit.find_first_not_of(' '));
  double scale = 0;
  if (unit.empty() || unit == "B") scale = 1;
  else if (unit == "KiB" || unit == "K") scale = 1024.0;
  else if (unit == "MiB" || unit == "M") scale = 1024.0 * 1024;
  else if (unit == "GiB" || unit == "G") scale = 1024.0 * 1024 * 1024;
  else if (unit == "TiB" || unit == "T") scale = 1024.0 * 1024 * 1024 * 1024;
  else if (unit == "KB") scale = 1e3;
  else if (unit == "MB") scale = 1e6;
  else if (unit == "GB") scale = 1e9;
  else if (unit == "TB") scale = 1e12;
  if (end == text.c_str() || errno != 0 || scale == 0 || !(value >= 0) || !std::isfinite(value))
    throw UsageError(fmt::format("{}: \"{}\" is not a size; use e.g. 16GiB, 512MiB, 64KiB or a byte count", flag, text));
  return static_cast<int64_t>(value * scale);
}

}  // namespace moex
