// ModelConfig: the canonical, architecture-neutral description of an MoE decoder. Each family file in
// arch/ maps its Hugging Face config.json onto it; the generic decoder reads only this.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "moex/backend/backend.h"
#include "moex/core/dtype.h"

namespace moex {

// Where attention applies RMSNorm to queries/keys before RoPE.
enum class QkNorm : uint8_t {
  kNone,
  kPerHead,  // Qwen3-MoE: RMSNorm(head_dim) on each head
  kFull,     // OLMoE: RMSNorm over the whole q / k projection
};

struct ModelConfig {
  std::string architecture;  // e.g. "MixtralForCausalLM"
  std::string family;        // e.g. "mixtral"
  DType weight_dtype = DType::kBF16;

  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t num_layers = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t max_position_embeddings = 0;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  int64_t rotary_dim = 0;
  QkNorm qk_norm = QkNorm::kNone;
  double clip_qkv = 0;  // 0: no clipping
  bool tie_word_embeddings = false;

  // Feed-forward: a layer is either dense (SwiGLU of dense_ffn_size) or MoE.
  int64_t dense_ffn_size = 0;
  int64_t num_experts = 0;
  int64_t top_k = 0;
  int64_t expert_ffn_size = 0;
  bool norm_topk_prob = true;
  RouterScoring router_scoring = RouterScoring::kSoftmax;
  int64_t shared_expert_ffn_size = 0;  // 0: no shared expert
  bool shared_expert_gate = false;     // Qwen2-MoE: sigmoid(x . w) scales the shared expert
  std::vector<uint8_t> layer_is_moe;   // [num_layers]

  int64_t bos_token_id = -1;
  std::vector<int64_t> eos_token_ids;

  int64_t num_moe_layers() const;
  // Bytes of one expert's weights (gate + up + down) in the checkpoint dtype.
  size_t expert_bytes() const;
  // Checks cross-field invariants (divisibility, top_k <= num_experts, ...); throws FormatError
  // naming `source` and the fields.
  void validate(const std::string& source) const;
  // One-line human summary for logs and --help output.
  std::string summary() const;
};

class HfConfig;

// Reads the fields every supported family shares (sizes, heads, RoPE, norms, ids, dtype, and the
// SwiGLU activation the decoder implements) into cfg.
// Accepts rope theta at top level or inside rope_parameters / rope_scaling.
void parse_common_config(const HfConfig& hf, ModelConfig* cfg);

}  // namespace moex
