// RMSNorm in fp32. A block of 256 threads covers one row; the sum of squares is a block reduction and the
// second pass re-reads the row from L1/L2 (rows are at most a few KiB, so that re-read is cache-resident).
#include "moex/backend/cuda/kernels/common.cuh"
#include "moex/backend/cuda/kernels/launch.cuh"
#include "moex/backend/cuda/kernels/norm.cuh"

namespace moex::cuda {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float load_weight(const void* weight, bool weight_bf16, int64_t idx) {
  return weight_bf16 ? __bfloat162float(static_cast<const bf16*>(weight)[idx]) : static_cast<const float*>(weight)[idx];
}

__global__ void rms_norm_kernel(const float* x, const void* weight, bool weight_bf16, float eps, float* out,
                                int64_t cols, float* residual, const float* delta) {
  __shared__ float scratch[32];
  pdl_launch_dependents();
  pdl_wait();
  int64_t row = blockIdx.x;
  const float* src = x + row * cols;
  float sum_sq = 0.f;
  if (residual) {
    float* res = residual + row * cols;
    const float* d = delta + row * cols;
    for (int64_t col = threadIdx.x; col < cols; col += blockDim.x) {
      float v = res[col] + d[col];
      res[col] = v;
      sum_sq += v * v;
    }
    src = res;
  } else {
    for (int64_t col = threadIdx.x; col < cols; col += blockDim.x) sum_sq += src[col] * src[col];
  }
  float inv = rsqrtf(block_sum(sum_sq, scratch) / static_cast<float>(cols) + eps);
  float* dst = out + row * cols;
  for (int64_t col = threadIdx.x; col < cols; col += blockDim.x)
    dst[col] = src[col] * inv * load_weight(weight, weight_bf16, col);
}

}  // namespace

void launch_rms_norm(const float* x, const void* weight, bool weight_bf16, float eps, float* out, int64_t rows,
                     int64_t cols, cudaStream_t stream) {
  if (rows == 0) return;
  launch_pdl(rms_norm_kernel, dim3(static_cast<unsigned>(rows)), dim3(kThreads), 0, stream, x, weight, weight_bf16,
             eps, out, cols, static_cast<float*>(nullptr), static_cast<const float*>(nullptr));
}

void launch_add_rms_norm(float* residual, const float* delta, const void* weight, bool weight_bf16, float eps,
                         float* out, int64_t rows, int64_t cols, cudaStream_t stream) {
  if (rows == 0) return;
  launch_pdl(rms_norm_kernel, dim3(static_cast<unsigned>(rows)), dim3(kThreads), 0, stream,
             static_cast<const float*>(residual), weight, weight_bf16, eps, out, cols, residual, delta);
}

}  // namespace moex::cuda
