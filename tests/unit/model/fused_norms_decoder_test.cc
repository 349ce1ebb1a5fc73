// The decoder's fused-norm branch (Backend::fuses_residual_norms: each residual norm inside the op that consumes
// it, the previous layer's MoE output kept pending until the router's op adds it) against the ordinary branch,
// on the CPU: a backend that forwards every op to the CPU backend and says it routes on the device and fuses
// the norms runs the Backend defaults of norm_linear_many / norm_moe_routed. Decode logits must match the
// unfused run's bit for bit (the defaults perform the same additions and norms), and the fused ops must
// actually run once per layer and step. The same with the layer tail claimed too (Backend::fuses_layer_tail: o_proj,
// the MoE and the next layer's q/k/v in one op, whose default composes the same ops). The CUDA kernels themselves are
// tested in tests/unit/cuda.
#include <gtest/gtest.h>

#include "moex/backend/cpu/cpu_backend.h"
#include "moex/model/decoder.h"
#include "moex/model/model.h"
#include "moex/moe/resident_provider.h"
#include "unit/model/fixture_util.h"
#include "unit/model/forwarding_backend.h"

namespace moex {
namespace {

// Claims fused residual norms (at one row when fuse) and the layer tail (when tail), and counts the fused ops.
class FusingBackend : public test::ForwardingBackend {
 public:
  FusingBackend(std::unique_ptr<Backend> inner, bool fuse, bool tail = false)
      : ForwardingBackend(std::move(inner)), fuse_(fuse), tail_(tail) {}
  bool fuses_residual_norms(int64_t rows) const override { return fuse_ && rows == 1; }
  bool fuses_layer_tail() const override { return tail_; }
  void moe_layer_tail(const TensorView& attn, const TensorView& o_proj, const TensorView& proj, const TensorView& x,
                      const TensorView* pending, const TensorView& ffn_norm, float eps, const TensorView& normed,
                      const TensorView& router, const TensorView& logits, int64_t top_k, RouterScoring scoring,
                      bool normalize, std::span<const ExpertWeights> experts, const TensorView& out,
                      const LayerTailNext* next) override {
    ++tail_calls;
    tail_calls_with_next += next != nullptr;
    Backend::moe_layer_tail(attn, o_proj, proj, x, pending, ffn_norm, eps, normed, router, logits, top_k, scoring,
                            normalize, experts, out, next);
  }
  void norm_linear_many(const TensorView& x, const TensorView* delta, const TensorView& weight, float eps,
                        const TensorView& scratch, std::span<const LinearOutput> outputs) override {
    ++norm_linear_calls;
    Backend::norm_linear_many(x, delta, weight, eps, scratch, outputs);
  }
  void norm_moe_routed(const TensorView& x, const TensorView* delta0, const TensorView& delta1,
                       const TensorView& weight, float eps, const TensorView& normed, const TensorView& router,
                       const TensorView& logits, int64_t top_k, RouterScoring scoring, bool normalize,
                       std::span<const ExpertWeights> experts, const TensorView& out) override {
    ++norm_moe_calls;
    Backend::norm_moe_routed(x, delta0, delta1, weight, eps, normed, router, logits, top_k, scoring, normalize,
                             experts, out);
  }
  int64_t norm_linear_calls = 0, norm_moe_calls = 0, tail_calls = 0, tail_calls_with_next = 0;

 private:
  bool fuse_, tail_;
};

TEST(FusedNormsDecoder, DecodeLogitsMatchTheUnfusedBranch) {
  // mixtral and qwen3_moe take the fused branch (every layer MoE, no shared expert); qwen2_moe has a shared
  // expert and must not.
  for (const char* fixture : {"mixtral", "qwen3_moe", "qwen2_moe"}) {
    SCOPED_TRACE(fixture);
    const bool fusable = std::string(fixture) != "qwen2_moe";
    auto model = Model::load((test::fixtures_root() / fixture).string());
    const ModelConfig& cfg = model->config();
    const auto prompt = test::reference_prompt(test::fixtures_root() / fixture);
    std::vector<std::vector<ExpertWeights>> host_experts;
    for (const LayerWeights& layer : model->weights().layers)
      if (layer.is_moe) host_experts.push_back(layer.experts);
    constexpr int kSteps = 6;
    auto run = [&](bool fuse, int64_t* fused_calls, bool tail = false) {
      FusingBackend backend(make_cpu_backend(1), fuse, tail);
      ResidentExpertProvider experts(backend, host_experts);
      Decoder decoder(cfg, model->weights(), backend, experts);
      std::vector<float> logits, all;
      decoder.forward(prompt, 0, false, &logits);  // prefill: several rows, never fused
      EXPECT_EQ(backend.norm_linear_calls + backend.norm_moe_calls, 0);
      int32_t next = prompt.back();
      for (int step = 0; step < kSteps; ++step) {
        decoder.forward(std::span<const int32_t>(&next, 1), static_cast<int64_t>(prompt.size()) + step, false,
                        &logits);
        all.insert(all.end(), logits.begin(), logits.end());
        next = static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
      }
      EXPECT_EQ(backend.norm_linear_calls, backend.norm_moe_calls);
      *fused_calls = backend.norm_moe_calls;
      if (tail) {  // every layer's tail, all but the last with the next layer's q/k/v
        const int64_t layers = static_cast<int64_t>(model->weights().layers.size());
        EXPECT_EQ(backend.tail_calls, fusable ? kSteps * layers : 0);
        EXPECT_EQ(backend.tail_calls_with_next, fusable ? kSteps * (layers - 1) : 0);
      }
      return all;
    };
    int64_t unfused_calls = 0, fused_calls = 0;
    const auto unfused = run(false, &unfused_calls);
    const auto fused = run(true, &fused_calls);
    EXPECT_EQ(unfused_calls, 0);
    EXPECT_EQ(fused_calls, fusable ? kSteps * static_cast<int64_t>(model->weights().layers.size()) : 0);
    ASSERT_EQ(fused.size(), unfused.size());
    for (size_t i = 0; i < fused.size(); ++i) ASSERT_EQ(fused[i], unfused[i]) << "logit " << i;
    int64_t tail_fused_calls = 0;
    const auto with_tail = run(true, &tail_fused_calls, true);
    EXPECT_EQ(tail_fused_calls, fused_calls);
    ASSERT_EQ(with_tail.size(), unfused.size());
    for (size_t i = 0; i < with_tail.size(); ++i) ASSERT_EQ(with_tail[i], unfused[i]) << "logit " << i << " (tail)";
  }
}

}  // namespace
}  // namespace moex
