// The registry of model families: the only list of supported architectures. Adding a family is one
// file in arch/ plus one line in registry.cc.
#pragma once

#include <string>
#include <vector>

#include "moex/model/model_config.h"
#include "moex/model/weight_names.h"

namespace moex {

class HfConfig;

struct ArchSpec {
  const char* family;
  // Maps and validates config.json; throws FormatError naming the field.
  ModelConfig (*parse_config)(const HfConfig& hf);
  // Checkpoint names for this family.
  WeightNames (*weight_names)();
};

struct ArchEntry {
  const char* hf_architecture;  // the value in config.json "architectures"
  ArchSpec (*spec)();
};

const std::vector<ArchEntry>& arch_registry();
// Looks up config.json's "architectures"/"model_type"; throws FormatError listing the supported ones.
ArchSpec find_arch(const HfConfig& hf);
// Parses config.json through its family: the one entry point model loading uses.
ModelConfig parse_model_config(const HfConfig& hf);

}  // namespace moex
