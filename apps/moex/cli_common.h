// Options and helpers shared by the subcommands that load a model.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "moex/model/model.h"
#include "moex/runtime/engine.h"

namespace moex::cli {

struct ModelOptions {
  std::string model_dir;          // empty: the embedded default model
  std::string load_format = "safetensors";
  uint64_t random_seed = 0;
  std::string device = "cpu";
  int num_threads = 0;
};

// Declares -m, --load-format, --device, --threads on sub.
void add_model_options(CLI::App* sub, ModelOptions* options, bool model_required);
// The embedded default model's directory (models/default, else the Mixtral test fixture).
std::string default_model_dir();
std::unique_ptr<Model> load_model(const ModelOptions& options);
EngineOptions engine_options(const ModelOptions& options);

// Parses "1,2,3" (spaces allowed); throws UsageError naming the flag and the bad item.
std::vector<int32_t> parse_id_list(const std::string& text, const std::string& flag);

}  // namespace moex::cli
