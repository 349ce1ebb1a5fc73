// Token sampling from fp32 logits: greedy (temperature 0), or temperature + top-k + top-p with a
// seeded generator so that a given seed reproduces a run.
#pragma once

#include <cstdint>
#include <random>
#include <span>
#include <vector>

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
  int32_t sample(std::span<const float> logits);

 private:
  double candidates_mass(size_t count) const;
  size_t cut_to_nucleus(size_t first, double mass, double total) const;
  int32_t draw_from(size_t count, double u) const;

  SamplingParams params_;
  std::mt19937_64 rng_;
  std::vector<float> weights_;                        // sample_weight(logit / T - max) per token
  std::vector<double> bucket_mass_;                   // top-p: the weights' mass per bucket of their float bits
  std::vector<std::pair<float, int32_t>> candidates_;  // (weight, id), ordered as far as a cut needs
};

int32_t argmax(std::span<const float> logits);

// e^x for x <= 0 as the sampler computes its weights (a vectorisable polynomial, ~1 ulp from std::exp; x below -87
// gives e^-87): tests rebuild the sampler's distribution with it.
float sample_weight(float x);

}  // namespace moex
