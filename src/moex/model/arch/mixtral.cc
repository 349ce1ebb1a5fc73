// Mixtral (MixtralForCausalLM): every layer MoE, softmax router, top-k renormalised, no shared expert.
#include "moex/core/error.h"
#include "moex/io/hf_config.h"
#include "moex/model/registry.h"

namespace moex::arch {
namespace {

// (1) config.json -> ModelConfig
ModelConfig parse_config(const HfConfig& hf) {
  ModelConfig cfg;
  parse_common_config(hf, &cfg);
  cfg.num_experts = hf.get_int("num_local_experts");
  cfg.top_k = hf.get_int("num_experts_per_tok");
  cfg.expert_ffn_size = hf.get_int("intermediate_size");
  cfg.norm_topk_prob = true;  // Mixtral always renormalises the top-k weights
  cfg.layer_is_moe.assign(cfg.num_layers, 1);
  return cfg;
}

// (2) checkpoint names: the original per-expert w1/w3/w2 layout and transformers 5's mlp.* names.
WeightNames weight_names() {
  WeightNames names;
  names.router = {"model.layers.{L}.block_sparse_moe.gate.weight", "model.layers.{L}.mlp.gate.weight"};
  names.expert_layouts = {
      {"model.layers.{L}.block_sparse_moe.experts.{E}.w1.weight", "model.layers.{L}.block_sparse_moe.experts.{E}.w3.weight",
       "model.layers.{L}.block_sparse_moe.experts.{E}.w2.weight"},
      {"model.layers.{L}.mlp.experts.{E}.gate_proj.weight", "model.layers.{L}.mlp.experts.{E}.up_proj.weight",
       "model.layers.{L}.mlp.experts.{E}.down_proj.weight"},
      {"model.layers.{L}.mlp.experts.{E}.w1.weight", "model.layers.{L}.mlp.experts.{E}.w3.weight",
       "model.layers.{L}.mlp.experts.{E}.w2.weight"}};
  names.fused_experts = {
      {"model.layers.{L}.mlp.experts.gate_up_proj", "model.layers.{L}.mlp.experts.down_proj"},
      {"model.layers.{L}.block_sparse_moe.experts.gate_up_proj", "model.layers.{L}.block_sparse_moe.experts.down_proj"}};
  return names;
}

}  // namespace

// (3) layer recipe: pre-norm GQA attention with RoPE, then the MoE block; nothing family-specific
// beyond the config, so the generic decoder runs it as is.
ArchSpec mixtral() { return {"mixtral", parse_config, weight_names}; }

}  // namespace moex::arch
