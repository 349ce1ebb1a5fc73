// Decoders of tokenizer.json. Each works on the token strings of the whole id list, like the reference's
// decode_chain; the final text is their concatenation.
#include <cstdlib>

#include "moex/tokenizer/json_util.h"
#include "moex/tokenizer/pipeline.h"
#include "moex/tokenizer/utf8.h"

namespace moex::tok {
namespace {

class ByteLevelDecoder final : public Decoder {
 public:
  void decode_chain(std::vector<std::string>& tokens) const override {
    std::string bytes;
    for (const std::string& token : tokens) {
      const size_t mark = bytes.size();
      bool ok = true;
      for (size_t pos = 0; pos < token.size() && ok;) {
        const size_t len = utf8::char_len(token, pos);
        const int b = len ? unicode_to_byte(utf8::decode(token, pos, len)) : -1;
        if (b < 0) ok = false;
        else bytes.push_back(static_cast<char>(b));
        pos += len ? len : 1;
      }
      if (!ok) {  // a token outside the byte alphabet (an added token) is taken as its own UTF-8
        bytes.resize(mark);
        bytes += token;
      }
    }
    tokens.assign(1, utf8::lossy(bytes));
  }
};

class MetaspaceDecoder final : public Decoder {
 public:
  MetaspaceDecoder(std::string replacement, bool strip_first) : replacement_(std::move(replacement)), strip_first_(strip_first) {}
  void decode_chain(std::vector<std::string>& tokens) const override {
    for (size_t idx = 0; idx < tokens.size(); ++idx) {
      std::string out;
      const std::string& token = tokens[idx];
      for (size_t pos = 0; pos < token.size();) {
        if (token.compare(pos, replacement_.size(), replacement_) == 0) {
          if (idx != 0 || !strip_first_) out.push_back(' ');
          pos += replacement_.size();
        } else {
          out.push_back(token[pos++]);
        }
      }
      tokens[idx] = std::move(out);
    }
  }

 private:
  std::string replacement_;
  bool strip_first_;
};

class ByteFallbackDecoder final : public Decoder {
 public:
  void decode_chain(std::vector<std::string>& tokens) const override {
    std::vector<std::string> out;
    out.reserve(tokens.size());
    std::string pending;
    auto flush = [&] {
      if (pending.empty()) return;
      if (utf8::first_invalid(pending) == std::string::npos) out.push_back(pending);
      else
        for (size_t k = 0; k < pending.size(); ++k) out.emplace_back("\xEF\xBF\xBD");
      pending.clear();
    };
    for (std::string& token : tokens) {
      if (token.size() == 6 && token.starts_with("<0x") && token.back() == '>' && std::isxdigit(token[3]) &&
          std::isxdigit(token[4])) {
        pending.push_back(static_cast<char>(std::strtol(token.substr(3, 2).c_str(), nullptr, 16)));
        continue;
      }
      flush();
      out.push_back(std::move(token));
    }
    flush();
    tokens = std::move(out);
  }
};

class Fuse final : public Decoder {
 public:
  void decode_chain(std::vector<std::string>& tokens) const override {
    std::string all;
    for (const auto& t : tokens) all += t;
    tokens.assign(1, std::move(all));
  }
};

class StripDecoder final : public Decoder {
 public:
  StripDecoder(std::string content, size_t start, size_t stop) : content_(std::move(content)), start_(start), stop_(stop) {}
  void decode_chain(std::vector<std::string>& tokens) const override {
    for (std::string& token : tokens) {
      size_t begin = 0, end = token.size();
      for (size_t k = 0; k < start_ && token.compare(begin, content_.size(), content_) == 0 && begin < end; ++k)
        begin += content_.size();
      for (size_t k = 0; k < stop_ && end >= begin + content_.size() &&
                         token.compare(end - content_.size(), content_.size(), content_) == 0;
           ++k)
        end -= content_.size();
      token = token.substr(begin, end - begin);
    }
  }

 private:
  std::string content_;
  size_t start_, stop_;
};

class ReplaceDecoder final : public Decoder {
 public:
  ReplaceDecoder(const nlohmann::json& j, const std::string& where) {
    const auto& pattern = require(j, "pattern", where);
    if (!pattern.contains("String"))
      throw FormatError(fmt::format("{}.pattern: only {{\"String\": ...}} patterns are supported in decoders", where));
    pattern_ = get_string(pattern, "String", where + ".pattern");
    content_ = get_string(j, "content", where);
    if (pattern_.empty()) throw FormatError(fmt::format("{}.pattern.String: must not be empty", where));
  }
  void decode_chain(std::vector<std::string>& tokens) const override {
    for (std::string& token : tokens) {
      std::string out;
      size_t prev = 0;
      for (size_t pos = token.find(pattern_); pos != std::string::npos; pos = token.find(pattern_, prev)) {
        out.append(token, prev, pos - prev);
        out += content_;
        prev = pos + pattern_.size();
      }
      out.append(token, prev);
      token = std::move(out);
    }
  }

 private:
  std::string pattern_, content_;
};

class SequenceDecoder final : public Decoder {
 public:
  explicit SequenceDecoder(std::vector<std::unique_ptr<Decoder>> parts) : parts_(std::move(parts)) {}
  void decode_chain(std::vector<std::string>& tokens) const override {
    for (const auto& part : parts_) part->decode_chain(tokens);
  }

 private:
  std::vector<std::unique_ptr<Decoder>> parts_;
};

}  // namespace

std::unique_ptr<Decoder> make_decoder(const nlohmann::json& j, const std::string& where) {
  if (j.is_null()) return nullptr;
  const std::string type = type_of(j, where);
  if (type == "ByteLevel") return std::make_unique<ByteLevelDecoder>();
  if (type == "Metaspace") {
    const std::string replacement = j.contains("replacement") ? get_string(j, "replacement", where) : "\xE2\x96\x81";
    bool strip_first = get_bool(j, "add_prefix_space", true, where);
    if (j.contains("prepend_scheme")) strip_first = get_string(j, "prepend_scheme", where) != "never";
    return std::make_unique<MetaspaceDecoder>(replacement, strip_first);
  }
  if (type == "ByteFallback") return std::make_unique<ByteFallbackDecoder>();
  if (type == "Fuse") return std::make_unique<Fuse>();
  if (type == "Strip") {
    const auto count = [&](const char* key) {
      const auto& v = require(j, key, where);
      if (!v.is_number_unsigned() && !(v.is_number_integer() && v.get<int64_t>() >= 0))
        throw FormatError(fmt::format("{}.{}: expected a non-negative integer, found {}", where, key, v.dump()));
      return v.get<size_t>();
    };
    return std::make_unique<StripDecoder>(get_string(j, "content", where), count("start"), count("stop"));
  }
  if (type == "Replace") return std::make_unique<ReplaceDecoder>(j, where);
  if (type == "Sequence") {
    const auto& list = require(j, "decoders", where);
    if (!list.is_array()) throw FormatError(fmt::format("{}.decoders: expected an array", where));
    std::vector<std::unique_ptr<Decoder>> parts;
    for (size_t idx = 0; idx < list.size(); ++idx) {
      auto part = make_decoder(list[idx], fmt::format("{}.decoders[{}]", where, idx));
      if (part) parts.push_back(std::move(part));
    }
    return std::make_unique<SequenceDecoder>(std::move(parts));
  }
  unsupported(where, type, "ByteLevel, Metaspace, ByteFallback, Fuse, Strip, Replace, Sequence");
}

}  // namespace moex::tok
