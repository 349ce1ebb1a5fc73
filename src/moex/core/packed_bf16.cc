#include "moex/core/packed_bf16.h"

#include <algorithm>
#include <numeric>

#include <fmt/format.h>

#include "moex/core/error.h"

namespace moex {
namespace {

int exponent_of(uint16_t bits) { return (bits >> 7) & 0xff; }
uint8_t lo_of(uint16_t bits) { return static_cast<uint8_t>(((bits >> 8) & 0x80) | (bits & 0x7f)); }

}  // namespace

int64_t PackedBf16::bytes() const {
  return static_cast<int64_t>(lo.size() + codes.size() + 4 * exc_begin.size() + 4 * exc_col.size() +
                              2 * exc_value.size() + exponent.size());
}

PackedBf16 pack_bf16(const uint16_t* w, int64_t rows, int64_t cols) {
  MOEX_ASSERT(rows >= 0 && cols >= 0, "pack_bf16: {} x {}", rows, cols);
  PackedBf16 p;
  p.rows = rows;
  p.cols = cols;
  const int64_t n = rows * cols;
  std::array<int64_t, 256> count{};
  for (int64_t i = 0; i < n; ++i) ++count[exponent_of(w[i])];
  // The 15 most frequent exponents get codes 0..14 (ties by exponent value: deterministic).
  std::array<int, 256> order;
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return count[a] > count[b]; });
  std::array<int, 256> code;
  code.fill(kPackedEscape);
  for (int c = 0; c < kPackedEscape; ++c) {
    p.exponent[c] = static_cast<uint8_t>(order[c]);
    code[order[c]] = c;
  }
  p.lo.resize(static_cast<size_t>(n));
  p.codes.assign(static_cast<size_t>(rows * p.code_stride()), 0);
  p.exc_begin.reserve(static_cast<size_t>(rows + 1));
  p.exc_begin.push_back(0);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 0; i < cols; ++i) {
      const uint16_t v = w[r * cols + i];
      const int c = code[exponent_of(v)];
      p.lo[r * cols + i] = lo_of(v);
      p.codes[r * p.code_stride() + i / 2] |= static_cast<uint8_t>(c << (4 * (i & 1)));
      if (c == kPackedEscape) {
        p.exc_col.push_back(static_cast<uint32_t>(i));
        p.exc_value.push_back(v);
      }
    }
    MOEX_ASSERT(p.exc_col.size() <= UINT32_MAX, "pack_bf16: more than 2^32 exceptions");
    p.exc_begin.push_back(static_cast<uint32_t>(p.exc_col.size()));
  }
  return p;
}

void unpack_bf16_rows(const PackedBf16& p, int64_t row_begin, int64_t row_end, uint16_t* out) {
  for (int64_t r = row_begin; r < row_end; ++r) {
    uint16_t* dst = out + (r - row_begin) * p.cols;
    const uint8_t* lo = p.lo.data() + r * p.cols;
    for (int64_t i = 0; i < p.cols; ++i) dst[i] = packed_bf16_bits(lo[i], p.exponent[p.code(r, i)]);
    patch_packed_exceptions(p, r, dst);
  }
}

std::string packed_bf16_error(const PackedBf16& p) {
  if (p.rows < 0 || p.cols < 0) return fmt::format("shape {} x {}", p.rows, p.cols);
  const auto n = static_cast<size_t>(p.rows * p.cols);
  if (p.lo.size() != n) return fmt::format("{} mantissa bytes for {} weights", p.lo.size(), n);
  if (p.codes.size() != static_cast<size_t>(p.rows * p.code_stride()))
    return fmt::format("{} code bytes for {} rows of {} columns", p.codes.size(), p.rows, p.cols);
  if (p.exc_begin.size() != static_cast<size_t>(p.rows + 1) || p.exc_begin.front() != 0)
    return fmt::format("exception index of {} entries for {} rows", p.exc_begin.size(), p.rows);
  if (p.exc_col.size() != p.exc_value.size() || p.exc_begin.back() != p.exc_col.size())
    return fmt::format("{} exception columns, {} values, index ending at {}", p.exc_col.size(), p.exc_value.size(),
                       p.exc_begin.back());
  if (p.exponent[kPackedEscape] != 0) return "the escape code has an exponent";
  for (int64_t r = 0; r < p.rows; ++r) {
    const uint32_t begin = p.exc_begin[r], end = p.exc_begin[r + 1];
    if (end < begin || end > p.exc_col.size()) return fmt::format("row {}: exception range [{}, {})", r, begin, end);
    if (p.cols % 2 == 1 && (p.codes[r * p.code_stride() + p.code_stride() - 1] >> 4) != 0)
      return fmt::format("row {}: padding code set", r);
    int64_t escapes = 0;
    for (int64_t i = 0; i < p.cols; ++i) escapes += p.code(r, i) == kPackedEscape;
    if (escapes != end - begin)
      return fmt::format("row {}: {} escape codes, {} exceptions", r, escapes, end - begin);
    for (uint32_t x = begin; x < end; ++x) {
      const uint32_t col = p.exc_col[x];
      if (col >= p.cols || (x > begin && col <= p.exc_col[x - 1]) || p.code(r, col) != kPackedEscape)
        return fmt::format("row {}: exception at column {} is not at an escape code in column order", r, col);
    }
  }
  return "";
}

}  // namespace moex
