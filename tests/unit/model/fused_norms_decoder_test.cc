// The decoder's fused-norm branch (Backend::fuses_residual_norms: each residual norm inside the op that consumes
// it, the previous layer's MoE output kept pending until the router's op adds it) against the ordinary branch,
// on the CPU: a backend that forwards every op to the CPU backend and says it routes on the device and fuses
// the norms runs the Backend defaults of norm_linear_many / norm_moe_routed. Decode logits must match the
// unfused run's bit for bit (the defaults perform the same additions and norms), and the fused ops must
// actually run once per layer and step. The CUDA kernels themselves are tested in tests/unit/cuda.
#include <gtest/gtest.h>

#include "moex/backend/cpu/cpu_backend.h"
#include "moex/model/decoder.h"
#include "moex/model/model.h"
#include "moex/moe/resident_provider.h"
#include "unit/model/fixture_util.h"

namespace moex {
namespace {

class ForwardingBackend : public Backend {
 public:
  ForwardingBackend(std::unique_ptr<Backend> inner, bool fuse) : inner_(std::move(inner)), fuse_(fuse) {}
  Device device() const override { return inner_->device(); }
  std::string name() const override { return "forwarding " + inner_->name(); }
  std::unique_ptr<Buffer> alloc(DType dtype, Shape shape) override { return inner_->alloc(dtype, shape); }
  TensorView upload_weight(const TensorView& host, const std::string& name) override {
    return inner_->upload_weight(host, name);
  }
  void copy_to_host(const TensorView& src, void* dst) override { inner_->copy_to_host(src, dst); }
  void copy_from_host(const void* src, const TensorView& dst) override { inner_->copy_from_host(src, dst); }
  void embedding(std::span<const int32_t> ids, const TensorView& table, const TensorView& out) override {
    inner_->embedding(ids, table, out);
  }
  void linear(const TensorView& x, const TensorView& w, const TensorView* bias, const TensorView& out) override {
    inner_->linear(x, w, bias, out);
  }
  void rms_norm(const TensorView& x, const TensorView& weight, float eps, const TensorView& out) override {
    inner_->rms_norm(x, weight, eps, out);
  }
  void add(const TensorView& a, const TensorView& b, const TensorView& out) override { inner_->add(a, b, out); }
  void clamp(const TensorView& x, float limit) override { inner_->clamp(x, limit); }
  void rope(const TensorView& x, std::span<const int32_t> positions, int64_t rotary_dim, double theta) override {
    inner_->rope(x, positions, rotary_dim, theta);
  }
  void prepare_kv_step(const KvStep& step) override { inner_->prepare_kv_step(step); }
  void kv_write(const KvStep& step, const TensorView& k, const TensorView& v, const TensorView& k_pages,
                const TensorView& v_pages) override {
    inner_->kv_write(step, k, v, k_pages, v_pages);
  }
  void attention(const KvStep& step, const TensorView& q, const TensorView& k_pages, const TensorView& v_pages,
                 float scale, const TensorView& out) override {
    inner_->attention(step, q, k_pages, v_pages, scale, out);
  }
  void silu_mul(const TensorView& gate, const TensorView& up, const TensorView& out) override {
    inner_->silu_mul(gate, up, out);
  }
  void add_sigmoid_gated(const TensorView& acc, const TensorView& x, const TensorView& gate_logit) override {
    inner_->add_sigmoid_gated(acc, x, gate_logit);
  }
  void route(const TensorView& logits, int64_t top_k, RouterScoring scoring, bool normalize,
             Routing* routing) override {
    inner_->route(logits, top_k, scoring, normalize, routing);
  }
  void moe_experts(const TensorView& x, const Routing& routing, std::span<const ExpertWeights> experts,
                   const TensorView& out) override {
    inner_->moe_experts(x, routing, experts, out);
  }
  bool prefers_device_routing() const override { return true; }
  bool fuses_residual_norms(int64_t rows) const override { return fuse_ && rows == 1; }
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
  int64_t norm_linear_calls = 0, norm_moe_calls = 0;

 private:
  std::unique_ptr<Backend> inner_;
  bool fuse_;
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
    auto run = [&](bool fuse, int64_t* fused_calls) {
      ForwardingBackend backend(make_cpu_backend(1), fuse);
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
      return all;
    };
    int64_t unfused_calls = 0, fused_calls = 0;
    const auto unfused = run(false, &unfused_calls);
    const auto fused = run(true, &fused_calls);
    EXPECT_EQ(unfused_calls, 0);
    EXPECT_EQ(fused_calls, fusable ? kSteps * static_cast<int64_t>(model->weights().layers.size()) : 0);
    ASSERT_EQ(fused.size(), unfused.size());
    for (size_t i = 0; i < fused.size(); ++i) ASSERT_EQ(fused[i], unfused[i]) << "logit " << i;
  }
}

}  // namespace
}  // namespace moex
