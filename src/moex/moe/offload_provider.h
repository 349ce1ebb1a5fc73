// The offloading ExpertProvider: experts live in the ExpertStore's source tier (disk mmap or host
// RAM) and a byte-bounded pool of fast-tier slots; an ExpertCache with a pluggable eviction policy
// decides which stay resident. Misses load on demand (accounted as stall time). Outputs are
// identical to the resident provider: only where weights live changes.
#pragma once

#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "moex/moe/expert_cache.h"
#include "moex/moe/expert_provider.h"
#include "moex/moe/expert_store.h"
#include "moex/moe/miss_path.h"
#include "moex/moe/path_rates.h"
#include "moex/moe/predictor/expert_predictor.h"

namespace moex {

struct OffloadConfig {
  int64_t budget_bytes = 0;                // fast-tier bytes for expert weights
  CacheScope scope = CacheScope::kGlobal;  // one budget for all layers (kPerLayer: split evenly)
  std::string policy = "lru";
  bool verify_weights = true;              // NaN/Inf check on first read from the source tier
  // Prefetch: a predictor (moe/predictor registry name, or "none") guesses the experts of the next
  // lookahead_layers MoE layers; the best prefetch_per_layer of each (0: top_k) are copied ahead on
  // the store's prefetch thread.
  std::string predictor = "none";
  int32_t lookahead_layers = 1;
  int32_t prefetch_per_layer = 0;
  // CPU execution of missed experts (when the fast tier is not host memory): a missed expert routed
  // to at most cpu_max_tokens tokens may run on the host CPU from its source-tier copy instead of
  // crossing PCIe, and one routed to a single token may be split: the CPU computes its first
  // intermediate rows while the link copies the rest (moe/miss_path.h). Each miss takes the path that
  // ends the step earliest given the work already assigned to the CPU and to the link this step (demand
  // copies and the prefetches the step issues), from the two bandwidths (both paths run at once).
  bool cpu_experts = false;
  int64_t cpu_max_tokens = 4;
  bool split_experts = true;  // with cpu_experts
  // MissCostModel::split_overhead_ms, charged to the CPU path per split; < 0: by expert size
  // (split_overhead_ms_for()). What a split costs beyond its bytes is the host's extra GEMV dispatches, the
  // synchronous upload of its act rows, the device's extra launches, and the cache hits it loses (a split
  // expert's slot is freed after its layer, a copied miss stays cached). Measured on H100 machines
  // (bench/RESULTS.md): on Qwen3-30B-A3B at 8 GiB (9 MB experts, cache hit rate ~0.63) charging 0.05 or 0.1 ms
  // made 140+ experts per token split and the step 1.6-1.8x slower than at 0.5; on the Mixtral-8x7B shape at
  // 16 GiB (352 MB experts) 0.1 ms was ~7% faster than 0.5 (121.9 vs 130.7 ms/token, mean of 7 runs each over
  // three machines, with fixed and measured rates; 117.4 vs 125.7 in one call with the final defaults).
  double split_overhead_ms = -1;
  // The rates of the two paths (GB/s). With adapt_rates these are the starting estimates: each decode-sized
  // layer step with a CPU share updates them from the bytes each path got and the host times the caller
  // reports (add_cpu_ms, add_stall_ms; moe/path_rates.h).
  double host_read_gbs = 100.0;  // host DRAM read bandwidth of the CPU expert kernels
  double copy_gbs = 50.0;        // pinned host-to-device copy bandwidth
  // With cpu_experts: measure both rates while running (moe/path_rates.h). Off by default: on H100 machines it
  // did not move the Mixtral-8x7B 16 GiB case beyond run-to-run noise (123.0 vs 124.9 ms/token at a 0.1 ms
  // split overhead), and on Qwen3-30B-A3B's 9 MB experts the link estimate fell to ~25 GB/s (a small layer's
  // wait is mostly fixed costs, not copy time), moving misses onto the CPU.
  bool adapt_rates = false;
  // With cpu_experts and a predictor: skip a layer's prefetch while the link has more work booked than the
  // CPU (plus one expert's CPU time) over the last layers (decayed per layer), so that prefetches do not make
  // the link the long path while the CPU could take those experts' misses. Mixtral-8x7B shape at 16 GiB on an
  // H100 host: 163.9 -> 138.4 ms/token (bench/RESULTS.md).
  bool balance_prefetch = true;
  // Scan steps: a step whose routing has at least 8 times as many entries as the layer has experts (a prefill
  // of many tokens: with uniform routing all but e^-8 of the experts are routed) touches nearly every expert
  // of every layer, a cyclic scan longer than the cache where LRU hits nothing. Its misses are ranked for scan
  // resistance (AccessKind::kScan): with a global budget each layer streams through a few slots in waves
  // (stream_wave_bytes) and the rest of the cache is kept across prompts, spread over the layers
  // (ExpertCacheConfig::keep_by_layer); with per-layer budgets (or no room for three waves) the cache keeps what
  // one layer's experts leave and the next layer's experts are prefetched while a layer runs.
  // Unset: by expert size (scan_steps_for()): on for experts of 64 MiB or more, off below. Measured on H100
  // machines (bench/RESULTS.md, "Streamed scan steps"): the 4-layer Mixtral-8x7B prefill at 6 GiB (352 MB
  // experts) 1.3-1.4x at 512 tokens and 1.4-1.6x at 2048 against no scan steps, its 16 GiB decode case
  // unchanged within run-to-run noise; Qwen3-30B-A3B at 8 GiB (9 MB experts, ~11 per wave) a 128-token prefill
  // 0.6-0.7x (not understood yet).
  std::optional<bool> scan_steps;
  // Scan steps with a global budget stream each layer in waves of whole experts adding up to about this many
  // bytes (at least one expert): wave k+1's copies run while the device computes wave k, and the layer's last
  // wave enqueues the next layer's first experts, so the link does not wait for the device or for the host's
  // routing read-back. The cache keeps what is left of the budget after three waves across prompts. Each wave
  // costs the device a few small kernels (gather, combine, accumulate) and the host a plan upload, tens of
  // microseconds against ~1.7 ms of copying 96 MiB at ~55 GB/s. 0: scan steps run a layer in as few waves as
  // fit, the host waiting for each wave's copies.
  int64_t stream_wave_bytes = int64_t{96} << 20;
};

class OffloadingExpertProvider : public ExpertProvider {
 public:
  // top_k: experts per token; the budget must hold top_k experts (one decode step of one layer),
  // else BudgetError names the minimum.
  OffloadingExpertProvider(std::unique_ptr<ExpertStore> store, int64_t top_k, const OffloadConfig& config);

  void acquire(int32_t layer_idx, const Routing& routing, const TensorView& hidden_states,
               std::vector<ExpertWeights>* experts) override;
  void release(int32_t layer_idx) override;
  bool streams_waves() const override { return streaming_; }
  void release_wave(int32_t layer_idx) override;
  void end_sequence() override;
  int32_t lookahead_layers() const override;
  void observe_lookahead(int32_t target_layer_idx, std::span<const float> logits) override;
  std::span<const SplitExpert> split_experts() const override { return splits_; }
  void add_stall_ms(double ms) override {
    stats_.stall_ms += ms;
    step_.stall_ms += ms;
  }
  void add_cpu_ms(double ms) override {
    stats_.cpu_ms += ms;
    step_.cpu_ms += ms;
  }
  ExpertProviderStats stats() const override;

  const ExpertCache& cache() const { return *cache_; }
  // The rates the cost model uses now (the configured ones unless adapt_rates has moved them).
  const PathRateEstimator& path_rates() const { return rates_; }
  // Precision/recall of the predictor's guesses against the experts each layer then chose.
  const PredictionStats& prediction_stats() const { return prediction_; }

 private:
  // Settles outstanding prefetches of layer_idx before its demand access: finished ones stay resident
  // (unpinned), unfinished ones not in `wanted` are cancelled as stale. With CPU experts an unfinished
  // wanted one is taken over (ExpertStore::take_over): *taken_over_bytes are then still to copy.
  void settle_prefetches(int32_t layer_idx, std::span<const ExpertKey> wanted, int64_t* taken_over_bytes);
  // Feeds the predictor the layer's routing and has it guess the next layers' experts (last_prediction_).
  void predict_ahead(int32_t layer_idx, const Routing& routing);
  // The guesses not resident now, into prefetch_plan_ (not yet issued: demand copies go first on the link), or
  // none where balancing keeps the link free; count_skipped: this is the step's final plan (stats).
  void plan_prefetch(int32_t layer_idx, bool count_skipped);
  // A scan step's prefetch: every expert of the next layer not resident, the predictor's guesses first.
  void plan_scan_prefetch(int32_t layer_idx);
  void issue_prefetch(AccessKind kind);
  // A streamed scan step's last wave of layer_idx: enqueues copies of the next layer's first non-resident
  // experts (up to one wave) behind this layer's, into room only streamed experts of other layers held, so the
  // link stays busy while the device finishes this layer and the host reads the next one's routing.
  void stream_ahead(int32_t layer_idx);
  // Picks each CPU-eligible miss's path (moe/miss_path.h) from outcomes_ as the cache stands before the step's
  // acquire; lists the ones that run whole on the CPU (to_cpu_, flagged in bypass_: the cache makes no room for
  // them) or split (splits_). Returns the work each path got this step (ms), prefetches included.
  PathLoad assign_miss_paths(int32_t layer_idx, const Routing& routing, int64_t link_bytes);
  // Host bytes of one gate row plus one up row of w, a layer_idx expert (bf16, or their share of a packed expert).
  int64_t host_row_bytes(int32_t layer_idx, const ExpertWeights& w) const;
  // balance_prefetch: adds a layer's booked work to the running totals of both paths.
  void book_paths(const PathLoad& load);

  std::unique_ptr<ExpertStore> store_;
  std::unique_ptr<ExpertCache> cache_;
  std::vector<ExpertKey> keys_;        // this acquire's distinct experts, ascending
  std::vector<CacheOutcome> outcomes_;
  std::vector<uint8_t> bypass_;  // per key of the step: a miss the CPU runs (ExpertCache::acquire's bypass_misses)
  std::vector<ExpertKey> evicted_;
  std::vector<ExpertKey> pinned_;      // released by release(); [0, wave_start_) by release_wave()
  size_t wave_start_ = 0;              // where the latest acquire's pins begin in pinned_
  // Scan steps stream their layers in waves of this many missed experts (0: they do not; see the constructor).
  int64_t stream_wave_experts_ = 0;
  bool streaming_ = false;             // the latest acquire was a streamed scan step's wave
  bool scan_steps_ = false;            // OffloadConfig::scan_steps, resolved by expert size
  std::vector<uint8_t> seen_;
  ExpertProviderStats stats_;
  bool request_open_ = false;
  int64_t top_k_ = 0;
  OffloadConfig config_;
  std::unique_ptr<ExpertPredictor> predictor_;
  std::vector<ExpertKey> outstanding_;                // prefetched keys still pinned by the prefetcher
  std::vector<std::vector<int32_t>> last_prediction_; // [layer]: the experts last predicted for it
  PredictionStats prediction_;
  std::vector<ScoredExpert> scored_;
  std::vector<int64_t> tokens_per_expert_;
  std::vector<ExpertKey> to_cpu_;
  std::vector<ExpertKey> prefetch_plan_;
  std::vector<SplitExpert> splits_;     // this acquire's split experts (their slots are freed by release())
  std::vector<ExpertKey> split_keys_;
  double link_booked_ms_ = 0;  // balance_prefetch: decayed sums of each path's booked work
  double cpu_booked_ms_ = 0;
  PathRateEstimator rates_;
  // adapt_rates: what this acquire gave each path and the host times reported for it, fed to rates_ by
  // release() when observe_step_.
  PathObservation step_;
  bool observe_step_ = false;
};

// Parses a size such as "16GiB", "512MiB", "64KiB", "2GB" or a plain byte count; throws UsageError
// naming the flag.
int64_t parse_byte_size(const std::string& text, const std::string& flag);

// OffloadConfig::scan_steps when it is unset: on for experts of at least 64 MiB, off below (see there).
bool scan_steps_for(std::optional<bool> configured, int64_t expert_bytes);

// OffloadConfig::split_overhead_ms when it is < 0: 0.1 ms for experts of at least 64 MiB, 0.5 ms below (see
// there); else the configured value.
double split_overhead_ms_for(double configured_ms, int64_t expert_bytes);

}  // namespace moex
