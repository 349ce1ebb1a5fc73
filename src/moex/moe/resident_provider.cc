#include "moex/moe/resident_provider.h"

#include "moex/core/error.h"

namespace moex {

ResidentExpertProvider::ResidentExpertProvider(Backend& backend,
                                               const std::vector<std::vector<ExpertWeights>>& host_experts) {
  for (size_t layer_idx = 0; layer_idx < host_experts.size(); ++layer_idx) {
    std::vector<ExpertWeights> layer;
    for (size_t expert_idx = 0; expert_idx < host_experts[layer_idx].size(); ++expert_idx) {
      const ExpertWeights& src = host_experts[layer_idx][expert_idx];
      const std::string name = fmt::format("moe.{}.expert.{}", layer_idx, expert_idx);
      layer.push_back(ExpertWeights{backend.upload_weight(src.gate, name + ".gate"),
                                    backend.upload_weight(src.up, name + ".up"),
                                    backend.upload_weight(src.down, name + ".down")});
    }
    resident_.push_back(std::move(layer));
  }
}

void ResidentExpertProvider::acquire(int32_t layer_idx, const Routing& routing, const TensorView& /*hidden_states*/,
                                     std::vector<ExpertWeights>* experts) {
  MOEX_ASSERT(layer_idx >= 0 && static_cast<size_t>(layer_idx) < resident_.size(), "MoE layer {} of {}", layer_idx,
              resident_.size());
  *experts = resident_[layer_idx];
  // Hits count distinct experts per step, as the offloading providers count them.
  std::vector<uint8_t> seen(resident_[layer_idx].size(), 0);
  for (int32_t id : routing.expert_ids)
    if (id >= 0 && !seen[id]) {
      seen[id] = 1;
      ++stats_.hits;
    }
}

std::span<const ExpertWeights> ResidentExpertProvider::resident_layer(int32_t layer_idx) const {
  MOEX_ASSERT(layer_idx >= 0 && static_cast<size_t>(layer_idx) < resident_.size(), "MoE layer {} of {}", layer_idx,
              resident_.size());
  return resident_[layer_idx];
}

}  // namespace moex
