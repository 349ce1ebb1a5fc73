// Streaming detokenization: decode a short window of recent ids and emit the text past what the window's
// already-emitted prefix decodes to, holding back while the text ends in U+FFFD (an unfinished character).
// Decoding a window, not single ids, keeps decoder context (Llama's stripped leading space, byte fallback).
#include "moex/tokenizer/tokenizer.h"

namespace moex {
namespace {
bool ends_incomplete(const std::string& s) { return s.size() >= 3 && s.compare(s.size() - 3, 3, "\xEF\xBF\xBD") == 0; }
}  // namespace

StreamingDecoder::StreamingDecoder(const Tokenizer& tokenizer, bool skip_special_tokens)
    : tokenizer_(&tokenizer), skip_special_(skip_special_tokens) {}

std::string StreamingDecoder::step(int32_t id) {
  if (prefix_.empty() && !ids_.empty()) {
    std::string new_prefix = tokenizer_->decode(ids_, skip_special_);
    if (!ends_incomplete(new_prefix)) {
      prefix_ = std::move(new_prefix);
      prefix_index_ = ids_.size();
    }
  }
  ids_.push_back(id);
  std::string text = tokenizer_->decode(ids_, skip_special_);
  if (text.size() <= prefix_.size() || ends_incomplete(text)) return "";
  // The window's text normally extends its prefix; if a decoder rewrote it, emit from the first difference.
  size_t common = 0;
  while (common < prefix_.size() && text[common] == prefix_[common]) ++common;
  std::string fresh = text.substr(common);
  const size_t new_prefix_index = ids_.size() - prefix_index_;
  ids_.erase(ids_.begin(), ids_.begin() + static_cast<ptrdiff_t>(prefix_index_));
  prefix_ = tokenizer_->decode(ids_, skip_special_);
  prefix_index_ = new_prefix_index;
  return fresh;
}

std::string StreamingDecoder::finish() {
  std::string rest;
  if (ids_.size() > prefix_index_) {
    std::string text = tokenizer_->decode(ids_, skip_special_);
    if (text.size() > prefix_.size()) rest = text.substr(prefix_.size());
  }
  ids_.clear();
  prefix_.clear();
  prefix_index_ = 0;
  return rest;
}

}  // namespace moex
