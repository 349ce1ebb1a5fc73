// The paged KV ops of the CPU backend: kv_write must put each row at its sequence's page and slot and touch
// nothing else; attention must match a double-precision causal GQA reference without reading any slot it
// should not (every unused slot is NaN, every output starts as NaN between guard bytes).
#include <gtest/gtest.h>

#include <cstring>

#include "backend_test_util.h"
#include "moex/backend/cpu/cpu_backend.h"
#include "paged_kv_case.h"

namespace moex {
namespace {

using test::GuardedF32;

// Bitwise equality, so that a NaN slot must stay NaN and a written slot must hold exactly the row.
void expect_same_bits(const std::vector<float>& got, const std::vector<float>& want, const std::string& label) {
  ASSERT_EQ(got.size(), want.size()) << label;
  int64_t bad = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const bool same = std::isnan(want[i]) ? std::isnan(got[i]) : std::memcmp(&got[i], &want[i], 4) == 0;
    if (!same && bad++ < 5) ADD_FAILURE() << label << ": element " << i << " got " << got[i] << " want " << want[i];
  }
  EXPECT_EQ(bad, 0) << label;
}

TEST(CpuPagedKv, WriteThenAttendMatchesReference) {
  uint64_t seed = 800;
  for (const test::PagedCase& c : test::paged_cases()) {
    for (int threads : {1, 3}) {
      auto backend = make_cpu_backend(threads);
      const std::string label = fmt::format("{} threads={} seed={}", c.str(), threads, ++seed);
      test::PagedData d = test::make_paged(c, seed);
      std::vector<float> k_pool = d.k_pool, v_pool = d.v_pool;
      const Shape pool_shape = d.pool_shape(c);
      const TensorView k_pages(k_pool.data(), DType::kF32, pool_shape), v_pages(v_pool.data(), DType::kF32, pool_shape);
      const KvStep step = d.step();
      backend->prepare_kv_step(step);
      backend->kv_write(step, TensorView(d.k_new.data(), DType::kF32, Shape{d.n, c.kv_heads, c.head_dim}),
                        TensorView(d.v_new.data(), DType::kF32, Shape{d.n, c.kv_heads, c.head_dim}), k_pages, v_pages);
      expect_same_bits(k_pool, d.k_pool_after, label + " k pages");
      expect_same_bits(v_pool, d.v_pool_after, label + " v pages");
      GuardedF32 out({d.n, c.heads, c.head_dim});
      backend->attention(step, TensorView(d.q.data(), DType::kF32, Shape{d.n, c.heads, c.head_dim}), k_pages, v_pages,
                         static_cast<float>(1.0 / std::sqrt(static_cast<double>(c.head_dim))), out.view());
      test::expect_close(out, d.ref, d.tol, label);
    }
  }
}

// The same rows split into one step per sequence give bit-identical outputs: a row's result does not depend on
// which other sequences share its step.
TEST(CpuPagedKv, BatchedRowsEqualRowsAlone) {
  const test::PagedCase c{16, 8, 128, 16, {130, 3, 47, 64}, {1, 1, 1, 1}};
  test::PagedData d = test::make_paged(c, 900);
  auto backend = make_cpu_backend(2);
  const Shape pool_shape = d.pool_shape(c);
  std::vector<float> k_pool = d.k_pool_after, v_pool = d.v_pool_after;
  const TensorView k_pages(k_pool.data(), DType::kF32, pool_shape), v_pages(v_pool.data(), DType::kF32, pool_shape);
  const float scale = static_cast<float>(1.0 / std::sqrt(128.0));
  GuardedF32 together({d.n, c.heads, c.head_dim});
  backend->attention(d.step(), TensorView(d.q.data(), DType::kF32, Shape{d.n, c.heads, c.head_dim}), k_pages, v_pages,
                     scale, together.view());
  const int64_t row_floats = c.heads * c.head_dim;
  for (int64_t row = 0; row < d.n; ++row) {
    const int32_t seq = 0, pos = d.row_pos[row];
    const std::vector<int32_t> table(d.tables.begin() + d.row_seq[row] * d.stride,
                                     d.tables.begin() + (d.row_seq[row] + 1) * d.stride);
    const KvStep alone{std::span<const int32_t>(&seq, 1), std::span<const int32_t>(&pos, 1), table, d.stride,
                       c.page_size};
    GuardedF32 out({1, c.heads, c.head_dim});
    backend->attention(alone, TensorView(d.q.data() + row * row_floats, DType::kF32, Shape{1, c.heads, c.head_dim}),
                       k_pages, v_pages, scale, out.view());
    for (int64_t i = 0; i < row_floats; ++i)
      ASSERT_EQ(out[i], together[row * row_floats + i]) << "row " << row << " element " << i;
  }
}

}  // namespace
}  // namespace moex
