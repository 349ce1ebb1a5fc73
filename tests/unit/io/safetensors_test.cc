#include "moex/io/safetensors.h"

#include <gtest/gtest.h>

#include "moex/core/error.h"
#include "moex/io/checkpoint.h"
#include "unit/error_matchers.h"
#include "unit/safetensors_writer.h"

namespace moex {
namespace {

using test::f32_tensor;
using test::safetensors_bytes;
using test::write_file;

using test::error_of;

TEST(Safetensors, ReadsTensorsZeroCopy) {
  auto dir = test::temp_dir("st_ok");
  write_file(dir / "a.safetensors", safetensors_bytes({{"w", f32_tensor({2, 3}, 1.0f)}, {"b", f32_tensor({3}, 7.0f)}}));
  SafetensorsFile file((dir / "a.safetensors").string());
  TensorView w = file.tensor("w");
  EXPECT_EQ(w.shape, (Shape{2, 3}));
  EXPECT_EQ(w.dtype, DType::kF32);
  EXPECT_FLOAT_EQ(w.as<float>()[5], 6.0f);
  EXPECT_FLOAT_EQ(file.tensor("b").as<float>()[0], 7.0f);
  EXPECT_NE(error_of([&] { file.tensor("nope"); }).find("no tensor named \"nope\""), std::string::npos);
}

TEST(Safetensors, MissingFileNamesPath) {
  std::string msg = error_of([] { SafetensorsFile("/nonexistent/x.safetensors"); });
  EXPECT_NE(msg.find("/nonexistent/x.safetensors: cannot open"), std::string::npos) << msg;
}

TEST(Safetensors, TruncatedHeaderLength) {
  auto dir = test::temp_dir("st_trunc_len");
  write_file(dir / "t.safetensors", std::string("\x10\x00\x00", 3));
  std::string msg = error_of([&] { SafetensorsFile((dir / "t.safetensors").string()); });
  EXPECT_NE(msg.find("truncated safetensors file"), std::string::npos) << msg;
}

TEST(Safetensors, HeaderLongerThanFile) {
  auto dir = test::temp_dir("st_hdr");
  std::string bytes = safetensors_bytes({{"w", f32_tensor({4}, 0)}});
  write_file(dir / "t.safetensors", bytes.substr(0, 20));
  std::string msg = error_of([&] { SafetensorsFile((dir / "t.safetensors").string()); });
  EXPECT_NE(msg.find("corrupt or truncated safetensors header"), std::string::npos) << msg;
}

TEST(Safetensors, TruncatedData) {
  auto dir = test::temp_dir("st_data");
  std::string bytes = safetensors_bytes({{"w", f32_tensor({64}, 0)}});
  write_file(dir / "t.safetensors", bytes.substr(0, bytes.size() - 16));
  std::string msg = error_of([&] { SafetensorsFile((dir / "t.safetensors").string()); });
  EXPECT_NE(msg.find("truncated: tensor \"w\""), std::string::npos) << msg;
}

TEST(Safetensors, CorruptJson) {
  auto dir = test::temp_dir("st_json");
  std::string bytes = safetensors_bytes({{"w", f32_tensor({4}, 0)}});
  bytes[8] = '#';  // the header's opening brace
  write_file(dir / "t.safetensors", bytes);
  std::string msg = error_of([&] { SafetensorsFile((dir / "t.safetensors").string()); });
  EXPECT_NE(msg.find("not valid JSON"), std::string::npos) << msg;
}

TEST(Safetensors, OffsetsDisagreeWithShape) {
  auto dir = test::temp_dir("st_off");
  auto tensor = f32_tensor({4}, 0);
  tensor.shape = {5};
  write_file(dir / "t.safetensors", safetensors_bytes({{"w", tensor}}));
  std::string msg = error_of([&] { SafetensorsFile((dir / "t.safetensors").string()); });
  EXPECT_NE(msg.find("hold 16 bytes but shape [5] of F32 needs 20"), std::string::npos) << msg;
}

TEST(Safetensors, UnsupportedDtype) {
  auto dir = test::temp_dir("st_dtype");
  auto tensor = f32_tensor({4}, 0);
  tensor.dtype = "F8_E4M3";
  tensor.bytes.resize(4);
  write_file(dir / "t.safetensors", safetensors_bytes({{"w", tensor}}));
  std::string msg = error_of([&] { SafetensorsFile((dir / "t.safetensors").string()); });
  EXPECT_NE(msg.find("unsupported dtype \"F8_E4M3\""), std::string::npos) << msg;
}

TEST(Checkpoint, ShardedIndex) {
  auto dir = test::temp_dir("ckpt_shards");
  write_file(dir / "s1.safetensors", safetensors_bytes({{"a", f32_tensor({2}, 1)}}));
  write_file(dir / "s2.safetensors", safetensors_bytes({{"b", f32_tensor({3}, 5)}}));
  write_file(dir / "model.safetensors.index.json",
             R"({"metadata": {}, "weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}})");
  auto ckpt = Checkpoint::open(dir.string());
  EXPECT_FLOAT_EQ(ckpt->tensor("b").as<float>()[2], 7.0f);
  EXPECT_EQ(ckpt->names().size(), 2u);
}

TEST(Checkpoint, IndexNamesMissingShard) {
  auto dir = test::temp_dir("ckpt_missing_shard");
  write_file(dir / "s1.safetensors", safetensors_bytes({{"a", f32_tensor({2}, 1)}}));
  write_file(dir / "model.safetensors.index.json",
             R"({"weight_map": {"a": "s1.safetensors", "b": "model-00002-of-00002.safetensors"}})");
  std::string msg = error_of([&] { Checkpoint::open(dir.string()); });
  EXPECT_NE(msg.find("tensor \"b\" listed in shard \"model-00002-of-00002.safetensors\", which does not exist"),
            std::string::npos)
      << msg;
}

TEST(Checkpoint, MissingDirectoryAndEmptyDirectory) {
  EXPECT_NE(error_of([] { Checkpoint::open("/nonexistent/model"); }).find("does not exist"), std::string::npos);
  auto dir = test::temp_dir("ckpt_empty");
  EXPECT_NE(error_of([&] { Checkpoint::open(dir.string()); }).find("no *.safetensors file"), std::string::npos);
}

}  // namespace
}  // namespace moex
