// Greedy picks on the device (Backend::argmax_rows) against the host sampler's argmax on random rows with
// planted ties, NaNs and a NaN first element, at a fixture vocabulary and Model A's / Model B's.
#include <gtest/gtest.h>

#include <cmath>

#include "cuda_test_util.h"
#include "moex/runtime/sampler.h"

namespace moex::cuda_test {
namespace {

TEST(CudaArgmaxRows, MatchesTheHostSampler) {
  MOEX_CUDA_BACKEND_OR_SKIP(backend);
  for (int64_t cols : {7, 1000, 32000, 151936}) {
    for (int64_t rows : {1, 3, 32}) {
      SCOPED_TRACE(testing::Message() << "rows " << rows << " cols " << cols);
      std::mt19937 rng(static_cast<uint32_t>(rows * 17 + cols));
      auto logits = random_floats(rng, static_cast<size_t>(rows * cols), 3.f);
      std::uniform_int_distribution<int64_t> col(0, cols - 1);
      for (int64_t r = 0; r < rows; ++r) {
        float* row = logits.data() + r * cols;
        if (r % 3 == 1) {  // a tie for the maximum: the lower index must win
          const int64_t a = col(rng), b = col(rng);
          row[a] = row[b] = 50.f;
        }
        if (r % 3 == 2) row[col(rng)] = std::nanf("");  // NaN never wins
        if (r == 2 && rows > 2) row[0] = std::nanf("");  // ... except as element 0, which then wins
      }
      GuardedTensor ld(*backend, {rows, cols});
      ld.fill(logits);
      std::vector<int32_t> ids(static_cast<size_t>(rows), -7);
      ASSERT_TRUE(backend->argmax_rows(ld.view(), ids));
      for (int64_t r = 0; r < rows; ++r)
        EXPECT_EQ(ids[r], argmax(std::span<const float>(logits).subspan(r * cols, cols))) << "row " << r;
    }
  }
}

// Chained greedy steps' picks (Backend::pick_greedy): the last row's argmax, read back in the order picked, with
// the ring of pending picks full.
TEST(CudaArgmaxRows, PicksAreReadInOrder) {
  MOEX_CUDA_BACKEND_OR_SKIP(backend);
  ASSERT_TRUE(backend->chains_greedy_steps());
  std::mt19937 rng(5);
  const int64_t rows = 2, cols = 151936;
  std::vector<int32_t> want;
  std::vector<std::unique_ptr<GuardedTensor>> tensors;
  for (int pick = 0; pick < Backend::kMaxPendingPicks; ++pick) {
    auto logits = random_floats(rng, static_cast<size_t>(rows * cols), 3.f);
    want.push_back(argmax(std::span<const float>(logits).subspan(cols, cols)));
    tensors.push_back(std::make_unique<GuardedTensor>(*backend, Shape{rows, cols}));
    tensors.back()->fill(logits);
    backend->pick_greedy(tensors.back()->view());
  }
  for (int pick = 0; pick < Backend::kMaxPendingPicks; ++pick) EXPECT_EQ(backend->picked_token(), want[pick]);
}

}  // namespace
}  // namespace moex::cuda_test
