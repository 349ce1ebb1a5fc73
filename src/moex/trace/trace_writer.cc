// Binary trace writer: little-endian fields, a JSON header, one record per finished request.
#include "moex/trace/trace_writer.h"

#include <algorithm>
#include <cerrno>
#include <cstring>

#include <nlohmann/json.hpp>

#include "moex/core/dtype.h"
#include "moex/core/error.h"
#include "moex/trace/binary_format.h"

namespace moex {
namespace {

template <typename T>
void append_le(std::vector<uint8_t>* out, T value) {
  for (size_t byte = 0; byte < sizeof(T); ++byte)
    out->push_back(static_cast<uint8_t>(static_cast<uint64_t>(value) >> (8 * byte)));
}

}  // namespace

TraceWriter::TraceWriter(const std::string& path, TraceInfo info) : path_(path), info_(std::move(info)) {
  if (info_.num_layers <= 0 || info_.num_experts <= 0 || info_.num_experts > trace_format::kMaxExperts ||
      info_.top_k <= 0 || info_.top_k > info_.num_experts)
    throw UsageError(fmt::format(
        "{}: trace needs num_layers > 0, 0 < num_experts <= {} and 0 < top_k <= num_experts; got {}, {}, {}", path,
        trace_format::kMaxExperts, info_.num_layers, info_.num_experts, info_.top_k));
  if (!info_.layer_ids.empty() && static_cast<int32_t>(info_.layer_ids.size()) != info_.num_layers)
    throw UsageError(fmt::format("{}: {} layer_ids for {} layers", path, info_.layer_ids.size(), info_.num_layers));
  file_ = std::fopen(path.c_str(), "wb");
  if (!file_) throw IoError(fmt::format("{}: cannot create trace file: {}", path, std::strerror(errno)));
  nlohmann::json header = {{"format", "moex-trace"},
                           {"version", trace_format::kVersion},
                           {"model", info_.model},
                           {"num_layers", info_.num_layers},
                           {"num_experts", info_.num_experts},
                           {"top_k", info_.top_k},
                           {"id_bytes", info_.num_experts <= 256 ? 1 : 2},
                           {"gate_weights", info_.with_gate_weights ? nlohmann::json("f16") : nlohmann::json()},
                           {"token_ids", info_.with_token_ids}};
  if (info_.with_pregate_logits) header["pregate_logits"] = "f16";
  if (!info_.layer_ids.empty()) header["layer_ids"] = info_.layer_ids;
  if (!info_.source.empty()) header["source"] = info_.source;
  std::string text = header.dump();
  std::vector<uint8_t> bytes(trace_format::kMagic, trace_format::kMagic + sizeof(trace_format::kMagic));
  append_le<uint32_t>(&bytes, static_cast<uint32_t>(text.size()));
  bytes.insert(bytes.end(), text.begin(), text.end());
  write_bytes(bytes.data(), bytes.size());
}

TraceWriter::~TraceWriter() {
  try {
    close();
  } catch (...) {
    // A destructor must not throw; call close() to see write errors.
  }
}

void TraceWriter::write_bytes(const void* data, size_t size) {
  MOEX_ASSERT(file_ != nullptr, "write to closed trace {}", path_);
  if (std::fwrite(data, 1, size, file_) != size)
    throw IoError(fmt::format("{}: write failed: {}", path_, std::strerror(errno)));
}

TraceWriter::RequestHandle TraceWriter::begin_request(std::string id) {
  MOEX_ASSERT(file_ != nullptr, "begin_request on closed trace {}", path_);
  if (id.size() > 65535) throw UsageError(fmt::format("{}: request id of {} bytes; at most 65535", path_, id.size()));
  RequestHandle handle = next_handle_++;
  open_[handle].id = std::move(id);
  return handle;
}

TraceWriter::OpenRequest& TraceWriter::open_request(RequestHandle request) {
  auto it = open_.find(request);
  MOEX_ASSERT(it != open_.end(), "trace {}: request handle {} is not open", path_, request);
  return it->second;
}

void TraceWriter::record(RequestHandle request, int32_t layer_idx, int64_t token_idx,
                         std::span<const int32_t> expert_ids, std::span<const float> weights) {
  OpenRequest& open = open_request(request);
  MOEX_ASSERT(layer_idx >= 0 && layer_idx < info_.num_layers, "trace record: layer {} of {}", layer_idx,
              info_.num_layers);
  MOEX_ASSERT(token_idx >= 0 && token_idx < trace_format::kMaxTokensPerRequest, "trace record: token {}", token_idx);
  MOEX_ASSERT(static_cast<int32_t>(expert_ids.size()) == info_.top_k, "trace record: {} ids, top_k {}",
              expert_ids.size(), info_.top_k);
  MOEX_ASSERT(weights.size() == (info_.with_gate_weights ? expert_ids.size() : 0),
              "trace record: {} weights for {} ids (gate weights {})", weights.size(), expert_ids.size(),
              info_.with_gate_weights ? "on" : "off");
  size_t row = static_cast<size_t>(info_.num_layers) * info_.top_k;
  size_t need = (static_cast<size_t>(token_idx) + 1) * row;
  if (open.expert_ids.size() < need) {
    open.expert_ids.resize(need, -1);
    if (info_.with_gate_weights) open.gate_weights.resize(need, 0.0f);
  }
  size_t at = static_cast<size_t>(token_idx) * row + static_cast<size_t>(layer_idx) * info_.top_k;
  for (size_t rank = 0; rank < expert_ids.size(); ++rank) {
    MOEX_ASSERT(expert_ids[rank] >= 0 && expert_ids[rank] < info_.num_experts, "trace record: expert id {} of {}",
                expert_ids[rank], info_.num_experts);
    open.expert_ids[at + rank] = expert_ids[rank];
    if (info_.with_gate_weights) open.gate_weights[at + rank] = weights[rank];
  }
}

void TraceWriter::record_token_id(RequestHandle request, int64_t token_idx, int32_t token_id) {
  OpenRequest& open = open_request(request);
  MOEX_ASSERT(info_.with_token_ids, "trace {}: token ids recorded but the header says none", path_);
  MOEX_ASSERT(token_idx >= 0 && token_id >= 0, "trace record_token_id: token {} id {}", token_idx, token_id);
  if (open.token_ids.size() <= static_cast<size_t>(token_idx)) open.token_ids.resize(token_idx + 1, -1);
  open.token_ids[token_idx] = token_id;
}

void TraceWriter::record_pregate(RequestHandle request, int32_t layer_idx, int64_t token_idx,
                                 std::span<const float> logits) {
  OpenRequest& open = open_request(request);
  MOEX_ASSERT(info_.with_pregate_logits, "trace {}: pre-gating logits recorded but the header says none", path_);
  MOEX_ASSERT(layer_idx >= 1 && layer_idx < info_.num_layers, "trace record_pregate: layer {} of {} (from 1)",
              layer_idx, info_.num_layers);
  MOEX_ASSERT(token_idx >= 0 && token_idx < trace_format::kMaxTokensPerRequest, "trace record_pregate: token {}",
              token_idx);
  MOEX_ASSERT(static_cast<int32_t>(logits.size()) == info_.num_experts, "trace record_pregate: {} logits for {} experts",
              logits.size(), info_.num_experts);
  const size_t cells = (static_cast<size_t>(token_idx) + 1) * info_.num_layers;
  if (open.pregate_set.size() < cells) {
    open.pregate_set.resize(cells, 0);
    open.pregate.resize(cells * info_.num_experts, 0.0f);
  }
  const size_t cell = static_cast<size_t>(token_idx) * info_.num_layers + layer_idx;
  std::copy(logits.begin(), logits.end(), open.pregate.begin() + static_cast<std::ptrdiff_t>(cell * info_.num_experts));
  open.pregate_set[cell] = 1;
}

void TraceWriter::end_request(RequestHandle request) {
  OpenRequest& open = open_request(request);
  size_t row = static_cast<size_t>(info_.num_layers) * info_.top_k;
  int64_t num_tokens = static_cast<int64_t>(open.expert_ids.size() / row);
  if (info_.with_pregate_logits) {
    open.pregate_set.resize(static_cast<size_t>(num_tokens) * info_.num_layers, 0);
    open.pregate.resize(open.pregate_set.size() * info_.num_experts, 0.0f);
    for (size_t cell = 0; cell < open.pregate_set.size(); ++cell)
      if (cell % info_.num_layers != 0 && !open.pregate_set[cell])
        throw FormatError(fmt::format("{}: request \"{}\": token {} has no pre-gating logits for layer {}", path_,
                                      open.id, cell / info_.num_layers, cell % info_.num_layers));
  }
  for (size_t at = 0; at < open.expert_ids.size(); ++at)
    if (open.expert_ids[at] < 0)
      throw FormatError(fmt::format("{}: request \"{}\": token {} has no routing recorded for layer {}", path_,
                                    open.id, at / row, (at % row) / info_.top_k));
  if (info_.with_token_ids) {
    if (static_cast<int64_t>(open.token_ids.size()) != num_tokens)
      throw FormatError(fmt::format("{}: request \"{}\": {} token ids for {} tokens", path_, open.id,
                                    open.token_ids.size(), num_tokens));
    for (size_t token_idx = 0; token_idx < open.token_ids.size(); ++token_idx)
      if (open.token_ids[token_idx] < 0)
        throw FormatError(fmt::format("{}: request \"{}\": token {} has no token id", path_, open.id, token_idx));
  }
  std::vector<uint8_t> bytes;
  bytes.reserve(8 + open.id.size() + open.expert_ids.size() * 4);
  bytes.push_back(trace_format::kRequestTag);
  append_le<uint16_t>(&bytes, static_cast<uint16_t>(open.id.size()));
  bytes.insert(bytes.end(), open.id.begin(), open.id.end());
  append_le<uint32_t>(&bytes, static_cast<uint32_t>(num_tokens));
  bool wide = info_.num_experts > 256;
  for (int64_t token_idx = 0; token_idx < num_tokens; ++token_idx) {
    if (info_.with_token_ids) append_le<uint32_t>(&bytes, static_cast<uint32_t>(open.token_ids[token_idx]));
    for (int32_t layer_idx = 0; layer_idx < info_.num_layers; ++layer_idx) {
      size_t at = static_cast<size_t>(token_idx) * row + static_cast<size_t>(layer_idx) * info_.top_k;
      for (int32_t rank = 0; rank < info_.top_k; ++rank) {
        if (wide) {
          append_le<uint16_t>(&bytes, static_cast<uint16_t>(open.expert_ids[at + rank]));
        } else {
          bytes.push_back(static_cast<uint8_t>(open.expert_ids[at + rank]));
        }
      }
      if (info_.with_gate_weights)
        for (int32_t rank = 0; rank < info_.top_k; ++rank)
          append_le<uint16_t>(&bytes, f32_to_f16(open.gate_weights[at + rank]));
    }
    if (info_.with_pregate_logits)
      for (int32_t layer_idx = 1; layer_idx < info_.num_layers; ++layer_idx) {
        const size_t cell = static_cast<size_t>(token_idx) * info_.num_layers + layer_idx;
        for (int32_t e = 0; e < info_.num_experts; ++e)
          append_le<uint16_t>(&bytes, f32_to_f16(std::clamp(open.pregate[cell * info_.num_experts + e], -65504.f, 65504.f)));
      }
  }
  write_bytes(bytes.data(), bytes.size());
  ++num_requests_;
  num_tokens_ += num_tokens;
  open_.erase(request);
}

void TraceWriter::close() {
  if (!file_) return;
  std::vector<uint8_t> bytes;
  bytes.push_back(trace_format::kEndTag);
  append_le<uint64_t>(&bytes, static_cast<uint64_t>(num_requests_));
  append_le<uint64_t>(&bytes, static_cast<uint64_t>(num_tokens_));
  std::FILE* file = file_;
  bool ok = std::fwrite(bytes.data(), 1, bytes.size(), file) == bytes.size();
  file_ = nullptr;
  open_.clear();
  ok = std::fclose(file) == 0 && ok;
  if (!ok) throw IoError(fmt::format("{}: could not finish the trace file: {}", path_, std::strerror(errno)));
}

}  // namespace moex
