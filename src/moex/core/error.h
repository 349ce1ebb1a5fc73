// Errors: bad input throws a moex::Error subclass (files, config, CLI, HTTP); bugs hit MOEX_ASSERT.
// Messages name the file/field, what was expected, what was found, then a hint.
#pragma once

#include <stdexcept>
#include <string>

#include <fmt/format.h>

namespace moex {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A file that is missing, unreadable, truncated or corrupt.
class IoError : public Error {
 public:
  using Error::Error;
};

// A config.json / tokenizer.json / checkpoint whose content disagrees with what moex supports.
class FormatError : public Error {
 public:
  using Error::Error;
};

// Bad CLI flags or request parameters.
class UsageError : public Error {
 public:
  using Error::Error;
};

// A resource budget (memory, cache slots) that cannot hold what the model needs.
class BudgetError : public Error {
 public:
  using Error::Error;
};

[[noreturn]] void assert_fail(const char* condition, const char* file, int line, const std::string& why);

}  // namespace moex

#define MOEX_ASSERT(cond, ...)                                                   \
  do {                                                                           \
    if (!(cond)) ::moex::assert_fail(#cond, __FILE__, __LINE__, fmt::format(__VA_ARGS__)); \
  } while (0)

#ifdef NDEBUG
#define MOEX_DCHECK(cond, ...) \
  do {                         \
  } while (0)
#else
#define MOEX_DCHECK(cond, ...) MOEX_ASSERT(cond, __VA_ARGS__)
#endif
