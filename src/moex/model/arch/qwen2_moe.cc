// Qwen2-MoE (Qwen2MoeForCausalLM): q/k/v biases, a shared expert scaled by sigmoid(shared_expert_gate),
// optional dense layers (mlp_only_layers, decoder_sparse_step), norm_topk_prob either way.
#include "moex/model/arch/qwen_moe_common.h"
#include "moex/model/registry.h"

namespace moex::arch {
namespace {

ModelConfig parse_config(const HfConfig& hf) {
  ModelConfig cfg;
  parse_common_config(hf, &cfg);
  parse_qwen_moe_layers(hf, &cfg);
  cfg.shared_expert_ffn_size = hf.get_int("shared_expert_intermediate_size", 0);
  cfg.shared_expert_gate = cfg.shared_expert_ffn_size > 0;
  return cfg;
}

WeightNames weight_names() { return WeightNames{}; }  // the defaults are Qwen2-MoE's names

}  // namespace

ArchSpec qwen2_moe() { return {"qwen2_moe", parse_config, weight_names}; }

}  // namespace moex::arch
