// The unit of MoE work shared by the host planner and the kernels: plain C++, no CUDA types, so planning
// code and its tests build without the CUDA headers.
#pragma once

#include <cstdint>

namespace moex::cuda {

// Rows [row_begin, row_begin + num_rows) of the permuted batch, all routed to the expert whose bf16 weights
// are gate/up [ffn, hidden] and down [hidden, ffn].
struct MoeGroup {
  const uint16_t* gate;
  const uint16_t* up;
  const uint16_t* down;
  int32_t row_begin;
  int32_t num_rows;
};

// One expert's bf16 weights, as the device-side planner finds them in a layer's table.
struct MoeExpertPtrs {
  const uint16_t* gate;
  const uint16_t* up;
  const uint16_t* down;
};

// Decode path (few tokens per expert): groups of at most kMoeGemvMaxRows rows.
// 32: the tensor-core instance covers 4 tiles of 8 tokens with one read of the expert's weights.
constexpr int kMoeGemvMaxRows = 32;
// Prefill path (tensor cores): tiles of at most kMoeGemmTileRows rows, or kMoeGemmSmallTileRows where the
// experts average fewer rows than a large tile (its rows past the expert's would be multiplied for nothing).
constexpr int kMoeGemmTileRows = 128;
constexpr int kMoeGemmSmallTileRows = 64;
inline int moe_gemm_tile_rows(int64_t rows, int64_t active_experts) {
  return rows >= int64_t{kMoeGemmTileRows} * active_experts ? kMoeGemmTileRows : kMoeGemmSmallTileRows;
}

}  // namespace moex::cuda
