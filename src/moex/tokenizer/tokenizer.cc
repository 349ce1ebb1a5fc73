// moex::Tokenizer: file discovery (tokenizer.json, tokenizer.model, tokenizer_config.json) and the thin
// public API over the implementations.
#include "moex/tokenizer/tokenizer.h"

#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "moex/core/error.h"
#include "moex/tokenizer/tokenizer_impl.h"
#include "moex/tokenizer/utf8.h"

namespace moex {
namespace tok {

std::string read_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw IoError(fmt::format("{}: cannot open file", path.string()));
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) throw IoError(fmt::format("{}: read failed", path.string()));
  return std::move(ss).str();
}

void check_utf8(std::string_view text) {
  const size_t bad = utf8::first_invalid(text);
  if (bad != std::string_view::npos)
    throw UsageError(fmt::format("input text is not valid UTF-8: byte 0x{:02x} at offset {} (of {} bytes)",
                                 static_cast<unsigned char>(text[bad]), bad, text.size()));
}

}  // namespace tok

namespace {

// bos_token/eos_token in tokenizer_config.json: a string, {"content": ...} (AddedToken), or null.
std::string special_token_text(const nlohmann::json& config, const char* key, const std::string& where) {
  auto it = config.find(key);
  if (it == config.end() || it->is_null()) return "";
  if (it->is_string()) return it->get<std::string>();
  if (it->is_object() && it->contains("content") && (*it)["content"].is_string()) return (*it)["content"];
  throw FormatError(fmt::format("{}: {}: expected a string or {{\"content\": ...}}, found {}", where, key, it->dump()));
}

void apply_config(Tokenizer::Impl& impl, const std::filesystem::path& dir) {
  const auto config_path = dir / "tokenizer_config.json";
  if (std::filesystem::exists(config_path)) {
    const std::string where = config_path.string();
    nlohmann::json config;
    try {
      config = nlohmann::json::parse(tok::read_file(config_path));
    } catch (const nlohmann::json::parse_error& e) {
      throw FormatError(fmt::format("{}: not valid JSON: {}", where, e.what()));
    }
    for (auto [key, text, id] : {std::tuple{"bos_token", &impl.bos_token, &impl.bos_id},
                                 std::tuple{"eos_token", &impl.eos_token, &impl.eos_id}}) {
      const std::string value = special_token_text(config, key, where);
      if (value.empty()) continue;
      const auto found = impl.token_to_id(value);
      if (!found)
        throw FormatError(fmt::format("{}: {} \"{}\" is not a token of the tokenizer", where, key, value));
      *text = value;
      *id = found;
    }
    if (config.contains("add_bos_token") && config["add_bos_token"].is_boolean()) impl.add_bos = config["add_bos_token"];
    if (config.contains("add_eos_token") && config["add_eos_token"].is_boolean()) impl.add_eos = config["add_eos_token"];
    if (auto it = config.find("chat_template"); it != config.end() && !it->is_null()) {
      if (it->is_string()) {
        impl.chat_template = it->get<std::string>();
      } else if (it->is_array()) {  // [{"name": "default", "template": ...}, ...]
        for (const auto& entry : *it)
          if (entry.value("name", "") == "default") impl.chat_template = entry.value("template", "");
      } else {
        throw FormatError(fmt::format("{}: chat_template: expected a string or a list of named templates", where));
      }
    }
  }
  const auto jinja_path = dir / "chat_template.jinja";
  if (std::filesystem::exists(jinja_path)) impl.chat_template = tok::read_file(jinja_path);
}

}  // namespace

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::~Tokenizer() = default;

Tokenizer Tokenizer::from_json(std::string_view json_text, const std::string& name) {
  return Tokenizer(tok::make_hf_tokenizer(json_text, name));
}

Tokenizer Tokenizer::from_file(const std::filesystem::path& path) {
  if (path.extension() == ".model") return Tokenizer(tok::make_sentencepiece_tokenizer(path));
  return from_json(tok::read_file(path), path.string());
}

Tokenizer Tokenizer::from_dir(const std::filesystem::path& dir) {
  if (!std::filesystem::is_directory(dir))
    throw IoError(fmt::format("{}: not a directory (expected a checkpoint directory with tokenizer.json)", dir.string()));
  std::unique_ptr<Impl> impl;
  if (std::filesystem::exists(dir / "tokenizer.json")) {
    impl = tok::make_hf_tokenizer(tok::read_file(dir / "tokenizer.json"), (dir / "tokenizer.json").string());
  } else if (std::filesystem::exists(dir / "tokenizer.model")) {
    impl = tok::make_sentencepiece_tokenizer(dir / "tokenizer.model");
  } else {
    throw IoError(fmt::format("{}: no tokenizer.json or tokenizer.model in this directory", dir.string()));
  }
  apply_config(*impl, dir);
  return Tokenizer(std::move(impl));
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool add_special_tokens) const {
  std::vector<int32_t> ids;
  ids.reserve(text.size() / 3 + 4);
  impl_->encode(text, add_special_tokens, ids);
  return ids;
}

std::string Tokenizer::decode(std::span<const int32_t> ids, bool skip_special_tokens) const {
  return impl_->decode(ids, skip_special_tokens);
}

int32_t Tokenizer::vocab_size() const { return impl_->vocab_size(); }
std::optional<int32_t> Tokenizer::token_to_id(std::string_view token) const { return impl_->token_to_id(token); }
std::optional<std::string> Tokenizer::id_to_token(int32_t id) const { return impl_->id_to_token(id); }
bool Tokenizer::is_special(int32_t id) const { return impl_->is_special(id); }
std::optional<int32_t> Tokenizer::bos_id() const { return impl_->bos_id; }
std::optional<int32_t> Tokenizer::eos_id() const { return impl_->eos_id; }
const std::string& Tokenizer::bos_token() const { return impl_->bos_token; }
const std::string& Tokenizer::eos_token() const { return impl_->eos_token; }
const std::string& Tokenizer::chat_template() const { return impl_->chat_template; }

}  // namespace moex
