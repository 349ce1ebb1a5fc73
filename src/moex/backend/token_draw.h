// One token's draw from a row of logits: the sampling parameters and the uniform that picks within the kept tokens.
// The host sampler (runtime/sampler.h) defines what it picks; a backend that samples on its device
// (Backend::sample_rows, Backend::pick_token) computes the same pick from the same draw, so the seeded generator
// stays on the host and a seed reproduces a run on either side.
#pragma once

#include <cstdint>

namespace moex {

struct TokenDraw {
  float temperature = 0.0f;  // 0: greedy (the argmax; no uniform used)
  float top_p = 1.0f;        // nucleus mass in (0, 1]
  int32_t top_k = 0;         // 0: no top-k cut
  double uniform = 0.0;      // in [0, 1): where the pick falls in the kept tokens' cumulative weight
};

}  // namespace moex
