// Batched decode on the transformers fixtures (CPU backend): several sequences with different prompt lengths,
// prefilled one at a time into a paged KV cache with pages of 3 positions, then decoded together with
// Decoder::forward_batch, must give the logits (within 1e-5) and greedy tokens of each sequence run alone;
// sequences drop out at different steps, and a sequence started in a finished one's pages is unaffected.
#include <cmath>

#include <gtest/gtest.h>

#include "moex/core/error.h"
#include "moex/model/model.h"
#include "moex/runtime/engine.h"
#include "moex/runtime/sampler.h"
#include "unit/model/fixture_util.h"

namespace moex {
namespace {

struct Trajectory {
  std::vector<std::vector<float>> logits;  // after the prompt, then after each decoded token
  std::vector<int32_t> tokens;             // greedy picks
};

// One sequence alone through the single-sequence API (default page size, one sequence in the cache).
Trajectory run_alone(const Model& model, const std::vector<int32_t>& prompt, int64_t steps) {
  EngineOptions options;
  options.num_threads = 2;
  Engine engine(model, options);
  Trajectory t;
  std::vector<float> logits;
  engine.decoder().forward(prompt, 0, false, &logits);
  t.logits.push_back(logits);
  int64_t position = static_cast<int64_t>(prompt.size());
  for (int64_t step = 0; step < steps; ++step) {
    t.tokens.push_back(argmax(logits));
    engine.decoder().forward(std::span<const int32_t>(&t.tokens.back(), 1), position++, false, &logits);
    t.logits.push_back(logits);
  }
  return t;
}

void expect_logits_close(const std::vector<float>& got, const std::vector<float>& want, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  double max_diff = 0;
  size_t worst = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double diff = std::fabs(static_cast<double>(got[i]) - want[i]);
    if (!(diff <= max_diff)) {
      max_diff = std::isnan(diff) ? INFINITY : diff;
      worst = i;
    }
  }
  EXPECT_LE(max_diff, 1e-5) << what << ": token " << worst << " batched " << got[worst] << " alone " << want[worst];
}

std::vector<std::vector<int32_t>> prompts_of(const std::vector<int32_t>& ref_prompt) {
  // Different lengths, crossing 3-position pages at different offsets.
  std::vector<std::vector<int32_t>> prompts;
  for (size_t len : {ref_prompt.size(), size_t{1}, size_t{4}, size_t{2}})
    prompts.emplace_back(ref_prompt.begin(), ref_prompt.begin() + static_cast<int64_t>(std::min(len, ref_prompt.size())));
  prompts[3] = {ref_prompt.rbegin(), ref_prompt.rbegin() + 2};
  return prompts;
}

class BatchedDecode : public ::testing::TestWithParam<std::string> {};

TEST_P(BatchedDecode, MatchesEachSequenceAlone) {
  const auto dir = test::fixtures_root() / GetParam();
  auto model = Model::load(dir.string());
  const auto ref_prompt = test::reference_prompt(dir);
  const auto prompts = prompts_of(ref_prompt);
  // Sequence i decodes steps[i] tokens: they drop out of the batch one by one.
  const std::vector<int64_t> steps{9, 4, 7, 1};
  std::vector<Trajectory> alone;
  for (size_t idx = 0; idx < prompts.size(); ++idx) alone.push_back(run_alone(*model, prompts[idx], steps[idx]));

  EngineOptions options;
  options.num_threads = 2;
  options.kv_page_size = 3;
  Engine engine(*model, options);
  Decoder& decoder = engine.decoder();
  const int64_t vocab = model->config().vocab_size;
  std::vector<int32_t> seqs;
  std::vector<int32_t> next(prompts.size());
  std::vector<float> logits;
  for (size_t idx = 0; idx < prompts.size(); ++idx) {
    seqs.push_back(decoder.add_sequence());
    decoder.forward_sequence(seqs.back(), prompts[idx], 0, false, &logits);
    expect_logits_close(logits, alone[idx].logits[0], fmt::format("sequence {} prefill", idx));
    next[idx] = argmax(logits);
  }
  int64_t reused_checked = 0;
  for (int64_t step = 0;; ++step) {
    std::vector<Decoder::DecodeStep> batch;
    std::vector<size_t> owner;
    for (size_t idx = 0; idx < prompts.size(); ++idx) {
      if (step >= steps[idx]) continue;
      ASSERT_EQ(next[idx], alone[idx].tokens[step]) << "sequence " << idx << " greedy token " << step;
      batch.push_back({seqs[idx], next[idx], static_cast<int64_t>(prompts[idx].size()) + step});
      owner.push_back(idx);
    }
    if (batch.empty()) break;
    decoder.forward_batch(batch, &logits);
    ASSERT_EQ(logits.size(), batch.size() * vocab);
    for (size_t row = 0; row < batch.size(); ++row) {
      const size_t idx = owner[row];
      std::vector<float> mine(logits.begin() + row * vocab, logits.begin() + (row + 1) * vocab);
      expect_logits_close(mine, alone[idx].logits[step + 1], fmt::format("sequence {} step {}", idx, step));
      next[idx] = argmax(mine);
    }
    // Sequence 3 finished after its first step: free it; a new sequence takes its pages while the others run.
    if (step == 1) {
      const auto old_table = decoder.kv_cache().block_table(seqs[3]);
      const std::vector<int32_t> old_pages(old_table.begin(), old_table.end());
      decoder.free_sequence(seqs[3]);
      const int32_t fresh = decoder.add_sequence();
      decoder.forward_sequence(fresh, prompts[1], 0, false, &logits);
      const auto table = decoder.kv_cache().block_table(fresh);
      EXPECT_EQ(std::vector<int32_t>(table.begin(), table.end()),
                std::vector<int32_t>(old_pages.begin(), old_pages.begin() + static_cast<int64_t>(table.size())))
          << "the new sequence reuses the freed pages";
      expect_logits_close(logits, alone[1].logits[0], "a sequence in reused pages");
      decoder.free_sequence(fresh);
      ++reused_checked;
    }
  }
  EXPECT_EQ(reused_checked, 1);
}

// Engine::generate_batch gives each prompt generate()'s greedy tokens.
TEST_P(BatchedDecode, GenerateBatchMatchesGenerate) {
  const auto dir = test::fixtures_root() / GetParam();
  auto model = Model::load(dir.string());
  const auto prompts = prompts_of(test::reference_prompt(dir));
  GenerationOptions greedy;
  greedy.max_new_tokens = 6;
  greedy.sampling.temperature = 0;
  greedy.stop_at_eos = false;
  EngineOptions options;
  options.num_threads = 2;
  options.kv_page_size = 3;
  Engine engine(*model, options);
  const auto batched = engine.generate_batch(prompts, greedy);
  ASSERT_EQ(batched.size(), prompts.size());
  for (size_t idx = 0; idx < prompts.size(); ++idx) {
    const GenerationResult alone = engine.generate(prompts[idx], greedy);
    EXPECT_EQ(batched[idx].output_ids, alone.output_ids) << "prompt " << idx;
    EXPECT_EQ(batched[idx].decode_steps, alone.decode_steps) << "prompt " << idx;
    EXPECT_EQ(batched[idx].stop_reason, "length");
  }
  EXPECT_EQ(engine.decoder().kv_cache().num_sequences(), 1) << "generate_batch frees its sequences";
}

INSTANTIATE_TEST_SUITE_P(Transformers, BatchedDecode, ::testing::ValuesIn(test::fixture_names()),
                         [](const auto& info) { return info.param; });
GTEST_ALLOW_UNINSTANTIATED_PARAMETERIZED_TEST(BatchedDecode);

TEST(BatchedDecodeErrors, BadStepsAreUsageErrors) {
  const auto dir = test::fixtures_root() / "mixtral";
  auto model = Model::load(dir.string());
  EngineOptions options;
  options.num_threads = 1;
  Engine engine(*model, options);
  Decoder& decoder = engine.decoder();
  const int32_t seq = decoder.add_sequence();
  std::vector<float> logits;
  const std::vector<int32_t> prompt{1, 2, 3};
  decoder.forward_sequence(seq, prompt, 0, false, &logits);
  auto message = [&](auto&& call) {
    try {
      call();
    } catch (const UsageError& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_NE(message([&] { decoder.forward_sequence(seq, prompt, 5, false, &logits); })
                .find("sequence 1 holds positions 0..2; cannot continue at position 5"),
            std::string::npos);
  const std::vector<Decoder::DecodeStep> twice{{seq, 4, 3}, {seq, 5, 3}};
  EXPECT_NE(message([&] { decoder.forward_batch(twice, &logits); }).find("sequence 1 appears twice in one step"),
            std::string::npos);
  const std::vector<Decoder::DecodeStep> unknown{{seq, 4, 3}, {9, 5, 0}};
  EXPECT_NE(message([&] { decoder.forward_batch(unknown, &logits); }).find("sequence 9 does not exist"),
            std::string::npos);
  EXPECT_NE(message([&] { decoder.forward_batch({}, &logits); }).find("no sequences"), std::string::npos);
  const std::vector<int32_t> empty_prompt;
  EXPECT_NE(message([&] { engine.generate_batch(std::vector<std::vector<int32_t>>{prompt, empty_prompt}, {}); })
                .find("prompt 1 is empty"),
            std::string::npos);
}

}  // namespace
}  // namespace moex
