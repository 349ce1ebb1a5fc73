// Device-side routing and recorded decode steps on the GPU: moe_routed() against route() + moe_experts()
// on the same backend, CUDA-graph decode against eager decode across context buckets and KV growth, and
// the offloading provider (host-side routing, prefetch copies on the second stream, page-locked source
// tier) against the all-resident run. MOEX_FIXTURES_DIR overrides the source tree's tests/fixtures.
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <functional>
#include <set>

#include "cuda_test_util.h"
#include "moex/model/model.h"
#include "moex/runtime/engine.h"
#include "unit/model/fixture_util.h"
#include "unit/scoped_env.h"

namespace moex::cuda_test {
namespace {

struct RoutedCase {
  int64_t tokens, hidden, ffn, experts, top_k;
  bool sigmoid, normalize, ties;
};

std::string describe(const RoutedCase& c) {
  return "moe_routed(tokens=" + std::to_string(c.tokens) + ",hidden=" + std::to_string(c.hidden) + ",ffn=" +
         std::to_string(c.ffn) + ",experts=" + std::to_string(c.experts) + ",k=" + std::to_string(c.top_k) +
         (c.sigmoid ? ",sigmoid" : ",softmax") + (c.normalize ? ",norm" : "") + (c.ties ? ",ties" : "") + ")";
}

class CudaMoeRouted : public ::testing::TestWithParam<RoutedCase> {};

// moe_routed() (router GEMV, routing and plan fused on the device) against linear() + route() + moe_experts().
TEST_P(CudaMoeRouted, MatchesHostRoutedPath) {
  MOEX_CUDA_BACKEND_OR_SKIP(default_backend);
  // The same checks with the down projection reading the plan and its first weights before its PDL wait.
  setenv("MOEX_CUDA_DOWN_PRELOAD", "1", 1);
  auto preload_backend = make_cuda_backend(0);
  unsetenv("MOEX_CUDA_DOWN_PRELOAD");
  for (Backend* backend : {default_backend.get(), preload_backend.get()}) {
    SCOPED_TRACE(backend == preload_backend.get() ? "down weights before the PDL wait" : "default");
    const RoutedCase c = GetParam();
    SCOPED_TRACE(describe(c));
    std::mt19937 rng(static_cast<uint32_t>(c.tokens * 131 + c.experts * 7 + c.top_k));
    std::vector<Bf16Weight> host;
    std::vector<ExpertWeights> experts;
    for (int64_t e = 0; e < c.experts; ++e) {
      host.push_back(random_bf16(rng, Shape{c.ffn, c.hidden}, 0.05f));
      host.push_back(random_bf16(rng, Shape{c.ffn, c.hidden}, 0.05f));
      host.push_back(random_bf16(rng, Shape{c.hidden, c.ffn}, 0.05f));
    }
    for (int64_t e = 0; e < c.experts; ++e)
      experts.push_back(ExpertWeights{backend->upload_weight(host[3 * e].host_view(), "gate"),
                                      backend->upload_weight(host[3 * e + 1].host_view(), "up"),
                                      backend->upload_weight(host[3 * e + 2].host_view(), "down")});
    Bf16Weight router_host = random_bf16(rng, Shape{c.experts, c.hidden}, 0.5f);
    if (c.ties)  // odd experts copy the even one before them: equal logits, the lower id must win on both paths
      for (int64_t e = 1; e < c.experts; e += 2)
        std::copy_n(router_host.bits.begin() + (e - 1) * c.hidden, c.hidden, router_host.bits.begin() + e * c.hidden);
    const TensorView router = backend->upload_weight(router_host.host_view(), "router");
    auto x = random_floats(rng, static_cast<size_t>(c.tokens * c.hidden));
    GuardedTensor xd(*backend, Shape{c.tokens, c.hidden}), logits(*backend, Shape{c.tokens, c.experts});
    GuardedTensor ref_logits(*backend, Shape{c.tokens, c.experts});
    GuardedTensor fused(*backend, Shape{c.tokens, c.hidden}), reference(*backend, Shape{c.tokens, c.hidden});
    xd.fill(x);
    const RouterScoring scoring = c.sigmoid ? RouterScoring::kSigmoid : RouterScoring::kSoftmax;
    backend->moe_routed(xd.view(), router, logits.view(), c.top_k, scoring, c.normalize, experts, fused.view());
    backend->linear(xd.view(), router, nullptr, ref_logits.view());
    const auto got_logits = logits.read();
    const auto want_logits = ref_logits.read();
    Routing routing;
    backend->route(logits.view(), c.top_k, scoring, c.normalize, &routing);
    backend->moe_experts(xd.view(), routing, experts, reference.view());
    const auto want = reference.read();
    const auto got = fused.read();
    // The router's logits come from linear()'s own kernel at any token count (the planner's GEMV at one token is
    // its loop): bit-identical.
    for (size_t i = 0; i < want_logits.size(); ++i) ASSERT_EQ(got_logits[i], want_logits[i]) << "logit " << i;
    if (c.tokens == 1) {
      // Same plan, same expert kernels: bit-identical.
      for (size_t i = 0; i < want.size(); ++i) ASSERT_EQ(got[i], want[i]) << "element " << i;
    } else {
      // Past 32 rows moe_experts() takes the tensor-core GEMM with bf16 activations; the device plan keeps fp32.
      MOEX_EXPECT_CLOSE(got, std::vector<double>(want.begin(), want.end()), c.tokens > 32 ? 1e-2 : 1e-5);
    }
    // The cached expert table must serve a second call (and the workspace reuse must not corrupt it); the
    // planner's block counter must be back at 0.
    backend->moe_routed(xd.view(), router, logits.view(), c.top_k, scoring, c.normalize, experts, fused.view());
    const auto again = fused.read();
    for (size_t i = 0; i < got.size(); ++i) ASSERT_EQ(again[i], got[i]) << "element " << i << " on the second call";
    if (c.tokens > 1) {
      // Several tokens: the planning kernel of a warp per token and the router launch's 8-warp block
      // (MOEX_CUDA_PLAN_WARPS=8) make the same plan, so the same bits.
      const moex::test::ScopedEnv eight_warps("MOEX_CUDA_PLAN_WARPS", "8");
      backend->moe_routed(xd.view(), router, logits.view(), c.top_k, scoring, c.normalize, experts, fused.view());
      const auto old_planner = fused.read();
      for (size_t i = 0; i < got.size(); ++i)
        ASSERT_EQ(old_planner[i], got[i]) << "element " << i << " with the 8-warp planner";
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, CudaMoeRouted,
                         ::testing::Values(RoutedCase{1, 2048, 5632, 8, 2, false, true, false},     // Model A decode
                                           RoutedCase{1, 2048, 768, 128, 8, false, true, false},    // Model B decode
                                           RoutedCase{1, 256, 8704, 4, 2, false, true, false},      // rows > 8192 wide
                                           // looping down grid (132 SMs: 426 blocks x 5 rounds), the last round
                                           // partly past the rows
                                           RoutedCase{1, 2128, 96, 16, 8, false, true, false},
                                           RoutedCase{1, 64, 40, 8, 2, false, false, true},         // ties
                                           RoutedCase{1, 256, 96, 60, 4, true, true, false},        // sigmoid
                                           RoutedCase{5, 256, 128, 8, 2, false, true, true},        // rows share experts
                                           RoutedCase{16, 512, 256, 16, 8, false, true, false},     // groups split
                                           RoutedCase{64, 256, 64, 4, 4, false, true, false},       // runs of 64 rows
                                           RoutedCase{32, 256, 128, 128, 8, false, true, false},    // 256 assignments
                                           RoutedCase{32, 256, 64, 8, 2, false, true, true},        // 1 logit a lane
                                           RoutedCase{24, 256, 64, 60, 4, true, true, false},       // 2 a lane, sigmoid
                                           RoutedCase{8, 128, 64, 300, 8, false, true, false},      // 16 a lane
                                           RoutedCase{40, 256, 128, 16, 8, false, true, false},     // host fallback
                                           RoutedCase{3, 64, 36, 8, 2, false, true, false}),        // ffn % 8 != 0
                         [](const auto& info) { return "case" + std::to_string(info.index); });

// NaN router logits (a NaN in the residual stream, or in a router row) on every device planner: the one-token
// planner, the several-token one, the prefill plan (128 tokens), and the top k inside the gate/up launch
// (norm_moe_routed with a pending delta). A NaN never wins against a number and NaNs go by lower id, as in the
// host route(): an all-NaN token takes experts 0..k-1 and yields a NaN row; the other tokens never take the
// NaN-row expert and match route() + moe_experts(). The selection had kept the sentinel id 0x7fffffff for a
// round of NaNs, and the planners read the expert table far past its end. The cases share one backend, so a
// case's expert vector may sit where an earlier case's was (on an H200 the 128-token case's took the first's
// address): the backend's cached expert table must then be the new one (it had run the first case's experts).
TEST(CudaMoeRouted, NanLogitsPickExpertsInsideTheTable) {
  MOEX_CUDA_BACKEND_OR_SKIP(backend);
  struct Case {
    int64_t tokens, experts, top_k;
  };
  const int64_t hidden = 256, ffn = 128, nan_expert = 3;
  for (Case c : {Case{1, 8, 2}, Case{1, 128, 8}, Case{5, 16, 4}, Case{128, 8, 2}}) {
    SCOPED_TRACE(testing::Message() << "tokens " << c.tokens << " experts " << c.experts << " k " << c.top_k);
    std::mt19937 rng(static_cast<uint32_t>(c.tokens * 7 + c.experts));
    std::vector<Bf16Weight> host;
    std::vector<ExpertWeights> experts;
    for (int64_t e = 0; e < c.experts; ++e)
      for (Shape shape : {Shape{ffn, hidden}, Shape{ffn, hidden}, Shape{hidden, ffn}})
        host.push_back(random_bf16(rng, shape, 0.05f));
    for (int64_t e = 0; e < c.experts; ++e)
      experts.push_back(ExpertWeights{backend->upload_weight(host[3 * e].host_view(), "gate"),
                                      backend->upload_weight(host[3 * e + 1].host_view(), "up"),
                                      backend->upload_weight(host[3 * e + 2].host_view(), "down")});
    Bf16Weight router_host = random_bf16(rng, Shape{c.experts, hidden}, 0.5f);
    std::fill_n(router_host.bits.begin() + nan_expert * hidden, hidden, uint16_t{0x7fc0});  // a NaN row
    const TensorView router = backend->upload_weight(router_host.host_view(), "router");
    // One token alone is run twice: finite (the NaN row only), then all NaN; several tokens hold one NaN token.
    for (int pass = 0; pass < (c.tokens == 1 ? 2 : 1); ++pass) {
      const int64_t nan_token = c.tokens == 1 ? (pass == 1 ? 0 : -1) : c.tokens / 2;
      SCOPED_TRACE(testing::Message() << "NaN token " << nan_token);
      auto x = random_floats(rng, static_cast<size_t>(c.tokens * hidden));
      if (nan_token >= 0) std::fill_n(x.begin() + nan_token * hidden, hidden, std::nanf(""));
      GuardedTensor xd(*backend, Shape{c.tokens, hidden}), logits(*backend, Shape{c.tokens, c.experts});
      GuardedTensor fused(*backend, Shape{c.tokens, hidden}), reference(*backend, Shape{c.tokens, hidden});
      xd.fill(x);
      // Sigmoid scores: a NaN logit leaves the other picks' scores finite (softmax would make the row's all NaN).
      backend->moe_routed(xd.view(), router, logits.view(), c.top_k, RouterScoring::kSigmoid, true, experts,
                          fused.view());
      Routing routing;
      backend->route(logits.view(), c.top_k, RouterScoring::kSigmoid, true, &routing);
      for (int64_t t = 0; t < c.tokens; ++t)
        for (int64_t j = 0; j < c.top_k; ++j) {
          const int32_t id = routing.expert_ids[static_cast<size_t>(t * c.top_k + j)];
          if (t == nan_token) {
            ASSERT_EQ(id, j) << "token " << t << " pick " << j;  // all NaN: by lower id
          } else {
            ASSERT_TRUE(id >= 0 && id < c.experts && id != nan_expert) << "token " << t << " pick " << j << ": " << id;
          }
        }
      backend->moe_experts(xd.view(), routing, experts, reference.view());
      const auto got = fused.read();
      const auto want = reference.read();
      for (int64_t t = 0; t < c.tokens; ++t) {
        const auto row = [&](const std::vector<float>& v) {
          return std::vector<float>(v.begin() + t * hidden, v.begin() + (t + 1) * hidden);
        };
        const auto got_row = row(got), want_row = row(want);
        if (t == nan_token) {
          for (int64_t i = 0; i < hidden; ++i) ASSERT_TRUE(std::isnan(got_row[i])) << "token " << t << " element " << i;
        } else {
          MOEX_EXPECT_CLOSE(got_row, std::vector<double>(want_row.begin(), want_row.end()), c.tokens > 32 ? 1e-2 : 1e-5)
              << "token " << t;
        }
      }
      if (c.tokens != 1) continue;
      // The decode path at batch 1: the residual step, the top k inside the gate/up launch.
      GuardedTensor xr(*backend, Shape{1, hidden}), d0(*backend, Shape{1, hidden}), d1(*backend, Shape{1, hidden});
      GuardedTensor normed(*backend, Shape{1, hidden}), out(*backend, Shape{1, hidden});
      std::vector<float> zero(static_cast<size_t>(hidden), 0.f), ones(static_cast<size_t>(hidden), 1.f);
      xr.fill(x);
      d0.fill(zero);
      d1.fill(zero);
      const TensorView norm = backend->upload_weight(TensorView(ones.data(), DType::kF32, {hidden}), "norm");
      const TensorView d0v = d0.view();
      backend->norm_moe_routed(xr.view(), &d0v, d1.view(), norm, 1e-5f, normed.view(), router, logits.view(),
                               c.top_k, RouterScoring::kSigmoid, true, experts, out.view());
      const auto got_out = out.read();
      for (int64_t i = 0; i < hidden; ++i)
        ASSERT_EQ(std::isnan(got_out[i]), nan_token == 0) << "norm_moe_routed element " << i;
    }
  }
}

std::vector<int32_t> greedy(Engine& engine, const std::vector<int32_t>& prompt, int64_t tokens) {
  GenerationOptions options;
  options.max_new_tokens = tokens;
  options.sampling.temperature = 0;
  options.stop_at_eos = false;
  return engine.generate(prompt, options).output_ids;
}

// Greedy tokens of an engine on `model` built while env_var is `value` (an A/B switch the CUDA backend reads when
// it starts), with check run on that engine first; env_var is unset again before returning.
std::vector<int32_t> greedy_with_env(const Model& model, const std::vector<int32_t>& prompt, int64_t tokens,
                                     const char* env_var, const char* value, const std::function<void(Engine&)>& check) {
  EngineOptions options;
  options.device = "cuda";
  setenv(env_var, value, 1);
  std::vector<int32_t> ids;
  {
    Engine engine(model, options);
    ids = greedy(engine, prompt, tokens);
    check(engine);
  }
  unsetenv(env_var);
  return ids;
}

std::vector<int32_t> greedy_with_switch_off(const Model& model, const std::vector<int32_t>& prompt, int64_t tokens,
                                            const char* env_var, const std::function<void(Engine&)>& check) {
  return greedy_with_env(model, prompt, tokens, env_var, "0", check);
}

// The default must not change a greedy token against the path env_var=0 keeps, on each fixture. check_off and
// check_default look at each run's engine afterwards (did the path each should take run?).
void expect_default_matches_switch_off(const std::vector<LoadedFixture>& fixtures, const char* env_var,
                                       int64_t tokens, const std::function<void(Engine&)>& check_off = {},
                                       const std::function<void(Engine&, const std::string&)>& check_default = {}) {
  for (const LoadedFixture& fixture : fixtures) {
    SCOPED_TRACE(fixture.name);
    const auto switched_off = greedy_with_switch_off(*fixture.model, fixture.prompt, tokens, env_var,
                                                     check_off ? check_off : [](Engine&) {});
    EngineOptions options;
    options.device = "cuda";
    Engine plain(*fixture.model, options);
    EXPECT_EQ(greedy(plain, fixture.prompt, tokens), switched_off);
    if (check_default) check_default(plain, fixture.name);
  }
}

// An opt-in switch (env_var=1) must not change a greedy token against the default, on each fixture.
void expect_switch_on_matches_default(const std::vector<LoadedFixture>& fixtures, const char* env_var, int64_t tokens) {
  for (const LoadedFixture& fixture : fixtures) {
    SCOPED_TRACE(fixture.name);
    const auto switched = greedy_with_env(*fixture.model, fixture.prompt, tokens, env_var, "1", [](Engine&) {});
    EngineOptions options;
    options.device = "cuda";
    Engine plain(*fixture.model, options);
    EXPECT_EQ(greedy(plain, fixture.prompt, tokens), switched);
  }
}

// Batch-1 decode with each residual norm inside its consumer (the q/k/v GEMV, the router's launch) against the
// norms as launches of their own: the same greedy tokens on the fixtures that take the fused path (every layer
// MoE, no shared expert; qwen3_moe adds per-head q/k norms). The norms' reduction order differs, so only tokens
// are compared; the kernels themselves are checked in CudaResidualNorm.
TEST(CudaDecodeStep, FusedNormsMatchSeparateNorms) {
  MOEX_CUDA_FIXTURES_OR_SKIP(fixtures, "mixtral", "qwen3_moe", "olmoe");
  for (const LoadedFixture& fixture : fixtures) {
    SCOPED_TRACE(fixture.name);
    const Model* model = fixture.model.get();
    const auto& prompt = fixture.prompt;
    const auto separate = greedy_with_switch_off(*model, prompt, 64, "MOEX_CUDA_FUSED_NORMS", [](Engine& engine) {
      EXPECT_FALSE(engine.backend().fuses_residual_norms(1));
    });
    EngineOptions options;
    options.device = "cuda";
    Engine fused(*model, options);
    EXPECT_TRUE(fused.backend().fuses_residual_norms(1));
    EXPECT_EQ(greedy(fused, prompt, 64), separate);
  }
}

// 300 tokens cross the 256-key bucket and the KV cache's growth (both drop the recordings); graphs must not
// change a single greedy token against eager steps.
TEST(CudaDecodeStep, GraphsMatchEagerAcrossBuckets) {
  MOEX_CUDA_FIXTURES_OR_SKIP(fixtures, "mixtral", "qwen3_moe");
  for (const LoadedFixture& fixture : fixtures) {
    SCOPED_TRACE(fixture.name);
    const Model* model = fixture.model.get();
    const auto& prompt = fixture.prompt;
    const auto eager_ids = greedy_with_switch_off(*model, prompt, 300, "MOEX_CUDA_GRAPHS", [](Engine& eager) {
      EXPECT_EQ(cuda_step_graph_stats(eager.backend()).replays, 0);
    });
    EngineOptions options;
    options.device = "cuda";
    Engine graphs(*model, options);
    EXPECT_EQ(greedy(graphs, prompt, 300), eager_ids);
    const CudaStepGraphStats stats = cuda_step_graph_stats(graphs.backend());
    EXPECT_EQ(stats.failures, 0);
    EXPECT_GE(stats.captures, 2);  // buckets 256 and 512
    EXPECT_GT(stats.replays, 250);
    std::printf("[graphs %s] captures %lld replays %lld failures %lld\n", fixture.name.c_str(),
                static_cast<long long>(stats.captures), static_cast<long long>(stats.replays),
                static_cast<long long>(stats.failures));
  }
}

// Greedy steps chained on the device (the pick kernel writes the next step's token; the host reads each token one
// step later) against steps that wait for the host: the same 300 tokens across the 256-key bucket and the KV
// cache's growth, with graphs and with eager steps; and stops that leave a step in flight must not disturb the
// next generation on the same engine.
TEST(CudaDecodeStep, ChainedGreedyMatchesStepByStep) {
  MOEX_CUDA_FIXTURES_OR_SKIP(fixtures, "mixtral", "qwen3_moe", "olmoe");
  for (const LoadedFixture& fixture : fixtures) {
    SCOPED_TRACE(fixture.name);
    const Model* model = fixture.model.get();
    const auto& prompt = fixture.prompt;
    const auto step_by_step = greedy_with_switch_off(*model, prompt, 300, "MOEX_CUDA_CHAIN_STEPS", [](Engine& engine) {
      EXPECT_FALSE(engine.backend().chains_steps());
    });
    const auto eager_chained = greedy_with_switch_off(*model, prompt, 300, "MOEX_CUDA_GRAPHS", [](Engine& engine) {
      EXPECT_TRUE(engine.backend().chains_steps());
      EXPECT_EQ(cuda_step_graph_stats(engine.backend()).replays, 0);
    });
    EXPECT_EQ(eager_chained, step_by_step);
    EngineOptions options;
    options.device = "cuda";
    Engine chained(*model, options);
    ASSERT_TRUE(chained.backend().chains_steps());
    EXPECT_EQ(greedy(chained, prompt, 300), step_by_step);
    // on_token stops at token 7: the step for token 8 is already enqueued; the next generation is unaffected.
    GenerationOptions stop;
    stop.max_new_tokens = 50;
    stop.sampling.temperature = 0;
    stop.stop_at_eos = false;
    int seen = 0;
    const auto early = chained.generate(prompt, stop, [&](int32_t) { return ++seen < 7; }).output_ids;
    EXPECT_EQ(early, std::vector<int32_t>(step_by_step.begin(), step_by_step.begin() + 7));
    EXPECT_EQ(greedy(chained, prompt, 40), std::vector<int32_t>(step_by_step.begin(), step_by_step.begin() + 40));
  }
}

// The greedy pick recorded with the step (the default: the argmax follows the lm_head inside the graph and moves
// the prepared KV row's position on, so the next step uploads no KV row) against the pick after the step
// (MOEX_CUDA_PICK_IN_STEP=0, which uploads every step's row): the same 300 greedy tokens across the 256-key bucket
// and the KV cache's growth (both need an upload), and the rows must really be reused.
TEST(CudaDecodeStep, PickInStepMatchesPickAfterStep) {
  MOEX_CUDA_FIXTURES_OR_SKIP(fixtures, "mixtral", "qwen3_moe", "olmoe");
  expect_default_matches_switch_off(
      fixtures, "MOEX_CUDA_PICK_IN_STEP", 300,
      [](Engine& after) { EXPECT_EQ(cuda_step_graph_stats(after.backend()).kv_rows_reused, 0); },
      [](Engine& in_step, const std::string& name) {
        const CudaStepGraphStats stats = cuda_step_graph_stats(in_step.backend());
        EXPECT_EQ(stats.failures, 0);
        EXPECT_GT(stats.kv_rows_reused, 250);
        EXPECT_LT(stats.kv_uploads, 40);  // the prompt, the first step, a page every 32 positions, a bucket change
        std::printf("[pick in step %s] kv uploads %lld, rows reused %lld\n", name.c_str(),
                    static_cast<long long>(stats.kv_uploads), static_cast<long long>(stats.kv_rows_reused));
      });
}

// The first layer's q/k/v GEMV reading the token's embedding itself (the default at one token) against the
// embedding's own launch (MOEX_CUDA_FUSED_EMBEDDING=0): the same greedy tokens over graph replays of 300 steps
// (the chained token is read on the device by the recorded kernel).
TEST(CudaDecodeStep, FusedEmbeddingMatchesEmbeddingLaunch) {
  MOEX_CUDA_FIXTURES_OR_SKIP(fixtures, "mixtral", "qwen3_moe", "olmoe");
  expect_default_matches_switch_off(fixtures, "MOEX_CUDA_FUSED_EMBEDDING", 300);
}

// The greedy pick from the argmax key the lm_head's blocks fold (the default in a step whose pick follows) against
// the argmax's own launches over the logits (MOEX_CUDA_PICK_IN_LM_HEAD=0): the same tokens over 300 steps and
// their graph replays (ties and NaNs: CudaArgmaxKey, on the host).
TEST(CudaDecodeStep, PickInLmHeadMatchesArgmaxLaunches) {
  MOEX_CUDA_FIXTURES_OR_SKIP(fixtures, "mixtral", "qwen3_moe", "olmoe");
  expect_default_matches_switch_off(
      fixtures, "MOEX_CUDA_PICK_IN_LM_HEAD", 300,
      [](Engine& launches) { EXPECT_EQ(cuda_step_graph_stats(launches.backend()).argmax_key_picks, 0); },
      [](Engine& folded, const std::string&) { EXPECT_GT(cuda_step_graph_stats(folded.backend()).argmax_key_picks, 0); });
}

// Sampled decoding chained on the device (the sampling kernel picks from the host generator's draws) against steps
// that read the logits back and sample on the host: with the same seed, the same tokens, for plain temperature,
// top-p, and top-k with top-p.
TEST(CudaDecodeStep, ChainedSamplingMatchesHostSampling) {
  MOEX_CUDA_FIXTURES_OR_SKIP(fixtures, "mixtral", "qwen3_moe");
  for (const LoadedFixture& fixture : fixtures) {
    for (const SamplingParams& sampling : {SamplingParams{0.8f, 1.0f, 0, 5}, SamplingParams{1.0f, 0.9f, 0, 6},
                                           SamplingParams{0.7f, 0.95f, 20, 7}}) {
      SCOPED_TRACE(testing::Message() << fixture.name << " T " << sampling.temperature << " top-p " << sampling.top_p
                                      << " top-k " << sampling.top_k);
      GenerationOptions options;
      options.max_new_tokens = 120;
      options.sampling = sampling;
      options.stop_at_eos = false;
      EngineOptions engine_options;
      engine_options.device = "cuda";
      std::vector<int32_t> on_host;
      setenv("MOEX_CUDA_CHAIN_STEPS", "0", 1);
      {
        Engine engine(*fixture.model, engine_options);
        EXPECT_FALSE(engine.backend().chains_steps());
        on_host = engine.generate(fixture.prompt, options).output_ids;
      }
      unsetenv("MOEX_CUDA_CHAIN_STEPS");
      Engine chained(*fixture.model, engine_options);
      ASSERT_TRUE(chained.decoder().can_chain_steps(true));
      EXPECT_EQ(chained.generate(fixture.prompt, options).output_ids, on_host);
      EXPECT_EQ(std::set<int32_t>(on_host.begin(), on_host.end()).size() > 1, true) << "a sampled run repeats one token";
    }
  }
}

// RoPE and the KV write inside the decode attention kernel (the default) against the separate ops
// (MOEX_CUDA_FUSED_ROPE=0): the same 300 greedy tokens (the kernel rotates with the same arithmetic), across the
// 256-key bucket (split keys) and the KV cache's growth; qwen3_moe has per-head q/k norms (different weights for q
// and k), olmoe clamps q/k/v (its norms stay separate ops). On both decode attention kernels: dims per lane (the
// default) and key per lane (MOEX_CUDA_ATTENTION_KEY_LANES=1).
TEST(CudaDecodeStep, RopeInsideAttentionMatchesSeparateOps) {
  MOEX_CUDA_FIXTURES_OR_SKIP(fixtures, "mixtral", "qwen3_moe", "olmoe");
  for (const char* key_lanes : {"0", "1"}) {
    SCOPED_TRACE(testing::Message() << "MOEX_CUDA_ATTENTION_KEY_LANES=" << key_lanes);
    const test::ScopedEnv kernel("MOEX_CUDA_ATTENTION_KEY_LANES", key_lanes);
    expect_default_matches_switch_off(fixtures, "MOEX_CUDA_FUSED_ROPE", 300);
  }
}

// The dims-per-lane decode attention kernel (default for rows of distinct sequences; it loads earlier keys before
// its PDL wait) against the key-per-lane kernel: the same 300 greedy tokens over graph replays, across the
// 256-key bucket and the KV cache's growth.
TEST(CudaDecodeStep, DimsPerLaneAttentionMatchesKeyPerLane) {
  MOEX_CUDA_FIXTURES_OR_SKIP(fixtures, "mixtral", "qwen3_moe", "olmoe");
  expect_switch_on_matches_default(fixtures, "MOEX_CUDA_ATTENTION_KEY_LANES", 300);
}

// Batch-1 decode attention with blocks of 8 warps (the default where the q/k/v GEMV's grid leaves room: Model B, and
// qwen3_moe here; mixtral's and olmoe's 16-dim heads take neither decode kernel) against 4
// (MOEX_CUDA_ATTENTION_WARPS=8 / 4): the same greedy tokens over graph replays of 300 steps, across the 256-key
// bucket (past it the cluster split keeps 4).
TEST(CudaDecodeStep, WideAttentionBlocksMatchFourWarps) {
  MOEX_CUDA_FIXTURES_OR_SKIP(fixtures, "mixtral", "qwen3_moe", "olmoe");
  for (const LoadedFixture& fixture : fixtures) {
    SCOPED_TRACE(fixture.name);
    const auto four = greedy_with_env(*fixture.model, fixture.prompt, 300, "MOEX_CUDA_ATTENTION_WARPS", "4",
                                      [](Engine&) {});
    const auto eight = greedy_with_env(*fixture.model, fixture.prompt, 300, "MOEX_CUDA_ATTENTION_WARPS", "8",
                                       [](Engine&) {});
    EXPECT_EQ(eight, four);
  }
}

// Batch-1 decode attention split over a thread block cluster that merges in distributed shared memory (the
// default past 256 keys) against one block per head block and a merge launch (MOEX_CUDA_ATTENTION_CLUSTER=0): the
// same 400 greedy tokens over graph replays, into the 512-key bucket (16 splits of 32 keys, the last ones empty at
// first); and clusters of 8 (=8, 64 keys a split).
TEST(CudaDecodeStep, ClusterSplitAttentionMatchesOneBlock) {
  MOEX_CUDA_FIXTURES_OR_SKIP(fixtures, "mixtral", "qwen3_moe", "olmoe");
  for (const LoadedFixture& fixture : fixtures) {
    SCOPED_TRACE(fixture.name);
    const auto one_block =
        greedy_with_switch_off(*fixture.model, fixture.prompt, 400, "MOEX_CUDA_ATTENTION_CLUSTER", [](Engine&) {});
    for (const char* cluster : {static_cast<const char*>(nullptr), "8"}) {  // the default (16 blocks), then 8
      const test::ScopedEnv env("MOEX_CUDA_ATTENTION_CLUSTER", cluster);
      EngineOptions options;
      options.device = "cuda";
      Engine engine(*fixture.model, options);
      EXPECT_EQ(greedy(engine, fixture.prompt, 400), one_block)
          << "MOEX_CUDA_ATTENTION_CLUSTER=" << (cluster ? cluster : "");
    }
  }
}

// The batch-1 down projection reading the plan and its first weights before its PDL wait
// (MOEX_CUDA_DOWN_PRELOAD=1): the same greedy tokens as without, over graph replays of 300 steps (a plan read
// from a stale cache line would pick another layer's experts). Both with the router's launch planning
// (MOEX_CUDA_TOPK_IN_GATE_UP=0): with the top-k in the gate/up launch the plan is not there to preload.
TEST(CudaDecodeStep, DownPreloadMatchesDefault) {
  MOEX_CUDA_FIXTURES_OR_SKIP(fixtures, "mixtral", "qwen3_moe", "olmoe");
  const test::ScopedEnv planning_router("MOEX_CUDA_TOPK_IN_GATE_UP", "0");
  expect_switch_on_matches_default(fixtures, "MOEX_CUDA_DOWN_PRELOAD", 300);
}

// The top-k and the plan inside the gate/up launch (the default at one token) against the router's own planning
// launch (MOEX_CUDA_TOPK_IN_GATE_UP=0): the same greedy tokens over graph replays of 300 steps.
TEST(CudaDecodeStep, TopkInGateUpMatchesPlanningRouter) {
  MOEX_CUDA_FIXTURES_OR_SKIP(fixtures, "mixtral", "qwen3_moe", "olmoe");
  expect_default_matches_switch_off(fixtures, "MOEX_CUDA_TOPK_IN_GATE_UP", 300);
}

// The MoE block after the logits in one launch (MOEX_CUDA_MOE_ONE_LAUNCH=1: the fixtures' narrow rows take two by
// default) against the default's two launches: the same greedy tokens over graph replays of 300 steps (each launch
// must leave its work counters at 0 for the next layer's and the next replay's).
TEST(CudaDecodeStep, MoeOneLaunchMatchesTwoLaunches) {
  MOEX_CUDA_FIXTURES_OR_SKIP(fixtures, "mixtral", "qwen3_moe", "olmoe");
  expect_switch_on_matches_default(fixtures, "MOEX_CUDA_MOE_ONE_LAUNCH", 300);
}

// Batch-1 decode with each layer's tail in one persistent launch (MOEX_CUDA_LAYER_TAIL=1, opt-in: o_proj, the MoE and
// the next layer's q/k/v; kernels/layer_tail.cu) against the default launch per op: the same greedy tokens over graph
// replays of 300 steps on the fixtures that take the fused path (the launch's counters must be back at 0 for every
// next layer and replay). Summation orders differ; the kernel itself is checked in CudaLayerTail.
TEST(CudaDecodeStep, LayerTailMatchesLaunchPerOp) {
  MOEX_CUDA_FIXTURES_OR_SKIP(fixtures, "mixtral", "qwen3_moe", "olmoe");
  for (const LoadedFixture& fixture : fixtures) {
    SCOPED_TRACE(fixture.name);
    const auto tail = greedy_with_env(*fixture.model, fixture.prompt, 300, "MOEX_CUDA_LAYER_TAIL", "1", [](Engine& e) {
      EXPECT_GT(cuda_layer_tails(e.backend()), 0) << "the persistent launch did not run";
    });
    EngineOptions options;
    options.device = "cuda";
    Engine per_op(*fixture.model, options);
    EXPECT_EQ(greedy(per_op, fixture.prompt, 300), tail);
    EXPECT_EQ(cuda_layer_tails(per_op.backend()), 0);
  }
}

// The offloading provider keeps host-side routing (acquire/release, pre-gating); with a budget of top_k + 1
// experts nearly every step copies experts through copy_from_host_async_path from registered host memory.
TEST(CudaOffload, GreedyMatchesResident) {
  if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  for (const char* name : {"mixtral", "qwen3_moe"}) {
    SCOPED_TRACE(name);
    const auto dir = fixtures_dir() / name;
    if (!std::filesystem::exists(dir)) GTEST_SKIP() << "no fixture " << dir;
    auto model = Model::load(dir.string());
    const auto ref = test::read_json(dir / "reference.json");
    const auto prompt = ref["prompt_ids"].get<std::vector<int32_t>>();
    EngineOptions options;
    options.device = "cuda";
    Engine resident(*model, options);
    const auto want = greedy(resident, prompt, 24);
    const auto ref_ids = ref["greedy_ids"].get<std::vector<int32_t>>();
    ASSERT_EQ(std::vector<int32_t>(want.begin(), want.begin() + static_cast<int64_t>(ref_ids.size())), ref_ids);

    EngineOptions offload = options;
    offload.expert_budget_bytes = (model->config().top_k + 1) * static_cast<int64_t>(model->config().expert_bytes());
    offload.predictor = "pregate";
    Engine engine(*model, offload);
    EXPECT_EQ(greedy(engine, prompt, 24), want);
    const ExpertProviderStats stats = engine.experts().stats();
    EXPECT_GT(stats.misses, 0);
    EXPECT_GT(stats.bytes_moved, 0);
    EXPECT_EQ(cuda_step_graph_stats(engine.backend()).replays, 0) << "offloading must not take the recorded path";
    std::printf("[offload %s] hits %lld misses %lld bytes %lld prefetch issued %lld used %lld\n", name,
                static_cast<long long>(stats.hits), static_cast<long long>(stats.misses),
                static_cast<long long>(stats.bytes_moved), static_cast<long long>(stats.prefetch_issued),
                static_cast<long long>(stats.prefetch_used));
  }
}

// --pack-experts on the GPU: packed rows copied and unpacked on the copy stream (demand copies and pre-gated
// prefetches), with and without missed experts run on the host CPU from the packed source, give the resident
// run's greedy tokens, and move fewer bytes than the bf16 source.
TEST(CudaOffload, PackedExpertsMatchResident) {
  MOEX_CUDA_FIXTURES_OR_SKIP(fixtures, "mixtral", "qwen3_moe");
  for (const LoadedFixture& fixture : fixtures) {
    SCOPED_TRACE(fixture.name);
    const Model* model = fixture.model.get();
    const auto& prompt = fixture.prompt;
    LoadOptions load;
    load.pack_experts = true;
    auto packed = Model::load((fixtures_dir() / fixture.name).string(), load);
    EngineOptions options;
    options.device = "cuda";
    Engine resident(*model, options);
    const auto want = greedy(resident, prompt, 24);
    for (bool cpu_experts : {false, true}) {
      SCOPED_TRACE(cpu_experts ? "cpu experts" : "copies only");
      EngineOptions offload = options;
      offload.expert_budget_bytes = (model->config().top_k + 1) * static_cast<int64_t>(model->config().expert_bytes());
      offload.predictor = "pregate";
      offload.cpu_experts = cpu_experts;
      offload.split_overhead_ms = 0;  // the fixtures' experts are KBs: split some anyway
      Engine bf16(*model, offload);
      EXPECT_EQ(greedy(bf16, prompt, 24), want);
      Engine engine(*packed, offload);
      EXPECT_EQ(greedy(engine, prompt, 24), want);
      const ExpertProviderStats stats = engine.experts().stats();
      EXPECT_GT(stats.misses, 0);
      EXPECT_GT(stats.bytes_moved, 0);
      if (cpu_experts) {
        EXPECT_GT(stats.cpu_computed + stats.split_computed, 0);
      } else {
        EXPECT_LT(stats.bytes_moved, bf16.experts().stats().bytes_moved);
      }
    }
  }
}

}  // namespace
}  // namespace moex::cuda_test
