// Options and helpers shared by the subcommands that load a model.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "moex/model/model.h"
#include "moex/runtime/engine.h"
#include "moex/tokenizer/tokenizer.h"

namespace moex::cli {

// CLI11's PositiveNumber and NonNegativeNumber with an error that says what is expected: theirs print the whole
// range of a double ("not in range 0.000000 to 1797693...") for a floating-point option.
const CLI::Validator& positive_number();
const CLI::Validator& non_negative_number();

struct ModelOptions {
  std::string model_dir;          // empty: the embedded default model
  std::string load_format = "safetensors";
  uint64_t random_seed = 0;
  std::string device = "cpu";
  int num_threads = 0;
  std::string host_memory;   // expert budget on the CPU backend (disk -> host RAM tier)
  std::string gpu_memory;    // everything moex puts on the GPU (CUDA)
  std::string gpu_reserve;   // of gpu_memory, what is kept from experts for the KV cache and scratch (empty: 1 GiB)
  std::string cache_policy = "lru";
  bool per_layer_cache = false;
  std::string predictor = "none";
  int32_t lookahead_layers = 1;
  bool cpu_experts = false;
  double host_read_gbs = 100.0;
  double copy_gbs = 50.0;
  double split_overhead_ms = -1;  // < 0: by expert size (OffloadConfig::split_overhead_ms)
  bool balance_prefetch = false;     // asked for explicitly (it is the default with --cpu-experts)
  bool no_balance_prefetch = false;
  bool adapt_rates = false;
  bool scan_steps = false;     // neither flag: by expert size (OffloadConfig::scan_steps)
  bool no_scan_steps = false;
  bool pack_experts = false;   // hold offloaded experts in the 12-bit packing in host memory
  // The flags that only shape offloading (cache, predictor, miss-path cost model): given without --gpu-memory
  // or --host-memory they would do nothing, so load_model() refuses them (before loading). Owned by the CLI app.
  std::vector<const CLI::Option*> offload_only;
};

// Declares -m, --load-format, --device, --threads on sub.
void add_model_options(CLI::App* sub, ModelOptions* options, bool model_required);
// The embedded default model's directory (models/default, else the Mixtral test fixture).
std::string default_model_dir();
// The model the flags name; first refuses offloading-only flags given without an expert budget (UsageError).
std::unique_ptr<Model> load_model(const ModelOptions& options);
// Engine options from the flags; the model's config sizes the GPU expert budget. Throws UsageError for
// bad sizes or a budget that leaves no room for experts.
EngineOptions engine_options(const ModelOptions& options, const ModelConfig& config);
// The model directory's tokenizer, or nullptr when it ships none (tokenizer.json / tokenizer.model).
std::unique_ptr<Tokenizer> load_tokenizer_if_present(const std::string& model_dir);
// The directory a ModelOptions resolves to (the default model when -m is absent).
std::string resolved_model_dir(const ModelOptions& options);

// Parses "1,2,3" (spaces allowed); throws UsageError naming the flag and the bad item.
std::vector<int32_t> parse_id_list(const std::string& text, const std::string& flag);

}  // namespace moex::cli
