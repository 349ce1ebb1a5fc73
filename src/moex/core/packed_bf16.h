// A lossless 12-bit packing of bf16 weight matrices, for the host tier of offloaded experts (--pack-experts,
// docs/offloading.md, "Packed experts in host memory"): offloaded decode is bound by the host DRAM bytes each missed expert costs,
// copied or run on the CPU, and a trained bf16 tensor uses few of its 256 exponents (2.5-2.6 bits of entropy,
// bench/offload/exponent_stats.py). Each weight keeps its sign and 7 mantissa bits in a byte and a 4-bit code
// naming one of its matrix's 15 most frequent exponents; code 15 marks an exception, whose raw bf16 sits in its
// row's exception list. 0.75 of the bf16 bytes plus ~4 bytes per exception (1e-4 of the weights on real experts).
// Rows are independent (fixed strides, per-row exception ranges), so row ranges can be unpacked or copied alone,
// as split and chunked expert copies need.
#pragma once

#include <array>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <new>
#include <string>
#include <utility>
#include <vector>

namespace moex {

class ThreadPool;

inline constexpr int kPackedEscape = 15;

// The packing's arrays own whole pages, left uninitialised. Whole pages: an offloading backend page-locks them
// (CUDA: cudaHostRegister) for asynchronous copies, and a locked page shared with other heap data made the CUDA
// driver refuse copies of that data ("invalid argument" on a read-back into a vector beside an exception list).
// Uninitialised: pack_bf16 writes every byte from the threads that pack the rows, which also spreads the pages'
// first touch; zero-filling the 68 GB of the Mixtral-8x7B shape's packing on one thread had made --pack-experts'
// load take 84 s instead of 23.
template <typename T>
struct PageAllocator {
  using value_type = T;
  static constexpr size_t kPage = 4096;
  PageAllocator() = default;
  template <typename U>
  PageAllocator(const PageAllocator<U>&) noexcept {}
  T* allocate(size_t n) {
    void* ptr = std::aligned_alloc(kPage, (n * sizeof(T) + kPage - 1) / kPage * kPage);
    if (ptr == nullptr) throw std::bad_alloc();
    return static_cast<T*>(ptr);
  }
  void deallocate(T* ptr, size_t) noexcept { std::free(ptr); }
  template <typename U>
  void construct(U* ptr) noexcept {
    ::new (static_cast<void*>(ptr)) U;
  }
  template <typename U, typename... Args>
  void construct(U* ptr, Args&&... args) {
    ::new (static_cast<void*>(ptr)) U(std::forward<Args>(args)...);
  }
  template <typename U>
  bool operator==(const PageAllocator<U>&) const noexcept {
    return true;
  }
};
template <typename T>
using PackedArray = std::vector<T, PageAllocator<T>>;

struct PackedBf16 {
  int64_t rows = 0, cols = 0;
  std::array<uint8_t, 16> exponent{};  // code -> exponent byte (entry kPackedEscape unused, 0)
  PackedArray<uint8_t> lo;             // [rows][cols]: sign << 7 | the 7 mantissa bits
  PackedArray<uint8_t> codes;          // [rows][code_stride()]: weight 2j's code in the low nibble of byte j
  PackedArray<uint32_t> exc_begin;     // [rows + 1]: row r's exceptions are [exc_begin[r], exc_begin[r + 1])
  PackedArray<uint32_t> exc_col;       // column of each exception, ascending within its row
  PackedArray<uint16_t> exc_value;     // the exception's bf16 bits

  int64_t code_stride() const { return (cols + 1) / 2; }
  // The exponent code of weight (row, col).
  int code(int64_t row, int64_t col) const { return (codes[row * code_stride() + col / 2] >> (4 * (col & 1))) & 0x0f; }
  // Bytes held, all arrays together.
  int64_t bytes() const;
};

// A weight's bf16 bits from its sign+mantissa byte and its exponent.
inline uint16_t packed_bf16_bits(uint8_t lo, int exponent) {
  return static_cast<uint16_t>(((lo & 0x80) << 8) | (exponent << 7) | (lo & 0x7f));
}

// Writes row's exceptions over its unpacked weights dst [cols] (the escape code's weights, decoded as exponent 0).
inline void patch_packed_exceptions(const PackedBf16& p, int64_t row, uint16_t* dst) {
  for (uint32_t x = p.exc_begin[row]; x < p.exc_begin[row + 1]; ++x) dst[p.exc_col[x]] = p.exc_value[x];
}

// Bytes of rows [row_begin, row_end) in the packing: what a copy of those rows moves (mantissas, codes, the rows'
// exception index entries and exceptions).
inline int64_t packed_bf16_rows_bytes(const PackedBf16& p, int64_t row_begin, int64_t row_end) {
  const int64_t rows = row_end - row_begin;
  const int64_t exceptions = static_cast<int64_t>(p.exc_begin[row_end]) - p.exc_begin[row_begin];
  return rows * (p.cols + p.code_stride()) + 4 * (rows + 1) + 6 * exceptions;
}

// True when a weight of p is NaN or +-Inf (exponent 255: in the exponent table, or an exception's).
bool packed_bf16_has_non_finite(const PackedBf16& p);

// Packs w [rows][cols] (bf16 bits). Exact for every bit pattern (NaN payloads, infinities, subnormals). With a
// pool, row ranges are packed in parallel (the same result).
PackedBf16 pack_bf16(const uint16_t* w, int64_t rows, int64_t cols, ThreadPool* pool = nullptr);

// Rows [row_begin, row_end) as bf16 bits into out [row_end - row_begin][cols] (portable loop; the CPU backend
// has a vector one, cpu::unpack_rows). Expects a matrix packed_bf16_error() accepts.
void unpack_bf16_rows(const PackedBf16& p, int64_t row_begin, int64_t row_end, uint16_t* out);

// What is wrong with p, or "" when it holds together: array sizes, exception ranges and columns, and every
// escape code matched by an exception of its row (what a corrupt or truncated source breaks). Reads all of p.
std::string packed_bf16_error(const PackedBf16& p);

}  // namespace moex
