// Kernel-level CUDA benchmark at Model A (Mixtral-shaped 2.45B) and Model B (Qwen3-30B-A3B) shapes:
// device copy bandwidth first (the roofline's denominator), then GEMV GB/s, the MoE decode layer, grouped
// and dense tensor-core GEMM TFLOP/s, attention. Inputs rotate over more bytes than L2 holds, so the
// bandwidth figures are HBM figures. Each row: mean +- stddev over 5 repetitions of `reps` back-to-back
// launches between two events (launch gaps included, as eager decode sees them).
// Last, token picks over Model A's and Model B's vocabularies: the greedy argmax against the sampling kernel with
// moex run's default cuts and with top-p alone.
// Usage: moex_cuda_kernels_bench [--json FILE] [--sampling-only] [--gemm-only] [--attention-only] [--gemv-only]
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "moex/backend/cuda/cublas_gemm.h"
#include "moex/backend/cuda/cuda_backend.h"
#include "moex/backend/cuda/cuda_check.h"
#include "moex/backend/cuda/kernels/attention.cuh"
#include "moex/backend/cuda/kernels/gemm_path.h"
#include "moex/backend/cuda/kernels/gemv.cuh"
#include "moex/backend/cuda/kernels/moe.cuh"
#include "moex/backend/cuda/kernels/router.cuh"
#include "moex/backend/cuda/kernels/sampling.cuh"
#include "moex/backend/cuda/moe_plan.h"

namespace moex {
namespace {

struct Timing {
  double mean_ms = 0, std_ms = 0;
};

class Bench {
 public:
  Bench() {
    MOEX_CUDA_CHECK(cudaStreamCreate(&stream_));
    MOEX_CUDA_CHECK(cudaEventCreate(&start_));
    MOEX_CUDA_CHECK(cudaEventCreate(&stop_));
    MOEX_CUDA_CHECK(cudaDeviceGetAttribute(&num_sms_, cudaDevAttrMultiProcessorCount, 0));
  }
  cudaStream_t stream() const { return stream_; }
  int num_sms() const { return num_sms_; }

  Timing time(const std::function<void(int)>& fn, int reps) {
    for (int i = 0; i < 3; ++i) fn(i);
    MOEX_CUDA_CHECK(cudaStreamSynchronize(stream_));
    std::vector<double> per_call;
    for (int rep = 0; rep < 5; ++rep) {
      MOEX_CUDA_CHECK(cudaEventRecord(start_, stream_));
      for (int i = 0; i < reps; ++i) fn(i);
      MOEX_CUDA_CHECK(cudaEventRecord(stop_, stream_));
      MOEX_CUDA_CHECK(cudaEventSynchronize(stop_));
      MOEX_CUDA_CHECK(cudaGetLastError());
      float ms = 0;
      MOEX_CUDA_CHECK(cudaEventElapsedTime(&ms, start_, stop_));
      per_call.push_back(ms / reps);
    }
    Timing t;
    for (double v : per_call) t.mean_ms += v / per_call.size();
    for (double v : per_call) t.std_ms += (v - t.mean_ms) * (v - t.mean_ms) / (per_call.size() - 1);
    t.std_ms = std::sqrt(t.std_ms);
    return t;
  }

  // Device memory filled with bf16 ~ N(0, scale^2)-ish values (a 32 MiB random block tiled).
  void* random_bf16(size_t count, float scale) {
    void* ptr = nullptr;
    MOEX_CUDA_CHECK(cudaMalloc(&ptr, count * 2 + 256));
    allocations_.push_back(ptr);
    const size_t block = std::min<size_t>(count, size_t{16} << 20);
    std::vector<uint16_t> host(block);
    std::mt19937 rng(static_cast<uint32_t>(count + allocations_.size()));
    std::normal_distribution<float> dist(0.f, scale);
    for (auto& v : host) v = f32_to_bf16(dist(rng));
    for (size_t off = 0; off < count; off += block)
      MOEX_CUDA_CHECK(cudaMemcpy(static_cast<uint16_t*>(ptr) + off, host.data(), std::min(block, count - off) * 2,
                                 cudaMemcpyHostToDevice));
    return ptr;
  }
  float* random_f32(size_t count) {
    std::vector<float> host(count);
    std::mt19937 rng(static_cast<uint32_t>(count));
    std::normal_distribution<float> dist(0.f, 1.f);
    for (auto& v : host) v = dist(rng);
    void* ptr = nullptr;
    MOEX_CUDA_CHECK(cudaMalloc(&ptr, count * 4 + 256));
    allocations_.push_back(ptr);
    MOEX_CUDA_CHECK(cudaMemcpy(ptr, host.data(), count * 4, cudaMemcpyHostToDevice));
    return static_cast<float*>(ptr);
  }
  void* upload(const void* src, size_t bytes) {
    void* ptr = nullptr;
    MOEX_CUDA_CHECK(cudaMalloc(&ptr, bytes + 256));
    allocations_.push_back(ptr);
    MOEX_CUDA_CHECK(cudaMemcpy(ptr, src, bytes, cudaMemcpyHostToDevice));
    return ptr;
  }
  void free_all() {
    MOEX_CUDA_CHECK(cudaDeviceSynchronize());
    for (void* p : allocations_) cudaFree(p);
    allocations_.clear();
  }

 private:
  cudaStream_t stream_ = nullptr;
  cudaEvent_t start_ = nullptr, stop_ = nullptr;
  int num_sms_ = 0;
  std::vector<void*> allocations_;
};

struct Row {
  std::string name, unit;
  double value = 0, value_std = 0, ms = 0, pct = 0;
};

std::vector<Row> g_rows;  // this file's results table (a benchmark driver, not library state)
FILE* g_json = nullptr;

void report(const std::string& name, const Timing& t, double amount, const std::string& unit, double peak) {
  Row r{name, unit, amount / (t.mean_ms * 1e-3), 0, t.mean_ms, 0};
  r.value_std = r.value * t.std_ms / t.mean_ms;
  r.pct = peak > 0 ? 100.0 * r.value / peak : 0;
  g_rows.push_back(r);
  std::printf("%-48s %9.4f ms  %10.1f %s  (%.0f%%)\n", name.c_str(), t.mean_ms, r.value / 1e9, unit.c_str(), r.pct);
  std::fflush(stdout);
  if (g_json)
    std::fprintf(g_json,
                 "{\"bench\":\"cuda_kernels\",\"name\":\"%s\",\"ms\":%.6f,\"ms_std\":%.6f,\"%s\":%.3f,\"pct_peak\":%.1f}\n",
                 name.c_str(), t.mean_ms, t.std_ms, unit == "GB/s" ? "gbs" : "gflops", r.value / 1e9, r.pct);
}

// Experts of one MoE layer in one allocation, as the backend would hold them.
struct ExpertSet {
  std::vector<ExpertWeights> weights;
};

ExpertSet make_experts(Bench& b, int64_t experts, int64_t hidden, int64_t ffn) {
  ExpertSet set;
  size_t per = static_cast<size_t>(3 * hidden * ffn);
  auto* base = static_cast<uint16_t*>(b.random_bf16(per * experts, 1.f / std::sqrt(float(hidden))));
  for (int64_t e = 0; e < experts; ++e) {
    uint16_t* p = base + per * e;
    set.weights.push_back({TensorView(p, DType::kBF16, {ffn, hidden}, Device::kCuda),
                           TensorView(p + hidden * ffn, DType::kBF16, {ffn, hidden}, Device::kCuda),
                           TensorView(p + 2 * hidden * ffn, DType::kBF16, {hidden, ffn}, Device::kCuda)});
  }
  return set;
}

Routing random_routing(std::mt19937& rng, int64_t tokens, int64_t experts, int64_t top_k) {
  Routing r;
  r.num_tokens = tokens;
  r.top_k = top_k;
  for (int64_t t = 0; t < tokens; ++t) {
    std::vector<int32_t> ids(static_cast<size_t>(experts));
    for (int64_t e = 0; e < experts; ++e) ids[e] = static_cast<int32_t>(e);
    std::shuffle(ids.begin(), ids.end(), rng);
    for (int64_t j = 0; j < top_k; ++j) {
      r.expert_ids.push_back(ids[j]);
      r.weights.push_back(1.f / top_k);
    }
  }
  return r;
}

// A device copy of a plan's arrays.
struct DevicePlan {
  cuda::MoeGroup* groups;
  int32_t* row_token;
  int32_t* slot;
  float* weights;
  int num_groups, max_rows, tile_rows;
  int64_t rows;
  bool gemm;
};

DevicePlan upload_plan(Bench& b, const Routing& r, const ExpertSet& set) {
  cuda::MoePlan plan = cuda::plan_moe(r, set.weights, true);
  DevicePlan d;
  d.groups = static_cast<cuda::MoeGroup*>(b.upload(plan.groups.data(), plan.groups.size() * sizeof(cuda::MoeGroup)));
  d.row_token = static_cast<int32_t*>(b.upload(plan.row_token.data(), plan.row_token.size() * 4));
  d.slot = static_cast<int32_t*>(b.upload(plan.slot.data(), plan.slot.size() * 4));
  d.weights = static_cast<float*>(b.upload(r.weights.data(), r.weights.size() * 4));
  d.num_groups = static_cast<int>(plan.groups.size());
  d.max_rows = plan.max_rows;
  d.tile_rows = plan.tile_rows;
  d.rows = plan.num_rows();
  d.gemm = plan.use_gemm;
  return d;
}

struct MoeShape {
  const char* label;
  int64_t experts, top_k, hidden, ffn;
};

struct Shape3 {
  const char* label;
  int64_t n, k;
};

// Picks over a vocabulary of logits ~ N(0, 2^2) with a few planted favourites: one launch per row batch, argmax
// (two kernels) against the sampling kernel.
void bench_sampling(Bench& b) {
  cudaStream_t s = b.stream();
  for (int64_t vocab : {int64_t{32000}, int64_t{151936}}) {
    for (int64_t rows : {int64_t{1}, int64_t{32}, int64_t{128}}) {
      float* logits = b.random_f32(static_cast<size_t>(rows * vocab));
      void* ids = b.upload(std::vector<int32_t>(static_cast<size_t>(rows)).data(), static_cast<size_t>(rows) * 4);
      void* scratch = b.upload(std::vector<char>(cuda::argmax_scratch_bytes(rows, vocab)).data(),
                               cuda::argmax_scratch_bytes(rows, vocab));
      const std::string shape = fmt::format("vocab {} rows {}", vocab, rows);
      Timing t = b.time(
          [&](int) { cuda::launch_argmax_rows(logits, rows, vocab, static_cast<int32_t*>(ids), scratch, s); }, 100);
      report(fmt::format("pick argmax {}", shape), t, 0.0, "-", 0);
      struct Case {
        const char* label;
        cuda::DeviceDraw draw;
      };
      const Case cases[] = {{"T=1", {1.0f, 1.0f, 0, 0.5}},
                            {"T=0.8 top-k 40 top-p 0.95", {1.25f, 0.95f, 40, 0.5}},
                            {"T=1 top-p 0.9", {1.0f, 0.9f, 0, 0.5}}};
      std::vector<cuda::DeviceDraw> draws(static_cast<size_t>(rows));
      for (const Case& c : cases) {
        std::fill(draws.begin(), draws.end(), c.draw);
        auto* dev = static_cast<const cuda::DeviceDraw*>(b.upload(draws.data(), draws.size() * sizeof(draws[0])));
        t = b.time([&](int) { cuda::launch_sample_rows(logits, rows, vocab, dev, c.draw, static_cast<int32_t*>(ids), s); },
                   100);
        report(fmt::format("pick sample {} {}", c.label, shape), t, 0.0, "-", 0);
      }
      b.free_all();
    }
  }
}

// Prefill: grouped expert GEMM (gate/up + down) and dense GEMM, TFLOP/s. On an H100/H200 their tiles run on the
// wgmma kernel; MOEX_CUDA_WGMMA=0 gives the mma.sync kernel's figures, =128 its 64-row tiles only (A/B).
void bench_gemms(Bench& b, std::mt19937& rng) {
  cudaStream_t s = b.stream();
  std::printf("prefill GEMMs: %s kernel for 128-row tiles, %s for 64-row tiles\n",
              cuda::gemm_wgmma_available(128) ? "wgmma" : "mma.sync",
              cuda::gemm_wgmma_available(64) ? "wgmma" : "mma.sync");
  // 2048 tokens: 128-row tiles; 512: Model B's experts average 32 rows, so 64-row tiles.
  for (int64_t tokens : {int64_t{2048}, int64_t{512}})
  for (MoeShape m : {MoeShape{"A", 8, 2, 2048, 5632}, MoeShape{"B", 128, 8, 2048, 768}}) {
    ExpertSet set = make_experts(b, m.experts, m.hidden, m.ffn);
    Routing r = random_routing(rng, tokens, m.experts, m.top_k);
    DevicePlan p = upload_plan(b, r, set);
    auto* a = static_cast<uint16_t*>(b.random_bf16(static_cast<size_t>(p.rows * m.hidden), 1.f));
    auto* hb = static_cast<uint16_t*>(b.random_bf16(static_cast<size_t>(p.rows * m.ffn), 1.f));
    float* y = b.random_f32(static_cast<size_t>(p.rows * m.hidden));
    // As the backend runs it: gate/up reads the tokens' rows through the plan's row_token (the kernel gathers);
    // then with A gathered beforehand (what the kernels read before the gather moved into them).
    auto* x_tokens = static_cast<uint16_t*>(b.random_bf16(static_cast<size_t>(tokens * m.hidden), 1.f));
    for (const bool gathered : {true, false}) {
      Timing t = b.time(
          [&](int) {
            cuda::launch_moe_gemm_gate_up(gathered ? x_tokens : a, gathered ? p.row_token : nullptr, p.groups,
                                          p.num_groups, p.tile_rows, m.hidden, m.ffn, hb, s);
            cuda::launch_moe_gemm_down(hb, p.groups, p.num_groups, p.tile_rows, m.hidden, m.ffn, y, s);
          },
          10);
      report(fmt::format("grouped gemm {} prefill {} tok ({} rows, {} tiles){}", m.label, tokens, p.rows, p.num_groups,
                         gathered ? "" : ", A pre-gathered"),
             t, 2.0 * 3 * p.rows * m.hidden * m.ffn, "GFLOP/s", 0);
    }
    b.free_all();
  }
  std::string why_not;
  const std::unique_ptr<cuda::CublasGemm> blas = cuda::CublasGemm::open(&why_not);
  if (!blas) std::printf("no cuBLAS figures: %s\n", why_not.c_str());
  // The dense shapes of a 2048-token prefill: square, Model B's q/k/v (5120 outputs) and o_proj (K 4096), Model A's
  // lm_head.
  for (Shape3 sh : {Shape3{"dense gemm 2048x2048x2048", 2048, 2048}, Shape3{"dense gemm 2048x5120x2048", 5120, 2048},
                    Shape3{"dense gemm 2048x2048x4096", 2048, 4096},
                    Shape3{"dense gemm 2048x32000x2048", 32000, 2048}}) {
    const int64_t M = 2048;
    auto* a = static_cast<uint16_t*>(b.random_bf16(static_cast<size_t>(M * sh.k), 1.f));
    auto* w = static_cast<uint16_t*>(b.random_bf16(static_cast<size_t>(sh.n * sh.k), 0.02f));
    float* y = b.random_f32(static_cast<size_t>(M * sh.n));
    Timing t = b.time([&](int) { cuda::launch_dense_gemm(a, M, sh.k, w, sh.n, nullptr, y, b.num_sms(), s); }, 10);
    report(sh.label, t, 2.0 * M * sh.n * sh.k, "GFLOP/s", 0);
    if (blas) {  // the same GEMM through cuBLAS (MOEX_CUDA_CUBLAS=1 in the backend)
      std::string why_not;
      t = b.time([&](int) { MOEX_ASSERT(blas->gemm(a, M, sh.k, w, sh.n, y, s, &why_not), "{}", why_not); }, 10);
      report(fmt::format("{} (cuBLAS)", sh.label), t, 2.0 * M * sh.n * sh.k, "GFLOP/s", 0);
    }
    b.free_all();
  }

}

// Attention over the paged cache (pages of 32): decode rows (GB/s of fp32 K+V, against hbm where it is known)
// and prefill chunks (GFLOP/s).
void bench_attention(Bench& b, double hbm) {
  cudaStream_t s = b.stream();
  struct AttnShape {
    const char* label;
    int64_t heads, kv_heads, n, start, seqs;  // seqs > 1: one decode row per sequence, each at position start
  };
  for (AttnShape a : {AttnShape{"A decode ctx 4096", 16, 8, 1, 4095, 1},
                      AttnShape{"B decode ctx 4096", 32, 4, 1, 4095, 1},
                      AttnShape{"A decode ctx 512", 16, 8, 1, 511, 1},
                      AttnShape{"A decode 32 seqs ctx 512", 16, 8, 32, 511, 32},
                      AttnShape{"A prefill 2048", 16, 8, 2048, 0, 1},
                      AttnShape{"B prefill 2048", 32, 4, 2048, 0, 1}}) {
    const int64_t D = 128, page = 32, keys = a.start + (a.seqs > 1 ? 1 : a.n);
    const int64_t pages_per_seq = (keys + page - 1) / page;
    float* q = b.random_f32(static_cast<size_t>(a.n * a.heads * D));
    float* kc = b.random_f32(static_cast<size_t>(a.seqs * pages_per_seq * page * a.kv_heads * D));
    float* vc = b.random_f32(static_cast<size_t>(a.seqs * pages_per_seq * page * a.kv_heads * D));
    float* o = b.random_f32(static_cast<size_t>(a.n * a.heads * D));
    std::vector<int32_t> meta;  // row_seq [n], row_pos [n], tables [seqs, pages_per_seq]
    for (int64_t r = 0; r < a.n; ++r) meta.push_back(static_cast<int32_t>(a.seqs > 1 ? r : 0));
    for (int64_t r = 0; r < a.n; ++r) meta.push_back(static_cast<int32_t>(a.seqs > 1 ? a.start : a.start + r));
    for (int64_t p = 0; p < a.seqs * pages_per_seq; ++p) meta.push_back(static_cast<int32_t>(p));
    const auto* dev = static_cast<const int32_t*>(b.upload(meta.data(), meta.size() * 4));
    const cuda::PagedKvRows rows{dev, dev + a.n, dev + 2 * a.n, pages_per_seq, page};
    cuda::AttentionShape shape{a.n, a.heads, a.kv_heads, D, keys, a.seqs == 1};
    size_t ws_bytes = cuda::attention_workspace_bytes(shape, b.num_sms());
    float* ws = b.random_f32(ws_bytes / 4 + 1);
    Timing t = b.time([&](int) { cuda::launch_attention(q, kc, vc, rows, o, shape, 0.088f, ws, b.num_sms(), s); },
                      a.seqs > 1 || a.n == 1 ? 100 : 5);
    if (a.seqs > 1 || a.n == 1)
      report(fmt::format("attention {}", a.label), t, 2.0 * a.seqs * keys * a.kv_heads * D * 4, "GB/s", hbm);
    else
      report(fmt::format("attention {}", a.label), t, 2.0 * a.n * a.n * a.heads * D, "GFLOP/s", 0);
    b.free_all();
  }
}

int run(const char* json_path, bool sampling_only, bool gemm_only, bool attention_only, bool gemv_only) {
  if (cuda_device_count() == 0) {
    std::fprintf(stderr, "moex_cuda_kernels_bench: no CUDA device\n");
    return 1;
  }
  if (json_path) g_json = std::fopen(json_path, "w");
  std::printf("device: %s\n", cuda_device_description(0).c_str());
  Bench b;
  if (sampling_only || gemm_only || attention_only) {
    if (sampling_only) bench_sampling(b);
    if (attention_only) bench_attention(b, 0.0);
    if (gemm_only) {
      std::mt19937 rng(1234);
      bench_gemms(b, rng);
    }
    if (g_json) std::fclose(g_json);
    return 0;
  }
  cudaStream_t s = b.stream();
  int sms = 0;
  MOEX_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));

  // ---- bandwidth ceiling: device-to-device copy, bytes read + written ----
  const size_t copy_bytes = size_t{2} << 30;
  void *src = nullptr, *dst = nullptr;
  MOEX_CUDA_CHECK(cudaMalloc(&src, copy_bytes));
  MOEX_CUDA_CHECK(cudaMalloc(&dst, copy_bytes));
  MOEX_CUDA_CHECK(cudaMemset(src, 1, copy_bytes));
  Timing tc = b.time([&](int) { MOEX_CUDA_CHECK(cudaMemcpyAsync(dst, src, copy_bytes, cudaMemcpyDeviceToDevice, s)); }, 5);
  report("hbm: device copy 2 GiB (read+write)", tc, 2.0 * copy_bytes, "GB/s", 0);
  const double hbm = 2.0 * copy_bytes / (tc.mean_ms * 1e-3);
  cudaFree(src);
  cudaFree(dst);
  if (g_json) std::fprintf(g_json, "{\"bench\":\"cuda_kernels\",\"name\":\"hbm_copy\",\"gbs\":%.1f,\"device\":\"%s\"}\n", hbm / 1e9, cuda_device_description(0).c_str());

  // ---- dense GEMV (batch 1..32; 2-32 rows take the tensor-core kernel): weight bytes / time vs the copy
  // bandwidth ----
  const Shape3 gemv_shapes[] = {{"A q_proj 2048x2048", 2048, 2048},   {"A k_proj 1024x2048", 1024, 2048},
                                {"A q/k/v 4096x2048", 4096, 2048},
                                {"A expert gate 5632x2048", 5632, 2048}, {"A expert down 2048x5632", 2048, 5632},
                                {"A lm_head 32000x2048", 32000, 2048},   {"B q_proj 4096x2048", 4096, 2048},
                                {"B expert gate 768x2048", 768, 2048},   {"B lm_head 151936x2048", 151936, 2048},
                                {"A router 8x2048", 8, 2048},            {"B router 128x2048", 128, 2048}};
  for (const Shape3& sh : gemv_shapes) {
    size_t bytes = static_cast<size_t>(sh.n * sh.k) * 2;
    int copies = static_cast<int>(std::max<size_t>(2, (size_t{512} << 20) / bytes + 1));
    std::vector<const uint16_t*> ws;
    auto* base = static_cast<uint16_t*>(b.random_bf16(static_cast<size_t>(sh.n * sh.k) * copies, 0.02f));
    for (int c = 0; c < copies; ++c) ws.push_back(base + static_cast<size_t>(sh.n * sh.k) * c);
    float* x = b.random_f32(static_cast<size_t>(32 * sh.k));
    float* y = b.random_f32(static_cast<size_t>(32 * sh.n));
    for (int m : {1, 8, 16, 32}) {
      Timing t = b.time([&](int i) { cuda::launch_gemv_bf16(x, m, ws[i % copies], sh.n, sh.k, nullptr, y, sms, s); }, 50);
      report(fmt::format("gemv m={} {}", m, sh.label), t, static_cast<double>(bytes), "GB/s", hbm);
    }
    b.free_all();
  }

  if (gemv_only) {  // the copy ceiling and the dense GEMVs only (A/B of the few-token kernels' shapes)
    if (g_json) std::fclose(g_json);
    return 0;
  }

  // ---- MoE decode layer: gate/up (fused SwiGLU) + down + combine, batch 1 and 8 ----
  std::mt19937 rng(1234);
  for (MoeShape m : {MoeShape{"A", 8, 2, 2048, 5632}, MoeShape{"B", 128, 8, 2048, 768}}) {
    ExpertSet set = make_experts(b, m.experts, m.hidden, m.ffn);
    for (int64_t tokens : {1, 8, 32}) {
      const int kPlans = 8;
      std::vector<DevicePlan> plans;
      double bytes = 0;
      for (int p = 0; p < kPlans; ++p) {
        Routing r = random_routing(rng, tokens, m.experts, m.top_k);
        plans.push_back(upload_plan(b, r, set));
        std::vector<bool> used(static_cast<size_t>(m.experts));
        for (int32_t id : r.expert_ids) used[id] = true;
        bytes += std::count(used.begin(), used.end(), true) * 3.0 * m.hidden * m.ffn * 2 / kPlans;
      }
      // The expert kernels' instance as batched decode picks it: the device planner's bound on a group's rows is
      // the step's tokens where the row-split kernels take them (cuda_backend.cc, moe_routed_on_device), not the
      // largest group of this plan, which would run the 16-row kernels at 32 tokens where decode runs row-split.
      const int bound = cuda::moe_rows_kernels_take(tokens, m.hidden, m.ffn) ? static_cast<int>(tokens) : 0;
      float* x = b.random_f32(static_cast<size_t>(tokens * m.hidden));
      float* h = b.random_f32(static_cast<size_t>(tokens * m.top_k * m.ffn));
      float* y = b.random_f32(static_cast<size_t>(tokens * m.top_k * m.hidden));
      float* out = b.random_f32(static_cast<size_t>(tokens * m.hidden));
      auto* hb = static_cast<uint16_t*>(b.random_bf16(static_cast<size_t>(tokens * m.top_k * m.ffn), 1.f));
      auto* xb = static_cast<uint16_t*>(b.random_bf16(static_cast<size_t>(tokens * m.hidden), 1.f));
      Timing t = b.time(
          [&](int i) {
            const DevicePlan& p = plans[i % kPlans];
            if (p.gemm) {
              cuda::launch_moe_gemm_gate_up(xb, p.row_token, p.groups, p.num_groups, p.tile_rows, m.hidden, m.ffn, hb,
                                            s);
              cuda::launch_moe_gemm_down(hb, p.groups, p.num_groups, p.tile_rows, m.hidden, m.ffn, y, s);
            } else {
              cuda::launch_moe_gemv(x, p.row_token, p.groups, p.num_groups, bound > 0 ? bound : p.max_rows, m.hidden,
                                    m.ffn, h, y, s, nullptr, sms, p.num_groups);
            }
            cuda::launch_moe_combine(y, p.slot, p.weights, tokens, m.top_k, m.hidden, out, s);
          },
          40);
      report(fmt::format("moe layer {} ({}x top-{}, ffn {}) tokens={}{}", m.label, m.experts, m.top_k, m.ffn, tokens,
                         bound > 0 ? " (row-split)" : ""),
             t, bytes, "GB/s", hbm);
    }
    b.free_all();
  }

  bench_gemms(b, rng);

  bench_attention(b, hbm);

  // ---- router: one launch, 1 and 128 tokens ----
  for (int64_t tokens : {1, 128}) {
    float* logits = b.random_f32(static_cast<size_t>(tokens * 128));
    void* ids = b.upload(std::vector<int32_t>(tokens * 8).data(), tokens * 8 * 4);
    float* w = b.random_f32(static_cast<size_t>(tokens * 8));
    Timing t = b.time(
        [&](int) { cuda::launch_router_topk(logits, tokens, 128, 8, false, true, static_cast<int32_t*>(ids), w, s); }, 100);
    report(fmt::format("router 128 experts top-8 tokens={}", tokens), t, 0.0, "-", 0);
    b.free_all();
  }
  bench_sampling(b);
  if (g_json) std::fclose(g_json);
  return 0;
}

}  // namespace
}  // namespace moex

int main(int argc, char** argv) {
  const char* json = nullptr;
  bool sampling_only = false, gemm_only = false, attention_only = false, gemv_only = false;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--json" && i + 1 < argc) {
      json = argv[++i];
    } else if (arg == "--sampling-only") {
      sampling_only = true;
    } else if (arg == "--gemm-only") {
      gemm_only = true;
    } else if (arg == "--attention-only") {
      attention_only = true;
    } else if (arg == "--gemv-only") {
      gemv_only = true;
    } else {
      const char* what = arg == "--json" ? "a file name must follow" : "unknown argument";
      std::fprintf(stderr, "moex_cuda_kernels_bench: %s '%s' (usage: moex_cuda_kernels_bench [--json FILE] "
                   "[--sampling-only] [--gemm-only] [--attention-only] [--gemv-only])\n", what, arg.c_str());
      return 2;
    }
  }
  try {
    return moex::run(json, sampling_only, gemm_only, attention_only, gemv_only);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moex_cuda_kernels_bench: %s\n", e.what());
    return 1;
  }
}
