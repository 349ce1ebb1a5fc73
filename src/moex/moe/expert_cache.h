// Slot bookkeeping of the expert cache: which experts are resident, which are pinned (in use or being
// written), and which to evict, with the budget per layer or global, in slots or bytes. It holds no
// weights and knows no device: the expert store maps keys to memory; the trace simulator and the
// engine drive the same object. Not thread-safe: one owner (the provider's scheduling thread).
// Scan steps (a prefill touching nearly every expert of every layer) are ranked apart from the policy so that a
// model larger than the cache keeps a stable subset across prompts instead of cycling everything (see AccessKind).
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "moex/moe/expert_provider.h"
#include "moex/moe/policy/eviction_policy.h"

namespace moex {

enum class CacheScope : uint8_t {
  kPerLayer,  // each layer has its own budget; a miss evicts only within its layer
  kGlobal,    // one budget shared by all layers; a miss may evict any layer's expert
};

struct ExpertCacheConfig {
  int32_t num_layers = 0;
  int32_t num_experts = 0;
  CacheScope scope = CacheScope::kPerLayer;
  // Exactly one of the two budgets is > 0. Slots count experts; bytes use expert_bytes. The budget is
  // per layer with kPerLayer, for the whole model with kGlobal.
  int64_t capacity_slots = 0;
  int64_t capacity_bytes = 0;
  // Bytes of one expert: one value for all layers, or one per layer. Needed with capacity_bytes.
  std::vector<int64_t> expert_bytes;
  // Units (slots or bytes, per scope) that scan steps keep for experts resident across scans (AccessKind::kScan);
  // < 0: what is left of the capacity after one layer's experts, or a quarter of it when a layer does not fit.
  int64_t scan_keep = -1;
  // With kGlobal: the kept segment is shared evenly by the layers (each keeps at most scan_keep / num_layers,
  // rounded up to whole experts), instead of going to the first layers a scan visits. A streamed scan then finds
  // kept experts in every layer, whose compute overlaps the copies of that layer's misses, where a kept
  // first layer left the link idle while the device computed it.
  bool keep_by_layer = false;
  // A demand miss that must evict asks the policy whether the key is worth its victim (EvictionPolicy::admit);
  // a declined miss is kBypassed: served outside the cache, nothing evicted. For callers that can serve a miss
  // without a slot (misses computed on the host); with belady it gives the fewest reads of host memory any
  // cache of this size can do (Belady's MIN with bypass), the trace simulator's lower bound.
  bool policy_admission = false;
};

// How a step uses the cache. kDemand: the policy alone ranks victims (decode, the trace simulator). kScan: the
// step routes to nearly every expert of the layer (a prefill of many tokens), so each layer's experts are used
// once and then not before the same layer of the next scan: a cyclic scan longer than the cache, where LRU
// evicts exactly what the next scan needs first and hits nothing. A scan step therefore admits its misses into
// a kept segment while it has room (scan_keep units) and marks the others streamed; streamed experts are the
// first victims, most recently inserted first (LRU insertion at the LRU end, the LIP/BIP rule that keeps a
// cyclic scan's first part resident), and the kept segment shrinks by the policy only down to scan_keep. We
// chose this over SLRU/LIRS/2Q because it needs one flag per slot and no history, and leaves the policy in
// charge of everything else. A streamed expert hit by a later step joins the kept segment if it has room (in a
// kDemand step always); its first use after a prefetch does not count, since the prefetch was for that use.
enum class AccessKind : uint8_t { kDemand, kScan };

enum class CacheOutcome : uint8_t {
  kHit,     // resident already
  kMiss,    // made resident now (the caller loads its weights), evicting if needed
  kNoRoom,  // not resident and nothing evictable: everything in its scope is pinned
  kBypassed,  // not resident, and the caller serves it outside the cache (acquire's bypass_misses, or the policy
              // declined it: ExpertCacheConfig::policy_admission)
};

enum class InsertOutcome : uint8_t { kInserted, kAlreadyResident, kNoRoom };

struct ExpertCacheStats {
  int64_t hits = 0;
  int64_t misses = 0;
  int64_t no_room = 0;
  int64_t bypassed = 0;  // misses served outside the cache (counted in misses too)
  int64_t declined = 0;  // of those, the ones the policy declined to admit (policy_admission)
  int64_t evictions = 0;
  int64_t prefetch_inserts = 0;
  int64_t prefetch_used = 0;    // prefetched experts whose first demand access came before eviction
  int64_t prefetch_unused = 0;  // prefetched experts evicted (or dropped) before any demand access
};

class ExpertCache {
 public:
  // Throws BudgetError when the budget cannot hold one expert and UsageError on a malformed config.
  ExpertCache(ExpertCacheConfig config, std::unique_ptr<EvictionPolicy> policy);

  // Demand access for one layer step: pins every key (each pin is undone by one release()). Resident
  // keys are pinned first so that loading the others never evicts an expert of the same step. Keys are
  // visited in ascending (layer, expert) order, one policy tick each, which defines tie-breaking.
  // outcomes[i] answers keys[i]; keys with kNoRoom are not pinned. Evicted keys are appended to
  // *evicted (the caller frees their memory). Duplicate keys are a bug.
  // bypass_misses (empty, or one flag per key): a flagged key that is not resident is served outside the cache
  // (a missed expert computed on the host over its host copy): kBypassed, not pinned, nothing is evicted for it
  // and it does not become resident, but the policy sees the use as a demand access, in the same order.
  void acquire(std::span<const ExpertKey> keys, std::span<CacheOutcome> outcomes,
               std::vector<ExpertKey>* evicted, AccessKind kind = AccessKind::kDemand,
               std::span<const uint8_t> bypass_misses = {});
  // Unpins keys that acquire() or pin() pinned.
  void release(std::span<const ExpertKey> keys);

  // Makes a key resident without a demand access (prefetch). Not pinned. With kScan the key is streamed and
  // may evict only streamed experts of other layers (never the kept segment, nor its own layer's experts).
  InsertOutcome insert(ExpertKey key, std::vector<ExpertKey>* evicted, AccessKind kind = AccessKind::kDemand);
  // Pins a resident key (e.g. while a copy reads or writes its slot); false if not resident.
  bool pin(ExpertKey key);
  void unpin(ExpertKey key);
  // Drops a resident, unpinned key; false if absent or pinned.
  bool erase(ExpertKey key);

  void begin_request() { policy_->on_request_begin(); }
  void end_request() { policy_->on_request_end(); }

  bool contains(ExpertKey key) const { return slot(key).resident; }
  int32_t pin_count(ExpertKey key) const { return slot(key).pins; }
  // Resident experts of one layer, ascending.
  std::vector<int32_t> resident_experts(int32_t layer_idx) const;
  int64_t num_resident() const { return num_resident_; }
  // Units in use in the scope of layer_idx (slots or bytes), and the capacity of that scope.
  int64_t used(int32_t layer_idx) const;
  int64_t capacity() const { return capacity_; }
  bool is_streamed(ExpertKey key) const { return slot(key).streamed; }
  int64_t expert_bytes(int32_t layer_idx) const;

  const ExpertCacheConfig& config() const { return config_; }
  const EvictionPolicy& policy() const { return *policy_; }
  const ExpertCacheStats& stats() const { return stats_; }

 private:
  struct Slot {
    bool resident = false;
    bool prefetched_unused = false;
    bool streamed = false;  // a scan step's expert outside the kept segment: evicted first
    int32_t pins = 0;
    int64_t insert_tick = 0;
  };

  size_t index(ExpertKey key) const;
  Slot& slot(ExpertKey key) { return slots_[index(key)]; }
  const Slot& slot(ExpertKey key) const { return slots_[index(key)]; }
  int64_t cost(int32_t layer_idx) const;
  int32_t scope_of(int32_t layer_idx) const;
  enum class Room : uint8_t { kMade, kNone, kDeclined };
  // Evicts until `key` fits. kNone (nothing evicted) if the unpinned keys of its scope cannot free enough;
  // kDeclined (nothing evicted) if policy admission turned a demand miss away. kind and prefetch: how the key
  // enters (see AccessKind and insert()).
  Room make_room(ExpertKey key, std::vector<ExpertKey>* evicted, AccessKind kind, bool prefetch);
  // Whether a key that is (or becomes) kept fits in the kept segment of its scope.
  bool keep_has_room(ExpertKey key) const;
  // A streamed expert joins the kept segment.
  void promote(ExpertKey key);
  void add(ExpertKey key, bool streamed);
  void remove(ExpertKey key);

  ExpertCacheConfig config_;
  std::unique_ptr<EvictionPolicy> policy_;
  int64_t capacity_ = 0;
  std::vector<Slot> slots_;    // [layer][expert]
  std::vector<int64_t> used_;  // per scope: one per layer, or one
  std::vector<int64_t> kept_used_;  // per scope: units of resident experts that are not streamed
  std::vector<int64_t> kept_in_layer_;  // per layer: units of kept experts (keep_by_layer's quota)
  int64_t layer_keep_quota_ = 0;        // keep_by_layer: units each layer may keep (0: no quota)
  int64_t scan_keep_ = 0;
  int64_t num_resident_ = 0;
  int64_t tick_ = 0;
  ExpertCacheStats stats_;
  // Scratch, reused so that a steady-state step allocates nothing.
  std::vector<ExpertKey> candidates_;
  std::vector<ExpertKey> victims_;
  std::vector<size_t> order_;
  std::vector<uint8_t> was_resident_;
};

}  // namespace moex
