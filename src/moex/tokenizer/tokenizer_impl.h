// The implementations behind moex::Tokenizer: tokenizer.json (HfTokenizer) and tokenizer.model
// (libsentencepiece). Private to src/moex/tokenizer.
#pragma once

#include <filesystem>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "moex/tokenizer/tokenizer.h"

namespace moex {

struct Tokenizer::Impl {
  virtual ~Impl() = default;
  virtual void encode(std::string_view text, bool add_special_tokens, std::vector<int32_t>& out) const = 0;
  virtual std::string decode(std::span<const int32_t> ids, bool skip_special_tokens) const = 0;
  virtual int32_t vocab_size() const = 0;
  virtual std::optional<int32_t> token_to_id(std::string_view token) const = 0;
  virtual std::optional<std::string> id_to_token(int32_t id) const = 0;
  virtual bool is_special(int32_t id) const = 0;

  std::optional<int32_t> bos_id, eos_id;
  std::string bos_token, eos_token, chat_template;
  bool add_bos = true, add_eos = false;  // tokenizer_config.json; used by tokenizer.model only
};

namespace tok {
std::unique_ptr<Tokenizer::Impl> make_hf_tokenizer(std::string_view json_text, const std::string& name);
// Throws FormatError when moex was built without libsentencepiece.
std::unique_ptr<Tokenizer::Impl> make_sentencepiece_tokenizer(const std::filesystem::path& model_path);
std::string read_file(const std::filesystem::path& path);  // IoError naming the path on failure
void check_utf8(std::string_view text);                     // UsageError naming the offset and byte
}  // namespace tok

}  // namespace moex
