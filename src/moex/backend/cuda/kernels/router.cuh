// Fused MoE router: logits -> scores -> top-k -> (re)normalised weights, one warp per token.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace moex::cuda {

constexpr int kRouterMaxExperts = 512;
constexpr int kRouterMaxTopK = 32;

// logits fp32 [num_tokens, num_experts] -> ids int32 / weights fp32 [num_tokens, top_k], best first.
// Selection is on the raw logit (softmax and sigmoid are monotone, so this is the same order as on the
// scores, without rounding ties); equal logits pick the lower expert id. sigmoid_scoring: weights are
// sigmoid(logit); otherwise softmax over all experts. normalize: weights divided by their top-k sum.
// Envelope: num_experts <= kRouterMaxExperts, top_k <= min(kRouterMaxTopK, num_experts).
void launch_router_topk(const float* logits, int64_t num_tokens, int64_t num_experts, int64_t top_k,
                        bool sigmoid_scoring, bool normalize, int32_t* ids, float* weights, cudaStream_t stream);

}  // namespace moex::cuda
