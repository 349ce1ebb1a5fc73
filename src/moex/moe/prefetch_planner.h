// The prefetch planner: which expert the host-to-device link copies next. Transfers go in chunks; a
// chunk once started runs to its end (an async copy cannot be stopped), but at every chunk boundary an
// on-demand fetch overtakes all prefetches (ProMoE's chunked prefetch with early preemption).
// Prefetches carry a priority and the logical step they are for, and are dropped once that step has
// passed. Pure logic with an injected clock (microseconds, from the caller): the trace simulator runs
// it against a bandwidth model, the engine's copy engine will follow its decisions.
#pragma once

#include <cstdint>
#include <vector>

#include "moex/moe/expert_provider.h"

namespace moex {

struct PlannerConfig {
  double bandwidth_bytes_per_us = 0;  // the link's sustained rate (55 GB/s pinned PCIe 5 = 55'000)
  int64_t chunk_bytes = 0;            // preemption granularity
};

enum class TransferKind : uint8_t { kDemand, kPrefetch };

struct TransferDone {
  ExpertKey key;
  TransferKind kind = TransferKind::kPrefetch;
  double done_us = 0;
};

struct PlannerStats {
  int64_t demand_transfers = 0;    // finished demand fetches (incl. promoted prefetches)
  int64_t prefetch_transfers = 0;  // finished prefetches
  int64_t promoted = 0;            // prefetches that became demand fetches before finishing
  int64_t cancelled = 0;           // prefetches dropped (stale or cancelled)
  int64_t preemptions = 0;         // times a demand fetch overtook a started prefetch
  int64_t bytes_copied = 0;        // every byte that crossed the link, wasted ones included
  int64_t bytes_wasted = 0;        // bytes of cancelled transfers
};

class PrefetchPlanner {
 public:
  // Throws UsageError unless bandwidth and chunk size are > 0.
  explicit PrefetchPlanner(PlannerConfig config);

  // Queues a speculative copy of `bytes`. Higher priority goes first; among equal priorities the
  // earlier step, then the earlier request. stale_after_step: the logical step after which the copy is
  // useless. Re-queuing a pending key raises its priority and deadline; a pending demand is unchanged.
  void prefetch(ExpertKey key, int64_t bytes, double priority, int64_t stale_after_step);
  // Queues an urgent copy; a pending prefetch of the key is promoted and keeps its copied bytes.
  void demand(ExpertKey key, int64_t bytes);
  // Drops a pending prefetch (false for a demand or an unknown key). Bytes already copied are wasted;
  // a chunk in flight still occupies the link until it ends.
  bool cancel(ExpertKey key);
  // Drops every prefetch whose stale_after_step < step; returns how many.
  int64_t cancel_stale(int64_t step);

  // Runs the link until until_us (no-op if until_us <= now_us()); finished transfers are appended
  // in completion order.
  void advance_to(double until_us, std::vector<TransferDone>* done);
  // Runs the link until `key` (pending) is complete and returns that time; what finishes on the way
  // is appended too. Demand fetches pass prefetches, so waiting on a demand never waits for them.
  double run_until_done(ExpertKey key, std::vector<TransferDone>* done);

  bool pending(ExpertKey key) const { return find(key) >= 0; }
  int64_t num_pending() const { return static_cast<int64_t>(items_.size()); }
  double now_us() const { return now_us_; }
  const PlannerStats& stats() const { return stats_; }

 private:
  struct Item {
    ExpertKey key;
    TransferKind kind;
    int64_t bytes;
    int64_t copied = 0;
    double priority = 0;
    int64_t stale_after_step = 0;
    int64_t seq = 0;
    bool cancelled = false;  // still finishing its in-flight chunk
  };

  int64_t find(ExpertKey key) const;  // index of the live item, or -1
  int64_t pick() const;               // the item to run the next chunk of, or -1
  // Starts or finishes one chunk without passing until_us; false when idle or blocked by until_us.
  bool step(double until_us, std::vector<TransferDone>* done);
  void erase(size_t idx);

  PlannerConfig config_;
  std::vector<Item> items_;  // a handful pending at a time: linear scans beat a heap here
  double now_us_ = 0;
  int64_t next_seq_ = 0;
  // The chunk in flight: item index by seq (indices shift on erase), its size and end time.
  int64_t inflight_seq_ = -1;
  int64_t inflight_bytes_ = 0;
  double inflight_end_us_ = 0;
  int64_t last_prefetch_seq_ = -1;  // to count preemptions
  PlannerStats stats_;
};

}  // namespace moex
