// The recorder's file writer for moex's binary trace format (docs/trace-format.md). The engine opens
// one writer per run, one request handle per sequence, and records each MoE layer's routing as it
// happens; a request's records are buffered and written, checked for completeness, at end_request.
// Not thread-safe: the engine records from its scheduling thread.
#pragma once

#include <cstdint>
#include <cstdio>
#include <map>
#include <span>
#include <string>
#include <vector>

namespace moex {

struct TraceInfo {
  std::string model;
  int32_t num_layers = 0;
  int32_t num_experts = 0;
  int32_t top_k = 0;
  bool with_gate_weights = false;
  bool with_token_ids = false;
  bool with_pregate_logits = false;  // layer l's router on the hidden state of layer l-1, l >= 1 (f16)
  std::vector<int32_t> layer_ids;  // optional: original layer numbers of the MoE layers
  std::string source;              // optional: what produced the trace (command, commit)
};

class TraceWriter {
 public:
  using RequestHandle = int64_t;

  // Creates (truncates) path and writes the header. Throws IoError / UsageError.
  TraceWriter(const std::string& path, TraceInfo info);
  ~TraceWriter();  // closes if close() was not called; never throws
  TraceWriter(const TraceWriter&) = delete;
  TraceWriter& operator=(const TraceWriter&) = delete;

  RequestHandle begin_request(std::string id);
  // Routing of one token at one MoE layer: top_k expert ids, best first, and as many gate weights
  // (required iff with_gate_weights). Tokens count from 0 within the request, in any order.
  void record(RequestHandle request, int32_t layer_idx, int64_t token_idx, std::span<const int32_t> expert_ids,
              std::span<const float> weights);
  void record_token_id(RequestHandle request, int64_t token_idx, int32_t token_id);
  // Pre-gating logits of MoE layer layer_idx (>= 1) for one token: num_experts values (with_pregate_logits).
  void record_pregate(RequestHandle request, int32_t layer_idx, int64_t token_idx, std::span<const float> logits);
  // Writes the request. Throws FormatError if some (token, layer) of tokens 0..last was not recorded.
  void end_request(RequestHandle request);
  // Writes the end record (count of requests and tokens, so truncation is detected) and closes.
  // Requests still open are discarded.
  void close();

 private:
  struct OpenRequest {
    std::string id;
    std::vector<int32_t> expert_ids;  // grown by token: [token][layer][k], -1 = not recorded
    std::vector<float> gate_weights;
    std::vector<int32_t> token_ids;   // -1 = not recorded
    std::vector<float> pregate;       // [token][layer][expert]
    std::vector<uint8_t> pregate_set; // [token][layer]: recorded
  };

  void write_bytes(const void* data, size_t size);
  OpenRequest& open_request(RequestHandle request);

  std::string path_;
  TraceInfo info_;
  std::FILE* file_ = nullptr;
  std::map<RequestHandle, OpenRequest> open_;
  RequestHandle next_handle_ = 0;
  int64_t num_requests_ = 0;
  int64_t num_tokens_ = 0;
};

}  // namespace moex
