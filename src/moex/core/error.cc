#include "moex/core/error.h"

#include <cstdio>
#include <cstdlib>

namespace moex {

void assert_fail(const char* condition, const char* file, int line, const std::string& why) {
  std::fprintf(stderr, "moex: internal error at %s:%d: check `%s` failed: %s\n", file, line, condition,
               why.c_str());
  std::abort();
}

}  // namespace moex
