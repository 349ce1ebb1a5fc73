// PCRE2 wrapper. Matching runs with PCRE2_NO_UTF_CHECK: the subject is validated once per encode call,
// and without the flag PCRE2 would re-validate the remaining subject on every match (quadratic).
#define PCRE2_CODE_UNIT_WIDTH 8
#include "moex/tokenizer/regex.h"

#include <pcre2.h>

#include "moex/core/error.h"

namespace moex::tok {

MatchScratch::MatchScratch() : data_(pcre2_match_data_create(1, nullptr)) {}
MatchScratch::~MatchScratch() { pcre2_match_data_free(static_cast<pcre2_match_data*>(data_)); }

Regex::Regex(std::string_view pattern, const std::string& where) {
  int err = 0;
  PCRE2_SIZE err_off = 0;
  pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                                   PCRE2_UTF | PCRE2_UCP, &err, &err_off, nullptr);
  if (!code) {
    PCRE2_UCHAR msg[256];
    pcre2_get_error_message(err, msg, sizeof(msg));
    throw FormatError(fmt::format("{}: regex \"{}\" does not compile at offset {}: {}", where, pattern,
                                  static_cast<size_t>(err_off), reinterpret_cast<const char*>(msg)));
  }
  jit_ = pcre2_jit_compile(code, PCRE2_JIT_COMPLETE) == 0;
  code_ = code;
}

Regex::~Regex() { pcre2_code_free(static_cast<pcre2_code*>(code_)); }

void Regex::find_all(std::string_view text, MatchScratch& scratch,
                     std::vector<std::pair<size_t, size_t>>& out) const {
  auto* code = static_cast<pcre2_code*>(code_);
  auto* md = static_cast<pcre2_match_data*>(scratch.data());
  const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data());
  const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
  size_t pos = 0;
  while (pos <= text.size()) {
    const int rc = jit_ ? pcre2_jit_match(code, subject, text.size(), pos, PCRE2_NO_UTF_CHECK, md, nullptr)
                        : pcre2_match(code, subject, text.size(), pos, PCRE2_NO_UTF_CHECK, md, nullptr);
    if (rc == PCRE2_ERROR_NOMATCH) break;
    if (rc < 0 && rc != 0) {
      PCRE2_UCHAR msg[256];
      pcre2_get_error_message(rc, msg, sizeof(msg));
      throw Error(fmt::format("tokenizer regex match failed: {}", reinterpret_cast<const char*>(msg)));
    }
    const size_t begin = ov[0], end = ov[1];
    if (end == begin) {  // empty match: not a piece; step one character so the scan advances
      if (begin >= text.size()) break;
      size_t step = 1;
      while (begin + step < text.size() && (static_cast<unsigned char>(text[begin + step]) & 0xC0) == 0x80) ++step;
      pos = begin + step;
      continue;
    }
    out.emplace_back(begin, end);
    pos = end;
  }
}

}  // namespace moex::tok
