// Device-side routing and planning for the MoE decode path: one block routes every token (a warp each,
// router_warp.cuh), then orders the (token, pick) assignments by expert exactly as plan_moe() does on the
// host and cuts them into GEMV groups. The expert kernels then read the plan from device memory: no host
// round trip per MoE layer, so a decode step can be recorded as one CUDA graph.
#include "moex/backend/cuda/kernels/launch.cuh"
#include "moex/backend/cuda/kernels/moe.cuh"
#include "moex/backend/cuda/kernels/router_warp.cuh"

namespace moex::cuda {
namespace {

constexpr int kThreads = 256;

__global__ __launch_bounds__(kThreads) void moe_route_plan_kernel(const float* logits, int num_tokens,
                                                                  int num_experts, int top_k, bool sigmoid_scoring,
                                                                  bool normalize, const MoeExpertPtrs* table,
                                                                  int max_group_rows, int32_t* ids, float* weights,
                                                                  int32_t* row_token, int32_t* slot,
                                                                  MoeGroup* groups, int32_t* num_groups) {
  __shared__ int32_t s_id[kMoeRoutePlanMaxAssignments];
  __shared__ int32_t s_sorted[kMoeRoutePlanMaxAssignments];  // expert of permuted row r
  pdl_launch_dependents();
  pdl_wait();
  const int total = num_tokens * top_k;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int token = warp; token < num_tokens; token += kThreads / 32) {
    router_warp(logits + int64_t(token) * num_experts, num_experts, top_k, sigmoid_scoring, normalize,
                ids + int64_t(token) * top_k, weights + int64_t(token) * top_k);
    __syncwarp();
    if (lane < top_k) s_id[token * top_k + lane] = ids[int64_t(token) * top_k + lane];
  }
  __syncthreads();
  // Row of assignment a: its rank in (expert, a) order; total <= 256, so a linear scan per thread is cheap.
  for (int a = threadIdx.x; a < total; a += kThreads) {
    const int e = s_id[a];
    int rank = 0;
    for (int b = 0; b < total; ++b) {
      const int eb = s_id[b];
      rank += eb < e || (eb == e && b < a);
    }
    slot[a] = rank;
    row_token[rank] = a / top_k;
    s_sorted[rank] = e;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int count = 0, run_begin = 0;
    for (int r = 0; r < total; ++r) {
      const int e = s_sorted[r];
      if (r > 0 && e != s_sorted[r - 1]) run_begin = r;
      if ((r - run_begin) % max_group_rows == 0) {
        const MoeExpertPtrs w = table[e];
        groups[count++] = MoeGroup{w.gate, w.up, w.down, r, 1};
      } else {
        ++groups[count - 1].num_rows;
      }
    }
    *num_groups = count;
  }
}

}  // namespace

void launch_moe_route_plan(const float* logits, int64_t num_tokens, int64_t num_experts, int64_t top_k,
                           bool sigmoid_scoring, bool normalize, const MoeExpertPtrs* table, int max_group_rows,
                           int32_t* ids, float* weights, int32_t* row_token, int32_t* slot, MoeGroup* groups,
                           int32_t* num_groups, cudaStream_t stream) {
  launch_pdl(moe_route_plan_kernel, dim3(1), dim3(kThreads), 0, stream, logits, static_cast<int>(num_tokens),
             static_cast<int>(num_experts), static_cast<int>(top_k), sigmoid_scoring, normalize, table,
             max_group_rows, ids, weights, row_token, slot, groups, num_groups);
}

}  // namespace moex::cuda
