// Dense y = x @ w^T for few rows of x (decode), bandwidth-bound on the weight read.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "moex/backend/cuda/cuda_resources.h"

namespace moex::cuda {

constexpr int kGemvMaxRows = 8;
constexpr int kGemvMaxOutputs = 3;
// 2..kLinearMmaMaxRows rows with K % 32 == 0 take tensor cores (mma_core.cuh: weights read once, activations
// split into two bf16 parts, ~1e-5 relative); one row the fp32 GEMV.
constexpr int kLinearMmaMaxRows = 32;
// Those tensor-core kernels' shape for `tokens` rows: blocks of 128 rows whose warps split the rows and share the
// tokens staged once in shared memory (mma_rows.cuh) from MOEX_CUDA_ROWS_MIN_TOKENS (default 17) rows on, else
// blocks of 16 rows whose warps split K (mma_core.cuh). MOEX_CUDA_MMA_ROWS=0 / 1: the 16-row / row-split kernels at
// every count (A/B; read at every launch so that tests can switch them). The MoE expert kernels follow it too.
inline bool rows_mma_enabled(int64_t tokens) {
  if (env_equals("MOEX_CUDA_MMA_ROWS", "0")) return false;
  if (env_equals("MOEX_CUDA_MMA_ROWS", "1")) return true;
  return tokens >= env_int("MOEX_CUDA_ROWS_MIN_TOKENS", 17);
}

// One weight of a multi-output GEMV: y [m_count, rows] = x @ w^T (+ bias). w bf16 [rows, K], bias fp32 or null.
struct GemvOutput {
  const uint16_t* w = nullptr;
  const float* bias = nullptr;
  float* y = nullptr;
  int64_t rows = 0;
};

// y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]). x fp32 [m_count, K] (row stride K), w bf16 [N, K],
// bias fp32 [N] or null, y fp32 [m_count, N]. Fast paths: the tensor-core few-token kernel (above), else
// the fp32 GEMV in passes of kGemvMaxRows rows where K % 8 == 0 and x, w are 16-byte aligned; otherwise a
// scalar path that is correct for any shape (and slow). num_sms: the device's SM count (the tensor-core kernel's
// block shape follows how many blocks each SM gets).
void launch_gemv_bf16(const float* x, int64_t m_count, const uint16_t* w, int64_t N, int64_t K, const float* bias,
                      float* y, int num_sms, cudaStream_t stream);

// The same x through up to kGemvMaxOutputs weights in one launch (decode's q/k/v; an MLP's gate/up): x is
// read once per SM instead of once per launch, and two launch gaps go away. Same fast-path conditions, for
// every weight; falls back to one launch_gemv_bf16 per output otherwise.
void launch_gemv_bf16_multi(const float* x, int64_t m_count, int64_t K, const GemvOutput* outputs, int count,
                            int num_sms, cudaStream_t stream);

// One row of a residual stream with up to two block outputs not yet added to it, and the RMSNorm to apply:
// a consumer kernel computes rms_norm((x + d0) + d1) * weight itself (residual_norm.cuh). d0, d1 may be null;
// weight is bf16 or fp32 [K]. x is written only by launch_moe_router_plan, which stores the residual sum back.
struct ResidualNormIn {
  float* x = nullptr;
  const float* d0 = nullptr;
  const float* d1 = nullptr;
  const void* weight = nullptr;
  bool weight_bf16 = false;
  float eps = 0.f;
};
// The widest row the consumers normalise in shared memory (32 KB of fp32).
constexpr int64_t kResidualNormMaxK = 8192;
// Whether a consumer can normalise this row itself: K % 4 == 0, K <= kResidualNormMaxK, every pointer 16-byte
// aligned (8-byte for a bf16 weight).
bool residual_norm_fits(const ResidualNormIn& in, int64_t K);

// The first layer's row taken from the token embedding instead of x: row = table[*token] (bf16, or fp32 when
// table_f32; the id is read on the device, so a recorded step takes the chained token). The kernel then writes x
// = row (the embedding op's output) and normalises it; no deltas (the first layer has none).
struct EmbedRowIn {
  const void* table = nullptr;
  const int32_t* token = nullptr;
  bool table_f32 = false;
};

// outputs = rms_norm(in) @ w_i^T (+ bias) for one row, in one launch: each block normalises the row into shared
// memory first (in.x is not written, unless embed). Returns false, launching nothing, unless residual_norm_fits,
// K % 8 == 0, count <= kGemvMaxOutputs and every weight (and the embedding table) is 16-byte aligned; the caller
// then normalises and calls launch_gemv_bf16_multi.
// argmax_key (one output, the lm_head; or null): each block also folds the argmax_key (argmax_key.h) of its rows'
// best logit into *argmax_key with one atomicMax, so the greedy pick reads one word (launch_argmax_key_pick, which
// sets it back to 0); *argmax_key must be 0 before the launch.
bool launch_gemv_bf16_multi_normed(const ResidualNormIn& in, int64_t K, const GemvOutput* outputs, int count,
                                   int num_sms, cudaStream_t stream, const EmbedRowIn& embed = {},
                                   unsigned long long* argmax_key = nullptr);
// Halves of the SMs (32 K registers each) that launch's grid for total_rows rows leaves empty: each of its blocks
// (256 threads at up to 128 registers) takes one. The decode attention after the q/k/v GEMV sizes its blocks by
// it (AttentionShape::free_half_sms).
int64_t gemv_normed_free_half_sms(int64_t total_rows, int64_t K, int num_sms);
// Whether that launch loops its rows over a grid sized to the SMs (K <= 2048: one round of loads covers a row), so
// the row is normalised a few hundred times; wider rows take a block per 8 rows, each normalising the row.
bool gemv_normed_loops(int64_t K);

}  // namespace moex::cuda
