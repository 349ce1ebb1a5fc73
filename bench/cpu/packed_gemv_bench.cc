// Can the host CPU compute experts from a lossless 12-bit packing of their bf16 weights at the speed its DRAM
// delivers them? --pack-experts holds offloaded experts so (docs/offloading.md, "Packed experts in host memory"):
// each weight as its sign+mantissa byte plus a 4-bit index into its tensor's 15 most frequent exponents (code 15:
// an exception, the weight kept raw in a per-row list), 0.75 of the bf16 bytes. Offloaded decode is bound by host
// DRAM bytes, so the packing pays only if decoding it inside the GEMV keeps up with memory.
//
// This times, on Mixtral-8x7B's down-projection rows (4096 x 14336 bf16, 117 MB: well past the caches) and on a
// cache-resident slice of them (the decode's compute ceiling), one thread and all of them:
//   bf16    the CPU backend's own one-token GEMV (cpu::linear_block, the loop offloaded experts run on the CPU),
//   packed  cpu::packed_linear_block over the packed rows, what the engine's CPU experts run with --pack-experts:
//           each row decoded in registers (a pshufb lookup of the exponent table) inside a GEMV with the bf16
//           GEMV's accumulators, so each row's dot is bit-identical to the backend's -- checked, which covers the
//           round trip. Timed with the AVX2 decode and, where the CPU has AVX-512 VBMI, the 512-bit one. (Until
//           2026-11-28 this bench also timed a prototype of that loop of its own, and the library's earlier path,
//           16 rows unpacked into scratch before the GEMV: bench/RESULTS.md.) On a 16-core H200 host (2026-11-27,
//           128-bit decode) the library read 18.9 GB/s of packed bytes with 15 threads from this bench's 117 MB,
//           5.0 with one; on 16-core H100 machines' hosts (2026-11-28) 55.1-63.7 with AVX2, 77.5-86.4 with AVX-512.
// The packing is the library's (core/packed_bf16.h).
// Weights are normal with the std of a 14336-wide row (~1.4e-4 of them outside the 15 commonest exponents, as on
// the default model's trained experts: bench/offload/exponent_stats.py). Prints a table and, with --json, one line.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "host_info.h"
#include "moex/backend/cpu/linear_kernels.h"
#include "moex/backend/cpu/packed_gemv_avx512.h"
#include "moex/backend/cpu/packed_linear.h"
#include "moex/backend/cpu/simd.h"
#include "moex/core/dtype.h"
#include "moex/core/packed_bf16.h"

#ifndef MOEX_CPU_AVX2
#error "packed_gemv_bench measures x86 SIMD loops: build with AVX2, FMA and F16C (x86-64-v3)"
#endif

namespace moex {
namespace {

using Clock = std::chrono::steady_clock;

constexpr int64_t kCols = 14336;  // Mixtral-8x7B's expert intermediate size: a down-projection row
constexpr int64_t kRows = 4096;

// Rows [0, rows) in `threads` equal ranges, one thread each (rows_fn(begin, end)), `reps` times; seconds per pass
// (the fastest).
template <typename RowsFn>
double time_rows(int64_t rows, int threads, int reps, RowsFn rows_fn) {
  double best = 1e30;
  for (int rep = 0; rep < reps; ++rep) {
    const auto start = Clock::now();
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t)
      pool.emplace_back([&, t] { rows_fn(rows * t / threads, rows * (t + 1) / threads); });
    for (auto& th : pool) th.join();
    best = std::min(best, std::chrono::duration<double>(Clock::now() - start).count());
  }
  return best;
}

}  // namespace
}  // namespace moex

int main(int argc, char** argv) {
  using namespace moex;
  CLI::App app{"packed_gemv_bench: host GEMV over bf16 rows against the same rows in a lossless 12-bit packing"};
  int threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  int reps = 5;
  int64_t rows = kRows;
  bool json = false;
  app.add_option("--threads", threads, "threads for the all-cores rows (default: the machine's)")
      ->check(CLI::Range(1, 1024));
  app.add_option("--reps", reps, "timed passes per case, the fastest kept")->check(CLI::Range(1, 1000));
  app.add_option("--rows", rows, "rows of 14336 bf16 weights (default 4096: 117 MB)")->check(CLI::Range(64, 1 << 20));
  app.add_flag("--json", json, "one JSON line after the table");
  CLI11_PARSE(app, argc, argv);

  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.f, 1.f / std::sqrt(static_cast<float>(kCols)));
  std::vector<uint16_t> w(static_cast<size_t>(rows * kCols));
  for (auto& v : w) v = f32_to_bf16(normal(rng));
  std::vector<float> x(kCols);
  for (auto& v : x) v = normal(rng) * 64.f;
  const PackedBf16 p = pack_bf16(w.data(), rows, kCols);
  std::vector<float> out(static_cast<size_t>(rows));
  // The CPU backend's one-token GEMV over the bf16 rows: out[row] for rows [begin, end).
  cpu::LinearProblem bf16_gemv;
  bf16_gemv.x = x.data();
  bf16_gemv.ldx = kCols;
  bf16_gemv.m = 1;
  bf16_gemv.k = kCols;
  bf16_gemv.w = w.data();
  bf16_gemv.w_dtype = DType::kBF16;
  bf16_gemv.out = out.data();
  bf16_gemv.ldo = rows;

  // The packed GEMV's decodes on this CPU: AVX2, and AVX-512 VBMI where the CPU has it (the library's default there).
  std::vector<bool> decodes = {false};
  if (cpu::packed_avx512_supported()) decodes.push_back(true);
  auto decode_name = [](bool avx512) { return avx512 ? "avx512" : "avx2"; };

  // The packing's round trip and the dots: every row, with each decode, bit for bit against the backend's.
  cpu::linear_block(bf16_gemv, 0, rows, 0, 1);
  std::vector<float> packed_out(static_cast<size_t>(rows));
  cpu::LinearProblem packed_gemv = bf16_gemv;
  packed_gemv.out = packed_out.data();
  for (const bool avx512 : decodes) {
    cpu::set_packed_avx512(avx512);
    std::fill(packed_out.begin(), packed_out.end(), NAN);
    cpu::packed_linear_block(packed_gemv, p, 0, rows, 0, 1);
    int64_t bad_rows = 0;
    for (int64_t r = 0; r < rows; ++r) bad_rows += std::memcmp(&out[r], &packed_out[r], 4) != 0;
    if (bad_rows) {
      fmt::print(stderr, "packed_gemv_bench: with the {} decode {} of {} rows differ from the CPU backend's GEMV\n",
                 decode_name(avx512), bad_rows, rows);
      return 1;
    }
  }

  const double bf16_bytes = static_cast<double>(w.size()) * 2, packed_bytes = static_cast<double>(p.bytes());
  const int64_t hot_rows = std::min<int64_t>(rows, 16);  // 458 KB of bf16: in L2
  const double exceptions = static_cast<double>(p.exc_col.size()) / static_cast<double>(w.size());
  nlohmann::json result = {{"cpu", bench::cpu_model()},           {"load_average", bench::load_average()},
                           {"rows", rows},                        {"cols", kCols},
                           {"exceptions_per_weight", exceptions}, {"packed_over_bf16", packed_bytes / bf16_bytes}};
  fmt::print("{}; load {}\n{} x {} bf16 weights ({:.0f} MB), packed {:.4f} of the bytes, {:.2e} exceptions a weight\n",
             bench::cpu_model(), bench::load_average(), rows, kCols, bf16_bytes / 1e6, packed_bytes / bf16_bytes,
             exceptions);
  fmt::print("| case | threads | bf16: weight GB/s | packed decode | packed: packed GB/s | packed: bf16-equivalent "
             "GB/s | packed / bf16 time |\n");
  fmt::print("|---|---|---|---|---|---|---|\n");
  struct Case {
    bool hot;
    int threads;
  };
  for (const Case c : {Case{true, 1}, Case{false, 1}, Case{false, threads}}) {
    const int64_t n = c.hot ? hot_rows : rows;
    const int passes = c.hot ? 200 : 1;  // a hot pass over 16 rows is too short to time alone
    const double tb = time_rows(n, c.threads, reps, [&](int64_t begin, int64_t end) {
      for (int k = 0; k < passes; ++k) cpu::linear_block(bf16_gemv, begin, end, 0, 1);
    });
    // Bytes each loop read per pass: the rows' share of the matrix (exceptions included for the packed one).
    const double share = double(n) / rows;
    const double bf16_gbs = bf16_bytes * share * passes / tb / 1e9;
    const std::string key = c.hot ? std::string("hot_1t") : fmt::format("dram_{}t", c.threads);
    result[key] = {{"bf16_gbs", bf16_gbs}};
    for (const bool avx512 : decodes) {
      cpu::set_packed_avx512(avx512);
      const double tp = time_rows(n, c.threads, reps, [&](int64_t begin, int64_t end) {
        for (int k = 0; k < passes; ++k) cpu::packed_linear_block(packed_gemv, p, begin, end, 0, 1);
      });
      const double packed_gbs = packed_bytes * share * passes / tp / 1e9;
      fmt::print("| {} | {} | {:.1f} | {} | {:.1f} | {:.1f} | {:.2f} |\n",
                 c.hot ? "cache-resident (16 rows)" : "from DRAM", c.threads, bf16_gbs, decode_name(avx512),
                 packed_gbs, packed_gbs * bf16_bytes / packed_bytes, tp / tb);
      result[key][decode_name(avx512)] = {{"packed_gbs", packed_gbs}, {"time_ratio", tp / tb}};
    }
  }
  cpu::set_packed_avx512(cpu::packed_avx512_supported());
  if (json) fmt::print("{}\n", result.dump());
  return 0;
}
