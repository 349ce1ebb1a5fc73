// The decoder's pre-gating observation (RouterObserver::on_pregate, what `moex trace record --pregate-logits`
// writes): MoE layer l's router applied to the hidden state that entered layer l-1's router. Checked with
// a model whose every router is replaced by the first one: layer l's pre-gating logits must then equal layer
// l-1's own router logits, row for row, bit for bit (same input, same weights, same op).
#include <gtest/gtest.h>

#include <map>

#include "moex/backend/cpu/cpu_backend.h"
#include "moex/model/decoder.h"
#include "moex/model/model.h"
#include "moex/moe/resident_provider.h"
#include "unit/model/fixture_util.h"

namespace moex {
namespace {

class PregateRecorder : public RouterObserver {
 public:
  void on_router(int32_t moe_layer_idx, int64_t start_pos, std::span<const float> router_logits,
                 const Routing&) override {
    auto& rows = router[moe_layer_idx];
    rows.insert(rows.end(), router_logits.begin(), router_logits.end());
    (void)start_pos;
  }
  bool wants_pregate() const override { return true; }
  void on_pregate(int32_t target_moe_layer_idx, int64_t start_pos, std::span<const float> logits) override {
    auto& rows = pregate[target_moe_layer_idx];
    rows.insert(rows.end(), logits.begin(), logits.end());
    (void)start_pos;
  }
  std::map<int32_t, std::vector<float>> router, pregate;
};

// Run A: the model as it is. Run B_l: router l-1 replaced by router l. Layers before l-1 and the input of
// router l-1 are the same in both, so B_l's router logits at layer l-1 are exactly router l applied to that
// input: what A's pre-gating logits for layer l must be (bit for bit: same op, same operands).
TEST(PregateObserver, LayerLsLogitsAreItsRouterOnLayerLMinus1sInput) {
  for (const char* fixture : {"mixtral", "qwen2_moe", "qwen3_moe"}) {
    SCOPED_TRACE(fixture);
    auto model = Model::load((test::fixtures_root() / fixture).string());
    const ModelConfig& cfg = model->config();
    const auto prompt = test::reference_prompt(test::fixtures_root() / fixture);
    auto run = [&](const ModelWeights& weights) {
      std::vector<std::vector<ExpertWeights>> host_experts;
      for (const LayerWeights& layer : weights.layers)
        if (layer.is_moe) host_experts.push_back(layer.experts);
      auto backend = make_cpu_backend(1);
      ResidentExpertProvider experts(*backend, host_experts);
      Decoder decoder(cfg, weights, *backend, experts);
      PregateRecorder recorder;
      std::vector<float> logits;
      decoder.forward(prompt, 0, false, &logits, &recorder);  // prefill: every prompt row
      const int32_t next = prompt.front();
      decoder.forward(std::span<const int32_t>(&next, 1), static_cast<int64_t>(prompt.size()), false, &logits,
                      &recorder);  // and one decode step
      return recorder;
    };
    std::vector<size_t> moe;  // layer index of each MoE layer
    for (size_t idx = 0; idx < model->weights().layers.size(); ++idx)
      if (model->weights().layers[idx].is_moe) moe.push_back(idx);
    ASSERT_GE(moe.size(), 2u) << "the fixture needs two MoE layers";
    const PregateRecorder a = run(model->weights());
    EXPECT_EQ(a.pregate.count(0), 0u) << "layer 0 has no layer before it";
    for (size_t layer = 1; layer < moe.size(); ++layer) {
      SCOPED_TRACE(layer);
      ModelWeights swapped = model->weights();
      swapped.layers[moe[layer - 1]].router = swapped.layers[moe[layer]].router;
      const PregateRecorder b = run(swapped);
      const auto& got = a.pregate.at(static_cast<int32_t>(layer));
      ASSERT_EQ(got.size(), (prompt.size() + 1) * static_cast<size_t>(cfg.num_experts));
      EXPECT_EQ(got, b.router.at(static_cast<int32_t>(layer - 1)));
      EXPECT_NE(got, a.router.at(static_cast<int32_t>(layer - 1)));  // a different router than layer l-1's own
    }
  }
}

}  // namespace
}  // namespace moex
