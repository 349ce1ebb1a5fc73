// CPU execution of missed experts next to a GPU backend, checked without a GPU: a stand-in "device"
// backend that computes with the CPU backend but tags its memory as device memory and refuses host
// views, so the decoder must send every expert the provider hands over as a host view to the host
// backend, and the sum of both paths must equal the resident run.
#include <cmath>
#include <cstring>

#include <gtest/gtest.h>

#include "moex/backend/cpu/cpu_backend.h"
#include "moex/model/model.h"
#include "moex/runtime/engine.h"
#include "unit/model/fixture_util.h"

namespace moex {
namespace {

TensorView as_host(TensorView view) {
  view.device = Device::kCpu;
  return view;
}
TensorView as_device(TensorView view) {
  view.device = Device::kCuda;
  return view;
}

class StandInDevice final : public Backend {
 public:
  StandInDevice() : cpu_(make_cpu_backend(1)) {}
  Device device() const override { return Device::kCuda; }
  std::string name() const override { return "stand-in device"; }
  std::unique_ptr<Buffer> alloc(DType dtype, Shape shape) override {
    auto buffer = cpu_->alloc(dtype, shape);
    buffer->view = as_device(buffer->view);
    return buffer;
  }
  TensorView upload_weight(const TensorView& host, const std::string&) override {
    uploads_.emplace_back(host.dtype, host.shape);
    std::memcpy(uploads_.back().view().data, host.data, host.nbytes());
    return as_device(uploads_.back().view());
  }
  void copy_to_host(const TensorView& src, void* dst) override { std::memcpy(dst, device(src, "copy_to_host").data, src.nbytes()); }
  void copy_from_host(const void* src, const TensorView& dst) override { std::memcpy(device(dst, "copy_from_host").data, src, dst.nbytes()); }
  void embedding(std::span<const int32_t> ids, const TensorView& table, const TensorView& out) override {
    cpu_->embedding(ids, device(table, "embedding"), device(out, "embedding"));
  }
  void linear(const TensorView& x, const TensorView& w, const TensorView* bias, const TensorView& out) override {
    TensorView b = bias ? device(*bias, "linear") : TensorView{};
    cpu_->linear(device(x, "linear"), device(w, "linear"), bias ? &b : nullptr, device(out, "linear"));
  }
  void rms_norm(const TensorView& x, const TensorView& w, float eps, const TensorView& out) override {
    cpu_->rms_norm(device(x, "rms_norm"), device(w, "rms_norm"), eps, device(out, "rms_norm"));
  }
  void add(const TensorView& a, const TensorView& b, const TensorView& out) override {
    cpu_->add(device(a, "add"), device(b, "add"), device(out, "add"));
  }
  void clamp(const TensorView& x, float limit) override { cpu_->clamp(device(x, "clamp"), limit); }
  void rope(const TensorView& x, std::span<const int32_t> positions, int64_t rotary_dim, double theta) override {
    cpu_->rope(device(x, "rope"), positions, rotary_dim, theta);
  }
  void kv_write(const TensorView& k, const TensorView& v, const TensorView& kc, const TensorView& vc,
                int64_t start_pos) override {
    cpu_->kv_write(device(k, "kv_write"), device(v, "kv_write"), device(kc, "kv_write"), device(vc, "kv_write"), start_pos);
  }
  void attention(const TensorView& q, const TensorView& kc, const TensorView& vc, int64_t start_pos, float scale,
                 const TensorView& out) override {
    cpu_->attention(device(q, "attention"), device(kc, "attention"), device(vc, "attention"), start_pos, scale, device(out, "attention"));
  }
  void silu_mul(const TensorView& gate, const TensorView& up, const TensorView& out) override {
    cpu_->silu_mul(device(gate, "silu_mul"), device(up, "silu_mul"), device(out, "silu_mul"));
  }
  void add_sigmoid_gated(const TensorView& acc, const TensorView& x, const TensorView& gate) override {
    cpu_->add_sigmoid_gated(device(acc, "add_sigmoid_gated"), device(x, "add_sigmoid_gated"), device(gate, "add_sigmoid_gated"));
  }
  void route(const TensorView& logits, int64_t top_k, RouterScoring scoring, bool normalize, Routing* routing) override {
    cpu_->route(device(logits, "route"), top_k, scoring, normalize, routing);
  }
  void moe_experts(const TensorView& x, const Routing& routing, std::span<const ExpertWeights> experts,
                   const TensorView& out) override {
    std::vector<ExpertWeights> table(experts.begin(), experts.end());
    std::vector<uint8_t> unwrapped(table.size(), 0);
    for (int32_t id : routing.expert_ids)
      if (id >= 0 && !unwrapped[id]++) table[id] = ExpertWeights{device(table[id].gate, "moe_experts"), device(table[id].up, "moe_experts"), device(table[id].down, "moe_experts")};
    cpu_->moe_experts(device(x, "moe_experts"), routing, table, device(out, "moe_experts"));
  }
  int64_t host_views_refused = 0;

 private:
  // Unwraps a view that must be device memory; a host view reaching a device op is a routing bug.
  TensorView device(const TensorView& view, const char* op) {
    EXPECT_EQ(view.device, Device::kCuda) << "a host view reached the device backend's " << op;
    if (view.device != Device::kCuda) ++host_views_refused;
    return as_host(view);
  }
  std::unique_ptr<Backend> cpu_;
  std::vector<HostTensor> uploads_;
};

TEST(CpuExperts, MissedExpertsRunOnTheHostAndSumToTheResidentRun) {
  for (const char* fixture : {"mixtral", "qwen2_moe", "olmoe"}) {
    SCOPED_TRACE(fixture);
    auto model = Model::load((test::fixtures_root() / fixture).string());
    const ModelConfig& cfg = model->config();
    const auto prompt = test::read_json(test::fixtures_root() / fixture / "reference.json")["prompt_ids"]
                            .get<std::vector<int32_t>>();
    EngineOptions resident_options;
    resident_options.num_threads = 1;
    Engine resident(*model, resident_options);
    const std::vector<float> want = resident.prompt_logits(prompt);
    GenerationOptions greedy;
    greedy.max_new_tokens = 10;
    greedy.stop_at_eos = false;
    const auto want_ids = resident.generate(prompt, greedy).output_ids;

    EngineOptions options;
    options.num_threads = 1;
    options.expert_budget_bytes = (cfg.top_k + 1) * static_cast<int64_t>(cfg.expert_bytes());
    options.cpu_experts = true;
    options.cpu_max_tokens = 64;  // also the prefill, so both paths run in the same step
    auto device = std::make_unique<StandInDevice>();
    StandInDevice* device_ptr = device.get();
    Engine engine(*model, options, std::move(device));
    const std::vector<float> got = engine.prompt_logits(prompt);
    ASSERT_EQ(got.size(), want.size());
    float max_diff = 0;
    for (size_t idx = 0; idx < got.size(); ++idx) max_diff = std::max(max_diff, std::fabs(got[idx] - want[idx]));
    EXPECT_LT(max_diff, 1e-5);
    EXPECT_EQ(engine.generate(prompt, greedy).output_ids, want_ids);
    const ExpertProviderStats stats = engine.experts().stats();
    EXPECT_GT(stats.cpu_computed, 0);
    EXPECT_LT(stats.cpu_computed, stats.misses);  // the cost model also sends some misses over the copy path
    EXPECT_EQ(device_ptr->host_views_refused, 0);
  }
}

}  // namespace
}  // namespace moex
