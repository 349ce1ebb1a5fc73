// An expert activation trace: for every request, token and MoE layer, the router's top-k expert ids
// (best first) and optionally their gate weights and the token ids. Read from the shared JSONL format
// (../shared/traces, one request per line) or from moex's compact binary format (docs/trace-format.md);
// replayed by the simulator, written by the engine's recorder through TraceWriter.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace moex {

struct TraceRequest {
  std::string id;
  int64_t num_tokens = 0;
  std::vector<int32_t> expert_ids;  // [num_tokens][num_layers][top_k]
  std::vector<float> gate_weights;  // same shape as expert_ids, or empty
  std::vector<int32_t> token_ids;   // [num_tokens], or empty
  // Pre-gating: [num_tokens][num_layers][num_experts], layer l's router applied to the hidden state that
  // entered MoE layer l-1's router (what a pre-gating predictor sees one layer ahead); layer 0 rows are zero.
  // Empty when not recorded.
  std::vector<float> pregate_logits;
};

struct Trace {
  std::string model;
  std::string path;  // where it was read from, for messages
  int32_t num_layers = 0;
  int32_t num_experts = 0;
  int32_t top_k = 0;
  std::vector<int32_t> layer_ids;  // original layer numbers of the MoE layers, or empty
  std::vector<TraceRequest> requests;

  int64_t num_tokens() const;
  bool has_gate_weights() const;
  bool has_token_ids() const;
  bool has_pregate_logits() const;
  // Empty when the trace has no pre-gating logits; layer_idx >= 1.
  std::span<const float> pregate(const TraceRequest& request, int64_t token_idx, int32_t layer_idx) const {
    if (request.pregate_logits.empty()) return {};
    return std::span<const float>(request.pregate_logits)
        .subspan((static_cast<size_t>(token_idx) * num_layers + layer_idx) * num_experts, num_experts);
  }
  std::span<const int32_t> experts(const TraceRequest& request, int64_t token_idx, int32_t layer_idx) const {
    return std::span<const int32_t>(request.expert_ids).subspan(offset(token_idx, layer_idx), top_k);
  }
  // Empty when the trace has no gate weights.
  std::span<const float> weights(const TraceRequest& request, int64_t token_idx, int32_t layer_idx) const {
    if (request.gate_weights.empty()) return {};
    return std::span<const float>(request.gate_weights).subspan(offset(token_idx, layer_idx), top_k);
  }

 private:
  size_t offset(int64_t token_idx, int32_t layer_idx) const {
    return (static_cast<size_t>(token_idx) * num_layers + layer_idx) * top_k;
  }
};

// Reads either format, told apart by the first bytes. Throws IoError (missing, unreadable, truncated)
// or FormatError (content), naming the file and the line (JSONL) or request/token (binary).
Trace read_trace(const std::string& path);
Trace read_jsonl_trace(const std::string& path);
Trace read_moex_trace(const std::string& path);

// Writes the shared JSONL format (one request per line), e.g. to hand a moex trace to other tools.
void write_jsonl_trace(const Trace& trace, const std::string& path);
// Writes moex's binary format through TraceWriter.
void write_moex_trace(const Trace& trace, const std::string& path);

}  // namespace moex
