// One Replay object per simulate() call: it owns the cache, predictor and planner and walks the trace
// request by request, token by token, layer by layer.
#include "moex/trace/simulator.h"

#include <algorithm>
#include <cmath>
#include <random>

#include "moex/core/error.h"
#include "moex/moe/prefetch_planner.h"

namespace moex {
namespace {

// The demand accesses in the order ExpertCache::acquire visits them (ascending within a layer step):
// what belady's oracle must be given.
std::vector<ExpertKey> demand_sequence(const Trace& trace) {
  std::vector<ExpertKey> keys;
  keys.reserve(static_cast<size_t>(trace.num_tokens()) * trace.num_layers * trace.top_k);
  std::vector<int32_t> ids;
  for (const TraceRequest& request : trace.requests)
    for (int64_t token_idx = 0; token_idx < request.num_tokens; ++token_idx)
      for (int32_t layer_idx = 0; layer_idx < trace.num_layers; ++layer_idx) {
        auto span = trace.experts(request, token_idx, layer_idx);
        ids.assign(span.begin(), span.end());
        std::sort(ids.begin(), ids.end());
        for (int32_t expert_idx : ids) keys.push_back({layer_idx, expert_idx});
      }
  return keys;
}

class Replay {
 public:
  Replay(const Trace& trace, const SimConfig& config, SimResult* result)
      : trace_(trace), config_(config), result_(*result), rng_(config.seed) {
    int32_t num_layers = trace.num_layers;
    PolicyOptions policy_options{num_layers, trace.num_experts, {}};
    if (config.policy == "belady") policy_options.future_accesses = demand_sequence(trace);
    ExpertCacheConfig cache_config;
    cache_config.num_layers = num_layers;
    cache_config.num_experts = trace.num_experts;
    cache_config.scope = config.scope;
    cache_config.capacity_slots = result_.cache_slots;
    cache_config.policy_admission = config.policy_admission;
    cache_ = std::make_unique<ExpertCache>(cache_config, make_eviction_policy(config.policy, policy_options));
    if (!config.predictor.empty()) {
      predictor_options_ = {num_layers, trace.num_experts, trace.top_k, 512};
      predictor_ = make_expert_predictor(config.predictor, predictor_options_);
      width_ = config.prefetch_width > 0 ? std::min(config.prefetch_width, trace.num_experts) : trace.top_k;
      lookahead_ = std::clamp(config.lookahead_layers, 1, num_layers);
      pregate_ = config.predictor == "pregate";
      recorded_pregate_ = pregate_ && trace.has_pregate_logits();
      result_.pregate_recorded = recorded_pregate_;
      guess_.assign(num_layers, {});
      predicted_.assign(num_layers, {});
      has_guess_.assign(num_layers, 0);
    }
    if (config.prefetch_mode == PrefetchMode::kLink)
      planner_ = std::make_unique<PrefetchPlanner>(PlannerConfig{config.link_bytes_per_us, config.chunk_bytes});
    result_.layer_hits.assign(num_layers, 0);
    result_.layer_accesses.assign(num_layers, 0);
  }

  void run() {
    for (size_t request_idx = 0; request_idx < trace_.requests.size(); ++request_idx) {
      begin_request(request_idx);
      const TraceRequest& request = trace_.requests[request_idx];
      for (int64_t token_idx = 0; token_idx < request.num_tokens; ++token_idx)
        for (int32_t layer_idx = 0; layer_idx < trace_.num_layers; ++layer_idx)
          layer_step(request, token_idx, layer_idx);
      cache_->end_request();
      if (predictor_) predictor_->end_request();
    }
    const ExpertCacheStats& stats = cache_->stats();
    result_.prefetch_used = stats.prefetch_used;
    if (planner_) {
      result_.bytes_moved = planner_->stats().bytes_copied;
      result_.prefetch_cancelled = planner_->stats().cancelled;
      result_.compute_ms = static_cast<double>(result_.num_tokens) * trace_.num_layers * config_.layer_compute_us / 1e3;
    } else {
      result_.bytes_moved = experts_moved_ * config_.expert_bytes;
    }
  }

 private:
  void begin_request(size_t request_idx) {
    cache_->begin_request();
    result_.num_tokens += trace_.requests[request_idx].num_tokens;
    if (!predictor_) return;
    std::fill(has_guess_.begin(), has_guess_.end(), 0);
    if (config_.training == PredictorTraining::kLeaveOneOut) {
      predictor_ = make_expert_predictor(config_.predictor, predictor_options_);
      for (size_t other = 0; other < trace_.requests.size(); ++other)
        if (other != request_idx) observe_request(trace_.requests[other]);
    }
    predictor_->begin_request();
  }

  void observe_request(const TraceRequest& request) {
    predictor_->begin_request();
    for (int64_t token_idx = 0; token_idx < request.num_tokens; ++token_idx)
      for (int32_t layer_idx = 0; layer_idx < trace_.num_layers; ++layer_idx)
        predictor_->observe(layer_idx, trace_.experts(request, token_idx, layer_idx),
                            trace_.weights(request, token_idx, layer_idx));
    predictor_->end_request();
  }

  void layer_step(const TraceRequest& request, int64_t token_idx, int32_t layer_idx) {
    std::span<const int32_t> ids = trace_.experts(request, token_idx, layer_idx);
    keys_.clear();
    for (int32_t expert_idx : ids) keys_.push_back({layer_idx, expert_idx});
    outcomes_.resize(keys_.size());
    if (planner_) {
      planner_->advance_to(now_us_, &done_);
      commit_done();
    }
    bypass_.assign(keys_.size(), config_.cpu_misses ? 1 : 0);
    cache_->acquire(keys_, outcomes_, nullptr, AccessKind::kDemand, bypass_);
    acquired_.clear();
    for (size_t idx = 0; idx < keys_.size(); ++idx) {
      ++result_.accesses;
      ++result_.layer_accesses[layer_idx];
      if (outcomes_[idx] == CacheOutcome::kHit) {
        ++result_.hits;
        ++result_.layer_hits[layer_idx];
        acquired_.push_back(keys_[idx]);
        continue;
      }
      ++result_.misses;
      if (planner_ && planner_->pending(keys_[idx])) ++result_.late_prefetches;
      if (outcomes_[idx] == CacheOutcome::kBypassed) {
        ++result_.cpu_reads;  // computed on the host; a copy of it still under way lands later
        continue;
      }
      // kNoRoom cannot happen while the budget holds top_k (checked up front) and the simulator pins
      // nothing else across steps; it would still be served, as a miss computed elsewhere.
      if (outcomes_[idx] == CacheOutcome::kMiss) acquired_.push_back(keys_[idx]);
      ++experts_moved_;
      if (planner_) planner_->demand(keys_[idx], config_.expert_bytes);
    }
    if (planner_) wait_for_demands();
    if (predictor_) {
      if (has_guess_[layer_idx]) result_.prediction.add(guess_[layer_idx], ids);
      has_guess_[layer_idx] = 0;
      predictor_->observe(layer_idx, ids, trace_.weights(request, token_idx, layer_idx));
      if (pregate_) feed_pregate(request, token_idx, layer_idx);
      prefetch(layer_idx);
    }
    if (planner_) {
      planner_->advance_to(now_us_ + config_.layer_compute_us, &done_);
      commit_done();
      now_us_ += config_.layer_compute_us;
    }
    cache_->release(acquired_);
    ++step_;
  }

  void wait_for_demands() {
    double ready = now_us_;
    for (size_t idx = 0; idx < keys_.size(); ++idx)
      if (outcomes_[idx] != CacheOutcome::kHit && outcomes_[idx] != CacheOutcome::kBypassed &&
          planner_->pending(keys_[idx])) {
        ready = std::max(ready, planner_->run_until_done(keys_[idx], &done_));
        commit_done();
      }
    result_.stall_ms += (ready - now_us_) / 1e3;
    now_us_ = ready;
    // Guesses for this step that the router did not confirm are useless now.
    planner_->cancel_stale(step_ + 1);
  }

  // Finished prefetches take their slot now (demand fetches already hold theirs). The other experts
  // predicted for the same layer are pinned meanwhile: an arriving guess must not evict a resident one.
  void commit_done() {
    for (const TransferDone& done : done_) {
      if (done.kind != TransferKind::kPrefetch) continue;
      pinned_.clear();
      for (int32_t expert_idx : predicted_[done.key.layer_idx]) {
        ExpertKey key{done.key.layer_idx, expert_idx};
        if (!(key == done.key) && cache_->pin(key)) pinned_.push_back(key);
      }
      if (cache_->insert(done.key, nullptr) == InsertOutcome::kInserted) ++result_.prefetch_inserted;
      cache_->release(pinned_);
    }
    done_.clear();
  }

  void prefetch(int32_t layer_idx) {
    pinned_.clear();
    for (int32_t ahead = 1; ahead <= lookahead_; ++ahead) {
      int32_t target = (layer_idx + ahead) % trace_.num_layers;
      predictor_->predict(target, &scored_);
      if (scored_.size() > static_cast<size_t>(width_)) scored_.resize(width_);
      predicted_[target].clear();
      for (const ScoredExpert& s : scored_) predicted_[target].push_back(s.expert_idx);
      if (ahead == 1) {
        guess_[target].clear();
        for (const ScoredExpert& s : scored_) guess_[target].push_back(s.expert_idx);
        has_guess_[target] = 1;
      }
      for (const ScoredExpert& s : scored_) {
        ExpertKey key{target, s.expert_idx};
        if (planner_) {
          if (cache_->contains(key)) continue;
          // Sooner steps first; within a step, the higher score. score / (1 + score) stays below 1.
          double priority = -static_cast<double>(step_ + ahead) + s.score / (1.0 + s.score);
          planner_->prefetch(key, config_.expert_bytes, priority, step_ + ahead);
        } else {
          if (cache_->insert(key, nullptr) == InsertOutcome::kInserted) {
            ++result_.prefetch_inserted;
            ++experts_moved_;
          }
          // Guesses of this round must not evict each other.
          if (cache_->pin(key)) pinned_.push_back(key);
        }
      }
    }
    cache_->release(pinned_);
  }

  // Lookahead logits for pre-gating: the trace's recorded ones, else synthetic ones made from the routing
  // the target layer will really have (see SimConfig::pregate_accuracy).
  void feed_pregate(const TraceRequest& request, int64_t token_idx, int32_t layer_idx) {
    if (recorded_pregate_) {
      // Recorded by the engine (`moex trace record --pregate-logits`): the next layer's router on this
      // layer's hidden state, one layer ahead within the token. No guess crosses into the next token.
      if (layer_idx + 1 < trace_.num_layers)
        predictor_->observe_lookahead_logits(layer_idx + 1, trace_.pregate(request, token_idx, layer_idx + 1));
      return;
    }
    std::uniform_real_distribution<float> noise(0.0f, 1.0f);
    std::bernoulli_distribution keep(config_.pregate_accuracy);
    for (int32_t ahead = 1; ahead <= lookahead_; ++ahead) {
      int32_t target = (layer_idx + ahead) % trace_.num_layers;
      int64_t truth_token = token_idx + (layer_idx + ahead) / trace_.num_layers;
      if (truth_token >= request.num_tokens) continue;
      std::span<const int32_t> truth = trace_.experts(request, truth_token, target);
      logits_.assign(trace_.num_experts, 0.0f);
      for (float& logit : logits_) logit = noise(rng_);
      for (size_t rank = 0; rank < truth.size(); ++rank) {
        int32_t expert_idx = truth[rank];
        if (!keep(rng_)) {
          // A wrong guess: an expert the layer will not choose and no other rank took.
          decoys_.clear();
          for (int32_t other = 0; other < trace_.num_experts; ++other)
            if (logits_[other] < 2.0f && std::find(truth.begin(), truth.end(), other) == truth.end())
              decoys_.push_back(other);
          if (!decoys_.empty())
            expert_idx = decoys_[std::uniform_int_distribution<size_t>(0, decoys_.size() - 1)(rng_)];
        }
        logits_[expert_idx] = 10.0f - static_cast<float>(rank);
      }
      predictor_->observe_lookahead_logits(target, logits_);
    }
  }

  const Trace& trace_;
  const SimConfig& config_;
  SimResult& result_;
  std::unique_ptr<ExpertCache> cache_;
  PredictorOptions predictor_options_;
  std::unique_ptr<ExpertPredictor> predictor_;
  std::unique_ptr<PrefetchPlanner> planner_;
  std::mt19937_64 rng_;
  int32_t width_ = 0;
  int32_t lookahead_ = 1;
  bool pregate_ = false;
  bool recorded_pregate_ = false;  // every request carries recorded logits (SimResult::pregate_recorded)
  double now_us_ = 0;
  int64_t step_ = 0;
  int64_t experts_moved_ = 0;
  std::vector<std::vector<int32_t>> guess_;  // per layer: the latest next-layer guess
  std::vector<uint8_t> has_guess_;
  std::vector<std::vector<int32_t>> predicted_;  // per layer: the latest guess for its next run
  // Scratch.
  std::vector<ExpertKey> keys_, acquired_, pinned_;
  std::vector<CacheOutcome> outcomes_;
  std::vector<uint8_t> bypass_;
  std::vector<TransferDone> done_;
  std::vector<ScoredExpert> scored_;
  std::vector<float> logits_;
  std::vector<int32_t> decoys_;
};

}  // namespace

int64_t cache_slots_for(const Trace& trace, CacheScope scope, double cache_fraction) {
  if (!(cache_fraction > 0 && cache_fraction <= 1))
    throw UsageError(fmt::format("cache fraction must be in (0, 1], got {}", cache_fraction));
  int64_t pool = scope == CacheScope::kPerLayer ? trace.num_experts
                                                : static_cast<int64_t>(trace.num_experts) * trace.num_layers;
  auto slots = static_cast<int64_t>(std::llround(cache_fraction * static_cast<double>(pool)));
  if (slots < trace.top_k)
    throw BudgetError(fmt::format(
        "cache of {} x {} = {} expert slots {} is below top_k = {}: one token's experts must be co-resident; "
        "use a cache fraction of at least {:.4f}",
        cache_fraction, pool, slots, scope == CacheScope::kPerLayer ? "per layer" : "in all", trace.top_k,
        static_cast<double>(trace.top_k) / pool));
  return slots;
}

SimResult simulate(const Trace& trace, const SimConfig& config) {
  if (config.prefetch_mode == PrefetchMode::kLink) {
    if (config.expert_bytes <= 0)
      throw UsageError("the link model needs the bytes of one expert (--expert-bytes)");
    if (!(config.link_bytes_per_us > 0) || !(config.layer_compute_us >= 0) || config.chunk_bytes <= 0)
      throw UsageError(fmt::format("link model: bandwidth {} bytes/us, compute {} us/layer, chunk {} bytes: "
                                   "expected > 0, >= 0, > 0",
                                   config.link_bytes_per_us, config.layer_compute_us, config.chunk_bytes));
  }
  if (!(config.pregate_accuracy >= 0 && config.pregate_accuracy <= 1))
    throw UsageError(fmt::format("pregate accuracy must be in [0, 1], got {}", config.pregate_accuracy));
  if (config.cpu_misses && config.policy_admission)
    throw UsageError("cpu misses and policy admission exclude each other: every miss already bypasses the cache");
  SimResult result;
  result.config = config;
  result.cache_slots = cache_slots_for(trace, config.scope, config.cache_fraction);
  Replay replay(trace, config, &result);
  replay.run();
  return result;
}

}  // namespace moex
