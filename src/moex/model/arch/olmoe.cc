// OLMoE (OlmoeForCausalLM): RMSNorm over the whole q and k projections (not per head), optional
// clip_qkv clamping after the norms, every layer MoE, norm_topk_prob usually false.
#include "moex/core/error.h"
#include "moex/io/hf_config.h"
#include "moex/model/registry.h"

namespace moex::arch {
namespace {

ModelConfig parse_config(const HfConfig& hf) {
  ModelConfig cfg;
  parse_common_config(hf, &cfg);
  cfg.num_experts = hf.get_int("num_experts");
  cfg.top_k = hf.get_int("num_experts_per_tok");
  cfg.expert_ffn_size = hf.get_int("intermediate_size");
  cfg.norm_topk_prob = hf.get_bool("norm_topk_prob", false);
  cfg.qk_norm = QkNorm::kFull;
  cfg.layer_is_moe.assign(cfg.num_layers, 1);
  return cfg;
}

WeightNames weight_names() { return WeightNames{}; }

}  // namespace

ArchSpec olmoe() { return {"olmoe", parse_config, weight_names}; }

}  // namespace moex::arch
