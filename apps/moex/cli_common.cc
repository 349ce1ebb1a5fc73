#include "cli_common.h"

#include <cstdlib>
#include <filesystem>

#include "moex/core/error.h"

namespace moex::cli {

void add_model_options(CLI::App* sub, ModelOptions* options, bool model_required) {
  auto* model = sub->add_option("-m,--model", options->model_dir,
                                "Hugging Face model directory (config.json + *.safetensors + tokenizer files)");
  if (model_required) model->required();
  else model->description("Hugging Face model directory; default: the embedded default model");
  sub->add_option("--load-format", options->load_format,
                  "safetensors: read the checkpoint; random: random weights at config.json's shapes (benchmarks)")
      ->check(CLI::IsMember({"safetensors", "random"}));
  sub->add_option("--device", options->device, "cpu or cuda")->check(CLI::IsMember({"cpu", "cuda"}));
  sub->add_option("--threads", options->num_threads, "CPU threads (0: all)")->check(CLI::NonNegativeNumber);
}

std::string default_model_dir() {
  if (const char* env = std::getenv("MOEX_DEFAULT_MODEL")) return env;
  namespace fs = std::filesystem;
  const fs::path root = MOEX_SOURCE_DIR;
  if (fs::exists(root / "models/default/config.json")) return (root / "models/default").string();
  return (root / "tests/fixtures/mixtral").string();
}

std::unique_ptr<Model> load_model(const ModelOptions& options) {
  LoadOptions load;
  load.format = options.load_format == "random" ? LoadFormat::kRandom : LoadFormat::kSafetensors;
  load.seed = options.random_seed;
  return Model::load(options.model_dir.empty() ? default_model_dir() : options.model_dir, load);
}

EngineOptions engine_options(const ModelOptions& options) {
  EngineOptions engine;
  engine.device = options.device;
  engine.num_threads = options.num_threads;
  return engine;
}

std::vector<int32_t> parse_id_list(const std::string& text, const std::string& flag) {
  std::vector<int32_t> ids;
  size_t pos = 0;
  if (text.find_first_not_of(" \t") == std::string::npos)
    throw UsageError(fmt::format("{}: empty list; expected comma-separated token ids like 1,2,3", flag));
  while (pos <= text.size()) {
    size_t comma = text.find(',', pos);
    std::string item = text.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
    size_t begin = item.find_first_not_of(" \t"), end = item.find_last_not_of(" \t");
    item = begin == std::string::npos ? "" : item.substr(begin, end - begin + 1);
    char* parse_end = nullptr;
    errno = 0;
    long long value = item.empty() ? 0 : std::strtoll(item.c_str(), &parse_end, 10);
    if (item.empty() || *parse_end != '\0' || errno != 0 || value < 0 || value > INT32_MAX)
      throw UsageError(fmt::format("{}: \"{}\" is not a comma-separated list of token ids (bad item \"{}\")", flag,
                                   text, item));
    ids.push_back(static_cast<int32_t>(value));
    if (comma == std::string::npos) break;
    pos = comma + 1;
  }
  return ids;
}

}  // namespace moex::cli
