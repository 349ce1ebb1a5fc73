#include "moex/backend/cpu/packed_gemv_avx512.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

#include "moex/backend/cpu/packed_linear.h"
#include "moex/backend/cpu/simd.h"
#include "moex/core/error.h"

namespace moex::cpu {

#ifdef MOEX_CPU_AVX2

// Only these functions use AVX-512: the rest of the build stays x86-64-v3 (a whole file built with -mavx512* could
// hand its copies of shared inline functions to the linker, and crash hosts without AVX-512).
#define MOEX_AVX512_VBMI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi")))
// GCC 12's AVX-512 intrinsics start some results from a self-initialised "undefined" vector, which its
// uninitialised-use analysis reports once they are inlined here.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace {

// The byte permutations, built once: interleave64 puts the codes of even weights (bytes 0-31) and odd weights
// (32-63) back in column order; dwords[j] gathers columns 16j .. 16j + 15's low and high bf16 bytes into the top
// half of 16 dwords (index bit 6 picks the second table).
struct Permutes {
  alignas(64) uint8_t interleave64[64];
  alignas(64) uint8_t dwords[4][64];
  Permutes() {
    for (int i = 0; i < 64; ++i) interleave64[i] = static_cast<uint8_t>(i % 2 == 0 ? i / 2 : 32 + i / 2);
    for (int j = 0; j < 4; ++j)
      for (int i = 0; i < 16; ++i) {
        dwords[j][4 * i] = dwords[j][4 * i + 1] = 0;  // zeroed by the mask
        dwords[j][4 * i + 2] = static_cast<uint8_t>(16 * j + i);       // low byte: (exponent & 1) << 7 | mantissa
        dwords[j][4 * i + 3] = static_cast<uint8_t>(64 + 16 * j + i);  // high byte: sign | exponent >> 1
      }
  }
};
const Permutes kPermutes;

// Weights [col, col + 64) of a row (col even) as four fp32 vectors of 16 in column order, exactly the bf16 values.
// The 32 code bytes are broadcast and shifted 0 or 4 bits per half (even weights' codes, then odd weights'), looked
// up in the exponent table (pshufb) and put in column order (vpermb); the two bytes of each bf16 are formed with
// bit selects, and vpermt2b writes them into the top half of each fp32 with the bottom half zeroed. Six shuffles
// per 64 weights, against 26 for the AVX2 decode (two decode32s), which bound the 16-core host's packed CPU path.
MOEX_AVX512_VBMI inline void decode64(const uint8_t* lo_row, const uint8_t* code_row, int64_t col, __m512i table,
                                      __m512i interleave, const __m512i* dwords, __m512* w) {
  const __m512i shifts = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(4), 1);
  const __m512i mask4 = _mm512_set1_epi8(0x0f), top_bit = _mm512_set1_epi8(static_cast<char>(0x80));
  const __m512i lo = _mm512_loadu_si512(lo_row + col);
  const __m256i codes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(code_row + col / 2));
  const __m512i codes_twice = _mm512_broadcast_i64x4(codes);
  const __m512i split = _mm512_and_si512(_mm512_srlv_epi16(codes_twice, shifts), mask4);
  const __m512i e = _mm512_permutexvar_epi8(interleave, _mm512_shuffle_epi8(table, split));
  // hi = sign | exponent >> 1, lb = (exponent & 1) << 7 | mantissa: 0xca selects the first operand's bits where
  // top_bit is set. The 16-bit shifts carry bits across bytes only into the positions the selects drop.
  const __m512i hi = _mm512_ternarylogic_epi32(top_bit, lo, _mm512_srli_epi16(e, 1), 0xca);
  const __m512i lb = _mm512_ternarylogic_epi32(top_bit, _mm512_slli_epi16(e, 7), lo, 0xca);
  constexpr __mmask64 kTopHalves = 0xccccccccccccccccull;
  for (int j = 0; j < 4; ++j) w[j] = _mm512_castsi512_ps(_mm512_maskz_permutex2var_epi8(kTopHalves, lb, dwords[j], hi));
}

// The decode's constant vectors, loaded once per call rather than per row (rows of 768 weights are 12 steps).
struct Decoder {
  __m512i table, interleave, dwords[4];
};
MOEX_AVX512_VBMI inline Decoder make_decoder(const PackedBf16& p) {
  Decoder d;
  d.table = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p.exponent.data())));
  d.interleave = _mm512_load_si512(kPermutes.interleave64);
  for (int j = 0; j < 4; ++j) d.dwords[j] = _mm512_load_si512(kPermutes.dwords[j]);
  return d;
}

// The AVX2 GEMV's accumulators, two of its 8-wide ones to a 16-wide register: at 1-2 tokens acc[t][0..3] cover
// columns 0-7 .. 24-31 of every 32, so zmm 0 holds [acc0 | acc1] and zmm 1 [acc2 | acc3]; at 3-4 tokens
// acc[t][0..1] cover 0-7 and 8-15 of every 16, one zmm. Every lane sees the same products in the same order.
template <int kT>
constexpr int kZmmPerToken = kT <= 2 ? 2 : 1;

// Row `row`'s whole 64-weight steps (p.cols % 64 == 0: all of it) into a (zeroed here); *exc advanced past the
// exceptions patched.
template <int kT>
MOEX_AVX512_VBMI inline void row_steps(const float* x, int64_t ldx, const PackedBf16& p, int64_t row,
                                       const Decoder& d, uint32_t* exc, __m512 (&a)[kT][kZmmPerToken<kT>]) {
  constexpr int kZ = kZmmPerToken<kT>;
  const int64_t k = p.cols;
  const uint8_t* lo_row = p.lo.data() + row * k;
  const uint8_t* code_row = p.codes.data() + row * p.code_stride();
  const uint32_t* exc_col = p.exc_col.data();
  const uint32_t exc_end = p.exc_begin[row + 1];
  uint32_t next_exc = *exc;
  for (int t = 0; t < kT; ++t)
    for (int z = 0; z < kZ; ++z) a[t][z] = _mm512_setzero_ps();
  int64_t kk = 0;
  for (; kk + 64 <= k; kk += 64) {
    _mm_prefetch(reinterpret_cast<const char*>(lo_row + kk) + kPackedPrefetchLoBytes, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(code_row + kk / 2) + kPackedPrefetchCodeBytes, _MM_HINT_T0);
    __m512 w[4];
    decode64(lo_row, code_row, kk, d.table, d.interleave, d.dwords, w);
    if (next_exc < exc_end && exc_col[next_exc] < kk + 64) {  // rare: patch the escaped weights in
      alignas(64) float patched[64];
      for (int j = 0; j < 4; ++j) _mm512_store_ps(patched + 16 * j, w[j]);
      for (; next_exc < exc_end && exc_col[next_exc] < kk + 64; ++next_exc)
        patched[exc_col[next_exc] - kk] = bf16_to_f32(p.exc_value[next_exc]);
      for (int j = 0; j < 4; ++j) w[j] = _mm512_load_ps(patched + 16 * j);
    }
    for (int j = 0; j < 4; ++j)
      for (int t = 0; t < kT; ++t)
        a[t][j % kZ] = _mm512_fmadd_ps(_mm512_loadu_ps(x + t * ldx + kk + 16 * j), w[j], a[t][j % kZ]);
  }
  *exc = next_exc;
}

// Lanes 8-15 (AVX-512F has no 32-bit-lane extract of a half: that is AVX-512DQ).
MOEX_AVX512_VBMI inline __m256 upper_half(__m512 v) {
  return _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
}

// Whole rows (p.cols a multiple of 64), each output summed as the AVX2 GEMV sums its accumulators: ((acc0 + acc1) +
// acc2) + acc3 (acc0 + acc1 at 3-4 tokens), then hsum.
template <int kT>
MOEX_AVX512_VBMI void gemv_rows(const float* x, int64_t ldx, const PackedBf16& p, int64_t row_begin, int64_t row_end,
                                float* out, int64_t ldo) {
  constexpr int kZ = kZmmPerToken<kT>;
  const Decoder d = make_decoder(p);
  for (int64_t row = row_begin; row < row_end; ++row) {
    __m512 a[kT][kZ];
    uint32_t exc = p.exc_begin[row];
    row_steps<kT>(x, ldx, p, row, d, &exc, a);
    for (int t = 0; t < kT; ++t) {
      __m256 total = _mm256_add_ps(_mm512_castps512_ps256(a[t][0]), upper_half(a[t][0]));
      if constexpr (kZ == 2)
        total = _mm256_add_ps(_mm256_add_ps(total, _mm512_castps512_ps256(a[t][1])), upper_half(a[t][1]));
      out[t * ldo + row] = hsum(total);
    }
  }
}

}  // namespace

// Not itself built for AVX-512: a declaration and a definition with different target attributes would be two
// versions of one function to GCC (function multiversioning).
void packed_gemv_rows_avx512(int tokens, const float* x, int64_t ldx, const PackedBf16& p, int64_t row_begin,
                             int64_t row_end, float* out, int64_t ldo) {
  MOEX_ASSERT(p.cols % 64 == 0, "packed_gemv_rows_avx512: {} columns", p.cols);
  switch (tokens) {
    case 1: gemv_rows<1>(x, ldx, p, row_begin, row_end, out, ldo); break;
    case 2: gemv_rows<2>(x, ldx, p, row_begin, row_end, out, ldo); break;
    case 3: gemv_rows<3>(x, ldx, p, row_begin, row_end, out, ldo); break;
    default: gemv_rows<4>(x, ldx, p, row_begin, row_end, out, ldo); break;
  }
}

bool packed_avx512_supported() {
  __builtin_cpu_init();  // may run before the constructors that would have called it (a static initialiser below)
  static const bool supported = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                                __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vbmi");
  return supported;
}

#else

bool packed_avx512_supported() { return false; }

#endif

namespace {
// MOEX_CPU_AVX512=0 keeps the AVX2 decode on hosts that have AVX-512 (A/B measurements).
bool initial_avx512() {
  const char* env = std::getenv("MOEX_CPU_AVX512");
  return packed_avx512_supported() && !(env != nullptr && std::strcmp(env, "0") == 0);
}
std::atomic<bool> g_packed_avx512{initial_avx512()};
}  // namespace

bool packed_avx512_enabled() { return g_packed_avx512.load(std::memory_order_relaxed); }

bool set_packed_avx512(bool on) {
  if (on && !packed_avx512_supported()) return false;
  g_packed_avx512.store(on, std::memory_order_relaxed);
  return true;
}

}  // namespace moex::cpu
