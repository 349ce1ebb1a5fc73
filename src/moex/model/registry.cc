#include "moex/model/registry.h"

#include "moex/core/error.h"
#include "moex/io/hf_config.h"

namespace moex {
namespace arch {
ArchSpec mixtral();
ArchSpec qwen2_moe();
ArchSpec qwen3_moe();
ArchSpec olmoe();
}  // namespace arch

const std::vector<ArchEntry>& arch_registry() {
  static const std::vector<ArchEntry> kRegistry = {
      {"MixtralForCausalLM", arch::mixtral},
      {"Qwen2MoeForCausalLM", arch::qwen2_moe},
      {"Qwen3MoeForCausalLM", arch::qwen3_moe},
      {"OlmoeForCausalLM", arch::olmoe},
  };
  return kRegistry;
}

ArchSpec find_arch(const HfConfig& hf) {
  std::vector<std::string> names = hf.get_string_list("architectures");
  if (names.empty())
    throw FormatError(fmt::format("{}: field \"architectures\" is missing; it names the model class, e.g. "
                                  "[\"MixtralForCausalLM\"]",
                                  hf.source()));
  std::string supported;
  for (const ArchEntry& entry : arch_registry()) {
    for (const std::string& name : names)
      if (name == entry.hf_architecture) return entry.spec();
    supported += supported.empty() ? "" : ", ";
    supported += entry.hf_architecture;
  }
  throw FormatError(fmt::format("{}: unknown architecture \"{}\"; moex supports {}", hf.source(), names.front(),
                                supported));
}

ModelConfig parse_model_config(const HfConfig& hf) {
  ArchSpec spec = find_arch(hf);
  ModelConfig cfg = spec.parse_config(hf);
  cfg.architecture = hf.get_string_list("architectures").front();
  cfg.family = spec.family;
  cfg.validate(hf.source());
  return cfg;
}

}  // namespace moex
