// MoE decode path: per group (one expert, <= 8 tokens) a warp computes one ffn row of gate AND up for all
// its tokens, applying SwiGLU in registers (the fused activation never round-trips memory as two tensors);
// then down per group; then a fixed-order weighted combine. Each expert's weights are read once per step.
#include "moex/backend/cuda/kernels/gemv_core.cuh"
#include "moex/backend/cuda/kernels/moe.cuh"

namespace moex::cuda {
namespace {

constexpr int kWarps = 8;

template <int MT>
__global__ __launch_bounds__(kWarps * 32) void moe_gate_up_kernel(const float* x, const int32_t* row_token,
                                                                  const MoeGroup* groups, int hidden, int ffn,
                                                                  float* h, const int32_t* num_groups) {
  if (num_groups && int(blockIdx.y) >= *num_groups) return;
  const MoeGroup g = groups[blockIdx.y];
  int lane = threadIdx.x & 31;
  int j = blockIdx.x * kWarps + (threadIdx.x >> 5);
  if (j >= ffn) return;
  const bf16* w_rows[2] = {reinterpret_cast<const bf16*>(g.gate) + int64_t(j) * hidden,
                           reinterpret_cast<const bf16*>(g.up) + int64_t(j) * hidden};
  const float* x_rows[MT];
#pragma unroll
  for (int m = 0; m < MT; ++m) x_rows[m] = x + int64_t(row_token[g.row_begin + (m < g.num_rows ? m : 0)]) * hidden;
  float acc[2][MT] = {};
  warp_dot_bf16<2, MT>(w_rows, x_rows, g.num_rows, hidden / 8, lane, acc);
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    float gate = warp_sum(acc[0][m]);
    float up = warp_sum(acc[1][m]);
    if (lane == 0 && m < g.num_rows) h[int64_t(g.row_begin + m) * ffn + j] = silu(gate) * up;
  }
}

template <int MT>
__global__ __launch_bounds__(kWarps * 32) void moe_down_kernel(const float* h, const MoeGroup* groups, int hidden,
                                                               int ffn, float* y, const int32_t* num_groups) {
  if (num_groups && int(blockIdx.y) >= *num_groups) return;
  const MoeGroup g = groups[blockIdx.y];
  int lane = threadIdx.x & 31;
  int i = blockIdx.x * kWarps + (threadIdx.x >> 5);
  if (i >= hidden) return;
  const bf16* w_rows[1] = {reinterpret_cast<const bf16*>(g.down) + int64_t(i) * ffn};
  const float* x_rows[MT];
#pragma unroll
  for (int m = 0; m < MT; ++m) x_rows[m] = h + int64_t(g.row_begin + (m < g.num_rows ? m : 0)) * ffn;
  float acc[1][MT] = {};
  warp_dot_bf16<1, MT>(w_rows, x_rows, g.num_rows, ffn / 8, lane, acc);
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    float v = warp_sum(acc[0][m]);
    if (lane == 0 && m < g.num_rows) y[int64_t(g.row_begin + m) * hidden + i] = v;
  }
}

__global__ void moe_combine_kernel(const float* y, const int32_t* slot, const float* weights, int top_k,
                                   int64_t hidden, float* out) {
  int64_t token = blockIdx.x;
  for (int64_t col = threadIdx.x; col < hidden; col += blockDim.x) {
    float acc = 0.f;
    for (int j = 0; j < top_k; ++j) {
      int32_t row = slot[token * top_k + j];
      if (row >= 0) acc += weights[token * top_k + j] * y[int64_t(row) * hidden + col];
    }
    out[token * hidden + col] = acc;
  }
}

}  // namespace

void launch_moe_gemv(const float* x, const int32_t* row_token, const MoeGroup* groups, int num_groups,
                     int max_rows, int64_t hidden, int64_t ffn, float* h, float* y, cudaStream_t stream,
                     const int32_t* device_num_groups) {
  if (num_groups == 0) return;
  int hid = static_cast<int>(hidden), f = static_cast<int>(ffn);
  dim3 grid_up(static_cast<unsigned>(ceil_div(ffn, kWarps)), num_groups);
  dim3 grid_down(static_cast<unsigned>(ceil_div(hidden, kWarps)), num_groups);
  if (max_rows <= 1) {
    moe_gate_up_kernel<1><<<grid_up, kWarps * 32, 0, stream>>>(x, row_token, groups, hid, f, h, device_num_groups);
    moe_down_kernel<1><<<grid_down, kWarps * 32, 0, stream>>>(h, groups, hid, f, y, device_num_groups);
  } else {
    moe_gate_up_kernel<kMoeGemvMaxRows><<<grid_up, kWarps * 32, 0, stream>>>(x, row_token, groups, hid, f, h, device_num_groups);
    moe_down_kernel<kMoeGemvMaxRows><<<grid_down, kWarps * 32, 0, stream>>>(h, groups, hid, f, y, device_num_groups);
  }
}

void launch_moe_combine(const float* y, const int32_t* slot, const float* weights, int64_t num_tokens,
                        int64_t top_k, int64_t hidden, float* out, cudaStream_t stream) {
  if (num_tokens == 0) return;
  moe_combine_kernel<<<static_cast<unsigned>(num_tokens), 256, 0, stream>>>(y, slot, weights, static_cast<int>(top_k), hidden, out);
}

}  // namespace moex::cuda
