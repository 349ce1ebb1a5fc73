// ExpertCache with each eviction policy on sequences small enough to check by hand, Belady against
// brute force, and pin safety under random operations.
#include <algorithm>
#include <functional>
#include <random>

#include <gtest/gtest.h>

#include "moex/core/error.h"
#include "moex/moe/expert_cache.h"

namespace moex {
namespace {

using Step = std::vector<int32_t>;  // the experts of one token at layer 0

ExpertCacheConfig one_layer(int32_t num_experts, int64_t slots) {
  ExpertCacheConfig config;
  config.num_layers = 1;
  config.num_experts = num_experts;
  config.capacity_slots = slots;
  return config;
}

// Several layers sharing one budget of `slots` experts.
ExpertCacheConfig global_slots(int32_t num_layers, int32_t num_experts, int64_t slots) {
  ExpertCacheConfig config;
  config.num_layers = num_layers;
  config.num_experts = num_experts;
  config.scope = CacheScope::kGlobal;
  config.capacity_slots = slots;
  return config;
}

std::vector<ExpertKey> future_of(const std::vector<Step>& steps) {
  std::vector<ExpertKey> keys;
  for (Step step : steps) {
    std::sort(step.begin(), step.end());
    for (int32_t expert_idx : step) keys.push_back({0, expert_idx});
  }
  return keys;
}

struct Replayed {
  std::string outcomes;  // per access: H (hit) or M (miss), steps separated by '|'
  std::vector<int32_t> evicted;
};

// Replays steps through a one-layer cache, releasing after each step like the engine does.
Replayed replay(const std::string& policy, int32_t num_experts, int64_t slots, const std::vector<Step>& steps) {
  PolicyOptions options{1, num_experts, policy == "belady" ? future_of(steps) : std::vector<ExpertKey>{}};
  ExpertCache cache(one_layer(num_experts, slots), make_eviction_policy(policy, options));
  Replayed out;
  for (const Step& step : steps) {
    std::vector<ExpertKey> keys;
    for (int32_t expert_idx : step) keys.push_back({0, expert_idx});
    std::vector<CacheOutcome> outcomes(keys.size());
    std::vector<ExpertKey> evicted;
    cache.acquire(keys, outcomes, &evicted);
    if (!out.outcomes.empty()) out.outcomes += '|';
    for (CacheOutcome outcome : outcomes) out.outcomes += outcome == CacheOutcome::kHit ? 'H' : 'M';
    for (ExpertKey key : evicted) out.evicted.push_back(key.expert_idx);
    cache.release(keys);
  }
  return out;
}

TEST(ExpertCache, LruEvictsLeastRecentlyUsed) {
  // 3 slots: 0 1 2 fill; 0 hits; 3 evicts 1 (oldest); 1 evicts 2; 0 hits.
  Replayed r = replay("lru", 8, 3, {{0}, {1}, {2}, {0}, {3}, {1}, {0}});
  EXPECT_EQ(r.outcomes, "M|M|M|H|M|M|H");
  EXPECT_EQ(r.evicted, (std::vector<int32_t>{1, 2}));
}

TEST(ExpertCache, LruTiesWithinAStepGoToTheLowerId) {
  // A step's experts are touched in ascending id order: {5, 2} leaves 2 older than 5.
  Replayed r = replay("lru", 8, 3, {{5, 2}, {7}, {1}});
  EXPECT_EQ(r.outcomes, "MM|M|M");
  EXPECT_EQ(r.evicted, (std::vector<int32_t>{2}));
}

TEST(ExpertCache, LfuKeepsCountsAcrossEvictions) {
  // 2 slots. Counts 0:2, 1:3; 2 evicts 0 (fewer uses). 0 comes back with count 3 (kept since the
  // start; a reset count would be 1) and evicts 2 (count 1). 3 then finds 0 and 1 tied at 3 and
  // evicts the less recent, 1; with reset counts it would have evicted 0.
  Replayed r = replay("lfu", 8, 2, {{0}, {0}, {1}, {1}, {1}, {2}, {0}, {3}});
  EXPECT_EQ(r.outcomes, "M|H|M|H|H|M|M|M");
  EXPECT_EQ(r.evicted, (std::vector<int32_t>{0, 2, 1}));
}

TEST(ExpertCache, LfuBreaksCountTiesByRecency) {
  // 0 and 1 both count 1; 1 is newer, so 2 evicts 0.
  Replayed r = replay("lfu", 8, 2, {{0}, {1}, {2}});
  EXPECT_EQ(r.evicted, (std::vector<int32_t>{0}));
}

TEST(ExpertCache, BeladyEvictsFarthestNextUse) {
  // 2 slots: 0 1, then 2 must evict; next uses: 0 at step 4, 1 at step 3 -> evict 0. Then 1 hits,
  // 0 misses and evicts 2 (never used again) rather than 1 (used at step 5).
  Replayed r = replay("belady", 8, 2, {{0}, {1}, {2}, {1}, {0}, {1}});
  EXPECT_EQ(r.outcomes, "M|M|M|H|M|H");
  EXPECT_EQ(r.evicted, (std::vector<int32_t>{0, 2}));
}

TEST(ExpertCache, ActivationPrefersTheRequestsOwnCounts) {
  // One request uses 0 twice and 1 once; 2 arrives into 2 slots: 1 (fewer activations) goes even
  // though 0 is older.
  Replayed r = replay("activation", 8, 2, {{0}, {0}, {1}, {2}});
  EXPECT_EQ(r.outcomes, "M|H|M|M");
  EXPECT_EQ(r.evicted, (std::vector<int32_t>{1}));
}

TEST(ExpertCache, ActivationResetsCountsPerRequest) {
  PolicyOptions options{1, 8, {}};
  ExpertCache cache(one_layer(8, 2), make_eviction_policy("activation", options));
  auto touch = [&](int32_t expert_idx) {
    ExpertKey key{0, expert_idx};
    CacheOutcome outcome;
    std::vector<ExpertKey> evicted;
    cache.acquire({&key, 1}, {&outcome, 1}, &evicted);
    cache.release({&key, 1});
    return evicted;
  };
  cache.begin_request();
  for (int i = 0; i < 5; ++i) touch(0);
  touch(1);
  cache.end_request();
  cache.begin_request();
  touch(1);  // new request: 1 has one activation, 0 none in this request
  EXPECT_EQ(touch(2), (std::vector<ExpertKey>{{0, 0}}));
}

TEST(ExpertCache, ActivationWithGlobalBudgetEvictsTheLayerNeededLast) {
  // 4 layers, global budget of 3 slots. Run layers 0, 1, 2 once each (one expert each). Layer 3's
  // miss must evict: the layer needed last is the one that just ran before it... candidates 0, 1, 2
  // have equal counts; after layer 3 runs, the next layer is 0, so layer 2 is the farthest.
  ExpertCache cache(global_slots(4, 4, 3), make_eviction_policy("activation", {4, 4, {}}));
  std::vector<ExpertKey> evicted;
  for (int32_t layer_idx = 0; layer_idx < 4; ++layer_idx) {
    ExpertKey key{layer_idx, 1};
    CacheOutcome outcome;
    cache.acquire({&key, 1}, {&outcome, 1}, &evicted);
    cache.release({&key, 1});
  }
  // While layer 3 is acquired the current layer is still 2, so distances are: layer 0 -> 1,
  // layer 1 -> 2, layer 2 -> 3 (needed last): layer 2 goes.
  EXPECT_EQ(evicted, (std::vector<ExpertKey>{{2, 1}}));
}

TEST(ExpertCache, CurrentStepExpertsAreCoResident) {
  // 2 slots hold {0, 1}; step {2, 3} must evict both, never one of its own.
  Replayed r = replay("lru", 8, 2, {{0, 1}, {2, 3}, {2, 3}});
  EXPECT_EQ(r.outcomes, "MM|MM|HH");
  std::vector<int32_t> evicted = r.evicted;
  std::sort(evicted.begin(), evicted.end());
  EXPECT_EQ(evicted, (std::vector<int32_t>{0, 1}));
}

TEST(ExpertCache, AllPinnedReturnsNoRoom) {
  ExpertCache cache(one_layer(8, 2), make_eviction_policy("lru", {1, 8, {}}));
  std::vector<ExpertKey> held = {{0, 0}, {0, 1}};
  std::vector<CacheOutcome> outcomes(2);
  cache.acquire(held, outcomes, nullptr);
  ExpertKey extra{0, 2};
  CacheOutcome outcome;
  std::vector<ExpertKey> evicted;
  cache.acquire({&extra, 1}, {&outcome, 1}, &evicted);
  EXPECT_EQ(outcome, CacheOutcome::kNoRoom);
  EXPECT_TRUE(evicted.empty());
  EXPECT_EQ(cache.insert(extra, &evicted), InsertOutcome::kNoRoom);
  EXPECT_FALSE(cache.contains(extra));
  EXPECT_EQ(cache.stats().no_room, 1);
  cache.release(held);
  cache.acquire({&extra, 1}, {&outcome, 1}, &evicted);
  EXPECT_EQ(outcome, CacheOutcome::kMiss);
  EXPECT_EQ(evicted, (std::vector<ExpertKey>{{0, 0}}));
}

// A bypassed miss (an expert computed on the host) takes no slot and evicts nothing, a flagged key that is
// resident is an ordinary hit, and the policy counts the bypassed uses: LFU then keeps an expert used three
// times on the host, once a prefetch brings it in, over one used twice.
TEST(ExpertCache, BypassedMissesEvictNothingAndStillCount) {
  ExpertCache cache(one_layer(8, 2), make_eviction_policy("lfu", {1, 8, {}}));
  std::vector<ExpertKey> evicted;
  std::vector<ExpertKey> first = {{0, 0}, {0, 1}};
  std::vector<CacheOutcome> outcomes(2);
  cache.acquire(first, outcomes, &evicted);
  cache.release(first);
  const ExpertKey host_run{0, 2};
  // 0 resident (flagged, but a hit) next to 2, not resident: bypassed.
  std::vector<ExpertKey> step = {{0, 0}, host_run};
  const std::vector<uint8_t> both = {1, 1};
  cache.acquire(step, outcomes, &evicted, AccessKind::kDemand, both);
  EXPECT_EQ(outcomes[0], CacheOutcome::kHit);
  EXPECT_EQ(outcomes[1], CacheOutcome::kBypassed);
  EXPECT_EQ(cache.pin_count(host_run), 0);
  cache.release({&step[0], 1});  // only the hit was pinned
  const uint8_t flag = 1;
  for (int use = 0; use < 2; ++use) {
    CacheOutcome outcome;
    cache.acquire({&host_run, 1}, {&outcome, 1}, &evicted, AccessKind::kDemand, {&flag, 1});
    EXPECT_EQ(outcome, CacheOutcome::kBypassed);
  }
  EXPECT_TRUE(evicted.empty());
  EXPECT_FALSE(cache.contains(host_run));
  EXPECT_EQ(cache.num_resident(), 2);
  EXPECT_EQ(cache.stats().bypassed, 3);
  EXPECT_EQ(cache.stats().misses, 2 + 3);
  EXPECT_EQ(cache.pin_count({0, 0}), 0);
  // Uses: 0 twice, 1 once, 2 three times (on the host). A prefetch of 2 evicts 1; a miss on 3 then evicts 0
  // (2 uses) and keeps 2 (3): with its host uses lost, 2 (0 uses) would go.
  EXPECT_EQ(cache.insert(host_run, &evicted), InsertOutcome::kInserted);
  EXPECT_EQ(evicted, (std::vector<ExpertKey>{{0, 1}}));
  evicted.clear();
  const ExpertKey next{0, 3};
  CacheOutcome outcome;
  cache.acquire({&next, 1}, {&outcome, 1}, &evicted);
  EXPECT_EQ(outcome, CacheOutcome::kMiss);
  EXPECT_EQ(evicted, (std::vector<ExpertKey>{{0, 0}}));
  EXPECT_TRUE(cache.contains(host_run));
}

// Policy admission: LFU admits a miss only when it was used more often than its victim (TinyLFU's rule); a declined
// miss is served outside the cache (kBypassed, counted as declined) and the victim stays. Free slots need no
// admission, and prefetches are never asked.
TEST(ExpertCache, LfuAdmissionKeepsTheMoreUsedResident) {
  ExpertCacheConfig config = one_layer(8, 2);
  config.policy_admission = true;
  ExpertCache cache(config, make_eviction_policy("lfu", {1, 8, {}}));
  std::vector<ExpertKey> evicted;
  auto use = [&](int32_t expert_idx) {
    ExpertKey key{0, expert_idx};
    CacheOutcome outcome;
    cache.acquire({&key, 1}, {&outcome, 1}, &evicted);
    if (outcome != CacheOutcome::kBypassed) cache.release({&key, 1});
    return outcome;
  };
  EXPECT_EQ(use(0), CacheOutcome::kMiss);  // free slots: admitted without asking
  EXPECT_EQ(use(0), CacheOutcome::kHit);
  EXPECT_EQ(use(1), CacheOutcome::kMiss);
  EXPECT_EQ(use(1), CacheOutcome::kHit);
  // 2 (first use) against the victim 0 (2 uses): declined, twice; the third use (3 > 2 uses) displaces 0.
  EXPECT_EQ(use(2), CacheOutcome::kBypassed);
  EXPECT_EQ(use(2), CacheOutcome::kBypassed);
  EXPECT_TRUE(evicted.empty());
  EXPECT_EQ(use(2), CacheOutcome::kMiss);
  EXPECT_EQ(evicted, (std::vector<ExpertKey>{{0, 0}}));
  EXPECT_EQ(cache.stats().declined, 2);
  EXPECT_EQ(cache.stats().bypassed, 2);
  // A prefetch is not asked: it evicts by rank alone.
  evicted.clear();
  EXPECT_EQ(cache.insert({0, 5}, &evicted), InsertOutcome::kInserted);
  EXPECT_EQ(evicted.size(), 1u);
}

TEST(ExpertCache, ByteBudgetWithUnequalExperts) {
  // Global 100-byte budget; layer 0 experts are 30 bytes, layer 1 experts 60 bytes.
  ExpertCacheConfig config;
  config.num_layers = 2;
  config.num_experts = 4;
  config.scope = CacheScope::kGlobal;
  config.capacity_bytes = 100;
  config.expert_bytes = {30, 60};
  ExpertCache cache(config, make_eviction_policy("lru", {2, 4, {}}));
  std::vector<ExpertKey> evicted;
  for (int32_t expert_idx = 0; expert_idx < 3; ++expert_idx)
    ASSERT_EQ(cache.insert({0, expert_idx}, &evicted), InsertOutcome::kInserted);
  EXPECT_EQ(cache.used(0), 90);
  // 60 bytes need two 30-byte victims, the two oldest.
  ASSERT_EQ(cache.insert({1, 0}, &evicted), InsertOutcome::kInserted);
  EXPECT_EQ(evicted, (std::vector<ExpertKey>{{0, 0}, {0, 1}}));
  EXPECT_EQ(cache.used(1), 90);
  EXPECT_EQ(cache.num_resident(), 2);
}

TEST(ExpertCache, BudgetBelowOneExpertIsAClearError) {
  ExpertCacheConfig config = one_layer(8, 0);
  config.capacity_bytes = 10;
  config.expert_bytes = {64};
  try {
    ExpertCache cache(config, make_eviction_policy("lru", {1, 8, {}}));
    FAIL() << "expected BudgetError";
  } catch (const BudgetError& e) {
    EXPECT_NE(std::string(e.what()).find("cannot hold one expert"), std::string::npos) << e.what();
  }
}

TEST(EvictionPolicyRegistry, UnknownNameListsTheKnownOnes) {
  try {
    make_eviction_policy("fifo", {1, 8, {}});
    FAIL() << "expected UsageError";
  } catch (const UsageError& e) {
    EXPECT_STREQ(e.what(), "unknown cache policy \"fifo\"; expected one of: lru, lfu, activation, belady");
  }
  EXPECT_THROW(make_eviction_policy("belady", {1, 8, {}}), UsageError);
}

// Fewest misses any eviction sequence achieves (demand loading), by exhaustive search.
int64_t brute_force_min_misses(const std::vector<Step>& steps, size_t step_idx, std::vector<int32_t> resident,
                               int64_t slots) {
  if (step_idx == steps.size()) return 0;
  const Step& step = steps[step_idx];
  int64_t misses = 0;
  std::vector<int32_t> missing;
  for (int32_t expert_idx : step)
    if (std::find(resident.begin(), resident.end(), expert_idx) == resident.end()) missing.push_back(expert_idx);
  misses = static_cast<int64_t>(missing.size());
  int64_t overflow = static_cast<int64_t>(resident.size() + missing.size()) - slots;
  std::vector<int32_t> evictable;
  for (int32_t expert_idx : resident)
    if (std::find(step.begin(), step.end(), expert_idx) == step.end()) evictable.push_back(expert_idx);
  int64_t best = INT64_MAX;
  // Try every subset of evictable of size max(overflow, 0).
  int64_t need = std::max<int64_t>(overflow, 0);
  std::function<void(size_t, std::vector<int32_t>&)> choose = [&](size_t from, std::vector<int32_t>& victims) {
    if (static_cast<int64_t>(victims.size()) == need) {
      std::vector<int32_t> next;
      for (int32_t expert_idx : resident)
        if (std::find(victims.begin(), victims.end(), expert_idx) == victims.end()) next.push_back(expert_idx);
      next.insert(next.end(), missing.begin(), missing.end());
      best = std::min(best, brute_force_min_misses(steps, step_idx + 1, next, slots));
      return;
    }
    for (size_t idx = from; idx < evictable.size(); ++idx) {
      victims.push_back(evictable[idx]);
      choose(idx + 1, victims);
      victims.pop_back();
    }
  };
  std::vector<int32_t> victims;
  choose(0, victims);
  return misses + best;
}

TEST(ExpertCache, BeladyIsOptimalOnTinyRandomCases) {
  std::mt19937 rng(7);
  for (int trial = 0; trial < 60; ++trial) {
    int32_t num_experts = 4 + trial % 3;
    int32_t top_k = 1 + trial % 2;
    int64_t slots = top_k + 1 + trial % 2;
    std::vector<Step> steps;
    for (int s = 0; s < 9; ++s) {
      std::vector<int32_t> all(num_experts);
      for (int32_t e = 0; e < num_experts; ++e) all[e] = e;
      std::shuffle(all.begin(), all.end(), rng);
      steps.emplace_back(all.begin(), all.begin() + top_k);
    }
    Replayed r = replay("belady", num_experts, slots, steps);
    int64_t misses = std::count(r.outcomes.begin(), r.outcomes.end(), 'M');
    int64_t optimum = brute_force_min_misses(steps, 0, {}, slots);
    EXPECT_EQ(misses, optimum) << "trial " << trial << " (seed 7)";
    // And no online policy beats it.
    for (const char* policy : {"lru", "lfu", "activation"}) {
      Replayed online = replay(policy, num_experts, slots, steps);
      EXPECT_GE(std::count(online.outcomes.begin(), online.outcomes.end(), 'M'), optimum) << policy;
    }
  }
}

TEST(ExpertCache, PinnedExpertsSurviveRandomOperations) {
  for (const char* policy : {"lru", "lfu", "activation"}) {
    std::mt19937 rng(11);
    ExpertCacheConfig config;
    config.num_layers = 3;
    config.num_experts = 6;
    config.scope = CacheScope::kGlobal;
    config.capacity_slots = 5;
    ExpertCache cache(config, make_eviction_policy(policy, {3, 6, {}}));
    std::vector<ExpertKey> pinned;  // with multiplicity, as pins are counted
    auto random_key = [&] {
      return ExpertKey{static_cast<int32_t>(rng() % 3), static_cast<int32_t>(rng() % 6)};
    };
    for (int op = 0; op < 20000; ++op) {
      std::vector<ExpertKey> evicted;
      switch (rng() % 5) {
        case 0: {  // a demand step of two distinct keys, held
          ExpertKey a = random_key(), b = random_key();
          if (a == b) break;
          std::vector<ExpertKey> keys = {a, b};
          std::vector<CacheOutcome> outcomes(2);
          cache.acquire(keys, outcomes, &evicted);
          for (size_t idx = 0; idx < 2; ++idx)
            if (outcomes[idx] != CacheOutcome::kNoRoom) pinned.push_back(keys[idx]);
          break;
        }
        case 1:  // prefetch
          cache.insert(random_key(), &evicted);
          break;
        case 2:  // pin a resident key (an in-flight copy)
          if (ExpertKey key = random_key(); cache.pin(key)) pinned.push_back(key);
          break;
        case 3:
        case 4:  // release something
          if (!pinned.empty()) {
            size_t idx = rng() % pinned.size();
            cache.unpin(pinned[idx]);
            pinned.erase(pinned.begin() + static_cast<std::ptrdiff_t>(idx));
          }
          break;
      }
      for (ExpertKey key : evicted)
        ASSERT_EQ(std::count(pinned.begin(), pinned.end(), key), 0)
            << policy << ": evicted pinned (" << key.layer_idx << ", " << key.expert_idx << ") at op " << op;
      for (ExpertKey key : pinned) ASSERT_TRUE(cache.contains(key)) << policy << " op " << op;
      ASSERT_LE(cache.used(0), cache.capacity());
      ASSERT_EQ(cache.num_resident(), cache.used(0));
    }
  }
}

// Two prompts of a prefill that routes to every expert of every layer, Mixtral-8x7B's shape (4 layers x 8
// experts, as in bench/offload/models/mixtral_8x7b_l4) with 12 slots; returns the hits of the second prompt.
int64_t second_scan_hits(const std::string& policy, AccessKind kind) {
  ExpertCache cache(global_slots(4, 8, 12), make_eviction_policy(policy, {4, 8, {}}));
  std::vector<ExpertKey> keys;
  std::vector<CacheOutcome> outcomes(8);
  int64_t hits = 0;
  for (int prompt = 0; prompt < 2; ++prompt) {
    const int64_t before = cache.stats().hits;
    for (int32_t layer_idx = 0; layer_idx < 4; ++layer_idx) {
      keys.clear();
      for (int32_t expert_idx = 0; expert_idx < 8; ++expert_idx) keys.push_back({layer_idx, expert_idx});
      cache.acquire(keys, outcomes, nullptr, kind);
      for (CacheOutcome outcome : outcomes) EXPECT_NE(outcome, CacheOutcome::kNoRoom);
      cache.release(keys);
    }
    hits = cache.stats().hits - before;
  }
  return hits;
}

TEST(ExpertCacheScan, CyclicScanKeepsWhatExceedsOneLayer) {
  for (const std::string policy : {"lru", "lfu", "activation"}) {
    SCOPED_TRACE(policy);
    EXPECT_EQ(second_scan_hits(policy, AccessKind::kScan), 4);  // 12 slots - one layer's 8
  }
  EXPECT_EQ(second_scan_hits("lru", AccessKind::kDemand), 0);  // LRU evicts what the next scan needs first
}

// keep_by_layer: the kept segment (4 of 12 slots here, what one layer's 8 leave) is shared by the 4 layers, one
// expert each, instead of going whole to the first layer the scan visits: the second scan hits in every layer.
TEST(ExpertCacheScan, KeepByLayerSpreadsTheKeptSegment) {
  for (bool by_layer : {false, true}) {
    SCOPED_TRACE(by_layer ? "by layer" : "first come");
    ExpertCacheConfig config = global_slots(4, 8, 12);
    config.keep_by_layer = by_layer;
    ExpertCache cache(config, make_eviction_policy("lru", {4, 8, {}}));
    std::vector<ExpertKey> keys;
    std::vector<CacheOutcome> outcomes(8);
    std::vector<int64_t> layer_hits(4, 0);
    for (int prompt = 0; prompt < 2; ++prompt) {
      for (int32_t layer_idx = 0; layer_idx < 4; ++layer_idx) {
        keys.clear();
        for (int32_t expert_idx = 0; expert_idx < 8; ++expert_idx) keys.push_back({layer_idx, expert_idx});
        cache.acquire(keys, outcomes, nullptr, AccessKind::kScan);
        if (prompt == 1)
          layer_hits[layer_idx] = std::count(outcomes.begin(), outcomes.end(), CacheOutcome::kHit);
        cache.release(keys);
      }
    }
    if (by_layer) {  // (a streamed expert of layer 0 may survive the scan too)
      for (int64_t hits : layer_hits) EXPECT_GE(hits, 1);
    } else {
      EXPECT_EQ(layer_hits, (std::vector<int64_t>{4, 0, 0, 0}));
    }
  }
}

// A scan prefetch evicts only streamed experts of other layers: never the kept segment, never its own layer.
TEST(ExpertCacheScan, ScanPrefetchSparesKeptExpertsAndItsOwnLayer) {
  ExpertCacheConfig config = global_slots(2, 4, 6);
  config.scan_keep = 2;
  ExpertCache cache(config, make_eviction_policy("lru", {2, 4, {}}));
  std::vector<ExpertKey> keys = {{0, 0}, {0, 1}, {0, 2}, {0, 3}};
  std::vector<CacheOutcome> outcomes(4);
  cache.acquire(keys, outcomes, nullptr, AccessKind::kScan);
  EXPECT_FALSE(cache.is_streamed({0, 0}));  // the first two fill the kept segment
  EXPECT_FALSE(cache.is_streamed({0, 1}));
  EXPECT_TRUE(cache.is_streamed({0, 2}));
  std::vector<ExpertKey> evicted;
  EXPECT_EQ(cache.insert({1, 0}, &evicted, AccessKind::kScan), InsertOutcome::kInserted);  // free slots
  EXPECT_EQ(cache.insert({1, 1}, &evicted, AccessKind::kScan), InsertOutcome::kInserted);
  // Full; layer 0 still pinned: nothing a scan prefetch may evict.
  EXPECT_EQ(cache.insert({1, 2}, &evicted, AccessKind::kScan), InsertOutcome::kNoRoom);
  cache.release(keys);
  // Streamed (0, 3) then (0, 2) go, most recently inserted first; the kept (0, 0), (0, 1) and layer 1 stay.
  EXPECT_EQ(cache.insert({1, 2}, &evicted, AccessKind::kScan), InsertOutcome::kInserted);
  EXPECT_EQ(cache.insert({1, 3}, &evicted, AccessKind::kScan), InsertOutcome::kInserted);
  EXPECT_EQ(evicted, (std::vector<ExpertKey>{{0, 3}, {0, 2}}));
  EXPECT_TRUE(cache.contains({0, 0}) && cache.contains({0, 1}) && cache.contains({1, 0}));
}

}  // namespace
}  // namespace moex
