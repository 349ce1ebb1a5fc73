// Unpacking of packed expert rows on the device: a block per row, 16 weights a thread per step (16 mantissa bytes
// and 8 code bytes in, 32 bytes of bf16 out) where the row allows 16-byte accesses, one weight at a time otherwise;
// then the row's exceptions over the escaped weights (decoded with exponent 0 first, as on the host).
#include "moex/backend/cuda/kernels/common.cuh"
#include "moex/backend/cuda/kernels/unpack_packed.cuh"

namespace moex::cuda {
namespace {

constexpr int kThreads = 256;

struct Table {
  uint8_t exponent[16];
};

__device__ __forceinline__ uint16_t bf16_bits(uint32_t lo, uint32_t exponent) {
  return static_cast<uint16_t>(((lo & 0x80u) << 8) | (exponent << 7) | (lo & 0x7fu));
}

__global__ void unpack_packed_rows_kernel(const uint8_t* __restrict__ lo, const uint8_t* __restrict__ codes,
                                          const uint32_t* __restrict__ exc_begin,
                                          const uint32_t* __restrict__ exc_col,
                                          const uint16_t* __restrict__ exc_value, uint32_t exc_base, int64_t cols,
                                          int64_t code_stride, Table table, uint16_t* __restrict__ dst) {
  __shared__ uint8_t exponent[16];
  if (threadIdx.x < 16) exponent[threadIdx.x] = table.exponent[threadIdx.x];
  __syncthreads();
  const int64_t row = blockIdx.x;
  const uint8_t* lo_row = lo + row * cols;
  const uint8_t* code_row = codes + row * code_stride;
  uint16_t* out = dst + row * cols;
  // 16-byte accesses need every row start aligned: cols % 16 == 0 (the staging and slot bases are 256-aligned).
  const bool vector = cols % 16 == 0 && (reinterpret_cast<uintptr_t>(lo) % 16) == 0 &&
                      (reinterpret_cast<uintptr_t>(codes) % 8) == 0 && (reinterpret_cast<uintptr_t>(dst) % 16) == 0;
  if (vector) {
    for (int64_t group = threadIdx.x; group < cols / 16; group += blockDim.x) {
      const uint4 m = reinterpret_cast<const uint4*>(lo_row)[group];
      const uint2 c = reinterpret_cast<const uint2*>(code_row)[group];
      const uint32_t mant[4] = {m.x, m.y, m.z, m.w};
      const uint32_t code[2] = {c.x, c.y};
      uint32_t words[8];
#pragma unroll
      for (int pair = 0; pair < 8; ++pair) {  // weights 2 pair and 2 pair + 1
        const uint32_t byte_lo = mant[pair / 2] >> (16 * (pair % 2));
        const uint32_t nibbles = code[pair / 4] >> (8 * (pair % 4));
        const uint16_t a = bf16_bits(byte_lo & 0xff, exponent[nibbles & 0xf]);
        const uint16_t b = bf16_bits((byte_lo >> 8) & 0xff, exponent[(nibbles >> 4) & 0xf]);
        words[pair] = static_cast<uint32_t>(a) | (static_cast<uint32_t>(b) << 16);
      }
      uint4* to = reinterpret_cast<uint4*>(out) + 2 * group;
      to[0] = make_uint4(words[0], words[1], words[2], words[3]);
      to[1] = make_uint4(words[4], words[5], words[6], words[7]);
    }
  } else {
    for (int64_t col = threadIdx.x; col < cols; col += blockDim.x) {
      const uint32_t nibble = (code_row[col / 2] >> (4 * (col & 1))) & 0xf;
      out[col] = bf16_bits(lo_row[col], exponent[nibble]);
    }
  }
  const uint32_t begin = exc_begin[row] - exc_base, end = exc_begin[row + 1] - exc_base;
  if (begin == end) return;
  __syncthreads();  // the escaped weights' placeholders are written before they are replaced
  for (uint32_t x = begin + threadIdx.x; x < end; x += blockDim.x) out[exc_col[x]] = exc_value[x];
}

}  // namespace

void launch_unpack_packed_rows(const PackedRows& src, uint16_t* dst, cudaStream_t stream) {
  if (src.rows == 0 || src.cols == 0) return;
  Table table;
  for (int c = 0; c < 16; ++c) table.exponent[c] = src.exponent[c];
  unpack_packed_rows_kernel<<<static_cast<unsigned>(src.rows), kThreads, 0, stream>>>(
      src.lo, src.codes, src.exc_begin, src.exc_col, src.exc_value, src.exc_base, src.cols, src.code_stride, table,
      dst);
}

}  // namespace moex::cuda
