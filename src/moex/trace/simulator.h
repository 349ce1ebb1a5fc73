// Trace replay: drives the same ExpertCache, eviction policy, predictor and prefetch planner the
// engine uses over a recorded routing trace, and reports hit rates, prefetch precision/recall, bytes
// moved and (with the link model) stall time. Requests run back to back, the cache starts cold and
// misses load on demand; the top-k experts of the current token are co-resident (pinned) while their
// layer runs. Deterministic: no wall clock, seeded randomness only for synthetic pre-gating.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "moex/moe/expert_cache.h"
#include "moex/moe/predictor/expert_predictor.h"
#include "moex/trace/trace.h"

namespace moex {

enum class PrefetchMode : uint8_t {
  kIdeal,  // a prediction is resident the moment it is made: what the predictor is worth if bandwidth
           // were free (it still takes cache slots and evicts)
  kLink,   // copies cross a link of finite bandwidth while layers compute; late copies stall
};

enum class PredictorTraining : uint8_t {
  kOnline,        // one predictor learns as the replay goes (what serving sees)
  kLeaveOneOut,   // per request, a fresh predictor first observes every other request of the trace
};

struct SimConfig {
  std::string policy = "lru";
  std::string predictor;  // empty: no prediction, no prefetch
  CacheScope scope = CacheScope::kPerLayer;
  // Share of the experts the cache holds: of one layer's (kPerLayer) or of all layers' (kGlobal).
  double cache_fraction = 0.5;
  PrefetchMode prefetch_mode = PrefetchMode::kIdeal;
  PredictorTraining training = PredictorTraining::kOnline;
  int32_t prefetch_width = 0;    // experts prefetched per predicted layer (0: top_k)
  int32_t lookahead_layers = 1;  // how many layers ahead predictions reach
  // Misses run on the host CPU over the expert's host copy (the engine's --cpu-experts, every miss taking that
  // path): they bypass the cache (no slot, no eviction; the policy still sees the use) and cross no link, so only
  // prefetches fill the cache. Both paths read host memory: cpu_reads + copies is what the host serves per token.
  bool cpu_misses = false;
  // A miss that must evict asks the policy whether it is worth its victim (ExpertCacheConfig::policy_admission); a
  // declined miss runs on the host like a cpu_misses one. With belady: the fewest host reads a cache of this size
  // can do (MIN with bypass), a bound for every policy, predictor and miss path. Not with cpu_misses.
  bool policy_admission = false;
  // Synthetic pre-gating (predictor "pregate" only): the trace has no lookahead router logits, so the
  // simulator makes them from the true routing: each true expert keeps its rank with this probability
  // and is otherwise replaced by a random expert the layer did not choose. An upper-bound study.
  double pregate_accuracy = 0.9;
  uint64_t seed = 1;
  // Link model (kLink): per-expert bytes, link rate, compute time of one layer, copy chunk size.
  int64_t expert_bytes = 0;
  double link_bytes_per_us = 55'000;  // 55 GB/s: pinned host-to-device on the GPU hosts
  double layer_compute_us = 250;
  int64_t chunk_bytes = 16 << 20;
};

struct SimResult {
  SimConfig config;
  int64_t cache_slots = 0;  // per layer (kPerLayer) or in all (kGlobal)
  int64_t num_tokens = 0;
  int64_t accesses = 0;     // tokens * layers * top_k
  int64_t hits = 0;         // expert resident when its layer ran (prefetched ones included)
  int64_t misses = 0;
  int64_t cpu_reads = 0;  // cpu_misses or policy_admission: misses computed on the host (not copied)
  int64_t late_prefetches = 0;  // kLink: the copy was under way but not done when needed (a miss)
  bool pregate_recorded = false;  // predictor "pregate" fed the trace's recorded logits (not synthetic ones)
  std::vector<int64_t> layer_hits;
  std::vector<int64_t> layer_accesses;
  // Prefetch accounting: inserted = prefetched experts that became resident; used = of those, the
  // ones a demand access hit before eviction.
  int64_t prefetch_inserted = 0;
  int64_t prefetch_used = 0;
  int64_t prefetch_cancelled = 0;
  // The predictor's next-layer guess (prefetch_width experts) against the router's choice.
  PredictionStats prediction;
  int64_t bytes_moved = 0;  // demand + prefetch copies (kLink: wasted partial copies included)
  double stall_ms = 0;      // kLink: time layers waited for copies
  double compute_ms = 0;    // kLink: num_tokens * num_layers * layer_compute_us

  double hit_rate() const { return accesses ? static_cast<double>(hits) / accesses : 0.0; }
  // Experts the host's memory serves per token: every miss (copied or run on the host) and every prefetch.
  double host_reads_per_token() const {
    return num_tokens ? static_cast<double>(misses + prefetch_inserted) / num_tokens : 0.0;
  }
  // Share of prefetched experts used before eviction.
  double prefetch_precision() const {
    return prefetch_inserted ? static_cast<double>(prefetch_used) / prefetch_inserted : 0.0;
  }
  // Share of the accesses the cache did not hold on its own (misses + prefetch hits) that prefetch covered.
  double prefetch_recall() const {
    return prefetch_used + misses ? static_cast<double>(prefetch_used) / (prefetch_used + misses) : 0.0;
  }
};

// Cache capacity in slots for a fraction (rounded to nearest). Throws BudgetError if it cannot hold
// the top_k experts of one token at one layer.
int64_t cache_slots_for(const Trace& trace, CacheScope scope, double cache_fraction);

// Throws UsageError on unknown names and bad settings, BudgetError on a cache below top_k.
SimResult simulate(const Trace& trace, const SimConfig& config);

}  // namespace moex
