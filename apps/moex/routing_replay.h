// `moex bench --routing-trace`: a recorded routing trace replayed through the engine (Decoder::RoutingOverride).
// Random weights at a real model's shape route almost at random; a published trace (Mixtral-8x7B's) carries the
// real routing's reuse and skew, which is what expert caches and predictors feed on. The replay keeps the
// engine's own work (weights, copies, CPU experts) and swaps the expert choice.
#pragma once

#include <cstdint>
#include <string>

#include "moex/model/decoder.h"
#include "moex/model/model_config.h"
#include "moex/trace/trace.h"

namespace moex::cli {

class RoutingReplay final : public RoutingOverride {
 public:
  // Throws UsageError when the trace's shape (MoE layers, experts, top-k) is not the model's, IoError/FormatError
  // for an unreadable trace.
  RoutingReplay(const std::string& path, const ModelConfig& config);

  // The request replayed from now on: rep % requests (those with tokens). Position p of the sequence takes the
  // request's token p % its length.
  void select(int64_t rep);
  void override_routing(int32_t moe_layer_idx, int64_t start_pos, Routing* routing) override;

  const Trace& trace() const { return trace_; }
  int64_t replayed_rows() const { return replayed_rows_; }

 private:
  Trace trace_;
  size_t request_ = 0;
  int64_t replayed_rows_ = 0;
};

}  // namespace moex::cli
