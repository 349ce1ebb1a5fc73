// `moex run`: generate from a prompt (text or ids) with greedy or sampled decoding, streaming tokens
// as they come; `--json` prints one object with ids, text and stats instead.
#include <cstdio>
#include <iostream>
#include <random>

#include <nlohmann/json.hpp>

#include "cli_common.h"
#include "commands.h"
#include "gpu_telemetry.h"
#include "moex/core/error.h"
#include "moex/tokenizer/chat_template.h"

namespace moex::cli {
namespace {

// Used when neither -p nor --prompt-ids is given: text for a model with a tokenizer, else ids.
const char* kBuiltinPrompt = "The old man walked";
const std::vector<int32_t> kBuiltinPromptIds = {1, 17, 42, 99, 123};

nlohmann::json provider_stats_json(const ExpertProviderStats& stats) {
  const int64_t requests = stats.hits + stats.misses;
  return {{"expert_hits", stats.hits},
          {"expert_misses", stats.misses},
          {"expert_hit_rate", requests ? static_cast<double>(stats.hits) / requests : 1.0},
          {"bytes_moved", stats.bytes_moved},
          {"stall_ms", stats.stall_ms},
          {"cpu_ms", stats.cpu_ms},
          {"model_host_read_gbs", stats.model_host_read_gbs},
          {"model_copy_gbs", stats.model_copy_gbs},
          {"prefetch_issued", stats.prefetch_issued},
          {"prefetch_skipped", stats.prefetch_skipped},
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
    bool chat = false;
    std::string system;
    std::string gpu_telemetry = "auto";
  };
  auto options = std::make_shared<Options>();
  add_model_options(sub, &options->model, /*model_required=*/false);
  auto* prompt = sub->add_option("-p,--prompt", options->prompt, "prompt text");
  sub->add_option("--prompt-ids", options->prompt_ids, "prompt token ids, comma-separated")->excludes(prompt);
  sub->add_option("-n,--max-new-tokens", options->max_new_tokens, "tokens to generate")->check(non_negative_number());
  sub->add_option("--temperature", options->sampling.temperature, "sampling temperature; 0 = greedy")
      ->check(non_negative_number());
  sub->add_option("--top-p", options->sampling.top_p, "nucleus sampling mass in (0, 1]")
      ->check(positive_number() & CLI::Range(0.0, 1.0));  // refused before the prompt is printed, not after
  sub->add_option("--top-k", options->sampling.top_k, "keep the k most likely tokens (0: all)")
      ->check(non_negative_number());
  auto* seed = sub->add_option("--seed", options->sampling.seed, "random seed (default: random; printed in --json stats)");
  sub->add_flag("--ignore-eos", options->ignore_eos, "keep generating past end-of-sequence tokens");
  sub->add_flag("--chat", options->chat,
                "treat -p as a user message and render it with the checkpoint's chat template");
  sub->add_option("--system", options->system, "with --chat: a system message before the user message");
  sub->add_flag("--json", options->json,
                "print one JSON object {prompt_ids, output_ids, text, stats} instead of streaming text");
  add_gpu_telemetry_option(sub, &options->gpu_telemetry);
  return [options, seed, prompt]() -> int {
    if (prompt->count() > 0 && options->prompt.empty()) throw UsageError("-p: the prompt is empty");
    if (seed->count() == 0) options->sampling.seed = std::random_device{}();
    auto model = load_model(options->model);
    const std::string model_dir = resolved_model_dir(options->model);
    std::unique_ptr<Tokenizer> tokenizer = load_tokenizer_if_present(model_dir);
    std::vector<int32_t> prompt_ids;
    std::string prompt_text = options->prompt;
    if (options->chat && options->prompt.empty()) throw UsageError("--chat needs -p TEXT (the user message)");
    if (!options->prompt_ids.empty()) {
      prompt_ids = parse_id_list(options->prompt_ids, "--prompt-ids");
    } else {
      if (prompt_text.empty() && tokenizer) prompt_text = kBuiltinPrompt;
      if (!prompt_text.empty()) {
        if (!tokenizer)
          throw UsageError(fmt::format("-p: {} has no tokenizer.json or tokenizer.model; pass --prompt-ids", model_dir));
        if (options->chat) {
          std::vector<ChatMessage> messages;
          if (!options->system.empty()) messages.push_back({"system", options->system});
          messages.push_back({"user", prompt_text});
          // Templates write BOS and turn markers themselves: encode without the post-processor's tokens.
          prompt_ids = tokenizer->encode(ChatTemplate::from_tokenizer(*tokenizer).apply(messages), false);
        } else {
          prompt_ids = tokenizer->encode(prompt_text, /*add_special_tokens=*/true);
        }
        if (prompt_ids.empty()) throw UsageError("-p: the prompt encodes to no tokens");
      } else {
        prompt_ids = kBuiltinPromptIds;
      }
    }
    Engine engine(*model, engine_options(options->model, model->config()));
    GenerationOptions generation;
    generation.max_new_tokens = options->max_new_tokens;
    generation.sampling = options->sampling;
    generation.stop_at_eos = !options->ignore_eos;
    std::unique_ptr<StreamingDecoder> stream;
    if (tokenizer) stream = std::make_unique<StreamingDecoder>(*tokenizer, /*skip_special_tokens=*/true);
    if (!options->json && tokenizer && !prompt_text.empty() && !options->chat) {
      std::fputs(prompt_text.c_str(), stdout);
      std::fflush(stdout);
    }
    auto on_token = [&](int32_t token) {
      if (options->json) return true;
      if (stream) std::fputs(stream->step(token).c_str(), stdout);
      else std::printf("%d ", token);
      std::fflush(stdout);
      return true;
    };
    // The GPU's energy over the whole generation (prefill and decode), per generated token.
    nlohmann::json gpu_about;
    auto meter = open_gpu_meter(options->gpu_telemetry, options->model.device, engine.backend(), &gpu_about);
    if (meter) meter->begin();
    GenerationResult result = engine.generate(prompt_ids, generation, on_token);
    if (meter) {
      engine.backend().synchronize();
      meter->end();
      gpu_about["generation"] = gpu_energy_json(meter->take(), static_cast<int64_t>(result.output_ids.size()));
    }
    if (!options->json) {
      if (stream) std::fputs(stream->finish().c_str(), stdout);
      std::printf("\n");
      std::fflush(stdout);  // the text before the summary on stderr, also when both go to one pipe
      std::fprintf(stderr, "moex: %zu prompt tokens in %.1f ms, %zu tokens generated at %.1f tokens/s (%s)\n",
                   prompt_ids.size(), result.prefill_ms, result.output_ids.size(),
                   result.decode_steps ? result.decode_steps * 1000.0 / result.decode_ms : 0.0,
                   result.stop_reason.c_str());
      const ExpertProviderStats stats = engine.experts().stats();
      if (stats.misses > 0) {
        const double tokens = static_cast<double>(prompt_ids.size() + result.output_ids.size());
        std::fprintf(stderr,
                     "moex: experts: hit rate %.3f (%lld hits, %lld misses), %.2f MiB moved/token, stall %.2f "
                     "ms/token, prefetch precision %.2f recall %.2f\n",
                     static_cast<double>(stats.hits) / (stats.hits + stats.misses), static_cast<long long>(stats.hits),
                     static_cast<long long>(stats.misses), stats.bytes_moved / tokens / 1048576.0,
                     stats.stall_ms / tokens,
                     stats.prefetch_issued ? static_cast<double>(stats.prefetch_used) / stats.prefetch_issued : 0.0,
                     stats.prefetch_used + stats.misses
                         ? static_cast<double>(stats.prefetch_used) / (stats.prefetch_used + stats.misses)
                         : 0.0);
        if (stats.model_copy_gbs > 0)
          std::fprintf(stderr, "moex: CPU experts: %.1f ms on the host; cost model rates: host reads %.1f GB/s, "
                       "copies %.1f GB/s\n", stats.cpu_ms, stats.model_host_read_gbs, stats.model_copy_gbs);
      }
      if (meter)
        std::fprintf(stderr, "moex: %s: %s per generated token, prefill included\n",
                     gpu_about["name"].get<std::string>().c_str(), gpu_energy_line(gpu_about["generation"]).c_str());
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
    if (!gpu_about.is_null()) stats["gpu"] = gpu_about;
    nlohmann::json out = {{"prompt_ids", prompt_ids}, {"output_ids", result.output_ids}, {"text", tokenizer ? tokenizer->decode(result.output_ids, /*skip_special_tokens=*/true) : ""}, {"stats", stats}};
    std::cout << out.dump() << "\n";
    return 0;
  };
}

}  // namespace moex::cli
