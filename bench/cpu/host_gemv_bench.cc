// Host GEMV variants on Mixtral-8x7B expert shapes: weight-read GB/s of the CPU backend's one-token expert path
// (production) beside copies of its GEMV inner loop with one change each, and a plain read of the same bytes.
// The copies run over production's partitioning (moe_experts' two passes over kGemvRowBlock-row units), so the
// loop is the only difference; the production-shaped copy (prefetch_4k) shows what the harness itself costs.
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <fstream>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "moex/backend/backend.h"
#include "moex/backend/cpu/cpu_backend.h"
#include "moex/backend/cpu/linear_kernels.h"
#include "moex/backend/cpu/ops.h"
#include "moex/backend/cpu/simd.h"
#include "moex/core/error.h"
#include "moex/core/thread_pool.h"
#include "host_info.h"

#ifndef MOEX_CPU_AVX2
#error "host_gemv_bench measures x86 SIMD loops: build with AVX2, FMA and F16C (x86-64-v3)"
#endif

namespace moex {
namespace {

using bench::cpu_model;
using bench::git_commit;
using bench::load_average;

using Clock = std::chrono::steady_clock;
using cpu::Bf16;

// Mixtral-8x7B (mistralai/Mixtral-8x7B-v0.1 config.json): hidden 4096, expert intermediate 14336.
constexpr int64_t kHidden = 4096;
constexpr int64_t kFfn = 14336;
constexpr int64_t kMatrixElems = kFfn * kHidden;
constexpr int64_t kExpertElems = 3 * kMatrixElems;  // gate | up | down, one contiguous block per expert
constexpr size_t kExpertBytes = static_cast<size_t>(kExpertElems) * sizeof(Bf16);
// The loops below consume up to 64 weights per iteration (AVX-512: 4 x 16) and carry no tail loop.
static_assert(kHidden % 64 == 0 && kFfn % 64 == 0, "row length must be a multiple of 64");
// A variant's output may differ from production's by reassociation only.
constexpr double kMaxRelErr = 1e-3;
// Production's GEMV prefetch distance (kGemvPrefetchBytes in linear_kernels.cc).
constexpr int64_t kProductionPrefetchBytes = 4096;  // linear_kernels.cc's kGemvPrefetchBytes

double seconds_since(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

// ---- GEMV row loops ---------------------------------------------------------------------------------------
// out[row] = dot(x, w[row, :]) for rows [row_begin, row_end) of w [rows, k].
using RowsFn = void (*)(const float* x, const Bf16* w, int64_t k, int64_t row_begin, int64_t row_end, float* out);

enum class Hint : uint8_t { kT0, kNta };

template <int64_t kPrefetchBytes, Hint kHint>
inline void prefetch_ahead(const Bf16* at) {
  const char* ahead = reinterpret_cast<const char*>(at) + kPrefetchBytes;
  if constexpr (kPrefetchBytes > 0 && kHint == Hint::kT0) _mm_prefetch(ahead, _MM_HINT_T0);
  if constexpr (kPrefetchBytes > 0 && kHint == Hint::kNta) _mm_prefetch(ahead, _MM_HINT_NTA);
}

// Production's gemv_row<Bf16, 1> (linear_kernels.cc) without its tails, prefetch distance and hint as
// parameters (0 bytes: no software prefetch). Same accumulators, same summation order: with 4 KiB and T0 it
// returns production's bits.
template <int64_t kPrefetchBytes, Hint kHint>
inline float dot_row(const float* x, const Bf16* w, int64_t k) {
  constexpr int kU = 4;
  __m256 acc[kU];
#pragma GCC unroll 4
  for (int u = 0; u < kU; ++u) acc[u] = _mm256_setzero_ps();
  for (int64_t kk = 0; kk < k; kk += 8 * kU) {
    prefetch_ahead<kPrefetchBytes, kHint>(w + kk);
#pragma GCC unroll 4
    for (int u = 0; u < kU; ++u) {
      __m256 wv = cpu::load8(w + kk + 8 * u);
      acc[u] = _mm256_fmadd_ps(_mm256_loadu_ps(x + kk + 8 * u), wv, acc[u]);
    }
  }
  __m256 total = acc[0];
#pragma GCC unroll 4
  for (int u = 1; u < kU; ++u) total = _mm256_add_ps(total, acc[u]);
  return cpu::hsum(total);
}

template <int64_t kPrefetchBytes, Hint kHint>
void rows_single(const float* x, const Bf16* w, int64_t k, int64_t row_begin, int64_t row_end, float* out) {
  for (int64_t row = row_begin; row < row_end; ++row) out[row] = dot_row<kPrefetchBytes, kHint>(x, w + row * k, k);
}

// Two rows per pass: each x vector is loaded once for both (half the x loads per weight byte), at the cost of
// two weight streams per thread (production's note: four streams measured 20-40% slower on 2 KiB rows; these
// rows are 8 and 28 KiB). Each row keeps production's summation order, so results are bit-identical.
void rows_paired(const float* x, const Bf16* w, int64_t k, int64_t row_begin, int64_t row_end, float* out) {
  constexpr int kU = 4;
  int64_t row = row_begin;
  for (; row + 2 <= row_end; row += 2) {
    const Bf16* w0 = w + row * k;
    const Bf16* w1 = w0 + k;
    __m256 acc0[kU], acc1[kU];
#pragma GCC unroll 4
    for (int u = 0; u < kU; ++u) acc0[u] = acc1[u] = _mm256_setzero_ps();
    for (int64_t kk = 0; kk < k; kk += 8 * kU) {
      prefetch_ahead<kProductionPrefetchBytes, Hint::kT0>(w0 + kk);
      prefetch_ahead<kProductionPrefetchBytes, Hint::kT0>(w1 + kk);
#pragma GCC unroll 4
      for (int u = 0; u < kU; ++u) {
        __m256 xv = _mm256_loadu_ps(x + kk + 8 * u);
        acc0[u] = _mm256_fmadd_ps(xv, cpu::load8(w0 + kk + 8 * u), acc0[u]);
        acc1[u] = _mm256_fmadd_ps(xv, cpu::load8(w1 + kk + 8 * u), acc1[u]);
      }
    }
    __m256 total0 = acc0[0], total1 = acc1[0];
#pragma GCC unroll 4
    for (int u = 1; u < kU; ++u) {
      total0 = _mm256_add_ps(total0, acc0[u]);
      total1 = _mm256_add_ps(total1, acc1[u]);
    }
    out[row] = cpu::hsum(total0);
    out[row + 1] = cpu::hsum(total1);
  }
  if (row < row_end) out[row] = dot_row<kProductionPrefetchBytes, Hint::kT0>(x, w + row * k, k);
}

// 16-wide FMAs: half the loop instructions per weight byte. An iteration reads 64 weights = two cache lines,
// both prefetched at production's distance. Runs only where the CPU reports AVX-512F and BW (the target
// lets the compiler use both).
[[gnu::target("avx512f,avx512bw")]] void rows_avx512(const float* x, const Bf16* w, int64_t k, int64_t row_begin,
                                                     int64_t row_end, float* out) {
  constexpr int kU = 4;
  for (int64_t row = row_begin; row < row_end; ++row) {
    const Bf16* wr = w + row * k;
    __m512 acc[kU];
#pragma GCC unroll 4
    for (int u = 0; u < kU; ++u) acc[u] = _mm512_setzero_ps();
    for (int64_t kk = 0; kk < k; kk += 16 * kU) {
      const char* ahead = reinterpret_cast<const char*>(wr + kk) + kProductionPrefetchBytes;
      _mm_prefetch(ahead, _MM_HINT_T0);
      _mm_prefetch(ahead + 64, _MM_HINT_T0);
#pragma GCC unroll 4
      for (int u = 0; u < kU; ++u) {
        // bf16 is the top half of an fp32: widen and shift, exact (as cpu::load8). The all-ones maskz forms
        // compile to the same unmasked instructions; the plain ones trip GCC 12's -Wmaybe-uninitialized.
        __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + kk + 16 * u));
        const __m512i wide = _mm512_maskz_cvtepu16_epi32(0xFFFF, raw);
        const __m512 wv = _mm512_castsi512_ps(_mm512_maskz_slli_epi32(0xFFFF, wide, 16));
        acc[u] = _mm512_fmadd_ps(_mm512_loadu_ps(x + kk + 16 * u), wv, acc[u]);
      }
    }
    __m512 total = acc[0];
#pragma GCC unroll 4
    for (int u = 1; u < kU; ++u) total = _mm512_add_ps(total, acc[u]);
    // Through memory: _mm512_reduce_add_ps trips the same GCC 12 warning. Once per row.
    alignas(64) float lanes[16];
    _mm512_store_ps(lanes, total);
    float sum = 0.0f;
    for (float lane : lanes) sum += lane;
    out[row] = sum;
  }
}

bool cpu_has_avx512() { return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw"); }

struct LoopVariant {
  const char* name;
  const char* change;  // the one difference from production's loop
  RowsFn rows;
  bool needs_avx512;
};

constexpr LoopVariant kLoopVariants[] = {
    {"prefetch_off", "no software prefetch", &rows_single<0, Hint::kT0>, false},
    {"prefetch_512", "prefetch 512 B ahead", &rows_single<512, Hint::kT0>, false},
    {"prefetch_1k", "prefetch 1 KiB ahead", &rows_single<1024, Hint::kT0>, false},
    {"prefetch_2k", "prefetch 2 KiB ahead", &rows_single<2048, Hint::kT0>, false},
    {"prefetch_4k", "none: production's loop in this harness", &rows_single<kProductionPrefetchBytes, Hint::kT0>,
     false},
    {"prefetch_8k", "prefetch 8 KiB ahead", &rows_single<8192, Hint::kT0>, false},
    {"prefetch_nta", "prefetchnta instead of prefetcht0", &rows_single<kProductionPrefetchBytes, Hint::kNta>, false},
    {"two_rows", "two rows per pass share each x load", &rows_paired, false},
    {"avx512", "AVX-512F, 16-wide FMA", &rows_avx512, true},
};

// ---- weights and the partitioned expert ---------------------------------------------------------------------
// num_experts experts of bf16 weights, uniform with std 1/sqrt(fan_in) so activations stay O(1). Filled on the
// pool (first touch spreads pages as the readers will); values depend on the block index only, not on threads.
class ExpertWeightsArena {
 public:
  ExpertWeightsArena(ThreadPool& pool, int64_t num_experts, bool huge_pages) : num_experts_(num_experts) {
    // 2 MiB aligned and sized, so that --huge-pages can back all of it with huge pages.
    constexpr size_t kHugePage = size_t{2} << 20;
    const size_t bytes = (static_cast<size_t>(num_experts) * kExpertBytes + kHugePage - 1) / kHugePage * kHugePage;
    storage_.reset(static_cast<Bf16*>(std::aligned_alloc(kHugePage, bytes)));
    if (!storage_)
      throw BudgetError(fmt::format("cannot allocate {:.2f} GB for {} experts; hint: lower --experts", bytes / 1e9,
                                    num_experts));
    if (huge_pages && madvise(storage_.get(), bytes, MADV_HUGEPAGE) != 0)
      throw UsageError("--huge-pages: madvise(MADV_HUGEPAGE) failed; hint: transparent_hugepage may be 'never'");
    // A block lies within one matrix, so it has one fan-in.
    constexpr int64_t kBlock = 1 << 16;
    static_assert(kMatrixElems % kBlock == 0, "a fill block must not straddle two matrices");
    pool.parallel_for(num_experts * kExpertElems / kBlock, 1, [&](int64_t block_begin, int64_t block_end) {
      for (int64_t block = block_begin; block < block_end; ++block) {
        const bool is_down = block * kBlock % kExpertElems >= 2 * kMatrixElems;
        const float scale = 1.7320508f / std::sqrt(static_cast<float>(is_down ? kFfn : kHidden));
        uint64_t state = 0x9E3779B97F4A7C15ull * static_cast<uint64_t>(block + 1);
        Bf16* dst = storage_.get() + block * kBlock;
        for (int64_t idx = 0; idx < kBlock; ++idx) {
          state ^= state << 13;
          state ^= state >> 7;
          state ^= state << 17;
          const float unit = static_cast<float>(state >> 40) * (1.0f / 16777216.0f);  // [0, 1)
          dst[idx].bits = f32_to_bf16((2.0f * unit - 1.0f) * scale);
        }
      }
    });
  }
  int64_t num_experts() const { return num_experts_; }
  Bf16* expert(int64_t expert_idx) const { return storage_.get() + expert_idx * kExpertElems; }
  Bf16* gate(int64_t expert_idx) const { return expert(expert_idx); }
  Bf16* up(int64_t expert_idx) const { return expert(expert_idx) + kMatrixElems; }
  Bf16* down(int64_t expert_idx) const { return expert(expert_idx) + 2 * kMatrixElems; }

 private:
  struct Free {
    void operator()(Bf16* ptr) const { std::free(ptr); }
  };
  int64_t num_experts_;
  std::unique_ptr<Bf16, Free> storage_;
};

// One expert for one token, partitioned as cpu::moe_experts does at one token: pass 1 over row units of the
// ffn rows (a chunk of units computes its gate rows, then its up rows, then silu(gate) * up on them while they
// are in cache), pass 2 over row units of the down rows. gate/up: [kFfn] scratch; out: [kHidden].
void run_expert_partitioned(ThreadPool& pool, RowsFn rows, const ExpertWeightsArena& weights, int64_t expert_idx,
                            const float* x, float* gate, float* up, float* out) {
  const int64_t row_block = cpu::linear_row_block(1);
  const Bf16* w_gate = weights.gate(expert_idx);
  const Bf16* w_up = weights.up(expert_idx);
  const Bf16* w_down = weights.down(expert_idx);
  pool.parallel_for((kFfn + row_block - 1) / row_block, 1, [&](int64_t unit_begin, int64_t unit_end) {
    const int64_t row_begin = unit_begin * row_block, row_end = std::min(kFfn, unit_end * row_block);
    rows(x, w_gate, kHidden, row_begin, row_end, gate);
    rows(x, w_up, kHidden, row_begin, row_end, up);
    cpu::silu_mul_span(gate + row_begin, up + row_begin, gate + row_begin, row_end - row_begin);
  });
  pool.parallel_for((kHidden + row_block - 1) / row_block, 1, [&](int64_t unit_begin, int64_t unit_end) {
    rows(gate, w_down, kFfn, unit_begin * row_block, std::min(kHidden, unit_end * row_block), out);
  });
}

// What memory gives: the expert's bytes summed as uint64 on the same pool, in contiguous chunks of one loop.
uint64_t read_expert(ThreadPool& pool, const ExpertWeightsArena& weights, int64_t expert_idx) {
  constexpr int64_t kPageWords = 4096 / sizeof(uint64_t);
  const auto* words = reinterpret_cast<const uint64_t*>(weights.expert(expert_idx));
  std::atomic<uint64_t> total{0};
  pool.parallel_for(static_cast<int64_t>(kExpertBytes) / 4096, 1, [&](int64_t page_begin, int64_t page_end) {
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t idx = page_begin * kPageWords; idx < page_end * kPageWords; idx += 16) {
      a0 = _mm256_add_epi64(a0, _mm256_load_si256(reinterpret_cast<const __m256i*>(words + idx)));
      a1 = _mm256_add_epi64(a1, _mm256_load_si256(reinterpret_cast<const __m256i*>(words + idx + 4)));
      a2 = _mm256_add_epi64(a2, _mm256_load_si256(reinterpret_cast<const __m256i*>(words + idx + 8)));
      a3 = _mm256_add_epi64(a3, _mm256_load_si256(reinterpret_cast<const __m256i*>(words + idx + 12)));
    }
    alignas(32) uint64_t lanes[4];
    const __m256i sum = _mm256_add_epi64(_mm256_add_epi64(a0, a1), _mm256_add_epi64(a2, a3));
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), sum);
    total.fetch_add(lanes[0] + lanes[1] + lanes[2] + lanes[3], std::memory_order_relaxed);
  });
  return total.load();
}

// ---- methods and measurement --------------------------------------------------------------------------------
struct Method {
  std::string name;
  std::string change;
  std::function<void(int64_t expert_idx, float* out)> run;  // out: [kHidden]; unused by the read baseline
  bool checked = true;                                       // out is compared with production's
  std::string skipped;                                       // why it did not run, if it did not
};

struct Result {
  std::string name, change, skipped;
  int threads = 0;
  double best_gbs = 0, mean_gbs = 0, std_gbs = 0, mean_ms_per_expert = 0;
  double max_rel_err = -1;  // < 0: not checked
};

// max |out - ref| / max |ref| over one expert's output; infinite where out holds a NaN or inf.
double relative_error(const float* out, const float* ref) {
  double max_diff = 0, max_ref = 0;
  for (int64_t idx = 0; idx < kHidden; ++idx) {
    if (!std::isfinite(out[idx])) return std::numeric_limits<double>::infinity();
    max_diff = std::max(max_diff, std::fabs(static_cast<double>(out[idx]) - ref[idx]));
    max_ref = std::max(max_ref, std::fabs(static_cast<double>(ref[idx])));
  }
  return max_ref > 0 ? max_diff / max_ref : max_diff;
}

// The methods at one thread count: one warm-up rep, then reps timed reps. Reps go round-robin over the
// methods, so a change in machine load during the run spreads over all of them instead of biasing one.
// reference: production's outputs [num_experts, kHidden], filled by the first call.
std::vector<Result> measure(int threads, int reps, const ExpertWeightsArena& weights, const std::vector<float>& x,
                            std::vector<float>& reference, uint64_t* sink) {
  const int64_t num_experts = weights.num_experts();
  std::unique_ptr<Backend> backend = make_cpu_backend(threads);
  ThreadPool pool(threads);
  std::vector<float> gate(kFfn), up(kFfn);
  std::vector<ExpertWeights> experts;
  for (int64_t expert_idx = 0; expert_idx < num_experts; ++expert_idx)
    experts.push_back({TensorView(weights.gate(expert_idx), DType::kBF16, {kFfn, kHidden}),
                       TensorView(weights.up(expert_idx), DType::kBF16, {kFfn, kHidden}),
                       TensorView(weights.down(expert_idx), DType::kBF16, {kHidden, kFfn})});
  // A TensorView holds a mutable pointer; the backend only reads x.
  const TensorView x_view(const_cast<float*>(x.data()), DType::kF32, {1, kHidden});
  const TensorView gate_view(gate.data(), DType::kF32, {1, kFfn});
  const TensorView up_view(up.data(), DType::kF32, {1, kFfn});

  std::vector<Method> methods;
  methods.push_back({"read", "baseline: sum the expert's bytes as uint64",
                     [&](int64_t expert_idx, float*) { *sink += read_expert(pool, weights, expert_idx); }, false,
                     ""});
  // The decoder's path for a missed expert: Backend::moe_experts with the token routed to it alone, weight 1, so
  // out is the expert's output exactly.
  Routing routing;
  routing.num_tokens = 1;
  routing.top_k = 1;
  routing.weights = {1.0f};
  methods.push_back({"production_moe", "Backend::moe_experts (the decoder's missed-expert path)",
                     [&](int64_t expert_idx, float* out) {
                       routing.expert_ids = {static_cast<int32_t>(expert_idx)};
                       backend->moe_experts(x_view, routing, experts, TensorView(out, DType::kF32, {1, kHidden}));
                     },
                     true, ""});
  // The decoder's path for the host rows of a split expert: linear gate, linear up, silu_mul, linear down.
  methods.push_back({"production_linear", "Backend::linear x3 + silu_mul (the split-expert path)",
                     [&](int64_t expert_idx, float* out) {
                       const TensorView out_view(out, DType::kF32, {1, kHidden});
                       backend->linear(x_view, experts[expert_idx].gate, nullptr, gate_view);
                       backend->linear(x_view, experts[expert_idx].up, nullptr, up_view);
                       backend->silu_mul(gate_view, up_view, gate_view);
                       backend->linear(gate_view, experts[expert_idx].down, nullptr, out_view);
                     },
                     true, ""});
  const bool has_avx512 = cpu_has_avx512();
  for (const LoopVariant& variant : kLoopVariants) {
    Method method{variant.name, variant.change, nullptr, true, ""};
    if (variant.needs_avx512 && !has_avx512) method.skipped = "CPU lacks avx512f/avx512bw";
    else
      method.run = [&pool, &weights, &x, &gate, &up, rows = variant.rows](int64_t expert_idx, float* out) {
        run_expert_partitioned(pool, rows, weights, expert_idx, x.data(), gate.data(), up.data(), out);
      };
    methods.push_back(std::move(method));
  }

  const bool have_reference = !reference.empty();
  if (!have_reference) reference.resize(static_cast<size_t>(num_experts * kHidden));
  std::vector<std::vector<double>> seconds(methods.size());
  std::vector<double> max_err(methods.size(), 0.0);
  std::vector<float> out(static_cast<size_t>(num_experts * kHidden));
  for (int rep = -1; rep < reps; ++rep) {
    if (rep < 0) fmt::print(stderr, "threads {}: warm-up\n", threads);
    else fmt::print(stderr, "threads {}: rep {}/{}\n", threads, rep + 1, reps);
    for (size_t method_idx = 0; method_idx < methods.size(); ++method_idx) {
      const Method& method = methods[method_idx];
      if (!method.skipped.empty()) continue;
      const auto start = Clock::now();
      for (int64_t expert_idx = 0; expert_idx < num_experts; ++expert_idx)
        method.run(expert_idx, out.data() + expert_idx * kHidden);
      const double secs = seconds_since(start);
      if (rep >= 0) seconds[method_idx].push_back(secs);
      if (!method.checked) continue;
      if (!have_reference && rep < 0 && method.name == "production_moe") reference = out;
      for (int64_t expert_idx = 0; expert_idx < num_experts; ++expert_idx) {
        const double err = relative_error(out.data() + expert_idx * kHidden, reference.data() + expert_idx * kHidden);
        max_err[method_idx] = std::max(max_err[method_idx], err);
      }
    }
  }

  std::vector<Result> results;
  for (size_t method_idx = 0; method_idx < methods.size(); ++method_idx) {
    const Method& method = methods[method_idx];
    Result r{method.name, method.change, method.skipped, threads};
    if (r.skipped.empty()) {
      std::vector<double> gbs;
      double total_secs = 0;
      for (double secs : seconds[method_idx]) {
        gbs.push_back(static_cast<double>(num_experts) * kExpertBytes / secs / 1e9);
        total_secs += secs;
      }
      r.best_gbs = *std::max_element(gbs.begin(), gbs.end());
      for (double v : gbs) r.mean_gbs += v / static_cast<double>(gbs.size());
      for (double v : gbs) r.std_gbs += (v - r.mean_gbs) * (v - r.mean_gbs);
      r.std_gbs = gbs.size() > 1 ? std::sqrt(r.std_gbs / static_cast<double>(gbs.size() - 1)) : 0.0;
      r.mean_ms_per_expert = 1e3 * total_secs / static_cast<double>(seconds[method_idx].size() * num_experts);
      if (method.checked) r.max_rel_err = max_err[method_idx];
    }
    results.push_back(std::move(r));
  }
  return results;
}

// ---- report -------------------------------------------------------------------------------------------------
// The transparent-huge-page mode in force ("always", "madvise" or "never"; "unknown" without the sysfs file).
std::string thp_mode() {
  std::ifstream in("/sys/kernel/mm/transparent_hugepage/enabled");
  std::string line;
  std::getline(in, line);
  const size_t open = line.find('['), close = line.find(']');
  return open != std::string::npos && close > open ? line.substr(open + 1, close - open - 1) : "unknown";
}

const Result* find_result(const std::vector<Result>& results, int threads, const std::string& name) {
  for (const Result& r : results)
    if (r.threads == threads && r.name == name) return &r;
  return nullptr;
}

bool result_ok(const Result& r) { return r.max_rel_err <= kMaxRelErr; }

void print_table(std::FILE* to, const std::vector<Result>& results) {
  fmt::print(to, "| method | change from production | threads | best GB/s | mean ± sd GB/s | ms / expert | "
                 "vs production_moe | of read | max rel err |\n");
  fmt::print(to, "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |\n");
  for (const Result& r : results) {
    if (!r.skipped.empty()) {
      fmt::print(to, "| {} | {} | {} | skipped: {} | | | | | |\n", r.name, r.change, r.threads, r.skipped);
      continue;
    }
    const Result* production = find_result(results, r.threads, "production_moe");
    const Result* read = find_result(results, r.threads, "read");
    const std::string err = r.max_rel_err < 0 ? "-"
                            : result_ok(r)    ? fmt::format("{:.1e}", r.max_rel_err)
                                              : fmt::format("{:.1e} MISMATCH", r.max_rel_err);
    fmt::print(to, "| {} | {} | {} | {:.1f} | {:.1f} ± {:.1f} | {:.2f} | {:.3f} | {:.0f}% | {} |\n", r.name, r.change,
               r.threads, r.best_gbs, r.mean_gbs, r.std_gbs, r.mean_ms_per_expert, r.mean_gbs / production->mean_gbs,
               100.0 * r.mean_gbs / read->mean_gbs, err);
  }
}

}  // namespace
}  // namespace moex

int main(int argc, char** argv) {
  using namespace moex;
  const int hardware = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  CLI::App app{"moex host GEMV bench: one-token bf16 expert GEMV weight-read GB/s on Mixtral-8x7B expert shapes, "
               "production CPU backend vs inner-loop variants vs a plain read"};
  int64_t num_experts = 4;
  int reps = 5;
  std::vector<int> thread_counts;
  bool json = false, huge_pages = false;
  app.add_option("--experts", num_experts, "experts to allocate (352 MB of bf16 each); a rep reads each once")
      ->check(CLI::Range(int64_t{1}, int64_t{256}));
  app.add_option("--reps", reps, "timed reps per method, after one untimed warm-up rep")->check(CLI::Range(1, 1000));
  app.add_option("--threads", thread_counts,
                 fmt::format("comma-separated thread counts (default {},{}: the engine's CPU-expert pool, all)",
                             std::max(1, hardware - 1), hardware))
      ->delimiter(',')
      ->check(CLI::Range(1, 1024));
  app.add_flag("--huge-pages", huge_pages, "madvise(MADV_HUGEPAGE) the weights (production reads 4 KiB mmap pages)");
  app.add_flag("--json", json, "print one JSON object on stdout (the table goes to stderr)");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int status = app.exit(e);
    return status == 0 ? 0 : 2;
  }
  if (thread_counts.empty()) thread_counts = {std::max(1, hardware - 1), hardware};
  std::sort(thread_counts.begin(), thread_counts.end());
  thread_counts.erase(std::unique(thread_counts.begin(), thread_counts.end()), thread_counts.end());
  std::string command;
  for (int idx = 0; idx < argc; ++idx) command += (idx ? " " : "") + std::string(argv[idx]);

  try {
    const std::string load_before = load_average();
    const auto fill_start = Clock::now();
    std::unique_ptr<ExpertWeightsArena> weights;
    {
      ThreadPool fill_pool(thread_counts.back());
      weights = std::make_unique<ExpertWeightsArena>(fill_pool, num_experts, huge_pages);
    }
    std::vector<float> x(kHidden);
    for (int64_t idx = 0; idx < kHidden; ++idx) x[idx] = 1.7320508f * std::sin(0.7f * static_cast<float>(idx) + 0.3f);
    fmt::print(stderr, "{} experts, {:.2f} GB of bf16 weights, filled in {:.1f} s\n", num_experts,
               static_cast<double>(num_experts) * kExpertBytes / 1e9, seconds_since(fill_start));

    std::vector<float> reference;
    std::vector<Result> results;
    uint64_t sink = 0;
    for (int threads : thread_counts) {
      std::vector<Result> at = measure(threads, reps, *weights, x, reference, &sink);
      results.insert(results.end(), at.begin(), at.end());
    }
    const std::string load_after = load_average();
    bool ok = true;
    for (const Result& r : results)
      if (r.skipped.empty() && r.max_rel_err >= 0 && !result_ok(r)) ok = false;

    const std::string thp = thp_mode();
    std::FILE* table_to = json ? stderr : stdout;
    fmt::print(table_to, "{}, {} hardware threads; {} experts x {:.0f} MB bf16 per rep, {} reps after 1 warm-up; "
                         "THP {}{}; load average {} -> {}\n\n",
               cpu_model(), hardware, num_experts, kExpertBytes / 1e6, reps, thp,
               huge_pages ? ", MADV_HUGEPAGE" : "", load_before, load_after);
    print_table(table_to, results);
    fmt::print(table_to, "\noutput check (max rel err <= {:.0e} vs production_moe): {}\n", kMaxRelErr,
               ok ? "ok" : "MISMATCH");

    if (json) {
      char date[32];
      const std::time_t now = std::time(nullptr);
      std::strftime(date, sizeof(date), "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&now));
      nlohmann::json j;
      j["bench"] = "host_gemv";
      j["device"] = cpu_model();
      j["hardware_threads"] = hardware;
      j["commit"] = git_commit();
      j["date"] = date;
      j["command"] = command;
      j["config"] = {{"hidden", kHidden},       {"ffn", kFfn},
                     {"experts", num_experts},  {"bytes_per_rep", static_cast<double>(num_experts) * kExpertBytes},
                     {"reps", reps},            {"warmup_reps", 1},
                     {"threads", thread_counts}, {"huge_pages", huge_pages},
                     {"thp", thp},              {"avx512", cpu_has_avx512()},
                     {"max_rel_err", kMaxRelErr}};
      j["load_average_before"] = load_before;
      j["load_average_after"] = load_after;
      j["results"] = nlohmann::json::array();
      for (const Result& r : results) {
        nlohmann::json row = {{"method", r.name}, {"change", r.change}, {"threads", r.threads}};
        if (!r.skipped.empty()) {
          row["skipped"] = r.skipped;
        } else {
          row["best_gbs"] = r.best_gbs;
          row["mean_gbs"] = r.mean_gbs;
          row["std_gbs"] = r.std_gbs;
          row["mean_ms_per_expert"] = r.mean_ms_per_expert;
          row["max_rel_err"] = r.max_rel_err < 0 ? nlohmann::json(nullptr) : nlohmann::json(r.max_rel_err);
        }
        j["results"].push_back(row);
      }
      j["ok"] = ok;
      fmt::print("{}\n", j.dump());
    }
    // The read baseline's sums, used so the reads cannot be dropped.
    if (sink == 1) fmt::print(stderr, " \n");
    return ok ? 0 : 1;
  } catch (const std::exception& e) {
    fmt::print(stderr, "moex_host_gemv_bench: error: {}\n", e.what());
    return 1;
  }
}
