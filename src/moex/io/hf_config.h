// Typed, validating access to a Hugging Face JSON config (config.json, generation_config.json).
// Every failed read names the file and the field, and says what was expected and what was found.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace moex {

class HfConfig {
 public:
  // Reads and parses a JSON object file; throws IoError when missing or not valid JSON.
  static HfConfig load(const std::string& path);
  // Parses text; `source` names it in messages.
  static HfConfig parse(const std::string& text, const std::string& source);
  HfConfig(const HfConfig&);
  HfConfig& operator=(const HfConfig&);
  ~HfConfig();

  const std::string& source() const { return source_; }
  // True when the key is present and not null.
  bool has(const std::string& key) const;

  int64_t get_int(const std::string& key) const;
  int64_t get_int(const std::string& key, int64_t fallback) const;
  double get_double(const std::string& key) const;
  double get_double(const std::string& key, double fallback) const;
  bool get_bool(const std::string& key, bool fallback) const;
  std::string get_string(const std::string& key) const;
  std::string get_string(const std::string& key, const std::string& fallback) const;
  // An int or a list of ints (e.g. eos_token_id); empty when absent.
  std::vector<int64_t> get_int_list(const std::string& key) const;
  std::vector<std::string> get_string_list(const std::string& key) const;
  // A nested object (e.g. rope_parameters), its source named "file: key".
  std::optional<HfConfig> get_object(const std::string& key) const;
  std::string dump() const;

 private:
  struct Impl;
  HfConfig(std::unique_ptr<Impl> impl, std::string source);
  std::unique_ptr<Impl> impl_;
  std::string source_;
};

}  // namespace moex
