// Batched decode on the GPU: several sequences with different prompt lengths decoded together
// (Decoder::forward_batch through Engine::generate_batch, pages of 3 positions) must give each sequence's
// greedy tokens of generate() alone, and their logits step by step. The last sequence left in the batch runs
// as a single-row step, which takes the recorded (CUDA graph) path; batched steps are recorded per batch size and
// context bucket (decode_rows_step), checked against eager steps below.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <string>

#include "cuda_test_util.h"
#include "moex/backend/cuda/cuda_backend.h"
#include "moex/model/model.h"
#include "moex/runtime/engine.h"
#include "moex/runtime/sampler.h"
#include "unit/model/fixture_util.h"
#include "unit/scoped_env.h"

namespace moex::cuda_test {
namespace {

// Five prompts of unequal lengths cut from the fixture's reference prompt.
std::vector<std::vector<int32_t>> unequal_prompts(const std::vector<int32_t>& ref) {
  std::vector<std::vector<int32_t>> prompts;
  for (size_t len : {ref.size(), size_t{1}, size_t{4}, size_t{2}, size_t{5}})
    prompts.emplace_back(ref.begin(), ref.begin() + static_cast<int64_t>(std::min(len, ref.size())));
  return prompts;
}

// Greedy generation of exactly `tokens` tokens (EOS does not stop it).
GenerationOptions greedy_tokens(int64_t tokens) {
  GenerationOptions greedy;
  greedy.max_new_tokens = tokens;
  greedy.sampling.temperature = 0;
  greedy.stop_at_eos = false;
  return greedy;
}

TEST(CudaBatchedDecode, MatchesEachSequenceAlone) {
  MOEX_CUDA_FIXTURES_OR_SKIP(fixtures, "mixtral", "qwen3_moe", "olmoe");
  for (const LoadedFixture& fixture : fixtures) {
    SCOPED_TRACE(fixture.name);
    const Model* model = fixture.model.get();
    const auto& ref = fixture.prompt;
    const auto prompts = unequal_prompts(ref);
    EngineOptions options;
    options.device = "cuda";
    options.kv_page_size = 3;
    Engine engine(*model, options);
    const GenerationOptions greedy = greedy_tokens(40);
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

// Batched steps recorded per batch size and context bucket must give the tokens and logits of eager steps: two
// engines step in lockstep, 4 sequences, then 3 from step 100 and 2 from step 200, 300 steps in all, so the longest
// sequence crosses the 256-key bucket (a recording per size and bucket, and the KV cache's growth drops them all).
// qwen2_moe adds the shared expert's ops, olmoe_rope_alt the other RoPE layout.
TEST(CudaBatchedDecode, GraphsMatchEagerAcrossSizesAndBuckets) {
  MOEX_CUDA_FIXTURES_OR_SKIP(fixtures, "mixtral", "qwen3_moe", "olmoe", "qwen2_moe", "olmoe_rope_alt");
  for (const LoadedFixture& fixture : fixtures) {
    SCOPED_TRACE(fixture.name);
    const Model* model = fixture.model.get();
    const auto& ref = fixture.prompt;
    EngineOptions options;
    options.device = "cuda";
    auto eager_engine = [&] {
      const test::ScopedEnv off("MOEX_CUDA_GRAPHS", "0");  // read when the backend is made
      return std::make_unique<Engine>(*model, options);
    };
    const std::unique_ptr<Engine> eager_owner = eager_engine();
    Engine& eager = *eager_owner;
    const test::ScopedEnv on("MOEX_CUDA_GRAPHS", nullptr);
    Engine graphs(*model, options);
    const int64_t vocab = model->config().vocab_size;
    struct Live {
      int32_t eager_seq, graph_seq;
      int32_t token;
      int64_t position;
    };
    auto argmax = [&](const std::vector<float>& logits, int64_t row) {
      const auto begin = logits.begin() + row * vocab;
      return static_cast<int32_t>(std::max_element(begin, begin + vocab) - begin);
    };
    std::vector<Live> live;
    std::vector<float> eager_logits, graph_logits;
    for (size_t len : {ref.size(), size_t{1}, size_t{4}, size_t{2}}) {
      const std::vector<int32_t> prompt(ref.begin(), ref.begin() + static_cast<int64_t>(std::min(len, ref.size())));
      Live seq{eager.decoder().add_sequence(), graphs.decoder().add_sequence(), 0,
               static_cast<int64_t>(prompt.size())};
      eager.decoder().forward_sequence(seq.eager_seq, prompt, 0, false, &eager_logits);
      graphs.decoder().forward_sequence(seq.graph_seq, prompt, 0, false, &graph_logits);
      seq.token = argmax(eager_logits, 0);
      live.push_back(seq);
    }
    const CudaStepGraphStats before = cuda_step_graph_stats(graphs.backend());
    for (int step = 0; step < 300; ++step) {
      if (step == 100 || step == 200) {  // the last sequence ends: the batch shrinks
        eager.decoder().free_sequence(live.back().eager_seq);
        graphs.decoder().free_sequence(live.back().graph_seq);
        live.pop_back();
      }
      std::vector<Decoder::DecodeStep> eager_steps, graph_steps;
      for (const Live& seq : live) {
        eager_steps.push_back({seq.eager_seq, seq.token, seq.position});
        graph_steps.push_back({seq.graph_seq, seq.token, seq.position});
      }
      eager.decoder().forward_batch(eager_steps, &eager_logits);
      graphs.decoder().forward_batch(graph_steps, &graph_logits);
      for (size_t row = 0; row < live.size(); ++row) {
        const auto r = static_cast<int64_t>(row);
        const std::vector<double> want(eager_logits.begin() + r * vocab, eager_logits.begin() + (r + 1) * vocab);
        const std::vector<float> got(graph_logits.begin() + r * vocab, graph_logits.begin() + (r + 1) * vocab);
        MOEX_EXPECT_CLOSE(got, want, 1e-4) << "step " << step << " row " << row;
        const int32_t token = argmax(eager_logits, r);
        ASSERT_EQ(argmax(graph_logits, r), token) << "step " << step << " row " << row;
        live[row].token = token;
        ++live[row].position;
      }
    }
    EXPECT_EQ(cuda_step_graph_stats(eager.backend()).replays, 0);
    const CudaStepGraphStats after = cuda_step_graph_stats(graphs.backend());
    EXPECT_EQ(after.failures, before.failures);
    EXPECT_GE(after.captures - before.captures, 4);  // 4, 3 and 2 rows at 256 keys; 2 rows at 512
    EXPECT_GT(after.replays - before.replays, 250);
    std::printf("[batched graphs %s] captures %lld replays %lld failures %lld\n", fixture.name.c_str(),
                static_cast<long long>(after.captures - before.captures),
                static_cast<long long>(after.replays - before.replays),
                static_cast<long long>(after.failures - before.failures));
  }
}

// Chained batched steps (Engine::generate_batch through Decoder::enqueue_batch: each step enqueued before the last
// one's picks are read) must give the tokens, stop reasons and step counts of steps run one by one
// (MOEX_CUDA_CHAIN_STEPS=0), greedy and sampled. The fixture is copied with an EOS id that one sequence picks part-way, so the batch
// shrinks on an EOS (the step already enqueued for that sequence is dropped) and at max_new_tokens.
TEST(CudaBatchedDecode, ChainedStepsMatchStepsOneByOne) {
  MOEX_CUDA_FIXTURES_OR_SKIP(fixtures, "mixtral");
  const LoadedFixture& fixture = fixtures[0];
  const auto& ref = fixture.prompt;
  const auto prompts = unequal_prompts(ref);
  EngineOptions options;
  options.device = "cuda";
  const GenerationOptions greedy = greedy_tokens(40);
  auto run = [&](const Model& model, const GenerationOptions& generation, bool chained) {
    const test::ScopedEnv chain("MOEX_CUDA_CHAIN_STEPS", chained ? nullptr : "0");  // read when the backend is made
    Engine engine(model, options);
    EXPECT_EQ(engine.decoder().can_chain_batches(static_cast<int64_t>(prompts.size()),
                                                 generation.sampling.temperature > 0),
              chained);
    return engine.generate_batch(prompts, generation);
  };
  const auto plain = run(*fixture.model, greedy, false);
  const auto chained = run(*fixture.model, greedy, true);
  for (size_t idx = 0; idx < prompts.size(); ++idx)
    EXPECT_EQ(chained[idx].output_ids, plain[idx].output_ids) << "prompt " << idx;
  // Sampled: every enqueued step takes its rows' next draws, as the steps run one by one do.
  GenerationOptions sampled = greedy;
  sampled.sampling = SamplingParams{0.8f, 0.95f, 40, 7};
  const auto plain_sampled = run(*fixture.model, sampled, false);
  const auto chained_sampled = run(*fixture.model, sampled, true);
  for (size_t idx = 0; idx < prompts.size(); ++idx) {
    EXPECT_EQ(chained_sampled[idx].output_ids, plain_sampled[idx].output_ids) << "sampled, prompt " << idx;
    EXPECT_NE(plain_sampled[idx].output_ids, plain[idx].output_ids) << "sampled, prompt " << idx;
  }

  // EOS: the 12th token of prompt 1 (a token no output holds before its 12th place where possible).
  int32_t eos = plain[1].output_ids[11];
  for (size_t place = 11; place < plain[1].output_ids.size(); ++place) {
    const int32_t token = plain[1].output_ids[place];
    bool earlier = false;
    for (const auto& result : plain)
      earlier = earlier || std::find(result.output_ids.begin(), result.output_ids.begin() + 3, token) !=
                               result.output_ids.begin() + 3;
    if (!earlier) {
      eos = token;
      break;
    }
  }
  const auto dir = test::copy_with_eos(fixtures_dir() / "mixtral", eos, "chained_eos");
  const auto model = Model::load(dir.string());
  ASSERT_EQ(model->config().eos_token_ids.size(), 1u);
  ASSERT_EQ(model->config().eos_token_ids[0], eos);
  GenerationOptions stopping = greedy;
  stopping.stop_at_eos = true;
  const auto plain_eos = run(*model, stopping, false);
  const auto chained_eos = run(*model, stopping, true);
  std::filesystem::remove_all(dir);
  int eos_stops = 0, length_stops = 0;
  for (size_t idx = 0; idx < prompts.size(); ++idx) {
    EXPECT_EQ(chained_eos[idx].output_ids, plain_eos[idx].output_ids) << "prompt " << idx;
    EXPECT_EQ(chained_eos[idx].stop_reason, plain_eos[idx].stop_reason) << "prompt " << idx;
    EXPECT_EQ(chained_eos[idx].decode_steps, plain_eos[idx].decode_steps) << "prompt " << idx;
    eos_stops += plain_eos[idx].stop_reason == "eos";
    length_stops += plain_eos[idx].stop_reason == "length";
  }
  EXPECT_GE(eos_stops, 1);
  EXPECT_GE(length_stops, 2);  // the batch goes on past the EOS
  std::printf("[chained eos] eos %d, length %d, eos token %d\n", eos_stops, length_stops, eos);
}

// enqueue_batch's contract: tokens on the device all or none, and only for the previous batch's sequences.
TEST(CudaBatchedDecode, EnqueueBatchRefusesMisuse) {
  MOEX_CUDA_FIXTURES_OR_SKIP(fixtures, "mixtral");
  EngineOptions options;
  options.device = "cuda";
  Engine engine(*fixtures[0].model, options);
  Decoder& decoder = engine.decoder();
  std::vector<float> logits;
  std::vector<int32_t> seqs;
  for (int idx = 0; idx < 3; ++idx) {
    seqs.push_back(decoder.add_sequence());
    decoder.forward_sequence(seqs.back(), fixtures[0].prompt, 0, false, &logits);
  }
  const int64_t pos = static_cast<int64_t>(fixtures[0].prompt.size());
  const int32_t on_device = Backend::kTokenOnDevice;
  std::vector<Decoder::DecodeStep> first{{seqs[0], 1, pos}, {seqs[1], 1, pos}};
  std::vector<Decoder::DecodeStep> mixed{{seqs[0], on_device, pos}, {seqs[1], 1, pos}};
  std::vector<Decoder::DecodeStep> other{{seqs[0], on_device, pos + 1}, {seqs[2], on_device, pos}};
  EXPECT_THROW(decoder.enqueue_batch(mixed), UsageError);
  decoder.enqueue_batch(first);
  EXPECT_THROW(decoder.enqueue_batch(other), UsageError);  // seqs[2] was not in the batch before
  std::vector<int32_t> ids(2);
  decoder.next_batch_tokens(ids);
  for (int32_t id : ids) EXPECT_TRUE(id >= 0 && id < engine.config().vocab_size);
}

}  // namespace
}  // namespace moex::cuda_test
