#include "moex/backend/cpu/packed_linear.h"

#include <algorithm>
#include <vector>

#include "moex/backend/cpu/simd.h"
#include "moex/core/error.h"

namespace moex::cpu {

void unpack_rows(const PackedBf16& p, int64_t row_begin, int64_t row_end, uint16_t* out) {
#ifdef MOEX_CPU_AVX2
  const __m128i table = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p.exponent.data()));
  const __m128i mask4 = _mm_set1_epi8(0x0f), top_bit = _mm_set1_epi8(static_cast<char>(0x80));
  const __m128i low_bits = _mm_set1_epi8(0x7f);
  for (int64_t r = row_begin; r < row_end; ++r) {
    uint16_t* dst = out + (r - row_begin) * p.cols;
    const uint8_t* lo_row = p.lo.data() + r * p.cols;
    const uint8_t* code_row = p.codes.data() + r * p.code_stride();
    int64_t i = 0;
    for (; i + 16 <= p.cols; i += 16) {
      const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(lo_row + i));
      uint64_t packed_codes;
      std::memcpy(&packed_codes, code_row + i / 2, 8);
      const __m128i nib = _mm_cvtsi64_si128(static_cast<long long>(packed_codes));
      // Byte j = code of weight i + j: low nibbles are the even weights, high nibbles the odd ones.
      const __m128i codes =
          _mm_unpacklo_epi8(_mm_and_si128(nib, mask4), _mm_and_si128(_mm_srli_epi16(nib, 4), mask4));
      const __m128i e = _mm_shuffle_epi8(table, codes);
      // bf16 = sign | exponent << 7 | mantissa: high byte sign | exponent >> 1, low (exponent & 1) << 7 | mantissa.
      const __m128i hi = _mm_or_si128(_mm_and_si128(lo, top_bit), _mm_and_si128(_mm_srli_epi16(e, 1), low_bits));
      const __m128i lb = _mm_or_si128(_mm_and_si128(_mm_slli_epi16(e, 7), top_bit), _mm_and_si128(lo, low_bits));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm_unpacklo_epi8(lb, hi));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i + 8), _mm_unpackhi_epi8(lb, hi));
    }
    for (; i < p.cols; ++i) dst[i] = packed_bf16_bits(lo_row[i], p.exponent[p.code(r, i)]);  // the last cols % 16
    patch_packed_exceptions(p, r, dst);
  }
#else
  moex::unpack_bf16_rows(p, row_begin, row_end, out);
#endif
}

void packed_linear_block(const LinearProblem& problem, const PackedBf16& w, int64_t row_begin, int64_t row_end,
                         int64_t token_begin, int64_t token_end) {
  MOEX_ASSERT(problem.k == w.cols && row_end <= w.rows, "packed linear: k {} over a {} x {} packed matrix",
              problem.k, w.rows, w.cols);
  // A row block at a time, linear()'s own (16 rows for a GEMV, 32 for a GEMM: 458 / 917 KB of bf16 at Mixtral's
  // 14336): a multiple of the GEMM's 4-row tiles, so every output is summed as linear_block sums it over the same
  // rows.
  const int64_t block = linear_row_block(token_end - token_begin);
  thread_local std::vector<uint16_t> scratch;
  scratch.resize(static_cast<size_t>(block * w.cols));
  for (int64_t begin = row_begin; begin < row_end; begin += block) {
    const int64_t end = std::min(row_end, begin + block);
    unpack_rows(w, begin, end, scratch.data());
    LinearProblem rows = problem;
    rows.w = scratch.data();
    rows.w_dtype = DType::kBF16;
    rows.out = problem.out + begin;  // column o of out is output feature o
    if (problem.bias) rows.bias = static_cast<const char*>(problem.bias) + begin * dtype_size(problem.bias_dtype);
    linear_block(rows, 0, end - begin, token_begin, token_end);
  }
}

}  // namespace moex::cpu
