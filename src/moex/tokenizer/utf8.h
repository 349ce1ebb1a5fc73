// UTF-8 helpers shared by the tokenizer pipeline. Decoding follows Unicode's "maximal subpart" rule, the
// same one Rust's String::from_utf8_lossy uses, so lossy output matches the reference tokenizers byte for byte.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace moex::utf8 {

// Length in bytes of the well-formed character starting at s[pos], or 0 if the bytes there are not a
// well-formed character. `*invalid_len` (if given) receives the length of the maximal invalid subpart (>= 1).
size_t char_len(std::string_view s, size_t pos, size_t* invalid_len = nullptr);

// Offset of the first byte that is not part of well-formed UTF-8, or npos when the whole string is valid.
size_t first_invalid(std::string_view s);

// Replaces each maximal invalid subpart with U+FFFD (Rust's from_utf8_lossy).
std::string lossy(std::string_view s);

// Decodes the well-formed character at s[pos] (caller checked with char_len); returns its code point.
char32_t decode(std::string_view s, size_t pos, size_t len);

void append(std::string& out, char32_t cp);

inline bool is_ascii(std::string_view s) {
  for (unsigned char c : s)
    if (c >= 0x80) return false;
  return true;
}

}  // namespace moex::utf8
