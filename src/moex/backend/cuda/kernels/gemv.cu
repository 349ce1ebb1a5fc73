// Decode GEMV: one warp per output feature, all m_count activation rows at once so the weight row is read
// once per step whatever the batch (up to kGemvMaxRows). Several weights sharing the input (q/k/v) are one
// grid: warp w of the grid takes row w of the concatenation of the outputs.
// 2-32 rows take the tensor-core kernel (mma_core.cuh). Launched with programmatic dependent launch
// (launch.cuh). An L2 prefetch of each warp's weight row before the PDL wait was tried and measured slower
// on an H200 (Model A 1.154 vs 1.096 ms/token): the prefetches compete with the tail of the kernel before.
#include "moex/backend/cuda/kernels/gemv.cuh"

#include "moex/backend/cuda/kernels/gemv_core.cuh"
#include "moex/backend/cuda/kernels/launch.cuh"
#include "moex/backend/cuda/kernels/mma_core.cuh"

namespace moex::cuda {
namespace {

constexpr int kWarps = 8;

struct GemvOutputs {
  GemvOutput out[kGemvMaxOutputs];
  int count;
};

template <int MT, int U>
__global__ __launch_bounds__(kWarps * 32) void gemv_kernel(const float* x, int m_count, int K, GemvOutputs outputs) {
  pdl_launch_dependents();
  const int lane = threadIdx.x & 31;
  int row = blockIdx.x * kWarps + (threadIdx.x >> 5);
  int which = 0;
  while (which < outputs.count && row >= outputs.out[which].rows) row -= static_cast<int>(outputs.out[which++].rows);
  const bool active = which < outputs.count;
  const GemvOutput o = outputs.out[active ? which : 0];
  const bf16* w_row = reinterpret_cast<const bf16*>(o.w) + int64_t(row) * K;
  pdl_wait();
  if (!active) return;
  const bf16* w_rows[1] = {w_row};
  const float* x_rows[MT];
#pragma unroll
  for (int m = 0; m < MT; ++m) x_rows[m] = x + int64_t(m < m_count ? m : 0) * K;
  float acc[1][MT] = {};
  warp_dot_bf16<1, MT, U>(w_rows, x_rows, m_count, K / 8, lane, acc);
  const float b = o.bias ? o.bias[row] : 0.f;
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    float v = warp_sum(acc[0][m]);
    if (lane == 0 && m < m_count) o.y[int64_t(m) * o.rows + row] = v + b;
  }
}

__global__ void gemv_scalar_kernel(const float* x, int64_t m_count, const bf16* w, int64_t N, int64_t K,
                                   const float* bias, float* y) {
  pdl_launch_dependents();
  pdl_wait();
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

// 2-32 tokens: a block owns NR tiles of 16 output rows (consecutive); its 8 warps split K and sum in warp
// order. NT n-tiles of 8 tokens. With NT >= 2 the activations dominate the block's loads (every block reads
// all tokens' K floats for its rows) and their bf16 split dominates its instructions; two row tiles per block
// share both, so NR = 2 there when N is a multiple of 32.
template <int NR, int NT>
__global__ __launch_bounds__(kWarps * 32) void linear_mma_kernel(const float* x, int m_count, const bf16* w, int N,
                                                                 int K, const float* bias, float* y) {
  __shared__ float red[kWarps * NR * NT * 4 * 32];
  pdl_launch_dependents();
  pdl_wait();
  const int row0 = blockIdx.x * kMmaRows * NR;
  const float* x_row[NT];
  mma_token_rows<NT>(threadIdx.x & 31, m_count, [&](int i) { return x + int64_t(i) * K; }, x_row);
  // Tile r is weight rows [row0 + 16 r, row0 + 16 r + 16): with NR > 1, N % (16 NR) == 0, so no tile is short.
  const bf16* rows[NR];
#pragma unroll
  for (int r = 0; r < NR; ++r) rows[r] = w + int64_t(r) * kMmaRows * K;
  block_mma_tile<NR, NT>(rows, row0, NR > 1 ? row0 + kMmaRows : N, K, x_row, m_count, kWarps, red);
  for_each_mma_output<NR, NT>(red, kWarps, row0, N, m_count, [&](int row, int token, auto sum) {
#pragma unroll
    for (int r = 0; r < NR; ++r)
      y[int64_t(token) * N + row + r * kMmaRows] = sum(r) + (bias ? bias[row + r * kMmaRows] : 0.f);
  });
}

bool few_token_mma_fits(const float* x, int64_t m_count, const uint16_t* w, int64_t K) {
  return m_count >= 2 && m_count <= kLinearMmaMaxRows && K % kMmaKBlock == 0 && aligned16(x) && aligned16(w);
}

void launch_linear_mma(const float* x, int64_t m_count, const uint16_t* w, int64_t N, int64_t K, const float* bias,
                       float* y, cudaStream_t stream) {
  const dim3 block(kWarps * 32);
  const bf16* wb = reinterpret_cast<const bf16*>(w);
  const int m = static_cast<int>(m_count), n = static_cast<int>(N), k = static_cast<int>(K);
  auto launch = [&](auto kernel, int rows_per_block) {
    launch_pdl(kernel, dim3(static_cast<unsigned>(ceil_div(N, rows_per_block))), block, 0, stream, x, m, wb, n, k,
               bias, y);
  };
  const bool pairs = N % (2 * kMmaRows) == 0;
  if (m_count <= 8)
    launch(linear_mma_kernel<1, 1>, kMmaRows);
  else if (m_count <= 16)
    pairs ? launch(linear_mma_kernel<2, 2>, 2 * kMmaRows) : launch(linear_mma_kernel<1, 2>, kMmaRows);
  else
    pairs ? launch(linear_mma_kernel<2, 4>, 2 * kMmaRows) : launch(linear_mma_kernel<1, 4>, kMmaRows);
}

// The fp32 GEMV kernel over up to kGemvMaxOutputs weights; m_count <= kGemvMaxRows, K % 8 == 0, aligned.
void launch_gemv_kernel(const float* x, int64_t m_count, int64_t K, const GemvOutputs& packed, int64_t total_rows,
                        cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(total_rows, kWarps))), block(kWarps * 32);
  const int m = static_cast<int>(m_count), k = static_cast<int>(K);
  if (m_count == 1)  // 8 loads in flight per lane: measured faster than 4 on Model A at batch 1 (H200)
    launch_pdl(gemv_kernel<1, 8>, grid, block, 0, stream, x, m, k, packed);
  else if (m_count == 2)
    launch_pdl(gemv_kernel<2, 4>, grid, block, 0, stream, x, m, k, packed);
  else if (m_count <= 4)
    launch_pdl(gemv_kernel<4, 4>, grid, block, 0, stream, x, m, k, packed);
  else
    launch_pdl(gemv_kernel<8, 4>, grid, block, 0, stream, x, m, k, packed);
}

// The fp32 GEMV kernel's envelope (any row count: it runs in passes of kGemvMaxRows).
bool gemv_fits(const float* x, const uint16_t* w, int64_t K) { return K % 8 == 0 && aligned16(x) && aligned16(w); }

}  // namespace

void launch_gemv_bf16_multi(const float* x, int64_t m_count, int64_t K, const GemvOutput* outputs, int count,
                            cudaStream_t stream) {
  if (m_count == 0 || count == 0) return;
  // One launch for all outputs at one row; several rows take the tensor cores, one launch per weight.
  bool one_launch = m_count == 1 && count <= kGemvMaxOutputs;
  int64_t total_rows = 0;
  for (int i = 0; i < count; ++i) {
    one_launch = one_launch && gemv_fits(x, outputs[i].w, K);
    total_rows += outputs[i].rows;
  }
  if (!one_launch) {
    for (int i = 0; i < count; ++i)
      launch_gemv_bf16(x, m_count, outputs[i].w, outputs[i].rows, K, outputs[i].bias, outputs[i].y, stream);
    return;
  }
  if (total_rows == 0) return;
  GemvOutputs packed{};
  for (int i = 0; i < count; ++i) packed.out[i] = outputs[i];
  packed.count = count;
  launch_gemv_kernel(x, m_count, K, packed, total_rows, stream);
}

void launch_gemv_bf16(const float* x, int64_t m_count, const uint16_t* w, int64_t N, int64_t K, const float* bias,
                      float* y, cudaStream_t stream) {
  if (m_count == 0 || N == 0) return;
  if (few_token_mma_fits(x, m_count, w, K)) {
    launch_linear_mma(x, m_count, w, N, K, bias, y, stream);
  } else if (gemv_fits(x, w, K)) {
    // Passes of kGemvMaxRows rows, activations kept in fp32 (rows stay 16-byte aligned: K % 8 == 0).
    for (int64_t row = 0; row < m_count; row += kGemvMaxRows) {
      GemvOutputs packed{};
      packed.out[0] = GemvOutput{w, bias, y + row * N, N};
      packed.count = 1;
      launch_gemv_kernel(x + row * K, std::min<int64_t>(kGemvMaxRows, m_count - row), K, packed, N, stream);
    }
  } else {
    const dim3 grid(static_cast<unsigned>(ceil_div(N, kWarps))), block(kWarps * 32);
    launch_pdl(gemv_scalar_kernel, grid, block, 0, stream, x, m_count, reinterpret_cast<const bf16*>(w), N, K, bias,
               y);
  }
}

}  // namespace moex::cuda
