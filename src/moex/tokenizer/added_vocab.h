// Added tokens (special and not): text that matches one becomes that token before any normalization or
// pre-tokenization. Matching is leftmost-longest, like the reference's Aho-Corasick automaton; the token
// lists are short (tens to ~1000), so a first-byte filter plus memcmp is as fast here.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace moex::tok {

struct AddedToken {
  std::string content;  // as matched: normalized for `normalized` tokens
  int32_t id;
  bool single_word, lstrip, rstrip, normalized, special;
};

struct Segment {
  size_t begin, end;  // byte span of the input (for a token: including what lstrip/rstrip absorbed)
  int32_t id;         // -1 for plain text
};

class AddedMatcher {
 public:
  void build(std::vector<const AddedToken*> tokens);
  bool empty() const { return tokens_.empty(); }
  // Splits `text` into plain-text and added-token segments, in order.
  void split(std::string_view text, std::vector<Segment>& out) const;

 private:
  std::vector<const AddedToken*> tokens_;
  std::array<std::vector<const AddedToken*>, 256> by_first_byte_;  // longest first
};

}  // namespace moex::tok
