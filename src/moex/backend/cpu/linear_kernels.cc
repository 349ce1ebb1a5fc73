// GEMV (row-sequential weight stream) and packed GEMM (register tiles of kT tokens x kR weight rows
// in dot-product form: each accumulator holds 8 partial sums of one output, reduced once per
// K-block). The dot-product form needs no transpose of the [out, in] weights, so a GEMM panel is a
// plain widening copy.
#include "moex/backend/cpu/linear_kernels.h"

#include <algorithm>
#include <type_traits>

#include "moex/backend/cpu/simd.h"
#include "moex/core/error.h"

namespace moex::cpu {
namespace {

// out[t * ldo + r] (=|+=) sum_k x[t * ldx + k] * w[r * ldw + k] for t < kT, r < kR.
template <typename W, int kT, int kR>
inline void dot_tile(const float* x, int64_t ldx, const W* w, int64_t ldw, int64_t k, float* out, int64_t ldo,
                     bool accumulate) {
  float sums[kT][kR];
  int64_t kk = 0;
#ifdef MOEX_CPU_AVX2
  __m256 acc[kT][kR];
#pragma GCC unroll 4
  for (int t = 0; t < kT; ++t)
#pragma GCC unroll 4
    for (int r = 0; r < kR; ++r) acc[t][r] = _mm256_setzero_ps();
  for (; kk + 8 <= k; kk += 8) {
    __m256 xv[kT];
#pragma GCC unroll 4
    for (int t = 0; t < kT; ++t) xv[t] = _mm256_loadu_ps(x + t * ldx + kk);
#pragma GCC unroll 4
    for (int r = 0; r < kR; ++r) {
      const W* row = w + r * ldw + kk;
      __m256 wv = load8(row);
#pragma GCC unroll 4
      for (int t = 0; t < kT; ++t) acc[t][r] = _mm256_fmadd_ps(xv[t], wv, acc[t][r]);
    }
  }
  // One hadd tree reduces all kR rows of a token at once (a per-row hsum costs ~4x the instructions,
  // a quarter of the tile's time at K-block 512). Missing rows are zeros, so every output is reduced
  // in the same lane order whatever the tile shape: results do not depend on the tiling.
  const __m256 zero = _mm256_setzero_ps();
#pragma GCC unroll 4
  for (int t = 0; t < kT; ++t) {
    alignas(16) float lanes[4];
    _mm_store_ps(lanes, hsum4(acc[t][0], kR > 1 ? acc[t][kR > 1 ? 1 : 0] : zero, kR > 2 ? acc[t][kR > 2 ? 2 : 0] : zero,
                              kR > 3 ? acc[t][kR > 3 ? 3 : 0] : zero));
#pragma GCC unroll 4
    for (int r = 0; r < kR; ++r) sums[t][r] = lanes[r];
  }
#else
  for (int t = 0; t < kT; ++t)
    for (int r = 0; r < kR; ++r) sums[t][r] = 0.0f;
#endif
  for (; kk < k; ++kk)
    for (int r = 0; r < kR; ++r) {
      float wval = to_f32(w[r * ldw + kk]);
      for (int t = 0; t < kT; ++t) sums[t][r] += x[t * ldx + kk] * wval;
    }
  for (int t = 0; t < kT; ++t)
    for (int r = 0; r < kR; ++r) {
      float* dst = out + t * ldo + r;
      *dst = accumulate ? *dst + sums[t][r] : sums[t][r];
    }
}

void add_bias(const LinearProblem& p, int64_t row_begin, int64_t row_end, int64_t token_begin, int64_t token_end) {
  if (!p.bias) return;
  for (int64_t t = token_begin; t < token_end; ++t) {
    float* dst = p.out + t * p.ldo;
    for (int64_t o = row_begin; o < row_end; ++o) dst[o] += load_f32(p.bias, p.bias_dtype, o);
  }
}

// ---- GEMV ---------------------------------------------------------------------------------------
// One weight row at a time, so the weight matrix is read front to back as one sequential stream
// (rows are contiguous): the hardware prefetcher locks on, where interleaving 4 short row streams
// measured 20-40% slower on 2 KiB rows. kU independent accumulators per token hide FMA latency.
template <int kT>
constexpr int gemv_unroll() {
  return kT <= 2 ? 4 : 2;
}

// Prefetch distance for the GEMV weight stream; it runs past the row end into the next row. On the H100
// machine's 16-core host (bench/cpu/host_gemv_bench.cc, Mixtral expert shapes, one token, 15 threads) 4 KiB
// read 100.6 GB/s against 84.8 at 1 KiB and 104.8 for a plain read of the same bytes: the offloaded experts
// the CPU runs are this loop.
constexpr int64_t kGemvPrefetchBytes = 4096;

template <typename W, int kT>
inline void gemv_row(const float* x, int64_t ldx, const W* w, int64_t k, float* out, int64_t ldo) {
  constexpr int kU = gemv_unroll<kT>();
  float sums[kT];
  int64_t kk = 0;
#ifdef MOEX_CPU_AVX2
  __m256 acc[kT][kU];
#pragma GCC unroll 4
  for (int t = 0; t < kT; ++t)
#pragma GCC unroll 4
    for (int u = 0; u < kU; ++u) acc[t][u] = _mm256_setzero_ps();
  for (; kk + 8 * kU <= k; kk += 8 * kU) {
    _mm_prefetch(reinterpret_cast<const char*>(w + kk) + kGemvPrefetchBytes, _MM_HINT_T0);
#pragma GCC unroll 4
    for (int u = 0; u < kU; ++u) {
      __m256 wv = load8(w + kk + 8 * u);
#pragma GCC unroll 4
      for (int t = 0; t < kT; ++t) acc[t][u] = _mm256_fmadd_ps(_mm256_loadu_ps(x + t * ldx + kk + 8 * u), wv, acc[t][u]);
    }
  }
  for (; kk + 8 <= k; kk += 8) {
    __m256 wv = load8(w + kk);
#pragma GCC unroll 4
    for (int t = 0; t < kT; ++t) acc[t][0] = _mm256_fmadd_ps(_mm256_loadu_ps(x + t * ldx + kk), wv, acc[t][0]);
  }
#pragma GCC unroll 4
  for (int t = 0; t < kT; ++t) {
    __m256 total = acc[t][0];
#pragma GCC unroll 4
    for (int u = 1; u < kU; ++u) total = _mm256_add_ps(total, acc[t][u]);
    sums[t] = hsum(total);
  }
#else
  for (int t = 0; t < kT; ++t) sums[t] = 0.0f;
#endif
  for (; kk < k; ++kk) {
    float wval = to_f32(w[kk]);
    for (int t = 0; t < kT; ++t) sums[t] += x[t * ldx + kk] * wval;
  }
  for (int t = 0; t < kT; ++t) out[t * ldo] = sums[t];
}

template <typename W, int kT>
void gemv(const LinearProblem& p, const W* w, int64_t row_begin, int64_t row_end, int64_t token_begin) {
  const float* x = p.x + token_begin * p.ldx;
  float* out = p.out + token_begin * p.ldo;
  for (int64_t row = row_begin; row < row_end; ++row) gemv_row<W, kT>(x, p.ldx, w + row * p.k, p.k, out + row, p.ldo);
}

template <typename W>
void gemv_dispatch(const LinearProblem& p, int64_t row_begin, int64_t row_end, int64_t token_begin,
                   int64_t token_end) {
  const W* w = static_cast<const W*>(p.w);
  switch (token_end - token_begin) {
    case 1: gemv<W, 1>(p, w, row_begin, row_end, token_begin); break;
    case 2: gemv<W, 2>(p, w, row_begin, row_end, token_begin); break;
    case 3: gemv<W, 3>(p, w, row_begin, row_end, token_begin); break;
    case 4: gemv<W, 4>(p, w, row_begin, row_end, token_begin); break;
    default: MOEX_ASSERT(false, "gemv with {} tokens", token_end - token_begin);
  }
}

// ---- GEMM ---------------------------------------------------------------------------------------
constexpr int kGemmTileTokens = 3;
constexpr int kGemmTileRows = 4;
// Tokens per pass over the panel: their x slices stay in L2 next to the panel.
constexpr int64_t kGemmTokenBlock = 64;

using PanelTileFn = void (*)(const float*, int64_t, const float*, int64_t, int64_t, float*, int64_t, bool);

template <int kT, int kR>
constexpr PanelTileFn panel_tile() {
  return &dot_tile<float, kT, kR>;
}

constexpr PanelTileFn kPanelTiles[kGemmTileTokens][kGemmTileRows] = {
    {panel_tile<1, 1>(), panel_tile<1, 2>(), panel_tile<1, 3>(), panel_tile<1, 4>()},
    {panel_tile<2, 1>(), panel_tile<2, 2>(), panel_tile<2, 3>(), panel_tile<2, 4>()},
    {panel_tile<3, 1>(), panel_tile<3, 2>(), panel_tile<3, 3>(), panel_tile<3, 4>()},
};

// Widens rows [0, num_rows) x cols [0, num_cols) of src (leading dim ld) into panel (leading dim num_cols).
template <typename W>
void widen_panel(const W* src, int64_t ld, int64_t num_rows, int64_t num_cols, float* panel) {
  for (int64_t row = 0; row < num_rows; ++row) {
    const W* in = src + row * ld;
    float* dst = panel + row * num_cols;
    int64_t col = 0;
#ifdef MOEX_CPU_AVX2
    for (; col + 8 <= num_cols; col += 8) _mm256_storeu_ps(dst + col, load8(in + col));
#endif
    for (; col < num_cols; ++col) dst[col] = to_f32(in[col]);
  }
}

// The widened panel: kPanelFloats fp32 (128 KiB, a quarter of a Zen 3 / Sapphire Rapids L2 share)
// holding as many whole weight rows as fit, so widening reads the bf16 rows as one contiguous run
// (K-blocks that cut rows into 1 KiB pieces measured ~2x slower at 8-32 tokens). Rows longer than
// kMaxPanelK are cut into K-blocks with a 4-row panel.
constexpr int64_t kPanelFloats = 32768;
constexpr int64_t kMaxPanelK = kPanelFloats / kGemmTileRows;

struct PanelShape {
  int64_t rows;
  int64_t k_block;
};

PanelShape panel_shape(int64_t k) {
  int64_t k_block = std::min(k, kMaxPanelK);
  int64_t rows = kPanelFloats / k_block / kGemmTileRows * kGemmTileRows;
  return {std::clamp<int64_t>(rows, kGemmTileRows, kGemmRowBlock), k_block};
}

template <typename W>
void gemm(const LinearProblem& p, int64_t row_begin, int64_t row_end, int64_t token_begin, int64_t token_end) {
  alignas(64) float panel_storage[kPanelFloats];
  const W* w = static_cast<const W*>(p.w);
  const PanelShape shape = panel_shape(p.k);
  for (int64_t block_row = row_begin; block_row < row_end; block_row += shape.rows) {
    int64_t num_rows = std::min(shape.rows, row_end - block_row);
    for (int64_t k_begin = 0; k_begin < p.k; k_begin += shape.k_block) {
      int64_t num_k = std::min(shape.k_block, p.k - k_begin);
      const float* panel;
      int64_t ld_panel;
      if constexpr (std::is_same_v<W, float>) {
        panel = w + block_row * p.k + k_begin;
        ld_panel = p.k;
      } else {
        widen_panel(w + block_row * p.k + k_begin, p.k, num_rows, num_k, panel_storage);
        panel = panel_storage;
        ld_panel = num_k;
      }
      bool accumulate = k_begin > 0;
      for (int64_t tb = token_begin; tb < token_end; tb += kGemmTokenBlock) {
        int64_t tb_end = std::min(token_end, tb + kGemmTokenBlock);
        for (int64_t r = 0; r < num_rows; r += kGemmTileRows) {
          int kr = static_cast<int>(std::min<int64_t>(kGemmTileRows, num_rows - r));
          for (int64_t t = tb; t < tb_end; t += kGemmTileTokens) {
            int kt = static_cast<int>(std::min<int64_t>(kGemmTileTokens, tb_end - t));
            kPanelTiles[kt - 1][kr - 1](p.x + t * p.ldx + k_begin, p.ldx, panel + r * ld_panel, ld_panel, num_k,
                                        p.out + t * p.ldo + block_row + r, p.ldo, accumulate);
          }
        }
      }
    }
  }
}

}  // namespace

void linear_block(const LinearProblem& p, int64_t row_begin, int64_t row_end, int64_t token_begin,
                  int64_t token_end) {
  if (row_begin >= row_end || token_begin >= token_end) return;
  if (p.k == 0) {
    for (int64_t t = token_begin; t < token_end; ++t)
      std::fill(p.out + t * p.ldo + row_begin, p.out + t * p.ldo + row_end, 0.0f);
  } else if (token_end - token_begin <= kGemvMaxTokens) {
    switch (p.w_dtype) {
      case DType::kF32: gemv_dispatch<float>(p, row_begin, row_end, token_begin, token_end); break;
      case DType::kF16: gemv_dispatch<F16>(p, row_begin, row_end, token_begin, token_end); break;
      case DType::kBF16: gemv_dispatch<Bf16>(p, row_begin, row_end, token_begin, token_end); break;
      case DType::kI32:
      case DType::kI64: MOEX_ASSERT(false, "linear weight dtype {}", dtype_name(p.w_dtype));
    }
  } else {
    switch (p.w_dtype) {
      case DType::kF32: gemm<float>(p, row_begin, row_end, token_begin, token_end); break;
      case DType::kF16: gemm<F16>(p, row_begin, row_end, token_begin, token_end); break;
      case DType::kBF16: gemm<Bf16>(p, row_begin, row_end, token_begin, token_end); break;
      case DType::kI32:
      case DType::kI64: MOEX_ASSERT(false, "linear weight dtype {}", dtype_name(p.w_dtype));
    }
  }
  add_bias(p, row_begin, row_end, token_begin, token_end);
}

void linear(ThreadPool& pool, const LinearProblem& p, int64_t num_rows) {
  if (p.m == 0 || num_rows == 0) return;
  int64_t row_block = linear_row_block(p.m);
  int64_t num_row_blocks = (num_rows + row_block - 1) / row_block;
  // Too few row blocks to feed every thread (router, small projections in prefill): split tokens too.
  // Each token block widens its own copy of the panel, so blocks stay >= ~24 tokens.
  int64_t num_token_blocks = 1;
  int64_t wanted_units = 4 * static_cast<int64_t>(pool.num_threads());
  if (p.m > kGemvMaxTokens && num_row_blocks < wanted_units) {
    num_token_blocks = std::min((wanted_units + num_row_blocks - 1) / num_row_blocks, (p.m + 23) / 24);
  }
  int64_t token_block = (p.m + num_token_blocks - 1) / num_token_blocks;
  if (p.m > kGemvMaxTokens) token_block = (token_block + kGemmTileTokens - 1) / kGemmTileTokens * kGemmTileTokens;
  num_token_blocks = (p.m + token_block - 1) / token_block;
  int64_t gemv_tokens = p.m <= kGemvMaxTokens ? p.m : 0;
  pool.parallel_for(num_row_blocks * num_token_blocks, 1, [&](int64_t unit_begin, int64_t unit_end) {
    for (int64_t unit = unit_begin; unit < unit_end; ++unit) {
      int64_t row_block_idx = unit / num_token_blocks;
      int64_t token_block_idx = unit % num_token_blocks;
      int64_t row_begin = row_block_idx * row_block;
      int64_t token_begin = gemv_tokens ? 0 : token_block_idx * token_block;
      int64_t token_end = gemv_tokens ? gemv_tokens : std::min(p.m, token_begin + token_block);
      linear_block(p, row_begin, std::min(num_rows, row_begin + row_block), token_begin, token_end);
    }
  });
}

}  // namespace moex::cpu
