// The Backend interface: every numeric op the model code needs, on tensors that live on the
// backend's device. Model code (model/) calls only this; cpu/ and cuda/ implement it.
// Conventions: activations are fp32, row-major [rows, cols]; weights are bf16, f16 or f32 in the
// checkpoint's layout ([out_features, in_features], like torch.nn.Linear); host-side integer inputs
// (token ids, positions, expert ids) are passed as host spans, since the host schedules every step.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "moex/core/tensor.h"

namespace moex {

// One expert's SwiGLU weights: down(silu(gate x) * up x). gate/up [ffn, hidden], down [hidden, ffn].
struct ExpertWeights {
  TensorView gate;
  TensorView up;
  TensorView down;
  bool valid() const { return !gate.empty(); }
};

// Top-k routing of a batch of tokens: row t holds token t's experts, best first.
struct Routing {
  int64_t num_tokens = 0;
  int64_t top_k = 0;
  std::vector<int32_t> expert_ids;  // [num_tokens * top_k]
  std::vector<float> weights;       // [num_tokens * top_k]
};

enum class RouterScoring : uint8_t { kSoftmax, kSigmoid };

// Owned activation memory on a backend's device; freed by the backend that made it.
class Buffer {
 public:
  virtual ~Buffer() = default;
  TensorView view;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual Device device() const = 0;
  virtual std::string name() const = 0;

  // ---- memory -------------------------------------------------------------------------------
  // An fp32/int activation buffer of the given shape on this device (contents undefined).
  virtual std::unique_ptr<Buffer> alloc(DType dtype, Shape shape) = 0;
  // A weight usable by this backend's ops. CPU: the host view itself (zero copy from the mmap);
  // CUDA: uploaded once. The returned view stays valid as long as the backend lives.
  virtual TensorView upload_weight(const TensorView& host, const std::string& name) = 0;
  virtual void copy_to_host(const TensorView& src, void* dst) = 0;
  virtual void copy_from_host(const void* src, const TensorView& dst) = 0;
  // The expert prefetcher's copy: like copy_from_host, but on a copy path separate from compute so it
  // overlaps with running ops, and callable from one other thread while ops run. Default: copy_from_host.
  virtual void copy_from_host_async_path(const void* src, const TensorView& dst) { copy_from_host(src, dst); }
  // Makes host memory that copies read from faster to copy (CUDA: page-locks it). A no-op where it does
  // not matter; never fails (an unregistered range is merely slower).
  virtual void register_host_memory(const void* ptr, size_t bytes) { (void)ptr, (void)bytes; }
  virtual void synchronize() {}

  // ---- ops ----------------------------------------------------------------------------------
  // out[i, :] = table[ids[i], :] as fp32.
  virtual void embedding(std::span<const int32_t> ids, const TensorView& table, const TensorView& out) = 0;
  // out[n, out_features] = x[n, in_features] @ w^T (+ bias[out_features]).
  virtual void linear(const TensorView& x, const TensorView& w, const TensorView* bias,
                      const TensorView& out) = 0;
  // Row-wise RMSNorm over the last dim: out = x / sqrt(mean(x^2) + eps) * weight. In-place allowed.
  virtual void rms_norm(const TensorView& x, const TensorView& weight, float eps, const TensorView& out) = 0;
  // out = a + b (same shape). In-place allowed.
  virtual void add(const TensorView& a, const TensorView& b, const TensorView& out) = 0;
  // Clamp every element into [-limit, limit] in place (OLMoE clip_qkv).
  virtual void clamp(const TensorView& x, float limit) = 0;
  // Rotary embedding, rotate-half (GPT-NeoX) convention, in place on x[n, heads, head_dim]; token i
  // is at positions[i]; the first rotary_dim dims of each head rotate.
  virtual void rope(const TensorView& x, std::span<const int32_t> positions, int64_t rotary_dim,
                    double theta) = 0;
  // Writes k/v [n, kv_heads, head_dim] into cache rows [start_pos, start_pos + n).
  virtual void kv_write(const TensorView& k, const TensorView& v, const TensorView& k_cache,
                        const TensorView& v_cache, int64_t start_pos) = 0;
  // Causal GQA attention for one sequence: q[n, heads, head_dim] at positions start_pos..start_pos+n-1
  // over cache rows [0, start_pos + n); out[n, heads, head_dim]. scale = 1/sqrt(head_dim).
  virtual void attention(const TensorView& q, const TensorView& k_cache, const TensorView& v_cache,
                         int64_t start_pos, float scale, const TensorView& out) = 0;
  // out = silu(gate) * up, elementwise on [n, ffn].
  virtual void silu_mul(const TensorView& gate, const TensorView& up, const TensorView& out) = 0;
  // acc[r, :] += sigmoid(gate_logit[r, 0]) * x[r, :]  (Qwen2-MoE shared-expert gate).
  virtual void add_sigmoid_gated(const TensorView& acc, const TensorView& x, const TensorView& gate_logit) = 0;
  // Router: logits[n, num_experts] -> top-k ids/weights on the host. Ties pick the lower expert id.
  // Softmax scoring: weights are softmax probabilities, renormalised over the top-k if normalize.
  virtual void route(const TensorView& logits, int64_t top_k, RouterScoring scoring, bool normalize,
                     Routing* routing) = 0;
  // out[t, :] = sum_j routing.weights[t, j] * expert_{ids[t, j]}(x[t, :]). experts[e] must be valid
  // for every id >= 0 that occurs in routing; entries with id < 0 are skipped (they contribute
  // nothing: the offloading path runs a layer's experts in waves). out is overwritten.
  virtual void moe_experts(const TensorView& x, const Routing& routing, std::span<const ExpertWeights> experts,
                           const TensorView& out) = 0;
  // route() then moe_experts() for a layer whose experts are all resident, without the routing reaching
  // the host: a backend may keep ids and weights on its device (no host round trip per MoE layer). experts
  // is the layer's whole table (every entry valid); the same data pointer must always carry the same
  // contents, so that a backend may cache what it derives from it (CUDA: a device copy of the pointers).
  // Whether moe_routed() saves anything over route() + moe_experts() here (a device round trip per MoE
  // layer); the decoder keeps host-side routing, and the providers' per-expert hit counts, otherwise.
  virtual bool prefers_device_routing() const { return false; }
  virtual void moe_routed(const TensorView& x, const TensorView& logits, int64_t top_k, RouterScoring scoring,
                          bool normalize, std::span<const ExpertWeights> experts, const TensorView& out) {
    Routing routing;
    route(logits, top_k, scoring, normalize, &routing);
    moe_experts(x, routing, experts, out);
  }

  // ---- decode-step recording (optional) ---------------------------------------------------------
  // Runs the ops of one single-token step (token at position). A backend may record ops() once per
  // context-length bucket and replay the recording for later steps (CUDA graphs). ops() must then depend
  // on token and position only through the embedding, rope, kv_write and attention ops of one row, must
  // not read anything back to the host, and must touch the same buffers each time: call
  // reset_step_recordings() when a buffer it uses is reallocated. Default: runs ops().
  virtual void decode_step(int32_t token, int64_t position, const std::function<void()>& ops) {
    (void)token, (void)position;
    ops();
  }
  virtual void reset_step_recordings() {}
};

}  // namespace moex
