// argmax (greedy decoding) against the one-pass reference on random logits with ties, NaNs and every length
// from 0 to 70 (the vector loop's tails).
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "moex/runtime/sampler.h"

namespace moex {
namespace {

int32_t reference_argmax(const std::vector<float>& logits) {
  int32_t best = 0;
  for (size_t idx = 1; idx < logits.size(); ++idx)
    if (logits[idx] > logits[best]) best = static_cast<int32_t>(idx);
  return best;
}

TEST(Argmax, MatchesOnePassReference) {
  std::mt19937 rng(5);
  for (size_t size : {0, 1, 2, 15, 16, 17, 31, 33, 70, 32000}) {
    for (int trial = 0; trial < 50; ++trial) {
      std::vector<float> logits(size);
      // Coarse values: many ties, so the lowest index among equal maxima must win.
      for (auto& v : logits) v = static_cast<float>(static_cast<int>(rng() % 9) - 4);
      if (size > 0 && trial % 5 == 1) logits[rng() % size] = std::nanf("");
      if (size > 0 && trial % 5 == 2) logits[0] = std::nanf("");
      if (size > 0 && trial % 5 == 3) logits[size - 1] = 100.0f;
      if (size == 0) {
        EXPECT_EQ(argmax(logits), 0);
        continue;
      }
      EXPECT_EQ(argmax(logits), reference_argmax(logits)) << "size " << size << " trial " << trial;
    }
  }
}

}  // namespace
}  // namespace moex
