// PCRE2 (UTF + UCP, JIT-compiled when available) for the split patterns of tokenizer.json. Compiled once
// per tokenizer and shared read-only across threads; match state lives in a caller-owned MatchScratch.
#pragma once

#include <cstddef>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace moex::tok {

class MatchScratch {
 public:
  MatchScratch();
  ~MatchScratch();
  MatchScratch(const MatchScratch&) = delete;
  MatchScratch& operator=(const MatchScratch&) = delete;
  void* data() const { return data_; }

 private:
  void* data_;  // pcre2_match_data_8*
};

class Regex {
 public:
  // `where` names the tokenizer.json field for error messages.
  Regex(std::string_view pattern, const std::string& where);
  ~Regex();
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  // Non-overlapping matches, left to right, as [begin, end) byte offsets. Text must be valid UTF-8.
  void find_all(std::string_view text, MatchScratch& scratch, std::vector<std::pair<size_t, size_t>>& out) const;

 private:
  void* code_;  // pcre2_code_8*
  bool jit_ = false;
};

}  // namespace moex::tok
