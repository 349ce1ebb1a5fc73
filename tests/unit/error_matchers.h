// Test helper: the message of the moex::Error a call throws, for tests that assert user-facing errors.
#pragma once

#include <string>

#include <gtest/gtest.h>

#include "moex/core/error.h"

namespace moex::test {

// Runs fn and returns the message of the moex::Error it throws; fails the test if it throws none.
template <typename Fn>
std::string error_of(Fn&& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected a moex::Error";
  return "";
}

}  // namespace moex::test
