// Host-side weights of a model, by canonical role: zero-copy views into the checkpoint's mmap, or
// random tensors for benchmarks at real shapes (--load-format random). Small vectors (norms, biases)
// are converted to fp32 at load so that every backend sees one dtype for them.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "moex/backend/backend.h"
#include "moex/core/tensor.h"
#include "moex/io/checkpoint.h"
#include "moex/model/model_config.h"

namespace moex {

struct LayerWeights {
  TensorView attn_norm, ffn_norm;                 // fp32 [hidden]
  TensorView q_proj, k_proj, v_proj, o_proj;      // [heads*head_dim, hidden] ... [hidden, heads*head_dim]
  TensorView q_bias, k_bias, v_bias;              // fp32, empty when the family has none
  TensorView q_norm, k_norm;                      // fp32 [head_dim] or [heads*head_dim]; empty without qk norm
  bool is_moe = false;
  int32_t moe_layer_idx = -1;                     // index among MoE layers
  TensorView router;                              // [num_experts, hidden]
  std::vector<ExpertWeights> experts;             // [num_experts], host views
  ExpertWeights shared_expert;                    // Qwen2-MoE; invalid when absent
  TensorView shared_expert_gate;                  // [1, hidden]
  ExpertWeights dense_mlp;                        // dense layers
};

struct ModelWeights {
  TensorView embed;     // [vocab, hidden]
  TensorView final_norm;
  TensorView lm_head;   // [vocab, hidden]; the embedding when tied
  std::vector<LayerWeights> layers;
  std::vector<HostTensor> owned;  // storage for converted / random tensors
  // MoE experts held in the 12-bit packing (LoadOptions::pack_experts), pointed to by their ExpertWeights::packed.
  std::vector<std::shared_ptr<const PackedExpert>> packed;
};

enum class LoadFormat : uint8_t { kSafetensors, kRandom };

// Loads every weight the config calls for, checking each tensor's shape and dtype; throws
// FormatError naming the tensor, its file, the expected and the found shape.
// pack_experts: the MoE experts (not shared experts or dense MLPs) are also packed (core/packed_bf16.h) for an
// offloading source tier; they must be bf16 (UsageError otherwise).
ModelWeights load_checkpoint_weights(const Checkpoint& ckpt, const ModelConfig& cfg, bool pack_experts = false);
// Random weights at the config's shapes (normal, std 0.02-ish scaled per fan-in), seeded; threaded fill.
// pack_experts: MoE experts are generated straight into the packing (their views keep shapes, data null), the
// same values as unpacked: the 8x7B shape's 90 GB of bf16 experts need not exist at once with their packing.
ModelWeights make_random_weights(const ModelConfig& cfg, uint64_t seed, bool pack_experts = false);

}  // namespace moex
