// The seam between model code and expert placement: the MoE layer asks a provider for the weights of
// the experts its router picked; the provider decides where they come from (resident, GPU cache,
// host tier, disk) and accounts every move. Model code never knows where an expert lives.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "moex/backend/backend.h"

namespace moex {

// Identifies one expert of one MoE layer. layer_idx counts MoE layers in model order (dense layers
// are skipped), matching router_logits in the CLI contract.
struct ExpertKey {
  int32_t layer_idx = 0;
  int32_t expert_idx = 0;
  bool operator==(const ExpertKey&) const = default;
};

// Counters every provider keeps; the CLI prints them and `--json` stats carries them.
struct ExpertProviderStats {
  int64_t hits = 0;            // requested experts already in the fast tier
  int64_t misses = 0;          // requested experts that had to be fetched or computed elsewhere
  int64_t bytes_moved = 0;     // bytes copied between tiers
  double stall_ms = 0;         // time the step waited for expert weights
  int64_t prefetch_issued = 0;
  int64_t prefetch_skipped = 0;  // predicted experts not prefetched to keep the link from the long path
  int64_t prefetch_used = 0;   // prefetched experts that were requested before eviction
  int64_t cpu_computed = 0;    // misses run on the host CPU instead of being copied (counted in misses)
  int64_t split_computed = 0;  // misses split between the host CPU and a partial copy (counted in misses)
  int64_t cpu_read_bytes = 0;  // expert weight bytes the host CPU read to compute misses (whole and split)
  double cpu_ms = 0;           // host time computing missed experts (whole and split rows): cpu_read_bytes
                               // over it is the rate the CPU path reached
  // The rates the miss path cost model uses now (GB/s): measured online unless they are fixed
  // (OffloadConfig::adapt_rates). Not counters: the latest value. 0 without CPU experts.
  double model_host_read_gbs = 0;
  double model_copy_gbs = 0;
  // The fast tier's expert budget in bytes, all layers together (0: every expert resident). Not a counter.
  int64_t cache_bytes = 0;
};

// An expert of the last acquire() that runs split: the host CPU computes its intermediate rows
// [0, host_rows) (silu(gate x) * up x) from the host views while the rest of gate/up and all of down are
// copied; the backend computes rows [host_rows, ffn) and the down projection from the views in the expert
// table, whose first host_rows rows of gate/up are not filled. Only an expert routed to one token of the
// step is split.
struct SplitExpert {
  int32_t expert_idx = 0;
  int64_t host_rows = 0;
  ExpertWeights host;  // source-tier views, host memory
};

class ExpertProvider {
 public:
  virtual ~ExpertProvider() = default;

  // Called after routing, once per MoE layer and step (or several times, see below): fills *experts
  // (indexed by expert id, sized num_experts) with valid weights for the expert ids of routing that it
  // could make resident, and pins them until release(layer_idx). Ids < 0 in routing are ignored. A
  // provider whose budget cannot hold every routed expert at once (a prefill that touches all of a
  // layer's experts) returns a subset, at least one expert; the caller runs those, releases, and asks
  // again for the rest. Throws BudgetError when it can make no expert resident. hidden_states
  // [n, hidden] (on the backend) lets predictors look ahead.
  virtual void acquire(int32_t layer_idx, const Routing& routing, const TensorView& hidden_states,
                       std::vector<ExpertWeights>* experts) = 0;
  // Pre-gating: how many MoE layers ahead the provider wants router logits computed on the current
  // hidden state (0: none), and where they arrive. logits [num_experts] are target_layer_idx's router
  // applied to the last token's hidden state at the current layer, delivered before acquire().
  virtual int32_t lookahead_layers() const { return 0; }
  virtual void observe_lookahead(int32_t target_layer_idx, std::span<const float> logits) {
    (void)target_layer_idx, (void)logits;
  }
  // The layer's expert computation is done: its experts may be evicted again.
  virtual void release(int32_t layer_idx) = 0;
  // Streamed waves: true when the last acquire() left the rest of the layer's routed experts for later waves
  // and keeps room for the next wave while this one runs. The caller then acquires wave k+1 (its copies
  // enqueued, Backend::copy_from_host_enqueue) before it runs wave k, runs wave k after
  // Backend::wait_copies_through(the ticket taken before acquiring wave k+1), and calls release_wave(), which
  // unpins wave k only; release() still unpins everything. The host never waits for a streamed wave's copies.
  virtual bool streams_waves() const { return false; }
  virtual void release_wave(int32_t layer_idx) { release(layer_idx); }
  // Marks the end of a request (sequence), for predictors that learn per-request activation.
  virtual void end_sequence() {}

  // True when every expert of every layer stays resident for the provider's life and acquire() only hands
  // out resident_layer(): the decoder may then route on the device and skip acquire()/release() (no host
  // round trip per MoE layer), unless it needs host-side routing for other reasons (observers, lookahead).
  virtual bool all_resident() const { return false; }
  // The layer's resident table (indexed by expert id), valid while the provider lives; only when
  // all_resident().
  virtual std::span<const ExpertWeights> resident_layer(int32_t layer_idx) const {
    (void)layer_idx;
    return {};
  }

  // The experts of the last acquire() that run split (see SplitExpert), valid until release().
  virtual std::span<const SplitExpert> split_experts() const { return {}; }
  // The caller waited ms for expert weights the provider had copying when acquire() returned (the copies of
  // split and missed experts overlap the host CPU's work; the wait after it is stall time).
  virtual void add_stall_ms(double ms) { (void)ms; }
  // The caller computed experts of the last acquire() on the host CPU for ms.
  virtual void add_cpu_ms(double ms) { (void)ms; }

  virtual ExpertProviderStats stats() const { return {}; }
};

}  // namespace moex
