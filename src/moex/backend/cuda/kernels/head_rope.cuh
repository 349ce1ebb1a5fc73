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

// s (the warp's own [head_dim] of shared memory) = row, RMS-normalised when r.norm is set; then out(d, value) for
// each of the lane's dims (d = lane, lane + 32, ...), the first rotary_dim of them rotated at position pos. Every
// lane of the warp must call it.
template <typename Out>
__device__ __forceinline__ void warp_norm_rope_head(const float* row, float* s, int head_dim, const HeadNormRope& r,
                                                    float pos, int lane, Out out) {
  float sum_sq = 0.f;
  for (int d = lane; d < head_dim; d += 32) {
    const float v = row[d];
    s[d] = v;
    sum_sq += v * v;
  }
  if (r.norm) {
    const float inv = rsqrtf(warp_sum(sum_sq) / static_cast<float>(head_dim) + r.eps);
    for (int d = lane; d < head_dim; d += 32) {
      const float w =
          r.norm_bf16 ? __bfloat162float(static_cast<const bf16*>(r.norm)[d]) : static_cast<const float*>(r.norm)[d];
      s[d] = s[d] * inv * w;
    }
  }
  __syncwarp();
  const int half = r.rotary_dim / 2;
  for (int d = lane; d < head_dim; d += 32) {
    float v = s[d];
    if (d < r.rotary_dim) {
      const int pair = d < half ? d : d - half;
      const float inv_freq = 1.f / powf(r.theta, static_cast<float>(2 * pair) / static_cast<float>(r.rotary_dim));
      float sin_v, cos_v;
      sincosf(pos * inv_freq, &sin_v, &cos_v);
      v = d < half ? s[d] * cos_v - s[d + half] * sin_v : s[d] * cos_v + s[d - half] * sin_v;
    }
    out(d, v);
  }
}

}  // namespace moex::cuda
