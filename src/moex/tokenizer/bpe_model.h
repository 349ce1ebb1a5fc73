// BPE model of tokenizer.json: byte-level (GPT-2/Qwen/DeepSeek/o200k) and SentencePiece-style (Llama-2,
// Mixtral: byte_fallback, unk). Merge ranks sit in an open-addressing table keyed by the id pair; words are
// merged with a priority queue over a linked list of symbols (lowest rank, then leftmost), the reference's
// order. Encoded words are cached: natural text repeats words, so the merge loop runs rarely.
#pragma once

#include <cstdint>
#include <optional>
#include <shared_mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "moex/tokenizer/flat_vocab.h"
#include "moex/tokenizer/word_cache.h"

namespace moex::tok {

// Not noexcept on purpose: libstdc++ then stores each node's hash, instead of re-hashing string keys
// while it walks a bucket.
struct StringHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};
using VocabMap = std::unordered_map<std::string, int32_t, StringHash, std::equal_to<>>;

// The two big parts of a BPE model, streamed out of tokenizer.json by the parser callback in
// hf_tokenizer.cc instead of being built as a JSON tree (half the load time of a 200k vocabulary).
struct BpeData {
  std::vector<std::pair<std::string, int32_t>> vocab;
  std::vector<std::pair<std::string, std::string>> merges;
  bool has_vocab = false, has_merges = false;
};

class BpeModel {
 public:
  // `model` holds the scalar fields; vocab and merges come in `data`.
  BpeModel(const nlohmann::json& model, BpeData data, const std::string& where);

  // With byte_level on, words arrive as raw bytes and each byte starts as the vocab entry of its
  // ByteLevel character (the reference maps the text first; the result is identical, without the copy).
  void set_byte_level(bool on);

  // Appends the ids of one pre-tokenized word. Thread-safe.
  void encode_word(std::string_view word, std::vector<int32_t>& out) const;

  std::optional<int32_t> token_to_id(std::string_view token) const;
  const std::string* id_to_token(int32_t id) const;  // nullptr when no token has this id
  int32_t size() const { return static_cast<int32_t>(id_to_token_.size()); }  // max id + 1
  int32_t count() const { return static_cast<int32_t>(vocab_.size()); }

 private:
  void encode_cached(std::string_view word, std::vector<int32_t>& out) const;
  void merge_word(std::string_view word, std::vector<int32_t>& out) const;
  bool lookup_merge(int32_t left, int32_t right, uint32_t* rank, int32_t* merged) const;

  FlatVocab vocab_;
  std::vector<std::string> id_to_token_;  // dense by id; holes are empty strings
  std::vector<uint64_t> merge_keys_;      // open addressing: (left << 32 | right) + 1, 0 = empty
  std::vector<uint64_t> merge_vals_;      // rank << 32 | merged id
  uint64_t merge_mask_ = 0;
  std::optional<int32_t> unk_id_;
  std::string continuing_prefix_, end_suffix_;
  bool byte_fallback_ = false, fuse_unk_ = false, ignore_merges_ = false, byte_level_ = false;
  // SentencePiece-style files have no pre-tokenizer, so a whole text is one "word". When no merge joins a
  // non-"▁" char to a following "▁" (true of Llama-2/Mistral), BPE never crosses such a boundary and the
  // text can be cut there into words that hit the cache: same ids, many times faster.
  bool split_before_metaspace_ = false;
  int32_t byte_ids_[256];        // ByteLevel char of each byte -> id, -1 if absent
  int32_t byte_fallback_ids_[256];  // "<0xXX>" -> id, -1 if absent

  // Raw word bytes -> ids. Long words are not cached (rare, and they would crowd the arenas).
  static constexpr size_t kCacheMaxWordBytes = 256;
  mutable std::shared_mutex cache_mutex_;
  mutable WordCache cache_;
};

}  // namespace moex::tok
