#include "moex/io/hf_config.h"

#include <gtest/gtest.h>

#include "moex/core/error.h"

namespace moex {
namespace {

TEST(HfConfig, TypedReadsAndFallbacks) {
  HfConfig cfg = HfConfig::parse(R"({"a": 3, "b": 1e-5, "c": true, "d": "x", "e": [1, 2], "f": null,
                                     "g": {"rope_theta": 500.0}})",
                                 "config.json");
  EXPECT_EQ(cfg.get_int("a"), 3);
  EXPECT_DOUBLE_EQ(cfg.get_double("b"), 1e-5);
  EXPECT_TRUE(cfg.get_bool("c", false));
  EXPECT_EQ(cfg.get_string("d"), "x");
  EXPECT_EQ(cfg.get_int_list("e"), (std::vector<int64_t>{1, 2}));
  EXPECT_EQ(cfg.get_int_list("a"), (std::vector<int64_t>{3}));
  EXPECT_FALSE(cfg.has("f"));
  EXPECT_EQ(cfg.get_int("f", 9), 9);
  EXPECT_DOUBLE_EQ(cfg.get_object("g")->get_double("rope_theta"), 500.0);
}

TEST(HfConfig, ErrorsNameFileAndField) {
  HfConfig cfg = HfConfig::parse(R"({"hidden_size": "big"})", "/m/config.json");
  try {
    cfg.get_int("hidden_size");
    FAIL();
  } catch (const FormatError& e) {
    EXPECT_STREQ(e.what(), "/m/config.json: field \"hidden_size\": expected an integer, found \"big\"");
  }
  try {
    cfg.get_int("vocab_size");
    FAIL();
  } catch (const FormatError& e) {
    EXPECT_STREQ(e.what(), "/m/config.json: required field \"vocab_size\" is missing");
  }
  EXPECT_THROW(HfConfig::parse("{not json", "x.json"), IoError);
  EXPECT_THROW(HfConfig::parse("[1]", "x.json"), FormatError);
  EXPECT_THROW(HfConfig::load("/nonexistent/config.json"), IoError);
}

}  // namespace
}  // namespace moex
