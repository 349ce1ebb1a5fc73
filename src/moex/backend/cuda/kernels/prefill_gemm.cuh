// What the two prefill GEMM kernels share (moe_gemm.cu's mma.sync kernel, gemm_wgmma.cu's wgmma kernel): their
// operands, a block's tile of them, the cp.async copies that fill their stages; and the wgmma kernel's launcher.
// CUDA-only header.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "moex/backend/cuda/cuda_resources.h"
#include "moex/backend/cuda/kernels/common.cuh"
#include "moex/backend/cuda/kernels/gemm_path.h"
#include "moex/backend/cuda/kernels/moe_group.h"

namespace moex::cuda {

// One output of a dense GEMM: out fp32 [rows, N] = A @ b^T (+ bias). Several outputs of the same A (q/k/v) share
// one grid side by side along its column blocks, output i from column block first_block on.
struct DenseGemmOut {
  const bf16* b;
  const float* bias;
  float* out;
  int N;
  int first_block;  // set by gemm_col_blocks for the kernel's column width
};
constexpr int kDenseGemmMaxOutputs = 3;

struct GemmParams {
  const bf16* a;          // [rows, K]
  // Grouped: row r of the plan reads A's row a_rows[r] (the plan's row_token: the token's row of the activations,
  // gathered by the kernel's own copies); null: row r.
  const int32_t* a_rows;
  const MoeGroup* tiles;  // null: dense, the outputs below for all rows
  DenseGemmOut dense[kDenseGemmMaxOutputs];
  int dense_count;
  int64_t rows;  // dense only
  int K, N;      // N: grouped only (dense: each output's)
  bool use_down;  // grouped: B = tile.down (stage 2) instead of tile.gate/up
  float* out_f32;  // grouped
  bf16* out_bf16;  // set: the SwiGLU instance (gate/up), out = silu(gate) * up as bf16
  const int32_t* device_tiles;  // grouped, planned on the device: tiles at or past *device_tiles exit at once
  // Dense, one output, mma.sync only: K split into chunks of k_chunk (a multiple of 64) over blockIdx.z, each
  // chunk's sums to split_out [z][rows][N] without bias (launch_dense_gemm adds them up). 0: K whole.
  int k_chunk;
  float* split_out;
};

// The grid's column blocks of `cols` output columns: grouped, p.N's; dense, every output's, output i's from
// p.dense[i].first_block on (set here). Every output but the last is a multiple of cols wide (launch_dense_gemm
// keeps to that), so no block straddles two.
inline unsigned gemm_col_blocks(GemmParams& p, int cols) {
  if (p.tiles) return static_cast<unsigned>(ceil_div(p.N, cols));
  int64_t blocks = 0;
  for (int i = 0; i < p.dense_count; ++i) {
    p.dense[i].first_block = static_cast<int>(blocks);
    blocks += ceil_div(p.dense[i].N, cols);
  }
  return static_cast<unsigned>(blocks);
}

// A block's output columns: [n0, n0 + kCols) of an output N wide (row stride N) with its bias (or null), and,
// dense, the weights b of that output; column block col_block of the grid.
struct GemmCols {
  const bf16* b;
  const float* bias;
  float* out;
  int N, n0;
};
template <int kCols>
__device__ __forceinline__ GemmCols gemm_cols(const GemmParams& p, int col_block) {
  if (p.tiles) return GemmCols{nullptr, nullptr, p.out_f32, p.N, col_block * kCols};
  // Constant indices only: a dynamic index into the parameter struct copies it to local memory.
  DenseGemmOut o = p.dense[0];
#pragma unroll
  for (int i = 1; i < kDenseGemmMaxOutputs; ++i)
    if (i < p.dense_count && col_block >= p.dense[i].first_block) o = p.dense[i];
  return GemmCols{o.b, o.bias, o.out, o.N, (col_block - o.first_block) * kCols};
}

// A block's rows [row_begin, row_end) of A and its weights (b1: the SwiGLU instance's up rows, else null): tile
// `tile` of p.tiles (grouped) or row tile `tile` of tile_rows rows (dense, the weights of the block's output:
// cols.b). False where the plan was made on the device and has fewer tiles than the grid: the block exits.
struct GemmTile {
  int row_begin, row_end;
  const bf16* b0;
  const bf16* b1;
};
template <bool kSwiGLU>
__device__ __forceinline__ bool gemm_tile(const GemmParams& p, int tile, int tile_rows, const GemmCols& cols,
                                          GemmTile* out) {
  if (p.tiles) {
    if (p.device_tiles && tile >= *p.device_tiles) return false;
    const MoeGroup t = p.tiles[tile];
    out->row_begin = t.row_begin;
    out->row_end = t.row_begin + t.num_rows;
    out->b0 = reinterpret_cast<const bf16*>(p.use_down ? t.down : t.gate);
    out->b1 = kSwiGLU ? reinterpret_cast<const bf16*>(t.up) : nullptr;
  } else {
    out->row_begin = tile * tile_rows;
    out->row_end = static_cast<int>(out->row_begin + tile_rows < p.rows ? out->row_begin + tile_rows : p.rows);
    out->b0 = cols.b;
    out->b1 = nullptr;
  }
  return true;
}

// Whether two adjacent results (an even column, then the next) can go out as one aligned pair: an even row stride N
// and an output whose start is aligned to the pair (4 bytes for bf16, 8 for float); block-uniform.
template <typename T>
__device__ __forceinline__ bool pair_stores_aligned(const T* out, int N) {
  return N % 2 == 0 && (reinterpret_cast<uintptr_t>(out) & (2 * sizeof(T) - 1)) == 0;
}

// v[0], v[1] to dst[0], dst[1], the columns col and col + 1 of a row N wide (only those < N): one store of the pair
// where `pair` (pair_stores_aligned) allows it and both columns exist, else one value a store. The values are
// rounded alike either way (bf16: round to nearest).
__device__ __forceinline__ void store_pair(bf16* dst, const float (&v)[2], int col, int N, bool pair) {
  if (pair && col + 1 < N) {
    *reinterpret_cast<__nv_bfloat162*>(dst) = __floats2bfloat162_rn(v[0], v[1]);
    return;
  }
#pragma unroll
  for (int c = 0; c < 2; ++c)
    if (col + c < N) dst[c] = __float2bfloat16_rn(v[c]);
}
__device__ __forceinline__ void store_pair(float* dst, const float (&v)[2], int col, int N, bool pair) {
  if (pair && col + 1 < N) {
    *reinterpret_cast<float2*>(dst) = make_float2(v[0], v[1]);
    return;
  }
#pragma unroll
  for (int c = 0; c < 2; ++c)
    if (col + c < N) dst[c] = v[c];
}

// 16 bytes global -> shared (a shared-space address); invalid: zero-filled, nothing read.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  cp_async_16(static_cast<uint32_t>(__cvta_generic_to_shared(dst)), src, valid);
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
// Until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N));
}

// The GEMM over row_tiles tiles of tile_rows rows (128 or 64, where gemm_wgmma_available(tile_rows); grouped:
// p.tiles[0, row_tiles); dense: p.rows). K % 8 == 0, A and B 16-byte aligned.
void launch_gemm_wgmma(const GemmParams& p, int tile_rows, unsigned row_tiles, cudaStream_t stream);

}  // namespace moex::cuda
