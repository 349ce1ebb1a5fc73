// Router: each lane holds num_experts / 32 logits in registers; top-k is k rounds of a warp arg-max with
// the (value, lower id) order, so there is no sort and no shared memory.
#include "moex/backend/cuda/kernels/common.cuh"
#include "moex/backend/cuda/kernels/router.cuh"

namespace moex::cuda {
namespace {

constexpr int kPerLane = kRouterMaxExperts / 32;
constexpr int kWarps = 4;

// a beats b: higher value, then lower id.
__device__ __forceinline__ bool better(float va, int ia, float vb, int ib) {
  return va > vb || (va == vb && ia < ib);
}

__global__ __launch_bounds__(kWarps * 32) void router_kernel(const float* logits, int num_tokens, int num_experts,
                                                              int top_k, bool sigmoid_scoring, bool normalize,
                                                              int32_t* ids, float* weights) {
  int lane = threadIdx.x & 31;
  int token = blockIdx.x * kWarps + (threadIdx.x >> 5);
  if (token >= num_tokens) return;
  const float* row = logits + int64_t(token) * num_experts;
  float value[kPerLane];
  float row_max = -INFINITY;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    int e = lane + 32 * i;
    value[i] = e < num_experts ? row[e] : -INFINITY;
    row_max = fmaxf(row_max, value[i]);
  }
  row_max = warp_max(row_max);
  float denom = 0.f;
  if (!sigmoid_scoring) {
#pragma unroll
    for (int i = 0; i < kPerLane; ++i)
      if (lane + 32 * i < num_experts) denom += expf(value[i] - row_max);
    denom = warp_sum(denom);
  }
  uint32_t taken = 0;  // bit i: expert lane + 32 i already selected
  float picked_sum = 0.f;
  float my_weight = 0.f;  // lane j keeps the weight of pick j (top_k <= 32)
  int my_id = 0;
  for (int k = 0; k < top_k; ++k) {
    float best_v = -INFINITY;
    int best_e = 0x7fffffff;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      int e = lane + 32 * i;
      if (e < num_experts && !(taken >> i & 1u) && better(value[i], e, best_v, best_e)) {
        best_v = value[i];
        best_e = e;
      }
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      float ov = __shfl_xor_sync(0xffffffffu, best_v, offset);
      int oe = __shfl_xor_sync(0xffffffffu, best_e, offset);
      if (better(ov, oe, best_v, best_e)) {
        best_v = ov;
        best_e = oe;
      }
    }
    if ((best_e & 31) == lane) taken |= 1u << (best_e >> 5);
    float score = sigmoid_scoring ? 1.f / (1.f + expf(-best_v)) : expf(best_v - row_max) / denom;
    picked_sum += score;
    if (lane == k) {
      my_weight = score;
      my_id = best_e;
    }
  }
  if (lane < top_k) {
    ids[int64_t(token) * top_k + lane] = my_id;
    weights[int64_t(token) * top_k + lane] = normalize ? my_weight / picked_sum : my_weight;
  }
}

}  // namespace

void launch_router_topk(const float* logits, int64_t num_tokens, int64_t num_experts, int64_t top_k,
                        bool sigmoid_scoring, bool normalize, int32_t* ids, float* weights, cudaStream_t stream) {
  if (num_tokens == 0) return;
  unsigned blocks = static_cast<unsigned>(ceil_div(num_tokens, kWarps));
  router_kernel<<<blocks, kWarps * 32, 0, stream>>>(logits, static_cast<int>(num_tokens),
                                                    static_cast<int>(num_experts), static_cast<int>(top_k),
                                                    sigmoid_scoring, normalize, ids, weights);
}

}  // namespace moex::cuda
