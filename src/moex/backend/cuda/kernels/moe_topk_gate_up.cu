// Decode at batch 1: the top-k and the plan inside the gate/up launch (MOEX_CUDA_TOPK_IN_GATE_UP; moe.cuh has
// the contract). The router launch then only computes the logits, in a grid of one expert row per warp that
// needs no hand-off between its blocks.
// Why: with 128 experts (Model B) the router is 16 blocks whose logits must meet in one block for the top-k and
// the plan. As one thread block cluster that hand-off is one hardware barrier, but the router's blocks started
// 0.9 us before o_proj ended and ended 8.4 us after it (H200), for 0.5 MB of weights; with logits only they end
// 3.7 us after it. Every gate/up block then reads the num_experts logits (L2) and finds its pick itself (the
// pick of its blockIdx.y in expert order); block (0, 0) writes ids, weights and the plan that the down kernel
// reads, and the blocks of row 0 write the residual sum, which the router's blocks, all reading x, could not
// write without the hand-off.
#include "moex/backend/cuda/kernels/gemv_core.cuh"
#include "moex/backend/cuda/kernels/launch.cuh"
#include "moex/backend/cuda/kernels/moe.cuh"
#include "moex/backend/cuda/kernels/moe_one_token.cuh"
#include "moex/backend/cuda/kernels/residual_norm.cuh"
#include "moex/backend/cuda/kernels/router_warp.cuh"

namespace moex::cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;

// Rank of pick a among the token's picks in expert order (a token's picks are distinct experts).
__device__ __forceinline__ int pick_rank(const int32_t* ids, int top_k, int a) {
  int rank = 0;
  for (int b = 0; b < top_k; ++b) rank += ids[b] < ids[a];
  return rank;
}

// PER_LANE: logits a lane holds (num_experts <= 32 * PER_LANE); U: gate/up loads in flight per lane and row
// (moe_one_token_gate_up_unroll). The gate/up rows as moe_gate_up_kernel<1, U> computes them.
// The block's expert: warp 0 selects the top k with router_warp's selection (warp_select_top_k: the same set)
// and takes the r-th of them in expert order; block (0, 0)'s warp 1 runs router_warp itself for the weights and
// writes what the planning router launch writes. One warp a block: an earlier version ranked every expert
// against all others in shared memory (num_experts^2 comparisons over 4 warps, 6 blocks an SM: ~3 us of issue
// slots before Model B's first weight load, H200 trace).
// The launch bounds keep the blocks per SM of moe_gate_up_kernel<1, U> (6 at U = 2: 40 registers, Model B's 768
// blocks in one wave; 4 at U = 4).
template <int PER_LANE, int U>
__global__ __launch_bounds__(kThreads, U == 2 ? 6 : 4) void moe_topk_gate_up_kernel(OneTokenMoeParams p) {
  __shared__ const uint16_t* s_gate[32 * PER_LANE];
  __shared__ const uint16_t* s_up[32 * PER_LANE];
  __shared__ int32_t s_ids[kMoeOneTokenMaxTopK];
  __shared__ float s_weights[kMoeOneTokenMaxTopK];
  __shared__ int s_expert;
  pdl_launch_dependents();
  // Before the wait: the layer's expert table (uploaded once per layer), so the pick's rows are one shared memory
  // read away once it is known.
  for (int e = threadIdx.x; e < p.num_experts; e += kThreads) {
    s_gate[e] = p.table[e].gate;
    s_up[e] = p.table[e].up;
  }
  pdl_wait();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const bool planner = blockIdx.x == 0 && blockIdx.y == 0;
  const int r = blockIdx.y;
  // The residual sum: the router launch's blocks all read x, and they are done (the wait); down and the next
  // layer's launches wait for this one. Written by the blocks of row 0.
  if (blockIdx.y == 0) one_token_residual_sum(p, blockIdx.x, gridDim.x);
  if (warp == 0) {
    float value[PER_LANE];
#pragma unroll
    for (int i = 0; i < PER_LANE; ++i) {  // from L2: the router launch just wrote them
      const int e = lane + 32 * i;
      value[i] = e < p.num_experts ? __ldcg(p.logits + e) : -INFINITY;
    }
    int my_id = -1;  // lane k: the k-th pick
    warp_select_top_k(value, p.num_experts, p.top_k, [&](int k, float, int e) {
      if (lane == k) my_id = e;
    });
    const int rank = warp_pick_rank(my_id, p.top_k);  // of this lane's pick in expert order
    // NaN logits leave the selection without valid ids: the block then computes expert 0's rows (garbage out, as
    // on every path, but no read past the table).
    const bool valid = my_id >= 0 && my_id < p.num_experts;
    const unsigned mine = __ballot_sync(0xffffffffu, lane < p.top_k && rank == r && valid);
    const int expert = __shfl_sync(0xffffffffu, my_id, mine ? __ffs(mine) - 1 : 0);
    if (lane == 0) s_expert = mine ? expert : 0;
  } else if (planner && warp == 1) {
    router_warp<false, PER_LANE>(p.logits, p.num_experts, p.top_k, p.sigmoid_scoring, p.normalize, s_ids, s_weights);
  }
  __syncthreads();
  if (planner && threadIdx.x < p.top_k) {
    const int a = threadIdx.x, e = s_ids[a];
    const MoeExpertPtrs we = p.table[e >= 0 && e < p.num_experts ? e : 0];  // NaN logits: no id (see above)
    write_one_token_plan(p, a, e, s_weights[a], pick_rank(s_ids, p.top_k, a), we);
  }
  const int expert = s_expert;
  const int j = blockIdx.x * kWarps + warp;
  if (j < p.ffn) one_token_swiglu_row<U>(p, s_gate[expert], s_up[expert], r, j, lane);
}

template <int U>
auto topk_gate_up_instance(int64_t num_experts) {
  if (num_experts <= 32) return moe_topk_gate_up_kernel<1, U>;
  if (num_experts <= 128) return moe_topk_gate_up_kernel<4, U>;
  return moe_topk_gate_up_kernel<kRouterPerLane, U>;
}

}  // namespace

void launch_moe_topk_gate_up_one_token(const float* x, const float* logits, int64_t hidden, int64_t ffn,
                                       int64_t num_experts, int64_t top_k, bool sigmoid_scoring, bool normalize,
                                       const MoeExpertPtrs* table, const MoePlanBuffers& plan, float* h,
                                       const ResidualNormIn& residual, float* out, int num_sms, cudaStream_t stream) {
  const OneTokenMoeParams p = one_token_moe_params(x, logits, hidden, ffn, num_experts, top_k, sigmoid_scoring,
                                                  normalize, table, plan, h, residual);
  const dim3 grid(static_cast<unsigned>(ceil_div(ffn, int64_t(kWarps))), static_cast<unsigned>(top_k)), block(kThreads);
  launch_pdl(moe_one_token_gate_up_unroll(hidden) == 2 ? topk_gate_up_instance<2>(num_experts)
                                                       : topk_gate_up_instance<4>(num_experts),
             grid, block, 0, stream, p);
  // The plan is written during the gate/up launch: the down kernel must not read it before its wait.
  launch_moe_down_one_token(h, plan.groups, static_cast<int>(top_k), hidden, ffn, plan.slot, plan.weights, out,
                            num_sms, stream, /*preload_down=*/false);
}

}  // namespace moex::cuda
