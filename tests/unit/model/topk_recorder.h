// A RouterObserver that keeps every token's top-k expert ids per MoE layer, in the order the router chose
// them: what the fixture tests compare with reference.json's topk_ids (CPU and CUDA alike).
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "moex/model/decoder.h"

namespace moex::test {

class TopkRecorder : public RouterObserver {
 public:
  void on_router(int32_t moe_layer_idx, int64_t, std::span<const float>, const Routing& routing) override {
    if (topk.size() <= static_cast<size_t>(moe_layer_idx)) topk.resize(moe_layer_idx + 1);
    for (int64_t token = 0; token < routing.num_tokens; ++token)
      topk[moe_layer_idx].emplace_back(routing.expert_ids.begin() + token * routing.top_k,
                                       routing.expert_ids.begin() + (token + 1) * routing.top_k);
  }
  std::vector<std::vector<std::vector<int32_t>>> topk;  // [moe layer][token][pick]
};

}  // namespace moex::test
