// Decoding with steps chained on the device (Engine::generate through Decoder::enqueue_step): the device runs one
// step ahead of the host, so a stop (EOS, the length limit, on_token) finds one step already enqueued. On the CPU a
// backend that forwards to the CPU backend plays the device: pick_token() takes the draw's pick (the host sampler's,
// from the host's draw) into the next step's token and a FIFO the host reads. The tokens, stop reasons and step counts
// must be those of the step-by-step loop, every pick must be read, and at most two may wait. The CUDA pick
// kernel is tested in tests/unit/cuda (CudaDecodeStep).
#include <gtest/gtest.h>

#include <deque>

#include "moex/backend/cpu/cpu_backend.h"
#include "moex/model/model.h"
#include "moex/runtime/engine.h"
#include "moex/runtime/sampler.h"
#include "unit/model/fixture_util.h"
#include "unit/model/forwarding_backend.h"

namespace moex {
namespace {

struct ChainLog {
  int64_t picks = 0, read = 0, device_token_steps = 0, max_pending = 0;
};

class ChainingBackend : public test::ForwardingBackend {
 public:
  ChainingBackend(std::unique_ptr<Backend> inner, bool chain, ChainLog* log, bool samples = false)
      : ForwardingBackend(std::move(inner)), chain_(chain), samples_(samples), log_(log) {}
  bool chains_steps() const override { return chain_; }
  bool samples_on_device(int64_t) const override { return samples_; }
  void pick_token(const TensorView& logits, const TokenDraw& draw) override {
    EXPECT_TRUE(draw.temperature == 0.0f || samples_) << "a sampled pick on a backend that does not sample";
    std::vector<float> host(static_cast<size_t>(logits.numel()));
    inner_->copy_to_host(logits, host.data());
    const size_t cols = static_cast<size_t>(logits.dim(-1));
    next_ = picker_.sample(std::span<const float>(host).last(cols), draw);
    picked_ = true;
    pending_.push_back(next_);
    ++log_->picks;
    log_->max_pending = std::max<int64_t>(log_->max_pending, static_cast<int64_t>(pending_.size()));
  }
  int32_t picked_token() override {
    EXPECT_FALSE(pending_.empty());
    if (pending_.empty()) return 0;
    const int32_t id = pending_.front();
    pending_.pop_front();
    ++log_->read;
    return id;
  }
  void decode_step(int32_t token, int64_t position, const std::function<void()>& ops) override {
    (void)position;
    if (token == kTokenOnDevice) {
      EXPECT_TRUE(picked_) << "a chained step before any pick";
      ++log_->device_token_steps;
      step_token_ = next_;
    } else {
      step_token_ = token;
    }
    picked_ = false;
    in_step_ = true;
    ops();
    in_step_ = false;
  }
  void embedding(std::span<const int32_t> ids, const TensorView& table, const TensorView& out) override {
    if (ids.size() == 1 && ids[0] == kTokenOnDevice) {
      EXPECT_TRUE(in_step_) << "the device token outside a decode step";
      inner_->embedding(std::span<const int32_t>(&step_token_, 1), table, out);
      return;
    }
    inner_->embedding(ids, table, out);
  }
  size_t pending() const { return pending_.size(); }

 private:
  bool chain_, samples_;
  ChainLog* log_;
  Sampler picker_{SamplingParams{}};  // its generator is unused: the draws come from the engine
  std::deque<int32_t> pending_;
  int32_t next_ = 0, step_token_ = 0;
  bool picked_ = false, in_step_ = false;
};

struct Outcome {
  GenerationResult result;
  ChainLog log;
};

Outcome generate(const Model& model, bool chain, std::span<const int32_t> prompt, const GenerationOptions& options,
                 int64_t stop_after = -1, bool samples = false) {
  Outcome run;
  auto backend = std::make_unique<ChainingBackend>(make_cpu_backend(1), chain, &run.log, samples);
  ChainingBackend* raw = backend.get();
  EngineOptions engine_options;
  Engine engine(model, engine_options, std::move(backend));
  int64_t seen = 0;
  auto on_token = [&](int32_t) { return stop_after < 0 || ++seen < stop_after; };
  // Twice on one engine: the second generation must not see picks left over from the first.
  for (int repeat = 0; repeat < 2; ++repeat) {
    seen = 0;
    GenerationResult result = engine.generate(prompt, options, on_token);
    EXPECT_EQ(raw->pending(), 0u) << "picks left unread";
    if (repeat == 0) run.result = result;
    else EXPECT_EQ(result.output_ids, run.result.output_ids);
  }
  return run;
}

// Greedy, and sampled with a backend that samples on its device: the sampled run must pick the tokens of the
// step-by-step loop with the same seed (the host's generator gives every step's draw either way).
TEST(ChainedSteps, SameTokensStopsAndStepsAsTheStepByStepLoop) {
  for (const char* fixture : {"mixtral", "qwen3_moe"}) {
    for (const float temperature : {0.0f, 1.5f}) {
      SCOPED_TRACE(testing::Message() << fixture << ", temperature " << temperature);
      auto model = Model::load((test::fixtures_root() / fixture).string());
      const auto prompt = test::reference_prompt(test::fixtures_root() / fixture);
      for (int64_t max_new : {0, 1, 2, 9}) {
        for (int64_t stop_after : {-1, 1, 2, 5}) {
          SCOPED_TRACE(testing::Message() << "max_new_tokens " << max_new << ", on_token stops after " << stop_after);
          GenerationOptions options;
          options.max_new_tokens = max_new;
          options.sampling = SamplingParams{temperature, 0.9f, 0, 17};
          const Outcome plain = generate(*model, false, prompt, options, stop_after);
          const Outcome chained = generate(*model, true, prompt, options, stop_after, /*samples=*/true);
          EXPECT_EQ(plain.log.picks, 0);
          EXPECT_EQ(chained.result.output_ids, plain.result.output_ids);
          EXPECT_EQ(chained.result.stop_reason, plain.result.stop_reason);
          EXPECT_EQ(chained.result.decode_steps, plain.result.decode_steps);
          // Per generation, one pick per step that ran, plus the step enqueued past an early stop (on_token ended it
          // at token k, 2 <= k < max_new_tokens: the step for token k + 1 was already running); none past the
          // length limit. Two generations per run.
          const int64_t k = static_cast<int64_t>(plain.result.output_ids.size());
          const bool past_stop = stop_after > 0 && k == stop_after && k >= 2 && k < max_new;
          EXPECT_EQ(chained.log.picks, 2 * (plain.result.decode_steps + (past_stop ? 1 : 0)));
          EXPECT_EQ(chained.log.read, chained.log.picks);
          EXPECT_LE(chained.log.max_pending, 2);
          if (plain.result.decode_steps >= 2) {
            EXPECT_GT(chained.log.device_token_steps, 0);
          }
        }
      }
    }
  }
}

// A backend that chains only greedy steps keeps sampled decoding step by step (the host picks); an observer keeps
// every decode step on the host.
TEST(ChainedSteps, SamplingWithoutDeviceSamplingAndObserversKeepTheStepByStepLoop) {
  auto model = Model::load((test::fixtures_root() / "mixtral").string());
  const auto prompt = test::reference_prompt(test::fixtures_root() / "mixtral");
  GenerationOptions options;
  options.max_new_tokens = 4;
  options.sampling.temperature = 0.8f;
  const Outcome sampled = generate(*model, true, prompt, options);
  EXPECT_EQ(sampled.log.picks, 0);
  EXPECT_EQ(sampled.result.output_ids.size(), 4u);

  // An observer needs every step's routing on the host: no chaining, and it sees every decode step.
  struct Counter : RouterObserver {
    void on_router(int32_t, int64_t, std::span<const float>, const Routing&) override { ++calls; }
    int64_t calls = 0;
  } observer;
  ChainLog log;
  Engine engine(*model, EngineOptions{}, std::make_unique<ChainingBackend>(make_cpu_backend(1), true, &log));
  options.sampling.temperature = 0.0f;
  const GenerationResult result = engine.generate(prompt, options, {}, &observer);
  EXPECT_EQ(log.picks, 0);
  EXPECT_EQ(result.decode_steps, 3);
  EXPECT_EQ(observer.calls, (1 + result.decode_steps) * model->config().num_moe_layers());
}

}  // namespace
}  // namespace moex
