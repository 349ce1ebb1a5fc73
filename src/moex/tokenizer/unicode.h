// Character classes the pipeline needs, with the reference's (Rust char) definitions.
#pragma once

namespace moex::tok {

bool is_whitespace(char32_t cp);   // Rust char::is_whitespace (Unicode White_Space)
bool is_numeric(char32_t cp);      // Rust char::is_numeric (Nd, Nl, No)
bool is_punctuation(char32_t cp);  // ASCII punctuation or a Unicode P* category
bool is_alphanumeric(char32_t cp); // Rust char::is_alphanumeric (L*, N*)
bool is_combining_mark(char32_t cp);  // any Mark (Mn, Mc, Me), as unicode-normalization defines it

}  // namespace moex::tok
