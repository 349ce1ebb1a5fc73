// Rotary position embedding (rotate-half / GPT-NeoX convention), in place.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace moex::cuda {

// x [n, heads, head_dim]; token i sits at positions[i] (device); the first rotary_dim dims of each head
// rotate, pairing dim d with d + rotary_dim / 2. rotary_dim even, <= head_dim.
void launch_rope(float* x, const int32_t* positions, int64_t n, int64_t heads, int64_t head_dim,
                 int64_t rotary_dim, double theta, cudaStream_t stream);

}  // namespace moex::cuda
