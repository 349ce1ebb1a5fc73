// Elementwise kernels: grid-stride loops over float4 where the size allows, scalar tails otherwise.
#include "moex/backend/cuda/kernels/common.cuh"
#include "moex/backend/cuda/kernels/elementwise.cuh"

#include <algorithm>

namespace moex::cuda {
namespace {

constexpr int kThreads = 256;

int grid_for(int64_t n) {
  int64_t blocks = ceil_div(n, kThreads);
  return static_cast<int>(blocks < 4096 ? (blocks > 0 ? blocks : 1) : 4096);
}

__global__ void embedding_kernel(const int32_t* ids, const void* table, bool table_f32, int64_t hidden,
                                 float* out) {
  int64_t row = blockIdx.x;
  int64_t id = ids[row];
  float* dst = out + row * hidden;
  if (table_f32) {
    const float* src = static_cast<const float*>(table) + id * hidden;
    for (int64_t col = threadIdx.x; col < hidden; col += blockDim.x) dst[col] = src[col];
  } else {
    const bf16* src = static_cast<const bf16*>(table) + id * hidden;
    for (int64_t col = threadIdx.x; col < hidden; col += blockDim.x) dst[col] = __bfloat162float(src[col]);
  }
}

__global__ void add_kernel(const float* a, const float* b, float* out, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = a[i] + b[i];
}

__global__ void clamp_kernel(float* x, int64_t n, float limit) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    x[i] = fminf(fmaxf(x[i], -limit), limit);
}

__global__ void silu_mul_kernel(const float* gate, const float* up, float* out, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = silu(gate[i]) * up[i];
}

__global__ void add_sigmoid_gated_kernel(float* acc, const float* x, const float* gate_logit, int64_t cols) {
  int64_t row = blockIdx.x;
  float g = 1.f / (1.f + expf(-gate_logit[row]));
  for (int64_t col = threadIdx.x; col < cols; col += blockDim.x) acc[row * cols + col] += g * x[row * cols + col];
}

__global__ void axpy_kernel(float alpha, const float* x, float* y, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    y[i] += alpha * x[i];
}

__global__ void add_row_bias_kernel(float* out, const float* bias, int64_t n, int64_t cols) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] += bias[i % cols];
}

__global__ void f32_to_bf16_kernel(const float* src, bf16* dst, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    dst[i] = __float2bfloat16_rn(src[i]);
}

__global__ void gather_rows_bf16_kernel(const float* src, const int32_t* rows, int64_t cols, bf16* dst) {
  int64_t row = blockIdx.x;
  const float* from = src + int64_t(rows[row]) * cols;
  bf16* to = dst + row * cols;
  for (int64_t col = threadIdx.x; col < cols; col += blockDim.x) to[col] = __float2bfloat16_rn(from[col]);
}

}  // namespace

void launch_embedding(const int32_t* ids, int64_t num_ids, const void* table, bool table_f32, int64_t hidden,
                      float* out, cudaStream_t stream) {
  if (num_ids == 0) return;
  embedding_kernel<<<static_cast<unsigned>(num_ids), kThreads, 0, stream>>>(ids, table, table_f32, hidden, out);
}

void launch_add(const float* a, const float* b, float* out, int64_t n, cudaStream_t stream) {
  if (n == 0) return;
  add_kernel<<<grid_for(n), kThreads, 0, stream>>>(a, b, out, n);
}

void launch_clamp(float* x, int64_t n, float limit, cudaStream_t stream) {
  if (n == 0) return;
  clamp_kernel<<<grid_for(n), kThreads, 0, stream>>>(x, n, limit);
}

void launch_silu_mul(const float* gate, const float* up, float* out, int64_t n, cudaStream_t stream) {
  if (n == 0) return;
  silu_mul_kernel<<<grid_for(n), kThreads, 0, stream>>>(gate, up, out, n);
}

void launch_add_sigmoid_gated(float* acc, const float* x, const float* gate_logit, int64_t rows, int64_t cols,
                              cudaStream_t stream) {
  if (rows == 0) return;
  add_sigmoid_gated_kernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(acc, x, gate_logit, cols);
}

void launch_axpy(float alpha, const float* x, float* y, int64_t n, cudaStream_t stream) {
  if (n == 0) return;
  axpy_kernel<<<grid_for(n), kThreads, 0, stream>>>(alpha, x, y, n);
}

void launch_add_row_bias(float* out, const float* bias, int64_t rows, int64_t cols, cudaStream_t stream) {
  const int64_t n = rows * cols;
  if (n == 0) return;
  add_row_bias_kernel<<<grid_for(n), kThreads, 0, stream>>>(out, bias, n, cols);
}

void launch_f32_to_bf16(const float* src, uint16_t* dst, int64_t n, cudaStream_t stream) {
  if (n == 0) return;
  f32_to_bf16_kernel<<<grid_for(n), kThreads, 0, stream>>>(src, reinterpret_cast<bf16*>(dst), n);
}

namespace {
__global__ void copy_from_pinned_kernel(const uint4* __restrict__ host, uint4* __restrict__ dst, size_t words,
                                        const unsigned char* __restrict__ host_tail, unsigned char* __restrict__ dst_tail,
                                        int tail) {
  for (size_t idx = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; idx < words;
       idx += static_cast<size_t>(gridDim.x) * blockDim.x)
    dst[idx] = host[idx];
  if (blockIdx.x == 0 && static_cast<int>(threadIdx.x) < tail) dst_tail[threadIdx.x] = host_tail[threadIdx.x];
}
}  // namespace

void launch_copy_from_pinned(const void* host, void* dst, size_t bytes, cudaStream_t stream) {
  if (bytes == 0) return;
  // Both ends are allocation bases or 256-byte aligned offsets (staging slots): 16-byte words, then the tail.
  const size_t words = bytes / 16;
  const int tail = static_cast<int>(bytes % 16);
  constexpr int kThreads = 256;
  const int blocks = static_cast<int>(std::min<size_t>(std::max<size_t>((words + kThreads - 1) / kThreads, 1), 64));
  copy_from_pinned_kernel<<<blocks, kThreads, 0, stream>>>(
      static_cast<const uint4*>(host), static_cast<uint4*>(dst), words,
      static_cast<const unsigned char*>(host) + words * 16, static_cast<unsigned char*>(dst) + words * 16, tail);
}

void launch_gather_rows_bf16(const float* src, const int32_t* rows, int64_t num_rows, int64_t cols,
                             uint16_t* dst, cudaStream_t stream) {
  if (num_rows == 0) return;
  gather_rows_bf16_kernel<<<static_cast<unsigned>(num_rows), kThreads, 0, stream>>>(
      src, rows, cols, reinterpret_cast<bf16*>(dst));
}

}  // namespace moex::cuda
