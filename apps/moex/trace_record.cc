// `moex trace record`: runs prompts through a model and writes every token's routing (top-k ids and
// gate weights per MoE layer, prefill and greedy decode) as a moex binary trace, so traces come from the
// engine itself and feed `moex trace simulate|stats` directly; with --pregate-logits also what a pre-gating
// predictor sees one layer ahead.
#include <fstream>
#include <memory>

#include "cli_common.h"
#include "moex/core/error.h"
#include "moex/core/progress.h"
#include "moex/trace/trace_writer.h"
#include "trace_record.h"

namespace moex::cli {
namespace {

struct RecordOptions {
  ModelOptions model;
  std::string prompts_path;
  std::string out_path;
  int64_t decode_tokens = 16;
  bool pregate_logits = false;
};

int run_record(const RecordOptions& options) {
  std::ifstream in(options.prompts_path);
  if (!in) throw IoError(fmt::format("{}: cannot open the prompts file", options.prompts_path));
  std::vector<std::string> prompts;
  for (std::string line; std::getline(in, line);)
    if (line.find_first_not_of(" \t\r") != std::string::npos) prompts.push_back(line);
  if (prompts.empty()) throw UsageError(fmt::format("{}: no prompts (one per line)", options.prompts_path));
  auto model = load_model(options.model);
  const ModelConfig& cfg = model->config();
  auto tokenizer = load_tokenizer_if_present(resolved_model_dir(options.model));
  if (!tokenizer)
    throw UsageError(fmt::format("{}: has no tokenizer.json or tokenizer.model to encode the prompts",
                                 resolved_model_dir(options.model)));
  Engine engine(*model, engine_options(options.model, cfg));
  const TraceInfo info = trace_info_for(cfg, options.pregate_logits, "moex trace record");
  TraceWriter writer(options.out_path, info);
  GenerationOptions greedy;
  greedy.max_new_tokens = options.decode_tokens;
  greedy.stop_at_eos = false;
  ProgressBar progress("recording", static_cast<int64_t>(prompts.size()));
  int64_t total_tokens = 0;
  for (size_t prompt_idx = 0; prompt_idx < prompts.size(); ++prompt_idx) {
    std::vector<int32_t> ids = tokenizer->encode(prompts[prompt_idx], /*add_special_tokens=*/true);
    if (ids.empty()) continue;
    TraceWriter::RequestHandle request = writer.begin_request(fmt::format("p{}", prompt_idx));
    TraceRecorder recorder(writer, request, info.with_pregate_logits, info.num_experts);
    GenerationResult result = engine.generate(ids, greedy, {}, &recorder);
    // The last sampled token never ran through the model: it has no routing to record.
    const int64_t ran = static_cast<int64_t>(ids.size()) + result.decode_steps;
    for (int64_t token_idx = 0; token_idx < ran; ++token_idx)
      writer.record_token_id(request, token_idx,
                             token_idx < static_cast<int64_t>(ids.size()) ? ids[token_idx]
                                                                          : result.output_ids[token_idx - ids.size()]);
    writer.end_request(request);
    total_tokens += ran;
    progress.advance();
  }
  writer.close();
  progress.finish();
  std::fprintf(stderr, "moex: wrote %zu requests, %lld tokens to %s\n", prompts.size(),
               static_cast<long long>(total_tokens), options.out_path.c_str());
  return 0;
}

}  // namespace

void TraceRecorder::on_router(int32_t moe_layer_idx, int64_t start_pos, std::span<const float>,
                              const Routing& routing) {
  for (int64_t row = 0; row < routing.num_tokens; ++row) {
    const auto ids = std::span<const int32_t>(routing.expert_ids).subspan(row * routing.top_k, routing.top_k);
    const auto weights = std::span<const float>(routing.weights).subspan(row * routing.top_k, routing.top_k);
    writer_.record(request_, moe_layer_idx, start_pos + row, ids, weights);
  }
}

void TraceRecorder::on_pregate(int32_t target_moe_layer_idx, int64_t start_pos, std::span<const float> logits) {
  const int64_t rows = static_cast<int64_t>(logits.size()) / num_experts_;
  for (int64_t row = 0; row < rows; ++row)
    writer_.record_pregate(request_, target_moe_layer_idx, start_pos + row,
                           logits.subspan(row * num_experts_, num_experts_));
}

TraceInfo trace_info_for(const ModelConfig& cfg, bool pregate_logits, std::string source) {
  TraceInfo info;
  info.model = cfg.summary();
  info.num_layers = static_cast<int32_t>(cfg.num_moe_layers());
  info.num_experts = static_cast<int32_t>(cfg.num_experts);
  info.top_k = static_cast<int32_t>(cfg.top_k);
  info.with_gate_weights = true;
  info.with_token_ids = true;
  info.with_pregate_logits = pregate_logits && info.num_layers > 1;
  for (int64_t layer_idx = 0; layer_idx < cfg.num_layers; ++layer_idx)
    if (cfg.layer_is_moe[layer_idx]) info.layer_ids.push_back(static_cast<int32_t>(layer_idx));
  info.source = std::move(source);
  return info;
}

CLI::App* add_trace_record_command(CLI::App* trace, std::function<int()>* action) {
  auto options = std::make_shared<RecordOptions>();
  CLI::App* record = trace->add_subcommand("record", "run prompts through a model and write its routing as a trace");
  add_model_options(record, &options->model, /*model_required=*/false);
  record->add_option("--prompts", options->prompts_path, "text file, one prompt per line")->required();
  record->add_option("--out", options->out_path, "trace file to write (moex binary format)")->required();
  record->add_option("-n,--decode-tokens", options->decode_tokens, "greedy tokens generated (and traced) per prompt")
      ->check(non_negative_number());
  record->add_flag("--pregate-logits", options->pregate_logits,
                   "also record each MoE layer's router applied to the previous MoE layer's hidden state (pre-gating), "
                   "so that `moex trace simulate --predictor pregate` replays real pre-gating (num_experts f16 per "
                   "token and layer)");
  *action = [options] { return run_record(*options); };
  return record;
}

}  // namespace moex::cli
