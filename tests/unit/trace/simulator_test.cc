// The simulator on small synthetic traces whose outcome can be worked out by hand or bounded exactly.
#include <algorithm>
#include <random>

#include <gtest/gtest.h>

#include "moex/core/error.h"
#include "moex/trace/simulator.h"

namespace moex {
namespace {

// One request per entry; each token lists its experts per layer.
Trace make_trace(int32_t num_layers, int32_t num_experts, int32_t top_k,
                 const std::vector<std::vector<std::vector<std::vector<int32_t>>>>& requests) {
  Trace trace;
  trace.model = "synthetic";
  trace.num_layers = num_layers;
  trace.num_experts = num_experts;
  trace.top_k = top_k;
  for (const auto& tokens : requests) {
    TraceRequest request;
    request.id = fmt::format("r{}", trace.requests.size());  // "r" + to_string trips GCC 12 -Wrestrict
    request.num_tokens = static_cast<int64_t>(tokens.size());
    for (const auto& layers : tokens)
      for (const auto& ids : layers) request.expert_ids.insert(request.expert_ids.end(), ids.begin(), ids.end());
    trace.requests.push_back(std::move(request));
  }
  return trace;
}

// Seeded random routing with some token-to-token reuse.
Trace random_trace(int32_t num_requests, int32_t num_tokens, int32_t num_layers, int32_t num_experts, int32_t top_k,
                   uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<std::vector<std::vector<std::vector<int32_t>>>> requests(num_requests);
  for (auto& tokens : requests)
    for (int32_t t = 0; t < num_tokens; ++t) {
      std::vector<std::vector<int32_t>> layers;
      for (int32_t l = 0; l < num_layers; ++l) {
        std::vector<int32_t> all(num_experts);
        for (int32_t e = 0; e < num_experts; ++e) all[e] = e;
        std::shuffle(all.begin(), all.end(), rng);
        layers.emplace_back(all.begin(), all.begin() + top_k);
      }
      tokens.push_back(layers);
    }
  return make_trace(num_layers, num_experts, top_k, requests);
}

TEST(Simulator, HandCheckedLruAndBelady) {
  // One layer, 4 experts, top-1, 50% cache = 2 slots: 0 1 2 0 1 2 0.
  // LRU: every access misses (cyclic pattern one larger than the cache).
  // Belady: M M M(evict 1) H M(evict 0? next uses: 0 at 6, 2 at 5 -> evict 0) H M = 2 hits.
  Trace trace = make_trace(1, 4, 1, {{{{0}}, {{1}}, {{2}}, {{0}}, {{1}}, {{2}}, {{0}}}});
  SimConfig config;
  config.cache_fraction = 0.5;
  SimResult lru = simulate(trace, config);
  EXPECT_EQ(lru.cache_slots, 2);
  EXPECT_EQ(lru.hits, 0);
  EXPECT_EQ(lru.misses, 7);
  config.policy = "belady";
  SimResult belady = simulate(trace, config);
  EXPECT_EQ(belady.hits, 2);
  EXPECT_EQ(belady.layer_hits, (std::vector<int64_t>{2}));
}

TEST(Simulator, PerfectPregateMissesOnlyAtRequestStarts) {
  Trace trace = random_trace(3, 40, 4, 8, 2, 5);
  SimConfig config;
  config.predictor = "pregate";
  config.pregate_accuracy = 1.0;
  for (const char* policy : {"lru", "lfu", "activation", "belady"}) {
    config.policy = policy;
    SimResult r = simulate(trace, config);
    // Only layer 0 of each request's first token has no lookahead: at most 3 requests x 2 misses.
    EXPECT_LE(r.misses, 6) << policy;
    EXPECT_DOUBLE_EQ(r.prediction.precision(), 1.0) << policy;
    EXPECT_DOUBLE_EQ(r.prefetch_precision(), 1.0) << policy;
  }
}

// Recorded pre-gating logits (as `moex trace record --pregate-logits` writes them) replace the synthetic ones:
// logits that point at each layer's true experts make every layer after the first hit; logits that point
// elsewhere predict nothing right.
TEST(Simulator, RecordedPregateLogitsDriveThePredictor) {
  Trace trace = random_trace(2, 30, 4, 8, 2, 13);
  auto record = [&](bool truthful) {
    for (TraceRequest& request : trace.requests) {
      request.pregate_logits.assign(static_cast<size_t>(request.num_tokens * trace.num_layers * trace.num_experts), 0.f);
      for (int64_t t = 0; t < request.num_tokens; ++t)
        for (int32_t l = 1; l < trace.num_layers; ++l) {
          float* logits = request.pregate_logits.data() + (t * trace.num_layers + l) * trace.num_experts;
          auto truth = trace.experts(request, t, l);
          for (int32_t e = 0; e < trace.num_experts; ++e) {
            const bool chosen = std::find(truth.begin(), truth.end(), e) != truth.end();
            logits[e] = chosen == truthful ? 5.f + static_cast<float>(e) : static_cast<float>(-e);
          }
        }
    }
  };
  SimConfig config;
  config.predictor = "pregate";
  config.cache_fraction = 0.5;
  config.pregate_accuracy = 0.0;  // would make every synthetic guess wrong: must be ignored
  record(true);
  SimResult right = simulate(trace, config);
  EXPECT_TRUE(right.pregate_recorded);
  for (int32_t l = 1; l < trace.num_layers; ++l) EXPECT_EQ(right.layer_hits[l], right.layer_accesses[l]) << "layer " << l;
  EXPECT_GT(right.prediction.num_correct, 0);
  record(false);
  SimResult wrong = simulate(trace, config);
  for (int32_t l = 1; l < trace.num_layers; ++l) EXPECT_LT(wrong.layer_hits[l], wrong.layer_accesses[l]) << "layer " << l;
  EXPECT_LT(wrong.prediction.precision(), 0.5 * right.prediction.precision());
}

TEST(Simulator, PregateAccuracyZeroPrefetchesOnlyWrongExperts) {
  Trace trace = random_trace(2, 30, 3, 8, 2, 9);
  SimConfig config;
  config.predictor = "pregate";
  config.pregate_accuracy = 0.0;
  SimResult r = simulate(trace, config);
  EXPECT_EQ(r.prediction.num_correct, 0);
  EXPECT_GT(r.prefetch_inserted, 0);
  // A wrong guess can still be hit later by another token, so prefetch_used is not 0; it stays far
  // below what correct guesses get.
  config.pregate_accuracy = 1.0;
  EXPECT_LT(r.prefetch_precision(), 0.5 * simulate(trace, config).prefetch_precision());
}

TEST(Simulator, LinkModelWithAmpleComputeTimeHidesEveryCorrectPrefetch) {
  Trace trace = random_trace(2, 30, 4, 8, 2, 3);
  SimConfig config;
  config.predictor = "pregate";
  config.pregate_accuracy = 1.0;
  config.prefetch_mode = PrefetchMode::kLink;
  config.expert_bytes = 1000;
  config.link_bytes_per_us = 1000;  // 1 us per expert
  config.chunk_bytes = 250;
  config.layer_compute_us = 10;     // room for 10 experts per layer
  SimResult r = simulate(trace, config);
  EXPECT_LE(r.misses, 4);  // 2 requests x top-2 at their first layer
  EXPECT_EQ(r.late_prefetches, 0);
  EXPECT_EQ(r.prefetch_cancelled, 0);
  EXPECT_EQ(r.bytes_moved, (r.misses + r.prefetch_inserted) * 1000);
  EXPECT_DOUBLE_EQ(r.stall_ms, r.misses / 2 * 2 * 1e-3);  // each cold layer waits for 2 experts, 2 us
  EXPECT_DOUBLE_EQ(r.compute_ms, 60 * 4 * 10 / 1e3);
}

TEST(Simulator, LinkModelWithNoComputeTimeMakesEveryPrefetchLate) {
  Trace trace = random_trace(1, 30, 4, 8, 2, 3);
  SimConfig base;
  SimResult demand_only = simulate(trace, base);
  SimConfig config = base;
  config.predictor = "pregate";
  config.pregate_accuracy = 1.0;
  config.prefetch_mode = PrefetchMode::kLink;
  config.expert_bytes = 1000;
  config.link_bytes_per_us = 1000;
  config.chunk_bytes = 1000;
  config.layer_compute_us = 0;
  SimResult r = simulate(trace, config);
  // Nothing can arrive early, so the hits are the cache's own.
  EXPECT_EQ(r.hits, demand_only.hits);
  EXPECT_GT(r.late_prefetches, 0);
  EXPECT_EQ(r.prefetch_used, 0);
}

// Misses on the CPU: without prefetch nothing is ever admitted, so every access is a host read and the cache
// stays empty; with perfect pre-gating the prefetches fill it and the host reads are the copies plus the few
// misses, which are then counted as CPU reads and not as copies.
TEST(Simulator, CpuMissesBypassTheCache) {
  Trace trace = random_trace(2, 30, 4, 8, 2, 17);
  SimConfig config;
  config.cpu_misses = true;
  config.cache_fraction = 0.5;
  SimResult alone = simulate(trace, config);
  EXPECT_EQ(alone.hits, 0);
  EXPECT_EQ(alone.misses, alone.accesses);
  EXPECT_EQ(alone.cpu_reads, alone.accesses);
  EXPECT_EQ(alone.bytes_moved, 0);

  config.predictor = "pregate";
  config.pregate_accuracy = 1.0;
  config.expert_bytes = 10;
  SimResult pregated = simulate(trace, config);
  EXPECT_LE(pregated.misses, 4);  // each request's first layer of its first token
  EXPECT_EQ(pregated.cpu_reads, pregated.misses);
  EXPECT_EQ(pregated.bytes_moved, pregated.prefetch_inserted * 10);  // the misses crossed no link
  // The same replay with misses copied moves those misses too.
  config.cpu_misses = false;
  SimResult copied = simulate(trace, config);
  EXPECT_EQ(copied.cpu_reads, 0);
  EXPECT_EQ(copied.bytes_moved, (copied.misses + copied.prefetch_inserted) * 10);
}

// MIN with bypass on 0 1 2 0 1 2 0 (one layer, top-1, 2 slots): 0 and 1 fill the free slots; 2 is next needed at 5,
// after both residents (0 at 3, 1 at 4), so it runs on the host; 0 and 1 hit; 2 again runs on the host (next use
// never); 0 hits. 3 hits, 4 host reads, against demand Belady's 2 hits and 5 copies.
TEST(Simulator, BeladyWithPolicyAdmissionIsMinWithBypass) {
  Trace trace = make_trace(1, 4, 1, {{{{0}}, {{1}}, {{2}}, {{0}}, {{1}}, {{2}}, {{0}}}});
  SimConfig config;
  config.cache_fraction = 0.5;
  config.policy = "belady";
  config.policy_admission = true;
  SimResult r = simulate(trace, config);
  EXPECT_EQ(r.hits, 3);
  EXPECT_EQ(r.misses, 4);
  EXPECT_EQ(r.cpu_reads, 2);  // the two declined misses; the two that found a free slot were copied
  config.policy_admission = false;
  EXPECT_EQ(simulate(trace, config).hits, 2);
  // lru and activation admit every miss: policy admission changes nothing for them.
  for (const char* policy : {"lru", "activation"}) {
    config.policy = policy;
    SimResult plain = simulate(trace, config);
    config.policy_admission = true;
    SimResult admitted = simulate(trace, config);
    config.policy_admission = false;
    EXPECT_EQ(admitted.hits, plain.hits) << policy;
    EXPECT_EQ(admitted.cpu_reads, 0) << policy;
  }
}

// The bound the CLI prints next to every row: no policy, predictor or miss path reads host memory less often
// per token than MIN with bypass at the same size (each miss is one read, copied or run on the host; a
// prefetch is one read too). Fails if the bypass rule is wrong in either direction (admitting a key needed
// later than its victim, or turning away one needed sooner).
TEST(Simulator, MinWithBypassBoundsEveryPolicyAndPredictor) {
  for (uint32_t seed : {3u, 5u, 8u}) {
    Trace trace = random_trace(3, 40, 4, 8, 2, seed);
    for (CacheScope scope : {CacheScope::kPerLayer, CacheScope::kGlobal})
      for (double fraction : {0.25, 0.5, 0.75}) {
        SimConfig bound;
        bound.scope = scope, bound.cache_fraction = fraction, bound.policy = "belady", bound.policy_admission = true;
        double min_reads = simulate(trace, bound).host_reads_per_token();
        bound.policy_admission = false;
        EXPECT_LE(min_reads, simulate(trace, bound).host_reads_per_token());
        for (const char* policy : {"lru", "lfu", "activation", "belady"})
          for (const char* predictor : {"", "stride", "affinity", "pregate"})
            for (int mode = 0; mode < 3; ++mode) {
              SimConfig config;
              config.scope = scope, config.cache_fraction = fraction, config.policy = policy;
              config.predictor = predictor;
              config.cpu_misses = mode == 1, config.policy_admission = mode == 2;
              EXPECT_GE(simulate(trace, config).host_reads_per_token(), min_reads - 1e-9)
                  << "seed " << seed << " fraction " << fraction << " " << policy << " " << predictor << " mode "
                  << mode;
            }
      }
  }
}

TEST(Simulator, GlobalScopeAndTrainingModesAreDeterministic) {
  Trace trace = random_trace(4, 20, 4, 8, 2, 21);
  for (const char* predictor : {"frequency", "stride", "affinity", "eam", "bayes"}) {
    SimConfig config;
    config.scope = CacheScope::kGlobal;
    config.cache_fraction = 0.4;
    config.policy = "activation";
    config.predictor = predictor;
    config.training = PredictorTraining::kLeaveOneOut;
    SimResult a = simulate(trace, config), b = simulate(trace, config);
    EXPECT_EQ(a.cache_slots, 13);  // 0.4 * 32 rounded
    EXPECT_EQ(a.hits, b.hits) << predictor;
    EXPECT_EQ(a.prefetch_inserted, b.prefetch_inserted) << predictor;
    EXPECT_EQ(a.accesses, 4 * 20 * 4 * 2);
  }
}

TEST(Simulator, ErrorsAreClear) {
  Trace trace = random_trace(1, 5, 2, 8, 2, 1);
  SimConfig config;
  config.cache_fraction = 0.1;  // 1 slot < top_k
  try {
    simulate(trace, config);
    FAIL() << "expected BudgetError";
  } catch (const BudgetError& e) {
    EXPECT_NE(std::string(e.what()).find("below top_k = 2"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("at least 0.2500"), std::string::npos) << e.what();
  }
  config.cache_fraction = 0.5;
  config.policy = "random";
  EXPECT_THROW(simulate(trace, config), UsageError);
  config.policy = "lru";
  config.predictor = "pregate";
  config.prefetch_mode = PrefetchMode::kLink;
  try {
    simulate(trace, config);
    FAIL() << "expected UsageError";
  } catch (const UsageError& e) {
    EXPECT_NE(std::string(e.what()).find("--expert-bytes"), std::string::npos) << e.what();
  }
  config.prefetch_mode = PrefetchMode::kIdeal;
  config.cpu_misses = config.policy_admission = true;
  EXPECT_THROW(simulate(trace, config), UsageError);
}

}  // namespace
}  // namespace moex
