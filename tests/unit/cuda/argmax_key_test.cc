// The lm_head's argmax key (kernels/argmax_key.h) on the host, where CI runs it: folding a row's keys with max and
// picking from the largest gives the host sampler's argmax on rows of special values (NaN, +-0, +-inf, subnormals,
// ties) and random ones, whatever order the keys meet in.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "moex/backend/cuda/kernels/argmax_key.h"
#include "moex/runtime/sampler.h"

namespace moex::cuda_test {
namespace {

// The pick as the GPU makes it: each block folds some rows' keys, the blocks' maxima meet in another order.
int32_t key_pick(const std::vector<float>& row, std::mt19937& rng) {
  std::vector<uint32_t> order(row.size());
  for (uint32_t i = 0; i < order.size(); ++i) order[i] = i;
  std::shuffle(order.begin(), order.end(), rng);
  uint64_t best = 0;
  for (uint32_t i : order) best = std::max(best, cuda::argmax_key(row[i], i));
  return cuda::argmax_key_pick(best, row[0]);
}

TEST(CudaArgmaxKey, PicksTheSamplersArgmax) {
  const float nan = std::nanf(""), inf = std::numeric_limits<float>::infinity();
  const float tiny = std::numeric_limits<float>::denorm_min(), lowest = std::numeric_limits<float>::lowest();
  const std::vector<std::vector<float>> rows = {
      {1.f, 2.f, 3.f},
      {3.f, 2.f, 3.f},                 // a tie: the first index
      {-0.f, 0.f, -1.f},               // -0 and +0 tie: the first
      {-1.f, 0.f, -0.f},
      {nan, 5.f, 1.f},                 // NaN first: it wins
      {1.f, nan, 5.f},                 // NaN never wins otherwise
      {nan, nan, nan},
      {-inf, -inf},                    // every logit -inf: the first
      {lowest, -inf, lowest},
      {-tiny, tiny, 0.f},
      {-tiny, -0.f, -tiny},
      {inf, 1e30f, inf},
      {-5.f, -4.f, -4.f, nan, -4.5f},
      {0.f},
  };
  std::mt19937 rng(11);
  for (size_t r = 0; r < rows.size(); ++r)
    for (int order = 0; order < 4; ++order)
      EXPECT_EQ(key_pick(rows[r], rng), argmax(rows[r])) << "row " << r << " order " << order;
  // Random rows at a real vocabulary, some with planted ties and NaNs.
  std::normal_distribution<float> normal(0.f, 3.f);
  for (int r = 0; r < 40; ++r) {
    std::vector<float> row(32000);
    for (float& v : row) v = normal(rng);
    std::uniform_int_distribution<size_t> col(0, row.size() - 1);
    if (r % 4 == 1) row[col(rng)] = row[col(rng)] = 40.f;
    if (r % 4 == 2) row[col(rng)] = nan;
    if (r % 4 == 3) std::fill(row.begin(), row.end(), -2.5f);
    EXPECT_EQ(key_pick(row, rng), argmax(row)) << "random row " << r;
  }
}

// Keys order as the floats do, then by lower index: checked pairwise over special and random values.
TEST(CudaArgmaxKey, KeysOrderAsValuesThenLowerIndex) {
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<float> values = {-inf, std::numeric_limits<float>::lowest(), -1e10f, -1.f, -1e-30f,
                               -std::numeric_limits<float>::denorm_min(), -0.f, 0.f,
                               std::numeric_limits<float>::denorm_min(), 1e-30f, 1.f, 1e10f,
                               std::numeric_limits<float>::max(), inf};
  std::mt19937 rng(3);
  std::normal_distribution<float> normal(0.f, 100.f);
  for (int i = 0; i < 50; ++i) values.push_back(normal(rng));
  for (float a : values)
    for (float b : values)
      for (uint32_t ia : {0u, 7u, 31999u})
        for (uint32_t ib : {0u, 7u, 31999u}) {
          const bool a_first = a > b || (a == b && ia < ib);
          const bool same = a == b && ia == ib;
          const uint64_t ka = cuda::argmax_key(a, ia), kb = cuda::argmax_key(b, ib);
          EXPECT_GT(ka, 0u);
          if (same) EXPECT_EQ(ka, kb);
          else EXPECT_EQ(ka > kb, a_first) << a << "@" << ia << " against " << b << "@" << ib;
        }
  EXPECT_EQ(cuda::argmax_key(std::nanf(""), 3), 0u);
}

}  // namespace
}  // namespace moex::cuda_test
