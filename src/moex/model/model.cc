#include "moex/model/model.h"

#include <filesystem>

#include "moex/core/error.h"
#include "moex/io/hf_config.h"
#include "moex/model/registry.h"

namespace moex {

std::unique_ptr<Model> Model::load(const std::string& dir, const LoadOptions& options) {
  namespace fs = std::filesystem;
  if (!fs::exists(dir)) throw IoError(fmt::format("{}: model directory does not exist", dir));
  if (!fs::is_directory(dir)) throw IoError(fmt::format("{}: not a directory (expected a Hugging Face model directory)", dir));
  auto model = std::unique_ptr<Model>(new Model());
  model->dir_ = dir;
  HfConfig hf = HfConfig::load(dir + "/config.json");
  model->config_ = parse_model_config(hf);
  switch (options.format) {
    case LoadFormat::kSafetensors:
      model->checkpoint_ = Checkpoint::open(dir);
      model->weights_ = load_checkpoint_weights(*model->checkpoint_, model->config_, options.pack_experts);
      break;
    case LoadFormat::kRandom:
      model->weights_ = make_random_weights(model->config_, options.seed, options.pack_experts);
      break;
  }
  return model;
}

}  // namespace moex
