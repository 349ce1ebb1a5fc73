// Model loading: the registry covers every family with a fixture, and bad checkpoints give one clear
// error naming the file and the field or tensor.
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>

#include <gtest/gtest.h>

#include "moex/core/error.h"
#include "moex/io/hf_config.h"
#include "moex/model/model.h"
#include "moex/model/registry.h"
#include "unit/model/fixture_util.h"
#include "unit/error_matchers.h"
#include "unit/safetensors_writer.h"

namespace moex {
namespace {
namespace fs = std::filesystem;

std::string first_fixture_of(const std::string& architecture) {
  for (const auto& name : test::fixture_names()) {
    auto cfg = test::read_json(test::fixtures_root() / name / "config.json");
    if (cfg["architectures"][0] == architecture) return name;
  }
  return "";
}

TEST(Registry, EveryFamilyHasAFixtureThatLoads) {
  for (const ArchEntry& entry : arch_registry()) {
    std::string fixture = first_fixture_of(entry.hf_architecture);
    ASSERT_FALSE(fixture.empty()) << entry.hf_architecture << " has no fixture under tests/fixtures";
    auto model = Model::load((test::fixtures_root() / fixture).string());
    EXPECT_EQ(model->config().architecture, entry.hf_architecture);
    EXPECT_GT(model->config().num_moe_layers(), 0);
  }
}

// A writable copy of a fixture whose config.json is edited by `edit`.
fs::path edited_copy(const std::string& fixture, const std::string& tag,
                     const std::function<void(nlohmann::json&)>& edit) {
  fs::path dir = test::temp_dir(tag);
  fs::copy(test::fixtures_root() / fixture, dir, fs::copy_options::recursive | fs::copy_options::overwrite_existing);
  auto cfg = test::read_json(dir / "config.json");
  edit(cfg);
  std::ofstream(dir / "config.json") << cfg.dump(2);
  return dir;
}

using test::error_of;

TEST(ModelLoad, UnknownArchitecture) {
  auto dir = edited_copy(first_fixture_of("MixtralForCausalLM"), "arch",
                         [](auto& cfg) { cfg["architectures"] = {"GPT2LMHeadModel"}; });
  std::string msg = error_of([&] { Model::load(dir.string()); });
  EXPECT_NE(msg.find("unknown architecture \"GPT2LMHeadModel\"; moex supports MixtralForCausalLM"), std::string::npos)
      << msg;
}

TEST(ModelLoad, ShapeDisagreesWithConfig) {
  auto dir = edited_copy(first_fixture_of("MixtralForCausalLM"), "shape",
                         [](auto& cfg) { cfg["vocab_size"] = cfg["vocab_size"].template get<int>() + 1; });
  std::string msg = error_of([&] { Model::load(dir.string()); });
  EXPECT_NE(msg.find("tensor \"model.embed_tokens.weight\" has shape"), std::string::npos) << msg;
  EXPECT_NE(msg.find("expected ["), std::string::npos) << msg;
}

TEST(ModelLoad, DtypeDisagreesWithConfig) {
  auto dir = edited_copy(first_fixture_of("MixtralForCausalLM"), "dtype", [](auto& cfg) {
    cfg.erase("dtype");
    cfg["torch_dtype"] = "float16";
  });
  std::string msg = error_of([&] { Model::load(dir.string()); });
  EXPECT_NE(msg.find("but config.json says F16"), std::string::npos) << msg;
}

TEST(ModelLoad, MissingFieldAndBadValues) {
  auto fixture = first_fixture_of("Qwen3MoeForCausalLM");
  auto dir = edited_copy(fixture, "field", [](auto& cfg) { cfg.erase("num_experts"); cfg.erase("num_local_experts"); });
  EXPECT_NE(error_of([&] { Model::load(dir.string()); }).find("required field \"num_local_experts\" is missing"),
            std::string::npos);
  dir = edited_copy(fixture, "topk", [](auto& cfg) { cfg["num_experts_per_tok"] = 1000; });
  EXPECT_NE(error_of([&] { Model::load(dir.string()); }).find("num_experts_per_tok (1000) exceeds"), std::string::npos);
  dir = edited_copy(fixture, "act", [](auto& cfg) { cfg["hidden_act"] = "gelu"; });
  EXPECT_NE(error_of([&] { Model::load(dir.string()); }).find("hidden_act \"gelu\" is not supported (silu)"),
            std::string::npos);
  dir = edited_copy(fixture, "heads", [](auto& cfg) { cfg["num_key_value_heads"] = 3; });
  EXPECT_NE(error_of([&] { Model::load(dir.string()); }).find("is not a multiple of num_key_value_heads (3)"),
            std::string::npos);
}

TEST(ModelLoad, MissingTensorFileAndConfig) {
  auto dir = edited_copy(first_fixture_of("OlmoeForCausalLM"), "nofile", [](auto&) {});
  for (const auto& entry : fs::directory_iterator(dir))
    if (entry.path().extension() == ".safetensors") fs::remove(entry.path());
  fs::remove(dir / "model.safetensors.index.json");
  EXPECT_NE(error_of([&] { Model::load(dir.string()); }).find("no *.safetensors file"), std::string::npos);
  fs::remove(dir / "config.json");
  EXPECT_NE(error_of([&] { Model::load(dir.string()); }).find("config.json: cannot open"), std::string::npos);
  EXPECT_NE(error_of([] { Model::load("/nonexistent/model"); }).find("model directory does not exist"),
            std::string::npos);
}

TEST(ModelLoad, RopeThetaFromEitherPlace) {
  HfConfig top = HfConfig::parse(R"({"vocab_size": 8, "hidden_size": 8, "num_hidden_layers": 1,
      "num_attention_heads": 2, "rope_theta": 1234.0})", "a.json");
  HfConfig nested = HfConfig::parse(R"({"vocab_size": 8, "hidden_size": 8, "num_hidden_layers": 1,
      "num_attention_heads": 2, "rope_parameters": {"rope_type": "default", "rope_theta": 4321.0}})", "b.json");
  HfConfig scaled = HfConfig::parse(R"({"vocab_size": 8, "hidden_size": 8, "num_hidden_layers": 1,
      "num_attention_heads": 2, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})", "c.json");
  ModelConfig cfg;
  parse_common_config(top, &cfg);
  EXPECT_DOUBLE_EQ(cfg.rope_theta, 1234.0);
  parse_common_config(nested, &cfg);
  EXPECT_DOUBLE_EQ(cfg.rope_theta, 4321.0);
  EXPECT_NE(error_of([&] { parse_common_config(scaled, &cfg); }).find("rope_type \"yarn\" is not supported"),
            std::string::npos);
}

TEST(ModelLoad, RandomWeightsAtConfigShapes) {
  auto model = Model::load((test::fixtures_root() / first_fixture_of("Qwen2MoeForCausalLM")).string(),
                           LoadOptions{LoadFormat::kRandom, 7});
  const auto& cfg = model->config();
  ASSERT_EQ(model->weights().layers.size(), static_cast<size_t>(cfg.num_layers));
  for (const auto& layer : model->weights().layers) {
    if (!layer.is_moe) continue;
    EXPECT_EQ(layer.experts.size(), static_cast<size_t>(cfg.num_experts));
    EXPECT_EQ(layer.experts[0].down.shape, (Shape{cfg.hidden_size, cfg.expert_ffn_size}));
  }
}

// The filler writes every element itself (its tensors are not zeroed first), the same values for the same seed,
// uniform in [-sqrt(3) std, sqrt(3) std] around the mean.
TEST(ModelLoad, RandomWeightsAreSeededAndInRange) {
  const std::string dir = (test::fixtures_root() / first_fixture_of("Qwen2MoeForCausalLM")).string();
  auto a = Model::load(dir, LoadOptions{LoadFormat::kRandom, 7});
  auto b = Model::load(dir, LoadOptions{LoadFormat::kRandom, 7});
  auto c = Model::load(dir, LoadOptions{LoadFormat::kRandom, 8});
  const auto& cfg = a->config();
  const TensorView& down = a->weights().layers[0].experts[0].down;
  const size_t bytes = static_cast<size_t>(down.numel()) * dtype_size(down.dtype);
  EXPECT_EQ(std::memcmp(down.data, b->weights().layers[0].experts[0].down.data, bytes), 0);
  EXPECT_NE(std::memcmp(down.data, c->weights().layers[0].experts[0].down.data, bytes), 0);
  const float bound = 1.7320508f / std::sqrt(static_cast<float>(cfg.expert_ffn_size)) * 1.01f;
  int64_t zeros = 0;
  for (int64_t idx = 0; idx < down.numel(); ++idx) {
    const float value = down.dtype == DType::kBF16 ? bf16_to_f32(down.as<uint16_t>()[idx])
                        : down.dtype == DType::kF16  ? f16_to_f32(down.as<uint16_t>()[idx])
                                                     : down.as<float>()[idx];
    ASSERT_LE(std::fabs(value), bound) << idx;
    zeros += value == 0.0f;
  }
  EXPECT_LT(zeros, down.numel() / 100);  // a chunk left unwritten would be garbage or zeros
  const TensorView& norm = a->weights().final_norm;
  for (int64_t idx = 0; idx < norm.numel(); ++idx) EXPECT_NEAR(norm.as<float>()[idx], 1.0f, 0.18f) << idx;
}

// --pack-experts: random experts generated straight into the packing hold the values the unpacked load draws (the
// same seed), with null data in their views; a checkpoint's experts are packed beside their mmap views; experts
// that are not bf16 are refused.
TEST(ModelLoad, PackedExpertsHoldTheUnpackedValues) {
  for (LoadFormat format : {LoadFormat::kRandom, LoadFormat::kSafetensors}) {
    SCOPED_TRACE(format == LoadFormat::kRandom ? "random" : "checkpoint");
    const std::string dir = (test::fixtures_root() / "qwen2_moe").string();
    LoadOptions options{format, 7};
    auto plain = Model::load(dir, options);
    options.pack_experts = true;
    auto packed = Model::load(dir, options);
    EXPECT_FALSE(plain->packed_experts());
    EXPECT_TRUE(packed->packed_experts());
    int64_t experts = 0;
    for (size_t layer_idx = 0; layer_idx < plain->weights().layers.size(); ++layer_idx) {
      const LayerWeights& want_layer = plain->weights().layers[layer_idx];
      const LayerWeights& got_layer = packed->weights().layers[layer_idx];
      EXPECT_EQ(got_layer.shared_expert.packed, nullptr);  // only the routed experts are offloaded
      for (size_t e = 0; e < want_layer.experts.size(); ++e) {
        const ExpertWeights& want = want_layer.experts[e];
        const ExpertWeights& got = got_layer.experts[e];
        ASSERT_NE(got.packed, nullptr);
        EXPECT_TRUE(got.valid());
        EXPECT_EQ(got.gate.data == nullptr, format == LoadFormat::kRandom);
        for (auto [view, matrix] : {std::pair{&want.gate, &got.packed->gate}, std::pair{&want.up, &got.packed->up},
                                    std::pair{&want.down, &got.packed->down}}) {
          ASSERT_EQ(packed_bf16_error(*matrix), "");
          std::vector<uint16_t> values(static_cast<size_t>(view->numel()));
          unpack_bf16_rows(*matrix, 0, matrix->rows, values.data());
          ASSERT_EQ(std::memcmp(values.data(), view->data, view->nbytes()), 0)
              << "layer " << layer_idx << " expert " << e;
        }
        ++experts;
      }
    }
    EXPECT_EQ(experts, plain->config().num_moe_layers() * plain->config().num_experts);
  }
  LoadOptions f32{LoadFormat::kSafetensors, 0};
  f32.pack_experts = true;
  EXPECT_THROW(Model::load((test::fixtures_root() / "qwen3_moe_f32").string(), f32), UsageError);
}

}  // namespace
}  // namespace moex
