// Bad tokenizer files and bad input: each error names the part, what was expected and what was found.
#include <filesystem>

#include "moex/core/error.h"
#include "moex/tokenizer/tokenizer.h"
#include "tokenizer_files.h"

namespace moex {
namespace {

// A tiny byte-level BPE: the byte alphabet for "abc " plus merges a+b, ab+c.
std::string tiny_json(const std::string& overrides = "") {
  return R"({"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "c": 2, "Ġ": 3, "ab": 4, "abc": 5},
             "merges": ["a b", ["ab", "c"]]},
             "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "use_regex": true},
             "decoder": {"type": "ByteLevel"},
             "added_tokens": [{"id": 6, "content": "<eos>", "special": true, "normalized": false}])" +
         overrides + "}";
}

template <class E>
std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const E& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected an exception";
  return "";
}

TEST(TokenizerErrors, TinyTokenizerWorks) {
  const Tokenizer tok = Tokenizer::from_json(tiny_json());
  EXPECT_EQ(tok.encode("abc ab<eos>c"), (std::vector<int32_t>{5, 3, 4, 6, 2}));
  EXPECT_EQ(tok.decode(std::vector<int32_t>{5, 3, 4, 6, 2}), "abc ab<eos>c");
  EXPECT_EQ(tok.decode(std::vector<int32_t>{5, 6}, /*skip_special_tokens=*/true), "abc");
  EXPECT_EQ(tok.vocab_size(), 7);
  EXPECT_EQ(tok.token_to_id("<eos>"), 6);
  EXPECT_EQ(tok.id_to_token(4), "ab");
  EXPECT_TRUE(tok.is_special(6));
  EXPECT_FALSE(tok.is_special(5));
  EXPECT_EQ(tok.encode(""), std::vector<int32_t>{});
}

TEST(TokenizerErrors, UnsupportedPartsAreNamed) {
  auto msg = error_of<FormatError>([] {
    Tokenizer::from_json(R"({"model": {"type": "WordPiece", "vocab": {}}})", "x/tokenizer.json");
  });
  EXPECT_NE(msg.find("x/tokenizer.json: model: type \"WordPiece\" is not supported (supported: BPE)"), std::string::npos) << msg;
  msg = error_of<FormatError>([] { Tokenizer::from_json(tiny_json(R"(, "normalizer": {"type": "Precompiled"})")); });
  EXPECT_NE(msg.find("normalizer: type \"Precompiled\" is not supported"), std::string::npos) << msg;
  msg = error_of<FormatError>([] {
    Tokenizer::from_json(tiny_json(R"(, "normalizer": {"type": "Sequence", "normalizers": [{"type": "NFC"}, {"type": "BertNormalizer"}]})"));
  });
  EXPECT_NE(msg.find("normalizer.normalizers[1]: type \"BertNormalizer\""), std::string::npos) << msg;
  msg = error_of<FormatError>([] { Tokenizer::from_json(tiny_json(R"(, "post_processor": {"type": "Foo"})")); });
  EXPECT_NE(msg.find("post_processor: type \"Foo\" is not supported"), std::string::npos) << msg;
  msg = error_of<FormatError>([] { Tokenizer::from_json(tiny_json(R"(, "decoder": {"type": "WordPiece"})")); });
  EXPECT_NE(msg.find("decoder: type \"WordPiece\" is not supported"), std::string::npos) << msg;
}

TEST(TokenizerErrors, MalformedFilesAreNamed) {
  auto msg = error_of<FormatError>([] { Tokenizer::from_json("{not json", "t.json"); });
  EXPECT_NE(msg.find("t.json: not valid JSON"), std::string::npos) << msg;
  msg = error_of<FormatError>([] {
    Tokenizer::from_json(R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["a z"]}})");
  });
  EXPECT_NE(msg.find("merges[0]: \"a\" + \"z\" uses a token that is not in the vocabulary"), std::string::npos) << msg;
  msg = error_of<FormatError>([] {
    Tokenizer::from_json(R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []},
                             "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "(unclosed"}, "behavior": "Isolated"}})");
  });
  EXPECT_NE(msg.find("pre_tokenizer.pattern.Regex: regex \"(unclosed\" does not compile"), std::string::npos) << msg;
  msg = error_of<FormatError>([] {
    Tokenizer::from_json(R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": [], "unk_token": "<unk>"}})");
  });
  EXPECT_NE(msg.find("unk_token: \"<unk>\" is not in the vocabulary"), std::string::npos) << msg;
  msg = error_of<FormatError>([] {
    Tokenizer::from_json(R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []},
                             "pre_tokenizer": {"type": "Split", "pattern": {"String": "x"}, "behavior": "Sideways"}})");
  });
  EXPECT_NE(msg.find("behavior \"Sideways\" is not one of"), std::string::npos) << msg;
}

TEST(TokenizerErrors, MissingFiles) {
  const auto empty = std::filesystem::temp_directory_path() / "moex_tokenizer_test_empty_dir";
  std::filesystem::create_directories(empty);
  auto msg = error_of<IoError>([&] { Tokenizer::from_dir(empty); });
  EXPECT_NE(msg.find("no tokenizer.json or tokenizer.model"), std::string::npos) << msg;
  msg = error_of<IoError>([&] { Tokenizer::from_dir(empty / "nope"); });
  EXPECT_NE(msg.find("not a directory"), std::string::npos) << msg;
  msg = error_of<IoError>([&] { Tokenizer::from_file(empty / "missing.json"); });
  EXPECT_NE(msg.find("cannot open file"), std::string::npos) << msg;
}

TEST(TokenizerErrors, BadInputText) {
  const Tokenizer tok = Tokenizer::from_json(tiny_json());
  auto msg = error_of<UsageError>([&] { tok.encode("ab\xff" "c"); });
  EXPECT_NE(msg.find("not valid UTF-8: byte 0xff at offset 2 (of 4 bytes)"), std::string::npos) << msg;
  EXPECT_THROW(tok.encode("\xe6\x97"), UsageError);          // truncated 3-byte character
  EXPECT_THROW(tok.encode("\xed\xa0\x80"), UsageError);      // UTF-16 surrogate
  EXPECT_THROW(tok.encode("\xc0\xaf"), UsageError);          // overlong encoding
  msg = error_of<UsageError>([&] { tok.decode(std::vector<int32_t>{0, 99}); });
  EXPECT_NE(msg.find("token id 99 is not in the vocabulary (valid ids: 0..6)"), std::string::npos) << msg;
  EXPECT_THROW(tok.decode(std::vector<int32_t>{-1}), UsageError);
}

TEST(TokenizerErrors, StreamingHoldsBrokenCharacters) {
  MOEX_REQUIRE_FAMILY(tok, "llama2");
  // "🦙" is four byte-fallback tokens in this vocabulary: nothing may come out before the fourth.
  const auto ids = tok->encode("a🦙", false);
  ASSERT_GE(ids.size(), 5u);
  StreamingDecoder stream(*tok);
  std::string out;
  for (size_t idx = 0; idx < ids.size(); ++idx) {
    const std::string piece = stream.step(ids[idx]);
    if (idx > 0 && idx + 1 < ids.size()) {
      EXPECT_EQ(piece, "") << "step " << idx;
    }
    out += piece;
  }
  out += stream.finish();
  EXPECT_EQ(out, "a🦙");
  // A stream cut inside a character ends with U+FFFD from finish(), never earlier.
  StreamingDecoder cut(*tok);
  std::string partial;
  for (size_t idx = 0; idx + 1 < ids.size(); ++idx) partial += cut.step(ids[idx]);
  EXPECT_EQ(partial, "a");
  EXPECT_EQ(cut.finish(), "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD");
}

}  // namespace
}  // namespace moex
