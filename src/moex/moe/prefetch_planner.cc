// Chunk-by-chunk scheduling of one copy link. The queue stays short (the experts of the next few
// layers), so picking the next item is a linear scan.
#include "moex/moe/prefetch_planner.h"

#include <algorithm>
#include <limits>

#include "moex/core/error.h"

namespace moex {

PrefetchPlanner::PrefetchPlanner(PlannerConfig config) : config_(config) {
  if (!(config_.bandwidth_bytes_per_us > 0) || config_.chunk_bytes <= 0)
    throw UsageError(fmt::format("prefetch planner: bandwidth ({} bytes/us) and chunk size ({} bytes) must be > 0",
                                 config_.bandwidth_bytes_per_us, config_.chunk_bytes));
}

int64_t PrefetchPlanner::find(ExpertKey key) const {
  for (size_t idx = 0; idx < items_.size(); ++idx)
    if (items_[idx].key == key && !items_[idx].cancelled) return static_cast<int64_t>(idx);
  return -1;
}

int64_t PrefetchPlanner::pick() const {
  int64_t best = -1;
  for (size_t idx = 0; idx < items_.size(); ++idx) {
    const Item& item = items_[idx];
    if (item.cancelled) continue;
    if (best < 0) {
      best = static_cast<int64_t>(idx);
      continue;
    }
    const Item& other = items_[best];
    bool better;
    if (item.kind != other.kind) {
      better = item.kind == TransferKind::kDemand;
    } else if (item.kind == TransferKind::kDemand) {
      better = item.seq < other.seq;
    } else if (item.priority != other.priority) {
      better = item.priority > other.priority;
    } else if (item.stale_after_step != other.stale_after_step) {
      better = item.stale_after_step < other.stale_after_step;
    } else {
      better = item.seq < other.seq;
    }
    if (better) best = static_cast<int64_t>(idx);
  }
  return best;
}

void PrefetchPlanner::prefetch(ExpertKey key, int64_t bytes, double priority, int64_t stale_after_step) {
  MOEX_ASSERT(bytes > 0, "prefetch of expert ({}, {}) with {} bytes", key.layer_idx, key.expert_idx, bytes);
  int64_t idx = find(key);
  if (idx >= 0) {
    Item& item = items_[idx];
    if (item.kind == TransferKind::kPrefetch) {
      item.priority = std::max(item.priority, priority);
      item.stale_after_step = std::max(item.stale_after_step, stale_after_step);
    }
    return;
  }
  items_.push_back({key, TransferKind::kPrefetch, bytes, 0, priority, stale_after_step, next_seq_++, false});
}

void PrefetchPlanner::demand(ExpertKey key, int64_t bytes) {
  MOEX_ASSERT(bytes > 0, "demand of expert ({}, {}) with {} bytes", key.layer_idx, key.expert_idx, bytes);
  int64_t idx = find(key);
  if (idx >= 0) {
    Item& item = items_[idx];
    if (item.kind == TransferKind::kPrefetch) {
      item.kind = TransferKind::kDemand;
      ++stats_.promoted;
    }
    return;
  }
  items_.push_back({key, TransferKind::kDemand, bytes, 0, 0.0, std::numeric_limits<int64_t>::max(), next_seq_++,
                    false});
}

void PrefetchPlanner::erase(size_t idx) { items_.erase(items_.begin() + static_cast<std::ptrdiff_t>(idx)); }

bool PrefetchPlanner::cancel(ExpertKey key) {
  int64_t idx = find(key);
  if (idx < 0 || items_[idx].kind == TransferKind::kDemand) return false;
  ++stats_.cancelled;
  if (items_[idx].seq == inflight_seq_) {
    items_[idx].cancelled = true;  // its chunk still runs; step() accounts the waste when it ends
  } else {
    stats_.bytes_wasted += items_[idx].copied;
    erase(static_cast<size_t>(idx));
  }
  return true;
}

int64_t PrefetchPlanner::cancel_stale(int64_t step) {
  int64_t count = 0;
  for (size_t idx = items_.size(); idx-- > 0;) {
    const Item& item = items_[idx];
    if (item.cancelled || item.kind == TransferKind::kDemand || item.stale_after_step >= step) continue;
    cancel(item.key);
    ++count;
  }
  return count;
}

bool PrefetchPlanner::step(double until_us, std::vector<TransferDone>* done) {
  if (inflight_seq_ >= 0) {
    if (inflight_end_us_ > until_us) return false;
    auto it = std::find_if(items_.begin(), items_.end(), [&](const Item& item) { return item.seq == inflight_seq_; });
    MOEX_ASSERT(it != items_.end(), "planner lost the in-flight transfer {}", inflight_seq_);
    now_us_ = std::max(now_us_, inflight_end_us_);
    it->copied += inflight_bytes_;
    stats_.bytes_copied += inflight_bytes_;
    inflight_seq_ = -1;
    if (it->cancelled) {
      stats_.bytes_wasted += it->copied;
      items_.erase(it);
    } else if (it->copied == it->bytes) {
      if (it->kind == TransferKind::kDemand) {
        ++stats_.demand_transfers;
      } else {
        ++stats_.prefetch_transfers;
      }
      if (done) done->push_back({it->key, it->kind, now_us_});
      items_.erase(it);
    }
    return true;
  }
  int64_t idx = pick();
  if (idx < 0 || now_us_ >= until_us) return false;
  Item& item = items_[idx];
  if (item.kind == TransferKind::kDemand && last_prefetch_seq_ >= 0 && last_prefetch_seq_ != item.seq) {
    auto prev = std::find_if(items_.begin(), items_.end(),
                             [&](const Item& other) { return other.seq == last_prefetch_seq_; });
    if (prev != items_.end() && prev->copied > 0 && prev->copied < prev->bytes) ++stats_.preemptions;
  }
  last_prefetch_seq_ = item.kind == TransferKind::kPrefetch ? item.seq : -1;
  inflight_seq_ = item.seq;
  inflight_bytes_ = std::min(config_.chunk_bytes, item.bytes - item.copied);
  inflight_end_us_ = now_us_ + static_cast<double>(inflight_bytes_) / config_.bandwidth_bytes_per_us;
  return true;
}

void PrefetchPlanner::advance_to(double until_us, std::vector<TransferDone>* done) {
  while (step(until_us, done)) {
  }
  now_us_ = std::max(now_us_, until_us);
}

double PrefetchPlanner::run_until_done(ExpertKey key, std::vector<TransferDone>* done) {
  MOEX_ASSERT(pending(key), "run_until_done: expert ({}, {}) is not pending", key.layer_idx, key.expert_idx);
  std::vector<TransferDone> local;
  std::vector<TransferDone>* sink = done ? done : &local;
  while (true) {
    size_t before = sink->size();
    bool moved = step(std::numeric_limits<double>::infinity(), sink);
    MOEX_ASSERT(moved, "planner idle while expert ({}, {}) is pending", key.layer_idx, key.expert_idx);
    for (size_t idx = before; idx < sink->size(); ++idx)
      if ((*sink)[idx].key == key) return (*sink)[idx].done_us;
  }
}

}  // namespace moex
