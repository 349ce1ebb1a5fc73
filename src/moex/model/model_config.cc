#include "moex/model/model_config.h"

#include "moex/core/error.h"
#include "moex/io/hf_config.h"

namespace moex {

int64_t ModelConfig::num_moe_layers() const {
  int64_t count = 0;
  for (uint8_t is_moe : layer_is_moe) count += is_moe;
  return count;
}

size_t ModelConfig::expert_bytes() const {
  return static_cast<size_t>(3 * hidden_size * expert_ffn_size) * dtype_size(weight_dtype);
}

namespace {
void require_positive(const std::string& source, const char* field, int64_t value) {
  if (value <= 0) throw FormatError(fmt::format("{}: field \"{}\" must be positive, found {}", source, field, value));
}
}  // namespace

void ModelConfig::validate(const std::string& source) const {
  require_positive(source, "vocab_size", vocab_size);
  require_positive(source, "hidden_size", hidden_size);
  require_positive(source, "num_hidden_layers", num_layers);
  require_positive(source, "num_attention_heads", num_heads);
  require_positive(source, "num_key_value_heads", num_kv_heads);
  require_positive(source, "head_dim", head_dim);
  if (num_heads % num_kv_heads != 0)
    throw FormatError(fmt::format("{}: num_attention_heads ({}) is not a multiple of num_key_value_heads ({})", source,
                                  num_heads, num_kv_heads));
  if (rotary_dim <= 0 || rotary_dim > head_dim || rotary_dim % 2 != 0)
    throw FormatError(fmt::format("{}: rotary dimension {} must be even and within head_dim {}", source, rotary_dim,
                                  head_dim));
  if (rope_theta <= 0) throw FormatError(fmt::format("{}: rope_theta must be positive, found {}", source, rope_theta));
  if (rms_norm_eps <= 0) throw FormatError(fmt::format("{}: rms_norm_eps must be positive, found {}", source, rms_norm_eps));
  if (static_cast<int64_t>(layer_is_moe.size()) != num_layers)
    throw FormatError(fmt::format("{}: {} layer kinds for {} layers", source, layer_is_moe.size(), num_layers));
  if (num_moe_layers() > 0) {
    require_positive(source, "num_experts", num_experts);
    require_positive(source, "num_experts_per_tok", top_k);
    require_positive(source, "expert intermediate size", expert_ffn_size);
    if (top_k > num_experts)
      throw FormatError(fmt::format("{}: num_experts_per_tok ({}) exceeds the number of experts ({})", source, top_k,
                                    num_experts));
  }
  if (num_moe_layers() < num_layers) require_positive(source, "intermediate_size", dense_ffn_size);
  if (clip_qkv < 0) throw FormatError(fmt::format("{}: clip_qkv must be positive, found {}", source, clip_qkv));
}

std::string ModelConfig::summary() const {
  return fmt::format(
      "{} ({}): {} layers ({} MoE), hidden {}, {} heads / {} kv x {}, {} experts top-{} ffn {}{}, vocab {}, {}",
      architecture, family, num_layers, num_moe_layers(), hidden_size, num_heads, num_kv_heads, head_dim, num_experts,
      top_k, expert_ffn_size, shared_expert_ffn_size ? fmt::format(" + shared {}", shared_expert_ffn_size) : "",
      vocab_size, dtype_name(weight_dtype));
}

void parse_common_config(const HfConfig& hf, ModelConfig* cfg) {
  cfg->vocab_size = hf.get_int("vocab_size");
  cfg->hidden_size = hf.get_int("hidden_size");
  cfg->num_layers = hf.get_int("num_hidden_layers");
  cfg->num_heads = hf.get_int("num_attention_heads");
  cfg->num_kv_heads = hf.get_int("num_key_value_heads", cfg->num_heads);
  if (cfg->num_heads <= 0) require_positive(hf.source(), "num_attention_heads", cfg->num_heads);
  cfg->head_dim = hf.get_int("head_dim", cfg->hidden_size / cfg->num_heads);
  cfg->max_position_embeddings = hf.get_int("max_position_embeddings", 4096);
  cfg->rms_norm_eps = hf.get_double("rms_norm_eps", 1e-6);
  cfg->tie_word_embeddings = hf.get_bool("tie_word_embeddings", false);
  cfg->rotary_dim = cfg->head_dim;

  // transformers 5 writes rope_parameters {"rope_theta", "rope_type"}; 4.x wrote rope_theta at top level
  // and sometimes rope_scaling. Only plain (default) RoPE is supported so far.
  bool found_theta = false;
  for (const char* nested : {"rope_parameters", "rope_scaling"}) {
    auto rope = hf.get_object(nested);
    if (!rope) continue;
    std::string type = rope->get_string("rope_type", rope->get_string("type", "default"));
    if (type != "default")
      throw FormatError(fmt::format("{}: {}.rope_type \"{}\" is not supported (moex supports default RoPE)",
                                    hf.source(), nested, type));
    if (rope->has("rope_theta")) {
      cfg->rope_theta = rope->get_double("rope_theta");
      found_theta = true;
    }
    if (rope->has("partial_rotary_factor"))
      cfg->rotary_dim = static_cast<int64_t>(cfg->head_dim * rope->get_double("partial_rotary_factor"));
  }
  if (hf.has("rope_theta")) {
    cfg->rope_theta = hf.get_double("rope_theta");
    found_theta = true;
  }
  if (!found_theta) cfg->rope_theta = 10000.0;  // transformers' default when the field is absent

  // The generic decoder's MLPs and experts are SwiGLU: every family shares this limit.
  std::string act = hf.get_string("hidden_act", "silu");
  if (act != "silu") throw FormatError(fmt::format("{}: hidden_act \"{}\" is not supported (silu)", hf.source(), act));

  cfg->clip_qkv = hf.get_double("clip_qkv", 0.0);
  cfg->bos_token_id = hf.get_int("bos_token_id", -1);
  cfg->eos_token_ids = hf.get_int_list("eos_token_id");

  std::string dtype = hf.get_string("torch_dtype", hf.get_string("dtype", "bfloat16"));
  if (dtype == "bfloat16") cfg->weight_dtype = DType::kBF16;
  else if (dtype == "float16") cfg->weight_dtype = DType::kF16;
  else if (dtype == "float32") cfg->weight_dtype = DType::kF32;
  else
    throw FormatError(fmt::format("{}: torch_dtype \"{}\" is not supported (bfloat16, float16, float32)", hf.source(),
                                  dtype));
}

}  // namespace moex
