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

namespace {

inline float exp_weight(float x) {
  // Cephes' expf: x = n ln2 + r with |r| <= ln2 / 2 (ln2 in two parts, Cody-Waite), a degree-6 polynomial for
  // e^r, then 2^n through the exponent bits. Rounds to nearest by the 1.5 * 2^23 trick and clamps at -87 (e^-87 is
  // about 2^-126, the smallest normal float) instead of branching, so that the loop over a vocabulary vectorises;
  // ~1 ulp from std::exp.
  x = x > -87.0f ? x : -87.0f;  // NaN too: its token is masked by the caller
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23
  const float n = (x * 1.44269504088896341f + kRound) - kRound;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * std::bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);
}

}  // namespace

float sample_weight(float x) { return exp_weight(x); }

// Temperature sampling without sorting the vocabulary. Candidates are put in order (weight descending, lower id
// first on ties) only as far as a cut needs: top-k keeps a heap of the k best scores, reading each token once,
// and weighs only those (sample_weight(logit / T - max)); otherwise every token is weighed in one vectorised pass,
// top-p finds its nucleus from a histogram of the weights' float bits (monotone in the weight) and sorts only the
// bucket where the mass crosses top_p, and with neither cut the draw walks the ids in index order. Which tokens
// can be drawn, and with what probability, is as with a full sort; the order a draw walks them in is not, so a
// seed picks other tokens than the full sort did (it still reproduces a run). The full sort this replaced cost
// milliseconds per token and sequence over Qwen3's 151,936-token vocabulary (bench/cpu/sampler_bench.cc;
// bench/RESULTS.md, "Host sampling"), next to GPU decode steps of 0.5-3 ms. NaN and -inf logits are never drawn.
int32_t Sampler::sample(std::span<const float> logits) {
  if (params_.temperature == 0.0f || logits.empty()) return argmax(logits);
  const float inv_t = 1.0f / params_.temperature;
  const size_t n = logits.size();
  auto before = [](const auto& a, const auto& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  };
  std::uniform_real_distribution<double> uniform(0.0, 1.0);
  if (params_.top_k > 0 && static_cast<size_t>(params_.top_k) < n) {  // the k best by score, then their weights
    // A heap of the k best seen so far, its worst on top: most tokens lose one comparison against it, so the
    // vocabulary is read once and nothing is written for it (a partial sort of (score, id) pairs wrote them all).
    const size_t k = static_cast<size_t>(params_.top_k);
    candidates_.clear();
    size_t idx = 0;
    for (; idx < n && candidates_.size() < k; ++idx) {
      const float score = logits[idx] * inv_t;
      if (!(score > -std::numeric_limits<float>::infinity())) continue;  // NaN or -inf (masked): never drawn
      candidates_.emplace_back(score, static_cast<int32_t>(idx));
      std::push_heap(candidates_.begin(), candidates_.end(), before);
    }
    // A later token replaces the worst only with a higher score (on a tie the lower id, already in, wins); NaN fails
    // the comparison.
    float worst = candidates_.empty() ? 0.0f : candidates_.front().first;
    for (; idx < n; ++idx) {
      const float score = logits[idx] * inv_t;
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
    return draw_from(cut_to_nucleus(0, 0.0, candidates_mass(candidates_.size())), uniform(rng_));
  }

  // The max of logit / T is the max logit times 1 / T: rounding a product by a positive factor keeps the order.
  const float max_score = max_ignoring_nan(logits) * inv_t;
  if (!std::isfinite(max_score)) return argmax(logits);  // all NaN or -inf, or an infinite logit: no weights

  weights_.resize(n);
  double total = 0;
  const float* in = logits.data();
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
  if (params_.top_p >= 1.0f) {  // the whole distribution: no order needed
    double draw = uniform(rng_) * total;
    int32_t last = -1;
    for (size_t idx = 0; idx < n; ++idx) {
      if (weights_[idx] <= 0.0f) continue;
      last = static_cast<int32_t>(idx);
      draw -= weights_[idx];
      if (draw <= 0) return last;
    }
    return last;  // rounding left a sliver of the draw: the last token with weight
  }
  if (n <= 4096) {  // a short vocabulary: sorting it costs less than clearing the buckets below
    candidates_.resize(n);
    for (size_t idx = 0; idx < n; ++idx) candidates_[idx] = {weights_[idx], static_cast<int32_t>(idx)};
    std::sort(candidates_.begin(), candidates_.end(), before);
    return draw_from(cut_to_nucleus(0, 0.0, candidates_mass(n)), uniform(rng_));
  }
  // Buckets by the weight's top 16 bits (sign 0, 8 exponent, 7 mantissa bits: a weight in (0, 1] is at most
  // 0x3F80), each with its mass; from the heaviest down, the bucket where the mass reaches top_p is the crossing
  // one. Its tokens follow the heavier buckets' in candidates_ and alone are put in order.
  constexpr size_t kBuckets = 0x3F81;
  bucket_mass_.assign(kBuckets, 0.0);
  for (float w : weights_) bucket_mass_[std::bit_cast<uint32_t>(w) >> 16] += w;
  size_t crossing = kBuckets - 1;
  double mass = 0;
  for (; crossing > 0; --crossing) {
    if (mass + bucket_mass_[crossing] / total >= params_.top_p) break;
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
  std::sort(candidates_.begin() + heavier, candidates_.end(), before);
  return draw_from(cut_to_nucleus(heavier, mass, total), uniform(rng_));
}

// The weight of candidates_[0, count), summed in their order.
double Sampler::candidates_mass(size_t count) const {
  double total = 0;
  for (size_t i = 0; i < count; ++i) total += candidates_[i].first;
  return total;
}

// The nucleus among candidates_: [0, first) are in it with `mass` (a share of `total`), and from `first` on the
// candidates are in order; the shortest prefix whose mass reaches top_p. Returns its length (candidates_.size()
// when top_p is 1).
size_t Sampler::cut_to_nucleus(size_t first, double mass, double total) const {
  if (params_.top_p >= 1.0f) return candidates_.size();
  size_t cut = first;
  while (cut < candidates_.size()) {
    mass += candidates_[cut++].first / total;
    if (mass >= params_.top_p) break;
  }
  return cut;
}

// A draw from candidates_[0, count) by weight, u uniform in [0, 1).
int32_t Sampler::draw_from(size_t count, double u) const {
  double draw = u * candidates_mass(count);
  int32_t last = -1;
  for (size_t i = 0; i < count; ++i) {
    if (candidates_[i].first <= 0.0f) continue;
    last = candidates_[i].second;
    draw -= candidates_[i].first;
    if (draw <= 0) return last;
  }
  return last >= 0 ? last : candidates_[0].second;  // rounding left a sliver of the draw: the last with weight
}

}  // namespace moex
