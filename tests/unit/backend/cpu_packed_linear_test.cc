// Linear layers over 12-bit packed weights (backend/cpu/packed_linear.h): the vector unpack equals the portable
// one, and every output is bit-identical to linear_block over the unpacked bf16 matrix, for GEMV and GEMM token
// counts, widths with and without a 16-weight tail, exceptions in the rows, and a bias.
#include "moex/backend/cpu/packed_linear.h"

#include <cmath>
#include <cstring>
#include <random>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include "moex/backend/cpu/packed_gemv_avx512.h"

namespace moex::cpu {
namespace {

// Normal weights and, every 13th, an outlier of one of 23 exponents: some of them exceptions.
std::vector<uint16_t> weights(int64_t rows, int64_t cols, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.f, 0.05f);
  std::vector<uint16_t> w(static_cast<size_t>(rows * cols));
  for (auto& v : w) v = f32_to_bf16(normal(rng));
  for (size_t i = 0; i < w.size(); i += 13) w[i] = f32_to_bf16(std::ldexp(1.5f, static_cast<int>(i % 23) - 11));
  return w;
}

TEST(CpuPackedLinear, VectorUnpackMatchesThePortableOne) {
  for (int64_t cols : {16, 33, 4096, 4136}) {
    SCOPED_TRACE(cols);
    const auto w = weights(11, cols, static_cast<uint32_t>(cols));
    const PackedBf16 p = pack_bf16(w.data(), 11, cols);
    ASSERT_GT(p.exc_col.size(), 0u);
    std::vector<uint16_t> got(w.size(), 0xdead), want(w.size(), 0xbeef);
    unpack_rows(p, 0, 11, got.data());
    moex::unpack_bf16_rows(p, 0, 11, want.data());
    EXPECT_EQ(got, want);
    EXPECT_EQ(got, w);
  }
}

// Every test of the GEMV runs with the AVX2 decode and with the AVX-512 one (skipped on CPUs without AVX-512 VBMI,
// such as the CI machine's; the GPU hosts have it), and restores the default.
class CpuPackedGemv : public testing::TestWithParam<bool> {
 protected:
  void SetUp() override {
    if (GetParam() && !packed_avx512_supported()) GTEST_SKIP() << "this CPU has no AVX-512 VBMI";
    ASSERT_TRUE(set_packed_avx512(GetParam()));
  }
  void TearDown() override { set_packed_avx512(packed_avx512_supported()); }
};
INSTANTIATE_TEST_SUITE_P(Decode, CpuPackedGemv, testing::Bool(),
                         [](const testing::TestParamInfo<bool>& info) { return info.param ? "Avx512" : "Avx2"; });

TEST_P(CpuPackedGemv, BitIdenticalToTheUnpackedMatrix) {
  const int64_t rows = 37;
  // 4096: a multiple of 64, the AVX-512 decode's widths, and of the AVX2 decode's 32- and 16-weight steps; 33, 1000
  // and 4136: widths the AVX-512 decode leaves to AVX2, with a 16-weight step (1000, 4136) and an 8-weight tail.
  for (int64_t k : {33, 1000, 4096, 4136}) {
    const auto w = weights(rows, k, static_cast<uint32_t>(k) + 1);
    const PackedBf16 packed = pack_bf16(w.data(), rows, k);
    std::vector<float> bias(static_cast<size_t>(rows));
    for (size_t i = 0; i < bias.size(); ++i) bias[i] = 0.01f * static_cast<float>(i);
    // Without a bias, 1-4 tokens take the GEMV that decodes in registers; with one, and past 4 tokens, the rows are
    // unpacked into scratch first. k = 4096 is a whole number of the GEMV's steps; 4136 and 33 leave tails.
    for (const auto& [m, with_bias] : {std::pair{1, false}, std::pair{2, false}, std::pair{3, false},
                                       std::pair{4, false}, std::pair{1, true}, std::pair{3, true},
                                       std::pair{8, true}, std::pair{40, false}}) {
      SCOPED_TRACE(testing::Message() << "k " << k << " m " << m << (with_bias ? " with bias" : ""));
      std::mt19937 rng(static_cast<uint32_t>(m));
      std::normal_distribution<float> normal(0.f, 1.f);
      std::vector<float> x(static_cast<size_t>(m * k));
      for (auto& v : x) v = normal(rng);
      LinearProblem p;
      p.x = x.data();
      p.ldx = k;
      p.m = m;
      p.k = k;
      p.w = w.data();
      p.w_dtype = DType::kBF16;
      p.bias = with_bias ? bias.data() : nullptr;
      p.ldo = rows;
      std::vector<float> want(static_cast<size_t>(m * rows), NAN), got(want.size(), NAN);
      p.out = want.data();
      linear_block(p, 0, rows, 0, m);
      p.out = got.data();
      p.w = nullptr;  // ignored: the packed matrix is the weight
      packed_linear_block(p, packed, 0, rows, 0, m);
      EXPECT_EQ(std::memcmp(got.data(), want.data(), got.size() * sizeof(float)), 0);
      // A row range on its own (a thread's share) writes those rows only, as linear_block over that range does.
      std::vector<float> part(want.size(), NAN), part_want(want.size(), NAN);
      p.out = part.data();
      packed_linear_block(p, packed, 5, 30, 0, m);
      p.w = w.data();
      p.out = part_want.data();
      linear_block(p, 5, 30, 0, m);
      for (int64_t t = 0; t < m; ++t)
        for (int64_t r = 0; r < rows; ++r) {
          const float v = part[t * rows + r];
          if (r >= 5 && r < 30) EXPECT_EQ(std::memcmp(&v, &part_want[t * rows + r], 4), 0) << t << " " << r;
          else EXPECT_TRUE(std::isnan(v)) << t << " " << r;
        }
    }
  }
}

}  // namespace
}  // namespace moex::cpu
