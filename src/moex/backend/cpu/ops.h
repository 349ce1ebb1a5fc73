// CPU kernels of the non-GEMM ops, on raw row-major pointers. CpuBackend validates tensors and
// calls these; shapes are in the argument comments. All fp32 unless a dtype is passed.
#pragma once

#include <cstdint>
#include <span>

#include "moex/backend/backend.h"
#include "moex/core/dtype.h"
#include "moex/core/thread_pool.h"

namespace moex::cpu {

// out[r, :] = x[r, :] * rsqrt(mean(x[r, :]^2) + eps) * weight; the mean is accumulated in double.
void rms_norm(ThreadPool& pool, const float* x, const void* weight, DType weight_dtype, float eps, int64_t rows,
              int64_t cols, float* out);
void add(ThreadPool& pool, const float* a, const float* b, float* out, int64_t count);
void clamp(ThreadPool& pool, float* x, int64_t count, float limit);
// out = silu(gate) * up. silu_mul_span is the single-threaded piece the MoE kernel reuses.
void silu_mul(ThreadPool& pool, const float* gate, const float* up, float* out, int64_t count);
void silu_mul_span(const float* gate, const float* up, float* out, int64_t count);
// acc[r, :] += sigmoid(gate_logit[r]) * x[r, :]; gate_logit has one value per row.
void add_sigmoid_gated(float* acc, const float* x, const float* gate_logit, int64_t rows, int64_t cols);
// out[i, :] = table[ids[i], :]; ids are checked against vocab (throws UsageError).
void embedding(std::span<const int32_t> ids, const void* table, DType table_dtype, int64_t vocab, int64_t hidden,
               float* out);

// Rotate-half RoPE in place on x[n, heads, head_dim], first rotary_dim dims of each head, with the
// angles computed as transformers does (inv_freq and position * inv_freq in fp32).
void rope(ThreadPool& pool, float* x, std::span<const int32_t> positions, int64_t heads, int64_t head_dim,
          int64_t rotary_dim, double theta);

// Paged KV cache (see KvStep): pages [num_pages, page_size, kv_heads, head_dim], row_elems = kv_heads * head_dim.
// kv_write stores k/v [n, row_elems] row by row; attention: q/out [n, heads, head_dim], row i sees positions
// [0, row_pos[i]] of its sequence. Online softmax in blocks of keys, so no score buffer per query.
void kv_write(const KvStep& step, const float* k, const float* v, int64_t row_elems, float* k_pages, float* v_pages);
void attention(ThreadPool& pool, const KvStep& step, const float* q, const float* k_pages, const float* v_pages,
               int64_t heads, int64_t kv_heads, int64_t head_dim, float scale, float* out);

// logits [n, num_experts] -> routing (top-k per row, best first, ties to the lower id).
void route(const float* logits, int64_t n, int64_t num_experts, int64_t top_k, RouterScoring scoring,
           bool normalize, Routing* routing);

}  // namespace moex::cpu
