// Decode GEMV: one warp per output feature, all m_count activation rows at once so the weight row is read
// once per step whatever the batch (up to kGemvMaxRows). Several weights sharing the input (q/k/v) are one
// grid: warp w of the grid takes row w of the concatenation of the outputs.
// 2-32 rows take the tensor-core kernel (mma_core.cuh). Launched with programmatic dependent launch
// (launch.cuh). At one row each warp loads its first round of weights into registers before the PDL wait
// (H200, same call: Model A 0.6783 vs 0.6872 ms/token, Model B 3.738 vs 3.758). An L2 prefetch of the row
// before the wait had been measured slower (Model A 1.154 vs 1.096 ms/token): the data then took a second
// trip, from L2, after the wait. Prefetching to L2 before the wait what the preload leaves (the second half of a
// 4096-wide o_proj row), or the normed q/k/v kernel's later rows, was slower too (H200, same call: the 8x7B layer
// 0.2230 vs 0.2215 ms, Model B 3.135 / 3.200 vs 3.123 ms/token): those bytes then compete with the weight stream
// of the kernel still running ahead.
#include "moex/backend/cuda/kernels/gemv.cuh"

#include "moex/backend/cuda/kernels/argmax_key.h"
#include "moex/backend/cuda/kernels/gemv_core.cuh"
#include "moex/backend/cuda/kernels/launch.cuh"
#include "moex/backend/cuda/kernels/mma_core.cuh"
#include "moex/backend/cuda/kernels/mma_rows.cuh"
#include "moex/backend/cuda/kernels/residual_norm.cuh"

namespace moex::cuda {
namespace {

constexpr int kWarps = 8;

struct GemvOutputs {
  GemvOutput out[kGemvMaxOutputs];
  int count;
};

// The output holding grid row grid_row of the concatenation, and the row within it; false past the last row.
// Constant indices only: a dynamic index into the parameter struct copies it to local memory (a 104-byte stack
// frame written and read back by every warp before its first load; removing it made Model A's batch-1 step 9%
// faster on an H200).
__device__ __forceinline__ bool select_output(const GemvOutputs& outputs, int grid_row, GemvOutput* o, int* row) {
  *o = outputs.out[0];
  *row = grid_row;
  bool found = false;
  int start = 0;
#pragma unroll
  for (int i = 0; i < kGemvMaxOutputs; ++i) {
    const int rows = i < outputs.count ? static_cast<int>(outputs.out[i].rows) : 0;
    if (grid_row >= start && grid_row < start + rows) {
      *o = outputs.out[i];
      *row = grid_row - start;
      found = true;
    }
    start += rows;
  }
  return found;
}

// preload (one activation row; on unless MOEX_CUDA_GEMV_PRELOAD=0, an A/B switch): the warp's first round of
// weight loads goes out before the PDL wait (gemv_core.cuh, preload_row).
template <int MT, int U>
__global__ __launch_bounds__(kWarps * 32) void gemv_kernel(const float* x, int m_count, int K, GemvOutputs outputs,
                                                           bool preload) {
  pdl_launch_dependents();
  const int lane = threadIdx.x & 31;
  const int grid_row = blockIdx.x * kWarps + (threadIdx.x >> 5);
  GemvOutput o;
  int row;
  const bool active = select_output(outputs, grid_row, &o, &row);
  const bf16* w_row = reinterpret_cast<const bf16*>(o.w) + int64_t(active ? row : 0) * K;
  const int k8_count = K / 8;
  uint4 first[U] = {};
  if (MT == 1 && preload && active) preload_row<U>(w_row, k8_count, lane, first);
  pdl_wait();
  if (!active) return;
  float acc[1][MT] = {};
  if (MT == 1 && preload) {
    acc[0][0] = dot_preloaded<U>(first, w_row, x, k8_count, lane);
  } else {
    const bf16* w_rows[1] = {w_row};
    const float* x_rows[MT];
#pragma unroll
    for (int m = 0; m < MT; ++m) x_rows[m] = x + int64_t(m < m_count ? m : 0) * K;
    warp_dot_bf16<1, MT, U>(w_rows, x_rows, m_count, k8_count, lane, acc);
  }
  const float b = o.bias ? o.bias[row] : 0.f;
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    float v = warp_sum(acc[0][m]);
    if (lane == 0 && m < m_count) o.y[int64_t(m) * o.rows + row] = v + b;
  }
}

// One row through up to kGemvMaxOutputs weights, the row normalised by each block first (residual_norm.cuh):
// the RMSNorm before q/k/v without a launch of its own. The weights' first round is loaded before the PDL wait
// and the norm, so the norm's L2 reads overlap the weight stream; so is the norm's weight (NW float4s per
// thread, residual_norm.cuh).
// A warp takes grid rows w, w + stride, ... (stride = the grid's warps): the grid is sized to the SMs
// (launch_gemv_bf16_multi_normed), not one row per warp. Every block re-reads the row (x, d0, d1: 3 K floats) to
// normalise it, so a block per 8 rows had read about as many bytes from L2 as the weights from HBM (8x7B q/k/v,
// 768 blocks: 43 MB against 50 MB) and ran at 2.5 TB/s on an H200. While a row's dot runs, the warp's next row
// is already loading (its first round, as before the wait), so its rows follow each other without a gap.
// best (the lm_head of a step whose greedy pick follows, or null): lane 0 keeps the argmax_key of its warp's rows,
// the block folds its warps' into *best with one atomicMax (launch_gemv_bf16_multi_normed).
constexpr int kNormedUnroll = 8;  // U of gemv_normed_kernel: a 2048-wide row in one round of loads per lane
template <int U, int NW>
__global__ __launch_bounds__(kWarps * 32) void gemv_normed_kernel(ResidualNormIn in, int K, GemvOutputs outputs,
                                                                  int total_rows, bool preload, EmbedRowIn embed,
                                                                  unsigned long long* best) {
  extern __shared__ float4 s_h4[];
  __shared__ float s_scratch[32];
  __shared__ unsigned long long s_best[kWarps];
  unsigned long long warp_best = 0;
  pdl_launch_dependents();
  const int lane = threadIdx.x & 31;
  const int stride = gridDim.x * kWarps;
  const int k8_count = K / 8;
  int grid_row = blockIdx.x * kWarps + (threadIdx.x >> 5);
  GemvOutput o;
  int row;
  bool active = grid_row < total_rows && select_output(outputs, grid_row, &o, &row);
  const bf16* w_row = reinterpret_cast<const bf16*>(o.w) + int64_t(active ? row : 0) * K;
  uint4 first[U] = {};
  if (preload && active) preload_row<U>(w_row, k8_count, lane, first);
  float4 norm_w[NW];
  preload_norm_weight(in, K, norm_w);
  pdl_wait();
  float* s_h = reinterpret_cast<float*>(s_h4);
  if (embed.table) {  // the first layer: the token's embedding row is x (EmbedRowIn); block 0 stores it
    const size_t row_bytes = size_t(K) * (embed.table_f32 ? sizeof(float) : sizeof(bf16));
    const void* emb = static_cast<const char*>(embed.table) + size_t(*embed.token) * row_bytes;
    row_norm_to_shared(in, K, norm_w, s_h, s_scratch, [&](int c) {
      const float4 v = load_norm_weight4(emb, !embed.table_f32, c);
      if (blockIdx.x == 0) reinterpret_cast<float4*>(in.x)[c] = v;
      return v;
    });
  } else {
    residual_norm_to_shared(in, K, norm_w, s_h, s_scratch);  // every warp: block reductions inside
  }
  while (active) {
    const int next_grid_row = grid_row + stride;
    GemvOutput next_o;
    int next_row;
    const bool next_active = next_grid_row < total_rows && select_output(outputs, next_grid_row, &next_o, &next_row);
    const bf16* next_w = reinterpret_cast<const bf16*>(next_o.w) + int64_t(next_active ? next_row : 0) * K;
    uint4 next_first[U] = {};
    if (preload && next_active) preload_row<U>(next_w, k8_count, lane, next_first);
    float acc;
    if (preload) {
      acc = dot_preloaded<U, true>(first, w_row, s_h, k8_count, lane);
    } else {
      const bf16* w_rows[1] = {w_row};
      const float* x_rows[1] = {s_h};
      float part[1][1] = {};
      warp_dot_bf16<1, 1, U, true>(w_rows, x_rows, 1, k8_count, lane, part);
      acc = part[0][0];
    }
    const float v = warp_sum(acc);
    if (lane == 0) {
      const float y = v + (o.bias ? o.bias[row] : 0.f);
      o.y[row] = y;
      if (best) warp_best = max(warp_best, static_cast<unsigned long long>(argmax_key(y, row)));
    }
#pragma unroll
    for (int u = 0; u < U; ++u) first[u] = next_first[u];
    grid_row = next_grid_row;
    o = next_o;
    row = next_row;
    w_row = next_w;
    active = next_active;
  }
  if (best) {  // a kernel argument: the whole block takes this branch or none of it
    if (lane == 0) s_best[threadIdx.x >> 5] = warp_best;
    __syncthreads();
    if (threadIdx.x == 0) {
      unsigned long long block_best = s_best[0];
      for (int w = 1; w < kWarps; ++w) block_best = max(block_best, s_best[w]);
      if (block_best != 0) atomicMax(best, block_best);
    }
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

// 2-32 tokens: a block owns NR tiles of 16 output rows (consecutive) of one output; its WARPS warps split K and
// sum in warp order. NT n-tiles of 8 tokens. Several outputs (q/k/v) share one grid: block b takes the output
// whose tile range holds b. With NT >= 2 the activations dominate the block's loads (every block reads all
// tokens' K floats for its rows) and their bf16 split dominates its instructions; two row tiles per block share
// both, so NR = 2 there when the grid stays large (lm_head) and every output's rows are a multiple of 32.
struct MmaOutputs {
  GemvOutput out[kGemvMaxOutputs];
  int tiles_before[kGemvMaxOutputs + 1];  // blocks of outputs [0, i)
  int count;
};

template <int NR, int NT, int WARPS>
__global__ __launch_bounds__(WARPS * 32) void linear_mma_kernel(const float* x, int m_count, int K, MmaOutputs outs) {
  __shared__ float red[WARPS * NR * NT * 4 * 32];
  pdl_launch_dependents();
  // Constant indices only: a dynamic index into the parameter struct copies it to local memory.
  GemvOutput o = outs.out[0];
  int first_tile = 0;
#pragma unroll
  for (int i = 1; i < kGemvMaxOutputs; ++i)
    if (i < outs.count && int(blockIdx.x) >= outs.tiles_before[i]) {
      o = outs.out[i];
      first_tile = outs.tiles_before[i];
    }
  const int N = static_cast<int>(o.rows);
  const int row0 = (int(blockIdx.x) - first_tile) * kMmaRows * NR;
  pdl_wait();
  const float* x_row[NT];
  mma_token_rows<NT>(threadIdx.x & 31, m_count, [&](int i) { return x + int64_t(i) * K; }, x_row);
  // Tile r is weight rows [row0 + 16 r, row0 + 16 r + 16): with NR > 1, N % (16 NR) == 0, so no tile is short.
  const bf16* w = reinterpret_cast<const bf16*>(o.w);
  const bf16* rows[NR];
#pragma unroll
  for (int r = 0; r < NR; ++r) rows[r] = w + int64_t(r) * kMmaRows * K;
  block_mma_tile<NR, NT>(rows, row0, NR > 1 ? row0 + kMmaRows : N, K, x_row, m_count, WARPS, red);
  for_each_mma_output<NR, NT>(red, WARPS, row0, N, m_count, [&](int row, int token, auto sum) {
#pragma unroll
    for (int r = 0; r < NR; ++r)
      o.y[int64_t(token) * N + row + r * kMmaRows] = sum(r) + (o.bias ? o.bias[row + r * kMmaRows] : 0.f);
  });
}

// The row-split shape (mma_rows.cuh): blocks of 128 rows of one output, `splits` blocks (a cluster) along K.
// outs.tiles_before counts 128-row tiles; block x is split x % splits of tile x / splits.
template <int NT>
__global__ __launch_bounds__(kRowsWarps * 32, kRowsBlocksPerSm) void linear_rows_mma_kernel(const float* x, int m_count, int K,
                                                                          MmaOutputs outs, int splits,
                                                                          int smem_bytes, int stage_loads) {
  extern __shared__ uint4 rows_smem[];
  pdl_launch_dependents();
  const int tile = static_cast<int>(blockIdx.x) / splits, split = static_cast<int>(blockIdx.x) % splits;
  // Constant indices only: a dynamic index into the parameter struct copies it to local memory.
  GemvOutput o = outs.out[0];
  int first_tile = 0;
#pragma unroll
  for (int i = 1; i < kGemvMaxOutputs; ++i)
    if (i < outs.count && tile >= outs.tiles_before[i]) {
      o = outs.out[i];
      first_tile = outs.tiles_before[i];
    }
  const int N = static_cast<int>(o.rows), lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int row0 = (tile - first_tile) * kRowsTile;
  const bool active = row0 + warp * kMmaRows < N;
  const bf16* w[1] = {reinterpret_cast<const bf16*>(o.w)};
  const RowsLaneWeights<1> lanes(w, row0 + warp * kMmaRows, N, K, lane);
  int kb_begin, kb_end;
  rows_split_range(K / kMmaKBlock, splits, split, &kb_begin, &kb_end);
  RowsRound<1> first;
  if (active) first.load(lanes, kb_begin, kb_end);  // weights: known before the wait
  pdl_wait();
  float acc[1][NT][4] = {};
  block_rows_mma<1, NT>(lanes, first, [&](int i) { return x + int64_t(i) * K; }, m_count, kb_begin, kb_end, rows_smem,
                        smem_bytes, stage_loads, active, acc);
  rows_mma_finish<1, NT>(acc, reinterpret_cast<float*>(rows_smem), splits, row0, N, m_count,
                         [&](int row, int token, auto sum) {
                           o.y[int64_t(token) * N + row] = sum(0) + (o.bias ? o.bias[row] : 0.f);
                         });
}

void launch_linear_rows_mma(const float* x, int64_t m_count, int64_t K, const GemvOutput* outputs, int count,
                            int sms, cudaStream_t stream) {
  MmaOutputs outs{};
  outs.count = count;
  outs.tiles_before[0] = 0;
  for (int i = 0; i < count; ++i) {
    outs.out[i] = outputs[i];
    outs.tiles_before[i + 1] = outs.tiles_before[i] + static_cast<int>(ceil_div(outputs[i].rows, kRowsTile));
  }
  const int tiles = outs.tiles_before[count], kb_count = static_cast<int>(K / kMmaKBlock);
  // A grid of a tile per SM or more runs unsplit (H200, 32 tokens: Model A's lm_head 56 us against 63 at two blocks
  // along K and 88 at three); smaller ones split K.
  const int splits = tiles >= sms ? 1 : rows_mma_splits(tiles, kb_count, sms);
  const int m = static_cast<int>(m_count), k = static_cast<int>(K);
  const dim3 grid(static_cast<unsigned>(tiles * splits));
  with_rows_nt(m_count, [&](auto nt) {
    constexpr int kNt = decltype(nt)::value;
    const int smem = rows_mma_smem_bytes(kb_count, splits, kNt, 1);
    launch_rows_mma<linear_rows_mma_kernel<kNt>>(grid, splits, smem, stream, x, m, k, outs, splits, smem,
                                                 rows_stage_loads());
  });
}

bool few_token_mma_fits(const float* x, int64_t m_count, const uint16_t* w, int64_t K) {
  return m_count >= 2 && m_count <= kLinearMmaMaxRows && K % kMmaKBlock == 0 && aligned16(x) && aligned16(w);
}

// Block shape by grid size. A block streams 16 NR rows; q/k/v/o of a decode layer are a few hundred such tiles,
// so two tiles per block (fewer activation re-reads) left most SMs idle (Model A k_proj at 32 tokens: 32 blocks
// for 132 SMs). NR = 2 only where the grid keeps at least 4 blocks per SM; 16 warps per block where even NR = 1
// gives at most one block per SM, so that each SM keeps enough weight bytes in flight.
void launch_linear_mma(const float* x, int64_t m_count, int64_t K, const GemvOutput* outputs, int count, int sms,
                       cudaStream_t stream) {
  // The row-split kernel from 17 tokens on, where one wave of unsplit tiles covers the SMs: at 32 tokens it ran
  // Model A's and B's lm_head in 56 and 260 us against 91 and 424, but a q/k/v or o_proj, split over clusters, in
  // 10-19 us against 9-14 (H200, moex_cuda_kernels_bench). MOEX_CUDA_MMA_ROWS=1 takes it for every shape. The MoE
  // routers of batched decode (one 128-row tile) split over a cluster measured no faster (H200, 32 tokens: Model A's
  // 8 rows 7.1 against 7.2 us, Model B's 128 rows 7.8 against 7.1; 12-layer Model B's step 0.6-1% slower).
  int64_t row_tiles = 0;
  for (int i = 0; i < count; ++i) row_tiles += ceil_div(outputs[i].rows, kRowsTile);
  if (rows_mma_enabled(m_count) && (row_tiles >= sms || env_equals("MOEX_CUDA_MMA_ROWS", "1"))) {
    launch_linear_rows_mma(x, m_count, K, outputs, count, sms, stream);
    return;
  }
  bool pairs = true;
  int64_t tiles = 0;
  for (int i = 0; i < count; ++i) {
    pairs = pairs && outputs[i].rows % (2 * kMmaRows) == 0;
    tiles += ceil_div(outputs[i].rows, kMmaRows);
  }
  const int m = static_cast<int>(m_count), k = static_cast<int>(K);
  auto launch = [&](auto kernel, int nr, int warps) {
    MmaOutputs outs{};
    outs.count = count;
    outs.tiles_before[0] = 0;
    for (int i = 0; i < count; ++i) {
      outs.out[i] = outputs[i];
      outs.tiles_before[i + 1] = outs.tiles_before[i] + static_cast<int>(ceil_div(outputs[i].rows, kMmaRows * nr));
    }
    launch_pdl(kernel, dim3(static_cast<unsigned>(outs.tiles_before[count])), dim3(warps * 32), 0, stream, x, m, k,
               outs);
  };
  const bool wide = pairs && tiles >= 8 * int64_t(sms);  // NR = 2 still leaves >= 4 blocks per SM
  const bool narrow = tiles <= int64_t(sms);  // one block per SM at most: 16 warps keep the bytes in flight
  if (m_count <= 8)
    narrow ? launch(linear_mma_kernel<1, 1, 16>, 1, 16) : launch(linear_mma_kernel<1, 1, 8>, 1, 8);
  else if (m_count <= 16)
    wide ? launch(linear_mma_kernel<2, 2, 8>, 2, 8)
         : (narrow ? launch(linear_mma_kernel<1, 2, 16>, 1, 16) : launch(linear_mma_kernel<1, 2, 8>, 1, 8));
  else
    wide ? launch(linear_mma_kernel<2, 4, 8>, 2, 8)
         : (narrow ? launch(linear_mma_kernel<1, 4, 16>, 1, 16) : launch(linear_mma_kernel<1, 4, 8>, 1, 8));
}

// The fp32 GEMV kernel over up to kGemvMaxOutputs weights; m_count <= kGemvMaxRows, K % 8 == 0, aligned.
void launch_gemv_kernel(const float* x, int64_t m_count, int64_t K, const GemvOutputs& packed, int64_t total_rows,
                        int num_sms, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(total_rows, kWarps))), block(kWarps * 32);
  const int m = static_cast<int>(m_count), k = static_cast<int>(K);
  const bool preload = gemv_preload_enabled();
  // One row wider than 2048 whose grid fits the SMs at once (Model B's o_proj, K = 4096: 256 blocks) loads each
  // warp's whole row before the PDL wait (16 loads a lane, 101 registers, 2 blocks per SM), so after the wait
  // only the activations' reads are left. H200, same call: Model B 12 layers 0.7963 vs 0.8057 ms/token. A grid
  // of more blocks (the 8x7B layer's o_proj: 512) keeps 8 loads a lane: at 2 blocks per SM it would run in two
  // waves. MOEX_CUDA_GEMV_UNROLL=8 keeps 8 everywhere (A/B).
  static const bool whole_rows = env_int("MOEX_CUDA_GEMV_UNROLL", 16) == 16;
  static const int whole_row_blocks_per_sm = blocks_per_sm(gemv_kernel<1, 16>, kWarps * 32);
  if (m_count == 1 && whole_rows && K > 2048 && K / 8 <= 32 * 16 &&  // 16 loads a lane cover the row
      int64_t(grid.x) <= int64_t(whole_row_blocks_per_sm) * num_sms)
    launch_pdl(gemv_kernel<1, 16>, grid, block, 0, stream, x, m, k, packed, preload);
  else if (m_count == 1)  // 8 loads in flight per lane: measured faster than 4 on Model A at batch 1 (H200)
    launch_pdl(gemv_kernel<1, 8>, grid, block, 0, stream, x, m, k, packed, preload);
  else if (m_count == 2)
    launch_pdl(gemv_kernel<2, 4>, grid, block, 0, stream, x, m, k, packed, false);
  else if (m_count <= 4)
    launch_pdl(gemv_kernel<4, 4>, grid, block, 0, stream, x, m, k, packed, false);
  else
    launch_pdl(gemv_kernel<8, 4>, grid, block, 0, stream, x, m, k, packed, false);
}

// The fp32 GEMV kernel's envelope (any row count: it runs in passes of kGemvMaxRows).
bool gemv_fits(const float* x, const uint16_t* w, int64_t K) { return K % 8 == 0 && aligned16(x) && aligned16(w); }

}  // namespace

void launch_gemv_bf16_multi(const float* x, int64_t m_count, int64_t K, const GemvOutput* outputs, int count,
                            int num_sms, cudaStream_t stream) {
  if (m_count == 0 || count == 0) return;
  // One launch for all outputs: the fp32 GEMV at one row, the tensor-core kernel at 2-32 rows where every
  // output's rows are whole 16-row tiles (else a tile would straddle two outputs); one launch per weight otherwise.
  bool mma = count <= kGemvMaxOutputs;
  for (int i = 0; i < count; ++i)
    mma = mma && few_token_mma_fits(x, m_count, outputs[i].w, K) && outputs[i].rows % kMmaRows == 0;
  if (mma) {
    launch_linear_mma(x, m_count, K, outputs, count, num_sms, stream);
    return;
  }
  bool one_launch = m_count == 1 && count <= kGemvMaxOutputs;
  int64_t total_rows = 0;
  for (int i = 0; i < count; ++i) {
    one_launch = one_launch && gemv_fits(x, outputs[i].w, K);
    total_rows += outputs[i].rows;
  }
  if (!one_launch) {
    for (int i = 0; i < count; ++i)
      launch_gemv_bf16(x, m_count, outputs[i].w, outputs[i].rows, K, outputs[i].bias, outputs[i].y, num_sms, stream);
    return;
  }
  if (total_rows == 0) return;
  GemvOutputs packed{};
  for (int i = 0; i < count; ++i) packed.out[i] = outputs[i];
  packed.count = count;
  launch_gemv_kernel(x, m_count, K, packed, total_rows, num_sms, stream);
}

bool residual_norm_fits(const ResidualNormIn& in, int64_t K) {
  const auto aligned8 = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 8 == 0; };
  return K % 4 == 0 && K > 0 && K <= kResidualNormMaxK && in.x && aligned16(in.x) && (!in.d0 || aligned16(in.d0)) &&
         (!in.d1 || aligned16(in.d1)) && in.weight && (in.weight_bf16 ? aligned8(in.weight) : aligned16(in.weight));
}

// The lanes' first round of 16-byte loads covers a row.
bool gemv_normed_loops(int64_t K) { return K / 8 <= 32 * kNormedUnroll; }

// The normed GEMV's grid. Blocks per SM (MOEX_CUDA_NORMED_BLOCKS_PER_SM, default 2; 0: a block per 8 rows): enough
// warps to keep HBM busy, few enough that the row's norm is computed a few hundred times, not once per 8 rows. Only
// where one round of loads covers a row (K <= 2048 at U = kNormedUnroll = 8), so that the warp's next row loads
// while its current one is summed; a longer row waits for its second round in the loop. H200, same call
// (MOEX_CUDA_NORMED_BLOCKS_PER_SM=0 against 2): Model B 3.427 -> 3.301 ms/token, Model A 0.605 -> 0.599; the 8x7B
// layer (K = 4096) 2.1 us slower.
int64_t gemv_normed_blocks(int64_t total_rows, int64_t K, int num_sms) {
  static const int forced = env_int("MOEX_CUDA_NORMED_BLOCKS_PER_SM", -1);
  const int blocks_per_sm = forced >= 0 ? forced : (gemv_normed_loops(K) ? 2 : 0);
  return looping_grid_blocks(ceil_div(total_rows, int64_t(kWarps)), blocks_per_sm, num_sms);
}

int64_t gemv_normed_free_half_sms(int64_t total_rows, int64_t K, int num_sms) {
  return std::max<int64_t>(0, 2 * int64_t(num_sms) - gemv_normed_blocks(total_rows, K, num_sms));
}

bool launch_gemv_bf16_multi_normed(const ResidualNormIn& in, int64_t K, const GemvOutput* outputs, int count,
                                   int num_sms, cudaStream_t stream, const EmbedRowIn& embed,
                                   unsigned long long* argmax_key) {
  if (count < 1 || count > kGemvMaxOutputs || K % 8 != 0 || !residual_norm_fits(in, K)) return false;
  if (argmax_key && (count != 1 || outputs[0].rows > INT32_MAX)) return false;
  if (embed.table && (!embed.token || !aligned16(embed.table) || in.d0 || in.d1)) return false;
  GemvOutputs packed{};
  int64_t total_rows = 0;
  for (int i = 0; i < count; ++i) {
    if (!aligned16(outputs[i].w)) return false;
    packed.out[i] = outputs[i];
    total_rows += outputs[i].rows;
  }
  packed.count = count;
  if (total_rows == 0) return !embed.table;  // nothing would store x
  const dim3 grid(static_cast<unsigned>(gemv_normed_blocks(total_rows, K, num_sms))), block(kWarps * 32);
  const size_t shared = static_cast<size_t>(K) * sizeof(float);
  with_norm_weight_regs(K, kWarps * 32, [&](auto nw) {
    launch_pdl(gemv_normed_kernel<kNormedUnroll, decltype(nw)::value>, grid, block, shared, stream, in,
               static_cast<int>(K), packed, static_cast<int>(total_rows), gemv_preload_enabled(), embed, argmax_key);
  });
  return true;
}

void launch_gemv_bf16(const float* x, int64_t m_count, const uint16_t* w, int64_t N, int64_t K, const float* bias,
                      float* y, int num_sms, cudaStream_t stream) {
  if (m_count == 0 || N == 0) return;
  if (few_token_mma_fits(x, m_count, w, K)) {
    const GemvOutput output{w, bias, y, N};
    launch_linear_mma(x, m_count, K, &output, 1, num_sms, stream);
  } else if (gemv_fits(x, w, K)) {
    // Passes of kGemvMaxRows rows, activations kept in fp32 (rows stay 16-byte aligned: K % 8 == 0).
    for (int64_t row = 0; row < m_count; row += kGemvMaxRows) {
      GemvOutputs packed{};
      packed.out[0] = GemvOutput{w, bias, y + row * N, N};
      packed.count = 1;
      launch_gemv_kernel(x + row * K, std::min<int64_t>(kGemvMaxRows, m_count - row), K, packed, N, num_sms, stream);
    }
  } else {
    const dim3 grid(static_cast<unsigned>(ceil_div(N, kWarps))), block(kWarps * 32);
    launch_pdl(gemv_scalar_kernel, grid, block, 0, stream, x, m_count, reinterpret_cast<const bf16*>(w), N, K, bias,
               y);
  }
}

}  // namespace moex::cuda
