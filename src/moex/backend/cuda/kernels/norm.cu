// RMSNorm in fp32. A block of 256 threads covers one row; the sum of squares is a block reduction.
// Rows of up to 8192 columns (cols % 4 == 0, aligned) are held in registers as float4s: one read of the row
// (and of the residual delta), one write. Others take the two-pass kernel, whose second pass re-reads the row
// from L1/L2. At batch 1 a norm is a latency chain, not a bandwidth problem: Nsight Compute timed the two-pass
// kernel at ~6 us per 2048-column row on an H100, 17 launches per Model A step.
#include "moex/backend/cuda/kernels/common.cuh"
#include "moex/backend/cuda/kernels/launch.cuh"
#include "moex/backend/cuda/kernels/norm.cuh"
#include "moex/backend/cuda/kernels/residual_norm.cuh"

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


// V float4s per thread: cols <= 4 * V * kThreads.
template <int V>
__global__ __launch_bounds__(kThreads) void rms_norm_vec_kernel(const float* x, const void* weight, bool weight_bf16,
                                                               float eps, float* out, int cols, float* residual,
                                                               const float* delta) {
  __shared__ float scratch[32];
  pdl_launch_dependents();
  pdl_wait();
  const int64_t row = blockIdx.x;
  const int cols4 = cols / 4;
  float4 v[V];
  float sum_sq = 0.f;
#pragma unroll
  for (int i = 0; i < V; ++i) {
    const int c = threadIdx.x + i * kThreads;
    v[i] = make_float4(0.f, 0.f, 0.f, 0.f);
    if (c < cols4) {
      if (residual) {
        const float4 a = reinterpret_cast<const float4*>(residual + row * cols)[c];
        const float4 b = reinterpret_cast<const float4*>(delta + row * cols)[c];
        v[i] = make_float4(a.x + b.x, a.y + b.y, a.z + b.z, a.w + b.w);
        reinterpret_cast<float4*>(residual + row * cols)[c] = v[i];
      } else {
        v[i] = reinterpret_cast<const float4*>(x + row * cols)[c];
      }
      sum_sq += v[i].x * v[i].x + v[i].y * v[i].y + v[i].z * v[i].z + v[i].w * v[i].w;
    }
  }
  const float inv = rsqrtf(block_sum(sum_sq, scratch) / static_cast<float>(cols) + eps);
#pragma unroll
  for (int i = 0; i < V; ++i) {
    const int c = threadIdx.x + i * kThreads;
    if (c < cols4) {
      const float4 w = load_norm_weight4(weight, weight_bf16, c);
      reinterpret_cast<float4*>(out + row * cols)[c] =
          make_float4(v[i].x * inv * w.x, v[i].y * inv * w.y, v[i].z * inv * w.z, v[i].w * inv * w.w);
    }
  }
}

// Launches the register-resident kernel when the row fits it; false otherwise.
bool launch_vec(const float* x, const void* weight, bool weight_bf16, float eps, float* out, int64_t rows,
                int64_t cols, float* residual, const float* delta, cudaStream_t stream) {
  if (cols % 4 != 0 || cols > 4 * 8 * kThreads || !aligned16(x) || !aligned16(out) || !aligned16(weight) ||
      (residual && (!aligned16(residual) || !aligned16(delta))))
    return false;
  const dim3 grid(static_cast<unsigned>(rows)), block(kThreads);
  const int c = static_cast<int>(cols);
  const int64_t per_thread = ceil_div(cols / 4, kThreads);
  if (per_thread <= 1)
    launch_pdl(rms_norm_vec_kernel<1>, grid, block, 0, stream, x, weight, weight_bf16, eps, out, c, residual, delta);
  else if (per_thread <= 2)
    launch_pdl(rms_norm_vec_kernel<2>, grid, block, 0, stream, x, weight, weight_bf16, eps, out, c, residual, delta);
  else if (per_thread <= 4)
    launch_pdl(rms_norm_vec_kernel<4>, grid, block, 0, stream, x, weight, weight_bf16, eps, out, c, residual, delta);
  else
    launch_pdl(rms_norm_vec_kernel<8>, grid, block, 0, stream, x, weight, weight_bf16, eps, out, c, residual, delta);
  return true;
}

}  // namespace

void launch_rms_norm(const float* x, const void* weight, bool weight_bf16, float eps, float* out, int64_t rows,
                     int64_t cols, cudaStream_t stream) {
  if (rows == 0) return;
  if (launch_vec(x, weight, weight_bf16, eps, out, rows, cols, nullptr, nullptr, stream)) return;
  launch_pdl(rms_norm_kernel, dim3(static_cast<unsigned>(rows)), dim3(kThreads), 0, stream, x, weight, weight_bf16,
             eps, out, cols, static_cast<float*>(nullptr), static_cast<const float*>(nullptr));
}

void launch_add_rms_norm(float* residual, const float* delta, const void* weight, bool weight_bf16, float eps,
                         float* out, int64_t rows, int64_t cols, cudaStream_t stream) {
  if (rows == 0) return;
  if (launch_vec(residual, weight, weight_bf16, eps, out, rows, cols, residual, delta, stream)) return;
  launch_pdl(rms_norm_kernel, dim3(static_cast<unsigned>(rows)), dim3(kThreads), 0, stream,
             static_cast<const float*>(residual), weight, weight_bf16, eps, out, cols, residual, delta);
}

}  // namespace moex::cuda
