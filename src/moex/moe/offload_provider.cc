#include "moex/moe/offload_provider.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>

#include "moex/core/error.h"
#include "moex/moe/miss_path.h"
#include "moex/moe/policy/eviction_policy.h"

namespace moex {
namespace {
// A scan step routes at least this many tokens per expert on average: with uniform routing a fraction e^-8 of a
// layer's experts is left out, and the misses are far past what the CPU takes (cpu_max_tokens). At 2 per expert
// (the rule before), a 16-token Mixtral prompt was a scan: streamed one copied expert at a time where most of
// its misses would have run on the CPU, and the decode after it hit less (H100, interleaved: 130-133 vs
// 120-123 ms/token, hit rate 0.355 vs 0.389).
constexpr int64_t kScanEntriesPerExpert = 8;
// Experts at least this large are "large" for the defaults that depend on size (scan_steps_for,
// split_overhead_ms_for): Mixtral-8x7B's 352 MB are, Qwen3-30B-A3B's 9 MB are not.
constexpr int64_t kLargeExpertBytes = int64_t{64} << 20;
// balance_prefetch's memory: each layer's bookings weigh this much less per later layer (~10 layers).
constexpr double kBookingDecay = 0.9;

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
    : store_(std::move(store)), top_k_(top_k), config_(config), rates_(config.host_read_gbs, config.copy_gbs) {
  const int32_t num_layers = store_->num_layers();
  MOEX_ASSERT(num_layers > 0, "offloading a model without MoE layers");
  const int32_t num_experts = store_->num_experts(0);
  int64_t max_expert_bytes = 0;
  int32_t largest_layer = 0;  // a layer with the largest experts, whose shapes reserved slots take
  ExpertCacheConfig cache_config;
  cache_config.num_layers = num_layers;
  cache_config.num_experts = num_experts;
  cache_config.scope = config.scope;
  for (int32_t layer_idx = 0; layer_idx < num_layers; ++layer_idx) {
    cache_config.expert_bytes.push_back(store_->expert_bytes(layer_idx));
    if (store_->expert_bytes(layer_idx) > max_expert_bytes) {
      max_expert_bytes = store_->expert_bytes(layer_idx);
      largest_layer = layer_idx;
    }
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
  // Device slots up front (what the budget holds of the largest experts): the first prompt would otherwise
  // allocate them while copies and compute run, and each allocation stops the streams from overlapping. Host
  // slots (the CPU backend's tier) stay lazy: a budget there is often much larger than what a run touches.
  if (store_->backend_device() != Device::kCpu)
    store_->reserve_slots(static_cast<int32_t>(config.budget_bytes / max_expert_bytes), largest_layer);
  // Scan steps stream a layer through a few slots in waves of about stream_wave_bytes (whole experts): room for
  // the wave running, the one acquired ahead of it and one more for the next layer's first experts; everything
  // else is kept across prompts. Per-layer budgets keep the old rule (one layer's experts at a time).
  scan_steps_ = scan_steps_for(config.scan_steps, max_expert_bytes);
  if (scan_steps_ && config.stream_wave_bytes > 0 && config.scope == CacheScope::kGlobal) {
    const int64_t wave =
        std::max<int64_t>(1, (config.stream_wave_bytes + max_expert_bytes - 1) / max_expert_bytes);
    const int64_t stream_bytes = 3 * wave * max_expert_bytes;
    if (budget >= stream_bytes + top_k * max_expert_bytes) {
      stream_wave_experts_ = wave;
      cache_config.scan_keep = budget - stream_bytes;
      cache_config.keep_by_layer = true;
    }
  }
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

void OffloadingExpertProvider::settle_prefetches(int32_t layer_idx, std::span<const ExpertKey> wanted,
                                                 int64_t* taken_over_bytes) {
  *taken_over_bytes = 0;
  size_t kept = 0;
  for (const ExpertKey& key : outstanding_) {
    if (key.layer_idx != layer_idx) {
      outstanding_[kept++] = key;
      continue;
    }
    const bool is_wanted = std::find(wanted.begin(), wanted.end(), key) != wanted.end();
    if (is_wanted && config_.cpu_experts && !store_->ready(key)) {
      // The host has this step's CPU share to run meanwhile: the rest of the copy is enqueued for the
      // device to wait on, not the host.
      int64_t enqueued = 0;
      store_->take_over(key, &enqueued);
      *taken_over_bytes += enqueued;
      cache_->unpin(key);
    } else if (is_wanted || store_->ready(key)) {
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

void OffloadingExpertProvider::predict_ahead(int32_t layer_idx, const Routing& routing) {
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
    }
  }
}

void OffloadingExpertProvider::plan_prefetch(int32_t layer_idx, bool count_skipped) {
  prefetch_plan_.clear();
  if (!predictor_) return;
  const int32_t num_layers = store_->num_layers();
  for (int32_t ahead = 1; ahead <= config_.lookahead_layers; ++ahead) {
    const int32_t target = (layer_idx + ahead) % num_layers;
    for (int32_t expert_idx : last_prediction_[target]) {
      const ExpertKey key{target, expert_idx};
      if (!cache_->contains(key) &&
          std::find(prefetch_plan_.begin(), prefetch_plan_.end(), key) == prefetch_plan_.end())
        prefetch_plan_.push_back(key);
    }
  }
  // The link already carries more than the CPU would with this prefetch's expert added (what a skipped,
  // then missed, expert costs it): a prefetch would lengthen the long path by a whole copy, where the CPU runs
  // that expert in about half the time (host reads are ~2x the link's rate).
  if (config_.balance_prefetch && config_.cpu_experts) {
    const double expert_cpu_ms =
        static_cast<double>(store_->host_bytes((layer_idx + 1) % num_layers)) / (rates_.host_read_gbs() * 1e6);
    if (link_booked_ms_ > cpu_booked_ms_ + expert_cpu_ms) {
      if (count_skipped) stats_.prefetch_skipped += static_cast<int64_t>(prefetch_plan_.size());
      prefetch_plan_.clear();
    }
  }
}

void OffloadingExpertProvider::plan_scan_prefetch(int32_t layer_idx) {
  const int32_t target = layer_idx + 1;  // the next step's first layer is not known to be a scan
  size_t kept = 0;
  for (const ExpertKey& key : prefetch_plan_)
    if (key.layer_idx == target) prefetch_plan_[kept++] = key;
  prefetch_plan_.resize(kept);
  if (target >= store_->num_layers()) return;
  for (int32_t expert_idx = 0; expert_idx < store_->num_experts(target); ++expert_idx) {
    const ExpertKey key{target, expert_idx};
    const bool planned = std::find(prefetch_plan_.begin(), prefetch_plan_.end(), key) != prefetch_plan_.end();
    if (!cache_->contains(key) && !planned) prefetch_plan_.push_back(key);
  }
}

void OffloadingExpertProvider::stream_ahead(int32_t layer_idx) {
  const int32_t target = layer_idx + 1;  // the next step's first layer is not known to be a scan
  if (target >= store_->num_layers()) return;
  int64_t issued = 0;
  for (int32_t expert_idx = 0; expert_idx < store_->num_experts(target) && issued < stream_wave_experts_;
       ++expert_idx) {
    const ExpertKey key{target, expert_idx};
    if (cache_->contains(key)) continue;
    evicted_.clear();
    // Only streamed experts of other layers make room (never kept or pinned ones).
    if (cache_->insert(key, &evicted_, AccessKind::kScan) != InsertOutcome::kInserted) break;
    for (const ExpertKey& gone : evicted_) store_->free(gone);
    // Enqueued behind this layer's copies; the next layer's first wave waits for it on the device. Not pinned:
    // a later copy into its slot would queue behind it on the same link.
    store_->load(key);
    ++issued;
    ++stats_.prefetch_issued;
  }
}

void OffloadingExpertProvider::book_paths(const PathLoad& load) {
  link_booked_ms_ = link_booked_ms_ * kBookingDecay + load.link_ms;
  cpu_booked_ms_ = cpu_booked_ms_ * kBookingDecay + load.cpu_ms;
}

void OffloadingExpertProvider::issue_prefetch(AccessKind kind) {
  for (const ExpertKey& key : prefetch_plan_) {
    if (cache_->contains(key)) continue;
    evicted_.clear();
    // Everything else is pinned (or, in a scan step, kept).
    if (cache_->insert(key, &evicted_, kind) != InsertOutcome::kInserted) break;
    for (const ExpertKey& gone : evicted_) store_->free(gone);
    store_->load_async(key);
    cache_->pin(key);
    outstanding_.push_back(key);
    ++stats_.prefetch_issued;
  }
  prefetch_plan_.clear();
}

int64_t OffloadingExpertProvider::host_row_bytes(int32_t layer_idx, const ExpertWeights& w) const {
  const auto bf16_row = static_cast<double>(w.gate.nbytes() + w.up.nbytes()) / static_cast<double>(w.gate.dim(0));
  return static_cast<int64_t>(bf16_row * static_cast<double>(store_->host_bytes(layer_idx)) /
                              static_cast<double>(store_->expert_bytes(layer_idx)));
}

PathLoad OffloadingExpertProvider::assign_miss_paths(int32_t layer_idx, const Routing& routing, int64_t link_bytes) {
  const int32_t num_experts = store_->num_experts(layer_idx);
  tokens_per_expert_.assign(static_cast<size_t>(num_experts), 0);
  for (int32_t id : routing.expert_ids)
    if (id >= 0) ++tokens_per_expert_[id];
  const ExpertWeights& any = store_->layout(layer_idx);
  ExpertShape shape;
  shape.ffn = any.gate.dim(0);
  // Host bytes (packed or not), which both paths read: a packed gate/up row costs its share of the packed size.
  shape.bytes = store_->host_bytes(layer_idx);
  shape.row_bytes = host_row_bytes(layer_idx, any);
  MissCostModel model;
  model.host_read_gbs = rates_.host_read_gbs();
  model.copy_gbs = rates_.copy_gbs();
  model.split_overhead_ms = split_overhead_ms_for(config_.split_overhead_ms, store_->expert_bytes(layer_idx));
  // The link is busy with the rest of this layer's prefetches first (link_bytes, taken over) and with the
  // prefetches this step issues after its demand copies, while the CPU has only this layer's misses to run:
  // all of it is link work of this step.
  PathLoad load;
  const double link_bytes_total =
      static_cast<double>(link_bytes) + static_cast<double>(prefetch_plan_.size()) * static_cast<double>(shape.bytes);
  load.link_ms = link_bytes_total / (model.copy_gbs * 1e6);
  // Misses the CPU may not take (routed to many tokens) are copied whatever the rest does: book them first.
  for (size_t idx = 0; idx < keys_.size(); ++idx)
    if (outcomes_[idx] == CacheOutcome::kMiss && tokens_per_expert_[keys_[idx].expert_idx] > config_.cpu_max_tokens)
      choose_miss_path(shape, false, false, model, &load);
  for (size_t idx = 0; idx < keys_.size(); ++idx) {
    const ExpertKey key = keys_[idx];
    const int64_t tokens = tokens_per_expert_[key.expert_idx];
    if (outcomes_[idx] != CacheOutcome::kMiss || tokens > config_.cpu_max_tokens) continue;
    const MissChoice choice = choose_miss_path(shape, true, config_.split_experts && tokens == 1, model, &load);
    switch (choice.path) {
      case MissPath::kCopy: break;
      case MissPath::kCpu:
        bypass_[idx] = 1;  // run from its host copy: no slot, no eviction
        to_cpu_.push_back(key);
        break;
      case MissPath::kSplit:
        splits_.push_back(SplitExpert{key.expert_idx, choice.host_rows, store_->source(key)});
        break;
    }
  }
  return load;
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
  // Waves of one step carry the step's routing shape, so all of them agree on being a scan.
  const bool scan = scan_steps_ && routing.num_tokens * routing.top_k >=
                                       kScanEntriesPerExpert * static_cast<int64_t>(num_experts);
  const AccessKind kind = scan ? AccessKind::kScan : AccessKind::kDemand;
  int64_t taken_over_bytes = 0;
  settle_prefetches(layer_idx, keys_, &taken_over_bytes);
  // A streamed scan step takes its hits and the next stream_wave_experts_ misses; the caller asks again for
  // the rest (streams_waves()).
  streaming_ = scan && stream_wave_experts_ > 0;
  size_t held_back = 0;
  if (streaming_) {
    size_t kept = 0;
    int64_t misses = 0;
    for (const ExpertKey& key : keys_) {
      const bool resident = cache_->contains(key);
      if (!resident && misses >= stream_wave_experts_) continue;
      misses += resident ? 0 : 1;
      keys_[kept++] = key;
    }
    held_back = keys_.size() - kept;
    keys_.resize(kept);
  }
  wave_start_ = pinned_.size();
  step_ = PathObservation{};
  step_.link_bytes = taken_over_bytes;
  to_cpu_.clear();
  splits_.clear();
  bypass_.assign(keys_.size(), 0);
  outcomes_.assign(keys_.size(), CacheOutcome::kNoRoom);  // acquire answers every key
  if (first_wave) predict_ahead(layer_idx, routing);
  // A streamed wave's misses are copied (a scan step routes many tokens to each); its next wave's acquire would
  // overwrite this one's CPU and split lists before the caller runs it.
  const bool cpu_paths = config_.cpu_experts && !keys_.empty() && !streaming_;
  PathLoad load;
  if (cpu_paths) {
    // Paths before the cache is asked, so that a miss the CPU runs makes no room in it: making room evicts a
    // resident expert, for one that would not stay. The link's share counts the prefetches the cache as it is
    // now would need; the plan is made again below, after the step's copies have taken their slots.
    for (size_t idx = 0; idx < keys_.size(); ++idx)
      outcomes_[idx] = cache_->contains(keys_[idx]) ? CacheOutcome::kHit : CacheOutcome::kMiss;
    if (first_wave) plan_prefetch(layer_idx, /*count_skipped=*/false);
    load = assign_miss_paths(layer_idx, routing, taken_over_bytes);
  }
  evicted_.clear();
  cache_->acquire(keys_, outcomes_, &evicted_, kind, bypass_);
  for (const ExpertKey& key : evicted_) store_->free(key);
  // A split's copied rows need a slot: one that found none (kNoRoom) runs whole in a later wave instead.
  std::erase_if(splits_, [&](const SplitExpert& split) {
    for (size_t idx = 0; idx < keys_.size(); ++idx)
      if (keys_[idx].expert_idx == split.expert_idx) return outcomes_[idx] != CacheOutcome::kMiss;
    return true;
  });

  experts->assign(static_cast<size_t>(num_experts), ExpertWeights{});
  if (first_wave) plan_prefetch(layer_idx, /*count_skipped=*/true);
  // Only the first wave prefetches: its victims' last readers ran before this layer's routing was read back,
  // while a later wave's could be the earlier wave's experts, still being read.
  if (first_wave && scan && !streaming_) plan_scan_prefetch(layer_idx);
  // A layer that runs in waves needs every slot its first wave leaves: pinned prefetches there could leave a
  // later wave no room at all. A streamed step prefetches the next layer itself, on the demand path
  // (stream_ahead).
  const bool one_wave =
      held_back == 0 && std::find(outcomes_.begin(), outcomes_.end(), CacheOutcome::kNoRoom) == outcomes_.end();
  if (!one_wave || streaming_) prefetch_plan_.clear();
  // adapt_rates times decode-sized layers that run in one wave, the steps the rates mostly serve: there the
  // host's wait is for the layer's copies, where a prefill's also covers the device's work on many tokens.
  observe_step_ = config_.cpu_experts && config_.adapt_rates && first_wave && one_wave &&
                  routing.num_tokens <= config_.cpu_max_tokens;
  if (cpu_paths) {
    if (first_wave && config_.balance_prefetch) book_paths(load);
    for (const ExpertKey& key : to_cpu_) {
      ++stats_.misses;
      ++stats_.cpu_computed;
      stats_.cpu_read_bytes += store_->host_bytes(layer_idx);
      step_.cpu_bytes += store_->host_bytes(layer_idx);
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
      case CacheOutcome::kMiss: {
        ++stats_.misses;
        auto split = std::find_if(splits_.begin(), splits_.end(),
                                  [&](const SplitExpert& s) { return s.expert_idx == key.expert_idx; });
        if (split != splits_.end()) {
          ++stats_.split_computed;
          const int64_t row_bytes = host_row_bytes(layer_idx, split->host);
          stats_.cpu_read_bytes += split->host_rows * row_bytes;
          step_.cpu_bytes += split->host_rows * row_bytes;
          step_.link_bytes += store_->host_bytes(layer_idx) - split->host_rows * row_bytes;
          (*experts)[key.expert_idx] = store_->load_split(key, split->host_rows);
          split_keys_.push_back(key);
        } else {
          (*experts)[key.expert_idx] = store_->load(key);
          step_.link_bytes += store_->host_bytes(layer_idx);
          loaded_any = true;
        }
        pinned_.push_back(key);
        break;
      }
      case CacheOutcome::kNoRoom:
        break;  // runs in a later wave, after release() frees this wave's slots
      case CacheOutcome::kBypassed:
        break;  // run on the CPU (to_cpu_, above)
    }
  }
  // Copies overlap the host CPU's share of the step, whose wait for them the caller reports
  // (add_stall_ms); with no host share the step waits for them here, its stall.
  loaded_any |= taken_over_bytes > 0;
  // A streamed wave's copies are waited for by the device (the caller's Backend::wait_copies_through), not here.
  if (loaded_any && to_cpu_.empty() && splits_.empty() && !streaming_) store_->wait_loads();
  if (loaded_any && !streaming_)
    stats_.stall_ms += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  if (pinned_.empty() && to_cpu_.empty() && !keys_.empty())
    throw BudgetError(fmt::format("MoE layer {}: no expert fits in the expert memory budget ({} bytes in use of {})",
                                  layer_idx, cache_->used(layer_idx), cache_->capacity()));
  if (first_wave) issue_prefetch(kind);
  if (streaming_ && one_wave) stream_ahead(layer_idx);  // the layer's last wave: the link moves on to the next
}

void OffloadingExpertProvider::release_wave(int32_t /*layer_idx*/) {
  // The oldest wave's pins: a streamed layer has at most two acquires outstanding, and the latest one's pins
  // start at wave_start_.
  cache_->release(std::span<const ExpertKey>(pinned_).first(wave_start_));
  pinned_.erase(pinned_.begin(), pinned_.begin() + static_cast<std::ptrdiff_t>(wave_start_));
  wave_start_ = 0;
}

int32_t OffloadingExpertProvider::lookahead_layers() const {
  return predictor_ && predictor_->name() == "pregate" ? config_.lookahead_layers : 0;
}

void OffloadingExpertProvider::observe_lookahead(int32_t target_layer_idx, std::span<const float> logits) {
  if (predictor_) predictor_->observe_lookahead_logits(target_layer_idx, logits);
}

void OffloadingExpertProvider::release(int32_t /*layer_idx*/) {
  // The caller has reported the layer's host times by now. Without a CPU share there is nothing to time.
  if (observe_step_ && step_.cpu_bytes > 0) rates_.observe(step_);
  observe_step_ = false;
  cache_->release(pinned_);
  pinned_.clear();
  wave_start_ = 0;
  // A split expert's slot lacks gate/up rows [0, host_rows): it is no cache hit for a later step. The
  // layer's ops that read it were enqueued before; a later copy into the slot starts after them
  // (Backend::copy_from_host_enqueue).
  for (const ExpertKey& key : split_keys_) {
    cache_->erase(key);
    store_->free(key);
  }
  split_keys_.clear();
  splits_.clear();
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
  out.cache_bytes = config_.budget_bytes;
  if (config_.cpu_experts) {
    out.model_host_read_gbs = rates_.host_read_gbs();
    out.model_copy_gbs = rates_.copy_gbs();
  }
  return out;
}

bool scan_steps_for(std::optional<bool> configured, int64_t expert_bytes) {
  return configured.value_or(expert_bytes >= kLargeExpertBytes);
}

double split_overhead_ms_for(double configured_ms, int64_t expert_bytes) {
  if (configured_ms >= 0) return configured_ms;
  return expert_bytes >= kLargeExpertBytes ? 0.1 : 0.5;
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
