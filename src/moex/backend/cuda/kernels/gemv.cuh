// Dense y = x @ w^T for few rows of x (decode), bandwidth-bound on the weight read.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace moex::cuda {

constexpr int kGemvMaxRows = 8;

// y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]). x fp32 [m_count, K] (row stride K), w bf16 [N, K],
// bias fp32 [N] or null, y fp32 [m_count, N]. Fast path: m_count <= kGemvMaxRows, K % 8 == 0, x and w
// 16-byte aligned; otherwise a scalar path that is correct for any shape (and slow).
void launch_gemv_bf16(const float* x, int64_t m_count, const uint16_t* w, int64_t N, int64_t K, const float* bias,
                      float* y, cudaStream_t stream);

}  // namespace moex::cuda
