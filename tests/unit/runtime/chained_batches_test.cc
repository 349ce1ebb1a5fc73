// Batched decoding with steps chained on the device (Engine::generate_batch through Decoder::enqueue_batch): the
// next step of the same sequences is enqueued before the host reads the picks, so a sequence that ends on EOS has
// one step already enqueued, whose pick must be dropped, and the batch then goes on from the host with the
// survivors. On the CPU a backend that forwards to the CPU backend plays the device: pick_rows() takes each row's
// pick (the host sampler's, from the row's draw) into the next batched step's tokens and a FIFO the host reads. The
// tokens, stop reasons and step counts must be those of the step-by-step loop, every pick must be read, and at most
// two may wait. The CUDA kernels are tested in tests/unit/cuda (CudaBatchedDecode).
#include <gtest/gtest.h>

#include <deque>
#include <filesystem>
#include <string>

#include "moex/backend/cpu/cpu_backend.h"
#include "moex/core/error.h"
#include "moex/model/model.h"
#include "moex/runtime/engine.h"
#include "moex/runtime/sampler.h"
#include "unit/model/fixture_util.h"
#include "unit/model/forwarding_backend.h"

namespace moex {
namespace {

struct BatchChainLog {
  int64_t picks = 0, read = 0, device_token_steps = 0, max_pending = 0;
};

class BatchChainingBackend : public test::ForwardingBackend {
 public:
  BatchChainingBackend(std::unique_ptr<Backend> inner, bool chain, BatchChainLog* log)
      : ForwardingBackend(std::move(inner)), chain_(chain), log_(log) {}
  bool chains_batch_steps(int64_t rows) const override { return chain_ && rows >= 2; }
  bool samples_on_device(int64_t) const override { return true; }
  void pick_rows(const TensorView& logits, std::span<const TokenDraw> draws) override {
    std::vector<float> host(static_cast<size_t>(logits.numel()));
    inner_->copy_to_host(logits, host.data());
    const size_t cols = static_cast<size_t>(logits.dim(-1)), rows = host.size() / cols;
    EXPECT_TRUE(draws.empty() || draws.size() == rows);
    next_.clear();
    for (size_t row = 0; row < rows; ++row) {
      const auto scores = std::span<const float>(host).subspan(row * cols, cols);
      next_.push_back(draws.empty() ? picker_.sample(scores, TokenDraw{}) : picker_.sample(scores, draws[row]));
    }
    pending_.push_back(next_);
    ++log_->picks;
    log_->max_pending = std::max<int64_t>(log_->max_pending, static_cast<int64_t>(pending_.size()));
  }
  void picked_rows(std::span<int32_t> ids) override {
    EXPECT_FALSE(pending_.empty());
    if (pending_.empty()) return;
    EXPECT_EQ(ids.size(), pending_.front().size());
    std::copy_n(pending_.front().begin(), std::min(ids.size(), pending_.front().size()), ids.begin());
    pending_.pop_front();
    ++log_->read;
  }
  void decode_rows_step(std::span<const int32_t> ids, const std::function<void()>& ops) override {
    on_device_ = !ids.empty() && ids[0] == kTokenOnDevice;
    if (on_device_) {
      EXPECT_EQ(ids.size(), next_.size()) << "a chained step of other rows than the last pick's";
      ++log_->device_token_steps;
    }
    ops();
    on_device_ = false;
  }
  void embedding(std::span<const int32_t> ids, const TensorView& table, const TensorView& out) override {
    if (on_device_) {
      inner_->embedding(next_, table, out);
      return;
    }
    inner_->embedding(ids, table, out);
  }
  size_t pending() const { return pending_.size(); }

 private:
  bool chain_;
  BatchChainLog* log_;
  Sampler picker_{SamplingParams{}};  // its generator is unused: the draws come from the engine
  std::deque<std::vector<int32_t>> pending_;
  std::vector<int32_t> next_;
  bool on_device_ = false;
};

struct Outcome {
  std::vector<GenerationResult> results;
  BatchChainLog log;
};

Outcome generate_batch(const Model& model, bool chain, const std::vector<std::vector<int32_t>>& prompts,
                       const GenerationOptions& options) {
  Outcome run;
  auto backend = std::make_unique<BatchChainingBackend>(make_cpu_backend(1), chain, &run.log);
  BatchChainingBackend* raw = backend.get();
  Engine engine(model, EngineOptions{}, std::move(backend));
  // Twice on one engine: the second batch must not see picks left over from the first.
  for (int repeat = 0; repeat < 2; ++repeat) {
    auto results = engine.generate_batch(prompts, options);
    EXPECT_EQ(raw->pending(), 0u) << "picks left unread";
    if (repeat == 0) {
      run.results = results;
      continue;
    }
    for (size_t idx = 0; idx < prompts.size(); ++idx) EXPECT_EQ(results[idx].output_ids, run.results[idx].output_ids);
  }
  return run;
}

void expect_same(const Outcome& chained, const Outcome& plain) {
  ASSERT_EQ(chained.results.size(), plain.results.size());
  for (size_t idx = 0; idx < plain.results.size(); ++idx) {
    SCOPED_TRACE(testing::Message() << "prompt " << idx);
    EXPECT_EQ(chained.results[idx].output_ids, plain.results[idx].output_ids);
    EXPECT_EQ(chained.results[idx].stop_reason, plain.results[idx].stop_reason);
    EXPECT_EQ(chained.results[idx].decode_steps, plain.results[idx].decode_steps);
  }
  EXPECT_EQ(plain.log.picks, 0);
  EXPECT_EQ(chained.log.read, chained.log.picks);
  EXPECT_LE(chained.log.max_pending, 2);
}

// Four prompts of unequal lengths cut from the fixture's reference prompt.
std::vector<std::vector<int32_t>> unequal_prompts(const std::filesystem::path& fixture) {
  const auto ref = test::reference_prompt(fixture);
  std::vector<std::vector<int32_t>> prompts;
  for (size_t len : {ref.size(), size_t{1}, size_t{3}, size_t{2}})
    prompts.emplace_back(ref.begin(), ref.begin() + static_cast<int64_t>(std::min(len, ref.size())));
  return prompts;
}

// Greedy and sampled, at lengths that end the batch before, at and after the first chained step.
TEST(ChainedBatches, SameTokensAndStepsAsTheStepByStepLoop) {
  for (const char* fixture : {"mixtral", "qwen3_moe"}) {
    const auto dir = test::fixtures_root() / fixture;
    auto model = Model::load(dir.string());
    const auto prompts = unequal_prompts(dir);
    for (const float temperature : {0.0f, 1.5f}) {
      for (int64_t max_new : {0, 1, 2, 3, 9}) {
        SCOPED_TRACE(testing::Message() << fixture << ", temperature " << temperature << ", max_new_tokens "
                                        << max_new);
        GenerationOptions options;
        options.max_new_tokens = max_new;
        options.stop_at_eos = false;
        options.sampling = SamplingParams{temperature, 0.9f, 0, 17};
        const Outcome plain = generate_batch(*model, false, prompts, options);
        const Outcome chained = generate_batch(*model, true, prompts, options);
        expect_same(chained, plain);
        // A pick per step that ran; none enqueued past the length limit. Two batches per run.
        EXPECT_EQ(chained.log.picks, max_new >= 2 ? 2 * (max_new - 1) : 0);
        if (max_new >= 3) {
          EXPECT_GT(chained.log.device_token_steps, 0);
        }
      }
    }
  }
}

// The fixture with an EOS id that one sequence picks part-way: its step already enqueued is dropped, the other
// sequences go on from the host, down to a single sequence (not chained).
TEST(ChainedBatches, AnEosDropsTheStepAlreadyEnqueued) {
  const auto source = test::fixtures_root() / "mixtral";
  auto model = Model::load(source.string());
  const auto prompts = unequal_prompts(source);
  GenerationOptions options;
  options.max_new_tokens = 12;
  options.stop_at_eos = false;
  const Outcome free_run = generate_batch(*model, false, prompts, options);
  // EOS: prompt 2's 5th token, where no output holds it in its first 4 places (else the next place that qualifies).
  int32_t eos = -1;
  for (size_t place = 4; place < free_run.results[2].output_ids.size() && eos < 0; ++place) {
    const int32_t token = free_run.results[2].output_ids[place];
    bool earlier = false;
    for (const auto& result : free_run.results)
      earlier = earlier || std::find(result.output_ids.begin(), result.output_ids.begin() + 4, token) !=
                               result.output_ids.begin() + 4;
    if (!earlier) eos = token;
  }
  ASSERT_GE(eos, 0) << "no token of prompt 2's output qualifies as the EOS";
  const auto dir = test::copy_with_eos(source, eos, "chained_batches");
  auto eos_model = Model::load(dir.string());
  std::filesystem::remove_all(dir);
  ASSERT_EQ(eos_model->config().eos_token_ids.size(), 1u);
  ASSERT_EQ(eos_model->config().eos_token_ids[0], eos);
  options.stop_at_eos = true;
  const Outcome plain = generate_batch(*eos_model, false, prompts, options);
  const Outcome chained = generate_batch(*eos_model, true, prompts, options);
  expect_same(chained, plain);
  int eos_stops = 0;
  for (const auto& result : plain.results) eos_stops += result.stop_reason == "eos";
  EXPECT_GE(eos_stops, 1);
  EXPECT_EQ(plain.results[2].stop_reason, "eos");
  EXPECT_GT(chained.log.device_token_steps, 0);
  std::printf("[chained batches] eos token %d: %d EOS stops, %lld picks, %lld chained steps\n", eos, eos_stops,
              static_cast<long long>(chained.log.picks), static_cast<long long>(chained.log.device_token_steps));
}

// enqueue_batch's contract, on the CPU: tokens on the device all or none, only for the previous enqueued batch's
// sequences in its order, and a plain forward_batch in between ends that (its tokens were the host's).
TEST(ChainedBatches, EnqueueBatchRefusesMisuse) {
  const auto dir = test::fixtures_root() / "mixtral";
  auto model = Model::load(dir.string());
  BatchChainLog log;
  Engine engine(*model, EngineOptions{}, std::make_unique<BatchChainingBackend>(make_cpu_backend(1), true, &log));
  Decoder& decoder = engine.decoder();
  const auto prompt = test::reference_prompt(dir);
  std::vector<float> logits;
  std::vector<int32_t> seqs;
  for (int idx = 0; idx < 3; ++idx) {
    seqs.push_back(decoder.add_sequence());
    decoder.forward_sequence(seqs.back(), prompt, 0, false, &logits);
  }
  const int64_t pos = static_cast<int64_t>(prompt.size());
  const int32_t on_device = Backend::kTokenOnDevice;
  std::vector<Decoder::DecodeStep> first{{seqs[0], 1, pos}, {seqs[1], 1, pos}};
  EXPECT_THROW(decoder.enqueue_batch(std::vector<Decoder::DecodeStep>{{seqs[0], on_device, pos}, {seqs[1], on_device, pos}}),
               UsageError);  // no batch enqueued yet
  decoder.enqueue_batch(first);
  EXPECT_THROW(decoder.enqueue_batch(std::vector<Decoder::DecodeStep>{{seqs[0], on_device, pos + 1},
                                                                      {seqs[1], 1, pos + 1}}),
               UsageError);  // one row's token on the device, the other's the host's
  EXPECT_THROW(decoder.enqueue_batch(std::vector<Decoder::DecodeStep>{{seqs[1], on_device, pos + 1},
                                                                      {seqs[0], on_device, pos + 1}}),
               UsageError);  // the other order
  EXPECT_THROW(decoder.enqueue_batch(std::vector<Decoder::DecodeStep>{{seqs[0], on_device, pos + 1},
                                                                      {seqs[2], on_device, pos}}),
               UsageError);  // seqs[2] was not in the batch
  std::vector<int32_t> ids(2);
  decoder.next_batch_tokens(ids);
  std::vector<Decoder::DecodeStep> next{{seqs[0], ids[0], pos + 1}, {seqs[1], ids[1], pos + 1}};
  decoder.forward_batch(next, &logits);
  EXPECT_THROW(decoder.enqueue_batch(std::vector<Decoder::DecodeStep>{{seqs[0], on_device, pos + 2},
                                                                      {seqs[1], on_device, pos + 2}}),
               UsageError);  // forward_batch ran since
  EXPECT_EQ(log.picks, log.read);
}

}  // namespace
}  // namespace moex
