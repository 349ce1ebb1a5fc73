// Expert activation matrix (EAM) matching, after MoE-Infinity: a request's EAM counts, per layer and
// expert, how many of its tokens chose that expert. Requests that look alike (cosine similarity of
// their partial EAMs) activate alike, so the closest past EAM predicts the layers still to come; the
// current request's own counts add its temporal locality. Past EAMs come from requests that ended.
#include <algorithm>
#include <cmath>
#include <deque>

#include "moex/moe/predictor/predictors.h"

namespace moex {
namespace {

class EamPredictor final : public ExpertPredictor {
 public:
  explicit EamPredictor(const PredictorOptions& options)
      : num_experts_(options.num_experts),
        capacity_(std::max<int32_t>(options.eam_capacity, 1)),
        current_(static_cast<size_t>(options.num_layers) * options.num_experts, 0.0),
        scores_(options.num_experts, 0.0) {}

  std::string_view name() const override { return "eam"; }

  void begin_request() override {
    std::fill(current_.begin(), current_.end(), 0.0);
    match_ = -1;
    dirty_ = false;
  }
  void end_request() override {
    if (std::all_of(current_.begin(), current_.end(), [](double v) { return v == 0; })) return;
    if (static_cast<int32_t>(past_.size()) == capacity_) past_.pop_front();
    past_.push_back({current_, norm(current_)});
    begin_request();
  }
  void observe(int32_t layer_idx, std::span<const int32_t> expert_ids, std::span<const float>) override {
    for (int32_t expert_idx : expert_ids) current_[row(layer_idx) + expert_idx] += 1.0;
    dirty_ = true;
  }

  void predict(int32_t target_layer, std::vector<ScoredExpert>* out) override {
    if (dirty_) rematch();
    std::fill(scores_.begin(), scores_.end(), 0.0);
    add_row(current_, target_layer);
    if (match_ >= 0) add_row(past_[match_].counts, target_layer);
    ranked_experts(scores_, out);
  }

 private:
  struct PastEam {
    std::vector<double> counts;  // [layer][expert]
    double norm;
  };

  size_t row(int32_t layer_idx) const { return static_cast<size_t>(layer_idx) * num_experts_; }
  static double norm(const std::vector<double>& m) {
    double sum = 0;
    for (double v : m) sum += v * v;
    return std::sqrt(sum);
  }
  // Adds the layer's row normalized to sum 1, so a long past request does not outweigh this one.
  void add_row(const std::vector<double>& m, int32_t layer_idx) {
    double total = 0;
    for (int32_t expert_idx = 0; expert_idx < num_experts_; ++expert_idx) total += m[row(layer_idx) + expert_idx];
    if (total <= 0) return;
    for (int32_t expert_idx = 0; expert_idx < num_experts_; ++expert_idx)
      scores_[expert_idx] += m[row(layer_idx) + expert_idx] / total;
  }
  void rematch() {
    dirty_ = false;
    match_ = -1;
    double current_norm = norm(current_);
    if (current_norm == 0) return;
    double best = 0;
    for (size_t idx = 0; idx < past_.size(); ++idx) {
      const PastEam& past = past_[idx];
      double dot = 0;
      for (size_t cell = 0; cell < current_.size(); ++cell) dot += current_[cell] * past.counts[cell];
      double similarity = dot / (current_norm * past.norm);
      if (similarity >= best && similarity > 0) best = similarity, match_ = static_cast<int64_t>(idx);
    }
  }

  int32_t num_experts_;
  int32_t capacity_;
  std::vector<double> current_;  // this request's EAM
  std::deque<PastEam> past_;
  int64_t match_ = -1;  // index into past_ of the closest EAM; ties go to the most recent
  bool dirty_ = false;
  std::vector<double> scores_;
};

}  // namespace

std::unique_ptr<ExpertPredictor> make_eam_predictor(const PredictorOptions& options) {
  return std::make_unique<EamPredictor>(options);
}

}  // namespace moex
