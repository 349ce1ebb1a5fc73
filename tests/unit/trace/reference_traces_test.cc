// The simulator against the published reference numbers of ../shared/traces (README tables and each
// directory's stats.json). The traces live beside the repository, never in it: the tests skip when
// they are absent.
#include <cmath>
#include <filesystem>
#include <fstream>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "moex/trace/simulator.h"
#include "moex/trace/trace_stats.h"

namespace moex {
namespace {

const std::string kTraces = MOEX_SOURCE_DIR "/../shared/traces";

struct Reference {
  Trace trace;
  nlohmann::json stats;
};

bool load(const std::string& dir, Reference* out) {
  std::string path = kTraces + "/" + dir;
  if (!std::filesystem::exists(path + "/trace.jsonl") || !std::filesystem::exists(path + "/stats.json")) return false;
  out->trace = read_trace(path + "/trace.jsonl");
  std::ifstream in(path + "/stats.json");
  out->stats = nlohmann::json::parse(in);
  return true;
}

SimResult run(const Trace& trace, const std::string& policy, double fraction) {
  SimConfig config;
  config.policy = policy;
  config.cache_fraction = fraction;
  return simulate(trace, config);
}

double layer_rate(const SimResult& r, size_t layer_idx) {
  return static_cast<double>(r.layer_hits[layer_idx]) / r.layer_accesses[layer_idx];
}

TEST(ReferenceTraces, MixtralMatchesPublishedHitRates) {
  Reference ref;
  if (!load("mixtral-8x7b-speculative-moe", &ref)) GTEST_SKIP() << kTraces << " not present";
  const Trace& trace = ref.trace;
  ASSERT_EQ(trace.num_layers, 32);
  ASSERT_EQ(trace.num_experts, 8);
  ASSERT_EQ(trace.top_k, 2);
  ASSERT_EQ(trace.num_tokens(), 577);
  // README: @50% (C = 4) LRU 0.616, LFU 0.620, Belady 0.745; @25% (C = 2 = top_k) all 0.373.
  SimResult lru = run(trace, "lru", 0.5), lfu = run(trace, "lfu", 0.5), belady = run(trace, "belady", 0.5);
  EXPECT_EQ(lru.cache_slots, 4);
  EXPECT_NEAR(lru.hit_rate(), 0.616, 5e-4);
  EXPECT_NEAR(lfu.hit_rate(), 0.620, 5e-4);
  EXPECT_NEAR(belady.hit_rate(), 0.745, 5e-4);
  for (const char* policy : {"lru", "lfu", "belady", "activation"})
    EXPECT_NEAR(run(trace, policy, 0.25).hit_rate(), 0.373, 5e-4) << policy;
  // Per layer, LRU and Belady agree exactly with stats.json (the reference touches a token's experts
  // in ascending id order, as ExpertCache::acquire does). Its LFU breaks count ties in an order it
  // does not state; moex breaks them by recency and lands within 2 hits of it on every layer.
  const auto& layers = ref.stats["per_layer"];
  ASSERT_EQ(layers.size(), 32u);
  for (size_t layer_idx = 0; layer_idx < layers.size(); ++layer_idx) {
    EXPECT_NEAR(layer_rate(lru, layer_idx), layers[layer_idx]["lru_50%"].get<double>(), 1e-12) << layer_idx;
    EXPECT_NEAR(layer_rate(belady, layer_idx), layers[layer_idx]["belady_50%"].get<double>(), 1e-12) << layer_idx;
    EXPECT_NEAR(layer_rate(lfu, layer_idx), layers[layer_idx]["lfu_50%"].get<double>(), 2.0 / 1154 + 1e-12)
        << layer_idx;
  }
}

TEST(ReferenceTraces, FlameMatchesPublishedHitRates) {
  Reference ref;
  if (!load("flame-moe-290m-dynande", &ref)) GTEST_SKIP() << kTraces << " not present";
  const Trace& trace = ref.trace;
  ASSERT_EQ(trace.num_layers, 8);
  ASSERT_EQ(trace.num_experts, 64);
  ASSERT_EQ(trace.top_k, 6);
  ASSERT_EQ(trace.num_tokens(), 2048);
  // README: @25% (C = 16) LRU 0.261, LFU 0.294, Belady 0.521; @50% (C = 32) 0.529, 0.560, 0.787.
  struct Row {
    double fraction;
    const char* policy;
    double expected;
  };
  for (Row row : {Row{0.25, "lru", 0.261}, Row{0.25, "lfu", 0.294}, Row{0.25, "belady", 0.521},
                  Row{0.5, "lru", 0.529}, Row{0.5, "lfu", 0.560}, Row{0.5, "belady", 0.787}}) {
    SimResult r = run(trace, row.policy, row.fraction);
    // The published numbers are rounded to 3 decimals; with top-6 the reference's within-token touch
    // order (Python set order) differs from ascending ids, which moves single layers by < 0.5%.
    EXPECT_NEAR(r.hit_rate(), row.expected, 1e-3) << row.policy << " @" << row.fraction;
    std::string key = fmt::format("{}_{}%", row.policy, static_cast<int>(row.fraction * 100));
    for (size_t layer_idx = 0; layer_idx < 8; ++layer_idx)
      EXPECT_NEAR(layer_rate(r, layer_idx), ref.stats["per_layer"][layer_idx][key].get<double>(), 5e-3)
          << key << " layer " << layer_idx;
  }
}

TEST(ReferenceTraces, StatsMatchPublishedRoutingStructure) {
  for (const char* dir : {"mixtral-8x7b-speculative-moe", "flame-moe-290m-dynande"}) {
    Reference ref;
    if (!load(dir, &ref)) GTEST_SKIP() << kTraces << " not present";
    TraceStats stats = compute_trace_stats(ref.trace);
    const auto& summary = ref.stats["summary"];
    EXPECT_NEAR(stats.random_p_reuse, summary["random_baseline_p_reuse_any"].get<double>(), 1e-12) << dir;
    EXPECT_NEAR(stats.mean_load_skew(), summary["mean_load_skew_max_over_mean"].get<double>(), 1e-9) << dir;
    EXPECT_NEAR(stats.mean_p_reuse(), summary["mean_p_reuse_any"].get<double>(), 1e-9) << dir;
    EXPECT_NEAR(stats.mean_reuse_fraction(), summary["mean_reuse_fraction"].get<double>(), 1e-9) << dir;
    const auto& layers = ref.stats["per_layer"];
    for (size_t layer_idx = 0; layer_idx < layers.size(); ++layer_idx) {
      EXPECT_NEAR(stats.layers[layer_idx].load_skew, layers[layer_idx]["load_skew_max_over_mean"].get<double>(), 1e-9);
      EXPECT_EQ(stats.layers[layer_idx].unused_experts, layers[layer_idx]["experts_never_used"].get<int>());
    }
  }
}

}  // namespace
}  // namespace moex
