#include "moex/backend/cpu/packed_linear.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "moex/backend/cpu/packed_gemv_avx512.h"
#include "moex/backend/cpu/simd.h"
#include "moex/core/error.h"

namespace moex::cpu {

namespace {

#ifdef MOEX_CPU_AVX2
// Weights [col, col + 16) of a row (col even) as bf16 bits, 8 in each of *first and *second: the exponent codes
// through a 16-entry table lookup (pshufb), then sign, exponent and mantissa interleaved. Escaped weights come out
// with exponent 0 (their exceptions are patched by the caller).
inline void bf16_words16(const uint8_t* lo_row, const uint8_t* code_row, int64_t col, __m128i table, __m128i* first,
                         __m128i* second) {
  const __m128i mask4 = _mm_set1_epi8(0x0f), top_bit = _mm_set1_epi8(static_cast<char>(0x80));
  const __m128i low_bits = _mm_set1_epi8(0x7f);
  const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(lo_row + col));
  uint64_t packed_codes;
  std::memcpy(&packed_codes, code_row + col / 2, 8);
  const __m128i nib = _mm_cvtsi64_si128(static_cast<long long>(packed_codes));
  // Byte j = code of weight col + j: low nibbles are the even weights, high nibbles the odd ones.
  const __m128i codes = _mm_unpacklo_epi8(_mm_and_si128(nib, mask4), _mm_and_si128(_mm_srli_epi16(nib, 4), mask4));
  const __m128i e = _mm_shuffle_epi8(table, codes);
  // bf16 = sign | exponent << 7 | mantissa: high byte sign | exponent >> 1, low (exponent & 1) << 7 | mantissa.
  const __m128i hi = _mm_or_si128(_mm_and_si128(lo, top_bit), _mm_and_si128(_mm_srli_epi16(e, 1), low_bits));
  const __m128i lb = _mm_or_si128(_mm_and_si128(_mm_slli_epi16(e, 7), top_bit), _mm_and_si128(lo, low_bits));
  *first = _mm_unpacklo_epi8(lb, hi);
  *second = _mm_unpackhi_epi8(lb, hi);
}

// The same 16 weights as two fp32 vectors, exactly the bf16 values (load8 of the unpacked row): each bf16 widened to
// the top half of an fp32.
inline void decode16(const uint8_t* lo_row, const uint8_t* code_row, int64_t col, __m128i table, __m256* first,
                     __m256* second) {
  __m128i a, b;
  bf16_words16(lo_row, code_row, col, table, &a, &b);
  *first = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(a), 16));
  *second = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(b), 16));
}

// Weights [col, col + 32) (col even) as four fp32 vectors of 8: the same values as decode16, with the byte work
// done 32 weights at a time in 256-bit registers and each bf16 widened by interleaving it with zero (the lanes then
// hold weights 0-3 | 16-19 and so on, which four lane permutes put back in order).
inline void decode32(const uint8_t* lo_row, const uint8_t* code_row, int64_t col, __m256i table, __m256* w) {
  const __m128i mask4 = _mm_set1_epi8(0x0f);
  const __m256i top_bit = _mm256_set1_epi8(static_cast<char>(0x80)), low_bits = _mm256_set1_epi8(0x7f);
  const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lo_row + col));
  const __m128i nib = _mm_loadu_si128(reinterpret_cast<const __m128i*>(code_row + col / 2));
  const __m128i even = _mm_and_si128(nib, mask4), odd = _mm_and_si128(_mm_srli_epi16(nib, 4), mask4);
  const __m256i codes = _mm256_set_m128i(_mm_unpackhi_epi8(even, odd), _mm_unpacklo_epi8(even, odd));
  const __m256i e = _mm256_shuffle_epi8(table, codes);
  const __m256i hi =
      _mm256_or_si256(_mm256_and_si256(lo, top_bit), _mm256_and_si256(_mm256_srli_epi16(e, 1), low_bits));
  const __m256i lb =
      _mm256_or_si256(_mm256_and_si256(_mm256_slli_epi16(e, 7), top_bit), _mm256_and_si256(lo, low_bits));
  const __m256i words_a = _mm256_unpacklo_epi8(lb, hi), words_b = _mm256_unpackhi_epi8(lb, hi);
  const __m256i zero = _mm256_setzero_si256();
  const __m256i d0 = _mm256_unpacklo_epi16(zero, words_a), d1 = _mm256_unpackhi_epi16(zero, words_a);
  const __m256i d2 = _mm256_unpacklo_epi16(zero, words_b), d3 = _mm256_unpackhi_epi16(zero, words_b);
  w[0] = _mm256_castsi256_ps(_mm256_permute2x128_si256(d0, d1, 0x20));
  w[1] = _mm256_castsi256_ps(_mm256_permute2x128_si256(d2, d3, 0x20));
  w[2] = _mm256_castsi256_ps(_mm256_permute2x128_si256(d0, d1, 0x31));
  w[3] = _mm256_castsi256_ps(_mm256_permute2x128_si256(d2, d3, 0x31));
}
#endif

// One output row of a packed matrix for kT tokens, decoding the weights in registers as the bf16 GEMV loads them:
// no unpacked copy is written and read back, which halved the CPU path's rate on a 16-core GPU host (36.9 GB/s of
// packed bytes against 73 GB/s of bf16). The same accumulators, in the same order, as the bf16 GEMV's gemv_row
// (linear_kernels.cc), so the result is bit-identical to it; the row's exceptions are patched into the few
// vectors they fall in.
template <int kT>
void packed_gemv_row(const float* x, int64_t ldx, const PackedBf16& p, int64_t row, float* out, int64_t ldo) {
  constexpr int kU = kT <= 2 ? 4 : 2;  // gemv_row's unroll
  const int64_t k = p.cols;
  const uint8_t* lo_row = p.lo.data() + row * k;
  const uint8_t* code_row = p.codes.data() + row * p.code_stride();
  uint32_t exc = p.exc_begin[row];
  const uint32_t exc_end = p.exc_begin[row + 1];
  float sums[kT];
  int64_t kk = 0;
#ifdef MOEX_CPU_AVX2
  const __m128i table = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p.exponent.data()));
  const __m256i table32 = _mm256_broadcastsi128_si256(table);  // pshufb looks up within each 128-bit lane
  __m256 acc[kT][kU];
  for (int t = 0; t < kT; ++t)
    for (int u = 0; u < kU; ++u) acc[t][u] = _mm256_setzero_ps();
  for (; kk + 8 * kU <= k; kk += 8 * kU) {
    _mm_prefetch(reinterpret_cast<const char*>(lo_row + kk) + kPackedPrefetchLoBytes, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(code_row + kk / 2) + kPackedPrefetchCodeBytes, _MM_HINT_T0);
    __m256 wv[kU];
    if constexpr (kU == 4) decode32(lo_row, code_row, kk, table32, wv);
    else decode16(lo_row, code_row, kk, table, &wv[0], &wv[1]);
    if (exc < exc_end && p.exc_col[exc] < kk + 8 * kU) {  // rare: patch the escaped weights in
      alignas(32) float patched[8 * kU];
      for (int u = 0; u < kU; ++u) _mm256_store_ps(patched + 8 * u, wv[u]);
      for (; exc < exc_end && p.exc_col[exc] < kk + 8 * kU; ++exc)
        patched[p.exc_col[exc] - kk] = bf16_to_f32(p.exc_value[exc]);
      for (int u = 0; u < kU; ++u) wv[u] = _mm256_load_ps(patched + 8 * u);
    }
    for (int u = 0; u < kU; ++u)
      for (int t = 0; t < kT; ++t)
        acc[t][u] = _mm256_fmadd_ps(_mm256_loadu_ps(x + t * ldx + kk + 8 * u), wv[u], acc[t][u]);
  }
  // What the vector loop left (rows of a multiple of 8 * kU weights leave nothing) is summed from the unpacked row,
  // as gemv_row sums it: 8 at a time into the first accumulator, then one at a time.
  thread_local std::vector<uint16_t> unpacked;
  if (kk < k) {
    unpacked.resize(static_cast<size_t>(k));
    unpack_rows(p, row, row + 1, unpacked.data());
  }
  const Bf16* w = reinterpret_cast<const Bf16*>(unpacked.data());
  for (; kk + 8 <= k; kk += 8) {
    const __m256 wv = load8(w + kk);
    for (int t = 0; t < kT; ++t) acc[t][0] = _mm256_fmadd_ps(_mm256_loadu_ps(x + t * ldx + kk), wv, acc[t][0]);
  }
  for (int t = 0; t < kT; ++t) {
    __m256 total = acc[t][0];
    for (int u = 1; u < kU; ++u) total = _mm256_add_ps(total, acc[t][u]);
    sums[t] = hsum(total);
  }
#else
  thread_local std::vector<uint16_t> unpacked;
  unpacked.resize(static_cast<size_t>(k));
  unpack_rows(p, row, row + 1, unpacked.data());
  const Bf16* w = reinterpret_cast<const Bf16*>(unpacked.data());
  for (int t = 0; t < kT; ++t) sums[t] = 0.0f;
#endif
  for (; kk < k; ++kk)
    for (int t = 0; t < kT; ++t) sums[t] += x[t * ldx + kk] * to_f32(w[kk]);
  for (int t = 0; t < kT; ++t) out[t * ldo] = sums[t];
}

}  // namespace

void unpack_rows(const PackedBf16& p, int64_t row_begin, int64_t row_end, uint16_t* out) {
#ifdef MOEX_CPU_AVX2
  const __m128i table = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p.exponent.data()));
  for (int64_t r = row_begin; r < row_end; ++r) {
    uint16_t* dst = out + (r - row_begin) * p.cols;
    const uint8_t* lo_row = p.lo.data() + r * p.cols;
    const uint8_t* code_row = p.codes.data() + r * p.code_stride();
    int64_t i = 0;
    for (; i + 16 <= p.cols; i += 16) {
      __m128i a, b;
      bf16_words16(lo_row, code_row, i, table, &a, &b);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), a);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i + 8), b);
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
  // Decode (a GEMV): each row's weights decoded in registers, no bias (experts have none).
  if (token_end - token_begin <= kGemvMaxTokens && problem.bias == nullptr) {
    const float* x = problem.x + token_begin * problem.ldx;
    float* out = problem.out + token_begin * problem.ldo;
    if (packed_avx512_enabled() && w.cols % 64 == 0) {  // 512 bits wide (every real expert width)
      packed_gemv_rows_avx512(static_cast<int>(token_end - token_begin), x, problem.ldx, w, row_begin, row_end, out,
                              problem.ldo);
      return;
    }
    for (int64_t row = row_begin; row < row_end; ++row) {
      switch (token_end - token_begin) {
        case 1: packed_gemv_row<1>(x, problem.ldx, w, row, out + row, problem.ldo); break;
        case 2: packed_gemv_row<2>(x, problem.ldx, w, row, out + row, problem.ldo); break;
        case 3: packed_gemv_row<3>(x, problem.ldx, w, row, out + row, problem.ldo); break;
        default: packed_gemv_row<4>(x, problem.ldx, w, row, out + row, problem.ldo); break;
      }
    }
    return;
  }
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
