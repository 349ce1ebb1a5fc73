// Linear layers over weights in the 12-bit packing (core/packed_bf16.h): how the CPU runs offloaded experts held
// packed in host memory (--pack-experts, docs/offloading.md). At 1-4 tokens (decode) each row is decoded in
// registers inside the GEMV (512 bits wide where the CPU has AVX-512 VBMI: packed_gemv_avx512.h); with more tokens
// (or a bias) rows are unpacked a block at a time into a cache-resident bf16 scratch and handed to linear_block.
// Either way the result is bit-identical to the unpacked matrix's.
#pragma once

#include <cstdint>

#include "moex/backend/cpu/linear_kernels.h"
#include "moex/core/packed_bf16.h"

namespace moex::cpu {

// How far ahead the packed GEMVs (AVX2 and AVX-512) prefetch a row: 3072 weights, i.e. their mantissa bytes and,
// at half a byte each, their codes.
inline constexpr int64_t kPackedPrefetchLoBytes = 3072, kPackedPrefetchCodeBytes = 1536;

// Rows [row_begin, row_end) of p as bf16 bits into out [row_end - row_begin][p.cols]: the exponent codes through
// a 16-entry table lookup (pshufb) 16 weights at a time, then the row's exceptions patched in.
void unpack_rows(const PackedBf16& p, int64_t row_begin, int64_t row_end, uint16_t* out);

// linear_block with problem.w replaced by w (problem.w and w_dtype are ignored; k must equal w.cols).
void packed_linear_block(const LinearProblem& problem, const PackedBf16& w, int64_t row_begin, int64_t row_end,
                         int64_t token_begin, int64_t token_end);

}  // namespace moex::cpu
