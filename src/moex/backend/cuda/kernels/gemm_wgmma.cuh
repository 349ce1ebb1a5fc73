// The prefill GEMMs' operands (moe_gemm.cu's mma.sync kernel and gemm_wgmma.cu's wgmma kernel take the same)
// and the wgmma kernel's launcher. CUDA-only header.
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

// The GEMM over row_tiles tiles of tile_rows rows (128 or 64, where gemm_wgmma_available(tile_rows); grouped:
// p.tiles[0, row_tiles); dense: p.rows). K % 8 == 0, A and B 16-byte aligned.
void launch_gemm_wgmma(const GemmParams& p, int tile_rows, unsigned row_tiles, cudaStream_t stream);

}  // namespace moex::cuda
