// Router top-k on the host. Scores are computed as transformers does (fp32 softmax over all experts
// with the max subtracted, or fp32 sigmoid) and top-k is taken over the scores, best first; equal
// scores go to the lower expert id, the rule the CUDA router follows too.
#include <cmath>
#include <algorithm>

#include "moex/backend/cpu/ops.h"
#include "moex/core/error.h"

namespace moex::cpu {
namespace {
constexpr int64_t kMaxExperts = 1024;
}  // namespace

void route(const float* logits, int64_t n, int64_t num_experts, int64_t top_k, RouterScoring scoring,
           bool normalize, Routing* routing) {
  MOEX_ASSERT(num_experts > 0 && num_experts <= kMaxExperts, "num_experts {}", num_experts);
  MOEX_ASSERT(top_k > 0 && top_k <= num_experts, "top_k {} of {} experts", top_k, num_experts);
  routing->num_tokens = n;
  routing->top_k = top_k;
  routing->expert_ids.resize(static_cast<size_t>(n * top_k));
  routing->weights.resize(static_cast<size_t>(n * top_k));
  float scores[kMaxExperts];
  bool taken[kMaxExperts];
  for (int64_t token = 0; token < n; ++token) {
    const float* row = logits + token * num_experts;
    switch (scoring) {
      case RouterScoring::kSoftmax: {
        float max = row[0];
        for (int64_t e = 1; e < num_experts; ++e) max = std::max(max, row[e]);
        float sum = 0.0f;
        for (int64_t e = 0; e < num_experts; ++e) {
          scores[e] = std::exp(row[e] - max);
          sum += scores[e];
        }
        for (int64_t e = 0; e < num_experts; ++e) scores[e] /= sum;
        break;
      }
      case RouterScoring::kSigmoid:
        for (int64_t e = 0; e < num_experts; ++e) scores[e] = 1.0f / (1.0f + std::exp(-row[e]));
        break;
    }
    std::fill(taken, taken + num_experts, false);
    int32_t* ids = routing->expert_ids.data() + token * top_k;
    float* weights = routing->weights.data() + token * top_k;
    float total = 0.0f;
    for (int64_t slot = 0; slot < top_k; ++slot) {
      int64_t best = -1;
      for (int64_t e = 0; e < num_experts; ++e) {
        if (taken[e]) continue;
        // Strictly greater keeps the lower id on ties; a NaN score never displaces a number.
        if (best < 0 || scores[e] > scores[best] || (std::isnan(scores[best]) && !std::isnan(scores[e]))) best = e;
      }
      taken[best] = true;
      ids[slot] = static_cast<int32_t>(best);
      weights[slot] = scores[best];
      total += scores[best];
    }
    if (normalize)
      for (int64_t slot = 0; slot < top_k; ++slot) weights[slot] /= total;
  }
}

}  // namespace moex::cpu
