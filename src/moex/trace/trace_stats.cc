// Counting passes over the trace; all in-memory, O(tokens * layers * k^2 + layers * E^2).
#include "moex/trace/trace_stats.h"

#include <algorithm>

namespace moex {
namespace {

int32_t overlap(std::span<const int32_t> a, std::span<const int32_t> b) {
  int32_t count = 0;
  for (int32_t x : a) count += std::find(b.begin(), b.end(), x) != b.end();
  return count;
}

// Recall of the top-k of `scores` against `actual`; ties to the lower id.
int32_t topk_hits(const std::vector<double>& scores, std::span<const int32_t> actual, int32_t top_k) {
  std::vector<int32_t> order(scores.size());
  for (size_t idx = 0; idx < order.size(); ++idx) order[idx] = static_cast<int32_t>(idx);
  std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return scores[a] > scores[b]; });
  order.resize(top_k);
  return overlap(order, actual);
}

template <typename Get>
double mean_of(const std::vector<LayerTraceStats>& layers, Get get) {
  double sum = 0;
  int64_t count = 0;
  for (const LayerTraceStats& layer : layers)
    if (std::optional<double> value = get(layer)) sum += *value, ++count;
  return count ? sum / count : 0.0;
}

}  // namespace

double TraceStats::mean_load_skew() const { return mean_of(layers, [](auto& l) { return std::optional(l.load_skew); }); }
double TraceStats::mean_p_reuse() const { return mean_of(layers, [](auto& l) { return std::optional(l.p_reuse); }); }
double TraceStats::mean_reuse_fraction() const {
  return mean_of(layers, [](auto& l) { return std::optional(l.reuse_fraction); });
}
double TraceStats::mean_p_share_next_layer() const {
  return mean_of(layers, [](auto& l) { return l.p_share_next_layer; });
}
double TraceStats::mean_next_layer_affinity_recall() const {
  return mean_of(layers, [](auto& l) { return l.next_layer_affinity_recall; });
}
double TraceStats::mean_next_layer_frequency_recall() const {
  return mean_of(layers, [](auto& l) { return l.next_layer_frequency_recall; });
}

TraceStats compute_trace_stats(const Trace& trace) {
  const int32_t num_layers = trace.num_layers;
  const int32_t num_experts = trace.num_experts;
  const int32_t top_k = trace.top_k;
  TraceStats stats;
  stats.num_requests = static_cast<int64_t>(trace.requests.size());
  stats.num_tokens = trace.num_tokens();
  double no_share = 1.0;  // C(E-k, k) / C(E, k) as a product
  for (int32_t idx = 0; idx < top_k; ++idx)
    no_share *= static_cast<double>(num_experts - top_k - idx) / (num_experts - idx);
  stats.random_p_reuse = 1.0 - std::max(no_share, 0.0);
  stats.random_reuse_fraction = static_cast<double>(top_k) / num_experts;

  std::vector<int64_t> load(static_cast<size_t>(num_layers) * num_experts, 0);
  // transitions[l][from][to]: token's expert `from` at layer l, `to` at layer l+1.
  std::vector<double> transitions(static_cast<size_t>(num_layers) * num_experts * num_experts, 0.0);
  std::vector<int64_t> pairs(num_layers, 0), reuse_any(num_layers, 0), reuse_sum(num_layers, 0);
  std::vector<int64_t> share_next(num_layers, 0);
  for (const TraceRequest& request : trace.requests)
    for (int64_t token_idx = 0; token_idx < request.num_tokens; ++token_idx)
      for (int32_t layer_idx = 0; layer_idx < num_layers; ++layer_idx) {
        std::span<const int32_t> ids = trace.experts(request, token_idx, layer_idx);
        for (int32_t expert_idx : ids) ++load[static_cast<size_t>(layer_idx) * num_experts + expert_idx];
        if (token_idx > 0) {
          int32_t shared = overlap(ids, trace.experts(request, token_idx - 1, layer_idx));
          ++pairs[layer_idx];
          reuse_any[layer_idx] += shared > 0;
          reuse_sum[layer_idx] += shared;
        }
        if (layer_idx + 1 < num_layers) {
          std::span<const int32_t> next = trace.experts(request, token_idx, layer_idx + 1);
          share_next[layer_idx] += overlap(ids, next) > 0;
          for (int32_t from : ids)
            for (int32_t to : next)
              transitions[(static_cast<size_t>(layer_idx) * num_experts + from) * num_experts + to] += 1.0;
        }
      }

  std::vector<int64_t> affinity_hits(num_layers, 0), frequency_hits(num_layers, 0);
  std::vector<double> scores(num_experts);
  for (const TraceRequest& request : trace.requests)
    for (int64_t token_idx = 0; token_idx < request.num_tokens; ++token_idx)
      for (int32_t layer_idx = 0; layer_idx + 1 < num_layers; ++layer_idx) {
        std::span<const int32_t> next = trace.experts(request, token_idx, layer_idx + 1);
        std::fill(scores.begin(), scores.end(), 0.0);
        for (int32_t from : trace.experts(request, token_idx, layer_idx))
          for (int32_t to = 0; to < num_experts; ++to)
            scores[to] += transitions[(static_cast<size_t>(layer_idx) * num_experts + from) * num_experts + to];
        affinity_hits[layer_idx] += topk_hits(scores, next, top_k);
        for (int32_t to = 0; to < num_experts; ++to)
          scores[to] = static_cast<double>(load[static_cast<size_t>(layer_idx + 1) * num_experts + to]);
        frequency_hits[layer_idx] += topk_hits(scores, next, top_k);
      }

  const double tokens = static_cast<double>(stats.num_tokens);
  for (int32_t layer_idx = 0; layer_idx < num_layers; ++layer_idx) {
    LayerTraceStats layer;
    layer.layer_idx = layer_idx;
    const int64_t* row = &load[static_cast<size_t>(layer_idx) * num_experts];
    int64_t peak = *std::max_element(row, row + num_experts);
    double mean = tokens * top_k / num_experts;
    layer.load_skew = mean > 0 ? static_cast<double>(peak) / mean : 0.0;
    layer.unused_experts = static_cast<int32_t>(std::count(row, row + num_experts, 0));
    if (pairs[layer_idx] > 0) {
      layer.p_reuse = static_cast<double>(reuse_any[layer_idx]) / pairs[layer_idx];
      layer.reuse_fraction = static_cast<double>(reuse_sum[layer_idx]) / (pairs[layer_idx] * top_k);
    }
    if (layer_idx + 1 < num_layers && tokens > 0) {
      layer.p_share_next_layer = share_next[layer_idx] / tokens;
      layer.next_layer_affinity_recall = affinity_hits[layer_idx] / (tokens * top_k);
      layer.next_layer_frequency_recall = frequency_hits[layer_idx] / (tokens * top_k);
    }
    stats.layers.push_back(layer);
  }
  return stats;
}

}  // namespace moex
