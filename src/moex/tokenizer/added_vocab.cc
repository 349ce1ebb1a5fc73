// Added-token matching with the reference's lstrip/rstrip/single_word rules (AddedVocabulary::find_matches).
#include "moex/tokenizer/added_vocab.h"

#include <algorithm>
#include <cstring>

#include "moex/tokenizer/unicode.h"
#include "moex/tokenizer/utf8.h"

namespace moex::tok {
namespace {

char32_t char_before(std::string_view text, size_t pos, size_t* start) {
  size_t b = pos - 1;
  while (b > 0 && (static_cast<unsigned char>(text[b]) & 0xC0) == 0x80) --b;
  *start = b;
  return utf8::decode(text, b, pos - b);
}

bool is_word_char(char32_t cp) { return cp == '_' || is_alphanumeric(cp); }

}  // namespace

void AddedMatcher::build(std::vector<const AddedToken*> tokens) {
  tokens_ = std::move(tokens);
  for (auto& bucket : by_first_byte_) bucket.clear();
  for (const AddedToken* t : tokens_)
    if (!t->content.empty()) by_first_byte_[static_cast<unsigned char>(t->content[0])].push_back(t);
  for (auto& bucket : by_first_byte_)
    std::stable_sort(bucket.begin(), bucket.end(),
                     [](const AddedToken* a, const AddedToken* b) { return a->content.size() > b->content.size(); });
}

void AddedMatcher::split(std::string_view text, std::vector<Segment>& out) const {
  size_t start_offset = 0;  // end of the previous match
  size_t pos = 0;
  while (pos < text.size()) {
    const auto& bucket = by_first_byte_[static_cast<unsigned char>(text[pos])];
    const AddedToken* hit = nullptr;
    for (const AddedToken* t : bucket) {
      if (t->content.size() <= text.size() - pos && std::memcmp(text.data() + pos, t->content.data(), t->content.size()) == 0) {
        hit = t;
        break;
      }
    }
    if (!hit) {
      ++pos;
      continue;
    }
    size_t start = pos, stop = pos + hit->content.size();
    pos = stop;  // the automaton resumes after a match whether or not it is kept
    if (start < start_offset) continue;  // overlaps what a previous rstrip absorbed
    if (hit->single_word) {
      size_t unused;
      const bool start_space = start == 0 || !is_word_char(char_before(text, start, &unused));
      bool stop_space = stop == text.size();
      if (!stop_space) {
        const size_t len = utf8::char_len(text, stop);
        stop_space = !is_word_char(utf8::decode(text, stop, len));
      }
      if (!start_space || !stop_space) continue;
    }
    if (hit->lstrip) {
      size_t new_start = start;
      while (new_start > 0) {
        size_t b;
        if (!is_whitespace(char_before(text, new_start, &b))) break;
        new_start = b;
      }
      start = std::max(new_start, start_offset);
    }
    if (hit->rstrip) {
      while (stop < text.size()) {
        const size_t len = utf8::char_len(text, stop);
        if (!is_whitespace(utf8::decode(text, stop, len))) break;
        stop += len;
      }
      pos = stop;
    }
    if (start_offset < start) out.push_back({start_offset, start, -1});
    out.push_back({start, stop, hit->id});
    start_offset = stop;
  }
  if (start_offset < text.size()) out.push_back({start_offset, text.size(), -1});
}

}  // namespace moex::tok
