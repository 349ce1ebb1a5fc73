// GPT-2's reversible byte alphabet: printable Latin-1 bytes stand for themselves, the other 68 bytes
// map to U+0100.. in order. Built once (immutable registry, see STYLE.md section 6).
#include <array>
#include <string>

#include "moex/tokenizer/pipeline.h"
#include "moex/tokenizer/utf8.h"

namespace moex::tok {
namespace {

struct ByteAlphabet {
  std::array<std::string, 256> to_unicode;
  std::array<int16_t, 512> to_byte;
  ByteAlphabet() {
    to_byte.fill(-1);
    int extra = 0;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      const char32_t cp = printable ? static_cast<char32_t>(b) : static_cast<char32_t>(256 + extra++);
      utf8::append(to_unicode[b], cp);
      to_byte[cp] = static_cast<int16_t>(b);
    }
  }
};

const ByteAlphabet& alphabet() {
  static const ByteAlphabet kAlphabet;
  return kAlphabet;
}

}  // namespace

const std::string& byte_to_unicode(uint8_t byte) { return alphabet().to_unicode[byte]; }

int unicode_to_byte(char32_t cp) { return cp < 512 ? alphabet().to_byte[cp] : -1; }

}  // namespace moex::tok
