// Batched decode on the GPU: several sequences with different prompt lengths decoded together
// (Decoder::forward_batch through Engine::generate_batch, pages of 3 positions) must give each sequence's
// greedy tokens of generate() alone, and their logits step by step. The last sequence left in the batch runs
// as a single-row step, which takes the recorded (CUDA graph) path.
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>

#include "cuda_test_util.h"
#include "moex/model/model.h"
#include "moex/runtime/engine.h"
#include "moex/runtime/sampler.h"
#include "unit/model/fixture_util.h"

namespace moex::cuda_test {
namespace {

TEST(CudaBatchedDecode, MatchesEachSequenceAlone) {
  MOEX_CUDA_FIXTURES_OR_SKIP(fixtures, "mixtral", "qwen3_moe", "olmoe");
  for (const LoadedFixture& fixture : fixtures) {
    SCOPED_TRACE(fixture.name);
    const Model* model = fixture.model.get();
    const auto& ref = fixture.prompt;
    std::vector<std::vector<int32_t>> prompts;
    for (size_t len : {ref.size(), size_t{1}, size_t{4}, size_t{2}, size_t{5}})
      prompts.emplace_back(ref.begin(), ref.begin() + static_cast<int64_t>(std::min(len, ref.size())));
    EngineOptions options;
    options.device = "cuda";
    options.kv_page_size = 3;
    Engine engine(*model, options);
    GenerationOptions greedy;
    greedy.max_new_tokens = 40;
    greedy.sampling.temperature = 0;
    greedy.stop_at_eos = false;
    const auto batched = engine.generate_batch(prompts, greedy);
    for (size_t idx = 0; idx < prompts.size(); ++idx)
      EXPECT_EQ(batched[idx].output_ids, engine.generate(prompts[idx], greedy).output_ids) << "prompt " << idx;

    // Logits of forward_batch rows against single-sequence steps, with sequences of unequal lengths.
    Decoder& decoder = engine.decoder();
    const int64_t vocab = model->config().vocab_size;
    std::vector<int32_t> seqs;
    std::vector<float> logits, alone;
    for (const auto& prompt : prompts) {
      seqs.push_back(decoder.add_sequence());
      decoder.forward_sequence(seqs.back(), prompt, 0, false, &logits);
    }
    std::vector<Decoder::DecodeStep> steps;
    for (size_t idx = 0; idx < prompts.size(); ++idx)
      steps.push_back({seqs[idx], batched[idx].output_ids[0], static_cast<int64_t>(prompts[idx].size())});
    decoder.forward_batch(steps, &logits);
    for (size_t idx = 0; idx < prompts.size(); ++idx) {
      decoder.forward_sequence(seqs[idx], std::span<const int32_t>(&steps[idx].token, 1), steps[idx].position, false,
                               &alone);
      std::vector<double> want(alone.begin(), alone.end());
      std::vector<float> got(logits.begin() + static_cast<int64_t>(idx) * vocab,
                             logits.begin() + static_cast<int64_t>(idx + 1) * vocab);
      MOEX_EXPECT_CLOSE(got, want, 1e-4) << "prompt " << idx;
      decoder.free_sequence(seqs[idx]);
    }
  }
}

}  // namespace
}  // namespace moex::cuda_test
