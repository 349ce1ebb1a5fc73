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

struct GemmParams {
  const bf16* a;          // [rows, K]
  const MoeGroup* tiles;  // null: dense, one B for all rows
  const bf16* dense_b;
  const float* bias;
  int64_t rows;  // dense only
  int K, N;
  bool use_down;  // grouped: B = tile.down (stage 2) instead of tile.gate/up
  float* out_f32;
  bf16* out_bf16;  // set: the SwiGLU instance (gate/up), out = silu(gate) * up as bf16
  const int32_t* device_tiles;  // grouped, planned on the device: tiles at or past *device_tiles exit at once
};

// A block's rows [row_begin, row_end) of A and its weights (b1: the SwiGLU instance's up rows, else null): tile
// `tile` of p.tiles (grouped) or row tile `tile` of tile_rows rows (dense). False where the plan was made on the
// device and has fewer tiles than the grid: the block exits.
struct GemmTile {
  int row_begin, row_end;
  const bf16* b0;
  const bf16* b1;
};
template <bool kSwiGLU>
__device__ __forceinline__ bool gemm_tile(const GemmParams& p, int tile, int tile_rows, GemmTile* out) {
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
    out->b0 = p.dense_b;
    out->b1 = nullptr;
  }
  return true;
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
