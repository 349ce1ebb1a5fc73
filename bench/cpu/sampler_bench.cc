// Temperature / top-k / top-p sampling time per token on one core: moex's Sampler against the full sort it replaced
// (every token scored, the whole vocabulary sorted, then cut and drawn: kept here as the baseline), at Mixtral's
// 32,000-token and Qwen3's 151,936-token vocabularies, on flat logits (a random-weights model) and on peaked ones (a
// trained model's: a few tokens far above the rest). Engines that read the logits back and sample on the host pay
// this per token and per sequence, next to GPU decode steps of 0.5-3 ms.
//   moex_sampler_bench [--reps N] [--json]
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "host_info.h"
#include "moex/runtime/sampler.h"

namespace moex {
namespace {

using Clock = std::chrono::steady_clock;

// The sampler before this benchmark's change: a full sort of (logit / T, id) pairs unless top-k cuts.
class FullSortSampler {
 public:
  explicit FullSortSampler(const SamplingParams& p) : p_(p), rng_(p.seed) {}
  int32_t sample(const std::vector<float>& logits) {
    candidates_.clear();
    for (size_t idx = 0; idx < logits.size(); ++idx)
      candidates_.emplace_back(logits[idx] / p_.temperature, static_cast<int32_t>(idx));
    auto by_score = [](const auto& a, const auto& b) { return a.first > b.first || (a.first == b.first && a.second < b.second); };
    size_t keep = candidates_.size();
    if (p_.top_k > 0 && static_cast<size_t>(p_.top_k) < keep) {
      keep = static_cast<size_t>(p_.top_k);
      std::partial_sort(candidates_.begin(), candidates_.begin() + keep, candidates_.end(), by_score);
    } else {
      std::sort(candidates_.begin(), candidates_.end(), by_score);
    }
    candidates_.resize(keep);
    const float max_score = candidates_.front().first;
    double total = 0;
    for (auto& [score, id] : candidates_) total += score = std::exp(score - max_score);
    if (p_.top_p < 1.0f) {
      double mass = 0;
      size_t cut = 0;
      while (cut < candidates_.size()) {
        mass += candidates_[cut++].first / total;
        if (mass >= p_.top_p) break;
      }
      candidates_.resize(cut);
      total = 0;
      for (const auto& [prob, id] : candidates_) total += prob;
    }
    double draw = std::uniform_real_distribution<double>(0.0, total)(rng_);
    for (const auto& [prob, id] : candidates_)
      if ((draw -= prob) <= 0) return id;
    return candidates_.back().second;
  }

 private:
  SamplingParams p_;
  std::mt19937_64 rng_;
  std::vector<std::pair<float, int32_t>> candidates_;
};

std::vector<float> make_logits(size_t vocab, bool peaked, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<float> logits(vocab);
  std::normal_distribution<float> normal(0.0f, peaked ? 2.5f : 1.0f);
  for (auto& v : logits) v = normal(rng);
  if (peaked)  // a trained model's next-token logits: a handful of candidates well above the rest
    for (int i = 0; i < 8; ++i) logits[rng() % vocab] = 14.0f - 1.5f * static_cast<float>(i);
  return logits;
}

template <typename S>
double us_per_token(S& sampler, const std::vector<float>& logits, int reps) {
  volatile int32_t sink = 0;
  sink = sampler.sample(logits);  // warm-up: buffers sized
  const auto start = Clock::now();
  for (int i = 0; i < reps; ++i) sink = sampler.sample(logits);
  (void)sink;
  return std::chrono::duration<double, std::micro>(Clock::now() - start).count() / reps;
}

}  // namespace
}  // namespace moex

int main(int argc, char** argv) {
  using namespace moex;
  CLI::App app("Host sampling time per token: moex's Sampler against a full sort of the vocabulary");
  int reps = 50;
  bool json = false;
  app.add_option("--reps", reps, "samples timed per case")->check(CLI::PositiveNumber);
  app.add_flag("--json", json, "one JSON object instead of the table");
  CLI11_PARSE(app, argc, argv);

  struct Setting {
    const char* name;
    SamplingParams params;
  };
  const Setting settings[] = {{"T=0.7", {0.7f, 1.0f, 0, 1}},
                              {"T=0.7 top_p=0.9", {0.7f, 0.9f, 0, 1}},
                              {"T=0.7 top_k=40", {0.7f, 1.0f, 40, 1}},
                              {"T=0.7 top_k=40 top_p=0.9", {0.7f, 0.9f, 40, 1}},
                              {"T=1.0 top_p=0.95", {1.0f, 0.95f, 0, 1}}};
  nlohmann::json rows = nlohmann::json::array();
  if (!json) {
    fmt::print("{}, load {}, commit {}\n", bench::cpu_model(), bench::load_average(), bench::git_commit());
    fmt::print("| vocab | logits | setting | full sort us/token | moex us/token | speedup |\n|---|---|---|---|---|---|\n");
  }
  for (size_t vocab : {size_t{32000}, size_t{151936}}) {
    for (bool peaked : {false, true}) {
      const auto logits = make_logits(vocab, peaked, static_cast<uint32_t>(vocab + peaked));
      for (const Setting& s : settings) {
        FullSortSampler before(s.params);
        Sampler now(s.params);
        const double base = us_per_token(before, logits, reps);
        const double ours = us_per_token(now, logits, reps);
        rows.push_back({{"vocab", vocab}, {"logits", peaked ? "peaked" : "flat"}, {"setting", s.name},
                        {"full_sort_us", base}, {"moex_us", ours}, {"speedup", base / ours}});
        if (!json)
          fmt::print("| {} | {} | {} | {:.1f} | {:.1f} | {:.1f}x |\n", vocab, peaked ? "peaked" : "flat", s.name, base,
                     ours, base / ours);
      }
    }
  }
  if (json)
    std::printf("%s\n", nlohmann::json{{"cpu", bench::cpu_model()}, {"load", bench::load_average()},
                                       {"commit", bench::git_commit()}, {"reps", reps}, {"rows", rows}}
                            .dump()
                            .c_str());
  return 0;
}
