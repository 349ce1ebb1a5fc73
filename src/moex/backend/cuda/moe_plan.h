// Host-side planning of one MoE layer call on the GPU: the routing (on the host) becomes a permutation of
// (token, expert) assignments sorted by expert, cut into groups for the GEMV path or tiles for the GEMM
// path. Pure logic over ids and pointers, unit-testable without a GPU.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "moex/backend/backend.h"
#include "moex/backend/cuda/kernels/moe_group.h"

namespace moex::cuda {

struct MoePlan {
  bool use_gemm = false;             // tensor-core tiles (prefill) instead of GEMV groups (decode)
  int max_rows = 0;                  // largest num_rows over groups
  int tile_rows = 0;                 // GEMM path: the tile height (moe_gemm_tile_rows), which the kernels are told
  std::vector<MoeGroup> groups;      // GEMV groups (<= kMoeGemvMaxRows rows) or GEMM tiles (<= tile_rows)
  std::vector<int32_t> row_token;    // [num_rows]: token of permuted row r
  std::vector<int32_t> slot;         // [num_tokens * top_k]: permuted row of assignment (t, j); -1 if skipped
  int64_t num_rows() const { return static_cast<int64_t>(row_token.size()); }
};

// Average rows per active expert above which the tensor-core path wins over re-reading weights per group.
constexpr int kMoeGemmMinAvgRows = 16;

// Assignments are ordered by expert id, then token, then pick: deterministic for a given routing.
// Ids < 0 are skipped (no row, slot -1). Throws (MOEX_ASSERT) if an id is out of range or names an expert whose weights are not valid.
MoePlan plan_moe(const Routing& routing, std::span<const ExpertWeights> experts, bool allow_gemm);

}  // namespace moex::cuda
