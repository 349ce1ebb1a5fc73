// Causal GQA attention over an fp32 KV cache, for prefill (many queries) and decode (few queries, keys
// split across blocks, flash-decoding style, then merged).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace moex::cuda {

constexpr int kAttentionMaxHeadDim = 256;

struct AttentionShape {
  int64_t num_queries = 0;  // n: queries at positions start_pos .. start_pos + n - 1
  int64_t heads = 0;
  int64_t kv_heads = 0;     // heads % kv_heads == 0
  int64_t head_dim = 0;     // <= kAttentionMaxHeadDim
  int64_t start_pos = 0;    // keys visible to query i: [0, start_pos + i]
  // When set, the kernels read start_pos from this device int instead (a recorded decode step replays for
  // every position of a bucket); start_pos above is then the largest value it may hold and sizes the grid.
  const int32_t* device_start_pos = nullptr;
};

// Scratch needed for the split-K partials at this shape (0 when a single split suffices).
size_t attention_workspace_bytes(const AttentionShape& shape, int num_sms);

// q [n, heads, head_dim], k_cache/v_cache [>= start_pos + n, kv_heads, head_dim], out [n, heads, head_dim],
// all fp32. scale multiplies q.k. workspace: attention_workspace_bytes(shape, num_sms) bytes.
void launch_attention(const float* q, const float* k_cache, const float* v_cache, float* out,
                      const AttentionShape& shape, float scale, void* workspace, int num_sms, cudaStream_t stream);

}  // namespace moex::cuda
