// Format detection, the checks both readers share, and conversion to the binary format.
#include "moex/trace/trace.h"

#include <algorithm>
#include <cstring>
#include <fstream>

#include "moex/core/error.h"
#include "moex/trace/binary_format.h"
#include "moex/trace/trace_writer.h"
#include "moex/trace/validate.h"

namespace moex {

int64_t Trace::num_tokens() const {
  int64_t total = 0;
  for (const TraceRequest& request : requests) total += request.num_tokens;
  return total;
}

bool Trace::has_gate_weights() const {
  return !requests.empty() &&
         std::all_of(requests.begin(), requests.end(), [](const TraceRequest& r) { return !r.gate_weights.empty(); });
}

bool Trace::has_token_ids() const {
  return !requests.empty() &&
         std::all_of(requests.begin(), requests.end(), [](const TraceRequest& r) { return !r.token_ids.empty(); });
}

bool Trace::has_pregate_logits() const {
  return !requests.empty() && std::all_of(requests.begin(), requests.end(),
                                          [](const TraceRequest& r) { return !r.pregate_logits.empty(); });
}

void check_trace_shape(const Trace& trace, const std::string& where) {
  if (trace.num_layers <= 0 || trace.num_experts <= 0 || trace.num_experts > trace_format::kMaxExperts ||
      trace.top_k <= 0 || trace.top_k > trace.num_experts)
    throw FormatError(fmt::format(
        "{}: expected num_layers > 0, 0 < num_experts <= {}, 0 < top_k <= num_experts; found {}, {}, {}", where,
        trace_format::kMaxExperts, trace.num_layers, trace.num_experts, trace.top_k));
  if (!trace.layer_ids.empty() && static_cast<int32_t>(trace.layer_ids.size()) != trace.num_layers)
    throw FormatError(fmt::format("{}: {} layer_ids for {} layers", where, trace.layer_ids.size(), trace.num_layers));
}

void check_request_ids(const Trace& trace, const TraceRequest& request, const std::string& where) {
  for (int64_t token_idx = 0; token_idx < request.num_tokens; ++token_idx)
    for (int32_t layer_idx = 0; layer_idx < trace.num_layers; ++layer_idx) {
      std::span<const int32_t> ids = trace.experts(request, token_idx, layer_idx);
      for (size_t rank = 0; rank < ids.size(); ++rank) {
        if (ids[rank] < 0 || ids[rank] >= trace.num_experts)
          throw FormatError(fmt::format("{}: token {} layer {}: expert id {} outside [0, {})", where, token_idx,
                                        layer_idx, ids[rank], trace.num_experts));
        for (size_t other = 0; other < rank; ++other)
          if (ids[other] == ids[rank])
            throw FormatError(fmt::format("{}: token {} layer {}: expert {} listed twice", where, token_idx,
                                          layer_idx, ids[rank]));
      }
    }
}

Trace read_trace(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw IoError(fmt::format("{}: cannot open trace file", path));
  char head[sizeof(trace_format::kMagic)] = {};
  in.read(head, sizeof(head));
  if (in.gcount() == static_cast<std::streamsize>(sizeof(head)) &&
      std::memcmp(head, trace_format::kMagic, sizeof(head)) == 0)
    return read_moex_trace(path);
  return read_jsonl_trace(path);
}

void write_moex_trace(const Trace& trace, const std::string& path) {
  TraceInfo info;
  info.model = trace.model;
  info.num_layers = trace.num_layers;
  info.num_experts = trace.num_experts;
  info.top_k = trace.top_k;
  info.with_gate_weights = trace.has_gate_weights();
  info.with_token_ids = trace.has_token_ids();
  info.with_pregate_logits = trace.has_pregate_logits();
  info.layer_ids = trace.layer_ids;
  info.source = trace.path.empty() ? "" : "converted from " + trace.path;
  TraceWriter writer(path, info);
  for (const TraceRequest& request : trace.requests) {
    TraceWriter::RequestHandle handle = writer.begin_request(request.id);
    for (int64_t token_idx = 0; token_idx < request.num_tokens; ++token_idx) {
      for (int32_t layer_idx = 0; layer_idx < trace.num_layers; ++layer_idx)
        writer.record(handle, layer_idx, token_idx, trace.experts(request, token_idx, layer_idx),
                      info.with_gate_weights ? trace.weights(request, token_idx, layer_idx) : std::span<const float>());
      if (info.with_token_ids) writer.record_token_id(handle, token_idx, request.token_ids[token_idx]);
      if (info.with_pregate_logits)
        for (int32_t layer_idx = 1; layer_idx < trace.num_layers; ++layer_idx)
          writer.record_pregate(handle, layer_idx, token_idx, trace.pregate(request, token_idx, layer_idx));
    }
    writer.end_request(handle);
  }
  writer.close();
}

}  // namespace moex
