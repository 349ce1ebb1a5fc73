// One attention head's row through the optional per-head RMSNorm (Qwen3's q/k norm) and RoPE (rotate-half),
// by one warp, with transformers' fp32 frequency recipe. qk_norm_rope_kernel (rope.cu) and the decode attention
// kernel's RoPE prologue (attention.cu) both use it, so the rows they produce are bit-identical. CUDA-only header.
#pragma once

#include "moex/backend/cuda/kernels/common.cuh"

namespace moex::cuda {

struct HeadNormRope {
  const void* norm = nullptr;  // fp32 or bf16 [head_dim]; null: no norm
  bool norm_bf16 = false;
  float eps = 0.f;
  int rotary_dim = 0;  // even, <= head_dim: dim d pairs with d + rotary_dim / 2
  float theta = 0.f;
};

// What a lane of warp_norm_rope_head needs besides the row: its dims' norm weights and rotation, none of which
// depends on the kernel before. Kernels compute it before their PDL wait (the norm weight is a global load, the
// rotation a powf and a sincosf per dim), so that after the wait only the row's load and the warp's sum remain.
// Lane dims are d = lane + 32 i, i < kHeadRopeLaneDims (head_dim <= 32 kHeadRopeLaneDims).
constexpr int kHeadRopeLaneDims = 8;
struct LaneRope {
  float w[kHeadRopeLaneDims];    // norm weight of the lane's dims (1 without a norm: unused)
  float cos_v[kHeadRopeLaneDims];
  float sin_v[kHeadRopeLaneDims];
};

// The norm weight of dim d (1 without a norm).
__device__ __forceinline__ float head_norm_weight(const HeadNormRope& r, int d) {
  if (!r.norm) return 1.f;
  return r.norm_bf16 ? __bfloat162float(static_cast<const bf16*>(r.norm)[d]) : static_cast<const float*>(r.norm)[d];
}

__device__ __forceinline__ void prepare_lane_rope(int head_dim, const HeadNormRope& r, float pos, int lane,
                                                  LaneRope* lr) {
  const int half = r.rotary_dim / 2;
#pragma unroll
  for (int i = 0; i < kHeadRopeLaneDims; ++i) {
    const int d = lane + 32 * i;
    lr->w[i] = 1.f;
    lr->cos_v[i] = 1.f;
    lr->sin_v[i] = 0.f;
    if (d >= head_dim) continue;
    lr->w[i] = head_norm_weight(r, d);
    if (d < r.rotary_dim) {
      const int pair = d < half ? d : d - half;
      const float inv_freq = 1.f / powf(r.theta, static_cast<float>(2 * pair) / static_cast<float>(r.rotary_dim));
      sincosf(pos * inv_freq, &lr->sin_v[i], &lr->cos_v[i]);
    }
  }
}

// s (the warp's own [head_dim] of shared memory) = row, RMS-normalised when r.norm is set; then out(d, value) for
// each of the lane's dims (d = lane, lane + 32, ...), the first rotary_dim of them rotated with lr's angles (at
// the position prepare_lane_rope was given). Every lane of the warp must call it.
template <typename Out>
__device__ __forceinline__ void warp_norm_rope_head_prepared(const float* row, float* s, int head_dim,
                                                             const HeadNormRope& r, const LaneRope& lr, int lane,
                                                             Out out) {
  float sum_sq = 0.f;
#pragma unroll
  for (int i = 0; i < kHeadRopeLaneDims; ++i) {
    const int d = lane + 32 * i;
    if (d < head_dim) {
      const float v = row[d];
      s[d] = v;
      sum_sq += v * v;
    }
  }
  if (r.norm) {
    const float inv = rsqrtf(warp_sum(sum_sq) / static_cast<float>(head_dim) + r.eps);
#pragma unroll
    for (int i = 0; i < kHeadRopeLaneDims; ++i) {
      const int d = lane + 32 * i;
      if (d < head_dim) s[d] = s[d] * inv * lr.w[i];
    }
  }
  __syncwarp();
  const int half = r.rotary_dim / 2;
#pragma unroll
  for (int i = 0; i < kHeadRopeLaneDims; ++i) {
    const int d = lane + 32 * i;
    if (d >= head_dim) break;
    float v = s[d];
    if (d < r.rotary_dim)
      v = d < half ? s[d] * lr.cos_v[i] - s[d + half] * lr.sin_v[i] : s[d] * lr.cos_v[i] + s[d - half] * lr.sin_v[i];
    out(d, v);
  }
}

// Both steps at once, for callers with nothing to overlap them with.
template <typename Out>
__device__ __forceinline__ void warp_norm_rope_head(const float* row, float* s, int head_dim, const HeadNormRope& r,
                                                    float pos, int lane, Out out) {
  LaneRope lr;
  prepare_lane_rope(head_dim, r, pos, lane, &lr);
  warp_norm_rope_head_prepared(row, s, head_dim, r, lr, lane, out);
}

}  // namespace moex::cuda
