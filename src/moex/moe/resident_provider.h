// The simplest ExpertProvider: every expert uploaded to the backend once, every request a hit.
// It is the reference the offloading providers must match output for output.
#pragma once

#include <vector>

#include "moex/moe/expert_provider.h"

namespace moex {

class ResidentExpertProvider : public ExpertProvider {
 public:
  // host_experts[moe_layer_idx][expert_idx]: host views; uploaded through backend.upload_weight.
  ResidentExpertProvider(Backend& backend, const std::vector<std::vector<ExpertWeights>>& host_experts);

  void acquire(int32_t layer_idx, const Routing& routing, const TensorView& hidden_states,
               std::vector<ExpertWeights>* experts) override;
  void release(int32_t /*layer_idx*/) override {}
  // Hits count only layers routed on the host: device-side routing (all_resident) never shows the ids.
  ExpertProviderStats stats() const override { return stats_; }
  bool all_resident() const override { return true; }
  std::span<const ExpertWeights> resident_layer(int32_t layer_idx) const override;

 private:
  std::vector<std::vector<ExpertWeights>> resident_;
  ExpertProviderStats stats_;
};

}  // namespace moex
