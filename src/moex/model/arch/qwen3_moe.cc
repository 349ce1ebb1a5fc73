// Qwen3-MoE (Qwen3MoeForCausalLM): per-head RMSNorm on q and k before RoPE, explicit head_dim, no
// shared expert, norm_topk_prob from config.
#include "moex/model/arch/qwen_moe_common.h"
#include "moex/model/registry.h"

namespace moex::arch {
namespace {

ModelConfig parse_config(const HfConfig& hf) {
  ModelConfig cfg;
  parse_common_config(hf, &cfg);
  parse_qwen_moe_layers(hf, &cfg);
  cfg.qk_norm = QkNorm::kPerHead;
  return cfg;
}

WeightNames weight_names() { return WeightNames{}; }

}  // namespace

ArchSpec qwen3_moe() { return {"qwen3_moe", parse_config, weight_names}; }

}  // namespace moex::arch
