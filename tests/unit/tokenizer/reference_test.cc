// Encode and decode against ids and texts from the Hugging Face `tokenizers` library (fixtures generated
// by tools/tokenizer_reference.js), for every supported family and for pipeline variants built on their
// vocabularies (variants.json), compared exactly.
#include <fstream>
#include <thread>

#include <nlohmann/json.hpp>

#include "tokenizer_files.h"

namespace moex {
namespace {

nlohmann::json load_fixture(const std::string& family) {
  std::ifstream in(test::fixture_dir() / (family + ".json"));
  EXPECT_TRUE(in) << "missing fixture " << family << ".json";
  return nlohmann::json::parse(in);
}

std::string show(const std::vector<int32_t>& ids) {
  std::string s;
  for (size_t idx = 0; idx < ids.size(); ++idx) {
    if (idx) s += ',';
    s += std::to_string(ids[idx]);
  }
  return s;
}

class ReferenceTest : public ::testing::TestWithParam<std::string> {};

TEST_P(ReferenceTest, EncodeMatchesReference) {
  MOEX_REQUIRE_FAMILY(tok, GetParam());
  const auto fixture = load_fixture(GetParam());
  int mismatches = 0;
  for (const auto& c : fixture["cases"]) {
    const std::string text = c["text"];
    const auto want = c["ids"].get<std::vector<int32_t>>();
    const auto want_plain = c["ids_no_special"].get<std::vector<int32_t>>();
    const auto got = tok->encode(text, true);
    const auto got_plain = tok->encode(text, false);
    EXPECT_EQ(show(got), show(want)) << "text: \"" << text << "\" (add_special_tokens=true)";
    EXPECT_EQ(show(got_plain), show(want_plain)) << "text: \"" << text << "\" (add_special_tokens=false)";
    mismatches += (got != want) + (got_plain != want_plain);
  }
  EXPECT_EQ(mismatches, 0);
}

TEST_P(ReferenceTest, DecodeMatchesReference) {
  MOEX_REQUIRE_FAMILY(tok, GetParam());
  const auto fixture = load_fixture(GetParam());
  for (const auto& c : fixture["cases"]) {
    const auto ids = c["ids"].get<std::vector<int32_t>>();
    EXPECT_EQ(tok->decode(ids, false), c["decoded"].get<std::string>()) << "ids: " << show(ids);
    EXPECT_EQ(tok->decode(ids, true), c["decoded_skip_special"].get<std::string>()) << "ids: " << show(ids);
  }
  for (const auto& d : fixture["decodes"]) {
    const auto ids = d["ids"].get<std::vector<int32_t>>();
    EXPECT_EQ(tok->decode(ids, false), d["text"].get<std::string>()) << "ids: " << show(ids);
    EXPECT_EQ(tok->decode(ids, true), d["text_skip_special"].get<std::string>()) << "ids: " << show(ids);
  }
}

TEST_P(ReferenceTest, VocabSizeMatchesReference) {
  MOEX_REQUIRE_FAMILY(tok, GetParam());
  EXPECT_EQ(tok->vocab_size(), load_fixture(GetParam())["vocab_size"].get<int32_t>());
}

TEST_P(ReferenceTest, StreamingDecodeConcatenatesToDecode) {
  MOEX_REQUIRE_FAMILY(tok, GetParam());
  const auto fixture = load_fixture(GetParam());
  for (const auto& c : fixture["cases"]) {
    const auto ids = c["ids"].get<std::vector<int32_t>>();
    StreamingDecoder stream(*tok);
    std::string text;
    for (int32_t id : ids) {
      const std::string piece = stream.step(id);
      EXPECT_EQ(piece.find("\xEF\xBF\xBD"), std::string::npos) << "broken character mid-stream in: " << show(ids);
      text += piece;
    }
    text += stream.finish();
    EXPECT_EQ(text, tok->decode(ids)) << "ids: " << show(ids);
  }
}

// encode is const and shared across threads (word cache under a lock): concurrent runs must agree with a
// sequential one, byte for byte, every time.
TEST_P(ReferenceTest, ConcurrentEncodeIsDeterministic) {
  MOEX_REQUIRE_FAMILY(tok, GetParam());
  const auto fixture = load_fixture(GetParam());
  std::vector<std::string> texts;
  for (const auto& c : fixture["cases"]) texts.push_back(c["text"]);
  std::vector<std::vector<int32_t>> want;
  for (const auto& t : texts) want.push_back(tok->encode(t));
  for (int round = 0; round < 5; ++round) {
    std::vector<std::vector<std::vector<int32_t>>> got(2);
    std::vector<std::thread> threads;
    for (int t = 0; t < 2; ++t)
      threads.emplace_back([&, t] {
        for (size_t k = 0; k < texts.size(); ++k) got[t].push_back(tok->encode(texts[(k + t * 7) % texts.size()]));
      });
    for (auto& th : threads) th.join();
    for (int t = 0; t < 2; ++t)
      for (size_t k = 0; k < texts.size(); ++k) ASSERT_EQ(got[t][k], want[(k + t * 7) % texts.size()]) << "round " << round;
  }
}

INSTANTIATE_TEST_SUITE_P(Families, ReferenceTest,
                         ::testing::Values("llama2", "qwen3", "deepseek_v3", "gptoss", "olmoe",
                                           "variant_llama_metaspace", "variant_llama_metaspace_split",
                                           "variant_qwen_pipeline_mix", "variant_qwen_whitespace_split"),
                         [](const auto& info) { return info.param; });

}  // namespace
}  // namespace moex
