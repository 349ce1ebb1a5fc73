// linear(): GEMV (n <= 4) and packed GEMM (n > 4) paths against a double-precision reference over
// the exact weight values, for every weight dtype, odd shapes and one real-model GEMV shape.
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "backend_test_util.h"
#include "moex/backend/cpu/cpu_backend.h"

namespace moex {
namespace {

using test::GuardedF32;
using test::RandomTensor;

struct LinearCase {
  int64_t n;
  int64_t in;
  int64_t out;
  DType dtype;
  bool bias;
  std::string str() const {
    return fmt::format("linear(dtype={},n={},in={},out={},bias={})", dtype_name(dtype), n, in, out, bias);
  }
};

void run_linear_case(Backend& backend, const LinearCase& c, uint64_t seed) {
  SCOPED_TRACE(fmt::format("{} seed={} backend={}", c.str(), seed, backend.name()));
  std::mt19937_64 rng(seed);
  RandomTensor x = test::random_tensor(rng, DType::kF32, {c.n, c.in});
  RandomTensor w = test::random_tensor(rng, c.dtype, {c.out, c.in}, 0.05);
  RandomTensor b = test::random_tensor(rng, c.dtype, {c.out});
  GuardedF32 out({c.n, c.out});
  TensorView bias_view = b.view();
  backend.linear(x.view(), w.view(), c.bias ? &bias_view : nullptr, out.view());

  std::vector<double> ref(static_cast<size_t>(c.n * c.out));
  std::vector<double> tol(ref.size());
  for (int64_t t = 0; t < c.n; ++t)
    for (int64_t o = 0; o < c.out; ++o) {
      double sum = 0.0, mass = 0.0;
      for (int64_t k = 0; k < c.in; ++k) {
        double prod = x.values[t * c.in + k] * w.values[o * c.in + k];
        sum += prod;
        mass += std::fabs(prod);
      }
      if (c.bias) {
        sum += b.values[o];
        mass += std::fabs(b.values[o]);
      }
      ref[t * c.out + o] = sum;
      // fp32 accumulation: error grows with the sum of |terms|, far below 1e-5 of it for these sizes.
      tol[t * c.out + o] = 1e-5 * mass + 1e-30;
    }
  test::expect_close(out, ref, tol, c.str() + fmt::format(" seed={}", seed));
}

TEST(CpuLinear, OddShapesAllDtypes) {
  auto backend = make_cpu_backend(2);
  uint64_t seed = 1000;
  for (DType dtype : {DType::kF32, DType::kBF16, DType::kF16})
    for (int64_t n : {1, 2, 3, 4, 5, 7, 31, 129})
      for (int64_t in : {1, 3, 7, 31, 129, 600})
        for (int64_t out : {1, 3, 7, 31, 129}) run_linear_case(*backend, {n, in, out, dtype, (n + in) % 2 == 0}, ++seed);
}

TEST(CpuLinear, BiasAndBlockBoundaries) {
  auto backend = make_cpu_backend(3);
  uint64_t seed = 5000;
  // In-features around 8-wide vectors and panel shapes (32 rows up to K 1024, fewer rows beyond);
  // out-features around the 32-row work unit.
  for (DType dtype : {DType::kF32, DType::kBF16, DType::kF16})
    for (int64_t n : {1, 4, 6, 64, 67})
      for (int64_t in : {8, 511, 1024, 1031, 2816})
        for (int64_t out : {16, 32, 33, 65}) run_linear_case(*backend, {n, in, out, dtype, true}, ++seed);
  // Rows longer than one panel K-block (8192) are split into K-blocks that accumulate.
  for (DType dtype : {DType::kBF16, DType::kF16})
    for (int64_t in : {8191, 8192, 8200, 16390}) run_linear_case(*backend, {7, in, 9, dtype, true}, ++seed);
}

TEST(CpuLinear, RealShapesMixtralFfn) {
  // Mixtral-8x7B expert: hidden 4096 x ffn 14336 (gate/up) as a decode GEMV, and a small prefill.
  auto backend = make_cpu_backend(0);
  run_linear_case(*backend, {1, 4096, 14336, DType::kBF16, false}, 77);
  run_linear_case(*backend, {3, 14336, 512, DType::kF16, false}, 78);
  run_linear_case(*backend, {40, 1024, 2816, DType::kBF16, false}, 79);
}

TEST(CpuLinear, ThreadCountDoesNotChangeBits) {
  std::mt19937_64 rng(42);
  for (int64_t n : {1, 3, 37}) {
    RandomTensor x = test::random_tensor(rng, DType::kF32, {n, 300});
    RandomTensor w = test::random_tensor(rng, DType::kBF16, {70, 300});
    std::vector<std::vector<float>> results;
    for (int threads : {1, 2, 3}) {
      auto backend = make_cpu_backend(threads);
      for (int rep = 0; rep < 2; ++rep) {
        GuardedF32 out({n, 70});
        backend->linear(x.view(), w.view(), nullptr, out.view());
        results.emplace_back(out.data(), out.data() + out.numel());
      }
    }
    for (size_t i = 1; i < results.size(); ++i)
      EXPECT_EQ(0, std::memcmp(results[0].data(), results[i].data(), results[0].size() * 4)) << "n=" << n << " run " << i;
  }
}

TEST(CpuLinear, NaNInInputPropagates) {
  auto backend = make_cpu_backend(2);
  std::mt19937_64 rng(7);
  for (int64_t n : {1, 9}) {
    RandomTensor x = test::random_tensor(rng, DType::kF32, {n, 40});
    RandomTensor w = test::random_tensor(rng, DType::kBF16, {5, 40});
    float nan = std::nanf("");
    std::memcpy(x.bytes.data() + 4 * 13, &nan, 4);  // token 0, feature 13
    GuardedF32 out({n, 5});
    backend->linear(x.view(), w.view(), nullptr, out.view());
    ASSERT_TRUE(out.guards_intact());
    for (int64_t o = 0; o < 5; ++o) EXPECT_TRUE(std::isnan(out[o])) << "n=" << n << " o=" << o;
    for (int64_t i = 5; i < out.numel(); ++i) EXPECT_TRUE(std::isfinite(out[i])) << "n=" << n << " i=" << i;
  }
}

}  // namespace
}  // namespace moex
