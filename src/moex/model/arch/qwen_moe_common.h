// Layer-kind rule shared by Qwen2-MoE and Qwen3-MoE: a layer is MoE unless listed in mlp_only_layers,
// and only every decoder_sparse_step-th layer is sparse.
#pragma once

#include "moex/core/error.h"
#include "moex/io/hf_config.h"
#include "moex/model/model_config.h"

namespace moex::arch {

inline void parse_qwen_moe_layers(const HfConfig& hf, ModelConfig* cfg) {
  // Hub checkpoints say num_experts; transformers 5 writes Qwen3-MoE's as num_local_experts.
  cfg->num_experts = hf.has("num_experts") ? hf.get_int("num_experts") : hf.get_int("num_local_experts");
  cfg->top_k = hf.get_int("num_experts_per_tok");
  cfg->expert_ffn_size = hf.get_int("moe_intermediate_size");
  cfg->dense_ffn_size = hf.get_int("intermediate_size", 0);
  cfg->norm_topk_prob = hf.get_bool("norm_topk_prob", false);
  int64_t sparse_step = hf.get_int("decoder_sparse_step", 1);
  if (sparse_step <= 0)
    throw FormatError(fmt::format("{}: decoder_sparse_step must be positive, found {}", hf.source(), sparse_step));
  std::vector<int64_t> mlp_only = hf.get_int_list("mlp_only_layers");
  cfg->layer_is_moe.assign(cfg->num_layers, 0);
  for (int64_t layer_idx = 0; layer_idx < cfg->num_layers; ++layer_idx) {
    bool dense = false;
    for (int64_t idx : mlp_only) dense |= idx == layer_idx;
    cfg->layer_is_moe[layer_idx] = !dense && cfg->num_experts > 0 && (layer_idx + 1) % sparse_step == 0;
  }
}

}  // namespace moex::arch
