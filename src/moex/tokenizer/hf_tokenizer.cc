// tokenizer.json: added tokens split first (on raw text, then on normalized text for `normalized` ones),
// then normalizer -> pre-tokenizer -> BPE per span, then the post-processor's template.
#include <nlohmann/json.hpp>

#include "moex/tokenizer/added_vocab.h"
#include "moex/tokenizer/bpe_model.h"
#include "moex/tokenizer/json_util.h"
#include "moex/tokenizer/pipeline.h"
#include "moex/tokenizer/tokenizer_impl.h"
#include "moex/tokenizer/utf8.h"

namespace moex::tok {
namespace {

// A post-processor reduced to what ids need: the single-sequence template (ByteLevel only fixes offsets).
struct Template {
  struct Item {
    bool is_sequence;
    std::vector<int32_t> ids;  // of the special token
  };
  std::vector<Item> items;
  bool present = false;
};

void parse_post_processor(const nlohmann::json& j, const std::string& where, Template& tmpl) {
  if (j.is_null()) return;
  const std::string type = type_of(j, where);
  auto set = [&](std::vector<Template::Item> items) {
    if (tmpl.present)
      throw FormatError(fmt::format("{}: more than one post-processor adds special tokens; not supported", where));
    tmpl.items = std::move(items);
    tmpl.present = true;
  };
  if (type == "ByteLevel") return;
  if (type == "Sequence") {
    const auto& list = require(j, "processors", where);
    for (size_t idx = 0; idx < list.size(); ++idx)
      parse_post_processor(list[idx], fmt::format("{}.processors[{}]", where, idx), tmpl);
    return;
  }
  if (type == "TemplateProcessing") {
    const auto& specials = require(j, "special_tokens", where);
    std::vector<Template::Item> items;
    const auto& single = require(j, "single", where);
    if (!single.is_array()) throw FormatError(fmt::format("{}.single: expected an array", where));
    for (size_t idx = 0; idx < single.size(); ++idx) {
      const auto& piece = single[idx];
      const std::string at = fmt::format("{}.single[{}]", where, idx);
      if (piece.contains("Sequence")) {
        items.push_back({true, {}});
      } else if (piece.contains("SpecialToken")) {
        const std::string name = get_string(piece["SpecialToken"], "id", at + ".SpecialToken");
        const auto it = specials.find(name);
        if (it == specials.end())
          throw FormatError(fmt::format("{}: special token \"{}\" is not listed in {}.special_tokens", at, name, where));
        items.push_back({false, require(*it, "ids", where + ".special_tokens." + name).get<std::vector<int32_t>>()});
      } else {
        throw FormatError(fmt::format("{}: expected {{\"Sequence\": ...}} or {{\"SpecialToken\": ...}}, found {}", at,
                                      piece.dump()));
      }
    }
    set(std::move(items));
    return;
  }
  if (type == "RobertaProcessing" || type == "BertProcessing") {
    auto id_of = [&](const char* key) {
      const auto& v = require(j, key, where);  // ["<s>", 0]
      if (!v.is_array() || v.size() != 2 || !v[1].is_number_integer())
        throw FormatError(fmt::format("{}.{}: expected [token, id], found {}", where, key, v.dump()));
      return v[1].get<int32_t>();
    };
    set({{false, {id_of("cls")}}, {true, {}}, {false, {id_of("sep")}}});
    return;
  }
  unsupported(where, type, "TemplateProcessing, ByteLevel, RobertaProcessing, BertProcessing, Sequence");
}

// Parser callback that moves model.vocab and model.merges into `out` and keeps them out of the JSON tree.
nlohmann::json::parser_callback_t bpe_capture(BpeData& out, const std::string& where) {
  using Event = nlohmann::json::parse_event_t;
  struct State {
    std::string top_key, model_key, vocab_key;
    std::vector<std::string> pair;
  };
  auto st = std::make_shared<State>();
  return [&out, st, where](int depth, Event event, nlohmann::json& parsed) -> bool {
    if (event == Event::key && depth == 1) st->top_key = parsed.get<std::string>();
    if (st->top_key != "model") return true;
    if (event == Event::key && depth == 2) {
      st->model_key = parsed.get<std::string>();
      out.has_vocab = out.has_vocab || st->model_key == "vocab";
      out.has_merges = out.has_merges || st->model_key == "merges";
      return true;
    }
    if (depth < 3) return true;
    if (st->model_key == "vocab") {
      if (event == Event::key) {
        st->vocab_key = parsed.get<std::string>();
        return false;
      }
      if (event == Event::value && depth == 3) {
        if (!parsed.is_number_integer() || parsed.get<int64_t>() < 0 || parsed.get<int64_t>() > INT32_MAX)
          throw FormatError(fmt::format("{}.vocab[\"{}\"]: expected a non-negative integer id, found {}", where,
                                        st->vocab_key, parsed.dump()));
        out.vocab.emplace_back(std::move(st->vocab_key), parsed.get<int32_t>());
        return false;
      }
      throw FormatError(fmt::format("{}.vocab[\"{}\"]: expected a non-negative integer id", where, st->vocab_key));
    }
    if (st->model_key == "merges") {
      const size_t rank = out.merges.size();
      if (event == Event::value && depth == 3) {  // "a b" (older files)
        const std::string* s = parsed.is_string() ? parsed.get_ptr<const std::string*>() : nullptr;
        const size_t space = s ? s->find(' ', 1) : std::string::npos;
        if (space == std::string::npos)
          throw FormatError(fmt::format("{}.merges[{}]: expected \"left right\" or [left, right], found {}", where,
                                        rank, parsed.dump()));
        out.merges.emplace_back(s->substr(0, space), s->substr(space + 1));
        return false;
      }
      if (event == Event::array_start && depth == 3) {
        st->pair.clear();
        return true;
      }
      if (event == Event::value && depth == 4 && parsed.is_string()) {
        st->pair.push_back(std::move(parsed.get_ref<std::string&>()));
        return false;
      }
      if (event == Event::array_end && depth == 3 && st->pair.size() == 2) {
        out.merges.emplace_back(std::move(st->pair[0]), std::move(st->pair[1]));
        return false;
      }
      throw FormatError(fmt::format("{}.merges[{}]: expected \"left right\" or [left, right]", where, rank));
    }
    return true;
  };
}

class HfTokenizer final : public Tokenizer::Impl {
 public:
  HfTokenizer(std::string_view json_text, const std::string& name) {
    BpeData bpe;
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(json_text, bpe_capture(bpe, name + ": model"));
    } catch (const nlohmann::json::parse_error& e) {
      throw FormatError(fmt::format("{}: not valid JSON: {}", name, e.what()));
    }
    if (!j.is_object()) throw FormatError(fmt::format("{}: expected a JSON object at the top level", name));
    const auto& model = require(j, "model", name);
    const std::string model_type = model.contains("type") ? get_string(model, "type", name + ": model") : "BPE";
    if (model_type != "BPE")
      throw FormatError(fmt::format("{}: model: type \"{}\" is not supported (supported: BPE)", name, model_type));
    model_ = std::make_unique<BpeModel>(model, std::move(bpe), name + ": model");
    normalizer_ = make_normalizer(j.value("normalizer", nlohmann::json()), name + ": normalizer");
    pre_tokenizer_ = make_pre_tokenizer(j.value("pre_tokenizer", nlohmann::json()), name + ": pre_tokenizer");
    decoder_ = make_decoder(j.value("decoder", nlohmann::json()), name + ": decoder");
    parse_post_processor(j.value("post_processor", nlohmann::json()), name + ": post_processor", template_);
    model_->set_byte_level(pre_tokenizer_ && pre_tokenizer_->byte_level());
    vocab_size_ = model_->size();

    const auto added = j.value("added_tokens", nlohmann::json::array());
    added_.reserve(added.size());
    int32_t max_added = -1;
    for (size_t idx = 0; idx < added.size(); ++idx) {
      const std::string at = fmt::format("{}: added_tokens[{}]", name, idx);
      const auto& a = added[idx];
      AddedToken t{get_string(a, "content", at), -1, get_bool(a, "single_word", false, at),
                   get_bool(a, "lstrip", false, at), get_bool(a, "rstrip", false, at),
                   get_bool(a, "normalized", true, at), get_bool(a, "special", false, at)};
      if (t.content.empty()) throw FormatError(fmt::format("{}: content must not be empty", at));
      // The reference ignores the file's "id": a token the vocabulary (or an earlier added token) already
      // has keeps that id, a new one gets the next free id.
      if (auto it = added_by_content_.find(t.content); it != added_by_content_.end()) continue;
      if (auto known = model_->token_to_id(t.content)) {
        t.id = *known;
      } else {
        t.id = max_added < 0 ? model_->count() : (max_added >= model_->count() ? max_added + 1 : model_->count());
      }
      max_added = std::max(max_added, t.id);
      added_by_content_.emplace(t.content, t.id);
      vocab_size_ = std::max(vocab_size_, t.id + 1);
      added_.push_back(std::move(t));
    }
    std::vector<const AddedToken*> raw, normalized;
    for (AddedToken& t : added_) {
      added_by_id_.emplace(t.id, &t);
      if (t.normalized) {  // matched in normalized text, in normalized spelling
        normalized_content_.push_back(t);
        if (normalizer_) normalizer_->normalize(normalized_content_.back().content);
      }
    }
    for (AddedToken& t : added_)
      if (!t.normalized) raw.push_back(&t);
    for (AddedToken& t : normalized_content_) normalized.push_back(&t);
    raw_matcher_.build(std::move(raw));
    normalized_matcher_.build(std::move(normalized));
  }

  void encode(std::string_view text, bool add_special_tokens, std::vector<int32_t>& out) const override {
    check_utf8(text);
    if (add_special_tokens && template_.present) {
      for (const auto& item : template_.items) {
        if (item.is_sequence) encode_text(text, out);
        else out.insert(out.end(), item.ids.begin(), item.ids.end());
      }
    } else {
      encode_text(text, out);
    }
  }

  std::string decode(std::span<const int32_t> ids, bool skip_special_tokens) const override {
    std::vector<std::string> tokens;
    tokens.reserve(ids.size());
    for (int32_t id : ids) {
      if (auto it = added_by_id_.find(id); it != added_by_id_.end()) {
        if (!(skip_special_tokens && it->second->special)) tokens.push_back(it->second->content);
        continue;
      }
      const std::string* token = model_->id_to_token(id);
      if (!token)
        throw UsageError(fmt::format("token id {} is not in the vocabulary (valid ids: 0..{})", id, vocab_size_ - 1));
      tokens.push_back(*token);
    }
    if (!decoder_) {
      std::string joined;
      for (size_t idx = 0; idx < tokens.size(); ++idx) {
        if (idx) joined.push_back(' ');
        joined += tokens[idx];
      }
      return joined;
    }
    decoder_->decode_chain(tokens);
    std::string text;
    for (const auto& t : tokens) text += t;
    return text;
  }

  int32_t vocab_size() const override { return vocab_size_; }
  std::optional<int32_t> token_to_id(std::string_view token) const override {
    if (auto it = added_by_content_.find(token); it != added_by_content_.end()) return it->second;
    return model_->token_to_id(token);
  }
  std::optional<std::string> id_to_token(int32_t id) const override {
    if (auto it = added_by_id_.find(id); it != added_by_id_.end()) return it->second->content;
    if (const std::string* t = model_->id_to_token(id)) return *t;
    return std::nullopt;
  }
  bool is_special(int32_t id) const override {
    auto it = added_by_id_.find(id);
    return it != added_by_id_.end() && it->second->special;
  }

 private:
  void encode_text(std::string_view text, std::vector<int32_t>& out) const {
    EncodeScratch scratch;
    std::vector<Segment> segments;
    raw_matcher_.split(text, segments);
    std::vector<Segment> inner;
    std::string normalized;
    for (const Segment& seg : segments) {
      if (seg.id >= 0) {
        out.push_back(seg.id);
        continue;
      }
      normalized.assign(text.substr(seg.begin, seg.end - seg.begin));
      if (normalizer_) normalizer_->normalize(normalized);
      inner.clear();
      if (normalized_matcher_.empty()) inner.push_back({0, normalized.size(), -1});
      else normalized_matcher_.split(normalized, inner);
      for (const Segment& sub : inner) {
        if (sub.id >= 0) {
          out.push_back(sub.id);
          continue;
        }
        scratch.pieces.clear();
        scratch.pieces.push_back({std::string_view(normalized).substr(sub.begin, sub.end - sub.begin),
                                  seg.begin == 0 && sub.begin == 0});
        if (pre_tokenizer_) pre_tokenizer_->pre_tokenize(scratch.pieces, scratch);
        for (const Piece& piece : scratch.pieces) model_->encode_word(piece.text, out);
      }
    }
  }

  std::unique_ptr<BpeModel> model_;
  std::unique_ptr<Normalizer> normalizer_;
  std::unique_ptr<PreTokenizer> pre_tokenizer_;
  std::unique_ptr<Decoder> decoder_;
  Template template_;
  std::vector<AddedToken> added_;
  std::vector<AddedToken> normalized_content_;  // copies of `normalized` added tokens, content normalized
  VocabMap added_by_content_;
  std::unordered_map<int32_t, const AddedToken*> added_by_id_;
  AddedMatcher raw_matcher_, normalized_matcher_;
  int32_t vocab_size_ = 0;
};

}  // namespace

std::unique_ptr<Tokenizer::Impl> make_hf_tokenizer(std::string_view json_text, const std::string& name) {
  return std::make_unique<HfTokenizer>(json_text, name);
}

}  // namespace moex::tok
