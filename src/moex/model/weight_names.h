// Checkpoint tensor names for each canonical weight role. A family fills one WeightNames; patterns
// use {L} for the layer index and {E} for the expert index.
#pragma once

#include <string>
#include <utility>
#include <vector>

namespace moex {

struct WeightNames {
  std::string embed = "model.embed_tokens.weight";
  std::string final_norm = "model.norm.weight";
  std::string lm_head = "lm_head.weight";

  std::string attn_norm = "model.layers.{L}.input_layernorm.weight";
  std::string ffn_norm = "model.layers.{L}.post_attention_layernorm.weight";
  std::string q_proj = "model.layers.{L}.self_attn.q_proj.weight";
  std::string k_proj = "model.layers.{L}.self_attn.k_proj.weight";
  std::string v_proj = "model.layers.{L}.self_attn.v_proj.weight";
  std::string o_proj = "model.layers.{L}.self_attn.o_proj.weight";
  std::string q_bias = "model.layers.{L}.self_attn.q_proj.bias";  // loaded when present
  std::string k_bias = "model.layers.{L}.self_attn.k_proj.bias";
  std::string v_bias = "model.layers.{L}.self_attn.v_proj.bias";
  std::string q_norm = "model.layers.{L}.self_attn.q_norm.weight";
  std::string k_norm = "model.layers.{L}.self_attn.k_norm.weight";

  // Alternatives are tried in order: older and newer transformers name the same weights differently.
  std::vector<std::string> router = {"model.layers.{L}.mlp.gate.weight"};
  // Per-expert layouts, tried in order: {gate, up, down} name triples.
  std::vector<std::vector<std::string>> expert_layouts = {
      {"model.layers.{L}.mlp.experts.{E}.gate_proj.weight", "model.layers.{L}.mlp.experts.{E}.up_proj.weight",
       "model.layers.{L}.mlp.experts.{E}.down_proj.weight"}};
  // Fused layout (transformers 5): {gate_up, down}; gate_up [E, 2*ffn, hidden] (gate rows first),
  // down [E, hidden, ffn]. The transposed orientation ([E, hidden, 2*ffn]) is accepted too.
  std::vector<std::pair<std::string, std::string>> fused_experts = {
      {"model.layers.{L}.mlp.experts.gate_up_proj", "model.layers.{L}.mlp.experts.down_proj"}};

  std::string shared_gate_proj = "model.layers.{L}.mlp.shared_expert.gate_proj.weight";
  std::string shared_up_proj = "model.layers.{L}.mlp.shared_expert.up_proj.weight";
  std::string shared_down_proj = "model.layers.{L}.mlp.shared_expert.down_proj.weight";
  std::string shared_expert_gate = "model.layers.{L}.mlp.shared_expert_gate.weight";

  std::string dense_gate_proj = "model.layers.{L}.mlp.gate_proj.weight";
  std::string dense_up_proj = "model.layers.{L}.mlp.up_proj.weight";
  std::string dense_down_proj = "model.layers.{L}.mlp.down_proj.weight";

  // Fills {L} and {E}.
  static std::string format(const std::string& pattern, int64_t layer_idx, int64_t expert_idx = -1);
};

}  // namespace moex
