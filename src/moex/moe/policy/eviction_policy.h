// Eviction policies for the expert cache, behind one interface and a registry by name. A policy only
// ranks; the cache owns residency and pins, so no policy can evict an expert in use. Pure logic over
// expert ids and a logical tick (one tick per cache access or insertion): no clock, no threads.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "moex/moe/expert_provider.h"

namespace moex {

class EvictionPolicy {
 public:
  virtual ~EvictionPolicy() = default;
  virtual std::string_view name() const = 0;

  // A demand use of a resident key (after its insertion on a miss). Within one acquire the cache
  // touches keys in ascending (layer, expert) order, one tick each.
  virtual void on_access(ExpertKey key, int64_t tick) = 0;
  // The key became resident (demand miss or prefetch); on a miss on_access follows with tick + 1.
  virtual void on_insert(ExpertKey key, int64_t tick) = 0;
  virtual void on_evict(ExpertKey key) = 0;
  // Returns the index in `candidates` (resident, unpinned, in the scope that must make room; never
  // empty) of the key to evict.
  virtual size_t choose_victim(std::span<const ExpertKey> candidates, int64_t tick) = 0;
  // Asked only by a cache with policy admission (ExpertCacheConfig::policy_admission), before a demand miss on
  // `key` evicts `victim` (this policy's pick): is the key worth the victim's slot? When not, the miss is served
  // outside the cache (run on the host) and the victim stays. Called before the key's on_access.
  virtual bool admit(ExpertKey key, ExpertKey victim, int64_t tick) {
    (void)key, (void)victim, (void)tick;
    return true;
  }

  // Request (sequence) boundaries, for policies that keep per-request state.
  virtual void on_request_begin() {}
  virtual void on_request_end() {}
};

// What a policy may need to know at construction.
struct PolicyOptions {
  int32_t num_layers = 0;
  int32_t num_experts = 0;
  // The complete demand-access sequence, in the order the cache will see on_access (belady only:
  // simulation of the offline optimum).
  std::vector<ExpertKey> future_accesses;
};

// Names: "lru", "lfu", "activation", "belady". Throws UsageError on an unknown name (listing the
// known ones) and on "belady" without future_accesses.
std::unique_ptr<EvictionPolicy> make_eviction_policy(std::string_view name, const PolicyOptions& options);
std::vector<std::string> eviction_policy_names();

}  // namespace moex
