// Internal pieces of the tokenizer.json pipeline (normalizer -> pre-tokenizer -> model -> post-processor,
// decoder on the way back). Pieces are string_views into the input or into an arena owned by the encode
// call, so splitting never copies; only transforms that change text (Prepend, Metaspace) allocate.
#pragma once

#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "moex/tokenizer/regex.h"

namespace moex::tok {

struct Piece {
  std::string_view text;
  bool at_input_start;  // begins at offset 0 of the caller's text (Metaspace prepend_scheme "first")
};

// Per-encode-call state: keeps tokenizers const and thread-safe without locks on the hot path.
struct EncodeScratch {
  MatchScratch match;
  std::deque<std::string> arena;  // deque: element addresses (and so views into them) stay valid
  std::vector<Piece> pieces, next;
  std::vector<std::pair<size_t, size_t>> spans;
  std::string_view keep(std::string s) {
    arena.push_back(std::move(s));
    return arena.back();
  }
};

class Normalizer {
 public:
  virtual ~Normalizer() = default;
  virtual void normalize(std::string& text) const = 0;
};
// `where` is the JSON path for error messages ("tokenizer.json: normalizer.normalizers[1]").
std::unique_ptr<Normalizer> make_normalizer(const nlohmann::json& j, const std::string& where);

class PreTokenizer {
 public:
  virtual ~PreTokenizer() = default;
  // Replaces `pieces` with their splits (scratch.next is free to use as the output buffer).
  virtual void pre_tokenize(std::vector<Piece>& pieces, EncodeScratch& scratch) const = 0;
  // True for ByteLevel: the model then maps bytes to its byte alphabet itself (see BpeModel).
  virtual bool byte_level() const { return false; }
};
std::unique_ptr<PreTokenizer> make_pre_tokenizer(const nlohmann::json& j, const std::string& where);

class Decoder {
 public:
  virtual ~Decoder() = default;
  virtual void decode_chain(std::vector<std::string>& tokens) const = 0;
};
std::unique_ptr<Decoder> make_decoder(const nlohmann::json& j, const std::string& where);

// Split behaviours of the reference `NormalizedString::split`.
enum class SplitBehavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };
SplitBehavior parse_split_behavior(const nlohmann::json& j, const std::string& where);

// Applies `behavior` to the alternating match/non-match spans of `piece` found by `matches` (sorted,
// non-overlapping); appends the resulting non-empty pieces to `out`.
void split_piece(const Piece& piece, const std::vector<std::pair<size_t, size_t>>& matches, SplitBehavior behavior,
                 bool invert, std::vector<Piece>& out);

// The GPT-2 byte <-> unicode alphabet of ByteLevel.
const std::string& byte_to_unicode(uint8_t byte);  // UTF-8 of the printable char standing for `byte`
int unicode_to_byte(char32_t cp);                  // -1 when `cp` is not in the alphabet

}  // namespace moex::tok
