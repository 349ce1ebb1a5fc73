// CUDA moe_experts against a double-precision reference: the GEMV path (decode), the tensor-core path
// (prefill), experts with no tokens, expert counts that are not powers of two, shapes outside the fast
// envelope, bit-reproducibility; and the host-side plan (pure logic, runs without a GPU).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <set>

#include "cuda_test_util.h"
#include "unit/scoped_env.h"
#include "moex/backend/cuda/kernels/grid_shape.h"
#include "moex/backend/cuda/moe_plan.h"

namespace moex::cuda_test {
namespace {

struct MoeCase {
  int64_t tokens, hidden, ffn, experts, top_k;
};

std::string describe(const MoeCase& c) {
  return "moe(tokens=" + std::to_string(c.tokens) + ",hidden=" + std::to_string(c.hidden) + ",ffn=" +
         std::to_string(c.ffn) + ",experts=" + std::to_string(c.experts) + ",k=" + std::to_string(c.top_k) + ")";
}

// Random routing that leaves the last expert unused (when there are spare experts).
Routing random_routing(std::mt19937& rng, const MoeCase& c) {
  Routing r;
  r.num_tokens = c.tokens;
  r.top_k = c.top_k;
  int64_t usable = c.experts > c.top_k ? c.experts - 1 : c.experts;
  for (int64_t t = 0; t < c.tokens; ++t) {
    std::set<int32_t> picked;
    while (static_cast<int64_t>(picked.size()) < c.top_k) picked.insert(static_cast<int32_t>(rng() % usable));
    float sum = 0;
    std::vector<float> w;
    for (int32_t id : picked) {
      r.expert_ids.push_back(id);
      w.push_back(0.1f + static_cast<float>(rng() % 1000) / 1000.f);
      sum += w.back();
    }
    for (float v : w) r.weights.push_back(v / sum);
  }
  return r;
}

class CudaMoe : public ::testing::TestWithParam<MoeCase> {};

TEST_P(CudaMoe, MatchesReference) {
  MOEX_CUDA_BACKEND_OR_SKIP(backend);
  const MoeCase c = GetParam();
  SCOPED_TRACE(describe(c));
  std::mt19937 rng(static_cast<uint32_t>(c.tokens * 31 + c.hidden + c.experts));
  std::vector<Bf16Weight> gate, up, down;
  std::vector<ExpertWeights> experts(static_cast<size_t>(c.experts));
  for (int64_t e = 0; e < c.experts; ++e) {
    gate.push_back(random_bf16(rng, {c.ffn, c.hidden}, 1.f / std::sqrt(float(c.hidden))));
    up.push_back(random_bf16(rng, {c.ffn, c.hidden}, 1.f / std::sqrt(float(c.hidden))));
    down.push_back(random_bf16(rng, {c.hidden, c.ffn}, 1.f / std::sqrt(float(c.ffn))));
  }
  for (int64_t e = 0; e < c.experts; ++e) {
    if (e == c.experts - 1 && c.experts > c.top_k) continue;  // never routed to: left invalid on purpose
    experts[e].gate = backend->upload_weight(gate[e].host_view(), "gate");
    experts[e].up = backend->upload_weight(up[e].host_view(), "up");
    experts[e].down = backend->upload_weight(down[e].host_view(), "down");
  }
  Routing routing = random_routing(rng, c);
  auto x = random_floats(rng, static_cast<size_t>(c.tokens * c.hidden));
  GuardedTensor xd(*backend, {c.tokens, c.hidden}), od(*backend, {c.tokens, c.hidden});
  xd.fill(x);
  // GEMM tiles: the wgmma kernel on an H100/H200; everything below on it, this once on the mma.sync kernel.
  {
    const test::ScopedEnv mma_sync("MOEX_CUDA_WGMMA", "0");
    backend->moe_experts(xd.view(), routing, experts, od.view());
  }
  const auto out_mma_sync = od.read();
  od.fill(std::vector<float>(static_cast<size_t>(c.tokens * c.hidden), std::nanf("")));
  backend->moe_experts(xd.view(), routing, experts, od.view());
  auto out = od.read();

  auto reference = [&](const Routing& routing) {
    std::vector<double> ref(static_cast<size_t>(c.tokens * c.hidden), 0.0), h(static_cast<size_t>(c.ffn));
    for (int64_t t = 0; t < c.tokens; ++t)
      for (int64_t j = 0; j < c.top_k; ++j) {
        int32_t e = routing.expert_ids[t * c.top_k + j];
        if (e < 0) continue;
        for (int64_t f = 0; f < c.ffn; ++f) {
          double g = 0, u = 0;
          for (int64_t k = 0; k < c.hidden; ++k) {
            g += double(x[t * c.hidden + k]) * gate[e].values[f * c.hidden + k];
            u += double(x[t * c.hidden + k]) * up[e].values[f * c.hidden + k];
          }
          h[f] = g / (1.0 + std::exp(-g)) * u;
        }
        for (int64_t o = 0; o < c.hidden; ++o) {
          double acc = 0;
          for (int64_t f = 0; f < c.ffn; ++f) acc += h[f] * down[e].values[o * c.ffn + f];
          ref[t * c.hidden + o] += routing.weights[t * c.top_k + j] * acc;
        }
      }
    return ref;
  };
  // The gate/up GEMM reads the tokens' rows through the plan (its own gather): the same bits as from the gathered
  // copy it had read before (MOEX_CUDA_GEMM_GATHER=0), on both kernels.
  for (const bool wgmma : {true, false}) {
    const test::ScopedEnv kernel("MOEX_CUDA_WGMMA", wgmma ? "1" : "0");
    const test::ScopedEnv copy("MOEX_CUDA_GEMM_GATHER", "0");
    od.fill(std::vector<float>(static_cast<size_t>(c.tokens * c.hidden), std::nanf("")));
    backend->moe_experts(xd.view(), routing, experts, od.view());
    const auto copied = od.read();
    const auto& gathered = wgmma ? out : out_mma_sync;
    ASSERT_EQ(0, std::memcmp(copied.data(), gathered.data(), copied.size() * sizeof(float)))
        << (wgmma ? "default kernel" : "mma.sync kernel") << ": gathered copy vs the GEMM's gather";
  }

  std::vector<double> ref = reference(routing);
  MOEX_EXPECT_CLOSE(out, ref, 1e-2);
  MOEX_EXPECT_CLOSE(out_mma_sync, ref, 1e-2);

  // Bit-reproducible: same inputs, same bytes.
  for (int rep = 0; rep < 3; ++rep) {
    backend->moe_experts(xd.view(), routing, experts, od.view());
    auto again = od.read();
    ASSERT_EQ(0, std::memcmp(again.data(), out.data(), out.size() * sizeof(float))) << "run " << rep;
  }

  // Groups of 2-32 rows: the 16-row tensor-core kernels as well (MOEX_CUDA_MMA_ROWS=0; the row-split ones above).
  {
    const test::ScopedEnv rows("MOEX_CUDA_MMA_ROWS", "0");
    od.fill(std::vector<float>(static_cast<size_t>(c.tokens * c.hidden), std::nanf("")));
    backend->moe_experts(xd.view(), routing, experts, od.view());
    MOEX_EXPECT_CLOSE(od.read(), ref, 1e-2);
  }

  // The row-split kernels (forced for every group size) stage the tokens' rows several loads a thread at a time, or
  // one at a time with MOEX_CUDA_ROWS_STAGE_LOADS=1: the same staged bits, so the same output.
  {
    const test::ScopedEnv rows("MOEX_CUDA_MMA_ROWS", "1");
    od.fill(std::vector<float>(static_cast<size_t>(c.tokens * c.hidden), std::nanf("")));
    backend->moe_experts(xd.view(), routing, experts, od.view());
    const auto batched = od.read();
    MOEX_EXPECT_CLOSE(batched, ref, 1e-2);
    const test::ScopedEnv one("MOEX_CUDA_ROWS_STAGE_LOADS", "1");
    od.fill(std::vector<float>(static_cast<size_t>(c.tokens * c.hidden), std::nanf("")));
    backend->moe_experts(xd.view(), routing, experts, od.view());
    const auto single = od.read();
    ASSERT_EQ(0, std::memcmp(single.data(), batched.data(), single.size() * sizeof(float)))
        << "row-split staging: one load at a time vs several";
  }

  // A wave of the offloading path: picks with id -1 contribute nothing (token 0 loses all of them).
  Routing wave = routing;
  for (size_t a = 0; a < wave.expert_ids.size(); a += 2) wave.expert_ids[a] = -1;
  for (int64_t j = 0; j < c.top_k; ++j) wave.expert_ids[j] = -1;
  backend->moe_experts(xd.view(), wave, experts, od.view());
  MOEX_EXPECT_CLOSE(od.read(), reference(wave), 1e-2);
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, CudaMoe,
    ::testing::Values(MoeCase{1, 64, 32, 8, 2}, MoeCase{3, 64, 32, 8, 2}, MoeCase{7, 128, 64, 60, 4},
                      MoeCase{31, 64, 96, 8, 2}, MoeCase{129, 64, 32, 8, 2},  // 129 x 2 / 7: tensor-core path
                      MoeCase{200, 136, 72, 5, 3},                            // odd tiles on the GEMM path
                      MoeCase{3, 36, 20, 4, 2},                               // outside the fast envelope
                      // Model A (Mixtral-shaped 2.45B; 4 of its 8 experts): decode and a 64-token prefill chunk
                      MoeCase{1, 2048, 5632, 4, 2}, MoeCase{64, 2048, 5632, 4, 2},
                      // Model B (Qwen3-30B-A3B: moe ffn 768, top-8; 16 of its 128 experts here)
                      MoeCase{1, 2048, 768, 16, 8}, MoeCase{8, 2048, 768, 16, 8},
                      // batched decode, tensor-core groups of 2-32 tokens: A at 8 and 32 sequences, B at 32
                      MoeCase{8, 2048, 5632, 4, 2}, MoeCase{32, 2048, 5632, 8, 2}, MoeCase{32, 2048, 768, 16, 8},
                      MoeCase{13, 96, 64, 3, 2},  // groups of 8 < rows <= 16, ffn and hidden multiples of 32
                      // >= 128 rows per active expert: the GEMM's 128-row tiles, partial last tiles and columns
                      MoeCase{300, 136, 72, 2, 1}, MoeCase{520, 256, 200, 4, 2},
                      // 2-3 tiles an expert, 8 k tiles in each stage, ffn not a multiple of 128
                      MoeCase{640, 512, 328, 3, 2}));

// Prefill-sized moe_routed: the plan made on the device (moe_prefill_plan.cu) against route() + plan_moe on the
// host (MOEX_CUDA_PREFILL_PLAN=0): the same logits and output bits, and the path each took.
struct RoutedCase {
  int64_t tokens, hidden, ffn, experts, top_k;
  bool sigmoid, normalize, device_plan;  // device_plan: inside the device planner's envelope
};

class CudaMoeRoutedPrefill : public ::testing::TestWithParam<RoutedCase> {};

TEST_P(CudaMoeRoutedPrefill, DevicePlanMatchesHostPlan) {
  MOEX_CUDA_BACKEND_OR_SKIP(backend);
  const RoutedCase c = GetParam();
  SCOPED_TRACE(describe(MoeCase{c.tokens, c.hidden, c.ffn, c.experts, c.top_k}));
  std::mt19937 rng(static_cast<uint32_t>(c.tokens * 7 + c.experts));
  std::vector<Bf16Weight> host_weights;
  std::vector<ExpertWeights> experts(static_cast<size_t>(c.experts));
  for (int64_t e = 0; e < c.experts; ++e) {
    host_weights.push_back(random_bf16(rng, {c.ffn, c.hidden}, 1.f / std::sqrt(float(c.hidden))));
    experts[e].gate = backend->upload_weight(host_weights.back().host_view(), "gate");
    host_weights.push_back(random_bf16(rng, {c.ffn, c.hidden}, 1.f / std::sqrt(float(c.hidden))));
    experts[e].up = backend->upload_weight(host_weights.back().host_view(), "up");
    host_weights.push_back(random_bf16(rng, {c.hidden, c.ffn}, 1.f / std::sqrt(float(c.ffn))));
    experts[e].down = backend->upload_weight(host_weights.back().host_view(), "down");
  }
  auto router_w = random_bf16(rng, {c.experts, c.hidden}, 1.f / std::sqrt(float(c.hidden)));
  TensorView router = backend->upload_weight(router_w.host_view(), "router");
  GuardedTensor xd(*backend, {c.tokens, c.hidden}), logits(*backend, {c.tokens, c.experts}),
      od(*backend, {c.tokens, c.hidden});
  xd.fill(random_floats(rng, static_cast<size_t>(c.tokens * c.hidden)));
  const RouterScoring scoring = c.sigmoid ? RouterScoring::kSigmoid : RouterScoring::kSoftmax;
  const auto run = [&](const char* device_plan) {
    const test::ScopedEnv plan("MOEX_CUDA_PREFILL_PLAN", device_plan);
    od.fill(std::vector<float>(static_cast<size_t>(c.tokens * c.hidden), std::nanf("")));
    const int64_t before = cuda_prefill_plans_on_device(*backend);
    backend->moe_routed(xd.view(), router, logits.view(), c.top_k, scoring, c.normalize, experts, od.view());
    return cuda_prefill_plans_on_device(*backend) - before;
  };
  EXPECT_EQ(run("0"), 0);
  const auto host_logits = logits.read(), host_out = od.read();
  EXPECT_EQ(run("1"), c.device_plan ? 1 : 0);
  const auto device_logits = logits.read(), device_out = od.read();
  ASSERT_EQ(0, std::memcmp(host_logits.data(), device_logits.data(), host_logits.size() * sizeof(float)));
  for (size_t i = 0; i < host_out.size(); ++i)
    ASSERT_EQ(0, std::memcmp(&host_out[i], &device_out[i], sizeof(float)))
        << "element " << i << ": host plan " << host_out[i] << ", device plan " << device_out[i];
  // Both plans with the gathered copy of x the GEMM had read before (MOEX_CUDA_GEMM_GATHER=0; the router's logits
  // then from linear()'s own bf16 copy): the same bits.
  const test::ScopedEnv copy("MOEX_CUDA_GEMM_GATHER", "0");
  for (const char* device_plan : {"0", "1"}) {
    SCOPED_TRACE(std::string("MOEX_CUDA_PREFILL_PLAN=") + device_plan);
    run(device_plan);
    ASSERT_EQ(0, std::memcmp(host_logits.data(), logits.read().data(), host_logits.size() * sizeof(float)));
    ASSERT_EQ(0, std::memcmp(host_out.data(), od.read().data(), host_out.size() * sizeof(float)));
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, CudaMoeRoutedPrefill,
    ::testing::Values(RoutedCase{600, 256, 128, 16, 4, false, true, true},   // 128-row tiles
                      RoutedCase{300, 128, 96, 60, 4, false, true, true},    // 64-row tiles, 60 experts
                      RoutedCase{2100, 64, 64, 8, 2, false, false, true},    // 5 chunks of 1024 picks
                      RoutedCase{400, 128, 64, 32, 8, true, true, true},     // sigmoid scores
                      RoutedCase{1100, 64, 64, 256, 8, false, true, true},   // the planner's most experts, 9 chunks
                      RoutedCase{100, 64, 64, 16, 2, false, true, false}));  // 12 rows an expert: host plan, GEMV

TEST(CudaMoePlan, SortsByExpertAndCutsGroups) {
  Routing r;
  r.num_tokens = 3;
  r.top_k = 2;
  r.expert_ids = {2, 0, 0, 2, 2, 1};
  r.weights = {0.5f, 0.5f, 0.5f, 0.5f, 0.5f, 0.5f};
  std::vector<uint16_t> dummy(8);
  std::vector<ExpertWeights> experts(4);
  for (int e = 0; e < 3; ++e) {
    TensorView v(dummy.data() + e, DType::kBF16, {1, 1}, Device::kCuda);
    experts[e] = ExpertWeights{v, v, v};
  }
  cuda::MoePlan plan = cuda::plan_moe(r, experts, true);
  EXPECT_FALSE(plan.use_gemm);
  // Rows: expert 0 <- (t0 j1), (t1 j0); expert 1 <- (t2 j1); expert 2 <- (t0 j0), (t1 j1), (t2 j0).
  EXPECT_EQ(plan.row_token, (std::vector<int32_t>{0, 1, 2, 0, 1, 2}));
  EXPECT_EQ(plan.slot, (std::vector<int32_t>{3, 0, 1, 4, 5, 2}));
  ASSERT_EQ(plan.groups.size(), 3u);
  EXPECT_EQ(plan.groups[0].row_begin, 0);
  EXPECT_EQ(plan.groups[0].num_rows, 2);
  EXPECT_EQ(plan.groups[2].row_begin, 3);
  EXPECT_EQ(plan.groups[2].num_rows, 3);
  EXPECT_EQ(plan.max_rows, 3);
}

TEST(CudaMoePlan, LargeBatchUsesGemmTiles) {
  Routing r;
  r.num_tokens = cuda::kMoeGemmTileRows + 36;
  r.top_k = 1;
  r.expert_ids.assign(static_cast<size_t>(r.num_tokens), 1);
  r.weights.assign(static_cast<size_t>(r.num_tokens), 1.f);
  std::vector<uint16_t> dummy(1);
  TensorView v(dummy.data(), DType::kBF16, {1, 1}, Device::kCuda);
  std::vector<ExpertWeights> experts(2, ExpertWeights{v, v, v});
  cuda::MoePlan plan = cuda::plan_moe(r, experts, true);
  EXPECT_TRUE(plan.use_gemm);
  ASSERT_EQ(plan.groups.size(), 2u);
  EXPECT_EQ(plan.tile_rows, cuda::kMoeGemmTileRows);
  EXPECT_EQ(plan.groups[0].num_rows, cuda::kMoeGemmTileRows);
  EXPECT_EQ(plan.groups[1].num_rows, 36);

  // Fewer rows than a large tile per active expert: small tiles.
  r.num_tokens = cuda::kMoeGemmSmallTileRows + 36;
  r.expert_ids.assign(static_cast<size_t>(r.num_tokens), 1);
  r.weights.assign(static_cast<size_t>(r.num_tokens), 1.f);
  plan = cuda::plan_moe(r, experts, true);
  EXPECT_EQ(plan.tile_rows, cuda::kMoeGemmSmallTileRows);
  ASSERT_EQ(plan.groups.size(), 2u);
  EXPECT_EQ(plan.groups[0].num_rows, cuda::kMoeGemmSmallTileRows);
  EXPECT_EQ(plan.groups[1].num_rows, 36);
}

TEST(CudaGridShape, LoopingGridTakesTheCapsRoundsWithTheFewestBlocks) {
  auto rounds = [](int64_t groups, int64_t blocks) { return (groups + blocks - 1) / blocks; };
  for (int64_t groups : {1, 7, 132, 263, 264, 265, 512, 640, 2048, 100000})
    for (int blocks_per_sm : {1, 2, 3})
      for (int num_sms : {1, 78, 132}) {
        SCOPED_TRACE(std::to_string(groups) + " groups, " + std::to_string(blocks_per_sm) + " x " + std::to_string(num_sms));
        const int64_t cap = int64_t(blocks_per_sm) * num_sms;
        const int64_t blocks = cuda::looping_grid_blocks(groups, blocks_per_sm, num_sms);
        EXPECT_GE(blocks, 1);
        EXPECT_LE(blocks, std::min(groups, cap));
        EXPECT_EQ(rounds(groups, blocks), rounds(groups, std::min(groups, cap)));
        if (blocks > 1) {
          EXPECT_GT(rounds(groups, blocks - 1), rounds(groups, blocks)) << "one block fewer would do";
        }
      }
  EXPECT_EQ(cuda::looping_grid_blocks(640, 2, 132), 214);  // Model B's q/k/v row groups on an H100/H200
  EXPECT_EQ(cuda::looping_grid_blocks(2048, 0, 132), 2048);  // no cap: a block per group
  EXPECT_EQ(cuda::looping_grid_blocks(2048, 2, 0), 2048);
  EXPECT_EQ(cuda::looping_grid_blocks(0, 2, 132), 1);
}

}  // namespace
}  // namespace moex::cuda_test
