// Row argmax: a block per row; each thread keeps the best (value, index) of its strided elements, then warp
// shuffles and one shared-memory round reduce them. "Better" = larger value, or equal value and lower index,
// so the result is the first index of the maximum whatever the thread count.
#include "moex/backend/cuda/kernels/common.cuh"
#include "moex/backend/cuda/kernels/launch.cuh"
#include "moex/backend/cuda/kernels/sampling.cuh"

namespace moex::cuda {
namespace {

constexpr int kThreads = 256;

struct Best {
  float value;
  int32_t index;  // -1: nothing seen yet
};

__device__ __forceinline__ Best better(Best a, Best b) {
  if (a.index < 0) return b;
  if (b.index < 0) return a;
  if (b.value > a.value || (b.value == a.value && b.index < a.index)) return b;
  return a;
}

__global__ __launch_bounds__(kThreads) void argmax_rows_kernel(const float* logits, int64_t cols, int32_t* ids) {
  __shared__ Best s_best[kThreads / 32];
  pdl_launch_dependents();
  pdl_wait();
  const float* row = logits + int64_t(blockIdx.x) * cols;
  Best best{0.f, -1};
  for (int64_t col = threadIdx.x; col < cols; col += kThreads) {
    const float value = row[col];
    if (value == value) best = better(best, Best{value, static_cast<int32_t>(col)});  // skips NaN
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    Best other{__shfl_xor_sync(0xffffffffu, best.value, offset), __shfl_xor_sync(0xffffffffu, best.index, offset)};
    best = better(best, other);
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) s_best[warp] = best;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kThreads / 32; ++w) best = better(best, s_best[w]);
    const bool first_is_nan = !(row[0] == row[0]);
    ids[blockIdx.x] = first_is_nan || best.index < 0 ? 0 : best.index;
  }
}

}  // namespace

void launch_argmax_rows(const float* logits, int64_t rows, int64_t cols, int32_t* ids, cudaStream_t stream) {
  if (rows == 0) return;
  launch_pdl(argmax_rows_kernel, dim3(static_cast<unsigned>(rows)), dim3(kThreads), 0, stream, logits, cols, ids);
}

}  // namespace moex::cuda
