// The generic MoE decoder: runs any registered family's layer recipe (pre-norm GQA attention with
// RoPE and optional q/k norm, then a dense or MoE SwiGLU block with an optional shared expert) on a
// Backend, asking an ExpertProvider for expert weights. One sequence at a time; the KV cache lives here.
#pragma once

#include <memory>
#include <span>
#include <vector>

#include "moex/backend/backend.h"
#include "moex/model/model_config.h"
#include "moex/model/model_weights.h"
#include "moex/moe/expert_provider.h"

namespace moex {

// Receives each MoE layer's router output during forward() (for `moex logits --router`, traces,
// predictors). router_logits is host fp32 [num_tokens, num_experts].
class RouterObserver {
 public:
  virtual ~RouterObserver() = default;
  virtual void on_router(int32_t moe_layer_idx, int64_t start_pos, std::span<const float> router_logits,
                         const Routing& routing) = 0;
};

class Decoder {
 public:
  // Uploads the non-expert weights to the backend. cfg, weights, backend and experts must outlive it.
  Decoder(const ModelConfig& cfg, const ModelWeights& weights, Backend& backend, ExpertProvider& experts);
  // A CPU backend for experts the provider hands over as host views (CPU execution of missed experts
  // while the main backend is a GPU). Not owned; must outlive the decoder.
  void set_host_backend(Backend* host_backend) { host_backend_ = host_backend; }
  ~Decoder();

  // Sizes the KV cache for sequences up to max_seq_len tokens (keeps the current contents' prefix).
  void reserve(int64_t max_seq_len);
  int64_t max_seq_len() const { return max_seq_len_; }

  // Runs ids at positions [start_pos, start_pos + ids.size()), appending to the KV cache. When logits is
  // given it receives fp32 rows of vocab_size: every position when all_logits, else the last only.
  void forward(std::span<const int32_t> ids, int64_t start_pos, bool all_logits, std::vector<float>* logits,
               RouterObserver* observer = nullptr);
  // Tells the expert provider that the current sequence ended (per-request predictors and policies).
  void end_sequence();

 private:
  struct DeviceLayer;
  TensorView scratch(int slot, Shape shape);
  // The step's ops from embedding to the lm head (left in the kLogits scratch when want_logits).
  void run_layers(std::span<const int32_t> ids, int64_t start_pos, std::span<const int32_t> positions,
                  bool all_logits, bool want_logits, bool device_routing, RouterObserver* observer);
  void swiglu(const TensorView& x, const ExpertWeights& mlp, int64_t ffn, const TensorView& out);
  // routing_'s experts on h into out, in waves when the provider cannot hold them all at once.
  void run_experts(int32_t moe_layer_idx, const TensorView& h, const TensorView& out);
  // Feeds the provider the next MoE layers' router logits on the last token of h.
  void pregate(int32_t moe_layer_idx, const TensorView& h);
  // One wave of experts; those given as host views run on host_backend_ at the same time as the rest.
  void moe_wave(const Routing& wave, const TensorView& h, const TensorView& out);

  const ModelConfig& cfg_;
  const ModelWeights& host_;
  Backend& backend_;
  ExpertProvider& experts_;
  TensorView embed_, final_norm_, lm_head_;
  std::vector<DeviceLayer> layers_;
  std::vector<std::unique_ptr<Buffer>> kv_cache_;  // 2 per layer: k, v [max_seq, kv_heads, head_dim]
  int64_t max_seq_len_ = 0;
  std::vector<std::unique_ptr<Buffer>> scratch_;
  std::vector<ExpertWeights> expert_table_;
  Routing routing_, pending_, wave_;
  std::vector<float> router_host_, lookahead_host_;
  std::vector<int32_t> moe_layers_;  // layer index of each MoE layer
  Backend* host_backend_ = nullptr;
  Routing host_wave_, device_wave_;
  std::vector<float> h_host_, out_host_;
};

}  // namespace moex
