#include "moex/backend/cuda/moe_plan.h"

#include <algorithm>

namespace moex::cuda {

MoePlan plan_moe(const Routing& routing, std::span<const ExpertWeights> experts, bool allow_gemm) {
  const int64_t num_experts = static_cast<int64_t>(experts.size());
  const int64_t total = routing.num_tokens * routing.top_k;
  MOEX_ASSERT(static_cast<int64_t>(routing.expert_ids.size()) == total, "routing has {} ids for {} x {}",
              routing.expert_ids.size(), routing.num_tokens, routing.top_k);
  std::vector<int64_t> offsets(static_cast<size_t>(num_experts) + 1, 0);
  for (int32_t id : routing.expert_ids) {
    if (id < 0) continue;  // skipped this wave (offloading runs a layer's experts in waves)
    MOEX_ASSERT(id < num_experts, "routing: expert id {} outside [0, {})", id, num_experts);
    MOEX_ASSERT(experts[id].valid(), "moe_experts: expert {} routed to but its weights are not resident", id);
    ++offsets[id + 1];
  }
  int64_t active = 0;
  for (int64_t e = 0; e < num_experts; ++e) {
    active += offsets[e + 1] > 0;
    offsets[e + 1] += offsets[e];
  }
  const int64_t num_rows = offsets[num_experts];
  MoePlan plan;
  plan.row_token.resize(static_cast<size_t>(num_rows));
  plan.slot.resize(static_cast<size_t>(total));
  std::vector<int64_t> cursor(offsets.begin(), offsets.end() - 1);
  for (int64_t a = 0; a < total; ++a) {
    if (routing.expert_ids[a] < 0) {
      plan.slot[a] = -1;
      continue;
    }
    int64_t row = cursor[routing.expert_ids[a]]++;
    plan.row_token[row] = static_cast<int32_t>(a / routing.top_k);
    plan.slot[a] = static_cast<int32_t>(row);
  }
  plan.use_gemm = allow_gemm && active > 0 && num_rows / active > kMoeGemmMinAvgRows;
  if (plan.use_gemm) plan.tile_rows = moe_gemm_tile_rows(num_rows, active);
  const int64_t chunk = plan.use_gemm ? plan.tile_rows : kMoeGemvMaxRows;
  for (int64_t e = 0; e < num_experts; ++e) {
    for (int64_t begin = offsets[e]; begin < offsets[e + 1]; begin += chunk) {
      int64_t rows = std::min(chunk, offsets[e + 1] - begin);
      const ExpertWeights& w = experts[e];
      plan.groups.push_back(MoeGroup{static_cast<const uint16_t*>(w.gate.data), static_cast<const uint16_t*>(w.up.data),
                                     static_cast<const uint16_t*>(w.down.data), static_cast<int32_t>(begin),
                                     static_cast<int32_t>(rows)});
      plan.max_rows = std::max(plan.max_rows, static_cast<int>(rows));
    }
  }
  return plan;
}

}  // namespace moex::cuda
