// CUDA paged kv_write + causal GQA attention against the CPU backend and a double-precision reference, on the
// shared paged cases (tests/unit/backend/paged_kv_case.h: prefill chunks, batched decode rows of sequences
// with different lengths, pages of 1 to 32 positions, NaN in every slot that must not be read, Model A /
// Model B decode and prefill shapes).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <cstdlib>
#include <string>
#include <random>

#include "cuda_test_util.h"
#include "moex/backend/cpu/cpu_backend.h"
#include "moex/backend/cuda/kernels/attention.cuh"
#include "moex/backend/cuda/kernels/gemv.cuh"
#include "unit/backend/paged_kv_case.h"
#include "unit/scoped_env.h"

namespace moex::cuda_test {
namespace {

// The shared cases plus prefill chunks for the tensor-core kernel: several query tiles and the diagonal,
// head dims padded to 64 / 128 / 256, a short chunk on a long context (split keys, merged), page sizes that
// do not divide the tiles.
std::vector<test::PagedCase> cuda_cases() {
  std::vector<test::PagedCase> cases = test::paged_cases();
  cases.push_back({8, 2, 64, 16, {0}, {300}});
  cases.push_back({32, 8, 128, 16, {0}, {520}});      // Mixtral / Model A-like heads, 5 query tiles of 128
  cases.push_back({16, 8, 128, 16, {1500}, {40}});    // a chunk after 1500 cached keys: split across blocks
  cases.push_back({6, 2, 96, 7, {3}, {70}});          // head_dim 96, padded to 128
  cases.push_back({4, 4, 192, 32, {0}, {100}});       // head_dim 192 (MLA-like), padded to 256
  cases.push_back({2, 1, 256, 32, {10}, {40}});
  cases.push_back({4, 2, 20, 5, {2}, {33}});          // head_dim 20, padded to 64
  cases.push_back({32, 4, 128, 16, {0}, {16}});       // the smallest chunk the tensor cores take
  // Batch-1 decode past the dims kernel's first round of keys (the later rounds read after its PDL wait).
  cases.push_back({16, 8, 128, 16, {79}, {1}});       // Model A at 80 keys: 3 rounds of 32
  cases.push_back({32, 4, 128, 32, {200}, {1}});      // Model B at 201 keys: 7 rounds
  cases.push_back({8, 2, 32, 8, {150}, {1}});         // head_dim 32
  cases.push_back({8, 1, 64, 16, {90}, {1}});         // group 8 (4 keys a warp and round), head_dim 64
  // Batch-1 decode split over a thread block cluster of 16: splits of 32 keys (a 512-key bucket: the last ones
  // empty), of 128 (a 2048-key bucket); and past the largest cluster bucket (splits merged by a launch).
  cases.push_back({16, 8, 128, 16, {300}, {1}});     // Model A at 301 keys: 10 of 16 splits hold keys
  cases.push_back({32, 4, 128, 32, {450}, {1}});     // Model B, two heads a block
  cases.push_back({8, 8, 64, 16, {700}, {1}});       // group 1, a 1024-key bucket
  cases.push_back({16, 8, 128, 16, {1800}, {1}});
  cases.push_back({32, 4, 128, 32, {2500}, {1}});
  return cases;
}


class CudaPagedAttention : public ::testing::TestWithParam<size_t> {};

TEST_P(CudaPagedAttention, MatchesCpuAndReference) {
  MOEX_CUDA_BACKEND_OR_SKIP(backend);
  const test::PagedCase c = cuda_cases()[GetParam()];
  const uint64_t seed = 1000 + GetParam();
  SCOPED_TRACE(c.str() + " seed=" + std::to_string(seed));
  test::PagedData d = test::make_paged(c, seed);
  const Shape pool = d.pool_shape(c), rows_shape{d.n, c.kv_heads, c.head_dim}, q_shape{d.n, c.heads, c.head_dim};
  auto kp = backend->alloc(DType::kF32, pool), vp = backend->alloc(DType::kF32, pool);
  backend->copy_from_host(d.k_pool.data(), kp->view);
  backend->copy_from_host(d.v_pool.data(), vp->view);
  GuardedTensor kn(*backend, rows_shape), vn(*backend, rows_shape), qd(*backend, q_shape), od(*backend, q_shape);
  kn.fill(d.k_new);
  vn.fill(d.v_new);
  qd.fill(d.q);
  const KvStep step = d.step();
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(c.head_dim)));
  backend->prepare_kv_step(step);
  backend->kv_write(step, kn.view(), vn.view(), kp->view, vp->view);
  // Decode rows of distinct sequences run the dims-per-lane kernel by default (at batch 1 its splits as a thread
  // block cluster); MOEX_CUDA_ATTENTION_KEY_LANES=1 (read at every launch) runs the key-per-lane kernel on them,
  // MOEX_CUDA_ATTENTION_CLUSTER=0 the dims-per-lane kernel without the cluster, =8 clusters of 8; and
  // MOEX_CUDA_ATTENTION_WARPS=8 its blocks of 8 warps (one or two heads a block, not in a cluster), with and without
  // the cluster: all are checked below.
  // The attention with the environment as it is when called (the switches are read at every launch).
  const auto attend = [&] {
    backend->attention(step, qd.view(), kp->view, vp->view, scale, od.view());
    return od.read();
  };
  // With name=value set for the one call.
  const auto attend_with = [&](const char* name, const char* value) {
    const test::ScopedEnv env(name, value);
    return attend();
  };
  const std::vector<float> got = attend();
  const std::vector<float> got_key_lanes = attend_with("MOEX_CUDA_ATTENTION_KEY_LANES", "1");
  const std::vector<float> got_no_cluster = attend_with("MOEX_CUDA_ATTENTION_CLUSTER", "0");
  const std::vector<float> got_cluster_8 = attend_with("MOEX_CUDA_ATTENTION_CLUSTER", "8");
  std::vector<float> got_wide, got_wide_no_cluster;
  {
    const test::ScopedEnv wide("MOEX_CUDA_ATTENTION_WARPS", "8");
    got_wide = attend();
    got_wide_no_cluster = attend_with("MOEX_CUDA_ATTENTION_CLUSTER", "0");
  }
  // The tensor-core prefill kernel reads dense bf16 copies of K and V where head_dim % 8 == 0; =0 gathers and
  // rounds the fp32 pages in every block, as it did before: the same roundings, so the same bits.
  const std::vector<float> got_gathered = attend_with("MOEX_CUDA_PREFILL_KV_BF16", "0");
  EXPECT_EQ(std::memcmp(got.data(), got_gathered.data(), got.size() * sizeof(float)), 0)
      << "dense bf16 K/V and the gathered fp32 pages differ";

  // kv_write: exactly the step's rows changed, bit for bit.
  std::vector<float> k_after(d.k_pool.size()), v_after(d.v_pool.size());
  backend->copy_to_host(kp->view, k_after.data());
  backend->copy_to_host(vp->view, v_after.data());
  int64_t bad = 0;
  for (size_t i = 0; i < k_after.size(); ++i) {
    auto same = [](float a, float b) { return std::isnan(b) ? std::isnan(a) : std::memcmp(&a, &b, 4) == 0; };
    if (!same(k_after[i], d.k_pool_after[i]) || !same(v_after[i], d.v_pool_after[i])) ++bad;
  }
  EXPECT_EQ(bad, 0) << "pool elements differ after kv_write";

  // bf16 inputs on the tensor cores (about 3e-3 measured), fp32 elsewhere.
  // The backend's own test for a prefill chunk (one sequence at consecutive positions), which may run on the
  // tensor cores.
  const bool one_chunk = cuda::rows_form_one_chunk(d.row_seq.data(), d.row_pos.data(), d.n);
  const cuda::AttentionShape shape{d.n, c.heads, c.kv_heads, c.head_dim, 0, one_chunk};
  const double tol = cuda::attention_rounds_to_bf16(shape) ? 1e-2 : 1e-5;
  // Batch-1 rows at a 512- to 2048-key bucket split their keys over a cluster of 16 blocks (on a device that
  // places them: every one these tests target), =8 over one of 8.
  cuda::AttentionShape decode = shape;
  decode.max_keys = d.row_pos.empty() ? 0 : *std::max_element(d.row_pos.begin(), d.row_pos.end()) + 1;
  decode.distinct_sequences = cuda::rows_are_distinct_sequences(d.row_seq.data(), d.n);
  const int64_t group = c.heads / c.kv_heads;
  const bool cluster_expected = d.n == 1 && c.head_dim % 32 == 0 && decode.max_keys > 256 && decode.max_keys <= 2048 &&
                                (group == 1 || group == 2 || group == 4 || group == 8);
  EXPECT_EQ(cuda::attention_cluster_splits(decode, 132), cluster_expected ? 16 : 0);
  {
    const test::ScopedEnv eight("MOEX_CUDA_ATTENTION_CLUSTER", "8");
    EXPECT_EQ(cuda::attention_cluster_splits(decode, 132), cluster_expected ? 8 : 0);
  }
  MOEX_EXPECT_CLOSE(got, d.ref, tol);
  MOEX_EXPECT_CLOSE(got_key_lanes, d.ref, tol);
  MOEX_EXPECT_CLOSE(got_no_cluster, d.ref, tol);
  MOEX_EXPECT_CLOSE(got_cluster_8, d.ref, tol);
  MOEX_EXPECT_CLOSE(got_wide, d.ref, tol);
  MOEX_EXPECT_CLOSE(got_wide_no_cluster, d.ref, tol);
  if (tol > 1e-5) std::printf("[tensor cores] %s: relative error %.2g\n", c.str().c_str(), relative_error(got, d.ref));
  // The CPU backend on the same step: the same answer up to fp32 summation order (or bf16 rounding).
  auto cpu = make_cpu_backend(2);
  std::vector<float> cpu_out(d.q.size());
  cpu->attention(step, TensorView(d.q.data(), DType::kF32, q_shape),
                 TensorView(d.k_pool_after.data(), DType::kF32, pool),
                 TensorView(d.v_pool_after.data(), DType::kF32, pool), scale,
                 TensorView(cpu_out.data(), DType::kF32, q_shape));
  MOEX_EXPECT_CLOSE(got, std::vector<double>(cpu_out.begin(), cpu_out.end()), tol);
}

// qk_norm_rope_kv_write (the rotation writes the cache in the same kernel) against qk_norm_rope then
// kv_write: the same pools and q, bit for bit, with and without per-head norms.
TEST_P(CudaPagedAttention, FusedRopeKvWriteMatchesSeparateOps) {
  MOEX_CUDA_BACKEND_OR_SKIP(backend);
  const test::PagedCase c = cuda_cases()[GetParam()];
  SCOPED_TRACE(c.str());
  test::PagedData d = test::make_paged(c, 2000 + GetParam());
  const Shape pool = d.pool_shape(c), rows_shape{d.n, c.kv_heads, c.head_dim}, q_shape{d.n, c.heads, c.head_dim};
  std::mt19937 rng(static_cast<uint32_t>(GetParam()));
  auto norm = random_floats(rng, static_cast<size_t>(c.head_dim));
  const TensorView norm_d = backend->upload_weight(TensorView(norm.data(), DType::kF32, {c.head_dim}), "norm");
  const KvStep step = d.step();
  const std::vector<int32_t> positions(step.row_pos.begin(), step.row_pos.end());
  for (bool with_norm : {false, true}) {
    SCOPED_TRACE(with_norm ? "per-head norms" : "no norms");
    std::vector<std::vector<float>> pools[2], qs;
    for (bool fused : {false, true}) {
      auto kp = backend->alloc(DType::kF32, pool), vp = backend->alloc(DType::kF32, pool);
      backend->copy_from_host(d.k_pool.data(), kp->view);
      backend->copy_from_host(d.v_pool.data(), vp->view);
      GuardedTensor kn(*backend, rows_shape), vn(*backend, rows_shape), qd(*backend, q_shape);
      kn.fill(d.k_new);
      vn.fill(d.v_new);
      qd.fill(d.q);
      backend->prepare_kv_step(step);
      const TensorView* qn = with_norm ? &norm_d : nullptr;
      if (fused) {
        backend->qk_norm_rope_kv_write(qd.view(), kn.view(), vn.view(), qn, qn, 1e-6f, positions,
                                       c.head_dim / 2 * 2, 1e4, step, kp->view, vp->view);
      } else {
        backend->qk_norm_rope(qd.view(), kn.view(), qn, qn, 1e-6f, positions, c.head_dim / 2 * 2, 1e4);
        backend->kv_write(step, kn.view(), vn.view(), kp->view, vp->view);
      }
      std::vector<float> k_after(d.k_pool.size()), v_after(d.v_pool.size());
      backend->copy_to_host(kp->view, k_after.data());
      backend->copy_to_host(vp->view, v_after.data());
      pools[fused] = {k_after, v_after};
      qs.push_back(qd.read());
    }
    auto same = [](float a, float b) { return std::isnan(b) ? std::isnan(a) : std::memcmp(&a, &b, 4) == 0; };
    for (int which = 0; which < 2; ++which) {
      int64_t bad = 0;
      for (size_t i = 0; i < pools[0][which].size(); ++i) bad += !same(pools[1][which][i], pools[0][which][i]);
      EXPECT_EQ(bad, 0) << (which ? "v" : "k") << " pool elements differ";
    }
    for (size_t i = 0; i < qs[0].size(); ++i) ASSERT_TRUE(same(qs[1][i], qs[0][i])) << "q element " << i;
  }
}

// rope_kv_attention with the RoPE inside the decode attention kernel (the default) against the separate ops
// (MOEX_CUDA_FUSED_ROPE=0: qk_norm_rope_kv_write, then attention): the kernel rotates with the same arithmetic, so
// the attention output and both pools must match bit for bit; with and without per-head norms (fp32 and bf16,
// different weights for q and k), full and partial rotation. Shapes the decode kernel does not take fall back to
// the separate ops. Both decode kernels hold the prologue: the dims-per-lane kernel (rows of distinct sequences)
// and the key-per-lane one (MOEX_CUDA_ATTENTION_KEY_LANES=1, read at every launch); each is compared with the
// separate ops on the same kernel.
TEST_P(CudaPagedAttention, RopeInsideAttentionMatchesSeparateOps) {
  MOEX_CUDA_BACKEND_OR_SKIP(fused);
  std::unique_ptr<Backend> separate;
  {
    const test::ScopedEnv off("MOEX_CUDA_FUSED_ROPE", "0");
    separate = make_cuda_backend(0);
  }
  for (const char* key_lanes : {"1", "0", "wide"}) {  // wide: the dims-per-lane kernel with blocks of 8 warps
    SCOPED_TRACE(testing::Message() << "MOEX_CUDA_ATTENTION_KEY_LANES=" << key_lanes);
    const bool wide = std::string(key_lanes) == "wide";
    const test::ScopedEnv kernel("MOEX_CUDA_ATTENTION_KEY_LANES", wide ? "0" : key_lanes);
    const test::ScopedEnv warps("MOEX_CUDA_ATTENTION_WARPS", wide ? "8" : nullptr);
    const test::PagedCase c = cuda_cases()[GetParam()];
    SCOPED_TRACE(c.str());
    test::PagedData d = test::make_paged(c, 3000 + GetParam());
    const Shape pool = d.pool_shape(c), rows_shape{d.n, c.kv_heads, c.head_dim}, q_shape{d.n, c.heads, c.head_dim};
    std::mt19937 rng(static_cast<uint32_t>(7 + GetParam()));
    auto q_norm = random_floats(rng, static_cast<size_t>(c.head_dim));
    auto k_norm = random_floats(rng, static_cast<size_t>(c.head_dim));
    Bf16Weight q_norm_bf16 = random_bf16(rng, Shape{c.head_dim}, 1.f);
    Bf16Weight k_norm_bf16 = random_bf16(rng, Shape{c.head_dim}, 1.f);
    const KvStep step = d.step();
    const std::vector<int32_t> positions(step.row_pos.begin(), step.row_pos.end());
    const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(c.head_dim)));
    const bool one_chunk = cuda::rows_form_one_chunk(d.row_seq.data(), d.row_pos.data(), d.n);
    const bool distinct = cuda::rows_are_distinct_sequences(d.row_seq.data(), d.n);
    const cuda::AttentionShape shape{d.n, c.heads, c.kv_heads, c.head_dim, 0, one_chunk, distinct};
    auto same = [](float a, float b) { return std::isnan(b) ? std::isnan(a) : std::memcmp(&a, &b, 4) == 0; };
    for (int norms : {0, 1, 2}) {  // none, fp32, bf16
      for (int64_t rotary : {c.head_dim / 2 * 2, c.head_dim / 4 * 2}) {
        SCOPED_TRACE(testing::Message() << "norms " << norms << " rotary_dim " << rotary << " (kernel takes it: "
                                        << cuda::decode_rope_fits(shape, rotary) << ")");
        std::vector<float> outs[2], pools[2][2];
        for (bool in_kernel : {false, true}) {
          Backend& b = in_kernel ? *fused : *separate;
          auto upload = [&](std::vector<float>& fp32, Bf16Weight& bf16) {
            return norms == 2 ? b.upload_weight(bf16.host_view(), "n")
                              : b.upload_weight(TensorView(fp32.data(), DType::kF32, {c.head_dim}), "n");
          };
          const TensorView q_norm_d = upload(q_norm, q_norm_bf16), k_norm_d = upload(k_norm, k_norm_bf16);
          auto kp = b.alloc(DType::kF32, pool), vp = b.alloc(DType::kF32, pool);
          b.copy_from_host(d.k_pool.data(), kp->view);
          b.copy_from_host(d.v_pool.data(), vp->view);
          GuardedTensor kn(b, rows_shape), vn(b, rows_shape), qd(b, q_shape), od(b, q_shape);
          kn.fill(d.k_new);
          vn.fill(d.v_new);
          qd.fill(d.q);
          b.prepare_kv_step(step);
          b.rope_kv_attention(qd.view(), kn.view(), vn.view(), norms ? &q_norm_d : nullptr, norms ? &k_norm_d : nullptr,
                              1e-6f, positions, rotary, 1e4, step, kp->view, vp->view, scale, od.view());
          outs[in_kernel] = od.read();
          pools[in_kernel][0].resize(d.k_pool.size());
          pools[in_kernel][1].resize(d.v_pool.size());
          b.copy_to_host(kp->view, pools[in_kernel][0].data());
          b.copy_to_host(vp->view, pools[in_kernel][1].data());
        }
        for (size_t i = 0; i < outs[0].size(); ++i) ASSERT_TRUE(same(outs[1][i], outs[0][i])) << "out element " << i;
        for (int which = 0; which < 2; ++which) {
          int64_t bad = 0;
          for (size_t i = 0; i < pools[0][which].size(); ++i) bad += !same(pools[1][which][i], pools[0][which][i]);
          EXPECT_EQ(bad, 0) << (which ? "v" : "k") << " pool elements differ";
        }
      }
    }
  }
}

// Host logic, no device needed: which steps may read earlier keys before the PDL wait.
TEST(CudaAttentionRows, DistinctSequencesHaveNoSequenceTwice) {
  const int32_t distinct[] = {3, 0, 2, 1}, repeated[] = {3, 0, 3};
  EXPECT_TRUE(cuda::rows_are_distinct_sequences(distinct, 4));
  EXPECT_TRUE(cuda::rows_are_distinct_sequences(repeated, 2));
  EXPECT_FALSE(cuda::rows_are_distinct_sequences(repeated, 3));
  EXPECT_TRUE(cuda::rows_are_distinct_sequences(repeated, 0));
}

// Host logic, no device needed: what the backend treats as a prefill chunk.
TEST(CudaAttentionRows, OneChunkIsOneSequenceAtConsecutivePositions) {
  const int32_t seq[] = {2, 2, 2}, pos[] = {5, 6, 7}, gap[] = {5, 7, 8}, mixed[] = {2, 3, 2};
  EXPECT_TRUE(cuda::rows_form_one_chunk(seq, pos, 3));
  EXPECT_TRUE(cuda::rows_form_one_chunk(seq, gap, 1));  // a single row
  EXPECT_FALSE(cuda::rows_form_one_chunk(seq, gap, 3));
  EXPECT_FALSE(cuda::rows_form_one_chunk(mixed, pos, 3));
}

// Host logic, no device needed: batch-1 decode blocks of 8 warps where the normed q/k/v GEMV's grid leaves a half SM
// for each of them (attention.cu, wide_decode_heads), 4 elsewhere. On 132 SMs Model A's q/k/v (4096 rows) leave 8
// halves, room for its 16 kv-head blocks only at two heads a block; Model B's (5120 rows) 50 for its 32.
TEST(CudaAttentionRows, WideDecodeBlocksWhereTheQkvGridLeavesRoom) {
  const test::ScopedEnv cluster("MOEX_CUDA_ATTENTION_CLUSTER", "0");  // same answer with or without a device
  cuda::AttentionShape model_a{1, 16, 8, 128, 256, false, true}, model_b{1, 32, 4, 128, 256, false, true};
  model_a.free_half_sms = cuda::gemv_normed_free_half_sms(4096, 2048, 132);
  model_b.free_half_sms = cuda::gemv_normed_free_half_sms(5120, 2048, 132);
  EXPECT_EQ(model_a.free_half_sms, 8);
  EXPECT_EQ(model_b.free_half_sms, 50);
  EXPECT_EQ(cuda::attention_decode_warps(model_a, 132), 8);  // two heads a block: 8 blocks
  EXPECT_EQ(cuda::attention_decode_warps(model_b, 132), 8);
  {
    const test::ScopedEnv keep("MOEX_CUDA_ATTENTION_WIDE_REGROUP", "0");  // one head a block: 16 do not fit
    EXPECT_EQ(cuda::attention_decode_warps(model_a, 132), 4);
    EXPECT_EQ(cuda::attention_decode_warps(model_b, 132), 8);
  }
  cuda::AttentionShape unknown = model_b;
  unknown.free_half_sms = 0;  // no normed GEMV just before
  EXPECT_EQ(cuda::attention_decode_warps(unknown, 132), 4);
  cuda::AttentionShape prefill = model_b;
  prefill.num_queries = 512;
  prefill.one_sequence = true;
  prefill.distinct_sequences = false;
  EXPECT_EQ(cuda::attention_decode_warps(prefill, 132), 0);  // the tensor-core prefill kernel
  {
    const test::ScopedEnv eight("MOEX_CUDA_ATTENTION_WARPS", "8");
    EXPECT_EQ(cuda::attention_decode_warps(model_a, 132), 8);
    EXPECT_EQ(cuda::attention_decode_warps(unknown, 132), 8);
  }
  {
    const test::ScopedEnv four("MOEX_CUDA_ATTENTION_WARPS", "4");
    EXPECT_EQ(cuda::attention_decode_warps(model_b, 132), 4);
  }
  {
    const test::ScopedEnv key_lanes("MOEX_CUDA_ATTENTION_KEY_LANES", "1");
    EXPECT_EQ(cuda::attention_decode_warps(model_b, 132), 4);  // the key-per-lane kernel keeps 4
  }
}

// Host logic, no device needed: a prefill chunk's workspace holds the dense bf16 K and V after the split partials
// (head_dim % 8 == 0 only; none with MOEX_CUDA_PREFILL_KV_BF16=0); decode rows need none.
TEST(CudaAttentionRows, PrefillWorkspaceHoldsDenseBf16Kv) {
  const cuda::AttentionShape model_b{512, 32, 4, 128, 2048, true, false}, odd{64, 4, 2, 20, 300, true, false};
  const cuda::AttentionShape decode{1, 32, 4, 128, 2048, false, true};
  const size_t dense = 2 * sizeof(uint16_t) * 2048 * 4 * 128;
  size_t gathered = 0, odd_gathered = 0, decode_gathered = 0;
  {
    const test::ScopedEnv gather("MOEX_CUDA_PREFILL_KV_BF16", "0");
    gathered = cuda::attention_workspace_bytes(model_b, 132);
    odd_gathered = cuda::attention_workspace_bytes(odd, 132);
    decode_gathered = cuda::attention_workspace_bytes(decode, 132);
  }
  const size_t with_dense = cuda::attention_workspace_bytes(model_b, 132);
  EXPECT_GE(with_dense, gathered + dense);
  EXPECT_LT(with_dense, gathered + dense + 256);  // the partials rounded up to 256 bytes
  EXPECT_EQ(cuda::attention_workspace_bytes(odd, 132), odd_gathered);
  EXPECT_EQ(cuda::attention_workspace_bytes(decode, 132), decode_gathered);
}

INSTANTIATE_TEST_SUITE_P(Cases, CudaPagedAttention, ::testing::Range(size_t{0}, cuda_cases().size()),
                         [](const auto& info) { return "case" + std::to_string(info.param); });

}  // namespace
}  // namespace moex::cuda_test
