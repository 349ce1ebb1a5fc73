// Greedy sampling on the device: per-row argmax of the logits, so a batched decode step reads back one int
// per sequence instead of a row of vocab floats.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace moex::cuda {

// ids[r] = first index of the largest value of logits[r, :] (fp32 [rows, cols]); NaN never wins, and row[0]
// wins when it is NaN (the host sampler's argmax).
void launch_argmax_rows(const float* logits, int64_t rows, int64_t cols, int32_t* ids, cudaStream_t stream);

}  // namespace moex::cuda
