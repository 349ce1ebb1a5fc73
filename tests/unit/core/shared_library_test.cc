// SharedLibrary: the first loadable path wins, each failed path's reason is kept, and a missing symbol is named.
#include "moex/core/shared_library.h"

#include <gtest/gtest.h>

namespace moex {
namespace {

TEST(SharedLibrary, LoadsTheFirstPathThatLoadsAndBindsItsFunctions) {
  std::string errors;
  const auto library = SharedLibrary::open({"/nonexistent/libnothing.so", "libm.so.6"}, &errors);
  ASSERT_NE(library, nullptr) << errors;
  EXPECT_EQ(library->path(), "libm.so.6");
  double (*cosine)(double) = nullptr;
  void (*absent)() = nullptr;
  std::string missing;
  library->bind(cosine, "cos", &missing);
  EXPECT_TRUE(missing.empty());
  ASSERT_NE(cosine, nullptr);
  EXPECT_DOUBLE_EQ(cosine(0.0), 1.0);
  library->bind(absent, "moex_no_such_function", &missing);
  library->bind(absent, "moex_nor_this_one", &missing);
  EXPECT_EQ(absent, nullptr);
  EXPECT_EQ(missing, "moex_no_such_function");  // the first missing one
}

TEST(SharedLibrary, SaysWhyNoPathLoads) {
  std::string errors;
  EXPECT_EQ(SharedLibrary::open({"/nonexistent/a.so", "/nonexistent/b.so"}, &errors), nullptr);
  EXPECT_NE(errors.find("/nonexistent/a.so"), std::string::npos) << errors;
  EXPECT_NE(errors.find("; "), std::string::npos) << errors;
  EXPECT_NE(errors.find("/nonexistent/b.so"), std::string::npos) << errors;
}

}  // namespace
}  // namespace moex
