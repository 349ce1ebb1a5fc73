// Naive Bayes over routing history: the experts a layer will choose, scored from everything the router has said
// that a prediction can see -- the same token's experts at up to kMaxLags earlier layers, and the previous token's
// experts at the target layer and the one after it. Each is a feature; their counts per (layer, chosen expert)
// are learned online, and a prediction adds the log-likelihoods of the features it has (features not yet known,
// such as this token's earlier layers when predicting far ahead, are left out).
// Why: on the Mixtral-8x7B trace (../shared/traces) one layer's experts follow only weakly from the layer before
// (affinity's top-2 guesses: 0.385 of the chosen experts); several earlier layers together with the previous
// token say more (0.51 with 8 earlier layers, measured offline on the same replay order).
#include <algorithm>
#include <cmath>
#include <cstdint>

#include <fmt/format.h>

#include "moex/core/error.h"
#include "moex/moe/predictor/latest_routing.h"
#include "moex/moe/predictor/predictors.h"

namespace moex {
namespace {

// Earlier layers of the same token used as features, fewer where the tables would grow past kMaxCells cells of
// 8 bytes (num_layers x num_experts^2 per feature group: Qwen3-30B-A3B's 48 x 128^2 is 0.8 M, DeepSeek-V3's
// 58 x 256^2 3.8 M: only the two previous-token groups fit there).
constexpr int32_t kMaxLags = 8;
constexpr int64_t kMaxCells = int64_t(1) << 23;

class BayesPredictor final : public ExpertPredictor {
 public:
  explicit BayesPredictor(const PredictorOptions& options)
      : num_layers_(options.num_layers),
        num_experts_(options.num_experts),
        lags_(lags_for(options)),
        groups_(lags_ + 2),
        latest_(options.num_layers),
        chosen_(static_cast<size_t>(num_layers_) * num_experts_, 0.0),
        counts_(static_cast<size_t>(num_layers_) * num_experts_ * groups_ * num_experts_, 0),
        log_counts_(counts_.size(), 0.f),
        log_scores_(num_experts_),
        scores_(num_experts_) {}

  std::string_view name() const override { return "bayes"; }
  // Requests are independent: the previous request's last token is no feature of this one's first.
  void begin_request() override { latest_.clear(); }

  void observe(int32_t layer_idx, std::span<const int32_t> expert_ids, std::span<const float> weights) override {
    // Before this layer's choice replaces the previous token's in latest_: layers below are this token's,
    // layer_idx and the next one still the previous token's.
    features(layer_idx, layer_idx - 1, /*next_known=*/true);
    for (int32_t to : expert_ids) {
      chosen_[row(layer_idx, to)] += 1.0;
      for (const Feature& f : features_) {
        const size_t c = cell(layer_idx, f.group, f.expert, to);
        log_counts_[c] = std::log(static_cast<float>(++counts_[c]) + 1.f);
      }
    }
    latest_.observe(layer_idx, expert_ids, weights);
  }

  void predict(int32_t target_layer, std::vector<ScoredExpert>* out) override {
    out->clear();
    const int32_t last = latest_.last_layer();
    if (last < 0) return;
    // A layer after the latest one runs for this token: its earlier layers up to `last` are known, the target
    // and the one after hold the previous token's choice. Otherwise the target runs for the next token: none of
    // its earlier layers is known; the current token (its previous) has run the target, and the layer after
    // too unless the target is the latest layer.
    if (target_layer > last) features(target_layer, last, /*next_known=*/true);
    else features(target_layer, -1, /*next_known=*/target_layer < last);
    double total = 0;
    for (int32_t e = 0; e < num_experts_; ++e) total += chosen_[row(target_layer, e)];
    if (total <= 0) return;  // nothing learned for this layer yet
    // Add-one smoothing: an expert never chosen, or a feature never seen with it, is unlikely, not impossible:
    // log((count + 1) / (n + num_experts)) per feature. observe() keeps the logs of the counts, a feature's row
    // over the chosen experts contiguous, so a prediction is additions along rows (Qwen3's shape: ~80 features
    // of 128 experts a layer).
    std::fill(log_scores_.begin(), log_scores_.end(), 0.0);
    for (const Feature& f : features_) {
      const float* counts = &log_counts_[cell(target_layer, f.group, f.expert, 0)];
      for (int32_t e = 0; e < num_experts_; ++e) log_scores_[e] += counts[e];
    }
    double best = -INFINITY;
    for (int32_t e = 0; e < num_experts_; ++e) {
      const double n = chosen_[row(target_layer, e)];
      log_scores_[e] += std::log((n + 1.0) / (total + num_experts_)) -
                        static_cast<double>(features_.size()) * std::log(n + num_experts_);
      best = std::max(best, log_scores_[e]);
    }
    for (int32_t e = 0; e < num_experts_; ++e) scores_[e] = std::exp(log_scores_[e] - best);  // > 0, best 1
    ranked_experts(scores_, out);
  }

 private:
  struct Feature {
    int32_t group;   // 0..lags-1: this token's layer target - 1 - group; lags: the previous token's target
                     // layer; lags + 1: its layer after the target
    int32_t expert;
  };

  static int32_t lags_for(const PredictorOptions& options) {
    const int64_t per_group = int64_t(options.num_layers) * options.num_experts * options.num_experts;
    const int64_t fit = kMaxCells / std::max<int64_t>(per_group, 1) - 2;
    return static_cast<int32_t>(std::clamp<int64_t>(fit, 0, std::min(kMaxLags, options.num_layers - 1)));
  }

  // features_ for target: this token's layers target-1 down to target-lags that are <= known_upto, the
  // previous token's target layer, and its layer after the target where next_known.
  void features(int32_t target, int32_t known_upto, bool next_known) {
    features_.clear();
    for (int32_t lag = 1; lag <= lags_; ++lag) {
      const int32_t layer = target - lag;
      if (layer < 0) break;
      if (layer > known_upto) continue;
      for (int32_t e : latest_.ids(layer)) features_.push_back({lag - 1, e});
    }
    for (int32_t e : latest_.ids(target)) features_.push_back({lags_, e});
    if (next_known && target + 1 < num_layers_)
      for (int32_t e : latest_.ids(target + 1)) features_.push_back({lags_ + 1, e});
  }

  size_t row(int32_t layer, int32_t expert) const { return static_cast<size_t>(layer) * num_experts_ + expert; }
  // counts_[layer][group][feature expert][chosen expert]
  size_t cell(int32_t layer, int32_t group, int32_t expert, int32_t chosen) const {
    return ((static_cast<size_t>(layer) * groups_ + group) * num_experts_ + expert) * num_experts_ + chosen;
  }

  int32_t num_layers_;
  int32_t num_experts_;
  int32_t lags_;
  int32_t groups_;
  LatestRouting latest_;
  std::vector<double> chosen_;       // [layer][expert]: times chosen
  std::vector<uint32_t> counts_;     // times each feature came with the chosen expert
  std::vector<float> log_counts_;    // log(counts_ + 1)
  std::vector<Feature> features_;
  std::vector<double> log_scores_;
  std::vector<double> scores_;
};

}  // namespace

std::unique_ptr<ExpertPredictor> make_bayes_predictor(const PredictorOptions& options) {
  // The two previous-token groups at least: past kMaxCells the tables would take hundreds of MB of host memory.
  const int64_t cells = 2 * int64_t(options.num_layers) * options.num_experts * options.num_experts;
  if (cells > kMaxCells)
    throw UsageError(fmt::format("predictor \"bayes\": {} layers of {} experts need {:.1f} M count cells, more than "
                                 "its {:.1f} M; use affinity, stride or pregate",
                                 options.num_layers, options.num_experts, cells / 1e6, kMaxCells / 1e6));
  return std::make_unique<BayesPredictor>(options);
}

}  // namespace moex
