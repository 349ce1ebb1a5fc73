// tokenizer.model fallback (libsentencepiece) on a tiny BPE model serialized here in protobuf wire format,
// so the test needs no downloaded file: ids follow SentencePiece's BPE rule (highest-scoring merge first).
#include <filesystem>
#include <cstring>
#include <fstream>

#include "moex/core/error.h"
#include "moex/tokenizer/tokenizer.h"
#include "tokenizer_files.h"
#include "unit/safetensors_writer.h"

namespace moex {
namespace {

void varint(std::string& out, uint64_t v) {
  do {
    out.push_back(static_cast<char>((v & 0x7F) | (v > 0x7F ? 0x80 : 0)));
    v >>= 7;
  } while (v);
}
void field_varint(std::string& out, int field, uint64_t v) {
  varint(out, static_cast<uint64_t>(field) << 3);
  varint(out, v);
}
void field_bytes(std::string& out, int field, const std::string& bytes) {
  varint(out, (static_cast<uint64_t>(field) << 3) | 2);
  varint(out, bytes.size());
  out += bytes;
}
void field_float(std::string& out, int field, float f) {
  varint(out, (static_cast<uint64_t>(field) << 3) | 5);
  char raw[4];
  std::memcpy(raw, &f, 4);
  out.append(raw, 4);
}

// ModelProto: pieces (1), trainer_spec (2: model_type=BPE), normalizer_spec (3: no char map, dummy prefix).
std::string tiny_model() {
  struct Piece {
    const char* text;
    float score;
    int type;  // 1 normal, 2 unknown, 3 control
  };
  const Piece pieces[] = {{"<unk>", 0, 2}, {"<s>", 0, 3}, {"</s>", 0, 3}, {"\xE2\x96\x81", -10, 1},
                          {"a", -10, 1},   {"b", -10, 1}, {"c", -10, 1},  {"\xE2\x96\x81" "a", -1, 1},
                          {"ab", -2, 1},   {"\xE2\x96\x81" "ab", -3, 1}};
  std::string model;
  for (const Piece& p : pieces) {
    std::string msg;
    field_bytes(msg, 1, p.text);
    field_float(msg, 2, p.score);
    field_varint(msg, 3, static_cast<uint64_t>(p.type));
    field_bytes(model, 1, msg);
  }
  std::string trainer;
  field_varint(trainer, 3, 2);   // model_type: BPE
  field_varint(trainer, 4, 10);  // vocab_size
  field_bytes(model, 2, trainer);
  std::string normalizer;
  field_bytes(normalizer, 1, "identity");
  field_varint(normalizer, 3, 1);  // add_dummy_prefix
  field_varint(normalizer, 4, 0);  // remove_extra_whitespaces
  field_varint(normalizer, 5, 1);  // escape_whitespaces
  field_bytes(model, 3, normalizer);
  return model;
}

class SentencePieceFallback : public ::testing::Test {
 protected:
  void SetUp() override {
    // A directory of this process's own: ctest runs the fixture's tests as parallel processes, and a shared one
    // let one test read the config while another was rewriting it (an empty tokenizer_config.json).
    dir_ = test::temp_dir("tokenizer_spm");
    std::ofstream(dir_ / "tokenizer.model", std::ios::binary) << tiny_model();
    std::ofstream(dir_ / "tokenizer_config.json") << R"({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": true})";
    try {
      tok_ = std::make_unique<Tokenizer>(Tokenizer::from_dir(dir_));
    } catch (const FormatError& e) {
      if (std::string(e.what()).find("no SentencePiece support") != std::string::npos)
        GTEST_SKIP() << "built without libsentencepiece";
      throw;
    }
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::filesystem::path dir_;
  std::unique_ptr<Tokenizer> tok_;
};

TEST_F(SentencePieceFallback, EncodesWithHighestScoreMergesFirst) {
  // "▁ab▁ca": ▁a (-1) beats ab (-2), then ▁a+b = ▁ab; "ca" is no piece.
  EXPECT_EQ(tok_->encode("ab ca", false), (std::vector<int32_t>{9, 3, 6, 4}));
  EXPECT_EQ(tok_->encode("ab ca"), (std::vector<int32_t>{1, 9, 3, 6, 4}));
  EXPECT_EQ(tok_->decode(std::vector<int32_t>{1, 9, 3, 6, 4}, true), "ab ca");
}

TEST_F(SentencePieceFallback, ControlTokenTextAndMetadata) {
  EXPECT_EQ(tok_->encode("ab<s>ab"), (std::vector<int32_t>{1, 9, 1, 9}));
  EXPECT_EQ(tok_->bos_id(), 1);
  EXPECT_EQ(tok_->eos_id(), 2);
  EXPECT_EQ(tok_->vocab_size(), 10);
  EXPECT_EQ(tok_->token_to_id("ab"), 8);
  EXPECT_EQ(tok_->token_to_id("zz"), std::nullopt);
  EXPECT_TRUE(tok_->is_special(2));
  EXPECT_THROW(tok_->decode(std::vector<int32_t>{10}), UsageError);
  EXPECT_THROW(tok_->encode("\xff"), UsageError);
}

TEST(SentencePieceFallbackErrors, CorruptModelIsNamed) {
  const auto dir = test::temp_dir("tokenizer_spm_bad");
  std::ofstream(dir / "tokenizer.model", std::ios::binary) << "not a protobuf";
  try {
    Tokenizer::from_dir(dir);
    FAIL() << "expected FormatError";
  } catch (const FormatError& e) {
    EXPECT_NE(std::string(e.what()).find("tokenizer.model"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace moex
