// The inner loop shared by every bandwidth-bound matrix-vector kernel: one warp streams NR weight rows
// (bf16) and dots them with up to MT activation rows (fp32). CUDA-only header.
//
// Why this shape: at batch 1 a token reads every weight byte once, so the loop must keep HBM busy. Each
// lane issues 16-byte weight loads (8 bf16), kUnroll of them before the first use, with the L1 bypassed
// (weights are touched once); activations are re-read by every warp of the SM, so they go through L1.
#pragma once

#include "moex/backend/cuda/kernels/common.cuh"

namespace moex::cuda {

// 16-byte loads each lane keeps in flight per row: 4 by default; 8 for one activation row, where registers
// allow it and short rows (K = 2048: 8 chunks per lane) are then fetched in a single round.
constexpr int kGemvUnroll = 4;

__device__ __forceinline__ uint4 load_stream_16b(const void* ptr) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(ptr));
  return v;
}

// acc[r][m] += the 8 weights of chunk `chunk` (already loaded, packed[r]) times x_m's 8 values there.
// XS: the activations are in shared memory (plain loads; __ldg takes global addresses only).
template <int NR, int MT, bool XS = false>
__device__ __forceinline__ void accumulate_chunk(const uint4 (&packed)[NR], const float* const (&x_rows)[MT],
                                                 int m_count, int chunk, float (&acc)[NR][MT]) {
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    if (m < m_count) {
      const float4* xp = reinterpret_cast<const float4*>(x_rows[m] + chunk * 8);
      float4 x0, x1;
      if (XS) {
        x0 = xp[0];
        x1 = xp[1];
      } else {
        x0 = __ldg(xp);
        x1 = __ldg(xp + 1);
      }
#pragma unroll
      for (int r = 0; r < NR; ++r) {
        float wf[8];
        unpack_bf16x8(packed[r], wf);
        acc[r][m] += wf[0] * x0.x + wf[1] * x0.y + wf[2] * x0.z + wf[3] * x0.w + wf[4] * x1.x + wf[5] * x1.y +
                     wf[6] * x1.z + wf[7] * x1.w;
      }
    }
  }
}

// acc[r][m] (lane-partial) += sum over this lane's chunks of w_r[k] * x_m[k]. k8_count = K / 8; all rows
// 16-byte aligned. Only the first m_count activation rows are read. Caller reduces with warp_sum. Chunks below
// first_chunk (a multiple of 32) are left to the caller.
template <int NR, int MT, int U = kGemvUnroll, bool XS = false>
__device__ __forceinline__ void warp_dot_bf16(const bf16* const (&w_rows)[NR], const float* const (&x_rows)[MT],
                                              int m_count, int k8_count, int lane, float (&acc)[NR][MT],
                                              int first_chunk = 0) {
  int chunk = lane + first_chunk;
  for (; chunk + 32 * (U - 1) < k8_count; chunk += 32 * U) {
    uint4 packed[U][NR];
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int r = 0; r < NR; ++r) packed[u][r] = load_stream_16b(w_rows[r] + (chunk + 32 * u) * 8);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      accumulate_chunk<NR, MT, XS>(packed[u], x_rows, m_count, chunk + 32 * u, acc);
    }
  }
  // The tail (fewer than U chunks per lane): loaded together too, so it costs one memory round trip, not
  // one per chunk (K = 5632 would leave six serial loads at U = 8).
  if (chunk < k8_count) {
    uint4 packed[U][NR];
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int r = 0; r < NR; ++r)
        packed[u][r] = chunk + 32 * u < k8_count ? load_stream_16b(w_rows[r] + (chunk + 32 * u) * 8) : uint4{};
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (chunk + 32 * u >= k8_count) break;
      accumulate_chunk<NR, MT, XS>(packed[u], x_rows, m_count, chunk + 32 * u, acc);
    }
  }
}

// One weight row against one activation row, with the lane's first U chunks loaded before the PDL wait: the
// weights do not depend on the kernel before, so a row of up to 32 U chunks (K = 2048 at U = 8) is in flight
// while that kernel finishes, and the dot after the wait needs no further weight round trip. Usage:
//   uint4 first[U]; preload_row(w_row, k8_count, lane, first); pdl_wait(); acc += dot_preloaded(first, ...).
template <int U>
__device__ __forceinline__ void preload_row(const bf16* w_row, int k8_count, int lane, uint4 (&first)[U]) {
#pragma unroll
  for (int u = 0; u < U; ++u) first[u] = lane + 32 * u < k8_count ? load_stream_16b(w_row + (lane + 32 * u) * 8) : uint4{};
}

// The lane-partial dot of w_row and x: the preloaded chunks first, then the rest of the row as warp_dot_bf16
// reads it (same chunk order per lane, so the result is the same as warp_dot_bf16<1, 1, U>).
template <int U, bool XS = false>
__device__ __forceinline__ float dot_preloaded(const uint4 (&first)[U], const bf16* w_row, const float* x,
                                               int k8_count, int lane) {
  const float* x_rows[1] = {x};
  float acc[1][1] = {};
#pragma unroll
  for (int u = 0; u < U; ++u) {
    if (lane + 32 * u >= k8_count) break;
    const uint4 packed[1] = {first[u]};
    accumulate_chunk<1, 1, XS>(packed, x_rows, 1, lane + 32 * u, acc);
  }
  const bf16* w_rows[1] = {w_row};
  warp_dot_bf16<1, 1, U, XS>(w_rows, x_rows, 1, k8_count, lane, acc, 32 * U);
  return acc[0][0];
}

}  // namespace moex::cuda
