// Pre-tokenizers of tokenizer.json. Splitting follows the reference NormalizedString::split exactly
// (alternating match/gap spans, then the behaviour), so piece boundaries match byte for byte.
#include "moex/tokenizer/json_util.h"
#include "moex/tokenizer/pipeline.h"
#include "moex/tokenizer/unicode.h"
#include "moex/tokenizer/utf8.h"

namespace moex::tok {

SplitBehavior parse_split_behavior(const nlohmann::json& j, const std::string& where) {
  const std::string name = j.is_string() ? j.get<std::string>() : std::string("<not a string>");
  if (name == "Removed") return SplitBehavior::kRemoved;
  if (name == "Isolated") return SplitBehavior::kIsolated;
  if (name == "MergedWithPrevious") return SplitBehavior::kMergedWithPrevious;
  if (name == "MergedWithNext") return SplitBehavior::kMergedWithNext;
  if (name == "Contiguous") return SplitBehavior::kContiguous;
  throw FormatError(fmt::format("{}: behavior \"{}\" is not one of Removed, Isolated, MergedWithPrevious, "
                                "MergedWithNext, Contiguous", where, name));
}

void split_piece(const Piece& piece, const std::vector<std::pair<size_t, size_t>>& matches, SplitBehavior behavior,
                 bool invert, std::vector<Piece>& out) {
  struct Span {
    size_t begin, end;
    bool flag;  // is_match, then "remove" after the behaviour is applied
  };
  const size_t len = piece.text.size();
  std::vector<Span> spans;
  spans.reserve(matches.size() * 2 + 1);
  size_t prev = 0;
  for (auto [b, e] : matches) {
    if (prev != b) spans.push_back({prev, b, false});
    spans.push_back({b, e, true});
    prev = e;
  }
  if (prev != len || spans.empty()) spans.push_back({prev, len, false});
  if (invert)
    for (auto& s : spans) s.flag = !s.flag;

  std::vector<Span> result;
  result.reserve(spans.size());
  bool previous_match = false;
  switch (behavior) {
    case SplitBehavior::kRemoved:
      result = std::move(spans);
      break;
    case SplitBehavior::kIsolated:
      for (auto& s : spans) result.push_back({s.begin, s.end, false});
      break;
    case SplitBehavior::kContiguous:
      for (auto& s : spans) {
        if (s.flag == previous_match && !result.empty()) result.back().end = s.end;
        else result.push_back({s.begin, s.end, false});
        previous_match = s.flag;
      }
      break;
    case SplitBehavior::kMergedWithPrevious:
      for (auto& s : spans) {
        if (s.flag && !previous_match && !result.empty()) result.back().end = s.end;
        else result.push_back({s.begin, s.end, false});
        previous_match = s.flag;
      }
      break;
    case SplitBehavior::kMergedWithNext:
      for (auto it = spans.rbegin(); it != spans.rend(); ++it) {
        if (it->flag && !previous_match && !result.empty()) result.back().begin = it->begin;
        else result.push_back({it->begin, it->end, false});
        previous_match = it->flag;
      }
      std::reverse(result.begin(), result.end());
      break;
  }
  for (const auto& s : result) {
    if (s.flag || s.begin == s.end) continue;
    out.push_back({piece.text.substr(s.begin, s.end - s.begin), piece.at_input_start && s.begin == 0});
  }
}

namespace {

// Each character for which `pred` holds is its own match (the reference's `Fn(char) -> bool` pattern).
template <class Pred>
void char_matches(std::string_view text, Pred&& pred, std::vector<std::pair<size_t, size_t>>& out) {
  for (size_t pos = 0; pos < text.size();) {
    const size_t len = utf8::char_len(text, pos);
    if (pred(utf8::decode(text, pos, len))) out.emplace_back(pos, pos + len);
    pos += len;
  }
}

void literal_matches(std::string_view text, std::string_view needle, std::vector<std::pair<size_t, size_t>>& out) {
  for (size_t pos = text.find(needle); pos != std::string_view::npos; pos = text.find(needle, pos + needle.size()))
    out.emplace_back(pos, pos + needle.size());
}

// Runs `find(text, matches)` on every piece and splits it with `behavior`.
template <class Find>
void split_all(std::vector<Piece>& pieces, EncodeScratch& scratch, SplitBehavior behavior, bool invert, Find&& find) {
  scratch.next.clear();
  for (const Piece& piece : pieces) {
    scratch.spans.clear();
    find(piece.text, scratch.spans);
    if (scratch.spans.empty() && !invert && piece.text.size()) {
      scratch.next.push_back(piece);  // no match: the piece survives whole under every behaviour
      continue;
    }
    split_piece(piece, scratch.spans, behavior, invert, scratch.next);
  }
  pieces.swap(scratch.next);
}

class Split final : public PreTokenizer {
 public:
  Split(const nlohmann::json& j, const std::string& where) {
    const auto& pattern = require(j, "pattern", where);
    if (pattern.contains("String")) {
      literal_ = get_string(pattern, "String", where + ".pattern");
    } else if (pattern.contains("Regex")) {
      regex_ = std::make_unique<Regex>(get_string(pattern, "Regex", where + ".pattern"), where + ".pattern.Regex");
    } else {
      throw FormatError(fmt::format("{}.pattern: expected {{\"String\": ...}} or {{\"Regex\": ...}}", where));
    }
    behavior_ = parse_split_behavior(require(j, "behavior", where), where + ".behavior");
    invert_ = get_bool(j, "invert", false, where);
  }
  void pre_tokenize(std::vector<Piece>& pieces, EncodeScratch& scratch) const override {
    split_all(pieces, scratch, behavior_, invert_, [&](std::string_view text, auto& out) {
      if (regex_) regex_->find_all(text, scratch.match, out);
      else if (!literal_.empty()) literal_matches(text, literal_, out);
    });
  }

 private:
  std::string literal_;
  std::unique_ptr<Regex> regex_;
  SplitBehavior behavior_;
  bool invert_;
};

// GPT-2's pattern, used by ByteLevel when use_regex is on.
constexpr const char* kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

class ByteLevel final : public PreTokenizer {
 public:
  ByteLevel(const nlohmann::json& j, const std::string& where)
      : add_prefix_space_(get_bool(j, "add_prefix_space", true, where)) {
    if (get_bool(j, "use_regex", true, where)) regex_ = std::make_unique<Regex>(kGpt2Pattern, where);
  }
  void pre_tokenize(std::vector<Piece>& pieces, EncodeScratch& scratch) const override {
    if (add_prefix_space_)
      for (Piece& piece : pieces)
        if (piece.text.empty() || piece.text.front() != ' ') {
          std::string spaced;
          spaced.reserve(piece.text.size() + 1);
          spaced.push_back(' ');
          spaced.append(piece.text);
          piece.text = scratch.keep(std::move(spaced));
        }
    if (regex_)
      split_all(pieces, scratch, SplitBehavior::kIsolated, false,
                [&](std::string_view text, auto& out) { regex_->find_all(text, scratch.match, out); });
  }
  bool byte_level() const override { return true; }

 private:
  bool add_prefix_space_;
  std::unique_ptr<Regex> regex_;
};

class Metaspace final : public PreTokenizer {
 public:
  enum class Prepend { kAlways, kFirst, kNever };
  Metaspace(const nlohmann::json& j, const std::string& where) {
    const std::string replacement = j.contains("replacement") ? get_string(j, "replacement", where) : "\xE2\x96\x81";
    if (replacement.empty() || utf8::char_len(replacement, 0) != replacement.size())
      throw FormatError(fmt::format("{}.replacement: expected one character, found \"{}\"", where, replacement));
    replacement_ = replacement;
    prepend_ = get_bool(j, "add_prefix_space", true, where) ? Prepend::kAlways : Prepend::kNever;
    if (j.contains("prepend_scheme")) {
      const std::string scheme = get_string(j, "prepend_scheme", where);
      if (scheme == "always") prepend_ = Prepend::kAlways;
      else if (scheme == "first") prepend_ = Prepend::kFirst;
      else if (scheme == "never") prepend_ = Prepend::kNever;
      else throw FormatError(fmt::format("{}.prepend_scheme: expected always|first|never, found \"{}\"", where, scheme));
    }
    split_ = get_bool(j, "split", true, where);
  }
  void pre_tokenize(std::vector<Piece>& pieces, EncodeScratch& scratch) const override {
    for (Piece& piece : pieces) {
      std::string text;
      text.reserve(piece.text.size() + 8);
      const bool starts = piece.text.starts_with(' ') || piece.text.starts_with(replacement_);
      if (!starts && (prepend_ == Prepend::kAlways || (prepend_ == Prepend::kFirst && piece.at_input_start)))
        text += replacement_;
      for (char c : piece.text) {
        if (c == ' ') text += replacement_;
        else text.push_back(c);
      }
      piece.text = scratch.keep(std::move(text));
    }
    if (split_)
      split_all(pieces, scratch, SplitBehavior::kMergedWithNext, false,
                [&](std::string_view text, auto& out) { literal_matches(text, replacement_, out); });
  }

 private:
  std::string replacement_;
  Prepend prepend_;
  bool split_;
};

template <class Pred>
class CharSplit final : public PreTokenizer {
 public:
  CharSplit(Pred pred, SplitBehavior behavior) : pred_(pred), behavior_(behavior) {}
  void pre_tokenize(std::vector<Piece>& pieces, EncodeScratch& scratch) const override {
    split_all(pieces, scratch, behavior_, false,
              [&](std::string_view text, auto& out) { char_matches(text, pred_, out); });
  }

 private:
  Pred pred_;
  SplitBehavior behavior_;
};
template <class Pred>
std::unique_ptr<PreTokenizer> char_split(Pred pred, SplitBehavior behavior) {
  return std::make_unique<CharSplit<Pred>>(pred, behavior);
}

class Whitespace final : public PreTokenizer {
 public:
  explicit Whitespace(const std::string& where) : regex_(R"(\w+|[^\w\s]+)", where) {}
  void pre_tokenize(std::vector<Piece>& pieces, EncodeScratch& scratch) const override {
    split_all(pieces, scratch, SplitBehavior::kRemoved, true,
              [&](std::string_view text, auto& out) { regex_.find_all(text, scratch.match, out); });
  }

 private:
  Regex regex_;
};

class Sequence final : public PreTokenizer {
 public:
  explicit Sequence(std::vector<std::unique_ptr<PreTokenizer>> parts) : parts_(std::move(parts)) {
    for (const auto& part : parts_) byte_level_ = byte_level_ || part->byte_level();
  }
  void pre_tokenize(std::vector<Piece>& pieces, EncodeScratch& scratch) const override {
    for (const auto& part : parts_) part->pre_tokenize(pieces, scratch);
  }
  bool byte_level() const override { return byte_level_; }

 private:
  std::vector<std::unique_ptr<PreTokenizer>> parts_;
  bool byte_level_ = false;
};

}  // namespace

std::unique_ptr<PreTokenizer> make_pre_tokenizer(const nlohmann::json& j, const std::string& where) {
  if (j.is_null()) return nullptr;
  const std::string type = type_of(j, where);
  if (type == "Split") return std::make_unique<Split>(j, where);
  if (type == "ByteLevel") return std::make_unique<ByteLevel>(j, where);
  if (type == "Metaspace") return std::make_unique<Metaspace>(j, where);
  if (type == "Digits")
    return char_split([](char32_t cp) { return is_numeric(cp); },
                      get_bool(j, "individual_digits", false, where) ? SplitBehavior::kIsolated
                                                                     : SplitBehavior::kContiguous);
  if (type == "Punctuation") {
    const auto behavior =
        j.contains("behavior") ? parse_split_behavior(j["behavior"], where + ".behavior") : SplitBehavior::kIsolated;
    return char_split([](char32_t cp) { return is_punctuation(cp); }, behavior);
  }
  if (type == "WhitespaceSplit") return char_split([](char32_t cp) { return is_whitespace(cp); }, SplitBehavior::kRemoved);
  if (type == "Whitespace") return std::make_unique<Whitespace>(where);
  if (type == "Sequence") {
    const auto& list = require(j, "pretokenizers", where);
    if (!list.is_array()) throw FormatError(fmt::format("{}.pretokenizers: expected an array", where));
    std::vector<std::unique_ptr<PreTokenizer>> parts;
    for (size_t idx = 0; idx < list.size(); ++idx) {
      const std::string at = fmt::format("{}.pretokenizers[{}]", where, idx);
      if (!parts.empty() && parts.back()->byte_level())
        throw FormatError(fmt::format("{}: a pre-tokenizer after ByteLevel is not supported (ByteLevel must be "
                                      "last, as in every supported family)", at));
      auto part = make_pre_tokenizer(list[idx], at);
      if (part) parts.push_back(std::move(part));
    }
    return std::make_unique<Sequence>(std::move(parts));
  }
  unsupported(where, type, "Split, ByteLevel, Metaspace, Digits, Punctuation, Whitespace, WhitespaceSplit, Sequence");
}

}  // namespace moex::tok
