// Kernel-level CPU benchmark: this machine's streaming read bandwidth, then decode and prefill
// tokens/s of a random-weight Mixtral-shaped layer stack built from Backend ops directly (attention
// projections, router, top-2 experts, lm head). Decode reads every active weight once per token, so
// bandwidth / active bytes per token is its ceiling; the ratio to it is the figure of merit.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "moex/backend/backend.h"
#include "moex/backend/cpu/cpu_backend.h"
#include "moex/core/thread_pool.h"
#include "host_info.h"

#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace moex {
namespace {

using bench::cpu_model;
using bench::load_average;
using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

struct Stats {
  double mean = 0, stddev = 0;
};

Stats stats(const std::vector<double>& xs) {
  Stats s;
  for (double x : xs) s.mean += x;
  s.mean /= static_cast<double>(xs.size());
  for (double x : xs) s.stddev += (x - s.mean) * (x - s.mean);
  s.stddev = xs.size() > 1 ? std::sqrt(s.stddev / static_cast<double>(xs.size() - 1)) : 0.0;
  return s;
}

// ---- memory bandwidth ----------------------------------------------------------------------------
// Every thread sums its share of a buffer far larger than the LLC; the sums are kept so the reads
// stay. The buffer lives across measurements so a pass can run right before each decode repetition:
// on a shared machine the load changes, and the ratio is only fair between neighbouring measurements.
class ReadBandwidth {
 public:
  ReadBandwidth(ThreadPool& pool, size_t bytes) : pool_(pool), buffer_(bytes / sizeof(float)) {
    pool_.parallel_for(static_cast<int64_t>(buffer_.size()), 1 << 16, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) buffer_[i] = static_cast<float>(i & 7);
    });
    chunks_ = 64 * pool_.num_threads();
    per_chunk_ = static_cast<int64_t>(buffer_.size()) / chunks_ / 32 * 32;
    partial_.resize(static_cast<size_t>(chunks_));
  }

  // Best of `passes` full reads, in GB/s.
  double measure_gbs(int passes) {
    double best = 0.0;
    for (int pass = 0; pass < passes; ++pass) {
      auto start = Clock::now();
      pool_.parallel_for(chunks_, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
        for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) partial_[chunk] = sum_chunk(chunk);
      });
      double secs = seconds_since(start);
      best = std::max(best, static_cast<double>(chunks_ * per_chunk_ * sizeof(float)) / secs / 1e9);
      for (double v : partial_) sink_ += v;
    }
    return best;
  }
  double sink() const { return sink_; }

 private:
  double sum_chunk(int64_t chunk) const {
    const float* p = buffer_.data() + chunk * per_chunk_;
#ifdef __AVX2__
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t i = 0; i < per_chunk_; i += 32) {
      a0 = _mm256_add_ps(a0, _mm256_loadu_ps(p + i));
      a1 = _mm256_add_ps(a1, _mm256_loadu_ps(p + i + 8));
      a2 = _mm256_add_ps(a2, _mm256_loadu_ps(p + i + 16));
      a3 = _mm256_add_ps(a3, _mm256_loadu_ps(p + i + 24));
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    double s = 0;
    for (float l : lanes) s += l;
    return s;
#else
    double s = 0;
    for (int64_t i = 0; i < per_chunk_; ++i) s += p[i];
    return s;
#endif
  }

  ThreadPool& pool_;
  std::vector<float> buffer_;
  int64_t chunks_ = 0, per_chunk_ = 0;
  std::vector<double> partial_;
  double sink_ = 0;
};

// ---- the model -------------------------------------------------------------------------------------
struct BenchConfig {
  int64_t hidden = 1024, ffn = 2816, layers = 8, experts = 8, top_k = 2, heads = 16, kv_heads = 8, vocab = 32000;
  int64_t head_dim() const { return hidden / heads; }
};

// Random bf16 weights with std ~ 1/sqrt(fan_in), so activations stay O(1) through the stack.
class WeightArena {
 public:
  TensorView make(int64_t rows, int64_t cols) {
    storage_.emplace_back(static_cast<size_t>(rows * cols));
    std::vector<uint16_t>& data = storage_.back();
    float scale = 1.7320508f / std::sqrt(static_cast<float>(cols));
    for (uint16_t& w : data) {
      state_ ^= state_ << 13;
      state_ ^= state_ >> 7;
      state_ ^= state_ << 17;
      float unit = static_cast<float>(state_ >> 40) * (1.0f / 16777216.0f);  // [0, 1)
      w = f32_to_bf16((2.0f * unit - 1.0f) * scale);
    }
    bytes_ += data.size() * 2;
    return TensorView(data.data(), DType::kBF16, {rows, cols});
  }
  TensorView ones(int64_t cols) {
    storage_.emplace_back(static_cast<size_t>(cols), f32_to_bf16(1.0f));
    bytes_ += static_cast<size_t>(cols) * 2;
    return TensorView(storage_.back().data(), DType::kBF16, {cols});
  }
  size_t bytes() const { return bytes_; }

 private:
  std::vector<std::vector<uint16_t>> storage_;
  uint64_t state_ = 0x9E3779B97F4A7C15ull;
  size_t bytes_ = 0;
};

struct Layer {
  TensorView attn_norm, q, k, v, o, ffn_norm, router;
  std::vector<ExpertWeights> experts;
};

class MoeStack {
 public:
  MoeStack(Backend& backend, const BenchConfig& cfg, int64_t max_seq) : be_(backend), cfg_(cfg), max_seq_(max_seq) {
    embed_ = arena_.make(cfg.vocab, cfg.hidden);
    for (int64_t l = 0; l < cfg.layers; ++l) {
      Layer layer;
      layer.attn_norm = arena_.ones(cfg.hidden);
      layer.q = arena_.make(cfg.heads * cfg.head_dim(), cfg.hidden);
      layer.k = arena_.make(cfg.kv_heads * cfg.head_dim(), cfg.hidden);
      layer.v = arena_.make(cfg.kv_heads * cfg.head_dim(), cfg.hidden);
      layer.o = arena_.make(cfg.hidden, cfg.heads * cfg.head_dim());
      layer.ffn_norm = arena_.ones(cfg.hidden);
      layer.router = arena_.make(cfg.experts, cfg.hidden);
      for (int64_t e = 0; e < cfg.experts; ++e)
        layer.experts.push_back({arena_.make(cfg.ffn, cfg.hidden), arena_.make(cfg.ffn, cfg.hidden),
                                 arena_.make(cfg.hidden, cfg.ffn)});
      layers_.push_back(std::move(layer));
      // One page holding the whole sequence: the contiguous cache this benchmark has always timed.
      k_cache_.push_back(be_.alloc(DType::kF32, {1, max_seq, cfg.kv_heads, cfg.head_dim()}));
      v_cache_.push_back(be_.alloc(DType::kF32, {1, max_seq, cfg.kv_heads, cfg.head_dim()}));
    }
    final_norm_ = arena_.ones(cfg.hidden);
    lm_head_ = arena_.make(cfg.vocab, cfg.hidden);
  }

  size_t total_weight_bytes() const { return arena_.bytes(); }

  // Weight bytes one decode token reads: everything but the unrouted experts and the embedding table
  // (one row of it).
  size_t active_weight_bytes() const {
    size_t per_layer = 2 * static_cast<size_t>(cfg_.hidden) * 2 +
                       (layers_[0].q.nbytes() + layers_[0].k.nbytes() + layers_[0].v.nbytes() + layers_[0].o.nbytes()) +
                       layers_[0].router.nbytes() +
                       static_cast<size_t>(cfg_.top_k) * 3 * static_cast<size_t>(cfg_.ffn * cfg_.hidden) * 2;
    return per_layer * static_cast<size_t>(cfg_.layers) + lm_head_.nbytes() + static_cast<size_t>(cfg_.hidden) * 2 * 2;
  }
  // fp32 K and V bytes attention reads per token at context length ctx.
  size_t kv_bytes(int64_t ctx) const {
    return static_cast<size_t>(2 * cfg_.layers * ctx * cfg_.kv_heads * cfg_.head_dim()) * sizeof(float);
  }

  // Runs tokens at positions [start_pos, start_pos + n) and returns the greedy next token (argmax of
  // the last position's logits); *logits_finite reports the output check.
  int32_t forward(const std::vector<int32_t>& ids, int64_t start_pos, bool* logits_finite) {
    int64_t n = static_cast<int64_t>(ids.size());
    ensure_buffers(n);
    int64_t hd = cfg_.head_dim();
    positions_.resize(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) positions_[i] = static_cast<int32_t>(start_pos + i);
    row_seq_.assign(static_cast<size_t>(n), 0);
    const KvStep kv{row_seq_, positions_, page_table_, 1, k_cache_[0]->view.dim(1)};
    be_.prepare_kv_step(kv);
    TensorView x = x_->view.rows(0, n), h = h_->view.rows(0, n);
    TensorView q = q_->view.rows(0, n), k = k_->view.rows(0, n), v = v_->view.rows(0, n);
    TensorView attn = attn_->view.rows(0, n), proj = proj_->view.rows(0, n);
    TensorView logits_r = router_->view.rows(0, n), ffn_out = ffn_->view.rows(0, n);
    be_.embedding(ids, embed_, x);
    for (int64_t l = 0; l < cfg_.layers; ++l) {
      const Layer& layer = layers_[l];
      be_.rms_norm(x, layer.attn_norm, 1e-5f, h);
      be_.linear(h, layer.q, nullptr, q);
      be_.linear(h, layer.k, nullptr, k);
      be_.linear(h, layer.v, nullptr, v);
      TensorView q3 = q.reshape({n, cfg_.heads, hd}), k3 = k.reshape({n, cfg_.kv_heads, hd});
      be_.rope(q3, positions_, hd, 1e6);
      be_.rope(k3, positions_, hd, 1e6);
      be_.kv_write(kv, k3, v.reshape({n, cfg_.kv_heads, hd}), k_cache_[l]->view, v_cache_[l]->view);
      be_.attention(kv, q3, k_cache_[l]->view, v_cache_[l]->view, 1.0f / std::sqrt(static_cast<float>(hd)),
                    attn.reshape({n, cfg_.heads, hd}));
      be_.linear(attn, layer.o, nullptr, proj);
      be_.add(x, proj, x);
      be_.rms_norm(x, layer.ffn_norm, 1e-5f, h);
      be_.linear(h, layer.router, nullptr, logits_r);
      be_.route(logits_r, cfg_.top_k, RouterScoring::kSoftmax, true, &routing_);
      be_.moe_experts(h, routing_, layer.experts, ffn_out);
      be_.add(x, ffn_out, x);
    }
    TensorView last = x.rows(n - 1, 1), normed = h.rows(0, 1);
    be_.rms_norm(last, final_norm_, 1e-5f, normed);
    be_.linear(normed, lm_head_, nullptr, logits_->view);
    const float* logits = logits_->view.as<float>();
    *logits_finite = true;
    int32_t best = 0;
    for (int64_t i = 0; i < cfg_.vocab; ++i) {
      if (!std::isfinite(logits[i])) *logits_finite = false;
      if (logits[i] > logits[best]) best = static_cast<int32_t>(i);
    }
    return best;
  }

 private:
  void ensure_buffers(int64_t n) {
    if (x_ && x_->view.dim(0) >= n) return;
    int64_t qd = cfg_.heads * cfg_.head_dim(), kvd = cfg_.kv_heads * cfg_.head_dim();
    x_ = be_.alloc(DType::kF32, {n, cfg_.hidden});
    h_ = be_.alloc(DType::kF32, {n, cfg_.hidden});
    q_ = be_.alloc(DType::kF32, {n, qd});
    k_ = be_.alloc(DType::kF32, {n, kvd});
    v_ = be_.alloc(DType::kF32, {n, kvd});
    attn_ = be_.alloc(DType::kF32, {n, qd});
    proj_ = be_.alloc(DType::kF32, {n, cfg_.hidden});
    router_ = be_.alloc(DType::kF32, {n, cfg_.experts});
    ffn_ = be_.alloc(DType::kF32, {n, cfg_.hidden});
    logits_ = be_.alloc(DType::kF32, {1, cfg_.vocab});
  }

  Backend& be_;
  BenchConfig cfg_;
  int64_t max_seq_;
  WeightArena arena_;
  TensorView embed_, final_norm_, lm_head_;
  std::vector<Layer> layers_;
  std::vector<std::unique_ptr<Buffer>> k_cache_, v_cache_;
  std::vector<int32_t> row_seq_, page_table_{0};
  std::unique_ptr<Buffer> x_, h_, q_, k_, v_, attn_, proj_, router_, ffn_, logits_;
  std::vector<int32_t> positions_;
  Routing routing_;
};

}  // namespace
}  // namespace moex

int main(int argc, char** argv) {
  using namespace moex;
  CLI::App app{"moex CPU decode/prefill kernel benchmark on a random-weight Mixtral-shaped MoE stack"};
  int threads = 0, reps = 5, decode_tokens = 32, prompt_tokens = 32;
  int64_t bandwidth_mib = 1024;
  std::vector<int> prefill_sizes = {128, 512};
  BenchConfig cfg;
  app.add_option("--threads", threads, "threads (0: all hardware threads)");
  app.add_option("--reps", reps, "timed repetitions of each measurement")->check(CLI::PositiveNumber);
  app.add_option("--decode-tokens", decode_tokens, "tokens decoded per repetition")->check(CLI::PositiveNumber);
  app.add_option("--prompt-tokens", prompt_tokens, "context before decode starts")->check(CLI::PositiveNumber);
  app.add_option("--prefill", prefill_sizes, "prefill lengths");
  app.add_option("--bandwidth-mib", bandwidth_mib, "bandwidth buffer size (MiB, >> LLC)");
  app.add_option("--layers", cfg.layers, "layers");
  CLI11_PARSE(app, argc, argv);
  std::string command;
  for (int i = 0; i < argc; ++i) command += (i ? " " : "") + std::string(argv[i]);

  int64_t max_prefill = *std::max_element(prefill_sizes.begin(), prefill_sizes.end());
  int64_t max_seq = std::max<int64_t>(max_prefill, prompt_tokens + decode_tokens) + 1;
  std::unique_ptr<Backend> backend = make_cpu_backend(threads);
  ThreadPool pool(threads);
  std::string load_before = load_average();
  ReadBandwidth reader(pool, static_cast<size_t>(bandwidth_mib) << 20);
  double first_bandwidth = reader.measure_gbs(5);
  std::printf("memory read bandwidth: %.2f GB/s (%d threads, %lld MiB buffer, best of 5); load average %s\n",
              first_bandwidth, pool.num_threads(), static_cast<long long>(bandwidth_mib), load_before.c_str());

  auto build_start = Clock::now();
  MoeStack model(*backend, cfg, max_seq);
  std::printf("model: hidden %lld ffn %lld layers %lld experts %lld top-%lld heads %lld/%lld vocab %lld, bf16, "
              "%.2f GB of weights (built in %.1f s)\n",
              (long long)cfg.hidden, (long long)cfg.ffn, (long long)cfg.layers, (long long)cfg.experts,
              (long long)cfg.top_k, (long long)cfg.heads, (long long)cfg.kv_heads, (long long)cfg.vocab,
              model.total_weight_bytes() / 1e9, seconds_since(build_start));

  bool finite = true, ok = true;
  std::vector<int32_t> prompt(static_cast<size_t>(prompt_tokens));
  for (int i = 0; i < prompt_tokens; ++i) prompt[i] = (i * 7919 + 11) % static_cast<int32_t>(cfg.vocab);

  // Decode: prompt untimed, a bandwidth pass, then decode_tokens greedy steps timed; one warm-up
  // repetition.
  std::vector<double> decode_rates, bandwidths, ratios;
  std::vector<int32_t> first_tokens;
  for (int rep = -1; rep < reps; ++rep) {
    int32_t next = model.forward(prompt, 0, &finite);
    ok &= finite;
    std::vector<int32_t> generated;
    double bandwidth_now = reader.measure_gbs(2);
    auto start = Clock::now();
    for (int step = 0; step < decode_tokens; ++step) {
      generated.push_back(next);
      next = model.forward({next}, prompt_tokens + step, &finite);
      ok &= finite;
    }
    double secs = seconds_since(start);
    if (rep < 0) first_tokens = generated;
    else {
      decode_rates.push_back(decode_tokens / secs);
      bandwidths.push_back(bandwidth_now);
      ok &= generated == first_tokens;  // same greedy tokens every repetition
    }
  }
  Stats decode = stats(decode_rates);
  Stats bandwidth = stats(bandwidths);

  std::vector<std::pair<int, Stats>> prefill;
  for (int len : prefill_sizes) {
    std::vector<int32_t> ids(static_cast<size_t>(len));
    for (int i = 0; i < len; ++i) ids[i] = (i * 104729 + 3) % static_cast<int32_t>(cfg.vocab);
    std::vector<double> rates;
    for (int rep = -1; rep < reps; ++rep) {
      auto start = Clock::now();
      model.forward(ids, 0, &finite);
      double secs = seconds_since(start);
      ok &= finite;
      if (rep >= 0) rates.push_back(len / secs);
    }
    prefill.emplace_back(len, stats(rates));
  }

  double mean_ctx = prompt_tokens + (decode_tokens - 1) / 2.0 + 1;
  size_t weight_bytes = model.active_weight_bytes();
  size_t active_bytes = weight_bytes + model.kv_bytes(static_cast<int64_t>(mean_ctx));
  double ceiling = bandwidth.mean * 1e9 / static_cast<double>(active_bytes);
  for (size_t rep = 0; rep < decode_rates.size(); ++rep)
    ratios.push_back(decode_rates[rep] * static_cast<double>(active_bytes) / (bandwidths[rep] * 1e9));
  Stats ratio = stats(ratios);
  std::string load_after = load_average();
  double achieved_gbs = decode.mean * static_cast<double>(active_bytes) / 1e9;

  std::printf("\n| metric | value |\n| --- | --- |\n");
  std::printf("| threads | %d |\n", pool.num_threads());
  std::printf("| load average (1/5/15 min) | before %s, after %s |\n", load_before.c_str(), load_after.c_str());
  std::printf("| read bandwidth (pass before each decode rep) | %.2f ± %.2f GB/s |\n", bandwidth.mean,
              bandwidth.stddev);
  std::printf("| active bytes / decode token | %.1f MB (weights %.1f MB + KV %.2f MB) |\n", active_bytes / 1e6,
              weight_bytes / 1e6, (active_bytes - weight_bytes) / 1e6);
  std::printf("| decode ceiling | %.2f tok/s |\n", ceiling);
  std::printf("| decode | %.2f ± %.2f tok/s (%.2f GB/s effective) |\n", decode.mean, decode.stddev, achieved_gbs);
  std::printf("| decode / ceiling (per rep, vs its own bandwidth pass) | %.1f ± %.1f%% |\n", 100.0 * ratio.mean,
              100.0 * ratio.stddev);
  for (auto& [len, s] : prefill) std::printf("| prefill %d | %.1f ± %.1f tok/s |\n", len, s.mean, s.stddev);
  std::printf("| output check | %s |\n", ok ? "ok (finite logits, identical greedy tokens)" : "FAILED");

  char date[32];
  std::time_t now = std::time(nullptr);
  std::strftime(date, sizeof(date), "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&now));
  nlohmann::json j;
  j["bench"] = "cpu_decode";
  j["device"] = fmt::format("{} x{} threads", cpu_model(), pool.num_threads());
  j["commit"] = bench::git_commit();
  j["date"] = date;
  j["command"] = command;
  j["config"] = {{"hidden", cfg.hidden}, {"ffn", cfg.ffn},           {"layers", cfg.layers},
                 {"experts", cfg.experts}, {"top_k", cfg.top_k},      {"heads", cfg.heads},
                 {"kv_heads", cfg.kv_heads}, {"vocab", cfg.vocab},    {"weights", "bf16"},
                 {"reps", reps},           {"decode_tokens", decode_tokens}, {"prompt_tokens", prompt_tokens}};
  j["load_average_before"] = load_before;
  j["load_average_after"] = load_after;
  j["bandwidth_gbs"] = bandwidth.mean;
  j["bandwidth_gbs_std"] = bandwidth.stddev;
  j["active_bytes_per_token"] = active_bytes;
  j["ceiling_tok_s"] = ceiling;
  j["decode_tok_s"] = decode.mean;
  j["decode_tok_s_std"] = decode.stddev;
  j["decode_ratio"] = ratio.mean;
  j["decode_ratio_std"] = ratio.stddev;
  for (auto& [len, s] : prefill) j["prefill_tok_s"][std::to_string(len)] = {{"mean", s.mean}, {"std", s.stddev}};
  j["ok"] = ok;
  std::printf("%s\n", j.dump().c_str());
  if (reader.sink() == 12345.0) std::printf(" ");
  return ok ? 0 : 1;
}
