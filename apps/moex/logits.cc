// `moex logits`: the model's fp32 logits for every prompt position (and router logits per MoE layer)
// as JSON: the interface tests and researchers compare against transformers with.
#include <cstdio>
#include <iostream>

#include <nlohmann/json.hpp>

#include "cli_common.h"
#include "commands.h"
#include "moex/core/error.h"

namespace moex::cli {
namespace {

class RouterCollector : public RouterObserver {
 public:
  explicit RouterCollector(int64_t num_experts) : num_experts_(num_experts) {}
  void on_router(int32_t moe_layer_idx, int64_t /*start_pos*/, std::span<const float> router_logits,
                 const Routing& routing) override {
    if (static_cast<size_t>(moe_layer_idx) >= logits_.size()) {
      logits_.resize(moe_layer_idx + 1);
      topk_.resize(moe_layer_idx + 1);
    }
    auto& rows = logits_[moe_layer_idx];
    const int64_t n = static_cast<int64_t>(router_logits.size()) / num_experts_;
    for (int64_t row = 0; row < n; ++row)
      rows.emplace_back(router_logits.begin() + row * num_experts_, router_logits.begin() + (row + 1) * num_experts_);
    for (int64_t row = 0; row < routing.num_tokens; ++row)
      topk_[moe_layer_idx].emplace_back(routing.expert_ids.begin() + row * routing.top_k,
                                        routing.expert_ids.begin() + (row + 1) * routing.top_k);
  }
  std::vector<std::vector<std::vector<float>>> logits_;
  std::vector<std::vector<std::vector<int32_t>>> topk_;

 private:
  int64_t num_experts_;
};

}  // namespace

CommandAction setup_logits(CLI::App* sub) {
  struct Options {
    ModelOptions model;
    std::string prompt_ids;
    bool router = false;
    bool json = false;
  };
  auto options = std::make_shared<Options>();
  add_model_options(sub, &options->model, /*model_required=*/true);
  sub->add_option("--prompt-ids", options->prompt_ids, "prompt token ids, comma-separated")->required();
  sub->add_flag("--router", options->router, "also print router_logits[moe_layer][position][expert] and top-k ids");
  sub->add_flag("--json", options->json, "print JSON (the only output format)");
  return [options]() -> int {
    std::vector<int32_t> ids = parse_id_list(options->prompt_ids, "--prompt-ids");
    auto model = load_model(options->model);
    Engine engine(*model, engine_options(options->model, model->config()));
    RouterCollector collector(model->config().num_experts);
    std::vector<float> logits = engine.prompt_logits(ids, options->router ? &collector : nullptr);
    const int64_t vocab = model->config().vocab_size;
    nlohmann::json out;
    out["logits"] = nlohmann::json::array();
    for (size_t row = 0; row < ids.size(); ++row)
      out["logits"].push_back(std::vector<float>(logits.begin() + row * vocab, logits.begin() + (row + 1) * vocab));
    if (options->router) {
      out["router_logits"] = collector.logits_;
      out["router_topk_ids"] = collector.topk_;
    }
    std::cout << out.dump() << "\n";
    return 0;
  };
}

}  // namespace moex::cli
