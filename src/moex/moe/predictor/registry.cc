// The only list of predictors (adding one is a file in this folder plus a line here), and the helpers
// every predictor shares.
#include <algorithm>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "moex/core/error.h"
#include "moex/moe/predictor/predictors.h"

namespace moex {
namespace {

struct PredictorEntry {
  const char* name;
  std::unique_ptr<ExpertPredictor> (*make)(const PredictorOptions&);
};

const PredictorEntry kPredictors[] = {
    {"frequency", make_frequency_predictor},
    {"stride", make_stride_predictor},
    {"recency", make_stride_predictor},
    {"affinity", make_affinity_predictor},
    {"eam", make_eam_predictor},
    {"bayes", make_bayes_predictor},
    {"pregate", make_pregate_predictor},
};

}  // namespace

std::vector<std::string> expert_predictor_names() {
  std::vector<std::string> names;
  for (const PredictorEntry& entry : kPredictors) names.emplace_back(entry.name);
  return names;
}

std::unique_ptr<ExpertPredictor> make_expert_predictor(std::string_view name, const PredictorOptions& options) {
  for (const PredictorEntry& entry : kPredictors)
    if (name == entry.name) {
      check_predictor_options(name, options);
      return entry.make(options);
    }
  throw UsageError(fmt::format("unknown expert predictor \"{}\"; expected one of: {}", name,
                               fmt::join(expert_predictor_names(), ", ")));
}

void check_predictor_options(std::string_view name, const PredictorOptions& options) {
  if (options.num_layers <= 0 || options.num_experts <= 0 || options.top_k <= 0 ||
      options.top_k > options.num_experts)
    throw UsageError(fmt::format(
        "predictor \"{}\": need num_layers > 0, num_experts > 0 and 0 < top_k <= num_experts; got {}, {}, {}",
        name, options.num_layers, options.num_experts, options.top_k));
}

void ranked_experts(std::span<const double> scores, std::vector<ScoredExpert>* out) {
  out->clear();
  for (size_t expert_idx = 0; expert_idx < scores.size(); ++expert_idx)
    if (scores[expert_idx] > 0) out->push_back({static_cast<int32_t>(expert_idx), scores[expert_idx]});
  std::stable_sort(out->begin(), out->end(),
                   [](const ScoredExpert& a, const ScoredExpert& b) { return a.score > b.score; });
}

void PredictionStats::add(std::span<const int32_t> predicted, std::span<const int32_t> actual) {
  num_predicted += static_cast<int64_t>(predicted.size());
  num_actual += static_cast<int64_t>(actual.size());
  for (int32_t expert_idx : predicted)
    if (std::find(actual.begin(), actual.end(), expert_idx) != actual.end()) ++num_correct;
}

}  // namespace moex
