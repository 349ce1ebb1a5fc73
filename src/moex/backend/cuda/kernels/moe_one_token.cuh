// What the batch-1 MoE kernels after the router's logits share (moe_topk_gate_up.cu, moe_one_launch.cu): the
// arguments of launch_moe_topk_gate_up_one_token as one kernel parameter, and the pieces of work both kernels do
// alike. CUDA-only header.
#pragma once

#include <cstdint>

#include "moex/backend/cuda/kernels/gemv_core.cuh"
#include "moex/backend/cuda/kernels/moe.cuh"
#include "moex/backend/cuda/kernels/residual_norm.cuh"

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

// Part `part` of `parts` of the residual sum x = (x + d0) + d1, a block of blockDim.x threads writing it. The
// router launch has read x (the kernels run after its PDL wait); the down projection writes out, which may be d0,
// only after every part is written.
__device__ __forceinline__ void one_token_residual_sum(const OneTokenMoeParams& p, int part, int parts) {
  for (int c = part * blockDim.x + threadIdx.x; c < p.hidden / 4; c += blockDim.x * parts)
    reinterpret_cast<float4*>(p.residual.x)[c] = residual_sum4(p.residual, c);
}

// Rank of the lane's pick `id` in expert order among the picks lanes 0..top_k - 1 hold (every lane of the warp
// calls it; a token's picks are distinct experts).
__device__ __forceinline__ int warp_pick_rank(int id, int top_k) {
  int rank = 0;
  for (int b = 0; b < top_k; ++b) rank += __shfl_sync(0xffffffffu, id, b) < id;
  return rank;
}

// What launch_moe_router_plan writes for one token's pick a (expert e, weights we, its weight, its rank in expert
// order): the routing and the plan, group r = row r of one row each.
__device__ __forceinline__ void write_one_token_plan(const OneTokenMoeParams& p, int a, int e, float weight, int rank,
                                                     const MoeExpertPtrs& we) {
  p.plan.ids[a] = e;
  p.plan.weights[a] = weight;
  p.plan.slot[a] = rank;
  p.plan.row_token[rank] = 0;
  p.plan.groups[rank] = MoeGroup{we.gate, we.up, we.down, rank, 1};
  if (a == 0) *p.plan.num_groups = p.top_k;
}

// Row j of the pick of rank r whose expert has the gate and up weights given: the warp's gate and up dots with x
// (U loads in flight per lane and row), lane 0 writing silu(gate) * up to h.
template <int U>
__device__ __forceinline__ void one_token_swiglu_row(const OneTokenMoeParams& p, const uint16_t* gate,
                                                     const uint16_t* up, int r, int j, int lane) {
  const bf16* w_rows[2] = {reinterpret_cast<const bf16*>(gate) + int64_t(j) * p.hidden,
                           reinterpret_cast<const bf16*>(up) + int64_t(j) * p.hidden};
  const float* x_rows[1] = {p.x};
  float acc[2][1] = {};
  warp_dot_bf16<2, 1, U>(w_rows, x_rows, 1, p.hidden / 8, lane, acc);
  const float g = warp_sum(acc[0][0]);
  const float u = warp_sum(acc[1][0]);
  if (lane == 0) p.h[int64_t(r) * p.ffn + j] = silu(g) * u;
}

}  // namespace moex::cuda
