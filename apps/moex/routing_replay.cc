#include "routing_replay.h"

#include <fmt/format.h>

#include "moex/core/error.h"

namespace moex::cli {

RoutingReplay::RoutingReplay(const std::string& path, const ModelConfig& config) : trace_(read_trace(path)) {
  // A request without tokens has nothing to replay (and positions wrap modulo its length).
  std::erase_if(trace_.requests, [](const TraceRequest& request) { return request.num_tokens == 0; });
  if (trace_.requests.empty())
    throw UsageError(fmt::format("--routing-trace {}: the trace has no tokens", path));
  if (trace_.num_layers != config.num_moe_layers() || trace_.num_experts != config.num_experts ||
      trace_.top_k != config.top_k)
    throw UsageError(fmt::format(
        "--routing-trace {}: the trace routes {} MoE layers x {} experts, top-{}; the model has {} x {}, top-{}", path,
        trace_.num_layers, trace_.num_experts, trace_.top_k, config.num_moe_layers(), config.num_experts,
        config.top_k));
}

void RoutingReplay::select(int64_t rep) { request_ = static_cast<size_t>(rep) % trace_.requests.size(); }

void RoutingReplay::override_routing(int32_t moe_layer_idx, int64_t start_pos, Routing* routing) {
  const TraceRequest& request = trace_.requests[request_];
  const int64_t top_k = routing->top_k;
  for (int64_t row = 0; row < routing->num_tokens; ++row) {
    const int64_t token = (start_pos + row) % request.num_tokens;
    const auto ids = trace_.experts(request, token, moe_layer_idx);
    const auto weights = trace_.weights(request, token, moe_layer_idx);
    for (int64_t k = 0; k < top_k; ++k) {
      routing->expert_ids[row * top_k + k] = ids[k];
      // A trace without gate weights: equal shares (the expert choice is what is replayed).
      routing->weights[row * top_k + k] = weights.empty() ? 1.0f / static_cast<float>(top_k) : weights[k];
    }
  }
  replayed_rows_ += routing->num_tokens;
}

}  // namespace moex::cli
