// Causal GQA attention and KV writes over a paged fp32 KV cache (pages [num_pages, page_size, kv_heads,
// head_dim], block tables per sequence): one launch for a whole step, whether its rows are one sequence's
// prefill chunk (blocks tile several queries) or one decode row per sequence (flash-decoding: keys split
// across blocks, then merged).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace moex::cuda {

constexpr int kAttentionMaxHeadDim = 256;

// A step's rows in the paged cache, in device memory (the backend's copy of a KvStep).
struct PagedKvRows {
  const int32_t* row_seq = nullptr;  // [num_rows] index into tables' rows
  const int32_t* row_pos = nullptr;  // [num_rows]
  const int32_t* tables = nullptr;   // [num_seqs, table_stride] page ids
  int64_t table_stride = 0;
  int64_t page_size = 0;
};

// Whether a step's n rows are one sequence at consecutive positions (a prefill chunk): AttentionShape's
// one_sequence.
bool rows_form_one_chunk(const int32_t* row_seq, const int32_t* row_pos, int64_t n);

struct AttentionShape {
  int64_t num_queries = 0;  // rows of the step
  int64_t heads = 0;
  int64_t kv_heads = 0;     // heads % kv_heads == 0
  int64_t head_dim = 0;     // <= kAttentionMaxHeadDim
  // >= every row_pos + 1; sizes the split-K grid. A recorded decode step passes its bucket's key count, so one
  // grid serves every position of the bucket (blocks past the real length write empty partials and exit).
  int64_t max_keys = 0;
  // The rows are one sequence at consecutive positions (prefill): a block then tiles queries, sharing K/V
  // tiles across them. Otherwise a block serves one row's heads of a GQA group.
  bool one_sequence = false;
  // Every row is a different sequence: the keys a row reads besides its own were written by earlier steps, so
  // a decode kernel may load them before its PDL wait (decode_attention_dims_kernel).
  bool distinct_sequences = false;
  // Halves of the SMs (32 K registers each) the kernel before leaves empty while it runs (decode at batch 1: the
  // normed q/k/v GEMV's, gemv_normed_free_half_sms): decode blocks of 8 warps are taken where the grid fits there
  // (attention.cu, wide_decode_heads). 0: unknown (4-warp blocks).
  int64_t free_half_sms = 0;
};

// Whether no two of a step's n rows belong to the same sequence (AttentionShape::distinct_sequences).
bool rows_are_distinct_sequences(const int32_t* row_seq, int64_t n);

// The keys a decode step's attention grid is sized for: the power of two >= 256 that holds `keys`. Steps of one
// bucket share one recording (the backend keys its CUDA graphs by it) and one split of the keys (launch_attention
// at a bucket's max_keys; eager steps split by the same bucket).
int64_t attention_key_bucket(int64_t keys);

// Scratch needed at this shape: the split-K partials (none when a single split suffices, or the splits merge in a
// thread block cluster) and the tensor-core prefill kernel's dense bf16 copies of K and V (shape.max_keys keys).
size_t attention_workspace_bytes(const AttentionShape& shape, int num_sms);

// Blocks of the thread block cluster that splits a batch-1 decode row's keys at this shape (they merge through
// distributed shared memory, without a merge launch), or 0 where the splits are not a cluster. Reads the same A/B
// switches as launch_attention (MOEX_CUDA_ATTENTION_CLUSTER, MOEX_CUDA_ATTENTION_KEY_LANES).
int attention_cluster_splits(const AttentionShape& shape, int num_sms);
// Warps a block of the decode kernels has at this shape: 8 where the dims-per-lane kernel's grid fits in the halves
// of the SMs the kernel before leaves empty (AttentionShape::free_half_sms), else 4; 0 where no decode kernel takes
// the shape. Reads MOEX_CUDA_ATTENTION_WARPS as launch_attention does.
int attention_decode_warps(const AttentionShape& shape, int num_sms);

// The step's RoPE and KV write done by the decode attention kernel itself (decode_rope_fits): q holds the
// unrotated rows, k / v the step's rows [n, kv_heads, head_dim] (k unrotated); the kernel normalises (q_norm /
// k_norm: fp32 or bf16 [head_dim], or null) and rotates them as launch_qk_norm_rope does, bit for bit, and stores
// the rotated k and v at each row's position in k_pages / v_pages. At one query per sequence this is a few hundred
// values per block, and a launch of its own was a dependent kernel of ~5 us per layer (H200).
struct DecodeRope {
  const float* k = nullptr;
  const float* v = nullptr;
  float* k_pages = nullptr;
  float* v_pages = nullptr;
  const void* q_norm = nullptr;
  const void* k_norm = nullptr;
  bool norm_bf16 = false;
  float eps = 0.f;
  int rotary_dim = 0;
  float theta = 0.f;
};
// Whether launch_attention can take a DecodeRope at this shape: decode rows of distinct sequences on the decode
// kernel, head_dim <= 256, rotary_dim even and <= head_dim.
bool decode_rope_fits(const AttentionShape& shape, int64_t rotary_dim);

// q/out [n, heads, head_dim] fp32; row i attends to positions 0..row_pos[i] of its sequence.
// workspace: attention_workspace_bytes(shape, num_sms) bytes. rope (decode_rope_fits only): see DecodeRope.
void launch_attention(const float* q, const float* k_pages, const float* v_pages, const PagedKvRows& rows, float* out,
                      const AttentionShape& shape, float scale, void* workspace, int num_sms, cudaStream_t stream,
                      const DecodeRope* rope = nullptr);

// Whether launch_attention runs this shape on the tensor cores (prefill chunks of >= 16 queries), which round
// q, k, v and the softmax probabilities to bf16 (relative error ~3e-3, as FlashAttention) instead of fp32.
bool attention_rounds_to_bf16(const AttentionShape& shape);

// Row i of k/v [n, row_elems] goes to position row_pos[i] of sequence row_seq[i]; row_elems = kv_heads * head_dim.
void launch_kv_write_paged(const float* k, const float* v, float* k_pages, float* v_pages, const PagedKvRows& rows,
                           int64_t n, int64_t row_elems, cudaStream_t stream);

}  // namespace moex::cuda
