// MoE decode path: per group (one expert, <= kMoeGemvMaxRows tokens) gate AND up rows for all its tokens,
// SwiGLU applied in registers (the fused activation never round-trips memory as two tensors); then down per
// group; then a fixed-order weighted combine. Each expert's weights are read once per step.
// One token per group: fp32 GEMV warps. Several: tensor-core tiles (mma_core.cuh) where hidden and ffn are
// multiples of 32, else the fp32 GEMV in passes of 8 tokens.
#include "moex/backend/cuda/kernels/gemv_core.cuh"
#include "moex/backend/cuda/kernels/launch.cuh"
#include "moex/backend/cuda/kernels/mma_core.cuh"
#include "moex/backend/cuda/kernels/moe.cuh"

namespace moex::cuda {
namespace {

constexpr int kWarps = 8;

// The group of this block (blockIdx.y), read once the plan is visible: the plan (groups, num_groups) comes
// from the kernel before, so this waits for it (PDL). False for blocks past the device-side group count.
// signal_after_wait: the next kernel is launched only once every block of this one has waited, so that it may
// read the plan (through L2) before its own wait (moe_down_combine_one_token_kernel's preload).
__device__ __forceinline__ bool block_group(const MoeGroup* groups, const int32_t* num_groups, MoeGroup* g,
                                            bool signal_after_wait = false) {
  if (!signal_after_wait) pdl_launch_dependents();
  pdl_wait();
  if (signal_after_wait) pdl_launch_dependents();
  if (num_groups && int(blockIdx.y) >= *num_groups) return false;
  *g = groups[blockIdx.y];
  return true;
}

template <int MT>
__global__ __launch_bounds__(kWarps * 32) void moe_gate_up_kernel(const float* x, const int32_t* row_token,
                                                                  const MoeGroup* groups, int hidden, int ffn,
                                                                  float* h, const int32_t* num_groups,
                                                                  bool signal_after_wait) {
  MoeGroup g;
  if (!block_group(groups, num_groups, &g, signal_after_wait)) return;
  int lane = threadIdx.x & 31;
  int j = blockIdx.x * kWarps + (threadIdx.x >> 5);
  if (j >= ffn) return;
  const bf16* w_rows[2] = {reinterpret_cast<const bf16*>(g.gate) + int64_t(j) * hidden,
                           reinterpret_cast<const bf16*>(g.up) + int64_t(j) * hidden};
  for (int base = 0; base < g.num_rows; base += MT) {  // passes of MT tokens
    const int count = min(MT, g.num_rows - base);
    const float* x_rows[MT];
#pragma unroll
    for (int m = 0; m < MT; ++m)
      x_rows[m] = x + int64_t(row_token[g.row_begin + base + (m < count ? m : 0)]) * hidden;
    float acc[2][MT] = {};
    warp_dot_bf16<2, MT>(w_rows, x_rows, count, hidden / 8, lane, acc);
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      float gate = warp_sum(acc[0][m]);
      float up = warp_sum(acc[1][m]);
      if (lane == 0 && m < count) h[int64_t(g.row_begin + base + m) * ffn + j] = silu(gate) * up;
    }
  }
}

template <int MT>
__global__ __launch_bounds__(kWarps * 32) void moe_down_kernel(const float* h, const MoeGroup* groups, int hidden,
                                                               int ffn, float* y, const int32_t* num_groups) {
  MoeGroup g;
  if (!block_group(groups, num_groups, &g)) return;
  int lane = threadIdx.x & 31;
  int i = blockIdx.x * kWarps + (threadIdx.x >> 5);
  if (i >= hidden) return;
  const bf16* w_rows[1] = {reinterpret_cast<const bf16*>(g.down) + int64_t(i) * ffn};
  for (int base = 0; base < g.num_rows; base += MT) {
    const int count = min(MT, g.num_rows - base);
    const float* x_rows[MT];
#pragma unroll
    for (int m = 0; m < MT; ++m) x_rows[m] = h + int64_t(g.row_begin + base + (m < count ? m : 0)) * ffn;
    float acc[1][MT] = {};
    warp_dot_bf16<1, MT>(w_rows, x_rows, count, ffn / 8, lane, acc);
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      float v = warp_sum(acc[0][m]);
      if (lane == 0 && m < count) y[int64_t(g.row_begin + base + m) * hidden + i] = v;
    }
  }
}

// Tensor-core instances: a block owns 16 rows of one group's expert (gate and up together, or down) for all
// the group's tokens (NT tiles of 8); its warps split K and sum in warp order.
template <int NT>
__global__ __launch_bounds__(kWarps * 32) void moe_gate_up_mma_kernel(const float* x, const int32_t* row_token,
                                                                      const MoeGroup* groups, int hidden, int ffn,
                                                                      float* h, const int32_t* num_groups) {
  __shared__ float red[kWarps * 2 * NT * 4 * 32];
  MoeGroup g;
  if (!block_group(groups, num_groups, &g)) return;
  const int row0 = blockIdx.x * kMmaRows;
  const float* x_row[NT];
  mma_token_rows<NT>(threadIdx.x & 31, g.num_rows,
                     [&](int i) { return x + int64_t(row_token[g.row_begin + i]) * hidden; }, x_row);
  const bf16* w[2] = {reinterpret_cast<const bf16*>(g.gate), reinterpret_cast<const bf16*>(g.up)};
  block_mma_tile<2, NT>(w, row0, ffn, hidden, x_row, g.num_rows, kWarps, red);
  for_each_mma_output<2, NT>(red, kWarps, row0, ffn, g.num_rows, [&](int row, int token, auto sum) {
    h[int64_t(g.row_begin + token) * ffn + row] = silu(sum(0)) * sum(1);
  });
}

template <int NT>
__global__ __launch_bounds__(kWarps * 32) void moe_down_mma_kernel(const float* h, const MoeGroup* groups, int hidden,
                                                                   int ffn, float* y, const int32_t* num_groups) {
  __shared__ float red[kWarps * NT * 4 * 32];
  MoeGroup g;
  if (!block_group(groups, num_groups, &g)) return;
  const int row0 = blockIdx.x * kMmaRows;
  const float* x_row[NT];
  mma_token_rows<NT>(threadIdx.x & 31, g.num_rows, [&](int i) { return h + int64_t(g.row_begin + i) * ffn; }, x_row);
  const bf16* w[1] = {reinterpret_cast<const bf16*>(g.down)};
  block_mma_tile<1, NT>(w, row0, hidden, ffn, x_row, g.num_rows, kWarps, red);
  for_each_mma_output<1, NT>(red, kWarps, row0, hidden, g.num_rows, [&](int row, int token, auto sum) {
    y[int64_t(g.row_begin + token) * hidden + row] = sum(0);
  });
}

template <int NT>
void launch_moe_mma(const float* x, const int32_t* row_token, const MoeGroup* groups, int num_groups, int hidden,
                    int ffn, float* h, float* y, cudaStream_t stream, const int32_t* device_num_groups) {
  const dim3 block(kWarps * 32);
  const dim3 grid_up(static_cast<unsigned>(ceil_div(ffn, kMmaRows)), num_groups);
  const dim3 grid_down(static_cast<unsigned>(ceil_div(hidden, kMmaRows)), num_groups);
  launch_pdl(moe_gate_up_mma_kernel<NT>, grid_up, block, 0, stream, x, row_token, groups, hidden, ffn, h,
             device_num_groups);
  launch_pdl(moe_down_mma_kernel<NT>, grid_down, block, 0, stream, static_cast<const float*>(h), groups, hidden, ffn,
             y, device_num_groups);
}

// One token (decode at batch 1): every group is one row and row r of the plan is group r. A block's warps
// each take one (output feature, pick) pair -- top_k warps per feature, so every expert's dot products run in
// parallel as in moe_down_kernel -- and the block then combines each feature's picks in pick order: the same
// per-expert reduction and the same summation order as moe_down + moe_combine (bit-identical), one launch and
// one pass over y fewer. top_k <= kWarps.
// The grid is sized to the SMs and a block loops over feature groups b, b + gridDim.x, ...: the warp finds its
// pick's row and expert once, and the next feature's row is loading while the current one's dot runs. A block
// per feature group (Model B: 2048 blocks of one feature, each through slot, the group and its down pointer
// before its first weight load) had run at 2.1 TB/s on an H200.
// PRELOAD (MOEX_CUDA_DOWN_PRELOAD=1, opt-in: no gain measured on an H200): the gate/up kernel before signalled its dependents only
// after its own wait, so the plan (slot, groups) is complete when this kernel starts: it is read through L2 (this
// SM's L1 may still hold the previous layer's plan) and the warp's first weights are loaded before the wait, which
// only h needs. dot_preloaded keeps warp_dot_bf16's summation order: bit-identical either way.
// LOOP false (a block per feature group, one round): no next row in registers, 38 registers a thread instead of
// 66. The launch picks the instance (launch_moe_gemv_one_token). Two features a warp per round on the looping
// grid (Model B: half the rounds, twice the rows in flight; 102 registers) was slower (H100, same call: 3.513 vs
// 3.483 ms/token).
template <bool PRELOAD, bool LOOP>
__global__ __launch_bounds__(kWarps * 32) void moe_down_combine_one_token_kernel(const float* h, const MoeGroup* groups,
                                                                                  const int32_t* slot,
                                                                                  const float* weights, int top_k,
                                                                                  int hidden, int ffn, float* out) {
  __shared__ float s_dot[2][kWarps];
  pdl_launch_dependents();
  if (!PRELOAD) pdl_wait();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int features_per_block = kWarps / top_k;
  const int local = warp / top_k, j = warp % top_k;
  const int k8_count = ffn / 8;
  const int row = local < features_per_block ? (PRELOAD ? __ldcg(slot + j) : slot[j]) : -1;
  const bf16* down = nullptr;
  if (row >= 0)
    down = reinterpret_cast<const bf16*>(
        PRELOAD ? reinterpret_cast<const uint16_t*>(
                      __ldcg(reinterpret_cast<const unsigned long long*>(&groups[row].down)))
                : groups[row].down);
  int i = blockIdx.x * features_per_block + local;
  const int feature_stride = gridDim.x * features_per_block;
  uint4 first[kGemvUnroll] = {};
  if ((LOOP || PRELOAD) && row >= 0 && i < hidden) preload_row<kGemvUnroll>(down + int64_t(i) * ffn, k8_count, lane, first);
  if (PRELOAD) pdl_wait();
  const float* x_row = row >= 0 ? h + int64_t(row) * ffn : h;
  for (int it = 0; blockIdx.x * features_per_block + it * feature_stride < hidden; ++it) {  // block-uniform
    const int next_i = i + feature_stride;
    uint4 next_first[kGemvUnroll] = {};
    if (LOOP && row >= 0 && next_i < hidden)
      preload_row<kGemvUnroll>(down + int64_t(next_i) * ffn, k8_count, lane, next_first);
    float dot = 0.f;
    if (row >= 0 && i < hidden) {
      if (LOOP || PRELOAD) {
        dot = warp_sum(dot_preloaded<kGemvUnroll>(first, down + int64_t(i) * ffn, x_row, k8_count, lane));
      } else {
        const bf16* w_rows[1] = {down + int64_t(i) * ffn};
        const float* x_rows[1] = {x_row};
        float part[1][1] = {};
        warp_dot_bf16<1, 1>(w_rows, x_rows, 1, k8_count, lane, part);
        dot = warp_sum(part[0][0]);
      }
    }
    float* s = s_dot[it & 1];  // double-buffered: one barrier per feature group
    if (lane == 0) s[warp] = dot;
    __syncthreads();
    if (threadIdx.x < features_per_block) {
      const int feature = blockIdx.x * features_per_block + it * feature_stride + threadIdx.x;
      if (feature < hidden) {
        float acc = 0.f;
        for (int pick = 0; pick < top_k; ++pick)
          if (slot[pick] >= 0) acc += weights[pick] * s[threadIdx.x * top_k + pick];
        out[feature] = acc;
      }
    }
#pragma unroll
    for (int u = 0; u < kGemvUnroll; ++u) first[u] = next_first[u];
    i = next_i;
  }
}

__global__ void moe_combine_kernel(const float* y, const int32_t* slot, const float* weights, int top_k,
                                   int64_t hidden, float* out) {
  pdl_launch_dependents();
  pdl_wait();
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
  const dim3 block(kWarps * 32);
  if (max_rows > 1 && hidden % kMmaKBlock == 0 && ffn % kMmaKBlock == 0 &&
      aligned16(x) && aligned16(h)) {
    if (max_rows <= 8)
      launch_moe_mma<1>(x, row_token, groups, num_groups, hid, f, h, y, stream, device_num_groups);
    else if (max_rows <= 16)
      launch_moe_mma<2>(x, row_token, groups, num_groups, hid, f, h, y, stream, device_num_groups);
    else
      launch_moe_mma<4>(x, row_token, groups, num_groups, hid, f, h, y, stream, device_num_groups);
    return;
  }
  if (max_rows <= 1) {
    launch_pdl(moe_gate_up_kernel<1>, grid_up, block, 0, stream, x, row_token, groups, hid, f, h, device_num_groups,
               false);
    launch_pdl(moe_down_kernel<1>, grid_down, block, 0, stream, h, groups, hid, f, y, device_num_groups);
  } else {
    launch_pdl(moe_gate_up_kernel<8>, grid_up, block, 0, stream, x, row_token, groups, hid, f, h, device_num_groups,
               false);
    launch_pdl(moe_down_kernel<8>, grid_down, block, 0, stream, h, groups, hid, f, y, device_num_groups);
  }
}

void launch_moe_combine(const float* y, const int32_t* slot, const float* weights, int64_t num_tokens,
                        int64_t top_k, int64_t hidden, float* out, cudaStream_t stream) {
  if (num_tokens == 0) return;
  launch_pdl(moe_combine_kernel, dim3(static_cast<unsigned>(num_tokens)), dim3(256), 0, stream, y, slot, weights,
             static_cast<int>(top_k), hidden, out);
}

void launch_moe_gemv_one_token(const float* x, const int32_t* row_token, const MoeGroup* groups, int top_k,
                               int64_t hidden, int64_t ffn, const int32_t* slot, const float* weights, float* h,
                               float* out, int num_sms, cudaStream_t stream, bool preload_down) {
  const int hid = static_cast<int>(hidden), f = static_cast<int>(ffn);
  const dim3 block(kWarps * 32);
  launch_pdl(moe_gate_up_kernel<1>, dim3(static_cast<unsigned>(ceil_div(ffn, kWarps)), top_k), block, 0, stream, x,
             row_token, groups, hid, f, h, static_cast<const int32_t*>(nullptr), preload_down);
  const int features_per_block = kWarps / top_k;
  // The grid, measured on H200s against the build before (bench/RESULTS.md, "Batch-1 decode: the router plans in
  // one block"; each figure against its own call's baseline):
  //  - rows up to 8192 wide whose block-per-feature-group grid fits the SMs at once (Model A: 512 blocks): that
  //    grid, the 38-register instance (0.590 ms/token; looping 0.599; baseline 0.595);
  //  - more blocks than fit at once (Model B: 2048 blocks of one feature): the looping grid with equal rounds, as
  //    many blocks per SM as fit at once (3 of the 66-register instance: 2.925 ms/token against 3.013 at 2, H200,
  //    same call, 2026-11-27; at first 2 had measured 3.297 against a baseline of 3.300, and a block per feature
  //    with the 66-register instance 3.320);
  //  - longer rows (Mixtral-8x7B's 14336: 28 KB a row): a block per feature group with the 66-register instance,
  //    3 blocks per SM (the 8x7B layer 0.2195 ms, baseline 0.2229; the 38-register instance, 6 per SM, 0.2286
  //    against 0.2232; looping 0.2294 against 0.2237).
  // MOEX_CUDA_DOWN_BLOCKS_PER_SM forces it: 0 a block per feature group (38 registers), N > 0 the looping grid.
  static const int forced = env_int("MOEX_CUDA_DOWN_BLOCKS_PER_SM", -1);
  // Blocks of each instance an SM holds at once. First asked at a step that runs eagerly (a recorded step's bucket
  // runs once before its capture); a failed query is cleared so the launch check does not see it.
  const auto blocks_per_sm = [](auto kernel) {
    int n = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kWarps * 32, 0) != cudaSuccess) {
      (void)cudaGetLastError();
      return 1;
    }
    return std::max(n, 1);
  };
  static const int light_blocks_per_sm = blocks_per_sm(moe_down_combine_one_token_kernel<false, false>);
  static const int looping_blocks_per_sm = blocks_per_sm(moe_down_combine_one_token_kernel<false, true>);
  const int64_t feature_groups = ceil_div(hidden, int64_t(features_per_block));
  const bool long_rows = forced < 0 && ffn > 8192;
  int64_t blocks = feature_groups;
  if (forced > 0)
    blocks = looping_grid_blocks(feature_groups, forced, num_sms);
  else if (forced < 0 && !long_rows && feature_groups > int64_t(num_sms) * light_blocks_per_sm)
    blocks = looping_grid_blocks(feature_groups, looping_blocks_per_sm, num_sms);
  const dim3 grid(static_cast<unsigned>(blocks));
  const bool loop = long_rows || blocks < feature_groups;  // the 66-register instance
  auto kernel = preload_down ? (loop ? moe_down_combine_one_token_kernel<true, true>
                                     : moe_down_combine_one_token_kernel<true, false>)
                             : (loop ? moe_down_combine_one_token_kernel<false, true>
                                     : moe_down_combine_one_token_kernel<false, false>);
  launch_pdl(kernel, grid, block, 0, stream, h, groups, slot, weights, top_k, hid, f, out);
}

}  // namespace moex::cuda
