// Decode GEMV: one warp per output feature, all m_count activation rows at once so the weight row is read
// once per step whatever the batch (up to kGemvMaxRows).
#include "moex/backend/cuda/kernels/gemv.cuh"
#include "moex/backend/cuda/kernels/gemv_core.cuh"

namespace moex::cuda {
namespace {

constexpr int kWarps = 8;

template <int MT>
__global__ __launch_bounds__(kWarps * 32) void gemv_kernel(const float* x, int m_count, const bf16* w, int N, int K,
                                                           const float* bias, float* y) {
  int lane = threadIdx.x & 31;
  int row = blockIdx.x * kWarps + (threadIdx.x >> 5);
  if (row >= N) return;
  const bf16* w_rows[1] = {w + int64_t(row) * K};
  const float* x_rows[MT];
#pragma unroll
  for (int m = 0; m < MT; ++m) x_rows[m] = x + int64_t(m < m_count ? m : 0) * K;
  float acc[1][MT] = {};
  warp_dot_bf16<1, MT>(w_rows, x_rows, m_count, K / 8, lane, acc);
  float b = bias ? bias[row] : 0.f;
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    float v = warp_sum(acc[0][m]);
    if (lane == 0 && m < m_count) y[int64_t(m) * N + row] = v + b;
  }
}

__global__ void gemv_scalar_kernel(const float* x, int64_t m_count, const bf16* w, int64_t N, int64_t K,
                                   const float* bias, float* y) {
  int lane = threadIdx.x & 31;
  int64_t row = blockIdx.x * int64_t(kWarps) + (threadIdx.x >> 5);
  if (row >= N) return;
  for (int64_t m = 0; m < m_count; ++m) {
    float acc = 0.f;
    for (int64_t k = lane; k < K; k += 32) acc += __bfloat162float(w[row * K + k]) * x[m * K + k];
    acc = warp_sum(acc);
    if (lane == 0) y[m * N + row] = acc + (bias ? bias[row] : 0.f);
  }
}

}  // namespace

void launch_gemv_bf16(const float* x, int64_t m_count, const uint16_t* w, int64_t N, int64_t K, const float* bias,
                      float* y, cudaStream_t stream) {
  if (m_count == 0 || N == 0) return;
  const bf16* wb = reinterpret_cast<const bf16*>(w);
  unsigned blocks = static_cast<unsigned>(ceil_div(N, kWarps));
  bool aligned = (reinterpret_cast<uintptr_t>(x) % 16 == 0) && (reinterpret_cast<uintptr_t>(w) % 16 == 0);
  if (m_count > kGemvMaxRows || K % 8 != 0 || !aligned) {
    gemv_scalar_kernel<<<blocks, kWarps * 32, 0, stream>>>(x, m_count, wb, N, K, bias, y);
    return;
  }
  int m = static_cast<int>(m_count), n = static_cast<int>(N), k = static_cast<int>(K);
  if (m_count == 1)
    gemv_kernel<1><<<blocks, kWarps * 32, 0, stream>>>(x, m, wb, n, k, bias, y);
  else if (m_count == 2)
    gemv_kernel<2><<<blocks, kWarps * 32, 0, stream>>>(x, m, wb, n, k, bias, y);
  else if (m_count <= 4)
    gemv_kernel<4><<<blocks, kWarps * 32, 0, stream>>>(x, m, wb, n, k, bias, y);
  else
    gemv_kernel<8><<<blocks, kWarps * 32, 0, stream>>>(x, m, wb, n, k, bias, y);
}

}  // namespace moex::cuda
