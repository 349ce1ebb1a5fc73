// CUDA dense ops (linear, rms_norm, rope, embedding, elementwise) against double-precision references on
// fresh random data: tiny, odd and real shapes; poisoned outputs with guard margins.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>

#include "cuda_test_util.h"
#include "moex/backend/cuda/cublas_gemm.h"
#include "moex/backend/cuda/kernels/gemm_path.h"
#include "moex/backend/cuda/kernels/moe.cuh"
#include "unit/scoped_env.h"

namespace moex::cuda_test {
namespace {

struct LinearCase {
  int64_t rows, in, out;
  bool bias;
};

// y = x w^T (+ bias) on fresh random data: the weights and bias uploaded, x on the device, the double-precision
// reference.
struct LinearProblem {
  TensorView w, bias;
  std::vector<double> ref;
};

LinearProblem make_linear_problem(Backend& backend, const LinearCase& c, uint32_t seed, GuardedTensor& xd) {
  std::mt19937 rng(seed);
  auto w = random_bf16(rng, {c.out, c.in}, 1.f / std::sqrt(float(c.in)));
  auto x = random_floats(rng, static_cast<size_t>(c.rows * c.in));
  auto bias = random_floats(rng, static_cast<size_t>(c.out));
  LinearProblem p;
  p.w = backend.upload_weight(w.host_view(), "w");
  p.bias = backend.upload_weight(TensorView(bias.data(), DType::kF32, {c.out}), "b");
  xd.fill(x);
  p.ref.resize(static_cast<size_t>(c.rows * c.out));
  for (int64_t r = 0; r < c.rows; ++r)
    for (int64_t o = 0; o < c.out; ++o) {
      double acc = c.bias ? bias[o] : 0.0;
      for (int64_t k = 0; k < c.in; ++k) acc += double(x[r * c.in + k]) * w.values[o * c.in + k];
      p.ref[r * c.out + o] = acc;
    }
  return p;
}

class CudaLinear : public ::testing::TestWithParam<LinearCase> {};

TEST_P(CudaLinear, MatchesReference) {
  MOEX_CUDA_BACKEND_OR_SKIP(backend);
  const LinearCase c = GetParam();
  SCOPED_TRACE(testing::Message() << "linear(rows=" << c.rows << ",in=" << c.in << ",out=" << c.out << ")");
  GuardedTensor xd(*backend, {c.rows, c.in}), yd(*backend, {c.rows, c.out});
  const LinearProblem p =
      make_linear_problem(*backend, c, static_cast<uint32_t>(c.rows * 131 + c.in * 7 + c.out), xd);
  // The GEMM's tiles (128 or 64 rows) run on the wgmma kernel on an H100/H200, on the mma.sync kernel with
  // MOEX_CUDA_WGMMA=0 (and elsewhere): both are checked.
  for (const char* wgmma : {"1", "0"}) {
    SCOPED_TRACE(testing::Message() << "MOEX_CUDA_WGMMA=" << wgmma);
    const test::ScopedEnv kernel("MOEX_CUDA_WGMMA", wgmma);
    yd.fill(std::vector<float>(static_cast<size_t>(c.rows * c.out), std::nanf("")));
    backend->linear(xd.view(), p.w, c.bias ? &p.bias : nullptr, yd.view());
    // rows > 32 take the tensor-core path, which rounds x to bf16 (about 2^-9 per element).
    MOEX_EXPECT_CLOSE(yd.read(), p.ref, c.rows > 32 ? 1e-2 : 1e-5);
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, CudaLinear,
                         ::testing::Values(LinearCase{1, 64, 32, false}, LinearCase{3, 136, 7, true},
                                           LinearCase{7, 256, 31, false}, LinearCase{31, 128, 129, true},
                                           LinearCase{129, 200, 64, false}, LinearCase{3, 31, 5, true},
                                           LinearCase{9, 36, 10, false},
                                           // Model A (Mixtral-shaped 2.45B): q proj, kv proj, router
                                           LinearCase{1, 2048, 2048, false}, LinearCase{1, 2048, 1024, false},
                                           LinearCase{1, 2048, 8, false},
                                           // Model B (Qwen3-30B-A3B shape): q proj 32x128 heads; prefill tile
                                           LinearCase{4, 2048, 4096, false}, LinearCase{8, 4096, 2048, true},
                                           LinearCase{129, 2048, 512, true},
                                           // one row wider than 2048: whole rows before the wait (Model B's
                                           // o_proj; a small grid) and 8 loads a lane (the 8x7B o_proj's 512 blocks)
                                           LinearCase{1, 4096, 2048, false}, LinearCase{1, 3000, 100, true},
                                           LinearCase{1, 4096, 4096, false},
                                           // enough row and column tiles for the GEMM's 128-row tiles; odd N
                                           LinearCase{1100, 72, 4001, true},
                                           // 17 x 33 blocks of 128-row tiles, partial in rows and columns
                                           LinearCase{2100, 64, 8200, true},
                                           // 32 k tiles (the stages wrap many times); K not a multiple of 64
                                           LinearCase{384, 2048, 520, false}, LinearCase{260, 200, 300, true},
                                           // narrow GEMMs whose K is split over blocks: Model B's and Model A's
                                           // routers at prefill (5 and 8 chunks on 132 SMs); K = 1000 in chunks of
                                           // 384, 384 and 232
                                           LinearCase{2048, 2048, 128, false}, LinearCase{512, 2048, 8, true},
                                           LinearCase{100, 1000, 40, true}));

// 2-32 rows: the row-split tensor-core kernel (mma_rows.cuh) and, with MOEX_CUDA_MMA_ROWS=0, the 16-row one
// (mma_core.cuh), against a double-precision reference. The shapes reach each part of the row-split kernel: one
// block without a split, K split over clusters of 2-8 blocks, activations staged in two chunks (27 tokens, 22 k
// blocks a split), a last tile with one warp's rows, rows not a multiple of 16, every n-tile count; and with the
// switch unset, the default's choice for each (an MoE router's 8 rows among them).
TEST(CudaFewTokenLinear, RowSplitAndSixteenRowKernelsMatchReference) {
  MOEX_CUDA_BACKEND_OR_SKIP(backend);
  for (const LinearCase c : {LinearCase{2, 64, 16, false}, LinearCase{13, 4096, 128, true},
                             LinearCase{27, 5632, 2048, false}, LinearCase{9, 1024, 1040, true},
                             LinearCase{5, 256, 100, true}, LinearCase{32, 2048, 4000, false},
                             LinearCase{20, 2048, 512, true}, LinearCase{32, 2048, 8, false}}) {
    SCOPED_TRACE(testing::Message() << "linear(rows=" << c.rows << ",in=" << c.in << ",out=" << c.out << ")");
    GuardedTensor xd(*backend, {c.rows, c.in}), yd(*backend, {c.rows, c.out});
    const LinearProblem p =
        make_linear_problem(*backend, c, static_cast<uint32_t>(c.rows * 17 + c.in * 3 + c.out), xd);
    for (const char* rows : {"1", "0", static_cast<const char*>(nullptr)}) {
      SCOPED_TRACE(testing::Message() << "MOEX_CUDA_MMA_ROWS=" << (rows ? rows : "(unset)"));
      const test::ScopedEnv kernel("MOEX_CUDA_MMA_ROWS", rows);
      yd.fill(std::vector<float>(static_cast<size_t>(c.rows * c.out), std::nanf("")));
      backend->linear(xd.view(), p.w, c.bias ? &p.bias : nullptr, yd.view());
      const auto y = yd.read();
      MOEX_EXPECT_CLOSE(y, p.ref, 1e-5);
      // The row-split kernel's staging one load at a time (MOEX_CUDA_ROWS_STAGE_LOADS=1): the same bits.
      const test::ScopedEnv one("MOEX_CUDA_ROWS_STAGE_LOADS", "1");
      yd.fill(std::vector<float>(static_cast<size_t>(c.rows * c.out), std::nanf("")));
      backend->linear(xd.view(), p.w, c.bias ? &p.bias : nullptr, yd.view());
      const auto single = yd.read();
      ASSERT_EQ(0, std::memcmp(single.data(), y.data(), y.size() * sizeof(float))) << "staging one load at a time";
    }
  }
}

// cuBLAS (the dense GEMMs' default) loads from where MOEX_CUBLAS_LIBRARY says, or from the loader's path and the
// toolkit's directory: a skip, with the reason, where it does not (CudaLinearMany then checks only moex's own GEMMs).
TEST(CudaCublas, LoadsWhereTheToolkitIs) {
  MOEX_CUDA_BACKEND_OR_SKIP(backend);
  std::string why_not;
  const auto blas = cuda::CublasGemm::open(&why_not);
  if (!blas) GTEST_SKIP() << why_not;
  EXPECT_FALSE(blas->library().empty());
}

// What it says where the library is not cuBLAS or not there (no GPU needed).
TEST(CudaCublas, ABadLibraryIsNamed) {
  std::string why_not;
  {
    const test::ScopedEnv path("MOEX_CUBLAS_LIBRARY", "/nonexistent/libcublas.so.13");
    EXPECT_EQ(cuda::CublasGemm::open(&why_not), nullptr);
    EXPECT_NE(why_not.find("cannot load cuBLAS"), std::string::npos) << why_not;
    EXPECT_NE(why_not.find("/nonexistent/libcublas.so.13"), std::string::npos) << why_not;
  }
  const test::ScopedEnv path("MOEX_CUBLAS_LIBRARY", "libc.so.6");
  EXPECT_EQ(cuda::CublasGemm::open(&why_not), nullptr);
  EXPECT_NE(why_not.find("has no cublasCreate_v2"), std::string::npos) << why_not;
}

// The narrow GEMMs above take the split path (its scratch is sized), the q/k/v-sized ones do not.
TEST(CudaGemm, NarrowGemmsSplitK) {
  MOEX_CUDA_BACKEND_OR_SKIP(backend);
  int device = 0, sms = 0;
  ASSERT_EQ(cudaGetDevice(&device), cudaSuccess);
  ASSERT_EQ(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), cudaSuccess);
  if (sms < 8) GTEST_SKIP() << "too few SMs for the cases' block counts";
  EXPECT_GT(cuda::dense_gemm_split_floats(2048, 2048, 128, sms), 0u);
  EXPECT_GT(cuda::dense_gemm_split_floats(512, 2048, 8, sms), 0u);
  EXPECT_GT(cuda::dense_gemm_split_floats(100, 1000, 40, sms), 0u);
  EXPECT_EQ(cuda::dense_gemm_split_floats(2048, 2048, 4096, sms), 0u);
  EXPECT_EQ(cuda::dense_gemm_split_floats(2048, 256, 128, sms), 0u);  // K too short to split
}

// On an H100/H200 the GEMM's tiles must take the wgmma kernel (a build for sm_90a alone), or the cases above
// would check the mma.sync kernel twice.
TEST(CudaGemm, WgmmaTakesTheTilesOnHopper) {
  MOEX_CUDA_BACKEND_OR_SKIP(backend);
  int device = 0, major = 0, minor = 0;
  ASSERT_EQ(cudaGetDevice(&device), cudaSuccess);
  ASSERT_EQ(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), cudaSuccess);
  ASSERT_EQ(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device), cudaSuccess);
#if defined(MOEX_CUDA_SM90A)
  const bool expected = major == 9 && minor == 0;
#else
  const bool expected = false;
#endif
  EXPECT_EQ(cuda::gemm_wgmma_available(128), expected);
  EXPECT_EQ(cuda::gemm_wgmma_available(64), expected);
  EXPECT_FALSE(cuda::gemm_wgmma_available(32));
  {
    const test::ScopedEnv large_only("MOEX_CUDA_WGMMA", "128");
    EXPECT_EQ(cuda::gemm_wgmma_available(128), expected);
    EXPECT_FALSE(cuda::gemm_wgmma_available(64));
  }
  const test::ScopedEnv off("MOEX_CUDA_WGMMA", "0");
  EXPECT_FALSE(cuda::gemm_wgmma_available(128));
  EXPECT_FALSE(cuda::gemm_wgmma_available(64));
}

TEST(CudaRmsNorm, MatchesReference) {
  MOEX_CUDA_BACKEND_OR_SKIP(backend);
  for (int64_t rows : {1, 3, 7, 31, 129}) {
    for (int64_t cols : {31, 64, 2048}) {
      for (bool bf16_weight : {false, true}) {
        std::mt19937 rng(static_cast<uint32_t>(rows * 1000 + cols));
        SCOPED_TRACE(testing::Message() << "rms_norm(rows=" << rows << ",cols=" << cols << ",bf16_w=" << bf16_weight << ")");
        auto x = random_floats(rng, static_cast<size_t>(rows * cols), 3.f);
        auto wb = random_bf16(rng, {cols}, 1.f);
        TensorView wd = bf16_weight ? backend->upload_weight(TensorView(wb.values.data(), DType::kF32, {cols, 1}), "w")
                                             .reshape({cols})
                                    : backend->upload_weight(TensorView(wb.values.data(), DType::kF32, {cols}), "w");
        GuardedTensor xd(*backend, {rows, cols}), yd(*backend, {rows, cols});
        xd.fill(x);
        backend->rms_norm(xd.view(), wd, 1e-6f, yd.view());
        std::vector<double> ref(x.size());
        for (int64_t r = 0; r < rows; ++r) {
          double ss = 0;
          for (int64_t c = 0; c < cols; ++c) ss += double(x[r * cols + c]) * x[r * cols + c];
          double inv = 1.0 / std::sqrt(ss / cols + 1e-6);
          for (int64_t c = 0; c < cols; ++c) ref[r * cols + c] = x[r * cols + c] * inv * wb.values[c];
        }
        MOEX_EXPECT_CLOSE(yd.read(), ref, 1e-6);
        // In place.
        backend->rms_norm(xd.view(), wd, 1e-6f, xd.view());
        MOEX_EXPECT_CLOSE(xd.read(), ref, 1e-6);
      }
    }
  }
}

TEST(CudaElementwise, AddClampSiluMulSigmoidGate) {
  MOEX_CUDA_BACKEND_OR_SKIP(backend);
  for (int64_t rows : {1, 3, 129}) {
    const int64_t cols = 37;
    const size_t n = static_cast<size_t>(rows * cols);
    std::mt19937 rng(static_cast<uint32_t>(rows));
    SCOPED_TRACE(testing::Message() << "rows=" << rows);
    auto a = random_floats(rng, n, 2.f), b = random_floats(rng, n, 2.f), g = random_floats(rng, rows, 2.f);
    GuardedTensor ad(*backend, {rows, cols}), bd(*backend, {rows, cols}), od(*backend, {rows, cols}),
        gd(*backend, {rows, 1});
    ad.fill(a);
    bd.fill(b);
    gd.fill(g);
    std::vector<double> ref(n);

    backend->add(ad.view(), bd.view(), od.view());
    for (size_t i = 0; i < n; ++i) ref[i] = double(a[i]) + b[i];
    MOEX_EXPECT_CLOSE(od.read(), ref, 1e-7);

    backend->silu_mul(ad.view(), bd.view(), od.view());
    for (size_t i = 0; i < n; ++i) ref[i] = a[i] / (1.0 + std::exp(-double(a[i]))) * b[i];
    MOEX_EXPECT_CLOSE(od.read(), ref, 1e-6);

    backend->add_sigmoid_gated(od.view(), bd.view(), gd.view());
    for (size_t i = 0; i < n; ++i) ref[i] += 1.0 / (1.0 + std::exp(-double(g[i / cols]))) * b[i];
    MOEX_EXPECT_CLOSE(od.read(), ref, 1e-6);

    backend->clamp(ad.view(), 1.5f);
    for (size_t i = 0; i < n; ++i) ref[i] = std::min(1.5, std::max(-1.5, double(a[i])));
    MOEX_EXPECT_CLOSE(ad.read(), ref, 1e-7);
  }
}

// Both placements of the table: uploaded, and in mapped host memory (map_host_weight: offloading keeps an untied
// embedding there), whose view points at host memory that the kernel reads over the bus.
TEST(CudaEmbedding, GathersRows) {
  MOEX_CUDA_BACKEND_OR_SKIP(backend);
  std::mt19937 rng(7);
  const int64_t vocab = 1000, hidden = 72;
  auto table = random_bf16(rng, {vocab, hidden}, 1.f);
  for (const bool mapped : {false, true}) {
    SCOPED_TRACE(mapped ? "mapped host memory" : "uploaded");
    TensorView td = mapped ? backend->map_host_weight(table.host_view(), "embed")
                           : backend->upload_weight(table.host_view(), "embed");
    if (mapped) {
      cudaPointerAttributes attributes{};
      ASSERT_EQ(cudaPointerGetAttributes(&attributes, td.data), cudaSuccess);
      EXPECT_EQ(attributes.type, cudaMemoryTypeHost);
    }
    for (int64_t n : {1, 3, 7, 31, 129}) {
      std::vector<int32_t> ids(static_cast<size_t>(n));
      for (auto& id : ids) id = static_cast<int32_t>(rng() % vocab);
      ids[0] = static_cast<int32_t>(vocab - 1);
      GuardedTensor od(*backend, {n, hidden});
      backend->embedding(ids, td, od.view());
      std::vector<double> ref(static_cast<size_t>(n * hidden));
      for (int64_t i = 0; i < n; ++i)
        for (int64_t c = 0; c < hidden; ++c) ref[i * hidden + c] = table.values[ids[i] * hidden + c];
      MOEX_EXPECT_CLOSE(od.read(), ref, 1e-12);
    }
  }
}

struct RopeCase {
  int64_t n, heads, head_dim, rotary_dim;
  double theta;
};

TEST(CudaRope, MatchesReference) {
  MOEX_CUDA_BACKEND_OR_SKIP(backend);
  for (RopeCase c : {RopeCase{1, 16, 128, 128, 1e6}, RopeCase{3, 8, 64, 32, 10000.0}, RopeCase{7, 2, 16, 16, 500.0},
                     RopeCase{129, 4, 128, 128, 1e6}}) {
    std::mt19937 rng(static_cast<uint32_t>(c.n + c.head_dim));
    SCOPED_TRACE(testing::Message() << "rope(n=" << c.n << ",heads=" << c.heads << ",d=" << c.head_dim << ",rot="
                                    << c.rotary_dim << ")");
    auto x = random_floats(rng, static_cast<size_t>(c.n * c.heads * c.head_dim));
    std::vector<int32_t> pos(static_cast<size_t>(c.n));
    for (auto& p : pos) p = static_cast<int32_t>(rng() % 4096);
    GuardedTensor xd(*backend, {c.n, c.heads, c.head_dim});
    xd.fill(x);
    backend->rope(xd.view(), pos, c.rotary_dim, c.theta);
    std::vector<double> ref(x.begin(), x.end());
    const int64_t half = c.rotary_dim / 2;
    for (int64_t i = 0; i < c.n; ++i)
      for (int64_t h = 0; h < c.heads; ++h)
        for (int64_t d = 0; d < half; ++d) {
          double inv_freq = 1.0 / std::pow(c.theta, double(2 * d) / double(c.rotary_dim));
          double angle = pos[i] * inv_freq;
          size_t base = static_cast<size_t>((i * c.heads + h) * c.head_dim);
          double x1 = x[base + d], x2 = x[base + d + half];
          ref[base + d] = x1 * std::cos(angle) - x2 * std::sin(angle);
          ref[base + d + half] = x2 * std::cos(angle) + x1 * std::sin(angle);
        }
    // fp32 angles at positions up to 4096 carry ~1e-4 rad of rounding, as in the fp32 reference recipe.
    MOEX_EXPECT_CLOSE(xd.read(), ref, 1e-3);
  }
}

}  // namespace
}  // namespace moex::cuda_test
