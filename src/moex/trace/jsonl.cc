// The shared JSONL trace format (../shared/traces/README.md): one request per line,
// {"model", "num_layers", "num_experts", "top_k", "tokens": [[[ids @layer0], ...], ...], optional
// "gate_weights" (same shape), "token_ids", "request_id", "layer_ids", "pregate_logits" ([token][layer]
// [num_experts], moex's addition)}. Errors name file and line.
#include <cerrno>
#include <cstring>
#include <fstream>

#include <nlohmann/json.hpp>

#include "moex/core/error.h"
#include "moex/trace/trace.h"
#include "moex/trace/validate.h"

namespace moex {
namespace {

using nlohmann::json;

const json& field(const json& line, const std::string& where, const char* name) {
  if (!line.contains(name)) throw FormatError(fmt::format("{}: missing field \"{}\"", where, name));
  return line.at(name);
}

int32_t int_field(const json& line, const std::string& where, const char* name) {
  const json& value = field(line, where, name);
  if (!value.is_number_integer())
    throw FormatError(fmt::format("{}: field \"{}\" must be an integer, found {}", where, name, value.dump()));
  return value.get<int32_t>();
}

std::string short_dump(const json& value) {
  std::string text = value.dump();
  return text.size() > 60 ? text.substr(0, 57) + "..." : text;
}

// tokens / gate_weights: [num_tokens][num_layers][top_k] into out (appended); pregate_logits has
// num_experts values per (token, layer) instead (inner, inner_name).
template <typename T>
void read_cube(const json& cube, const Trace& trace, const std::string& where, const char* name,
               std::vector<T>* out, int64_t expect_tokens, int32_t inner = -1, const char* inner_name = "top_k") {
  if (inner < 0) inner = trace.top_k;
  if (!cube.is_array()) throw FormatError(fmt::format("{}: \"{}\" must be an array of tokens", where, name));
  if (expect_tokens >= 0 && static_cast<int64_t>(cube.size()) != expect_tokens)
    throw FormatError(fmt::format("{}: \"{}\" has {} tokens, \"tokens\" has {}", where, name, cube.size(), expect_tokens));
  for (size_t token_idx = 0; token_idx < cube.size(); ++token_idx) {
    const json& layers = cube[token_idx];
    if (!layers.is_array() || static_cast<int32_t>(layers.size()) != trace.num_layers)
      throw FormatError(fmt::format("{}: \"{}\"[{}] must hold num_layers = {} lists, found {}", where, name,
                                    token_idx, trace.num_layers, short_dump(layers)));
    for (size_t layer_idx = 0; layer_idx < layers.size(); ++layer_idx) {
      const json& ids = layers[layer_idx];
      if (!ids.is_array() || static_cast<int32_t>(ids.size()) != inner)
        throw FormatError(fmt::format("{}: \"{}\"[{}][{}] must hold {} = {} values, found {}", where, name,
                                      token_idx, layer_idx, inner_name, inner, short_dump(ids)));
      for (const json& value : ids) {
        bool ok = std::is_integral_v<T> ? value.is_number_integer() : value.is_number();
        if (!ok)
          throw FormatError(fmt::format("{}: \"{}\"[{}][{}] holds {}, expected {}", where, name, token_idx,
                                        layer_idx, short_dump(value), std::is_integral_v<T> ? "integers" : "numbers"));
        out->push_back(value.get<T>());
      }
    }
  }
}

}  // namespace

Trace read_jsonl_trace(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw IoError(fmt::format("{}: cannot open trace file: {}", path, std::strerror(errno)));
  Trace trace;
  trace.path = path;
  std::string text;
  int64_t line_no = 0;
  while (std::getline(in, text)) {
    ++line_no;
    if (text.find_first_not_of(" \t\r") == std::string::npos) continue;
    std::string where = fmt::format("{}:{}", path, line_no);
    json line = json::parse(text, nullptr, false);
    if (line.is_discarded()) throw FormatError(fmt::format("{}: not valid JSON", where));
    if (!line.is_object()) throw FormatError(fmt::format("{}: expected a JSON object (one request per line)", where));
    int32_t num_layers = int_field(line, where, "num_layers");
    int32_t num_experts = int_field(line, where, "num_experts");
    int32_t top_k = int_field(line, where, "top_k");
    if (trace.requests.empty()) {
      trace.num_layers = num_layers, trace.num_experts = num_experts, trace.top_k = top_k;
      if (line.contains("model") && line["model"].is_string()) trace.model = line["model"].get<std::string>();
      if (line.contains("layer_ids")) {
        const json& layer_ids = line["layer_ids"];
        if (!layer_ids.is_array())
          throw FormatError(fmt::format("{}: \"layer_ids\" must be an array of integers", where));
        for (const json& id : layer_ids) {
          if (!id.is_number_integer())
            throw FormatError(fmt::format("{}: \"layer_ids\" holds {}, expected integers", where, short_dump(id)));
          trace.layer_ids.push_back(id.get<int32_t>());
        }
      }
      check_trace_shape(trace, where);
    } else if (num_layers != trace.num_layers || num_experts != trace.num_experts || top_k != trace.top_k) {
      throw FormatError(fmt::format("{}: num_layers/num_experts/top_k = {}/{}/{}, earlier lines said {}/{}/{}", where,
                                    num_layers, num_experts, top_k, trace.num_layers, trace.num_experts, trace.top_k));
    }
    TraceRequest request;
    if (line.contains("request_id")) {
      const json& id = line["request_id"];
      request.id = id.is_string() ? id.get<std::string>() : id.dump();
    } else {
      request.id = fmt::format("line{}", line_no);
    }
    const json& tokens = field(line, where, "tokens");
    read_cube(tokens, trace, where, "tokens", &request.expert_ids, -1);
    request.num_tokens = static_cast<int64_t>(tokens.size());
    if (line.contains("gate_weights") && !line["gate_weights"].is_null())
      read_cube(line["gate_weights"], trace, where, "gate_weights", &request.gate_weights, request.num_tokens);
    if (line.contains("pregate_logits") && !line["pregate_logits"].is_null())
      read_cube(line["pregate_logits"], trace, where, "pregate_logits", &request.pregate_logits, request.num_tokens,
                trace.num_experts, "num_experts");
    if (line.contains("token_ids") && !line["token_ids"].is_null()) {
      const json& ids = line["token_ids"];
      if (!ids.is_array() || static_cast<int64_t>(ids.size()) != request.num_tokens)
        throw FormatError(fmt::format("{}: \"token_ids\" must be an array of {} integers (one per token)", where,
                                      request.num_tokens));
      for (const json& id : ids) {
        if (!id.is_number_integer())
          throw FormatError(fmt::format("{}: \"token_ids\" holds {}, expected integers", where, short_dump(id)));
        request.token_ids.push_back(id.get<int32_t>());
      }
    }
    check_request_ids(trace, request, where);
    trace.requests.push_back(std::move(request));
  }
  if (in.bad()) throw IoError(fmt::format("{}: read error after line {}", path, line_no));
  if (trace.requests.empty()) throw FormatError(fmt::format("{}: no requests (empty trace)", path));
  return trace;
}

void write_jsonl_trace(const Trace& trace, const std::string& path) {
  std::ofstream out(path);
  if (!out) throw IoError(fmt::format("{}: cannot create file: {}", path, std::strerror(errno)));
  for (const TraceRequest& request : trace.requests) {
    json line = {{"model", trace.model},        {"num_layers", trace.num_layers}, {"num_experts", trace.num_experts},
                 {"top_k", trace.top_k},        {"request_id", request.id}};
    if (!trace.layer_ids.empty()) line["layer_ids"] = trace.layer_ids;
    json tokens = json::array();
    json weights = json::array();
    for (int64_t token_idx = 0; token_idx < request.num_tokens; ++token_idx) {
      json token_layers = json::array();
      json weight_layers = json::array();
      for (int32_t layer_idx = 0; layer_idx < trace.num_layers; ++layer_idx) {
        auto ids = trace.experts(request, token_idx, layer_idx);
        token_layers.push_back(std::vector<int32_t>(ids.begin(), ids.end()));
        auto w = trace.weights(request, token_idx, layer_idx);
        if (!w.empty()) weight_layers.push_back(std::vector<float>(w.begin(), w.end()));
      }
      tokens.push_back(std::move(token_layers));
      if (!request.gate_weights.empty()) weights.push_back(std::move(weight_layers));
    }
    line["tokens"] = std::move(tokens);
    if (!request.gate_weights.empty()) line["gate_weights"] = std::move(weights);
    if (!request.token_ids.empty()) line["token_ids"] = request.token_ids;
    if (!request.pregate_logits.empty()) {
      json pregate = json::array();
      for (int64_t token_idx = 0; token_idx < request.num_tokens; ++token_idx) {
        json layers = json::array();
        for (int32_t layer_idx = 0; layer_idx < trace.num_layers; ++layer_idx) {
          auto logits = trace.pregate(request, token_idx, layer_idx);
          layers.push_back(std::vector<float>(logits.begin(), logits.end()));
        }
        pregate.push_back(std::move(layers));
      }
      line["pregate_logits"] = std::move(pregate);
    }
    out << line.dump() << '\n';
  }
  if (!out) throw IoError(fmt::format("{}: write failed", path));
}

}  // namespace moex
