// End to end on the GPU: every transformers reference fixture through the engine with --device cuda.
// Routing (top-k ids per token and MoE layer) and the greedy continuation must be identical; logits close.
// bf16 fixtures compare at the CPU's tolerance; F32/F16 fixtures are stored bf16 on the GPU (the kernels'
// one weight format), so their logits get a bf16-sized tolerance (seen on an H200: 0.039 olmoe_f16, 0.042
// qwen3_moe_f32, against 4e-6..7e-6 for the bf16 fixtures).
// MOEX_FIXTURES_DIR overrides the source tree's tests/fixtures (the GPU machine runs a copied tree).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>

#include "cuda_test_util.h"
#include "moex/backend/cuda/cuda_backend.h"
#include "moex/model/model.h"
#include "moex/runtime/engine.h"
#include "unit/model/fixture_util.h"
#include "unit/model/topk_recorder.h"

namespace moex {
namespace {

using cuda_test::fixtures_dir;

std::vector<std::string> names() {
  std::vector<std::string> out;
  if (!std::filesystem::exists(fixtures_dir())) return out;
  for (const auto& entry : std::filesystem::directory_iterator(fixtures_dir()))
    if (std::filesystem::exists(entry.path() / "reference.json")) out.push_back(entry.path().filename().string());
  std::sort(out.begin(), out.end());
  return out;
}

class CudaFixture : public ::testing::TestWithParam<std::string> {};

TEST_P(CudaFixture, MatchesTransformers) {
  if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const auto dir = fixtures_dir() / GetParam();
  const auto ref = test::read_json(dir / "reference.json");
  auto model = Model::load(dir.string());
  EngineOptions options;
  options.device = "cuda";
  Engine engine(*model, options);
  const auto prompt = ref["prompt_ids"].get<std::vector<int32_t>>();
  test::TopkRecorder recorder;
  std::vector<float> logits = engine.prompt_logits(prompt, &recorder);
  const int64_t vocab = model->config().vocab_size;
  double max_diff = 0;
  for (size_t row = 0; row < prompt.size(); ++row)
    for (int64_t col = 0; col < vocab; ++col) {
      double diff = std::fabs(logits[row * vocab + col] - ref["logits"][row][col].get<double>());
      if (!(diff <= max_diff)) max_diff = std::isnan(diff) ? INFINITY : diff;
    }
  const bool bf16_weights = model->config().weight_dtype == DType::kBF16;
  EXPECT_LT(max_diff, bf16_weights ? 1e-3 : 8e-2) << "max |logit diff| vs transformers";
  std::printf("[fixture %s] max |logit diff| %.3g\n", GetParam().c_str(), max_diff);

  const auto ref_topk = ref["topk_ids"].get<std::vector<std::vector<std::vector<int32_t>>>>();
  ASSERT_EQ(recorder.topk.size(), ref_topk.size());
  for (size_t layer = 0; layer < ref_topk.size(); ++layer)
    for (size_t token = 0; token < ref_topk[layer].size(); ++token)
      EXPECT_EQ(recorder.topk[layer][token], ref_topk[layer][token]) << "MoE layer " << layer << ", token " << token;

  GenerationOptions greedy;
  greedy.max_new_tokens = static_cast<int64_t>(ref["greedy_ids"].size());
  greedy.sampling.temperature = 0;
  greedy.stop_at_eos = false;
  EXPECT_EQ(engine.generate(prompt, greedy).output_ids, ref["greedy_ids"].get<std::vector<int32_t>>());
  // The greedy steps route on the device and replay a recorded step (CUDA graph); none may fall back.
  const CudaStepGraphStats graphs = cuda_step_graph_stats(engine.backend());
  EXPECT_EQ(graphs.failures, 0);
  EXPECT_GT(graphs.replays, 0);
}

INSTANTIATE_TEST_SUITE_P(Transformers, CudaFixture, ::testing::ValuesIn(names()),
                         [](const auto& info) { return info.param; });
GTEST_ALLOW_UNINSTANTIATED_PARAMETERIZED_TEST(CudaFixture);

}  // namespace
}  // namespace moex
