// Checked reads from tokenizer.json: every failure names the JSON path, what was expected and found.
#pragma once

#include <string>

#include <nlohmann/json.hpp>

#include "moex/core/error.h"

namespace moex::tok {

inline std::string json_kind(const nlohmann::json& j) { return j.type_name(); }

inline const nlohmann::json& require(const nlohmann::json& j, const char* key, const std::string& where) {
  if (!j.is_object()) throw FormatError(fmt::format("{}: expected an object, found {}", where, json_kind(j)));
  auto it = j.find(key);
  if (it == j.end()) throw FormatError(fmt::format("{}: missing field \"{}\"", where, key));
  return *it;
}

inline std::string get_string(const nlohmann::json& j, const char* key, const std::string& where) {
  const auto& v = require(j, key, where);
  if (!v.is_string())
    throw FormatError(fmt::format("{}.{}: expected a string, found {}", where, key, json_kind(v)));
  return v.get<std::string>();
}

inline bool get_bool(const nlohmann::json& j, const char* key, bool fallback, const std::string& where) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return fallback;
  if (!it->is_boolean())
    throw FormatError(fmt::format("{}.{}: expected true/false, found {}", where, key, json_kind(*it)));
  return it->get<bool>();
}

inline std::string type_of(const nlohmann::json& j, const std::string& where) {
  return get_string(j, "type", where);
}

[[noreturn]] inline void unsupported(const std::string& where, const std::string& type, const char* supported) {
  throw FormatError(fmt::format("{}: type \"{}\" is not supported (supported: {})", where, type, supported));
}

}  // namespace moex::tok
