// What the batch-1 MoE kernels after the router's logits take (moe_topk_gate_up.cu, moe_one_launch.cu): the
// arguments of launch_moe_topk_gate_up_one_token as one kernel parameter.
#pragma once

#include <cstdint>

#include "moex/backend/cuda/kernels/moe.cuh"

namespace moex::cuda {

struct OneTokenMoeParams {
  const float* x;  // the normalised row [hidden]
  const float* logits;
  int hidden, ffn, num_experts, top_k;
  bool sigmoid_scoring, normalize;
  const MoeExpertPtrs* table;
  MoePlanBuffers plan;
  float* h;  // [top_k, ffn]: row r = the r-th pick in expert order (the plan's row r)
  ResidualNormIn residual;  // x = (x + d0) + d1
};

inline OneTokenMoeParams one_token_moe_params(const float* x, const float* logits, int64_t hidden, int64_t ffn,
                                              int64_t num_experts, int64_t top_k, bool sigmoid_scoring,
                                              bool normalize, const MoeExpertPtrs* table, const MoePlanBuffers& plan,
                                              float* h, const ResidualNormIn& residual) {
  return OneTokenMoeParams{x,
                           logits,
                           static_cast<int>(hidden),
                           static_cast<int>(ffn),
                           static_cast<int>(num_experts),
                           static_cast<int>(top_k),
                           sigmoid_scoring,
                           normalize,
                           table,
                           plan,
                           h,
                           residual};
}

}  // namespace moex::cuda
