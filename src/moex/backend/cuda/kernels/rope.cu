// RoPE. Frequencies follow transformers' fp32 recipe (inv_freq = 1 / theta^(2d/rot), angle = pos * inv_freq
// in fp32) so that rounding matches the reference; sincosf (not the fast intrinsic) because angles reach
// thousands of radians at long positions.
#include "moex/backend/cuda/kernels/common.cuh"
#include "moex/backend/cuda/kernels/rope.cuh"

namespace moex::cuda {
namespace {

__global__ void rope_kernel(float* x, const int32_t* positions, int64_t heads, int64_t head_dim, int rotary_dim,
                            float theta) {
  int64_t token = blockIdx.x;
  int half = rotary_dim / 2;
  float pos = static_cast<float>(positions[token]);
  for (int idx = threadIdx.x; idx < heads * half; idx += blockDim.x) {
    int64_t head = idx / half;
    int d = idx % half;
    float inv_freq = 1.f / powf(theta, static_cast<float>(2 * d) / static_cast<float>(rotary_dim));
    float sin_v, cos_v;
    sincosf(pos * inv_freq, &sin_v, &cos_v);
    float* row = x + (token * heads + head) * head_dim;
    float x1 = row[d], x2 = row[d + half];
    row[d] = x1 * cos_v - x2 * sin_v;
    row[d + half] = x2 * cos_v + x1 * sin_v;
  }
}

}  // namespace

void launch_rope(float* x, const int32_t* positions, int64_t n, int64_t heads, int64_t head_dim,
                 int64_t rotary_dim, double theta, cudaStream_t stream) {
  if (n == 0 || rotary_dim == 0) return;
  rope_kernel<<<static_cast<unsigned>(n), 256, 0, stream>>>(x, positions, heads, head_dim,
                                                            static_cast<int>(rotary_dim), static_cast<float>(theta));
}

}  // namespace moex::cuda
