#include "moex/core/packed_bf16.h"

#include <algorithm>
#include <functional>
#include <numeric>

#include <fmt/format.h>

#include "moex/core/error.h"
#include "moex/core/thread_pool.h"

namespace moex {
namespace {

int exponent_of(uint16_t bits) { return (bits >> 7) & 0xff; }
uint8_t lo_of(uint16_t bits) { return static_cast<uint8_t>(((bits >> 8) & 0x80) | (bits & 0x7f)); }

}  // namespace

int64_t PackedBf16::bytes() const {
  return static_cast<int64_t>(lo.size() + codes.size() + 4 * exc_begin.size() + 4 * exc_col.size() +
                              2 * exc_value.size() + exponent.size());
}

PackedBf16 pack_bf16(const uint16_t* w, int64_t rows, int64_t cols, ThreadPool* pool) {
  MOEX_ASSERT(rows >= 0 && cols >= 0, "pack_bf16: {} x {}", rows, cols);
  PackedBf16 p;
  p.rows = rows;
  p.cols = cols;
  // Row ranges packed independently (on the pool when there is one), then the exceptions concatenated in row
  // order: the result does not depend on how many ranges there are.
  const int64_t num_parts = pool ? std::min<int64_t>(std::max<int64_t>(rows, 1), 64) : 1;
  auto part_rows = [&](int64_t part) { return std::pair{rows * part / num_parts, rows * (part + 1) / num_parts}; };
  auto for_parts = [&](const std::function<void(int64_t)>& fn) {
    if (!pool) {
      for (int64_t part = 0; part < num_parts; ++part) fn(part);
      return;
    }
    pool->parallel_for(num_parts, 1, [&](int64_t first, int64_t last) {
      for (int64_t part = first; part < last; ++part) fn(part);
    });
  };
  std::vector<std::array<int64_t, 256>> part_count(static_cast<size_t>(num_parts));
  for_parts([&](int64_t part) {
    auto& count = part_count[part];
    count.fill(0);
    const auto [begin, end] = part_rows(part);
    for (int64_t i = begin * cols; i < end * cols; ++i) ++count[exponent_of(w[i])];
  });
  std::array<int64_t, 256> count{};
  for (const auto& part : part_count)
    for (int e = 0; e < 256; ++e) count[e] += part[e];
  // The 15 most frequent exponents get codes 0..14 (ties by exponent value: deterministic).
  std::array<int, 256> order;
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return count[a] > count[b]; });
  std::array<uint8_t, 256> code;
  code.fill(kPackedEscape);
  for (int c = 0; c < kPackedEscape; ++c) {
    p.exponent[c] = static_cast<uint8_t>(order[c]);
    code[order[c]] = static_cast<uint8_t>(c);
  }
  p.lo.resize(static_cast<size_t>(rows * cols));  // uninitialised: each part writes its rows
  p.codes.resize(static_cast<size_t>(rows * p.code_stride()));
  p.exc_begin.resize(static_cast<size_t>(rows + 1));
  p.exc_begin[0] = 0;
  std::vector<std::vector<uint32_t>> part_col(static_cast<size_t>(num_parts));
  std::vector<std::vector<uint16_t>> part_value(static_cast<size_t>(num_parts));
  for_parts([&](int64_t part) {
    const auto [begin, end] = part_rows(part);
    std::vector<uint32_t>& exc_col = part_col[part];
    std::vector<uint16_t>& exc_value = part_value[part];
    for (int64_t r = begin; r < end; ++r) {
      const uint16_t* src = w + r * cols;
      uint8_t* lo = p.lo.data() + r * cols;
      uint8_t* codes = p.codes.data() + r * p.code_stride();
      auto escape = [&](int64_t i) {
        exc_col.push_back(static_cast<uint32_t>(i));
        exc_value.push_back(src[i]);
      };
      // Two weights a code byte; every byte is written (an odd row's last high nibble 0), so no zero fill.
      int64_t i = 0;
      for (; i + 1 < cols; i += 2) {
        const uint16_t a = src[i], b = src[i + 1];
        const uint8_t code_a = code[exponent_of(a)], code_b = code[exponent_of(b)];
        lo[i] = lo_of(a);
        lo[i + 1] = lo_of(b);
        codes[i / 2] = static_cast<uint8_t>(code_a | code_b << 4);
        if ((code_a == kPackedEscape) | (code_b == kPackedEscape)) [[unlikely]] {
          if (code_a == kPackedEscape) escape(i);
          if (code_b == kPackedEscape) escape(i + 1);
        }
      }
      if (i < cols) {
        const uint8_t code_a = code[exponent_of(src[i])];
        lo[i] = lo_of(src[i]);
        codes[i / 2] = code_a;
        if (code_a == kPackedEscape) escape(i);
      }
      p.exc_begin[r + 1] = static_cast<uint32_t>(exc_col.size());  // within the part, made global below
    }
  });
  size_t exceptions = 0;
  for (const auto& part : part_col) exceptions += part.size();
  p.exc_col.reserve(exceptions);
  p.exc_value.reserve(exceptions);
  uint64_t total = 0;
  for (int64_t part = 0; part < num_parts; ++part) {
    const auto [begin, end] = part_rows(part);
    for (int64_t r = begin; r < end; ++r) p.exc_begin[r + 1] += static_cast<uint32_t>(total);
    total += part_col[part].size();
    MOEX_ASSERT(total <= UINT32_MAX, "pack_bf16: more than 2^32 exceptions");
    p.exc_col.insert(p.exc_col.end(), part_col[part].begin(), part_col[part].end());
    p.exc_value.insert(p.exc_value.end(), part_value[part].begin(), part_value[part].end());
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

bool packed_bf16_has_non_finite(const PackedBf16& p) {
  for (int c = 0; c < kPackedEscape; ++c)
    if (p.exponent[c] == 0xff) return true;
  for (uint16_t v : p.exc_value)
    if (exponent_of(v) == 0xff) return true;
  return false;
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
