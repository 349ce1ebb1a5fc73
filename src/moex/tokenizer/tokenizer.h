// Text <-> token ids for every supported family, identical to the Hugging Face `tokenizers` library:
// tokenizer.json (byte-level BPE, SentencePiece-style BPE with byte fallback, their normalizers,
// pre-tokenizers, added tokens, post-processors and decoders), or tokenizer.model through libsentencepiece
// when a checkpoint ships no tokenizer.json. See docs/tokenizers.md for the supported parts.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace moex {

class Tokenizer {
 public:
  // Loads a checkpoint directory: tokenizer.json (else tokenizer.model), plus tokenizer_config.json
  // when present (bos/eos tokens, chat template, add_bos_token for tokenizer.model).
  // Throws IoError (missing/unreadable files) or FormatError (content moex does not support, naming the part).
  static Tokenizer from_dir(const std::filesystem::path& dir);
  // Loads one file: a tokenizer.json, or a SentencePiece tokenizer.model.
  static Tokenizer from_file(const std::filesystem::path& path);
  // Parses tokenizer.json text; `name` labels error messages.
  static Tokenizer from_json(std::string_view json_text, const std::string& name = "tokenizer.json");

  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;
  ~Tokenizer();

  // Text to ids, as the reference's encode(text, add_special_tokens).encodings.ids: added/special token
  // text in `text` becomes that token; add_special_tokens adds what the post-processor adds (BOS for
  // Llama-2/Mixtral, nothing for Qwen3). Throws UsageError if `text` is not valid UTF-8. Thread-safe.
  std::vector<int32_t> encode(std::string_view text, bool add_special_tokens = true) const;

  // Ids to text, as the reference's decode(ids, skip_special_tokens). Invalid UTF-8 that the ids spell
  // (a cut multi-byte character) becomes U+FFFD. Throws UsageError for an id outside [0, vocab_size()).
  std::string decode(std::span<const int32_t> ids, bool skip_special_tokens = false) const;

  // One past the largest id (model vocabulary and added tokens). The model's embedding may be larger.
  int32_t vocab_size() const;
  std::optional<int32_t> token_to_id(std::string_view token) const;
  std::optional<std::string> id_to_token(int32_t id) const;
  bool is_special(int32_t id) const;  // an added token marked special (skipped by skip_special_tokens)

  // From tokenizer_config.json (bos_token/eos_token), else what the file itself says; nullopt if unknown.
  std::optional<int32_t> bos_id() const;
  std::optional<int32_t> eos_id() const;
  const std::string& bos_token() const;  // "" when unknown
  const std::string& eos_token() const;
  // The chat_template of tokenizer_config.json (or chat_template.jinja); "" when the checkpoint has none.
  const std::string& chat_template() const;

  struct Impl;

 private:
  explicit Tokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Turns ids into text one id at a time for streaming output. Emits only complete UTF-8 characters: a byte
// token that starts a multi-byte character is held until the character is complete. The concatenation of
// everything step() and finish() return equals tokenizer.decode(all ids). Holds a reference to the
// Tokenizer, which must outlive it. Not thread-safe (one per stream).
class StreamingDecoder {
 public:
  explicit StreamingDecoder(const Tokenizer& tokenizer, bool skip_special_tokens = false);
  // Returns the new text that `id` completes ("" when it only extends an unfinished character).
  std::string step(int32_t id);
  // Returns whatever is still held (an unfinished character becomes U+FFFD) and resets the stream.
  std::string finish();

 private:
  const Tokenizer* tokenizer_;
  bool skip_special_;
  std::vector<int32_t> ids_;   // context window: ids whose text has been (partly) emitted, then pending ids
  std::string prefix_;         // decode(ids_[0, prefix_index_)) already emitted
  size_t prefix_index_ = 0;
};

}  // namespace moex
