// The 12-bit packing of bf16 matrices: exact round trips (normal weights, every bit pattern, odd widths, row
// ranges), the size it reaches on weight-like data, and the corruptions packed_bf16_error() must name.
#include "moex/core/packed_bf16.h"

#include <cmath>
#include <random>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include "moex/core/dtype.h"
#include "moex/core/thread_pool.h"

namespace moex {
namespace {

std::vector<uint16_t> normal_bf16(int64_t n, float std, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.f, std);
  std::vector<uint16_t> w(static_cast<size_t>(n));
  for (auto& v : w) v = f32_to_bf16(normal(rng));
  return w;
}

std::vector<uint16_t> unpack_all(const PackedBf16& p) {
  std::vector<uint16_t> out(static_cast<size_t>(p.rows * p.cols), 0xdead);
  unpack_bf16_rows(p, 0, p.rows, out.data());
  return out;
}

TEST(PackedBf16, NormalWeightsRoundTripInThreeQuartersOfTheBytes) {
  const int64_t rows = 64, cols = 4096;
  const auto w = normal_bf16(rows * cols, 1.f / 64, 1);
  const PackedBf16 p = pack_bf16(w.data(), rows, cols);
  EXPECT_EQ(packed_bf16_error(p), "");
  EXPECT_EQ(unpack_all(p), w);
  EXPECT_LT(static_cast<double>(p.exc_col.size()) / w.size(), 1e-3);
  // 0.75 for the byte and the code, 4 bytes of exception index a row, ~4 bytes an exception.
  EXPECT_LT(static_cast<double>(p.bytes()) / (2.0 * w.size()), 0.752);
}

// All 65536 bit patterns (NaNs, infinities, subnormals, both zeros): most exponents are exceptions.
TEST(PackedBf16, EveryBitPatternRoundTrips) {
  std::vector<uint16_t> w(65536);
  for (size_t i = 0; i < w.size(); ++i) w[i] = static_cast<uint16_t>(i * 40503u);  // a permutation of 0..65535
  const PackedBf16 p = pack_bf16(w.data(), 256, 256);
  EXPECT_EQ(packed_bf16_error(p), "");
  EXPECT_EQ(unpack_all(p), w);
  EXPECT_GT(p.exc_col.size(), w.size() / 2);
}

TEST(PackedBf16, OddWidthsAndRowRanges) {
  for (int64_t cols : {1, 7, 33, 257}) {
    SCOPED_TRACE(cols);
    const int64_t rows = 9;
    auto w = normal_bf16(rows * cols, 1.f, static_cast<uint32_t>(cols));
    w[3] = 0x7fc1;  // a NaN with a payload and an infinity: exceptions in the middle and at the end of rows
    w[static_cast<size_t>(rows * cols - 1)] = 0xff80;
    const PackedBf16 p = pack_bf16(w.data(), rows, cols);
    ASSERT_EQ(packed_bf16_error(p), "");
    EXPECT_EQ(unpack_all(p), w);
    std::vector<uint16_t> part(static_cast<size_t>(3 * cols));
    unpack_bf16_rows(p, 4, 7, part.data());
    EXPECT_EQ(part, std::vector<uint16_t>(w.begin() + 4 * cols, w.begin() + 7 * cols));
  }
  const PackedBf16 empty = pack_bf16(nullptr, 0, 5);
  EXPECT_EQ(packed_bf16_error(empty), "");
}

// Packing row ranges on a pool gives the serial packing, byte for byte (exceptions concatenated in row order), and
// row-range byte counts add up to the whole.
TEST(PackedBf16, PackingOnAPoolEqualsTheSerialPacking) {
  const int64_t rows = 203, cols = 129;
  auto w = normal_bf16(rows * cols, 1.f / 8, 7);
  for (size_t i = 5; i < w.size(); i += 977) w[i] = static_cast<uint16_t>((1 + i / 977) << 7);  // 27 rare exponents
  ThreadPool pool(3);
  const PackedBf16 serial = pack_bf16(w.data(), rows, cols), parallel = pack_bf16(w.data(), rows, cols, &pool);
  ASSERT_GT(serial.exc_col.size(), 10u);
  EXPECT_EQ(parallel.exponent, serial.exponent);
  EXPECT_EQ(parallel.lo, serial.lo);
  EXPECT_EQ(parallel.codes, serial.codes);
  EXPECT_EQ(parallel.exc_begin, serial.exc_begin);
  EXPECT_EQ(parallel.exc_col, serial.exc_col);
  EXPECT_EQ(parallel.exc_value, serial.exc_value);
  EXPECT_EQ(packed_bf16_rows_bytes(serial, 0, 100) + packed_bf16_rows_bytes(serial, 100, rows) - 4,
            packed_bf16_rows_bytes(serial, 0, rows));
  EXPECT_EQ(packed_bf16_rows_bytes(serial, 0, rows), serial.bytes() - 16);  // all but the exponent table
  EXPECT_FALSE(packed_bf16_has_non_finite(serial));
  // Every array starts a page of its own: a backend page-locks them, which must not reach other heap data.
  const PackedBf16& q = parallel;
  for (const void* data : {static_cast<const void*>(q.lo.data()), static_cast<const void*>(q.codes.data()),
                           static_cast<const void*>(q.exc_begin.data()), static_cast<const void*>(q.exc_col.data()),
                           static_cast<const void*>(q.exc_value.data())})
    EXPECT_EQ(reinterpret_cast<uintptr_t>(data) % 4096, 0u);
  w[77] = 0x7f80;  // +Inf: an exception
  EXPECT_TRUE(packed_bf16_has_non_finite(pack_bf16(w.data(), rows, cols)));
  std::vector<uint16_t> nans(64, 0x7fc0);  // NaN everywhere: exponent 255 gets a code
  EXPECT_TRUE(packed_bf16_has_non_finite(pack_bf16(nans.data(), 8, 8)));
}

// What a corrupt or truncated source looks like: each breaks one invariant, and each is named. 40 exponents, so
// 25 of them are exceptions in every row.
TEST(PackedBf16, CorruptionsAreNamed) {
  const int64_t rows = 6, cols = 33;
  std::vector<uint16_t> w(static_cast<size_t>(rows * cols));
  for (size_t i = 0; i < w.size(); ++i)
    w[i] = f32_to_bf16(std::ldexp(1.f + static_cast<float>(i % 7) / 8, static_cast<int>(i * 7 % 40) - 20));
  const PackedBf16 good = pack_bf16(w.data(), rows, cols);
  ASSERT_EQ(packed_bf16_error(good), "");
  ASSERT_EQ(unpack_all(good), w);
  const uint32_t first = good.exc_begin[1];  // row 1's first exception
  ASSERT_GT(good.exc_begin[2], first + 1);
  int64_t plain = 0;  // a column of row 1 that is no exception
  while (good.code(1, plain) == kPackedEscape) ++plain;
  auto broken = [&](auto&& edit) {
    PackedBf16 p = good;
    edit(p);
    return packed_bf16_error(p);
  };
  EXPECT_NE(broken([](PackedBf16& p) { p.lo.pop_back(); }), "");                     // truncated
  EXPECT_NE(broken([](PackedBf16& p) { p.codes.resize(p.codes.size() - 3); }), "");  // truncated codes
  EXPECT_NE(broken([](PackedBf16& p) { p.exc_begin[2] = 0; }), "");                  // index not ascending
  EXPECT_NE(broken([&](PackedBf16& p) { p.exc_col[first] = cols; }), "");            // column past the row
  EXPECT_NE(broken([&](PackedBf16& p) { p.exc_col[first] = static_cast<uint32_t>(plain); }), "");  // no escape there
  EXPECT_NE(broken([&](PackedBf16& p) { std::swap(p.exc_col[first], p.exc_col[first + 1]); }), "");  // out of order
  EXPECT_NE(broken([&](PackedBf16& p) {  // an escape code without its exception
    p.codes[1 * p.code_stride() + plain / 2] |= static_cast<uint8_t>(kPackedEscape << (4 * (plain & 1)));
  }), "");
  EXPECT_NE(broken([&](PackedBf16& p) { p.codes[p.code_stride() - 1] |= 0x10; }), "");  // padding nibble set
  EXPECT_NE(broken([](PackedBf16& p) { p.exponent[kPackedEscape] = 3; }), "");
  EXPECT_NE(broken([](PackedBf16& p) { p.exc_value.pop_back(); }), "");
}

}  // namespace
}  // namespace moex
