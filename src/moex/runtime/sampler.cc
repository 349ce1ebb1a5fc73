#include "moex/runtime/sampler.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <limits>

#include "moex/core/error.h"

namespace moex {

namespace {

// The largest value (-inf when there is none but NaN: NaN never wins) as the max of kLanes independent running
// maxima, which the compiler turns into vector max instructions; a one-pass compare-and-reload chain ran at ~4 ns
// per element.
float max_ignoring_nan(std::span<const float> values) {
  constexpr size_t kLanes = 16;
  float lanes[kLanes];
  for (float& lane : lanes) lane = -std::numeric_limits<float>::infinity();
  size_t idx = 0;
  for (; idx + kLanes <= values.size(); idx += kLanes)
    for (size_t lane = 0; lane < kLanes; ++lane)
      lanes[lane] = values[idx + lane] > lanes[lane] ? values[idx + lane] : lanes[lane];
  float best = lanes[0];
  for (float lane : lanes) best = lane > best ? lane : best;
  for (; idx < values.size(); ++idx) best = values[idx] > best ? values[idx] : best;
  return best;
}

}  // namespace

int32_t argmax(std::span<const float> logits) {
  // The first index of the largest value (NaNs never win; logits[0] wins when it is NaN), in two passes: the
  // vectorised max, then a scan for the first element equal to it (0.5 ms per step for 128 sequences over a
  // 32000-token vocabulary had gone to a one-pass loop).
  if (logits.empty() || logits[0] != logits[0]) return 0;
  const float best = max_ignoring_nan(logits);
  for (size_t idx = 0; idx < logits.size(); ++idx)
    if (logits[idx] == best) return static_cast<int32_t>(idx);
  return 0;
}

Sampler::Sampler(const SamplingParams& params) : params_(params), rng_(params.seed) {
  if (!(params.temperature >= 0.0f) || !std::isfinite(params.temperature))
    throw UsageError(fmt::format("--temperature must be >= 0, got {}", params.temperature));
  if (!(params.top_p > 0.0f && params.top_p <= 1.0f))
    throw UsageError(fmt::format("--top-p must be in (0, 1], got {}", params.top_p));
  if (params.top_k < 0) throw UsageError(fmt::format("--top-k must be >= 0, got {}", params.top_k));
}

TokenDraw Sampler::next_draw() {
  TokenDraw draw{params_.temperature, params_.top_p, params_.top_k, 0.0};
  // One uniform per sampled token, whether the host or the device then picks, and whatever the logits turn out
  // to be: the generator's position depends on the token count alone.
  if (params_.temperature > 0.0f) draw.uniform = std::uniform_real_distribution<double>(0.0, 1.0)(rng_);
  return draw;
}

namespace {

[[gnu::always_inline]] inline float exp_weight(float x) {
  // Cephes' expf: x = n ln2 + r with |r| <= ln2 / 2 (ln2 in two parts, Cody-Waite), a degree-6 polynomial for
  // e^r, then 2^n through the exponent bits. Rounds to nearest by the 1.5 * 2^23 trick and clamps at -87 (e^-87 is
  // about 2^-126, the smallest normal float) instead of branching, so that the loop over a vocabulary vectorises;
  // ~1 ulp from std::exp, and monotone over [-87, 0] (checked for every float there). Written as explicit fused
  // multiply-adds (this file is compiled without contraction) so that the CUDA sampler, which evaluates the same
  // ones, gets the same bits.
  x = x > -87.0f ? x : -87.0f;  // NaN too: its token is masked by the caller
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23
  const float n = std::fma(x, 1.44269504088896341f, kRound) - kRound;
  float r = std::fma(n, -0.693359375f, x);
  r = std::fma(n, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = std::fma(p, r, 1.3981999507e-3f);
  p = std::fma(p, r, 8.3334519073e-3f);
  p = std::fma(p, r, 4.1665795894e-2f);
  p = std::fma(p, r, 1.6666665459e-1f);
  p = std::fma(p, r, 5.0000001201e-1f);
  p = std::fma(p * r, r, r) + 1.0f;
  return p * std::bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);
}

}  // namespace

float sample_weight(float x) { return exp_weight(x); }

// Temperature sampling without sorting the vocabulary (what it picks: sampler.h). Candidates are put in order
// only as far as a cut needs: top-k keeps a heap of the k best scores, reading each token once, and weighs only
// those; otherwise every token is weighed in one vectorised pass, top-p finds its nucleus from a histogram of the
// weights' float bits (monotone in the score) and sorts only the bucket where the mass crosses top_p, and with
// neither cut the draw walks the ids in index order. The kept tokens are then walked in index order, which a
// device sampler reproduces without sorting anything. The full sort this replaced cost milliseconds per token and
// sequence over Qwen3's 151,936-token vocabulary (bench/cpu/sampler_bench.cc; bench/RESULTS.md, "Host sampling"),
// next to GPU decode steps of 0.5-3 ms.
int32_t Sampler::sample(std::span<const float> logits, const TokenDraw& draw) {
  if (draw.temperature == 0.0f || logits.empty()) return argmax(logits);
  const float inv_t = 1.0f / draw.temperature;
  const size_t n = logits.size();
  const float* in = logits.data();
  // Score order: descending, the lower id first on ties. Weights are monotone in the score, so this is also an
  // order of descending weight.
  auto by_score = [in, inv_t](const std::pair<float, int32_t>& a, const std::pair<float, int32_t>& b) {
    const float sa = in[a.second] * inv_t, sb = in[b.second] * inv_t;
    return sa > sb || (sa == sb && a.second < b.second);
  };
  if (draw.top_k > 0 && static_cast<size_t>(draw.top_k) < n) {  // the k best by score, then their weights
    // A heap of the k best seen so far, its worst on top: most tokens lose one comparison against it, so the
    // vocabulary is read once and nothing is written for it (a partial sort of (score, id) pairs wrote them all).
    auto before = [](const auto& a, const auto& b) {
      return a.first > b.first || (a.first == b.first && a.second < b.second);
    };
    const size_t k = static_cast<size_t>(draw.top_k);
    candidates_.clear();
    size_t idx = 0;
    for (; idx < n && candidates_.size() < k; ++idx) {
      const float score = in[idx] * inv_t;
      if (!(score > -std::numeric_limits<float>::infinity())) continue;  // NaN or -inf (masked): never drawn
      candidates_.emplace_back(score, static_cast<int32_t>(idx));
      std::push_heap(candidates_.begin(), candidates_.end(), before);
    }
    // A later token replaces the worst only with a higher score (on a tie the lower id, already in, wins); NaN fails
    // the comparison.
    float worst = candidates_.empty() ? 0.0f : candidates_.front().first;
    for (; idx < n; ++idx) {
      const float score = in[idx] * inv_t;
      if (!(score > worst)) continue;
      std::pop_heap(candidates_.begin(), candidates_.end(), before);
      candidates_.back() = {score, static_cast<int32_t>(idx)};
      std::push_heap(candidates_.begin(), candidates_.end(), before);
      worst = candidates_.front().first;
    }
    std::sort_heap(candidates_.begin(), candidates_.end(), before);
    const float max_score = candidates_.empty() ? NAN : candidates_[0].first;  // the best score
    if (!std::isfinite(max_score)) return argmax(logits);  // all NaN or -inf, or an infinite logit: no weights
    for (auto& [score, id] : candidates_) score = exp_weight(score - max_score);
    const size_t kept = cut_to_nucleus(0, 0.0, candidates_mass(candidates_.size()), draw.top_p);
    sort_by_id(0, kept);
    return draw_from(kept, draw.uniform);
  }

  // The max of logit / T is the max logit times 1 / T: rounding a product by a positive factor keeps the order.
  const float max_score = max_ignoring_nan(logits) * inv_t;
  if (!std::isfinite(max_score)) return argmax(logits);  // all NaN or -inf, or an infinite logit: no weights

  weights_.resize(n);
  double total = 0;
  float* out = weights_.data();
  for (size_t idx = 0; idx < n; ++idx) {
    const float score = in[idx] * inv_t;
    const float weight = exp_weight(score - max_score);  // computed for every token: a select, not a branch
    // NaN and -inf (a masked token) weigh 0: the polynomial alone would give -inf e^-87.
    out[idx] = score > -std::numeric_limits<float>::infinity() ? weight : 0.0f;
  }
  double sums[8] = {};  // eight running sums: independent chains the compiler vectorises
  size_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (size_t l = 0; l < 8; ++l) sums[l] += weights_[i + l];
  for (; i < n; ++i) sums[0] += weights_[i];
  for (double sum : sums) total += sum;
  if (draw.top_p >= 1.0f) {  // the whole distribution: no order needed
    double left = draw.uniform * total;
    int32_t last = -1;
    for (size_t idx = 0; idx < n; ++idx) {
      if (weights_[idx] <= 0.0f) continue;
      last = static_cast<int32_t>(idx);
      left -= weights_[idx];
      if (left <= 0) return last;
    }
    return last;  // rounding left a sliver of the draw: the last token with weight
  }
  if (n <= 4096) {  // a short vocabulary: sorting it costs less than clearing the buckets below
    candidates_.clear();
    for (size_t idx = 0; idx < n; ++idx)
      if (weights_[idx] > 0.0f) candidates_.emplace_back(weights_[idx], static_cast<int32_t>(idx));
    std::sort(candidates_.begin(), candidates_.end(), by_score);
    const size_t kept = cut_to_nucleus(0, 0.0, candidates_mass(candidates_.size()), draw.top_p);
    sort_by_id(0, kept);
    return draw_from(kept, draw.uniform);
  }
  // Buckets by the weight's top 16 bits (sign 0, 8 exponent, 7 mantissa bits: a weight in (0, 1] is at most
  // 0x3F80), each with its mass; from the heaviest down, the bucket where the mass reaches top_p is the crossing
  // one. Its tokens follow the heavier buckets' (in index order) in candidates_ and alone are put in score order.
  constexpr size_t kBuckets = 0x3F81;
  bucket_mass_.assign(kBuckets, 0.0);
  for (float w : weights_) bucket_mass_[std::bit_cast<uint32_t>(w) >> 16] += w;
  size_t crossing = kBuckets - 1;
  double mass = 0;
  for (; crossing > 0; --crossing) {
    if (mass + bucket_mass_[crossing] / total >= draw.top_p) break;
    mass += bucket_mass_[crossing] / total;
  }
  candidates_.clear();
  for (size_t idx = 0; idx < n; ++idx)
    if ((std::bit_cast<uint32_t>(weights_[idx]) >> 16) > crossing)
      candidates_.emplace_back(weights_[idx], static_cast<int32_t>(idx));
  const size_t heavier = candidates_.size();
  for (size_t idx = 0; idx < n; ++idx)
    if ((std::bit_cast<uint32_t>(weights_[idx]) >> 16) == crossing && weights_[idx] > 0.0f)
      candidates_.emplace_back(weights_[idx], static_cast<int32_t>(idx));
  std::sort(candidates_.begin() + heavier, candidates_.end(), by_score);
  const size_t kept = cut_to_nucleus(heavier, mass, total, draw.top_p);
  sort_by_id(heavier, kept - heavier);  // the heavier ones are in index order already: merge the two runs
  std::inplace_merge(candidates_.begin(), candidates_.begin() + heavier, candidates_.begin() + kept,
                     [](const auto& a, const auto& b) { return a.second < b.second; });
  return draw_from(kept, draw.uniform);
}

// The weight of candidates_[0, count), summed in their order.
double Sampler::candidates_mass(size_t count) const {
  double total = 0;
  for (size_t i = 0; i < count; ++i) total += candidates_[i].first;
  return total;
}

// The nucleus among candidates_: [0, first) are in it with `mass` (a share of `total`), and from `first` on the
// candidates are in score order; the shortest prefix whose mass reaches top_p. Returns its length
// (candidates_.size() when top_p is 1).
size_t Sampler::cut_to_nucleus(size_t first, double mass, double total, float top_p) const {
  if (top_p >= 1.0f) return candidates_.size();
  size_t cut = first;
  while (cut < candidates_.size()) {
    mass += candidates_[cut++].first / total;
    if (mass >= top_p) break;
  }
  return cut;
}

void Sampler::sort_by_id(size_t first, size_t count) {
  std::sort(candidates_.begin() + first, candidates_.begin() + first + count,
            [](const auto& a, const auto& b) { return a.second < b.second; });
}

// A draw from candidates_[0, count) (in index order) by weight, u uniform in [0, 1).
int32_t Sampler::draw_from(size_t count, double u) const {
  double left = u * candidates_mass(count);
  int32_t last = -1;
  for (size_t i = 0; i < count; ++i) {
    if (candidates_[i].first <= 0.0f) continue;
    last = candidates_[i].second;
    left -= candidates_[i].first;
    if (left <= 0) return last;
  }
  return last >= 0 ? last : candidates_[0].second;  // rounding left a sliver of the draw: the last with weight
}

}  // namespace moex
