// Rotary position embedding (rotate-half / GPT-NeoX convention), in place.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "moex/backend/cuda/kernels/attention.cuh"

namespace moex::cuda {

// x [n, heads, head_dim]; token i sits at positions[i] (device); the first rotary_dim dims of each head
// rotate, pairing dim d with d + rotary_dim / 2. rotary_dim even, <= head_dim.
void launch_rope(float* x, const int32_t* positions, int64_t n, int64_t heads, int64_t head_dim,
                 int64_t rotary_dim, double theta, cudaStream_t stream);

constexpr int64_t kQkNormRopeMaxHeadDim = 256;

// q [n, heads, head_dim] and k [n, kv_heads, head_dim] in one launch: each head row optionally RMS-normalised
// over head_dim with q_norm / k_norm (fp32 or bf16 [head_dim]; both null: no norm; Qwen3's per-head q/k norm),
// then rotated as launch_rope. head_dim <= kQkNormRopeMaxHeadDim.
// Where the step's rotated k rows and its v rows [n, kv_heads, head_dim] go in the paged cache, as
// launch_kv_write_paged stores them (k_pages null: no cache write).
struct KvWrite {
  const float* v = nullptr;
  float* k_pages = nullptr;
  float* v_pages = nullptr;
  PagedKvRows rows;
};
// With kv.k_pages set, the rotated k and v also go to the cache (kv_write in the same launch).
void launch_qk_norm_rope(float* q, float* k, int64_t n, int64_t heads, int64_t kv_heads, int64_t head_dim,
                         const void* q_norm, const void* k_norm, bool norm_bf16, float eps, const int32_t* positions,
                         int64_t rotary_dim, double theta, const KvWrite& kv, cudaStream_t stream);

}  // namespace moex::cuda
