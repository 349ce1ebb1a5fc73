// The packed GEMV's 512-bit decode (AVX-512 VBMI: vpermb / vpermt2b), for hosts that have it (Intel Ice Lake and
// Sapphire Rapids on, AMD Zen 4 on): on a 16-core GPU host the CPU share of offloaded decode with --pack-experts
// was bound by the AVX2 decode's shuffles, not by DRAM (bench/RESULTS.md). Picked at run time; the rest of the
// build stays x86-64-v3. Internal to backend/cpu: packed_linear.cc runs it.
#pragma once

#include <cstdint>

#include "moex/core/packed_bf16.h"

namespace moex::cpu {

// Whether this CPU (and OS) runs AVX-512 F/BW/VL/VBMI.
bool packed_avx512_supported();
// Whether the packed GEMV uses the 512-bit decode: where supported, unless MOEX_CPU_AVX512=0 (A/B).
bool packed_avx512_enabled();
// Tests and benchmarks pick the loop: false when asked for AVX-512 where the CPU lacks it.
bool set_packed_avx512(bool on);

// Rows [row_begin, row_end) for `tokens` (1-4) tokens, where p.cols is a multiple of 64 (every real expert width;
// packed_linear_block leaves other widths to the AVX2 loop): out[t * ldo + row] bit-identical to the AVX2 GEMV's,
// with the decode's constants loaded once for the range. Only where packed_avx512_supported().
void packed_gemv_rows_avx512(int tokens, const float* x, int64_t ldx, const PackedBf16& p, int64_t row_begin,
                             int64_t row_end, float* out, int64_t ldo);

}  // namespace moex::cpu
