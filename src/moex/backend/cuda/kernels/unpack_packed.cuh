// The device half of packed expert copies (core/packed_bf16.h): rows of a packed matrix, copied as they are
// into a staging buffer, become bf16 rows in an expert slot. Launched on the copy stream after the rows' copy.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace moex::cuda {

struct PackedRows {
  const uint8_t* lo = nullptr;         // [rows][cols]: sign and mantissa bytes
  const uint8_t* codes = nullptr;      // [rows][code_stride]: 4-bit exponent codes, even weights in the low nibble
  const uint32_t* exc_begin = nullptr; // [rows + 1]: the source's exception index (absolute: exc_base is subtracted)
  const uint32_t* exc_col = nullptr;   // this range's exceptions
  const uint16_t* exc_value = nullptr;
  uint32_t exc_base = 0;               // exc_begin[0]
  int64_t rows = 0, cols = 0, code_stride = 0;
  uint8_t exponent[16] = {};           // code -> exponent byte
};

// dst [rows][cols] (bf16 bits) = the unpacked rows. One block per row; the row's exceptions are written last.
void launch_unpack_packed_rows(const PackedRows& src, uint16_t* dst, cudaStream_t stream);

}  // namespace moex::cuda
