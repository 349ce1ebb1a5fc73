// Residency, pins and budgets; the eviction order comes from the policy.
#include "moex/moe/expert_cache.h"

#include <algorithm>

#include "moex/core/error.h"

namespace moex {
namespace {

bool key_less(ExpertKey a, ExpertKey b) {
  return a.layer_idx != b.layer_idx ? a.layer_idx < b.layer_idx : a.expert_idx < b.expert_idx;
}

}  // namespace

ExpertCache::ExpertCache(ExpertCacheConfig config, std::unique_ptr<EvictionPolicy> policy)
    : config_(std::move(config)), policy_(std::move(policy)) {
  if (config_.num_layers <= 0 || config_.num_experts <= 0)
    throw UsageError(fmt::format("expert cache: num_layers and num_experts must be > 0, got {} and {}",
                                 config_.num_layers, config_.num_experts));
  if ((config_.capacity_slots > 0) == (config_.capacity_bytes > 0))
    throw UsageError(fmt::format(
        "expert cache: set exactly one budget, capacity_slots ({}) or capacity_bytes ({})",
        config_.capacity_slots, config_.capacity_bytes));
  if (config_.capacity_bytes > 0) {
    size_t n = config_.expert_bytes.size();
    if (n != 1 && n != static_cast<size_t>(config_.num_layers))
      throw UsageError(fmt::format("expert cache: expert_bytes has {} values, expected 1 or num_layers = {}",
                                   n, config_.num_layers));
    for (int64_t bytes : config_.expert_bytes)
      if (bytes <= 0) throw UsageError(fmt::format("expert cache: expert_bytes must be > 0, got {}", bytes));
  }
  MOEX_ASSERT(policy_ != nullptr, "expert cache needs a policy");
  capacity_ = config_.capacity_slots > 0 ? config_.capacity_slots : config_.capacity_bytes;
  int64_t largest = 0;
  for (int32_t layer_idx = 0; layer_idx < config_.num_layers; ++layer_idx)
    largest = std::max(largest, cost(layer_idx));
  if (largest > capacity_)
    throw BudgetError(fmt::format("expert cache: budget of {} {} cannot hold one expert ({} {})", capacity_,
                                  config_.capacity_slots > 0 ? "slots" : "bytes", largest,
                                  config_.capacity_slots > 0 ? "slot" : "bytes"));
  slots_.resize(static_cast<size_t>(config_.num_layers) * config_.num_experts);
  used_.assign(config_.scope == CacheScope::kPerLayer ? config_.num_layers : 1, 0);
  kept_used_.assign(used_.size(), 0);
  // A scan step pins one layer's experts at a time (the rest of the model streams through what is left), so
  // what exceeds one layer can be kept across scans. When a layer does not fit (it runs in waves), a quarter
  // is kept: fewer bytes per scan at the price of smaller waves.
  const int64_t layer_units = largest * config_.num_experts;
  scan_keep_ = config_.scan_keep >= 0        ? std::min(config_.scan_keep, capacity_)
               : capacity_ > layer_units ? capacity_ - layer_units
                                         : capacity_ / 4;
  kept_in_layer_.assign(static_cast<size_t>(config_.num_layers), 0);
  if (config_.keep_by_layer && config_.scope == CacheScope::kGlobal) {
    const int64_t experts = (scan_keep_ / largest + config_.num_layers - 1) / config_.num_layers;
    layer_keep_quota_ = std::max<int64_t>(1, experts) * largest;
  }
}

size_t ExpertCache::index(ExpertKey key) const {
  MOEX_DCHECK(key.layer_idx >= 0 && key.layer_idx < config_.num_layers && key.expert_idx >= 0 &&
                  key.expert_idx < config_.num_experts,
              "expert ({}, {}) outside {} layers x {} experts", key.layer_idx, key.expert_idx,
              config_.num_layers, config_.num_experts);
  return static_cast<size_t>(key.layer_idx) * config_.num_experts + key.expert_idx;
}

int64_t ExpertCache::expert_bytes(int32_t layer_idx) const {
  if (config_.expert_bytes.empty()) return 0;
  return config_.expert_bytes.size() == 1 ? config_.expert_bytes[0] : config_.expert_bytes[layer_idx];
}

int64_t ExpertCache::cost(int32_t layer_idx) const {
  return config_.capacity_slots > 0 ? 1 : expert_bytes(layer_idx);
}

int32_t ExpertCache::scope_of(int32_t layer_idx) const {
  return config_.scope == CacheScope::kPerLayer ? layer_idx : 0;
}

int64_t ExpertCache::used(int32_t layer_idx) const { return used_[scope_of(layer_idx)]; }

std::vector<int32_t> ExpertCache::resident_experts(int32_t layer_idx) const {
  std::vector<int32_t> out;
  for (int32_t expert_idx = 0; expert_idx < config_.num_experts; ++expert_idx)
    if (slot({layer_idx, expert_idx}).resident) out.push_back(expert_idx);
  return out;
}

void ExpertCache::add(ExpertKey key, bool streamed) {
  Slot& s = slot(key);
  s.resident = true;
  s.streamed = streamed;
  s.insert_tick = tick_;
  used_[scope_of(key.layer_idx)] += cost(key.layer_idx);
  if (!streamed) {
    kept_used_[scope_of(key.layer_idx)] += cost(key.layer_idx);
    kept_in_layer_[key.layer_idx] += cost(key.layer_idx);
  }
  ++num_resident_;
}

void ExpertCache::remove(ExpertKey key) {
  Slot& s = slot(key);
  if (s.prefetched_unused) ++stats_.prefetch_unused;
  if (!s.streamed) {
    kept_used_[scope_of(key.layer_idx)] -= cost(key.layer_idx);
    kept_in_layer_[key.layer_idx] -= cost(key.layer_idx);
  }
  s = Slot{};
  used_[scope_of(key.layer_idx)] -= cost(key.layer_idx);
  --num_resident_;
  policy_->on_evict(key);
}

bool ExpertCache::keep_has_room(ExpertKey key) const {
  const int64_t unit = cost(key.layer_idx);
  return kept_used_[scope_of(key.layer_idx)] + unit <= scan_keep_ &&
         (layer_keep_quota_ == 0 || kept_in_layer_[key.layer_idx] + unit <= layer_keep_quota_);
}

void ExpertCache::promote(ExpertKey key) {
  Slot& s = slot(key);
  if (!s.streamed) return;
  s.streamed = false;
  kept_used_[scope_of(key.layer_idx)] += cost(key.layer_idx);
  kept_in_layer_[key.layer_idx] += cost(key.layer_idx);
}

ExpertCache::Room ExpertCache::make_room(ExpertKey key, std::vector<ExpertKey>* evicted, AccessKind kind,
                                         bool prefetch) {
  int32_t scope = scope_of(key.layer_idx);
  int64_t need = used_[scope] + cost(key.layer_idx) - capacity_;
  if (need <= 0) return Room::kMade;
  // Victims are chosen first and evicted only if together they free enough (policies rank without side effects).
  candidates_.clear();
  victims_.clear();
  int32_t first_layer = config_.scope == CacheScope::kPerLayer ? key.layer_idx : 0;
  int32_t end_layer = config_.scope == CacheScope::kPerLayer ? key.layer_idx + 1 : config_.num_layers;
  for (int32_t layer_idx = first_layer; layer_idx < end_layer; ++layer_idx)
    for (int32_t expert_idx = 0; expert_idx < config_.num_experts; ++expert_idx) {
      const Slot& s = slot({layer_idx, expert_idx});
      if (!s.resident || s.pins > 0) continue;
      if (kind == AccessKind::kScan && s.streamed) {
        // A scan prefetch never evicts its own layer's experts: they are this prefetch's hits.
        if (!(prefetch && layer_idx == key.layer_idx)) victims_.push_back({layer_idx, expert_idx});
      } else {
        candidates_.push_back({layer_idx, expert_idx});
      }
    }
  if (kind == AccessKind::kScan) {
    // Streamed experts first, the most recently inserted first (see AccessKind).
    std::sort(victims_.begin(), victims_.end(),
              [&](ExpertKey a, ExpertKey b) { return slot(a).insert_tick > slot(b).insert_tick; });
    size_t count = 0;
    while (count < victims_.size() && need > 0) need -= cost(victims_[count++].layer_idx);
    victims_.resize(count);
  }
  // The policy's part: every candidate for a demand step; for a scan step's demand, kept experts until the kept
  // segment is down to scan_keep; nothing for a scan prefetch.
  int64_t kept = kept_used_[scope];
  while (need > 0 && !candidates_.empty() && !(kind == AccessKind::kScan && (prefetch || kept <= scan_keep_))) {
    size_t pick = policy_->choose_victim(candidates_, tick_);
    MOEX_ASSERT(pick < candidates_.size(), "policy {} picked victim {} of {}", policy_->name(), pick,
                candidates_.size());
    ExpertKey victim = candidates_[pick];
    candidates_.erase(candidates_.begin() + static_cast<std::ptrdiff_t>(pick));
    victims_.push_back(victim);
    need -= cost(victim.layer_idx);
    if (!slot(victim).streamed) kept -= cost(victim.layer_idx);
  }
  if (need > 0) return Room::kNone;
  // Admission weighs the key against the policy's first victim (the only one where experts are equal in size).
  if (config_.policy_admission && kind == AccessKind::kDemand && !prefetch && !victims_.empty() &&
      !policy_->admit(key, victims_.front(), tick_))
    return Room::kDeclined;
  for (ExpertKey victim : victims_) {
    remove(victim);
    ++stats_.evictions;
    if (evicted) evicted->push_back(victim);
  }
  return Room::kMade;
}

void ExpertCache::acquire(std::span<const ExpertKey> keys, std::span<CacheOutcome> outcomes,
                          std::vector<ExpertKey>* evicted, AccessKind kind, std::span<const uint8_t> bypass_misses) {
  MOEX_ASSERT(outcomes.size() == keys.size(), "acquire: {} outcomes for {} keys", outcomes.size(),
              keys.size());
  MOEX_ASSERT(bypass_misses.empty() || bypass_misses.size() == keys.size(), "acquire: {} bypass flags for {} keys",
              bypass_misses.size(), keys.size());
  // Order of visit: ascending keys. A few keys per step, so an index sort is cheap.
  order_.resize(keys.size());
  for (size_t idx = 0; idx < keys.size(); ++idx) order_[idx] = idx;
  std::sort(order_.begin(), order_.end(), [&](size_t a, size_t b) { return key_less(keys[a], keys[b]); });
  for (size_t pos = 1; pos < order_.size(); ++pos)
    MOEX_ASSERT(!(keys[order_[pos]] == keys[order_[pos - 1]]), "acquire: expert ({}, {}) listed twice",
                keys[order_[pos]].layer_idx, keys[order_[pos]].expert_idx);
  was_resident_.assign(keys.size(), 0);
  for (size_t idx : order_) {
    Slot& s = slot(keys[idx]);
    if (s.resident) {
      ++s.pins;
      was_resident_[idx] = 1;
    }
  }
  for (size_t idx : order_) {
    ExpertKey key = keys[idx];
    Slot& s = slot(key);
    if (was_resident_[idx]) {
      outcomes[idx] = CacheOutcome::kHit;
      ++stats_.hits;
      if (s.prefetched_unused) {
        s.prefetched_unused = false;
        ++stats_.prefetch_used;
      } else if (s.streamed && (kind == AccessKind::kDemand || keep_has_room(key))) {
        promote(key);
      }
    } else {
      // A miss the caller flagged is declined by it before any room is made; one the policy turns away
      // (policy_admission) after. Either is served outside the cache.
      const bool flagged = !bypass_misses.empty() && bypass_misses[idx];
      const Room room = flagged ? Room::kDeclined : make_room(key, evicted, kind, false);
      if (room == Room::kNone) {
        outcomes[idx] = CacheOutcome::kNoRoom;
        ++stats_.no_room;
        continue;
      }
      ++stats_.misses;
      if (room == Room::kMade) {
        add(key, kind == AccessKind::kScan && !keep_has_room(key));
        ++s.pins;
        policy_->on_insert(key, tick_++);
        outcomes[idx] = CacheOutcome::kMiss;
      } else {
        outcomes[idx] = CacheOutcome::kBypassed;
        ++stats_.bypassed;
        if (!flagged) ++stats_.declined;
      }
    }
    policy_->on_access(key, tick_++);
  }
}

void ExpertCache::release(std::span<const ExpertKey> keys) {
  for (ExpertKey key : keys) unpin(key);
}

InsertOutcome ExpertCache::insert(ExpertKey key, std::vector<ExpertKey>* evicted, AccessKind kind) {
  Slot& s = slot(key);
  if (s.resident) return InsertOutcome::kAlreadyResident;
  if (make_room(key, evicted, kind, true) != Room::kMade) return InsertOutcome::kNoRoom;
  add(key, kind == AccessKind::kScan);
  s.prefetched_unused = true;
  ++stats_.prefetch_inserts;
  policy_->on_insert(key, tick_++);
  return InsertOutcome::kInserted;
}

bool ExpertCache::pin(ExpertKey key) {
  Slot& s = slot(key);
  if (!s.resident) return false;
  ++s.pins;
  return true;
}

void ExpertCache::unpin(ExpertKey key) {
  Slot& s = slot(key);
  MOEX_ASSERT(s.resident && s.pins > 0, "unpin of expert ({}, {}) that is not pinned", key.layer_idx,
              key.expert_idx);
  --s.pins;
}

bool ExpertCache::erase(ExpertKey key) {
  Slot& s = slot(key);
  if (!s.resident || s.pins > 0) return false;
  remove(key);
  return true;
}

}  // namespace moex
