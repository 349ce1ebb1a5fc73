// `moex run`: generate from a prompt (text or ids) with greedy or sampled decoding, streaming tokens
// as they come; `--json` prints one object with ids, text and stats instead.
#include <cstdio>
#include <iostream>
#include <random>

#include <nlohmann/json.hpp>

#include "cli_common.h"
#include "commands.h"
#include "moex/core/error.h"

namespace moex::cli {
namespace {

// Used when neither -p nor --prompt-ids is given and the model has no tokenizer.
const std::vector<int32_t> kBuiltinPromptIds = {1, 17, 42, 99, 123};

nlohmann::json provider_stats_json(const ExpertProviderStats& stats) {
  const int64_t requests = stats.hits + stats.misses;
  return {{"expert_hits", stats.hits},
          {"expert_misses", stats.misses},
          {"expert_hit_rate", requests ? static_cast<double>(stats.hits) / requests : 1.0},
          {"bytes_moved", stats.bytes_moved},
          {"stall_ms", stats.stall_ms},
          {"prefetch_issued", stats.prefetch_issued},
          {"prefetch_precision",
           stats.prefetch_issued ? static_cast<double>(stats.prefetch_used) / stats.prefetch_issued : 0.0},
          {"prefetch_recall", stats.misses + stats.prefetch_used
                                  ? static_cast<double>(stats.prefetch_used) / (stats.misses + stats.prefetch_used)
                                  : 0.0}};
}

}  // namespace

CommandAction setup_run(CLI::App* sub) {
  struct Options {
    ModelOptions model;
    std::string prompt;
    std::string prompt_ids;
    int64_t max_new_tokens = 32;
    SamplingParams sampling{0.8f, 0.95f, 40, 0};
    bool seed_given = false;
    bool json = false;
    bool ignore_eos = false;
  };
  auto options = std::make_shared<Options>();
  add_model_options(sub, &options->model, /*model_required=*/false);
  auto* prompt = sub->add_option("-p,--prompt", options->prompt, "prompt text");
  sub->add_option("--prompt-ids", options->prompt_ids, "prompt token ids, comma-separated")->excludes(prompt);
  sub->add_option("-n,--max-new-tokens", options->max_new_tokens, "tokens to generate")->check(CLI::NonNegativeNumber);
  sub->add_option("--temperature", options->sampling.temperature, "sampling temperature; 0 = greedy")
      ->check(CLI::NonNegativeNumber);
  sub->add_option("--top-p", options->sampling.top_p, "nucleus sampling mass in (0, 1]")->check(CLI::Range(0.0, 1.0));
  sub->add_option("--top-k", options->sampling.top_k, "keep the k most likely tokens (0: all)")
      ->check(CLI::NonNegativeNumber);
  auto* seed = sub->add_option("--seed", options->sampling.seed, "random seed (default: random; printed in --json stats)");
  sub->add_flag("--ignore-eos", options->ignore_eos, "keep generating past end-of-sequence tokens");
  sub->add_flag("--json", options->json,
                "print one JSON object {prompt_ids, output_ids, text, stats} instead of streaming text");
  return [options, seed]() -> int {
    if (seed->count() == 0) options->sampling.seed = std::random_device{}();
    auto model = load_model(options->model);
    std::vector<int32_t> prompt_ids;
    if (!options->prompt_ids.empty()) prompt_ids = parse_id_list(options->prompt_ids, "--prompt-ids");
    else if (!options->prompt.empty())
      throw UsageError("-p: this model directory has no tokenizer support yet; pass --prompt-ids");
    else prompt_ids = kBuiltinPromptIds;
    Engine engine(*model, engine_options(options->model));
    GenerationOptions generation;
    generation.max_new_tokens = options->max_new_tokens;
    generation.sampling = options->sampling;
    generation.stop_at_eos = !options->ignore_eos;
    auto on_token = [&](int32_t token) {
      if (!options->json) {
        std::printf("%d ", token);
        std::fflush(stdout);
      }
      return true;
    };
    GenerationResult result = engine.generate(prompt_ids, generation, on_token);
    if (!options->json) {
      std::printf("\n");
      std::fprintf(stderr, "moex: %zu prompt tokens in %.1f ms, %zu tokens generated at %.1f tokens/s (%s)\n",
                   prompt_ids.size(), result.prefill_ms, result.output_ids.size(),
                   result.decode_steps ? result.decode_steps * 1000.0 / result.decode_ms : 0.0,
                   result.stop_reason.c_str());
      return 0;
    }
    nlohmann::json stats = provider_stats_json(engine.experts().stats());
    stats["prompt_tokens"] = prompt_ids.size();
    stats["generated_tokens"] = result.output_ids.size();
    stats["prefill_ms"] = result.prefill_ms;
    stats["decode_ms"] = result.decode_ms;
    stats["prefill_tokens_per_s"] = result.prefill_ms > 0 ? prompt_ids.size() * 1000.0 / result.prefill_ms : 0.0;
    stats["decode_tokens_per_s"] = result.decode_steps ? result.decode_steps * 1000.0 / result.decode_ms : 0.0;
    stats["stop_reason"] = result.stop_reason;
    stats["seed"] = options->sampling.seed;
    stats["device"] = options->model.device;
    nlohmann::json out = {{"prompt_ids", prompt_ids}, {"output_ids", result.output_ids}, {"text", ""}, {"stats", stats}};
    std::cout << out.dump() << "\n";
    return 0;
  };
}

}  // namespace moex::cli
