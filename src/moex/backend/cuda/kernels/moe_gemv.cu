// MoE decode path: per group (one expert, <= kMoeGemvMaxRows tokens) gate AND up rows for all its tokens,
// SwiGLU applied in registers (the fused activation never round-trips memory as two tensors); then down per
// group; then a fixed-order weighted combine. Each expert's weights are read once per step.
// One token per group: fp32 GEMV warps. Several: tensor-core tiles (mma_core.cuh) where hidden and ffn are
// multiples of 32, else the fp32 GEMV in passes of 8 tokens.
#include "moex/backend/cuda/kernels/gemv_core.cuh"
#include "moex/backend/cuda/kernels/launch.cuh"
#include "moex/backend/cuda/kernels/mma_core.cuh"
#include "moex/backend/cuda/kernels/mma_rows.cuh"
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

template <int MT, int U = kGemvUnroll>
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
    warp_dot_bf16<2, MT, U>(w_rows, x_rows, count, hidden / 8, lane, acc);
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

// Row-split instances (mma_rows.cuh): a block owns 128 rows of one group's expert (gate/up: 128 rows of h, i.e. 128
// gate and 128 up rows) for all the group's tokens, staged once; `splits` blocks of a cluster along K. Block
// (x, y): group y, split x % splits of row tile x / splits.
template <int NT>
__global__ __launch_bounds__(kRowsWarps * 32, kRowsBlocksPerSm) void moe_gate_up_rows_kernel(const float* x, const int32_t* row_token,
                                                                           const MoeGroup* groups, int hidden, int ffn,
                                                                           float* h, const int32_t* num_groups,
                                                                           int splits, int smem_bytes,
                                                                           int stage_loads) {
  extern __shared__ uint4 rows_smem[];
  MoeGroup g;
  if (!block_group(groups, num_groups, &g)) return;  // the whole cluster shares the group
  const int tile = static_cast<int>(blockIdx.x) / splits, split = static_cast<int>(blockIdx.x) % splits;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, row0 = tile * kRowsTile;
  const bool active = row0 + warp * kMmaRows < ffn;
  const bf16* w[2] = {reinterpret_cast<const bf16*>(g.gate), reinterpret_cast<const bf16*>(g.up)};
  const RowsLaneWeights<2> lanes(w, row0 + warp * kMmaRows, ffn, hidden, lane);
  int kb_begin, kb_end;
  rows_split_range(hidden / kMmaKBlock, splits, split, &kb_begin, &kb_end);
  RowsRound<2> first;
  if (active) first.load(lanes, kb_begin, kb_end);
  float acc[2][NT][4] = {};
  block_rows_mma<2, NT>(
      lanes, first, [&](int i) { return x + int64_t(__ldcg(row_token + g.row_begin + i)) * hidden; }, g.num_rows,
      kb_begin, kb_end, rows_smem, smem_bytes, stage_loads, active, acc);
  rows_mma_finish<2, NT>(acc, reinterpret_cast<float*>(rows_smem), splits, row0, ffn, g.num_rows,
                         [&](int row, int token, auto sum) {
                           h[int64_t(g.row_begin + token) * ffn + row] = silu(sum(0)) * sum(1);
                         });
}

template <int NT>
__global__ __launch_bounds__(kRowsWarps * 32, kRowsBlocksPerSm) void moe_down_rows_kernel(const float* h, const MoeGroup* groups,
                                                                        int hidden, int ffn, float* y,
                                                                        const int32_t* num_groups, int splits,
                                                                        int smem_bytes, int stage_loads) {
  extern __shared__ uint4 rows_smem[];
  MoeGroup g;
  if (!block_group(groups, num_groups, &g)) return;
  const int tile = static_cast<int>(blockIdx.x) / splits, split = static_cast<int>(blockIdx.x) % splits;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, row0 = tile * kRowsTile;
  const bool active = row0 + warp * kMmaRows < hidden;
  const bf16* w[1] = {reinterpret_cast<const bf16*>(g.down)};
  const RowsLaneWeights<1> lanes(w, row0 + warp * kMmaRows, hidden, ffn, lane);
  int kb_begin, kb_end;
  rows_split_range(ffn / kMmaKBlock, splits, split, &kb_begin, &kb_end);
  RowsRound<1> first;
  if (active) first.load(lanes, kb_begin, kb_end);
  float acc[1][NT][4] = {};
  block_rows_mma<1, NT>(
      lanes, first, [&](int i) { return h + int64_t(g.row_begin + i) * ffn; }, g.num_rows, kb_begin, kb_end,
      rows_smem, smem_bytes, stage_loads, active, acc);
  rows_mma_finish<1, NT>(acc, reinterpret_cast<float*>(rows_smem), splits, row0, hidden, g.num_rows,
                         [&](int row, int token, auto sum) {
                           y[int64_t(g.row_begin + token) * hidden + row] = sum(0);
                         });
}

// expected_groups: about how many groups the plan has (the grid's y is num_groups, a bound when the plan is made
// on the device), for the split along K.
template <int NT>
void launch_moe_rows(const float* x, const int32_t* row_token, const MoeGroup* groups, int num_groups,
                     int expected_groups, int hidden, int ffn, float* h, float* y, int num_sms, cudaStream_t stream,
                     const int32_t* device_num_groups) {
  const int up_tiles = static_cast<int>(ceil_div(ffn, kRowsTile));
  const int down_tiles = static_cast<int>(ceil_div(hidden, kRowsTile));
  const int up_kb = hidden / kMmaKBlock, down_kb = ffn / kMmaKBlock;
  const int expected = std::max(1, std::min(expected_groups, num_groups));
  const int up_splits = rows_mma_splits(int64_t(up_tiles) * expected, up_kb, num_sms);
  const int down_splits = rows_mma_splits(int64_t(down_tiles) * expected, down_kb, num_sms);
  const int up_smem = rows_mma_smem_bytes(up_kb, up_splits, NT, 2);
  const int down_smem = rows_mma_smem_bytes(down_kb, down_splits, NT, 1);
  const int stage_loads = rows_stage_loads();
  launch_rows_mma<moe_gate_up_rows_kernel<NT>>(dim3(static_cast<unsigned>(up_tiles * up_splits), num_groups),
                                               up_splits, up_smem, stream, x, row_token, groups, hidden, ffn, h,
                                               device_num_groups, up_splits, up_smem, stage_loads);
  launch_rows_mma<moe_down_rows_kernel<NT>>(dim3(static_cast<unsigned>(down_tiles * down_splits), num_groups),
                                            down_splits, down_smem, stream, static_cast<const float*>(h), groups,
                                            hidden, ffn, y, device_num_groups, down_splits, down_smem, stage_loads);
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
// 66 (at U = 4). AT_END (looping grids): each round's dots stay in dynamic shared memory ([rounds][kWarps]) and
// the block combines every round's features once after the loop, instead of a barrier and a combine per round;
// same dots, same pick order: bit-identical. U: 16-byte loads in flight per lane; MIN_BLOCKS: the launch bounds'
// blocks per SM (0: none given -- an explicit 1 makes ptxas spend registers freely). The launch picks the
// instance (launch_moe_gemv_one_token). Two features a warp per round on the looping grid (Model B: half the
// rounds, twice the rows in flight; 102 registers) was slower (H100, same call: 3.513 vs 3.483 ms/token).
template <bool PRELOAD, bool LOOP, bool AT_END = false, int U = kGemvUnroll, int MIN_BLOCKS = 0>
__global__ __launch_bounds__(kWarps * 32, MIN_BLOCKS) void moe_down_combine_one_token_kernel(
    const float* h, const MoeGroup* groups, const int32_t* slot, const float* weights, int top_k, int hidden, int ffn,
    float* out) {
  static_assert(LOOP || !AT_END, "a block per feature group has one round");
  __shared__ float s_dot[2][kWarps];
  extern __shared__ float s_rounds[];  // AT_END: [rounds][kWarps]
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
  uint4 first[U] = {};
  if ((LOOP || PRELOAD) && row >= 0 && i < hidden) preload_row<U>(down + int64_t(i) * ffn, k8_count, lane, first);
  if (PRELOAD) pdl_wait();
  const float* x_row = row >= 0 ? h + int64_t(row) * ffn : h;
  // Feature `local_feature` of round `it` from its picks' dots s[local_feature * top_k + pick], in pick order.
  const auto combine = [&](int it, const float* s, int local_feature) {
    const int feature = blockIdx.x * features_per_block + it * feature_stride + local_feature;
    if (feature < hidden) {
      float acc = 0.f;
      for (int pick = 0; pick < top_k; ++pick)
        if (slot[pick] >= 0) acc += weights[pick] * s[local_feature * top_k + pick];
      out[feature] = acc;
    }
  };
  int it = 0;
  for (; blockIdx.x * features_per_block + it * feature_stride < hidden; ++it) {  // block-uniform
    const int next_i = i + feature_stride;
    uint4 next_first[U] = {};
    if (LOOP && row >= 0 && next_i < hidden) preload_row<U>(down + int64_t(next_i) * ffn, k8_count, lane, next_first);
    float dot = 0.f;
    if (row >= 0 && i < hidden) {
      if (LOOP || PRELOAD) {
        dot = warp_sum(dot_preloaded<U>(first, down + int64_t(i) * ffn, x_row, k8_count, lane));
      } else {
        const bf16* w_rows[1] = {down + int64_t(i) * ffn};
        const float* x_rows[1] = {x_row};
        float part[1][1] = {};
        warp_dot_bf16<1, 1, U>(w_rows, x_rows, 1, k8_count, lane, part);
        dot = warp_sum(part[0][0]);
      }
    }
    if constexpr (AT_END) {
      if (lane == 0) s_rounds[it * kWarps + warp] = dot;
    } else {
      float* s = s_dot[it & 1];  // double-buffered: one barrier per feature group
      if (lane == 0) s[warp] = dot;
      __syncthreads();
      if (threadIdx.x < features_per_block) combine(it, s, threadIdx.x);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) first[u] = next_first[u];
    i = next_i;
  }
  if constexpr (AT_END) {
    __syncthreads();
    for (int t = threadIdx.x; t < it * features_per_block; t += blockDim.x)
      combine(t / features_per_block, s_rounds + (t / features_per_block) * kWarps, t % features_per_block);
  }
}

// out[token] = sum over the token's picks j, in pick order, of weight_j * y[slot_j] (slot < 0: skipped). One block a
// token. Where vec4 (hidden % 4 == 0, y and out 16-byte aligned, top_k <= kCombineMaxPicks) the picks' slots and
// weights go to shared memory once and a thread takes 4 columns, issuing the loads of up to 8 picks before it sums
// them (the scalar loop's dependent loads had run Model B's 2048-token combine at ~2 TB/s: 74 us a layer, H200
// trace). The same fused multiply-adds in the same order in both loops, so the same bits.
constexpr int kCombineMaxPicks = 32;
__global__ void moe_combine_kernel(const float* y, const int32_t* slot, const float* weights, int top_k,
                                   int64_t hidden, float* out, bool vec4) {
  __shared__ int32_t s_slot[kCombineMaxPicks];
  __shared__ float s_weight[kCombineMaxPicks];
  pdl_launch_dependents();
  pdl_wait();
  const int64_t token = blockIdx.x;
  if (!vec4) {
    for (int64_t col = threadIdx.x; col < hidden; col += blockDim.x) {
      float acc = 0.f;
      for (int j = 0; j < top_k; ++j) {
        const int32_t row = slot[token * top_k + j];
        if (row >= 0) acc = fmaf(weights[token * top_k + j], y[int64_t(row) * hidden + col], acc);
      }
      out[token * hidden + col] = acc;
    }
    return;
  }
  if (threadIdx.x < top_k) {
    s_slot[threadIdx.x] = slot[token * top_k + threadIdx.x];
    s_weight[threadIdx.x] = weights[token * top_k + threadIdx.x];
  }
  __syncthreads();
  constexpr int kBatch = 8;
  const int64_t cols4 = hidden / 4;
  for (int64_t c = threadIdx.x; c < cols4; c += blockDim.x) {
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int j0 = 0; j0 < top_k; j0 += kBatch) {
      float4 v[kBatch];
#pragma unroll
      for (int jj = 0; jj < kBatch; ++jj) {
        const int j = j0 + jj;
        const int32_t row = j < top_k ? s_slot[j] : -1;
        v[jj] = row >= 0 ? __ldg(reinterpret_cast<const float4*>(y + int64_t(row) * hidden) + c)
                         : make_float4(0.f, 0.f, 0.f, 0.f);
      }
#pragma unroll
      for (int jj = 0; jj < kBatch; ++jj) {
        const int j = j0 + jj;
        if (j >= top_k || s_slot[j] < 0) continue;
        const float w = s_weight[j];
        acc = make_float4(fmaf(w, v[jj].x, acc.x), fmaf(w, v[jj].y, acc.y), fmaf(w, v[jj].z, acc.z),
                          fmaf(w, v[jj].w, acc.w));
      }
    }
    reinterpret_cast<float4*>(out + token * hidden)[c] = acc;
  }
}

}  // namespace

bool moe_rows_kernels_take(int64_t max_rows, int64_t hidden, int64_t ffn) {
  return max_rows > 1 && max_rows <= kMoeGemvMaxRows && rows_mma_enabled(max_rows) && hidden % kMmaKBlock == 0 &&
         ffn % kMmaKBlock == 0;
}

void launch_moe_gemv(const float* x, const int32_t* row_token, const MoeGroup* groups, int num_groups,
                     int max_rows, int64_t hidden, int64_t ffn, float* h, float* y, cudaStream_t stream,
                     const int32_t* device_num_groups, int num_sms, int expected_groups) {
  if (num_groups == 0) return;
  int hid = static_cast<int>(hidden), f = static_cast<int>(ffn);
  if (num_sms > 0 && moe_rows_kernels_take(max_rows, hidden, ffn) && aligned16(x) && aligned16(h)) {
    const int expected = expected_groups > 0 ? expected_groups : num_groups;
    with_rows_nt(max_rows, [&](auto nt) {
      launch_moe_rows<decltype(nt)::value>(x, row_token, groups, num_groups, expected, hid, f, h, y, num_sms, stream,
                                           device_num_groups);
    });
    return;
  }
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
  const bool vec4 = hidden % 4 == 0 && top_k <= kCombineMaxPicks && aligned16(y) && aligned16(out);
  launch_pdl(moe_combine_kernel, dim3(static_cast<unsigned>(num_tokens)), dim3(256), 0, stream, y, slot, weights,
             static_cast<int>(top_k), hidden, out, vec4);
}

void launch_moe_gemv_one_token(const float* x, const int32_t* row_token, const MoeGroup* groups, int top_k,
                               int64_t hidden, int64_t ffn, const int32_t* slot, const float* weights, float* h,
                               float* out, int num_sms, cudaStream_t stream, bool preload_down) {
  const int hid = static_cast<int>(hidden), f = static_cast<int>(ffn);
  const dim3 block(kWarps * 32);
  launch_pdl(moe_one_token_gate_up_unroll(hidden) == 2 ? moe_gate_up_kernel<1, 2> : moe_gate_up_kernel<1>,
             dim3(static_cast<unsigned>(ceil_div(ffn, kWarps)), top_k), block, 0, stream, x, row_token, groups, hid, f,
             h, static_cast<const int32_t*>(nullptr), preload_down);
  launch_moe_down_one_token(h, groups, top_k, hidden, ffn, slot, weights, out, num_sms, stream, preload_down);
}

// Gate/up rows of up to 2048 (Model A and B) with 2 loads in flight per lane and row instead of 4: 40 registers
// instead of 64, 6 blocks per SM instead of 4, so Model B's 768 blocks run in one wave instead of 1.45 (H200, same
// call: Model B 12 layers 0.8279 vs 0.8451 ms/token, Model A 0.5534 vs 0.5609). Wider rows (the 8x7B layer's 4096)
// keep 4: at 2 a lane would wait out 8 round trips a row. MOEX_CUDA_GATE_UP_UNROLL=2|4 forces one.
int moe_one_token_gate_up_unroll(int64_t hidden) {
  static const int forced = env_int("MOEX_CUDA_GATE_UP_UNROLL", 0);
  return forced == 2 || (forced != 4 && hidden <= 2048) ? 2 : 4;
}

void launch_moe_down_one_token(const float* h, const MoeGroup* groups, int top_k, int64_t hidden, int64_t ffn,
                               const int32_t* slot, const float* weights, float* out, int num_sms, cudaStream_t stream,
                               bool preload_down) {
  const int hid = static_cast<int>(hidden), f = static_cast<int>(ffn);
  const dim3 block(kWarps * 32);
  const int features_per_block = kWarps / top_k;
  // The grid and instance, measured on H200s against the build before (bench/RESULTS.md; each figure against its
  // own call's baseline):
  //  - rows up to 8192 wide whose block-per-feature-group grid fits the SMs at once with 8 loads in flight per
  //    lane (Model A: 512 blocks, 56 registers, 4 blocks per SM): that grid and instance (2026-11-27: Model A
  //    0.5461 vs 0.5609 ms/token with 4 loads, 38 registers; earlier the block-per-feature-group grid had measured
  //    0.590 against looping 0.599);
  //  - more blocks than fit at once (Model B: 2048 blocks of one feature): the looping grid with equal rounds, as
  //    many blocks per SM as fit at once, every round's dots kept in shared memory and combined after the loop, so
  //    the warps (each streaming another expert's rows) never wait for one another between rounds; 4 blocks per
  //    SM at 64 registers (launch bounds). 2026-11-27, H200, Model B 12 layers: 0.8229 vs 0.8451 ms/token with a
  //    barrier per round (66 registers, 3 blocks per SM; at end with 3 blocks per SM 0.8433: both are needed; two
  //    rounds' rows in flight 0.8466 at end, 0.8655 with barriers). Before: 3 per SM 2.925 vs 2 per SM 3.013;
  //  - longer rows (Mixtral-8x7B's 14336: 28 KB a row): a block per feature group with the 66-register instance,
  //    3 blocks per SM (the 8x7B layer 0.2195 ms, baseline 0.2229; the 38-register instance, 6 per SM, 0.2286
  //    against 0.2232; looping 0.2294 against 0.2237).
  // MOEX_CUDA_DOWN_BLOCKS_PER_SM forces the grid: 0 a block per feature group (38 registers), N > 0 the looping
  // grid. MOEX_CUDA_DOWN_AT_END=0 puts the barrier back in every round, MOEX_CUDA_DOWN_UNROLL=4 the 38-register
  // instance on the one-wave grid (A/B).
  static const int forced = env_int("MOEX_CUDA_DOWN_BLOCKS_PER_SM", -1);
  static const bool at_end = !env_equals("MOEX_CUDA_DOWN_AT_END", "0");
  static const bool light_u8 = !env_equals("MOEX_CUDA_DOWN_UNROLL", "4");
  // Blocks of each instance an SM holds at once (at least 1: a failed query sizes grids as one block per SM).
  // First asked at a step that runs eagerly (a recorded step's bucket runs once before its capture).
  const auto at_once = [](auto kernel) { return std::max(blocks_per_sm(kernel, kWarps * 32), 1); };
  using Kernel = decltype(&moe_down_combine_one_token_kernel<false, false>);
  const auto light = [](bool preload, int u) -> Kernel {
    if (u == 8) return preload ? moe_down_combine_one_token_kernel<true, false, false, 8>
                               : moe_down_combine_one_token_kernel<false, false, false, 8>;
    return preload ? moe_down_combine_one_token_kernel<true, false> : moe_down_combine_one_token_kernel<false, false>;
  };
  const auto looping = [](bool preload, bool combine_at_end) -> Kernel {
    if (combine_at_end) return preload ? moe_down_combine_one_token_kernel<true, true, true, kGemvUnroll, 4>
                                       : moe_down_combine_one_token_kernel<false, true, true, kGemvUnroll, 4>;
    return preload ? moe_down_combine_one_token_kernel<true, true> : moe_down_combine_one_token_kernel<false, true>;
  };
  static const int light_blocks_per_sm = at_once(light(false, 4));
  static const int light_u8_blocks_per_sm = at_once(light(false, 8));
  static const int looping_blocks_per_sm = at_once(looping(false, at_end));
  const int64_t feature_groups = ceil_div(hidden, int64_t(features_per_block));
  int64_t blocks = feature_groups;
  bool looping_grid = false;
  Kernel kernel = light(preload_down, 4);
  if (forced > 0) {
    blocks = looping_grid_blocks(feature_groups, forced, num_sms);
    looping_grid = true;
  } else if (forced < 0 && ffn > 8192) {
    kernel = looping(preload_down, false);  // one round: the 66-register instance
  } else if (forced < 0 && light_u8 && feature_groups <= int64_t(num_sms) * light_u8_blocks_per_sm) {
    kernel = light(preload_down, 8);
  } else if (forced < 0 && feature_groups > int64_t(num_sms) * light_blocks_per_sm) {
    blocks = looping_grid_blocks(feature_groups, looping_blocks_per_sm, num_sms);
    looping_grid = true;
  }
  // A looping grid's dots of every round: rounds * kWarps floats of dynamic shared memory (well under the 48 KB
  // default for any real shape; past it, the barrier per round).
  const int64_t rounds = ceil_div(feature_groups, blocks);
  const bool combine_at_end = looping_grid && at_end && rounds * kWarps * int64_t(sizeof(float)) <= 48 * 1024;
  if (looping_grid) kernel = looping(preload_down, combine_at_end);
  const size_t smem = combine_at_end ? static_cast<size_t>(rounds) * kWarps * sizeof(float) : 0;
  launch_pdl(kernel, dim3(static_cast<unsigned>(blocks)), block, smem, stream, h, groups, slot, weights, top_k, hid, f,
             out);
}

}  // namespace moex::cuda
