// Linear layers on the CPU: out[m, O] = x[m, K] @ w[O, K]^T (+ bias), fp32 activations, bf16/f16/f32
// weights in the checkpoint's [out, in] layout, fp32 accumulation. Two paths share one tile kernel:
// - GEMV (m <= kGemvMaxTokens, decode): each weight row is streamed once and widened on the fly;
//   memory-bound, so the goal is to keep every core's load ports busy on weight bytes.
// - GEMM (prefill): a panel of weight rows is widened to fp32 once and reused by every token, with
//   3-token x 4-row register tiles (12 FMA accumulators).
#pragma once

#include <cstdint>

#include "moex/core/dtype.h"
#include "moex/core/thread_pool.h"

namespace moex::cpu {

inline constexpr int64_t kGemvMaxTokens = 4;
// Output rows handed to a thread at a time: 16 keeps decode work units small enough to balance.
inline constexpr int64_t kGemvRowBlock = 16;
// Output rows per GEMM work unit; each unit widens its weight rows to fp32 once (in L2-sized panels)
// and passes all of its tokens over them.
inline constexpr int64_t kGemmRowBlock = 32;

// One linear problem over raw pointers; rows of w are output features.
struct LinearProblem {
  const float* x = nullptr;  // [m, ldx], first k columns used
  int64_t ldx = 0;
  int64_t m = 0;
  int64_t k = 0;
  const void* w = nullptr;  // [O, k], dense
  DType w_dtype = DType::kF32;
  const void* bias = nullptr;  // [O] or null
  DType bias_dtype = DType::kF32;
  float* out = nullptr;  // [m, ldo]; column o of out is output feature o
  int64_t ldo = 0;
};

// Output features [row_begin, row_end) for tokens [token_begin, token_end), on the calling thread.
// Picks GEMV or GEMM by the token count.
void linear_block(const LinearProblem& problem, int64_t row_begin, int64_t row_end, int64_t token_begin,
                  int64_t token_end);

// The row-block size linear() would use for a problem of m tokens.
inline int64_t linear_row_block(int64_t m) { return m <= kGemvMaxTokens ? kGemvRowBlock : kGemmRowBlock; }

// Whole problem, threaded over output-row blocks and, when there are too few of those, token blocks.
void linear(ThreadPool& pool, const LinearProblem& problem, int64_t num_rows);

}  // namespace moex::cpu
