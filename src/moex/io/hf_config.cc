#include "moex/io/hf_config.h"

#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "moex/core/error.h"

namespace moex {

struct HfConfig::Impl {
  nlohmann::json json;
};

HfConfig::HfConfig(std::unique_ptr<Impl> impl, std::string source) : impl_(std::move(impl)), source_(std::move(source)) {}
HfConfig::HfConfig(const HfConfig& other)
    : impl_(std::make_unique<Impl>(*other.impl_)), source_(other.source_) {}
HfConfig& HfConfig::operator=(const HfConfig& other) {
  impl_ = std::make_unique<Impl>(*other.impl_);
  source_ = other.source_;
  return *this;
}
HfConfig::~HfConfig() = default;

HfConfig HfConfig::load(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw IoError(fmt::format("{}: cannot open (missing file?)", path));
  std::stringstream buffer;
  buffer << in.rdbuf();
  return parse(buffer.str(), path);
}

HfConfig HfConfig::parse(const std::string& text, const std::string& source) {
  auto impl = std::make_unique<Impl>();
  try {
    impl->json = nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    throw IoError(fmt::format("{}: not valid JSON: {}", source, e.what()));
  }
  if (!impl->json.is_object()) throw FormatError(fmt::format("{}: expected a JSON object", source));
  return HfConfig(std::move(impl), source);
}

bool HfConfig::has(const std::string& key) const {
  auto it = impl_->json.find(key);
  return it != impl_->json.end() && !it->is_null();
}

namespace {
std::string found(const nlohmann::json& value) {
  std::string text = value.dump();
  if (text.size() > 60) text = text.substr(0, 57) + "...";
  return text;
}
}  // namespace

int64_t HfConfig::get_int(const std::string& key) const {
  if (!has(key)) throw FormatError(fmt::format("{}: required field \"{}\" is missing", source_, key));
  const auto& value = impl_->json[key];
  if (value.is_number_integer()) return value.get<int64_t>();
  if (value.is_number_float() && value.get<double>() == static_cast<double>(static_cast<int64_t>(value.get<double>())))
    return static_cast<int64_t>(value.get<double>());
  throw FormatError(fmt::format("{}: field \"{}\": expected an integer, found {}", source_, key, found(value)));
}

int64_t HfConfig::get_int(const std::string& key, int64_t fallback) const {
  return has(key) ? get_int(key) : fallback;
}

double HfConfig::get_double(const std::string& key) const {
  if (!has(key)) throw FormatError(fmt::format("{}: required field \"{}\" is missing", source_, key));
  const auto& value = impl_->json[key];
  if (!value.is_number())
    throw FormatError(fmt::format("{}: field \"{}\": expected a number, found {}", source_, key, found(value)));
  return value.get<double>();
}

double HfConfig::get_double(const std::string& key, double fallback) const {
  return has(key) ? get_double(key) : fallback;
}

bool HfConfig::get_bool(const std::string& key, bool fallback) const {
  if (!has(key)) return fallback;
  const auto& value = impl_->json[key];
  if (!value.is_boolean())
    throw FormatError(fmt::format("{}: field \"{}\": expected true or false, found {}", source_, key, found(value)));
  return value.get<bool>();
}

std::string HfConfig::get_string(const std::string& key) const {
  if (!has(key)) throw FormatError(fmt::format("{}: required field \"{}\" is missing", source_, key));
  const auto& value = impl_->json[key];
  if (!value.is_string())
    throw FormatError(fmt::format("{}: field \"{}\": expected a string, found {}", source_, key, found(value)));
  return value.get<std::string>();
}

std::string HfConfig::get_string(const std::string& key, const std::string& fallback) const {
  return has(key) ? get_string(key) : fallback;
}

std::vector<int64_t> HfConfig::get_int_list(const std::string& key) const {
  std::vector<int64_t> out;
  if (!has(key)) return out;
  const auto& value = impl_->json[key];
  if (value.is_number_integer()) return {value.get<int64_t>()};
  if (!value.is_array())
    throw FormatError(fmt::format("{}: field \"{}\": expected an integer or a list of integers, found {}", source_,
                                  key, found(value)));
  for (const auto& item : value) {
    if (!item.is_number_integer())
      throw FormatError(fmt::format("{}: field \"{}\": expected integers, found {}", source_, key, found(item)));
    out.push_back(item.get<int64_t>());
  }
  return out;
}

std::vector<std::string> HfConfig::get_string_list(const std::string& key) const {
  std::vector<std::string> out;
  if (!has(key)) return out;
  const auto& value = impl_->json[key];
  if (value.is_string()) return {value.get<std::string>()};
  if (!value.is_array())
    throw FormatError(fmt::format("{}: field \"{}\": expected a list of strings, found {}", source_, key, found(value)));
  for (const auto& item : value) {
    if (!item.is_string())
      throw FormatError(fmt::format("{}: field \"{}\": expected strings, found {}", source_, key, found(item)));
    out.push_back(item.get<std::string>());
  }
  return out;
}

std::optional<HfConfig> HfConfig::get_object(const std::string& key) const {
  if (!has(key)) return std::nullopt;
  const auto& value = impl_->json[key];
  if (!value.is_object())
    throw FormatError(fmt::format("{}: field \"{}\": expected an object, found {}", source_, key, found(value)));
  auto impl = std::make_unique<Impl>();
  impl->json = value;
  return HfConfig(std::move(impl), source_ + ": " + key);
}

std::string HfConfig::dump() const { return impl_->json.dump(2); }

}  // namespace moex
