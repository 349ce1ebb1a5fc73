// Picks on the device against the host sampler: greedy (Backend::argmax_rows) against argmax on random rows with
// planted ties, NaNs and a NaN first element; sampled (Backend::sample_rows, Backend::pick_token) against
// Sampler::sample with the same draws, token for token, on rows built to hit every cut: flat and peaked logits,
// temperatures that push most weights to the clamp, equal logits across a cut, NaN, -inf and infinite logits;
// at a fixture vocabulary and Model A's / Model B's.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <numeric>

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

// Chained steps' greedy picks (Backend::pick_token): the last row's argmax, read back in the order picked, with
// the ring of pending picks full.
TEST(CudaArgmaxRows, PicksAreReadInOrder) {
  MOEX_CUDA_BACKEND_OR_SKIP(backend);
  ASSERT_TRUE(backend->chains_steps());
  std::mt19937 rng(5);
  const int64_t rows = 2, cols = 151936;
  std::vector<int32_t> want;
  std::vector<std::unique_ptr<GuardedTensor>> tensors;
  for (int pick = 0; pick < Backend::kMaxPendingPicks; ++pick) {
    auto logits = random_floats(rng, static_cast<size_t>(rows * cols), 3.f);
    want.push_back(argmax(std::span<const float>(logits).subspan(cols, cols)));
    tensors.push_back(std::make_unique<GuardedTensor>(*backend, Shape{rows, cols}));
    tensors.back()->fill(logits);
    backend->pick_token(tensors.back()->view(), TokenDraw{});
  }
  for (int pick = 0; pick < Backend::kMaxPendingPicks; ++pick) EXPECT_EQ(backend->picked_token(), want[pick]);
}

// Row r of a test batch: logits of one of several kinds (r % 8), drawn from rng.
std::vector<float> test_row(std::mt19937& rng, int64_t cols, int64_t r) {
  std::vector<float> row = random_floats(rng, static_cast<size_t>(cols), 2.f);
  std::uniform_int_distribution<int64_t> col(0, cols - 1);
  const float nan = std::nanf(""), inf = std::numeric_limits<float>::infinity();
  switch (r % 8) {
    case 1:  // peaked: a few tokens far above the rest (a trained model's)
      for (int i = 0; i < 5; ++i) row[col(rng)] += 12.f;
      break;
    case 2:  // equal logits everywhere but a few: cuts end inside a tie of thousands
      std::fill(row.begin(), row.end(), 0.5f);
      for (int i = 0; i < 3; ++i) row[col(rng)] = 1.5f;
      break;
    case 3:  // NaN and masked tokens, element 0 among them
      for (int i = 0; i < 20; ++i) row[col(rng)] = nan;
      for (int64_t c = 0; c < cols; c += 3) row[c] = -inf;
      row[0] = nan;
      break;
    case 4:  // a planted tie for the best score
      row[col(rng)] = row[col(rng)] = 9.f;
      break;
    case 5:  // an infinite logit: the argmax
      row[col(rng)] = inf;
      break;
    case 6:  // nothing valid: the argmax's answer
      std::fill(row.begin(), row.end(), -inf);
      row[col(rng)] = nan;
      break;
    default:
      break;
  }
  return row;
}

// Draws that cover the kernel's paths, cycled over rows with fresh uniforms: greedy, no cut, top-k (1, small, at or
// past the vocabulary), top-p (tiny, typical, near 1), both, and low temperatures where most weights reach the
// e^-87 clamp while their scores still differ.
std::vector<TokenDraw> test_draws(std::mt19937_64& rng, int64_t rows) {
  const TokenDraw kinds[] = {
      {0.0f, 1.0f, 0, 0},    {1.0f, 1.0f, 0, 0},     {0.7f, 1.0f, 40, 0},   {1.3f, 0.9f, 0, 0},
      {0.8f, 0.95f, 40, 0},  {1.0f, 1.0f, 1, 0},     {1.0f, 1e-6f, 0, 0},   {0.05f, 1.0f, 300, 0},
      {0.02f, 0.999f, 0, 0}, {2.0f, 0.5f, 5000, 0},  {1.0f, 1.0f, 1 << 20, 0}, {0.9f, 0.3f, 3, 0},
  };
  std::uniform_real_distribution<double> uniform(0.0, 1.0);
  std::vector<TokenDraw> draws;
  for (int64_t r = 0; r < rows; ++r) {
    TokenDraw draw = kinds[r % std::size(kinds)];
    draw.uniform = r % 29 == 0 ? 0.0 : uniform(rng);  // u = 0 too: the first kept token
    draws.push_back(draw);
  }
  return draws;
}

TEST(CudaSampleRows, MatchesTheHostSampler) {
  MOEX_CUDA_BACKEND_OR_SKIP(backend);
  for (int64_t cols : {7, 1000, 5000, 32000, 151936}) {
    ASSERT_TRUE(backend->samples_on_device(cols));
    for (int pass = 0; pass < 3; ++pass) {
      const int64_t rows = 48;
      SCOPED_TRACE(testing::Message() << "cols " << cols << " pass " << pass);
      std::mt19937 rng(static_cast<uint32_t>(cols * 7 + pass));
      std::mt19937_64 draw_rng(static_cast<uint64_t>(cols + pass));
      std::vector<float> logits;
      for (int64_t r = 0; r < rows; ++r) {
        const auto row = test_row(rng, cols, r + pass);
        logits.insert(logits.end(), row.begin(), row.end());
      }
      const auto draws = test_draws(draw_rng, rows);
      GuardedTensor ld(*backend, {rows, cols});
      ld.fill(logits);
      std::vector<int32_t> ids(static_cast<size_t>(rows), -7);
      ASSERT_TRUE(backend->sample_rows(ld.view(), draws, ids));
      Sampler host(SamplingParams{});
      int64_t sampled = 0;
      for (int64_t r = 0; r < rows; ++r) {
        const auto row = std::span<const float>(logits).subspan(r * cols, cols);
        EXPECT_EQ(ids[r], host.sample(row, draws[r]))
            << "row " << r << " (kind " << (r + pass) % 8 << "): T " << draws[r].temperature << " top-k "
            << draws[r].top_k << " top-p " << draws[r].top_p << " u " << draws[r].uniform;
        sampled += draws[r].temperature > 0;
      }
      EXPECT_GT(sampled, rows / 2);
      (void)ld.read();  // the guards
    }
  }
}

// The kernel's picks follow the distribution, not only the host's code: over one row and 4000 draws, each of the
// top tokens' frequency within 5 standard deviations of its cut-and-renormalised softmax probability.
TEST(CudaSampleRows, FrequenciesFollowTheCutSoftmax) {
  MOEX_CUDA_BACKEND_OR_SKIP(backend);
  const int64_t cols = 5000, rows = 4000;
  std::mt19937 rng(9);
  std::vector<float> row = random_floats(rng, static_cast<size_t>(cols), 1.f);
  for (int i = 0; i < 10; ++i) row[i * 497] = 6.f - 0.3f * i;
  std::vector<float> logits;
  for (int64_t r = 0; r < rows; ++r) logits.insert(logits.end(), row.begin(), row.end());
  GuardedTensor ld(*backend, {rows, cols});
  ld.fill(logits);
  std::mt19937_64 draw_rng(4);
  std::uniform_real_distribution<double> uniform(0.0, 1.0);
  const TokenDraw kind{0.9f, 0.8f, 50, 0};
  std::vector<TokenDraw> draws(static_cast<size_t>(rows), kind);
  for (auto& d : draws) d.uniform = uniform(draw_rng);
  std::vector<int32_t> ids(static_cast<size_t>(rows));
  ASSERT_TRUE(backend->sample_rows(ld.view(), draws, ids));
  // The expected distribution in double: softmax of logit / T over the 50 best, cut at 0.8 of their mass.
  std::vector<int32_t> order(static_cast<size_t>(cols));
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return row[a] > row[b] || (row[a] == row[b] && a < b); });
  std::vector<double> w(50);
  double total = 0;
  for (int i = 0; i < 50; ++i) total += w[i] = std::exp((row[order[i]] - row[order[0]]) / 0.9);
  size_t keep = 0;
  double mass = 0;
  while (keep < 50 && mass < 0.8 * total) mass += w[keep++];
  std::map<int32_t, int64_t> counts;
  for (int32_t id : ids) ++counts[id];
  int64_t inside = 0;
  for (size_t i = 0; i < keep; ++i) {
    const double p = w[i] / mass, n = static_cast<double>(counts[order[i]]);
    inside += counts[order[i]];
    EXPECT_NEAR(n / rows, p, 5 * std::sqrt(p * (1 - p) / rows) + 1e-9) << "token " << order[i];
  }
  EXPECT_EQ(inside, rows) << "a token outside the nucleus was drawn";
}

// Chained steps' sampled picks (Backend::pick_token with a draw): the host sampler's pick from the last row, read
// back in the order picked, greedy and sampled picks mixed in the ring.
TEST(CudaSampleRows, ChainedPicksAreTheHostSamplers) {
  MOEX_CUDA_BACKEND_OR_SKIP(backend);
  ASSERT_TRUE(backend->chains_steps());
  std::mt19937 rng(6);
  std::mt19937_64 draw_rng(6);
  const int64_t rows = 2, cols = 151936;
  const auto draws = test_draws(draw_rng, 3 * Backend::kMaxPendingPicks);
  Sampler host(SamplingParams{});
  std::vector<std::unique_ptr<GuardedTensor>> tensors;
  for (int round = 0; round < 3; ++round) {
    std::vector<int32_t> want;
    for (int pick = 0; pick < Backend::kMaxPendingPicks; ++pick) {
      const TokenDraw& draw = draws[round * Backend::kMaxPendingPicks + pick];
      std::vector<float> logits = random_floats(rng, static_cast<size_t>(cols), 1.f);
      const auto last = test_row(rng, cols, pick + round);
      logits.insert(logits.end(), last.begin(), last.end());
      want.push_back(host.sample(std::span<const float>(logits).subspan(cols, cols), draw));
      tensors.push_back(std::make_unique<GuardedTensor>(*backend, Shape{rows, cols}));
      tensors.back()->fill(logits);
      backend->pick_token(tensors.back()->view(), draw);
    }
    for (int pick = 0; pick < Backend::kMaxPendingPicks; ++pick)
      EXPECT_EQ(backend->picked_token(), want[pick]) << "round " << round << " pick " << pick;
  }
}

}  // namespace
}  // namespace moex::cuda_test
