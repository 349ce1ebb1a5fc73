// Token sampling from fp32 logits: greedy (temperature 0), or temperature + top-k + top-p with a
// seeded generator so that a given seed reproduces a run.
//
// What a draw picks (a device sampler, Backend::sample_rows, picks the same from the same TokenDraw):
//   - temperature 0: the argmax (the first index of the largest logit; logits[0] when it is NaN);
//   - otherwise score = logit * (1 / T) (fp32); NaN and -inf scores are never drawn; when the largest score is not
//     finite (no score left, an infinite logit, an overflow), the argmax;
//   - weight = sample_weight(score - largest score), monotone in the score;
//   - tokens in order of score, descending, the lower id first on ties; top-k keeps the first k, top-p the
//     shortest prefix of those whose weight reaches top_p of theirs;
//   - the pick: the first kept token, in index order, at which the kept weight summed so far reaches
//     uniform * the kept weight.
#pragma once

#include <cstdint>
#include <random>
#include <span>
#include <vector>

#include "moex/backend/token_draw.h"

namespace moex {

struct SamplingParams {
  float temperature = 0.0f;  // 0: greedy (argmax; ties pick the lower id, like torch.argmax)
  float top_p = 1.0f;        // nucleus mass in (0, 1]
  int32_t top_k = 0;         // 0: no top-k cut
  uint64_t seed = 0;
};

class Sampler {
 public:
  // Throws UsageError for out-of-range parameters (negative temperature, top_p outside (0, 1], ...).
  explicit Sampler(const SamplingParams& params);
  // The next token's draw: the parameters with the generator's next uniform (one per token; none when greedy).
  TokenDraw next_draw();
  int32_t sample(std::span<const float> logits) { return sample(logits, next_draw()); }
  // The token `draw` picks from logits (valid parameters, as next_draw() gives).
  int32_t sample(std::span<const float> logits, const TokenDraw& draw);

 private:
  double candidates_mass(size_t count) const;
  size_t cut_to_nucleus(size_t first, double mass, double total, float top_p) const;
  // Puts candidates_[first, first + count) in index order.
  void sort_by_id(size_t first, size_t count);
  int32_t draw_from(size_t count, double u) const;

  SamplingParams params_;
  std::mt19937_64 rng_;
  std::vector<float> weights_;                        // sample_weight(logit / T - max) per token
  std::vector<double> bucket_mass_;                   // top-p: the weights' mass per bucket of their float bits
  std::vector<std::pair<float, int32_t>> candidates_;  // (weight, id), ordered as far as a cut needs
};

int32_t argmax(std::span<const float> logits);

// e^x for x <= 0 as the sampler computes its weights (a vectorisable polynomial, ~1 ulp from std::exp, monotone;
// x below -87 gives e^-87): tests rebuild the sampler's distribution with it. The CUDA sampler evaluates the same
// fused multiply-adds, so that both sides get the same bits.
float sample_weight(float x);

}  // namespace moex
