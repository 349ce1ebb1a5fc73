// `moex trace record`, a subcommand of `moex trace` (apps/moex/trace.cc holds the others).
#pragma once

#include <functional>
#include <span>

#include <CLI/CLI.hpp>

#include "moex/model/decoder.h"
#include "moex/trace/trace_writer.h"

namespace moex::cli {

// Forwards each MoE layer's routing rows (and, when asked, the pre-gating logits) of one request to a
// TraceWriter; token index = position in the sequence. `trace record` and `bench --trace-out` share it.
class TraceRecorder : public RouterObserver {
 public:
  TraceRecorder(TraceWriter& writer, TraceWriter::RequestHandle request, bool pregate, int32_t num_experts)
      : writer_(writer), request_(request), pregate_(pregate), num_experts_(num_experts) {}
  void on_router(int32_t moe_layer_idx, int64_t start_pos, std::span<const float>, const Routing& routing) override;
  bool wants_pregate() const override { return pregate_; }
  void on_pregate(int32_t target_moe_layer_idx, int64_t start_pos, std::span<const float> logits) override;

 private:
  TraceWriter& writer_;
  TraceWriter::RequestHandle request_;
  bool pregate_;
  int32_t num_experts_;
};

// The trace header of a model's routing: its MoE layers (original numbers), experts, top-k; gate weights and
// token ids recorded; pre-gating logits when asked for and the model has two MoE layers or more.
TraceInfo trace_info_for(const ModelConfig& cfg, bool pregate_logits, std::string source);

// Adds `record` under `trace`; *action runs it when it was the chosen subcommand.
CLI::App* add_trace_record_command(CLI::App* trace, std::function<int()>* action);

}  // namespace moex::cli
