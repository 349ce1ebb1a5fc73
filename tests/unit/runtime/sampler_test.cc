// Temperature / top-k / top-p sampling against the distribution it must draw from: the softmax of logits / T,
// cut to the k best or to the smallest nucleus of mass >= top_p and renormalised. Frequencies over many draws
// (fixed seeds: deterministic) within 5 standard deviations; the cut sets exact, also where the nucleus ends inside
// a histogram bucket of thousands of near-equal weights; seeds, NaN, masked and infinite logits, bad parameters.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <set>
#include <vector>

#include "moex/core/error.h"
#include "moex/runtime/sampler.h"

namespace moex {
namespace {

// The distribution the sampler must follow, by brute force: every token's probability (0 outside the cut). The
// weights and the masses that decide the cut are rounded as the sampler rounds them (fp32 weights, fp64 sums), so
// that the cut's last token is the same.
std::vector<double> expected_distribution(const std::vector<float>& logits, const SamplingParams& p) {
  const float inv_t = 1.0f / p.temperature;
  float max = -INFINITY;
  for (float v : logits) max = std::max(max, v * inv_t);
  std::vector<float> w(logits.size());
  double total = 0;
  for (size_t i = 0; i < logits.size(); ++i) total += w[i] = sample_weight(logits[i] * inv_t - max);
  std::vector<int32_t> order(logits.size());
  std::iota(order.begin(), order.end(), 0);
  // Score order (descending, the lower id first on ties).
  std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) {
    const float sa = logits[a] * inv_t, sb = logits[b] * inv_t;
    return sa > sb || (sa == sb && a < b);
  });
  size_t keep = logits.size();
  if (p.top_k > 0 && static_cast<size_t>(p.top_k) < keep) {
    keep = static_cast<size_t>(p.top_k);
    total = 0;
    for (size_t i = 0; i < keep; ++i) total += w[order[i]];
  }
  if (p.top_p < 1.0f) {
    double mass = 0;
    size_t cut = 0;
    while (cut < keep) {
      mass += w[order[cut++]] / total;
      if (mass >= p.top_p) break;
    }
    keep = cut;
  }
  std::vector<double> prob(logits.size(), 0.0);
  double kept = 0;
  for (size_t i = 0; i < keep; ++i) kept += prob[order[i]] = w[order[i]];
  for (double& v : prob) v /= kept;
  return prob;
}

std::vector<int64_t> draw_counts(const std::vector<float>& logits, const SamplingParams& p, int draws) {
  Sampler sampler(p);
  std::vector<int64_t> counts(logits.size(), 0);
  for (int i = 0; i < draws; ++i) ++counts.at(static_cast<size_t>(sampler.sample(logits)));
  return counts;
}

// Every token's frequency within 5 standard deviations of its probability; tokens outside the cut never drawn.
void expect_follows(const std::vector<float>& logits, const SamplingParams& p, int draws) {
  const auto want = expected_distribution(logits, p);
  const auto counts = draw_counts(logits, p, draws);
  for (size_t id = 0; id < logits.size(); ++id) {
    if (want[id] == 0) {
      EXPECT_EQ(counts[id], 0) << "token " << id << " is outside the cut";
      continue;
    }
    const double sd = std::sqrt(want[id] * (1 - want[id]) / draws);
    EXPECT_NEAR(double(counts[id]) / draws, want[id], 5 * sd + 1e-9) << "token " << id;
  }
}

TEST(Sampler, TemperatureFollowsTheSoftmax) {
  const std::vector<float> logits = {1.0f, 2.5f, -1.0f, 2.5f, 0.3f, -4.0f};
  for (float t : {0.5f, 1.0f, 2.0f}) {
    SCOPED_TRACE(t);
    expect_follows(logits, SamplingParams{t, 1.0f, 0, 7}, 200000);
  }
}

TEST(Sampler, TopKAndTopPCutTheTail) {
  const std::vector<float> logits = {0.1f, 3.0f, 2.0f, -1.0f, 2.9f, 0.5f, 1.5f, -0.2f};
  expect_follows(logits, SamplingParams{1.0f, 1.0f, 3, 11}, 200000);       // top-k
  expect_follows(logits, SamplingParams{0.8f, 0.7f, 0, 12}, 200000);       // top-p
  expect_follows(logits, SamplingParams{1.2f, 0.9f, 4, 13}, 200000);       // both
  expect_follows(logits, SamplingParams{1.0f, 1e-6f, 0, 14}, 1000);        // the nucleus is the best token
}

// A nucleus of thousands of near-equal weights (the histogram's crossing bucket holds many of them and is sorted):
// the drawn set must be exactly the nucleus, and the draws' mass over its best tokens as expected.
TEST(Sampler, LargeNucleusIsExact) {
  std::mt19937 rng(3);
  std::normal_distribution<float> normal(0.0f, 0.3f);
  std::vector<float> logits(8000);
  for (auto& v : logits) v = normal(rng);
  const SamplingParams p{1.0f, 0.9f, 0, 21};
  const auto want = expected_distribution(logits, p);
  const auto counts = draw_counts(logits, p, 20000);
  size_t nucleus = 0;
  for (size_t id = 0; id < logits.size(); ++id) {
    nucleus += want[id] > 0;
    if (want[id] == 0) {
      ASSERT_EQ(counts[id], 0) << "token " << id << " is outside the nucleus";
    }
  }
  EXPECT_GT(nucleus, 4096u);  // past the short-vocabulary sort: the histogram path
  // The 500 most likely tokens' share.
  std::vector<int32_t> order(logits.size());
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return want[a] > want[b]; });
  double mass = 0, drawn = 0;
  for (int i = 0; i < 500; ++i) {
    mass += want[order[i]];
    drawn += counts[order[i]];
  }
  EXPECT_NEAR(drawn / 20000, mass, 5 * std::sqrt(mass * (1 - mass) / 20000));
}

TEST(Sampler, FullVocabularyWithoutCutsFollowsTheSoftmax) {
  std::mt19937 rng(4);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  std::vector<float> logits(3000);
  for (auto& v : logits) v = normal(rng);
  logits[17] = 9.0f;  // one clearly best token
  const SamplingParams p{0.7f, 1.0f, 0, 5};
  const auto want = expected_distribution(logits, p);
  const auto counts = draw_counts(logits, p, 50000);
  const double sd = std::sqrt(want[17] * (1 - want[17]) / 50000);
  EXPECT_NEAR(counts[17] / 50000.0, want[17], 5 * sd);
}

TEST(Sampler, SeedReproducesARun) {
  std::vector<float> logits(1000);
  std::mt19937 rng(8);
  for (auto& v : logits) v = std::normal_distribution<float>(0.0f, 1.0f)(rng);
  for (const SamplingParams& p : {SamplingParams{0.9f, 1.0f, 0, 99}, SamplingParams{0.9f, 0.8f, 0, 99},
                                  SamplingParams{0.9f, 1.0f, 50, 99}}) {
    Sampler a(p), b(p), c(SamplingParams{p.temperature, p.top_p, p.top_k, p.seed + 1});
    std::vector<int32_t> ra, rb, rc;
    for (int i = 0; i < 64; ++i) {
      ra.push_back(a.sample(logits));
      rb.push_back(b.sample(logits));
      rc.push_back(c.sample(logits));
    }
    EXPECT_EQ(ra, rb);
    EXPECT_NE(ra, rc);
  }
}

TEST(Sampler, NaNAndMaskedNeverDrawnAndInfiniteLogitsDecide) {
  const float nan = std::nanf("");
  const float inf = std::numeric_limits<float>::infinity();
  for (const SamplingParams& p : {SamplingParams{1.0f, 1.0f, 0, 1}, SamplingParams{1.0f, 0.95f, 0, 1},
                                  SamplingParams{1.0f, 1.0f, 3, 1}}) {
    Sampler sampler(p);
    const std::vector<float> some_nan = {nan, 0.0f, nan, 0.5f, nan};
    std::set<int32_t> seen;
    for (int i = 0; i < 2000; ++i) seen.insert(sampler.sample(some_nan));
    EXPECT_EQ(seen, (std::set<int32_t>{1, 3}));
    const std::vector<float> masked = {-inf, 0.0f, -inf, 0.5f, -inf};  // -inf: a token masked out
    seen.clear();
    for (int i = 0; i < 2000; ++i) seen.insert(sampler.sample(masked));
    EXPECT_EQ(seen, (std::set<int32_t>{1, 3}));
    EXPECT_EQ(sampler.sample(std::vector<float>{0.0f, inf, 1.0f}), 1);
    EXPECT_EQ(sampler.sample(std::vector<float>{nan, nan}), 0);  // nothing to draw: argmax's answer
    EXPECT_EQ(sampler.sample(std::vector<float>{-inf, -inf, -inf}), 0);
    EXPECT_EQ(sampler.sample(std::vector<float>{}), 0);
  }
  // Ties under top-k keep the lower id.
  Sampler one(SamplingParams{1.0f, 1.0f, 1, 2});
  for (int i = 0; i < 20; ++i) EXPECT_EQ(one.sample(std::vector<float>{0.0f, 2.0f, 2.0f, 1.0f}), 1);
}

// The pick walks the kept tokens in index order, not in score order: a uniform below the first kept token's share
// picks it even when it is the least likely one.
TEST(Sampler, PickWalksTheKeptTokensInIndexOrder) {
  Sampler sampler(SamplingParams{1.0f, 1.0f, 0, 0});
  const std::vector<float> two = {0.0f, 2.0f};  // weights e^-2 = 0.135 and 1
  EXPECT_EQ(sampler.sample(two, TokenDraw{1.0f, 1.0f, 0, 0.05}), 0);
  EXPECT_EQ(sampler.sample(two, TokenDraw{1.0f, 1.0f, 0, 0.2}), 1);
  EXPECT_EQ(sampler.sample(two, TokenDraw{1.0f, 1.0f, 0, 0.0}), 0);  // u = 0: the first kept token
  // Top-k 2 of four keeps ids 1 and 3 (score ties: the lower id first, so id 3 beats id 2 only by its score).
  const std::vector<float> four = {1.0f, 3.0f, 2.0f, 3.0f};
  EXPECT_EQ(sampler.sample(four, TokenDraw{1.0f, 1.0f, 2, 0.49}), 1);
  EXPECT_EQ(sampler.sample(four, TokenDraw{1.0f, 1.0f, 2, 0.51}), 3);
  // Top-p: the nucleus of {0.0, 2.0, 1.9} at 0.5 is ids 1 and 2 (id 1 alone holds 0.49); id 2 comes after id 1.
  const std::vector<float> three = {0.0f, 2.0f, 1.9f};
  EXPECT_EQ(sampler.sample(three, TokenDraw{1.0f, 0.5f, 0, 0.5}), 1);
  EXPECT_EQ(sampler.sample(three, TokenDraw{1.0f, 0.5f, 0, 0.55}), 2);
  EXPECT_EQ(sampler.sample(three, TokenDraw{1.0f, 0.4f, 0, 0.99}), 1);  // 0.4: id 1 alone
}

// sample(logits) is sample(logits, next_draw()): one uniform per token, so a device that picks from the host's
// draws (Backend::sample_rows) follows the same generator.
TEST(Sampler, SampleIsTheNextDrawsPick) {
  std::mt19937 rng(12);
  std::vector<float> logits(5000);
  for (auto& v : logits) v = std::normal_distribution<float>(0.0f, 2.0f)(rng);
  for (const SamplingParams& p : {SamplingParams{0.8f, 1.0f, 0, 3}, SamplingParams{0.8f, 0.9f, 0, 3},
                                  SamplingParams{1.3f, 0.95f, 40, 3}, SamplingParams{0.0f, 1.0f, 0, 3}}) {
    Sampler a(p), b(p);
    for (int i = 0; i < 50; ++i) {
      const TokenDraw draw = b.next_draw();
      EXPECT_EQ(draw.temperature, p.temperature);
      EXPECT_EQ(draw.top_k, p.top_k);
      EXPECT_EQ(a.sample(logits), b.sample(logits, draw)) << "token " << i;
    }
  }
}

// The sampler's exp: within 2 ulp of std::exp over the range that matters (weights down to e^-87).
TEST(Sampler, WeightIsExp) {
  for (float x = 0.0f; x > -87.0f; x -= 0.0137f) {
    const float want = std::exp(x), got = sample_weight(x);
    ASSERT_NEAR(got, want, 2.5e-7f * want) << "x = " << x;
  }
  EXPECT_EQ(sample_weight(0.0f), 1.0f);
  EXPECT_GT(sample_weight(-1000.0f), 0.0f);
  EXPECT_LT(sample_weight(-1000.0f), 1e-37f);
}

TEST(Sampler, RejectsBadParameters) {
  EXPECT_THROW(Sampler(SamplingParams{-0.5f, 1.0f, 0, 0}), UsageError);
  EXPECT_THROW(Sampler(SamplingParams{std::nanf(""), 1.0f, 0, 0}), UsageError);
  EXPECT_THROW(Sampler(SamplingParams{1.0f, 0.0f, 0, 0}), UsageError);
  EXPECT_THROW(Sampler(SamplingParams{1.0f, 1.5f, 0, 0}), UsageError);
  EXPECT_THROW(Sampler(SamplingParams{1.0f, 1.0f, -1, 0}), UsageError);
}

}  // namespace
}  // namespace moex
