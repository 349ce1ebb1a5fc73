// Routing structure of a trace: per-layer load skew, token-to-token reuse at a layer (what recency
// caching and stride prediction live on) and how much a token's experts at one layer say about its
// experts at the next (what cross-layer prediction lives on), each next to a baseline.
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

#include "moex/trace/trace.h"

namespace moex {

struct LayerTraceStats {
  int32_t layer_idx = 0;
  double load_skew = 0;       // max expert count / mean expert count (1 = balanced)
  int32_t unused_experts = 0;
  double p_reuse = 0;         // P(token t picks >= 1 expert token t-1 picked here), same request
  double reuse_fraction = 0;  // mean |S_t ∩ S_t-1| / k
  // Next layer (absent for the last one): P(|S_l ∩ S_l+1| >= 1) by raw expert id (ids of different
  // layers name different experts, so this only shows id-level correlation), and the recall of the
  // top-k experts predicted for layer l+1 from the token's layer-l experts by transition counts over
  // the whole trace (in-sample: an upper bound for an online affinity predictor), next to the recall
  // of the layer's k most frequent experts.
  std::optional<double> p_share_next_layer;
  std::optional<double> next_layer_affinity_recall;
  std::optional<double> next_layer_frequency_recall;
};

struct TraceStats {
  int64_t num_requests = 0;
  int64_t num_tokens = 0;
  double random_p_reuse = 0;          // 1 - C(E-k, k) / C(E, k)
  double random_reuse_fraction = 0;   // k / E
  std::vector<LayerTraceStats> layers;

  // Means over layers (next-layer fields over the layers that have them).
  double mean_load_skew() const;
  double mean_p_reuse() const;
  double mean_reuse_fraction() const;
  double mean_p_share_next_layer() const;
  double mean_next_layer_affinity_recall() const;
  double mean_next_layer_frequency_recall() const;
};

TraceStats compute_trace_stats(const Trace& trace);

}  // namespace moex
