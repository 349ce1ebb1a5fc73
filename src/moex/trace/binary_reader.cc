// Reader of moex's binary trace format; every length is checked against what is left in the file, so
// truncation and corruption become FormatErrors naming the request and token.
#include <cstring>
#include <fstream>
#include <iterator>

#include <nlohmann/json.hpp>

#include "moex/core/dtype.h"
#include "moex/core/error.h"
#include "moex/trace/binary_format.h"
#include "moex/trace/trace.h"
#include "moex/trace/validate.h"

namespace moex {
namespace {

class Cursor {
 public:
  Cursor(const std::string& path, const std::vector<uint8_t>& bytes) : path_(path), bytes_(bytes) {}

  template <typename T>
  T read(const std::string& what) {
    need(sizeof(T), what);
    uint64_t value = 0;
    for (size_t byte = 0; byte < sizeof(T); ++byte) value |= static_cast<uint64_t>(bytes_[pos_ + byte]) << (8 * byte);
    pos_ += sizeof(T);
    return static_cast<T>(value);
  }
  const uint8_t* take(size_t size, const std::string& what) {
    need(size, what);
    const uint8_t* at = bytes_.data() + pos_;
    pos_ += size;
    return at;
  }
  size_t pos() const { return pos_; }
  size_t left() const { return bytes_.size() - pos_; }

 private:
  void need(size_t size, const std::string& what) {
    if (left() < size)
      throw FormatError(fmt::format("{}: truncated at byte {} reading {}: need {} bytes, {} left", path_, pos_, what,
                                    size, left()));
  }
  const std::string& path_;
  const std::vector<uint8_t>& bytes_;
  size_t pos_ = 0;
};

template <typename T>
T header_field(const nlohmann::json& header, const std::string& path, const char* field) {
  if (!header.contains(field)) throw FormatError(fmt::format("{}: header has no field \"{}\"", path, field));
  try {
    return header.at(field).get<T>();
  } catch (const nlohmann::json::exception&) {
    throw FormatError(fmt::format("{}: header field \"{}\" has the wrong type: {}", path, field,
                                  header.at(field).dump()));
  }
}

}  // namespace

Trace read_moex_trace(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw IoError(fmt::format("{}: cannot open trace file", path));
  std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  Cursor cursor(path, bytes);
  const uint8_t* magic = cursor.take(sizeof(trace_format::kMagic), "the magic bytes");
  if (std::memcmp(magic, trace_format::kMagic, sizeof(trace_format::kMagic)) != 0)
    throw FormatError(fmt::format("{}: not a moex trace (magic bytes differ from \"MOEXTRC1\")", path));
  uint32_t header_len = cursor.read<uint32_t>("the header length");
  const uint8_t* header_bytes = cursor.take(header_len, "the header");
  nlohmann::json header = nlohmann::json::parse(header_bytes, header_bytes + header_len, nullptr, false);
  if (header.is_discarded() || !header.is_object())
    throw FormatError(fmt::format("{}: header is not a JSON object", path));
  int32_t version = header_field<int32_t>(header, path, "version");
  if (version != trace_format::kVersion)
    throw FormatError(fmt::format("{}: trace format version {}, this moex reads version {}", path, version,
                                  trace_format::kVersion));
  Trace trace;
  trace.path = path;
  trace.model = header_field<std::string>(header, path, "model");
  trace.num_layers = header_field<int32_t>(header, path, "num_layers");
  trace.num_experts = header_field<int32_t>(header, path, "num_experts");
  trace.top_k = header_field<int32_t>(header, path, "top_k");
  check_trace_shape(trace, path);
  if (header.contains("layer_ids")) trace.layer_ids = header_field<std::vector<int32_t>>(header, path, "layer_ids");
  int32_t id_bytes = header_field<int32_t>(header, path, "id_bytes");
  if (id_bytes != (trace.num_experts <= 256 ? 1 : 2))
    throw FormatError(fmt::format("{}: id_bytes {} does not fit num_experts {}", path, id_bytes, trace.num_experts));
  bool with_weights = header.contains("gate_weights") && !header["gate_weights"].is_null();
  if (with_weights && header["gate_weights"] != "f16")
    throw FormatError(fmt::format("{}: gate_weights encoding {} (expected \"f16\" or null)", path,
                                  header["gate_weights"].dump()));
  bool with_token_ids = header_field<bool>(header, path, "token_ids");
  bool with_pregate = header.contains("pregate_logits") && !header["pregate_logits"].is_null();
  if (with_pregate && header["pregate_logits"] != "f16")
    throw FormatError(fmt::format("{}: pregate_logits encoding {} (expected \"f16\" or null)", path,
                                  header["pregate_logits"].dump()));
  const size_t pregate_per_token = with_pregate ? static_cast<size_t>(trace.num_layers - 1) * trace.num_experts : 0;

  int64_t total_tokens = 0;
  while (true) {
    uint8_t tag = cursor.read<uint8_t>(fmt::format("the tag of record {}", trace.requests.size()));
    if (tag == trace_format::kEndTag) break;
    if (tag != trace_format::kRequestTag)
      throw FormatError(fmt::format("{}: byte {}: record tag 0x{:02x}, expected 'R' or 'E'", path, cursor.pos() - 1, tag));
    TraceRequest request;
    std::string where = fmt::format("request {}", trace.requests.size());
    uint16_t id_len = cursor.read<uint16_t>(where + " id length");
    const uint8_t* id = cursor.take(id_len, where + " id");
    request.id.assign(reinterpret_cast<const char*>(id), id_len);
    where = fmt::format("request {} (\"{}\")", trace.requests.size(), request.id);
    request.num_tokens = cursor.read<uint32_t>(where + " token count");
    size_t cells = static_cast<size_t>(trace.num_layers) * trace.top_k;
    size_t per_token = cells * id_bytes + (with_weights ? cells * 2 : 0) + (with_token_ids ? 4 : 0) +
                       pregate_per_token * 2;
    if (cursor.left() < per_token * request.num_tokens)
      throw FormatError(fmt::format("{}: truncated in {}: {} tokens need {} bytes, {} left", path, where,
                                    request.num_tokens, per_token * request.num_tokens, cursor.left()));
    request.expert_ids.reserve(cells * request.num_tokens);
    if (with_weights) request.gate_weights.reserve(cells * request.num_tokens);
    for (int64_t token_idx = 0; token_idx < request.num_tokens; ++token_idx) {
      if (with_token_ids) request.token_ids.push_back(static_cast<int32_t>(cursor.read<uint32_t>("token id")));
      for (int32_t layer_idx = 0; layer_idx < trace.num_layers; ++layer_idx) {
        for (int32_t rank = 0; rank < trace.top_k; ++rank)
          request.expert_ids.push_back(id_bytes == 1 ? cursor.read<uint8_t>("expert id") : cursor.read<uint16_t>("expert id"));
        if (with_weights)
          for (int32_t rank = 0; rank < trace.top_k; ++rank)
            request.gate_weights.push_back(f16_to_f32(cursor.read<uint16_t>("gate weight")));
      }
      if (with_pregate) {  // layers 1.. only; layer 0 has no layer before it
        request.pregate_logits.resize(request.pregate_logits.size() + trace.num_experts, 0.0f);
        for (size_t value = 0; value < pregate_per_token; ++value)
          request.pregate_logits.push_back(f16_to_f32(cursor.read<uint16_t>("pre-gating logit")));
      }
    }
    check_request_ids(trace, request, path + ": " + where);
    total_tokens += request.num_tokens;
    trace.requests.push_back(std::move(request));
  }
  uint64_t num_requests = cursor.read<uint64_t>("the end record");
  uint64_t num_tokens = cursor.read<uint64_t>("the end record");
  if (num_requests != trace.requests.size() || num_tokens != static_cast<uint64_t>(total_tokens))
    throw FormatError(fmt::format("{}: end record says {} requests / {} tokens, the file holds {} / {}", path,
                                  num_requests, num_tokens, trace.requests.size(), total_tokens));
  if (cursor.left() != 0) throw FormatError(fmt::format("{}: {} stray bytes after the end record", path, cursor.left()));
  return trace;
}

}  // namespace moex
