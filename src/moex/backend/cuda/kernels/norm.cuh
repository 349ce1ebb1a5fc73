// RMSNorm launchers. One block per row; the row is read once into registers-or-L1 and written once.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace moex::cuda {

// out[r, :] = x[r, :] / sqrt(mean(x[r, :]^2) + eps) * weight; weight fp32 or bf16 [cols]. In-place allowed.
void launch_rms_norm(const float* x, const void* weight, bool weight_bf16, float eps, float* out, int64_t rows,
                     int64_t cols, cudaStream_t stream);
// Fused residual step: residual += delta, then out = rms_norm(residual). Saves one pass over the row.
void launch_add_rms_norm(float* residual, const float* delta, const void* weight, bool weight_bf16, float eps,
                         float* out, int64_t rows, int64_t cols, cudaStream_t stream);

}  // namespace moex::cuda
