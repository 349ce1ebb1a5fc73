// Normalizers of tokenizer.json. Each runs on one added-token-free span of the input at a time, as the
// reference does, which is why Prepend("▁") marks the start of every such span.
#include <utf8proc.h>

#include <cstdlib>

#include "moex/tokenizer/json_util.h"
#include "moex/tokenizer/pipeline.h"
#include "moex/tokenizer/unicode.h"
#include "moex/tokenizer/utf8.h"

namespace moex::tok {
namespace {

class UnicodeNormalizer final : public Normalizer {
 public:
  explicit UnicodeNormalizer(int options) : options_(options) {}
  void normalize(std::string& text) const override {
    if (utf8::is_ascii(text)) return;  // every normalization form leaves ASCII as is
    utf8proc_uint8_t* out = nullptr;
    const auto n = utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(text.data()),
                                static_cast<utf8proc_ssize_t>(text.size()), &out,
                                static_cast<utf8proc_option_t>(options_));
    if (n < 0) throw Error(fmt::format("unicode normalization failed: {}", utf8proc_errmsg(n)));
    text.assign(reinterpret_cast<const char*>(out), static_cast<size_t>(n));
    std::free(out);
  }

 private:
  int options_;
};

class Prepend final : public Normalizer {
 public:
  explicit Prepend(std::string s) : prefix_(std::move(s)) {}
  void normalize(std::string& text) const override {
    if (!text.empty()) text.insert(0, prefix_);
  }

 private:
  std::string prefix_;
};

class Replace final : public Normalizer {
 public:
  Replace(const nlohmann::json& j, const std::string& where) {
    const auto& pattern = require(j, "pattern", where);
    content_ = get_string(j, "content", where);
    if (pattern.contains("String")) {
      literal_ = get_string(pattern, "String", where + ".pattern");
      if (literal_.empty()) throw FormatError(fmt::format("{}.pattern.String: must not be empty", where));
    } else if (pattern.contains("Regex")) {
      regex_ = std::make_unique<Regex>(get_string(pattern, "Regex", where + ".pattern"), where + ".pattern.Regex");
    } else {
      throw FormatError(fmt::format("{}.pattern: expected {{\"String\": ...}} or {{\"Regex\": ...}}", where));
    }
  }
  void normalize(std::string& text) const override {
    if (regex_) {
      MatchScratch scratch;
      std::vector<std::pair<size_t, size_t>> matches;
      regex_->find_all(text, scratch, matches);
      if (matches.empty()) return;
      std::string out;
      size_t prev = 0;
      for (auto [b, e] : matches) {
        out.append(text, prev, b - prev);
        out += content_;
        prev = e;
      }
      out.append(text, prev);
      text = std::move(out);
      return;
    }
    size_t pos = text.find(literal_);
    if (pos == std::string::npos) return;
    std::string out;
    out.reserve(text.size() + text.size() / 4);
    size_t prev = 0;
    for (; pos != std::string::npos; pos = text.find(literal_, prev)) {
      out.append(text, prev, pos - prev);
      out += content_;
      prev = pos + literal_.size();
    }
    out.append(text, prev);
    text = std::move(out);
  }

 private:
  std::string literal_, content_;
  std::unique_ptr<Regex> regex_;
};

// Rewrites `text` one character at a time; `fn(cp, out)` appends the replacement.
template <class F>
void map_chars(std::string& text, F&& fn) {
  std::string out;
  out.reserve(text.size());
  for (size_t pos = 0; pos < text.size();) {
    const size_t len = utf8::char_len(text, pos);
    const char32_t cp = utf8::decode(text, pos, len);
    fn(cp, out);
    pos += len;
  }
  text = std::move(out);
}

class Lowercase final : public Normalizer {
 public:
  void normalize(std::string& text) const override {
    map_chars(text, [](char32_t cp, std::string& out) {
      utf8::append(out, static_cast<char32_t>(utf8proc_tolower(static_cast<utf8proc_int32_t>(cp))));
    });
  }
};

class StripAccents final : public Normalizer {
 public:
  void normalize(std::string& text) const override {
    map_chars(text, [](char32_t cp, std::string& out) {
      if (!is_combining_mark(cp)) utf8::append(out, cp);
    });
  }
};

class Strip final : public Normalizer {
 public:
  Strip(bool left, bool right) : left_(left), right_(right) {}
  void normalize(std::string& text) const override {
    size_t begin = 0, end = text.size();
    if (left_) {
      while (begin < end) {
        const size_t len = utf8::char_len(text, begin);
        if (!is_whitespace(utf8::decode(text, begin, len))) break;
        begin += len;
      }
    }
    if (right_) {
      while (end > begin) {
        size_t start = end - 1;
        while (start > begin && (static_cast<unsigned char>(text[start]) & 0xC0) == 0x80) --start;
        if (!is_whitespace(utf8::decode(text, start, end - start))) break;
        end = start;
      }
    }
    text = text.substr(begin, end - begin);
  }

 private:
  bool left_, right_;
};

class Sequence final : public Normalizer {
 public:
  explicit Sequence(std::vector<std::unique_ptr<Normalizer>> parts) : parts_(std::move(parts)) {}
  void normalize(std::string& text) const override {
    for (const auto& part : parts_) part->normalize(text);
  }

 private:
  std::vector<std::unique_ptr<Normalizer>> parts_;
};

}  // namespace

std::unique_ptr<Normalizer> make_normalizer(const nlohmann::json& j, const std::string& where) {
  if (j.is_null()) return nullptr;
  const std::string type = type_of(j, where);
  if (type == "NFC") return std::make_unique<UnicodeNormalizer>(UTF8PROC_STABLE | UTF8PROC_COMPOSE);
  if (type == "NFD") return std::make_unique<UnicodeNormalizer>(UTF8PROC_STABLE | UTF8PROC_DECOMPOSE);
  if (type == "NFKC")
    return std::make_unique<UnicodeNormalizer>(UTF8PROC_STABLE | UTF8PROC_COMPOSE | UTF8PROC_COMPAT);
  if (type == "NFKD")
    return std::make_unique<UnicodeNormalizer>(UTF8PROC_STABLE | UTF8PROC_DECOMPOSE | UTF8PROC_COMPAT);
  if (type == "Prepend") return std::make_unique<Prepend>(get_string(j, "prepend", where));
  if (type == "Replace") return std::make_unique<Replace>(j, where);
  if (type == "Lowercase") return std::make_unique<Lowercase>();
  if (type == "StripAccents") return std::make_unique<StripAccents>();
  if (type == "Strip")
    return std::make_unique<Strip>(get_bool(j, "strip_left", true, where), get_bool(j, "strip_right", true, where));
  if (type == "Sequence") {
    const auto& list = require(j, "normalizers", where);
    if (!list.is_array()) throw FormatError(fmt::format("{}.normalizers: expected an array", where));
    std::vector<std::unique_ptr<Normalizer>> parts;
    for (size_t idx = 0; idx < list.size(); ++idx) {
      auto part = make_normalizer(list[idx], fmt::format("{}.normalizers[{}]", where, idx));
      if (part) parts.push_back(std::move(part));
    }
    return std::make_unique<Sequence>(std::move(parts));
  }
  unsupported(where, type, "NFC, NFD, NFKC, NFKD, Prepend, Replace, Lowercase, StripAccents, Strip, Sequence");
}

}  // namespace moex::tok
