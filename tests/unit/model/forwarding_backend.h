// A Backend that forwards every op to another one (the CPU backend) and claims to route MoE layers on its
// device, so that a CPU test reaches the decoder's device-routing branches: the Backend defaults of the fused
// ops then run over the inner backend's ops. Tests subclass it to claim more (fused norms, chained steps) and
// to count what the decoder called.
#pragma once

#include <memory>
#include <string>

#include "moex/backend/backend.h"

namespace moex::test {

class ForwardingBackend : public Backend {
 public:
  explicit ForwardingBackend(std::unique_ptr<Backend> inner) : inner_(std::move(inner)) {}
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

 protected:
  std::unique_ptr<Backend> inner_;
};

}  // namespace moex::test
