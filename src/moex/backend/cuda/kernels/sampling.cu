// Row argmax in two launches: blocks scan slices of a row, one warp per row merges the slices' bests. "Better" =
// larger value, or equal value and lower index, so the result is the first index of the maximum whatever the
// split. NaN never wins; row[0] wins when it is NaN (the host sampler's argmax).
#include "moex/backend/cuda/kernels/argmax_key.h"
#include "moex/backend/cuda/kernels/common.cuh"
#include "moex/backend/cuda/kernels/launch.cuh"
#include "moex/backend/cuda/kernels/pick_sink.cuh"

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

// Phase 1: block (split, row) scans kArgmaxSplitCols columns of its row, each thread kPerThread of them with
// independent loads (one round trip per block; a single block per row had taken 149 us for a 151936-column row
// on an H200, one dependent 4-byte load per thread at a time), and writes its best to partial[row, split].
constexpr int kPerThread = kArgmaxSplitCols / kThreads;

// The best of the warp's 32, in every lane.
__device__ __forceinline__ Best warp_best(Best best) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    Best other{__shfl_xor_sync(0xffffffffu, best.value, offset), __shfl_xor_sync(0xffffffffu, best.index, offset)};
    best = better(best, other);
  }
  return best;
}

__device__ __forceinline__ Best block_best(Best best, Best* s_best) {
  best = warp_best(best);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) s_best[warp] = best;
  __syncthreads();
  if (threadIdx.x == 0)
    for (int w = 1; w < kThreads / 32; ++w) best = better(best, s_best[w]);
  return best;  // valid in thread 0
}

__global__ __launch_bounds__(kThreads) void argmax_split_kernel(const float* logits, int64_t cols, Best* partial) {
  __shared__ Best s_best[kThreads / 32];
  pdl_launch_dependents();
  pdl_wait();
  const float* row = logits + int64_t(blockIdx.y) * cols;
  const int64_t begin = int64_t(blockIdx.x) * kArgmaxSplitCols;
  float values[kPerThread];
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int64_t col = begin + threadIdx.x + int64_t(i) * kThreads;
    values[i] = col < cols ? row[col] : __int_as_float(0x7fc00000);  // NaN past the end: never wins
  }
  Best best{0.f, -1};
#pragma unroll
  for (int i = 0; i < kPerThread; ++i)
    if (values[i] == values[i])
      best = better(best, Best{values[i], static_cast<int32_t>(begin + threadIdx.x + int64_t(i) * kThreads)});
  best = block_best(best, s_best);
  if (threadIdx.x == 0) partial[int64_t(blockIdx.y) * gridDim.x + blockIdx.x] = best;
}

// Phase 2: one warp per row reduces the row's splits. "Better" breaks ties by index, so the result does not
// depend on the order of the reduction.
__global__ void argmax_merge_kernel(const float* logits, int64_t cols, const Best* partial, int splits, int32_t* ids,
                                    PickSink sink) {
  pdl_launch_dependents();
  pdl_wait();
  const int lane = threadIdx.x;
  Best best{0.f, -1};
  for (int s = lane; s < splits; s += 32) best = better(best, partial[int64_t(blockIdx.x) * splits + s]);
  best = warp_best(best);
  if (lane == 0) {
    const float first = logits[int64_t(blockIdx.x) * cols];
    const int32_t id = !(first == first) || best.index < 0 ? 0 : best.index;
    ids[blockIdx.x] = id;
    deliver_pick(sink, id);
  }
}

// launch_argmax_key_pick's one thread. The key and logits[0] are read through L2 (ld.global.cg): this SM's L1 may
// hold the words a step before.
__global__ void argmax_key_pick_kernel(const float* logits, unsigned long long* argmax_key, int32_t* ids,
                                       PickSink sink) {
  pdl_launch_dependents();
  pdl_wait();
  const unsigned long long key = __ldcg(argmax_key);
  const float first = __ldcg(logits);
  *argmax_key = 0;
  const int32_t id = argmax_key_pick(key, first);
  ids[0] = id;
  deliver_pick(sink, id);
}

}  // namespace

void launch_argmax_key_pick(const float* logits, unsigned long long* argmax_key, int32_t* ids, cudaStream_t stream,
                            const PickSink& sink) {
  launch_pdl(argmax_key_pick_kernel, dim3(1), dim3(1), 0, stream, logits, argmax_key, ids, sink);
}

size_t argmax_scratch_bytes(int64_t rows, int64_t cols) {
  return static_cast<size_t>(rows * ceil_div(cols, int64_t(kArgmaxSplitCols))) * sizeof(Best);
}

void launch_argmax_rows(const float* logits, int64_t rows, int64_t cols, int32_t* ids, void* scratch,
                        cudaStream_t stream, const PickSink& sink) {
  if (rows == 0) return;
  const int splits = static_cast<int>(ceil_div(cols, int64_t(kArgmaxSplitCols)));
  Best* partial = static_cast<Best*>(scratch);
  launch_pdl(argmax_split_kernel, dim3(static_cast<unsigned>(splits), static_cast<unsigned>(rows)), dim3(kThreads), 0,
             stream, logits, cols, partial);
  launch_pdl(argmax_merge_kernel, dim3(static_cast<unsigned>(rows)), dim3(32), 0, stream, logits, cols,
             static_cast<const Best*>(partial), splits, ids, sink);
}

}  // namespace moex::cuda
