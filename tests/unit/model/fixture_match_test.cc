// Every transformers reference fixture, run through moex on the CPU backend: logits within 1e-3,
// identical top-k experts per token and MoE layer, identical 16-token greedy continuation.
#include <cmath>

#include <gtest/gtest.h>

#include "moex/model/model.h"
#include "moex/runtime/engine.h"
#include "unit/model/fixture_util.h"
#include "unit/model/topk_recorder.h"

namespace moex {
namespace {

class FixtureMatch : public ::testing::TestWithParam<std::string> {};

TEST_P(FixtureMatch, LogitsRoutingAndGreedyMatchTransformers) {
  const auto dir = GetParam() == "default_model" ? test::default_model_dir() : test::fixtures_root() / GetParam();
  const auto ref = test::read_json(dir / "reference.json");
  auto model = Model::load(dir.string());
  EngineOptions options;
  options.num_threads = 2;
  Engine engine(*model, options);
  const auto prompt = ref["prompt_ids"].get<std::vector<int32_t>>();

  test::TopkRecorder recorder;
  std::vector<float> logits = engine.prompt_logits(prompt, &recorder);
  const int64_t vocab = model->config().vocab_size;
  const auto& ref_logits = ref["logits"];
  ASSERT_EQ(ref_logits.size(), prompt.size());
  double max_diff = 0;
  size_t worst_row = 0, worst_col = 0;
  for (size_t row = 0; row < prompt.size(); ++row) {
    for (int64_t col = 0; col < vocab; ++col) {
      double diff = std::fabs(logits[row * vocab + col] - ref_logits[row][col].get<double>());
      if (!(diff <= max_diff)) {  // also catches NaN
        max_diff = std::isnan(diff) ? INFINITY : diff;
        worst_row = row;
        worst_col = static_cast<size_t>(col);
      }
    }
  }
  EXPECT_LT(max_diff, 1e-3) << "logits differ most at position " << worst_row << ", token " << worst_col
                            << ": moex " << logits[worst_row * vocab + worst_col] << " vs transformers "
                            << ref_logits[worst_row][worst_col];

  const auto ref_topk = ref["topk_ids"].get<std::vector<std::vector<std::vector<int32_t>>>>();
  ASSERT_EQ(recorder.topk.size(), ref_topk.size()) << "number of MoE layers";
  for (size_t layer = 0; layer < ref_topk.size(); ++layer)
    for (size_t token = 0; token < ref_topk[layer].size(); ++token)
      EXPECT_EQ(recorder.topk[layer][token], ref_topk[layer][token]) << "MoE layer " << layer << ", token " << token;

  GenerationOptions greedy;
  greedy.max_new_tokens = static_cast<int64_t>(ref["greedy_ids"].size());
  greedy.sampling.temperature = 0;
  greedy.stop_at_eos = false;
  GenerationResult result = engine.generate(prompt, greedy);
  EXPECT_EQ(result.output_ids, ref["greedy_ids"].get<std::vector<int32_t>>());
}

std::vector<std::string> cases() {
  std::vector<std::string> names = test::fixture_names();
  if (std::filesystem::exists(test::default_model_dir() / "reference.json")) names.push_back("default_model");
  return names;
}

INSTANTIATE_TEST_SUITE_P(Transformers, FixtureMatch, ::testing::ValuesIn(cases()),
                         [](const auto& info) { return info.param; });
GTEST_ALLOW_UNINSTANTIATED_PARAMETERIZED_TEST(FixtureMatch);

}  // namespace
}  // namespace moex
