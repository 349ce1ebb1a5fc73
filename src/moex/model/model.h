// A loaded model: its canonical config and host weights (plus the mapped checkpoint they point into).
#pragma once

#include <memory>
#include <string>

#include "moex/io/checkpoint.h"
#include "moex/model/model_config.h"
#include "moex/model/model_weights.h"

namespace moex {

struct LoadOptions {
  LoadFormat format = LoadFormat::kSafetensors;
  uint64_t seed = 0;  // for kRandom
  // Hold the MoE experts in the 12-bit packing (core/packed_bf16.h) for an offloading source tier
  // (--pack-experts); bf16 experts only.
  bool pack_experts = false;
};

class Model {
 public:
  // dir holds config.json (+ safetensors unless format is kRandom). Throws moex::Error subclasses
  // naming the file and field on any problem.
  static std::unique_ptr<Model> load(const std::string& dir, const LoadOptions& options = {});

  const ModelConfig& config() const { return config_; }
  const ModelWeights& weights() const { return weights_; }
  const std::string& dir() const { return dir_; }
  // True for --load-format random (no checkpoint behind the weights).
  bool random_weights() const { return checkpoint_ == nullptr; }
  // True when the MoE experts are held packed (LoadOptions::pack_experts): only an offloading engine runs them.
  bool packed_experts() const { return !weights_.packed.empty(); }

 private:
  std::string dir_;
  ModelConfig config_;
  std::unique_ptr<Checkpoint> checkpoint_;  // must outlive weights_' views
  ModelWeights weights_;
};

}  // namespace moex
