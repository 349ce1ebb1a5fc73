// The few-token tensor-core kernels' row-split shape (batched decode, 2-32 tokens against weights read once):
// a block's 8 warps each own 16 rows of a 128-row tile and all cover the same range of K, whose activations the
// block stages once in shared memory, split into bf16 hi + lo and laid out as the mma's B fragments. K may be
// split over the blocks of a thread block cluster, which add their parts through distributed shared memory in
// rank order (no atomics: the same bits every run). CUDA-only header.
//
// Why: in mma_core.cuh's shape a block owns 16 rows and its warps split K, so every block reads all of its
// tokens' activations for 16 rows of weights: at 32 tokens 4 bytes of fp32 activations per weight byte, read
// through L2, and each warp holds its activations in registers next to the weights (128-166 registers, one
// block per SM, too few weight bytes in flight: the 32-token linear kernels at 39-48% of HBM). Here 128 rows
// share one staging of the activations (a quarter byte per weight byte at 32 tokens), each warp reads its B
// fragments from shared memory just before the mma, and its registers go to weight loads in flight.
// Measured (H200, bench/RESULTS.md "Batched decode: row-split tensor-core kernels"): it wins from 17 tokens on
// wherever the unsplit tiles fill the SMs (the lm_heads) and for the MoE experts, whose groups are then whole
// experts; small matrices split over clusters stay slower than the 16-row kernel (each block's few rounds of
// loads, its staging and the cluster's reduction are latency), so gemv.cu takes it only for the former.
#pragma once

#include <cooperative_groups.h>

#include <algorithm>
#include <type_traits>

#include "moex/backend/cuda/kernels/gemv.cuh"
#include "moex/backend/cuda/kernels/launch.cuh"
#include "moex/backend/cuda/kernels/mma_core.cuh"

namespace moex::cuda {

constexpr int kRowsWarps = 8;
constexpr int kRowsTile = kRowsWarps * kMmaRows;  // weight rows a block owns (per weight of NR)
// k blocks per round (the next round loads during this one): 4 for one weight, 2 for gate + up (the same bytes).
template <int NR>
constexpr int kRowsUnroll = NR == 1 ? 4 : 2;
constexpr int kRowsChunkAlign = 4;  // chunks hold a multiple of every round's k blocks
constexpr int kRowsMaxSplits = 8;   // blocks of a cluster along K (the portable cluster size)
constexpr int kRowsMaxTokens = 4 * kMmaTileTokens;  // NT <= 4
// Two blocks an SM at least (<= 128 registers a thread): one block's weight loads in flight are too few for HBM.
constexpr int kRowsBlocksPerSm = 2;
// Staging items (k block, token, lane group) a thread loads before it converts and stores any of them. One at a time,
// each thread waited out an L2 round trip per 32 bytes (8-16 in a row per chunk at 32 tokens) while the block's
// weight stream had one round in flight; MOEX_CUDA_ROWS_STAGE_LOADS=1 keeps that loop (A/B). H200, same call: 32
// sequences 1.03x on Model A and 12-layer Model B, 24 sequences 1.02x; the lm_heads at 32 tokens 52 / 253 us against
// 56 / 272. 8 loads spill at the 128 registers that kRowsBlocksPerSm allows.
constexpr int kRowsStageLoads = 4;
// Shared memory of a block: the staged activations (a chunk of k blocks at a time) and, reusing it, the split
// parts of the cluster's reduction. 64 KB: 16 k blocks of 32 tokens, the whole of a 2048-wide row at <= 8.
constexpr int kRowsStageBytes = 64 * 1024;
// One k block (32 k) of one token, staged: 8 slots of 16 bytes, hi and lo of k 8t..8t+7 in slots 2t and 2t + 1,
// swapped on odd tokens, so that the 8 lanes of a quarter warp (tokens g, g + 1; t = 0..3) hit 32 distinct banks.
constexpr int kRowsCellBytes = 128;

// The staging stride (tokens per k block, a multiple of 8) and the k blocks one chunk holds, a multiple of
// kRowsChunkAlign so that no round of loads straddles two chunks.
__device__ __forceinline__ int rows_chunk_kb(int stride_tokens, int smem_bytes) {
  const int kb = smem_bytes / (stride_tokens * kRowsCellBytes);
  return kb - kb % kRowsChunkAlign;
}

// A staging item i: lane group t (8 k of a k block) of token `token` in k block kb, t fastest (4 threads read
// 128 B of a row), then tokens (stride of them a k block), then k blocks.
struct StageItem {
  int t, token, kb;
  __device__ __forceinline__ StageItem(int i, int stride) : t(i & 3), token((i >> 2) % stride), kb((i >> 2) / stride) {}
};

// Stores an item's bf16 hi and lo parts into its cell of the staging area (kRowsCellBytes: the slots swapped on odd
// tokens).
__device__ __forceinline__ void store_staged(uint4* xs, int stride, const StageItem& it, const uint32_t (&hi)[4],
                                             const uint32_t (&lo)[4]) {
  uint4* cell = xs + (it.kb * stride + it.token) * 8 + 2 * it.t;
  cell[it.token & 1] = make_uint4(hi[0], hi[1], hi[2], hi[3]);
  cell[(it.token & 1) ^ 1] = make_uint4(lo[0], lo[1], lo[2], lo[3]);
}

// stage_token_rows's work with kRowsStageLoads items' loads in flight a thread; rows[i]: token i's fp32 row.
__device__ __forceinline__ void stage_token_rows_batched(uint4* xs, const float* const* rows, int tokens, int stride,
                                                         int kb0, int n_kb) {
  const int items = n_kb * stride * 4;
  for (int i0 = threadIdx.x; i0 < items; i0 += kRowsStageLoads * blockDim.x) {
    float4 v[kRowsStageLoads][2];
#pragma unroll
    for (int b = 0; b < kRowsStageLoads; ++b) {
      const int i = i0 + b * static_cast<int>(blockDim.x);
      const StageItem it(i, stride);
      v[b][0] = v[b][1] = make_float4(0.f, 0.f, 0.f, 0.f);
      if (i < items && it.token < tokens) {
        const float4* p =
            reinterpret_cast<const float4*>(rows[it.token] + int64_t(kb0 + it.kb) * kMmaKBlock + 8 * it.t);
        v[b][0] = __ldcg(p);
        v[b][1] = __ldcg(p + 1);
      }
    }
#pragma unroll
    for (int b = 0; b < kRowsStageLoads; ++b) {
      const int i = i0 + b * static_cast<int>(blockDim.x);
      if (i >= items) break;
      uint32_t hi[4], lo[4];
      split_bf16x8(v[b][0], v[b][1], hi, lo);
      store_staged(xs, stride, StageItem(i, stride), hi, lo);
    }
  }
}

// Stages k blocks [kb0, kb0 + n_kb) of the first `tokens` rows (row_of(i): token i's fp32 row, 16-byte aligned)
// into xs, tokens [tokens, stride) as zeros. Reads through L2 (ld.global.cg): under programmatic dependent launch
// an older launch of a kernel may still hold this launch's input rows in its SM's L1 from before they were
// rewritten (docs/cuda.md, "Programmatic dependent launch").
template <typename RowOf>
__device__ __forceinline__ void stage_token_rows(uint4* xs, RowOf row_of, int tokens, int stride, int kb0, int n_kb) {
  const int items = n_kb * stride * 4;  // StageItem's order
  for (int i = threadIdx.x; i < items; i += blockDim.x) {
    const StageItem it(i, stride);
    uint32_t hi[4] = {0, 0, 0, 0}, lo[4] = {0, 0, 0, 0};
    if (it.token < tokens) {
      const float4* p =
          reinterpret_cast<const float4*>(row_of(it.token) + int64_t(kb0 + it.kb) * kMmaKBlock + 8 * it.t);
      split_bf16x8(__ldcg(p), __ldcg(p + 1), hi, lo);
    }
    store_staged(xs, stride, it, hi, lo);
  }
}

// A warp's weight rows: lane (g, t) reads rows row0 + g and row0 + g + 8 of each of the NR weights (clamped to
// the last row; the caller discards those outputs), 16 bytes at k = 32 kb + 8t.
template <int NR>
struct RowsLaneWeights {
  const bf16* a[NR];
  const bf16* b[NR];
  __device__ __forceinline__ RowsLaneWeights(const bf16* const (&w)[NR], int row0, int n_rows, int64_t K, int lane) {
    const int64_t ra = min(row0 + (lane >> 2), n_rows - 1), rb = min(row0 + (lane >> 2) + 8, n_rows - 1);
#pragma unroll
    for (int r = 0; r < NR; ++r) {
      a[r] = w[r] + ra * K + 8 * (lane & 3);
      b[r] = w[r] + rb * K + 8 * (lane & 3);
    }
  }
};

// One round of weight loads: k blocks [kb, kb + kRowsUnroll) below kb_end.
template <int NR>
struct RowsRound {
  static constexpr int kU = kRowsUnroll<NR>;
  uint4 a[kU][NR], b[kU][NR];
  __device__ __forceinline__ void load(const RowsLaneWeights<NR>& w, int kb, int kb_end) {
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const bool ok = kb + u < kb_end;
#pragma unroll
      for (int r = 0; r < NR; ++r) {
        a[u][r] = ok ? load_stream_16b(w.a[r] + int64_t(kb + u) * kMmaKBlock) : uint4{};
        b[u][r] = ok ? load_stream_16b(w.b[r] + int64_t(kb + u) * kMmaKBlock) : uint4{};
      }
    }
  }
};

// acc += the round's weights (k blocks kb.., staged at local k block kb_local..) times the staged tokens of
// n-tiles [0, active_nt).
template <int NR, int NT>
__device__ __forceinline__ void rows_round_mma(const RowsRound<NR>& w, const uint4* xs, int stride, int kb_local,
                                               int n_kb, int active_nt, int lane, float (&acc)[NR][NT][4]) {
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int u = 0; u < RowsRound<NR>::kU; ++u) {
    if (u >= n_kb) break;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      if (nt >= active_nt) break;
      const uint4* cell = xs + ((kb_local + u) * stride + nt * kMmaTileTokens + g) * 8 + 2 * t;
      const uint4 hi = cell[g & 1], lo = cell[(g & 1) ^ 1];
#pragma unroll
      for (int r = 0; r < NR; ++r) {
        const uint4& a = w.a[u][r];
        const uint4& b = w.b[u][r];
        mma_bf16_16816(acc[r][nt], a.x, b.x, a.y, b.y, hi.x, hi.y);
        mma_bf16_16816(acc[r][nt], a.x, b.x, a.y, b.y, lo.x, lo.y);
        mma_bf16_16816(acc[r][nt], a.z, b.z, a.w, b.w, hi.z, hi.w);
        mma_bf16_16816(acc[r][nt], a.z, b.z, a.w, b.w, lo.z, lo.w);
      }
    }
  }
}

// The block's k blocks [kb_begin, kb_end) for its first `tokens` token rows: stages them chunk by chunk into xs
// (smem_bytes of dynamic shared memory) and accumulates each warp's 16 rows into acc. `first` holds the round at
// kb_begin, loaded by the caller (before its PDL wait where the weights are known then); each round's loads are
// issued before the round before it is multiplied. Every thread of the block must call this (it synchronises);
// warps with active == false (rows past the output) only stage. stage_loads: 1 stages an item at a time (A/B),
// else kRowsStageLoads at a time from the row pointers, looked up once.
template <int NR, int NT, typename RowOf>
__device__ __forceinline__ void block_rows_mma(const RowsLaneWeights<NR>& w, RowsRound<NR> first, RowOf row_of,
                                               int tokens, int kb_begin, int kb_end, uint4* xs, int smem_bytes,
                                               int stage_loads, bool active, float (&acc)[NR][NT][4]) {
  static_assert(NT * kMmaTileTokens <= kRowsMaxTokens, "a block's tokens (<= NT tiles of 8) have row pointers");
  __shared__ const float* rows[kRowsMaxTokens];
  const int lane = threadIdx.x & 31;
  const int active_nt = (tokens + kMmaTileTokens - 1) / kMmaTileTokens;
  const int stride = active_nt * kMmaTileTokens;
  const int chunk_kb = rows_chunk_kb(stride, smem_bytes);
  if (stage_loads != 1 && static_cast<int>(threadIdx.x) < min(tokens, kRowsMaxTokens))
    rows[threadIdx.x] = row_of(static_cast<int>(threadIdx.x));
  RowsRound<NR> cur = first;
  for (int chunk = kb_begin; chunk < kb_end; chunk += chunk_kb) {
    const int n_chunk = min(chunk_kb, kb_end - chunk);
    __syncthreads();  // every warp is done with the chunk before (and, first, the row pointers are there)
    if (stage_loads == 1)
      stage_token_rows(xs, row_of, tokens, stride, chunk, n_chunk);
    else
      stage_token_rows_batched(xs, rows, tokens, stride, chunk, n_chunk);
    __syncthreads();
    for (int kb = chunk; kb < chunk + n_chunk; kb += RowsRound<NR>::kU) {
      RowsRound<NR> next;
      if (active && kb + RowsRound<NR>::kU < kb_end) next.load(w, kb + RowsRound<NR>::kU, kb_end);
      if (active) rows_round_mma<NR, NT>(cur, xs, stride, kb - chunk, kb_end - kb, active_nt, lane, acc);
      cur = next;
    }
  }
}

// Shared memory the reduction needs (it reuses the staging area): every warp's accumulators.
constexpr int rows_reduce_bytes(int nr, int nt) { return kRowsWarps * nr * nt * 4 * 32 * 4; }

// Hands every (row, token) of the block's tile with its sums to out(row, token, sum), sum(r) the value for weight
// r: at splits == 1 straight from the registers; else the cluster's `splits` blocks (ranks along K) put their
// accumulators in shared memory and block q adds warps [8q / splits, 8(q + 1) / splits) of every rank, in rank
// order. row0: the block's first row; rows >= n_rows and tokens >= tokens are left out.
template <int NR, int NT, typename Out>
__device__ __forceinline__ void rows_mma_finish(const float (&acc)[NR][NT][4], float* red, int splits, int row0,
                                                int n_rows, int tokens, Out out) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int active_nt = (tokens + kMmaTileTokens - 1) / kMmaTileTokens;
  if (splits == 1) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      if (nt >= active_nt) break;
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        int row, token;
        mma_coords(lane, nt, c, &row, &token);
        row += row0 + warp * kMmaRows;
        if (row < n_rows && token < tokens) out(row, token, [&](int r) { return acc[r][nt][c]; });
      }
    }
    return;
  }
  constexpr int kPerWarp = NR * NT * 4 * 32;
  __syncthreads();  // the staging area is free
#pragma unroll
  for (int r = 0; r < NR; ++r)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int c = 0; c < 4; ++c) red[warp * kPerWarp + ((r * NT + nt) * 4 + c) * 32 + lane] = acc[r][nt][c];
  cooperative_groups::cluster_group cluster = cooperative_groups::this_cluster();
  cluster.sync();
  const int rank = static_cast<int>(cluster.block_rank());
  const int w_begin = kRowsWarps * rank / splits, w_end = kRowsWarps * (rank + 1) / splits;
  for (int v = threadIdx.x; v < (w_end - w_begin) * NT * 4 * 32; v += blockDim.x) {
    const int l = v & 31, c = (v >> 5) & 3, nt = (v >> 7) % NT, w = w_begin + (v >> 7) / NT;
    if (nt >= active_nt) continue;
    int row, token;
    mma_coords(l, nt, c, &row, &token);
    row += row0 + w * kMmaRows;
    if (row >= n_rows || token >= tokens) continue;
    out(row, token, [&](int r) {
      const int at = w * kPerWarp + ((r * NT + nt) * 4 + c) * 32 + l;
      float sum = 0.f;
      for (int q = 0; q < splits; ++q) sum += cluster.map_shared_rank(red, q)[at];
      return sum;
    });
  }
  cluster.sync();  // the other ranks are done reading this block's shared memory
}

// K blocks [begin, end) of split s of `splits` over kb_count k blocks.
__device__ __forceinline__ void rows_split_range(int kb_count, int splits, int s, int* begin, int* end) {
  *begin = kb_count * s / splits;
  *end = kb_count * (s + 1) / splits;
}

// ---- host side ----

// Blocks along K: enough for `blocks` tiles to give every SM four blocks (two waves at two a SM: a grid of a wave
// and a bit ran its last blocks alone), each split keeping two rounds of loads.
// MOEX_CUDA_ROWS_BLOCKS_PER_SM sets that target (A/B).
inline int rows_mma_splits(int64_t blocks, int kb_count, int num_sms) {
  static const int per_sm = env_int("MOEX_CUDA_ROWS_BLOCKS_PER_SM", 4);
  static const int max_splits = std::clamp(env_int("MOEX_CUDA_ROWS_MAX_SPLITS", kRowsMaxSplits), 1, kRowsMaxSplits);
  int splits = 1;
  while (splits < max_splits && blocks * splits < per_sm * int64_t(num_sms) &&
         kb_count / (splits + 1) >= 2 * kRowsChunkAlign)
    ++splits;
  return splits;
}

// The kernels' stage_loads argument (block_rows_mma); read at every launch so that tests can switch it.
inline int rows_stage_loads() {
  return env_int("MOEX_CUDA_ROWS_STAGE_LOADS", kRowsStageLoads) == 1 ? 1 : kRowsStageLoads;
}

// Calls f(std::integral_constant<int, NT>) with the kernels' instance for groups of up to `rows` tokens (2-32): the
// fewest n-tiles of 8 that hold them.
template <typename F>
void with_rows_nt(int64_t rows, F&& f) {
  if (rows <= 8)
    f(std::integral_constant<int, 1>{});
  else if (rows <= 16)
    f(std::integral_constant<int, 2>{});
  else if (rows <= 24)
    f(std::integral_constant<int, 3>{});
  else
    f(std::integral_constant<int, 4>{});
}

// Dynamic shared memory of a block: its k blocks for nt n-tiles of tokens (at most kRowsStageBytes, staged in
// chunks beyond), and the reduction's accumulators where K is split.
inline int rows_mma_smem_bytes(int kb_count, int splits, int nt, int nr) {
  const int cell = nt * kMmaTileTokens * kRowsCellBytes;
  int kb = (kb_count + splits - 1) / splits;
  kb += (kRowsChunkAlign - kb % kRowsChunkAlign) % kRowsChunkAlign;
  int bytes = std::min(kRowsStageBytes, kb * cell);
  if (splits > 1) bytes = std::max(bytes, rows_reduce_bytes(nr, nt));
  return bytes;
}

// Launches kKernel on grid (x = tiles * splits) with a cluster of `splits` blocks along x where splits > 1.
template <auto kKernel, typename... Args>
void launch_rows_mma(dim3 grid, int splits, int smem_bytes, cudaStream_t stream, Args... args) {
  static const bool big_smem = [] {
    const bool ok =
        cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kRowsStageBytes) == cudaSuccess;
    if (!ok) (void)cudaGetLastError();
    return ok;
  }();
  (void)big_smem;
  const PdlLaunchConfig launch(grid, dim3(kRowsWarps * 32), static_cast<size_t>(smem_bytes), stream,
                               splits > 1 ? dim3(splits, 1, 1) : dim3(0, 0, 0));
  launch_config(launch, kKernel, args...);
}

}  // namespace moex::cuda
