// The fused router's per-token work for one warp, shared by the router kernel and the device-side MoE
// planner: each lane holds num_experts / 32 logits in registers; top-k is k rounds of a warp arg-max with
// the (value, lower id) order, so there is no sort and no shared memory. CUDA-only header.
#pragma once

#include "moex/backend/cuda/kernels/common.cuh"
#include "moex/backend/cuda/kernels/router.cuh"

namespace moex::cuda {

constexpr int kRouterPerLane = kRouterMaxExperts / 32;

// The selection's order as integers (router_key): a higher value first, a NaN below every number (the host
// route()'s order), -0 as +0; ties go to the lower id. Every round therefore picks a real expert, even from a row
// of NaNs (a NaN in the residual stream): the device planners index the expert table with these ids, and the
// float order before (NaN never winning a round) had kept the sentinel id 0x7fffffff for a round of NaNs. Keys
// are made once per selection, so each comparison of the k rounds stays as short as the float one: NaN tests
// inside the comparison had cost Model B's batch-1 decode 1.9% (the top k is on the critical path of every
// gate/up block; H200, 12-layer Model B, 0.7321 vs 0.7183 ms/token against the float order); with the keys
// 0.7240 vs 0.7222 (another call).
__device__ __forceinline__ uint32_t router_key(float v) {
  if (isnan(v)) return 0u;
  const uint32_t u = v == 0.f ? 0u : __float_as_uint(v);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
// The logit a key stands for (NaN for key 0).
__device__ __forceinline__ float router_key_value(uint32_t key) {
  if (key == 0u) return __int_as_float(0x7fc00000);
  return __uint_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}
__device__ __forceinline__ bool router_better(uint32_t ka, int ia, uint32_t kb, int ib) {
  return ka > kb || (ka == kb && ia < ib);
}

// router_warp's top-k selection: k rounds of a warp arg-max over the lanes' logits (value[i]: expert lane + 32 i;
// entries past num_experts are ignored) in router_better's order. Every lane calls pick(k, value, id) with round
// k's winner (its logit as router_key_value gives it back).
template <int PER_LANE, typename Pick>
__device__ __forceinline__ void warp_select_top_k(const float (&value)[PER_LANE], int num_experts, int top_k,
                                                  Pick&& pick) {
  const int lane = threadIdx.x & 31;
  uint32_t key[PER_LANE];
#pragma unroll
  for (int i = 0; i < PER_LANE; ++i) key[i] = router_key(value[i]);
  uint32_t taken = 0;  // bit i: expert lane + 32 i already selected
  for (int k = 0; k < top_k; ++k) {
    uint32_t best_k = 0;  // with the largest id: any expert beats it, a NaN one too
    int best_e = 0x7fffffff;
#pragma unroll
    for (int i = 0; i < PER_LANE; ++i) {
      int e = lane + 32 * i;
      if (e < num_experts && !(taken >> i & 1u) && router_better(key[i], e, best_k, best_e)) {
        best_k = key[i];
        best_e = e;
      }
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      uint32_t ok = __shfl_xor_sync(0xffffffffu, best_k, offset);
      int oe = __shfl_xor_sync(0xffffffffu, best_e, offset);
      if (router_better(ok, oe, best_k, best_e)) {
        best_k = ok;
        best_e = oe;
      }
    }
    if ((best_e & 31) == lane) taken |= 1u << (best_e >> 5);
    pick(k, router_key_value(best_k), best_e);
  }
}

// Routes one token (row: its num_experts logits); lanes < top_k write pick `lane` to ids[lane], weights[lane]
// and return its id (the other lanes return -1). SHARED: the row is in the block's shared memory (plain loads);
// otherwise it is read from L2.
// PER_LANE: logits each lane holds (num_experts <= 32 * PER_LANE); fewer registers for small expert counts.
template <bool SHARED = false, int PER_LANE = kRouterPerLane>
__device__ __forceinline__ int router_warp(const float* row, int num_experts, int top_k, bool sigmoid_scoring,
                                            bool normalize, int32_t* ids, float* weights) {
  const int lane = threadIdx.x & 31;
  float value[PER_LANE];
  float row_max = -INFINITY;
#pragma unroll
  for (int i = 0; i < PER_LANE; ++i) {
    int e = lane + 32 * i;
    // L2 unless shared: other blocks may have just written the row.
    value[i] = e < num_experts ? (SHARED ? row[e] : __ldcg(row + e)) : -INFINITY;
    row_max = fmaxf(row_max, value[i]);
  }
  row_max = warp_max(row_max);
  float denom = 0.f;
  if (!sigmoid_scoring) {
#pragma unroll
    for (int i = 0; i < PER_LANE; ++i)
      if (lane + 32 * i < num_experts) denom += expf(value[i] - row_max);
    denom = warp_sum(denom);
  }
  float picked_sum = 0.f;
  float my_weight = 0.f;  // lane j keeps the weight of pick j (top_k <= 32)
  int my_id = 0;
  warp_select_top_k(value, num_experts, top_k, [&](int k, float best_v, int best_e) {
    float score = sigmoid_scoring ? 1.f / (1.f + expf(-best_v)) : expf(best_v - row_max) / denom;
    picked_sum += score;
    if (lane == k) {
      my_weight = score;
      my_id = best_e;
    }
  });
  if (lane < top_k) {
    ids[lane] = my_id;
    weights[lane] = normalize ? my_weight / picked_sum : my_weight;
    return my_id;
  }
  return -1;
}

}  // namespace moex::cuda
