#include "cli_common.h"

#include <cmath>
#include <cstdlib>
#include <filesystem>

#include "moex/core/error.h"
#include "moex/moe/offload_provider.h"

namespace moex::cli {
namespace {

CLI::Validator number_check(bool zero_allowed) {
  return CLI::Validator(
      [zero_allowed](std::string& input) -> std::string {
        char* end = nullptr;
        const double value = std::strtod(input.c_str(), &end);
        const bool number = !input.empty() && end && *end == '\0' && std::isfinite(value);
        if (number && (zero_allowed ? value >= 0 : value > 0)) return {};
        return fmt::format("\"{}\" is not a number {}", input, zero_allowed ? ">= 0" : "> 0");
      },
      zero_allowed ? "NONNEGATIVE" : "POSITIVE");
}

}  // namespace

const CLI::Validator& positive_number() {
  static const CLI::Validator validator = number_check(false);
  return validator;
}

const CLI::Validator& non_negative_number() {
  static const CLI::Validator validator = number_check(true);
  return validator;
}

void add_model_options(CLI::App* sub, ModelOptions* options, bool model_required) {
  auto* model = sub->add_option("-m,--model", options->model_dir,
                                "Hugging Face model directory (config.json + *.safetensors + tokenizer files)");
  if (model_required) model->required();
  else model->description("Hugging Face model directory; default: the embedded default model");
  sub->add_option("--load-format", options->load_format,
                  "safetensors: read the checkpoint; random: random weights at config.json's shapes (benchmarks)")
      ->check(CLI::IsMember({"safetensors", "random"}));
  sub->add_option("--device", options->device, "cpu or cuda")->check(CLI::IsMember({"cpu", "cuda"}));
  sub->add_option("--threads", options->num_threads, "CPU threads (0: all)")->check(non_negative_number());
  sub->add_option("--host-memory", options->host_memory,
                  "offload experts on the CPU backend: RAM for experts read from disk, e.g. 8GiB (default: all resident)");
  sub->add_option("--gpu-memory", options->gpu_memory,
                  "offload experts with --device cuda: bound on everything moex puts on the GPU, e.g. 16GiB (the token "
                  "embedding then stays in host memory, read a row at a time)");
  sub->add_option("--gpu-reserve", options->gpu_reserve,
                  "with --gpu-memory: the part kept from experts for the KV cache, activations and scratch (default "
                  "1GiB; a short context needs less: moex bench --json reports what the run held, gpu_memory)");
  sub->add_option("--cache-policy", options->cache_policy, "expert cache eviction policy when offloading")
      ->check(CLI::IsMember({"lru", "lfu", "activation"}));
  sub->add_option("--predictor", options->predictor,
                  "expert predictor that drives prefetch when offloading: none, pregate (next layers' routers on the "
                  "current hidden state), affinity, eam, bayes (earlier layers and the previous token), frequency, "
                  "stride")
      ->check(CLI::IsMember({"none", "pregate", "frequency", "stride", "recency", "affinity", "eam", "bayes"}));
  sub->add_option("--lookahead-layers", options->lookahead_layers, "MoE layers ahead that prefetch covers")
      ->check(positive_number());
  sub->add_flag("--cpu-experts", options->cpu_experts,
                "with --gpu-memory: run missed experts on the host CPU where that beats copying them over PCIe");
  sub->add_option("--host-read-gbs", options->host_read_gbs,
                  "host DRAM read bandwidth for --cpu-experts' cost model (the starting estimate with --adapt-rates)")
      ->check(positive_number());
  sub->add_option("--copy-gbs", options->copy_gbs,
                  "pinned host-to-GPU bandwidth for --cpu-experts' cost model (the starting estimate with --adapt-rates)")
      ->check(positive_number());
  sub->add_option("--split-overhead-ms", options->split_overhead_ms,
                  "with --cpu-experts: what splitting a missed expert between the CPU and the link costs beyond its "
                  "bytes (ms); a large value turns splitting off (default: 0.1 for experts of 64 MiB or more, 0.5 "
                  "below)")
      ->check(non_negative_number());
  auto* balance = sub->add_flag("--balance-prefetch", options->balance_prefetch,
                                "with --cpu-experts and --predictor: skip prefetches while the link has more work "
                                "booked than the CPU (the default with --cpu-experts)");
  sub->add_flag("--no-balance-prefetch", options->no_balance_prefetch,
                "with --cpu-experts: prefetch every predicted expert, whatever the CPU's share")
      ->excludes(balance);
  sub->add_flag("--adapt-rates", options->adapt_rates,
                "with --cpu-experts: measure the CPU and link rates while running and let the cost model use "
                "them, from --host-read-gbs and --copy-gbs on (experimental: docs/offloading.md)");
  auto* scan = sub->add_flag("--scan-steps", options->scan_steps,
                             "when offloading: treat prefill steps that touch nearly every expert as scans, streamed "
                             "through a few slots while the rest of the cache stays across prompts (the default for "
                             "experts of 64 MiB or more; docs/offloading.md)");
  sub->add_flag("--no-scan-steps", options->no_scan_steps,
                "when offloading: run prefill steps through the cache policy like decode steps, in as few waves as "
                "fit (the default for experts under 64 MiB)")
      ->excludes(scan);
  sub->add_flag("--pack-experts", options->pack_experts,
                "when offloading: hold the experts in host memory in a lossless 12-bit packing (bf16 experts), so a "
                "missed expert reads ~3/4 of its bytes, copied (the GPU unpacks it) or run on the CPU; packing "
                "takes a pass over the experts at load. For large experts (Mixtral-8x7B's: 1.18-1.28x measured "
                "with --cpu-experts on AVX-512 hosts); small ones (Qwen3-30B-A3B's 9 MB) gain nothing "
                "(docs/offloading.md)");
  sub->add_flag("--per-layer-cache", options->per_layer_cache,
                "split the expert budget evenly over MoE layers instead of one global cache");
  for (const char* name : {"--cache-policy", "--per-layer-cache", "--predictor", "--lookahead-layers", "--scan-steps",
                           "--no-scan-steps", "--host-read-gbs", "--copy-gbs", "--split-overhead-ms",
                           "--no-balance-prefetch", "--pack-experts"})
    options->offload_only.push_back(sub->get_option(name));
}

std::string default_model_dir() {
  if (const char* env = std::getenv("MOEX_DEFAULT_MODEL")) return env;
  namespace fs = std::filesystem;
  const fs::path root = MOEX_SOURCE_DIR;
  if (fs::exists(root / "models/default/config.json")) return (root / "models/default").string();
  return (root / "tests/fixtures/mixtral").string();
}

std::string resolved_model_dir(const ModelOptions& options) {
  return options.model_dir.empty() ? default_model_dir() : options.model_dir;
}

std::unique_ptr<Tokenizer> load_tokenizer_if_present(const std::string& model_dir) {
  namespace fs = std::filesystem;
  if (!fs::exists(fs::path(model_dir) / "tokenizer.json") && !fs::exists(fs::path(model_dir) / "tokenizer.model"))
    return nullptr;
  return std::make_unique<Tokenizer>(Tokenizer::from_dir(model_dir));
}

std::unique_ptr<Model> load_model(const ModelOptions& options) {
  // Before the load, which can take minutes (a checkpoint's read, --pack-experts' packing pass) for nothing.
  if (options.host_memory.empty() && options.gpu_memory.empty())
    for (const CLI::Option* flag : options.offload_only)
      if (flag->count() > 0)
        throw UsageError(fmt::format("{} applies when offloading experts: add --gpu-memory (with --device cuda) or "
                                     "--host-memory (on the CPU)",
                                     flag->get_name()));
  LoadOptions load;
  load.format = options.load_format == "random" ? LoadFormat::kRandom : LoadFormat::kSafetensors;
  load.seed = options.random_seed;
  load.pack_experts = options.pack_experts;
  return Model::load(resolved_model_dir(options), load);
}

EngineOptions engine_options(const ModelOptions& options, const ModelConfig& config) {
  EngineOptions engine;
  engine.device = options.device;
  engine.num_threads = options.num_threads;
  engine.cache_policy = options.cache_policy;
  engine.per_layer_cache = options.per_layer_cache;
  engine.predictor = options.predictor;
  engine.lookahead_layers = options.lookahead_layers;
  engine.cpu_experts = options.cpu_experts;
  engine.host_read_gbs = options.host_read_gbs;
  engine.split_overhead_ms = options.split_overhead_ms;
  engine.balance_prefetch = !options.no_balance_prefetch;
  engine.adapt_rates = options.adapt_rates;
  if (options.scan_steps) engine.scan_steps = true;
  if (options.no_scan_steps) engine.scan_steps = false;
  if (options.balance_prefetch && (!options.cpu_experts || options.predictor == "none"))
    throw UsageError("--balance-prefetch weighs prefetches against CPU work: it needs --cpu-experts and --predictor");
  if (options.adapt_rates && !options.cpu_experts)
    throw UsageError("--adapt-rates measures the rates of --cpu-experts' cost model: it needs --cpu-experts");
  engine.copy_gbs = options.copy_gbs;
  if (options.cpu_experts && options.gpu_memory.empty())
    throw UsageError("--cpu-experts needs --device cuda and --gpu-memory (it decides copy vs CPU per missed expert)");
  if (!options.host_memory.empty()) {
    if (options.device != "cpu")
      throw UsageError("--host-memory bounds the CPU backend's expert RAM; with --device cuda use --gpu-memory");
    engine.expert_budget_bytes = parse_byte_size(options.host_memory, "--host-memory");
  }
  if (!options.gpu_reserve.empty() && options.gpu_memory.empty())
    throw UsageError("--gpu-reserve is part of the --gpu-memory budget: add --gpu-memory");
  if (!options.gpu_memory.empty()) {
    if (options.device != "cuda") throw UsageError("--gpu-memory needs --device cuda");
    const int64_t total = parse_byte_size(options.gpu_memory, "--gpu-memory");
    // Leave room for the resident weights and a working reserve (KV cache, activations, cuBLAS workspace).
    const int64_t reserve =
        options.gpu_reserve.empty() ? int64_t{1} << 30 : parse_byte_size(options.gpu_reserve, "--gpu-reserve");
    const int64_t resident = Engine::resident_weight_bytes(config, /*offloading=*/true);
    engine.expert_budget_bytes = total - resident - reserve;
    if (engine.expert_budget_bytes <= 0)
      throw UsageError(fmt::format("--gpu-memory {}: the model's resident weights need {:.2f} GiB plus a {:.2f} GiB "
                                   "reserve (--gpu-reserve), which leaves nothing for experts",
                                   options.gpu_memory, resident / 1073741824.0, reserve / 1073741824.0));
  }
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
