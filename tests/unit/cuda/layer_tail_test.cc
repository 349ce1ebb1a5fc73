// moe_layer_tail's persistent launch (kernels/layer_tail.cu, opt-in: MOEX_CUDA_LAYER_TAIL=1) against the Backend
// default on the same device (o_proj's
// GEMV, norm_moe_routed's launches, the next layer's normed q/k/v GEMV): the same formulas in other summation
// orders. Three calls per path: the launch's counters must be back at 0 after each, and from the second call on
// the MoE output is written over the pending delta, as the decoder does.
#include <gtest/gtest.h>

#include <cmath>
#include <memory>
#include <random>
#include <vector>

#include "unit/cuda/cuda_test_util.h"
#include "unit/scoped_env.h"

namespace moex::cuda_test {
namespace {

struct TailCase {
  int64_t hidden, qdim, kvdim, ffn, experts, top_k;
  bool first_layer;  // no pending delta
  bool bf16_norms;
  bool next;         // the next layer's q/k/v in the launch (not for the last layer)
  bool bias;         // q/k/v biases
  const char* name;
};

class CudaLayerTail : public ::testing::TestWithParam<TailCase> {};

struct TailRun {
  GuardedTensor x, pending, proj, normed, logits, out, q, k, v;
};

std::vector<double> widen(const std::vector<float>& v) { return std::vector<double>(v.begin(), v.end()); }

TEST_P(CudaLayerTail, MatchesLaunchPerOp) {
  MOEX_CUDA_BACKEND_OR_SKIP(backend);
  const TailCase c = GetParam();
  const test::ScopedEnv on("MOEX_CUDA_LAYER_TAIL", "1");
  ASSERT_TRUE(backend->fuses_layer_tail()) << "MOEX_CUDA_FUSED_NORMS=0 set?";
  SCOPED_TRACE(c.name);
  std::mt19937 rng(static_cast<uint32_t>(c.hidden * 31 + c.experts * 7 + c.first_layer + 2 * c.next));
  const int64_t h = c.hidden;
  const auto x = random_floats(rng, static_cast<size_t>(h), 2.f);
  const auto pending = random_floats(rng, static_cast<size_t>(h), 2.f);
  const auto attn = random_floats(rng, static_cast<size_t>(c.qdim), 1.f);
  const auto norm_weight = [&](const char* name) {
    Bf16Weight w = random_bf16(rng, Shape{h}, 1.f);
    if (c.bf16_norms) return backend->upload_weight(w.host_view(), name);
    return backend->upload_weight(TensorView(w.values.data(), DType::kF32, {h}), name);
  };
  const TensorView ffn_norm = norm_weight("ffn_norm"), next_norm = norm_weight("attn_norm");
  Bf16Weight o_host = random_bf16(rng, {h, c.qdim}, 1.f / std::sqrt(float(c.qdim)));
  const TensorView o_proj = backend->upload_weight(o_host.host_view(), "o_proj");
  Bf16Weight router_host = random_bf16(rng, {c.experts, h}, 0.5f);
  const TensorView router = backend->upload_weight(router_host.host_view(), "router");
  std::vector<Bf16Weight> expert_host;
  std::vector<ExpertWeights> experts;
  for (int64_t e = 0; e < c.experts; ++e) {
    for (Shape shape : {Shape{c.ffn, h}, Shape{c.ffn, h}, Shape{h, c.ffn}})
      expert_host.push_back(random_bf16(rng, shape, 0.05f));
    experts.push_back(ExpertWeights{backend->upload_weight(expert_host[3 * e].host_view(), "gate"),
                                    backend->upload_weight(expert_host[3 * e + 1].host_view(), "up"),
                                    backend->upload_weight(expert_host[3 * e + 2].host_view(), "down")});
  }
  const int64_t qkv_rows[3] = {c.qdim, c.kvdim, c.kvdim};
  std::vector<Bf16Weight> qkv_host;
  std::vector<TensorView> qkv_w, qkv_b;
  std::vector<std::vector<float>> bias_values;
  for (int64_t rows : qkv_rows) {
    qkv_host.push_back(random_bf16(rng, {rows, h}, 1.f / std::sqrt(float(h))));
    qkv_w.push_back(backend->upload_weight(qkv_host.back().host_view(), "qkv"));
    bias_values.push_back(random_floats(rng, static_cast<size_t>(rows)));
    qkv_b.push_back(c.bias ? backend->upload_weight(TensorView(bias_values.back().data(), DType::kF32, {rows}), "b")
                           : TensorView());
  }
  const auto make_run = [&] {
    return std::make_unique<TailRun>(TailRun{
        GuardedTensor(*backend, {1, h}), GuardedTensor(*backend, {1, h}), GuardedTensor(*backend, {1, h}),
        GuardedTensor(*backend, {1, h}), GuardedTensor(*backend, {1, c.experts}), GuardedTensor(*backend, {1, h}),
        GuardedTensor(*backend, {1, c.qdim}), GuardedTensor(*backend, {1, c.kvdim}),
        GuardedTensor(*backend, {1, c.kvdim})});
  };
  GuardedTensor attn_d(*backend, {1, c.qdim});
  attn_d.fill(attn);
  auto fused = make_run(), reference = make_run();
  const int64_t launches_before = cuda_layer_tails(*backend);
  for (int call = 0; call < 3; ++call) {
    const bool out_over_pending = call >= 1 && !c.first_layer;
    for (TailRun* run : {fused.get(), reference.get()}) {
      run->x.fill(x);
      run->pending.fill(pending);
      const TensorView pv = run->pending.view(), qv = run->q.view(), kv = run->k.view(), vv = run->v.view();
      const Backend::LinearOutput outputs[3] = {{&qkv_w[0], c.bias ? &qkv_b[0] : nullptr, &qv},
                                                {&qkv_w[1], c.bias ? &qkv_b[1] : nullptr, &kv},
                                                {&qkv_w[2], c.bias ? &qkv_b[2] : nullptr, &vv}};
      const Backend::LayerTailNext next{&next_norm, outputs};
      const TensorView out = out_over_pending ? pv : run->out.view();
      const auto args = [&](auto&& tail) {
        tail(attn_d.view(), o_proj, run->proj.view(), run->x.view(), c.first_layer ? nullptr : &pv, ffn_norm, 1e-5f,
             run->normed.view(), router, run->logits.view(), c.top_k, RouterScoring::kSoftmax, true, experts, out,
             c.next ? &next : nullptr);
      };
      if (run == fused.get()) {
        args([&](auto&&... a) { backend->moe_layer_tail(a...); });
      } else {
        args([&](auto&&... a) { backend->Backend::moe_layer_tail(a...); });
      }
    }
    SCOPED_TRACE(testing::Message() << "call " << call << (out_over_pending ? ", out over the pending delta" : ""));
    MOEX_EXPECT_CLOSE(fused->x.read(), widen(reference->x.read()), 1e-5) << "residual sum";
    MOEX_EXPECT_CLOSE(fused->normed.read(), widen(reference->normed.read()), 1e-5) << "normalised row";
    MOEX_EXPECT_CLOSE(fused->logits.read(), widen(reference->logits.read()), 1e-5) << "router logits";
    const auto out_fused = out_over_pending ? fused->pending.read() : fused->out.read();
    const auto out_ref = out_over_pending ? reference->pending.read() : reference->out.read();
    MOEX_EXPECT_CLOSE(out_fused, widen(out_ref), 1e-4) << "MoE output";
    if (c.next) {
      MOEX_EXPECT_CLOSE(fused->q.read(), widen(reference->q.read()), 1e-4) << "q";
      MOEX_EXPECT_CLOSE(fused->k.read(), widen(reference->k.read()), 1e-4) << "k";
      MOEX_EXPECT_CLOSE(fused->v.read(), widen(reference->v.read()), 1e-4) << "v";
    }
  }
  EXPECT_EQ(cuda_layer_tails(*backend) - launches_before, 3) << "the persistent launch did not run";
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, CudaLayerTail,
    ::testing::Values(TailCase{2048, 2048, 1024, 5632, 8, 2, false, false, true, false, "model_a"},
                      TailCase{2048, 4096, 512, 768, 128, 8, false, true, true, false, "model_b"},
                      TailCase{2048, 4096, 512, 768, 128, 8, true, true, true, true, "model_b_first_layer_bias"},
                      TailCase{2048, 2048, 1024, 5632, 8, 2, false, true, false, false, "model_a_last_layer"},
                      TailCase{64, 64, 32, 40, 8, 2, false, false, true, false, "fixture_size"},
                      TailCase{256, 128, 64, 96, 60, 4, false, false, true, true, "sixty_experts"}),
    [](const auto& info) { return std::string(info.param.name); });

// The switch: the launch per op unless MOEX_CUDA_LAYER_TAIL=1.
TEST(CudaLayerTailSwitch, OptIn) {
  MOEX_CUDA_BACKEND_OR_SKIP(backend);
  {
    const test::ScopedEnv unset("MOEX_CUDA_LAYER_TAIL", nullptr);
    EXPECT_FALSE(backend->fuses_layer_tail());
  }
  const test::ScopedEnv on("MOEX_CUDA_LAYER_TAIL", "1");
  EXPECT_TRUE(backend->fuses_layer_tail());
}

}  // namespace
}  // namespace moex::cuda_test
