// Greedy sampling on the device: per-row argmax of the logits, so a batched decode step reads back one int
// per sequence instead of a row of vocab floats.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace moex::cuda {

// Columns one block of the argmax scans (2048: 8 per thread of 256).
constexpr int kArgmaxSplitCols = 2048;
// Device scratch launch_argmax_rows needs for rows x cols logits.
size_t argmax_scratch_bytes(int64_t rows, int64_t cols);

// ids[r] = first index of the largest value of logits[r, :] (fp32 [rows, cols]); NaN never wins, and row[0]
// wins when it is NaN (the host sampler's argmax). scratch: argmax_scratch_bytes(rows, cols) of device memory.
// host_ids (pinned host memory, or null) receives the ids too, visible to the host once the launch completed
// (chained greedy steps read them there without a copy).
void launch_argmax_rows(const float* logits, int64_t rows, int64_t cols, int32_t* ids, void* scratch,
                        cudaStream_t stream, int32_t* host_ids = nullptr);

}  // namespace moex::cuda
