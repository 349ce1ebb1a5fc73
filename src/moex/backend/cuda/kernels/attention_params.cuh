// What every attention kernel of attention.cu and attention_prefill.cu is launched with, and the layout of the
// split-K partials that attention_merge_kernel combines. CUDA-only header.
#pragma once

#include "moex/backend/cuda/kernels/attention.cuh"
#include "moex/backend/cuda/kernels/head_rope.cuh"

#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace moex::cuda {

// The slot of a sequence's position `key` in the paged pools: its page from the sequence's block table, then the
// row inside the page. I keeps the caller's integer width (32-bit division in the decode kernels).
template <typename I>
__device__ __forceinline__ int64_t paged_slot(const int32_t* table, I key, I page_size) {
  return int64_t(table[key / page_size]) * page_size + key % page_size;
}

struct AttentionParams {
  const float* q;
  const float* k_pages;
  const float* v_pages;
  PagedKvRows kv;
  float* out;
  // Split-K partials, null with one split. Row (kv_head, r) with r = query * group + head_in_group:
  // unnormalised acc [splits, kv_heads * rows_per_head, head_dim] and (max, sum) in log2 units [.., 2].
  float* part_acc;
  float* part_ml;
  int n, heads, kv_heads, head_dim, group, rows_per_head;
  int head_chunks;  // blocks per row in the fp32 kernel's one-row-per-block layout
  bool one_sequence;
  int keys_per_split;
  // Decode splits as one thread block cluster along z (the dims-per-lane kernel at batch 1): the blocks merge their
  // splits through distributed shared memory and store out; part_acc / part_ml are not used.
  bool cluster_merge;
  float scale_log2;  // softmax scale times log2(e): the kernels exponentiate with exp2
  // Decode rows with the step's RoPE inside (launch_attention with a DecodeRope): q and k_new [n, kv_heads,
  // head_dim] unrotated, v_new the step's v rows; the (query, kv head) block of head 0 of the group and split 0
  // stores the rotated k and v in k_write / v_write (the same pools as k_pages / v_pages).
  const float* k_new;
  const float* v_new;
  float* k_write;
  float* v_write;
  HeadNormRope q_rope, k_rope;
  // The tensor-core prefill kernel's K and V as dense bf16 copies [kv_heads][dense_keys][head_dim] of the
  // sequence's keys 0..row_pos[n - 1] (launch_prefill_dense_kv), or null: the kernel then gathers the fp32 pages.
  const __nv_bfloat16* k_dense;
  const __nv_bfloat16* v_dense;
  int64_t dense_keys;
};

// The tensor-core kernel for prefill chunks (attention_prefill.cu).
constexpr int kPrefillMmaMinQueries = 16;
// Whether it takes the step: one sequence's chunk of >= kPrefillMmaMinQueries queries, head_dim a multiple of
// 4 up to kAttentionMaxHeadDim (float4 loads of the fp32 cache; dims are padded with zeros to 64/128/256).
bool prefill_mma_fits(const AttentionShape& shape);
// The key tile of the kernel picked for head_dim: splits must be multiples of it.
int prefill_mma_key_tile(int head_dim);
// Queries per block (warps of 16) of the kernel picked for head_dim.
int prefill_mma_queries(int head_dim);
// grid (query tiles, heads, splits).
void launch_prefill_mma(const AttentionParams& p, dim3 grid, cudaStream_t stream);

// Whether the tensor-core kernel reads K and V from dense bf16 copies made once per launch (head_dim % 8 == 0,
// for 16-byte copies) instead of gathering and rounding the fp32 pages every key tile. MOEX_CUDA_PREFILL_KV_BF16=0
// keeps the gather (A/B; read at every call, so tests compare both: the same bits).
bool prefill_dense_kv_takes(const AttentionShape& shape);
// The copies' bytes (K and V) for shape.max_keys keys, 0 where prefill_dense_kv_takes is false.
size_t prefill_dense_kv_bytes(const AttentionShape& shape);
// Writes p.k_dense / p.v_dense (p.dense_keys >= keys) from the pages: keys 0..row_pos[n - 1] of row 0's
// sequence, each rounded to bf16 as the gathering kernel rounds it in shared memory.
void launch_prefill_dense_kv(const AttentionParams& p, cudaStream_t stream);

}  // namespace moex::cuda
