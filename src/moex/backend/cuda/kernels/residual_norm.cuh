// The residual step of a decode block, done by the kernel that consumes it (one row, batch 1): every block of
// that kernel computes h = rms_norm(x + d0 + d1) * weight into its own shared memory. The row is a few KB that
// L2 holds, and the block's weight loads are already in flight (preload_row): two launches fewer per layer
// (the norm before q/k/v and the one before the router). Measured on an H200 against the norms as launches of
// their own (MOEX_CUDA_FUSED_NORMS=0, same call): Model B 3.666-3.710 vs 3.748 ms/token (48 layers), Model A
// 0.674-0.681 vs 0.681: under programmatic dependent launch a norm kernel had cost ~0.4 us, not its 3.6 us
// Nsight Compute duration. CUDA-only header; host-visible types are in gemv.cuh.
#pragma once

#include <type_traits>

#include "moex/backend/cuda/kernels/common.cuh"
#include "moex/backend/cuda/kernels/gemv.cuh"

namespace moex::cuda {

// Four norm weights from column 4 col4 on, as fp32 (a bf16 weight widened by shifts). norm.cu's kernels too.
__device__ __forceinline__ float4 load_norm_weight4(const void* weight, bool weight_bf16, int col4) {
  if (weight_bf16) {
    const uint2 w = static_cast<const uint2*>(weight)[col4];
    return make_float4(__uint_as_float(w.x << 16), __uint_as_float(w.x & 0xffff0000u), __uint_as_float(w.y << 16),
                       __uint_as_float(w.y & 0xffff0000u));
  }
  return static_cast<const float4*>(weight)[col4];
}

// (x + d0) + d1 at float4 c: the order in which the unfused decoder adds the two block outputs into x, so x
// stays bit-identical when the last block writes it back.
__device__ __forceinline__ float4 residual_sum4(const ResidualNormIn& in, int c) {
  float4 v = reinterpret_cast<const float4*>(in.x)[c];
  if (in.d0) {
    const float4 d = reinterpret_cast<const float4*>(in.d0)[c];
    v = make_float4(v.x + d.x, v.y + d.y, v.z + d.z, v.w + d.w);
  }
  if (in.d1) {
    const float4 d = reinterpret_cast<const float4*>(in.d1)[c];
    v = make_float4(v.x + d.x, v.y + d.y, v.z + d.z, v.w + d.w);
  }
  return v;
}

// The norm weight a thread of a blockDim-thread block applies: float4 c = threadIdx.x + i * blockDim.x into w[i].
// A weight does not depend on the kernel before, so consumers load it before their PDL wait: it had been read
// after the row's sum of squares, one more memory round trip (from HBM: the step's weight stream evicts it from
// L2) on the critical path of every fused norm. NW * 4 * blockDim >= K (with_norm_weight_regs picks NW).
template <int NW>
__device__ __forceinline__ void preload_norm_weight(const ResidualNormIn& in, int K, float4 (&w)[NW]) {
#pragma unroll
  for (int i = 0; i < NW; ++i) {
    const int c = threadIdx.x + i * blockDim.x;
    w[i] = c < K / 4 ? load_norm_weight4(in.weight, in.weight_bf16, c) : make_float4(0.f, 0.f, 0.f, 0.f);
  }
}

// s_h[0, K) = rms_norm(row) * weight, as rms_norm_vec_kernel computes it (v * inv * w), with float4 c of the row
// = row4(c), w preloaded by preload_norm_weight. Every thread of the block calls it (block reductions inside); s_h
// is visible to the whole block on return. K % 4 == 0, all pointers 16-byte aligned (residual_norm_fits).
template <int NW, typename Row4>
__device__ __forceinline__ void row_norm_to_shared(const ResidualNormIn& in, int K, const float4 (&w)[NW],
                                                   float* s_h, float* s_scratch, Row4 row4) {
  const int k4 = K / 4;
  float sum_sq = 0.f;
#pragma unroll
  for (int i = 0; i < NW; ++i) {
    const int c = threadIdx.x + i * blockDim.x;
    if (c < k4) {
      const float4 v = row4(c);
      reinterpret_cast<float4*>(s_h)[c] = v;
      sum_sq += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
    }
  }
  const float inv = rsqrtf(block_sum(sum_sq, s_scratch) / static_cast<float>(K) + in.eps);
#pragma unroll
  for (int i = 0; i < NW; ++i) {
    const int c = threadIdx.x + i * blockDim.x;
    if (c < k4) {
      const float4 v = reinterpret_cast<const float4*>(s_h)[c];
      reinterpret_cast<float4*>(s_h)[c] =
          make_float4(v.x * inv * w[i].x, v.y * inv * w[i].y, v.z * inv * w[i].z, v.w * inv * w[i].w);
    }
  }
  __syncthreads();
}

// s_h[0, K) = rms_norm(x + d0 + d1) * weight (row_norm_to_shared).
template <int NW>
__device__ __forceinline__ void residual_norm_to_shared(const ResidualNormIn& in, int K, const float4 (&w)[NW],
                                                        float* s_h, float* s_scratch) {
  row_norm_to_shared(in, K, w, s_h, s_scratch, [&](int c) { return residual_sum4(in, c); });
}

// Calls f(std::integral_constant<int, NW>) with the fewest preloaded float4s per thread that cover K at
// `threads` threads per block (2, 4 or 8: K <= kResidualNormMaxK at 256 threads), so a 2048-wide row keeps 8
// registers for its weight, not 32.
template <typename F>
void with_norm_weight_regs(int64_t K, int threads, F&& f) {
  const int64_t per_thread = (K / 4 + threads - 1) / threads;
  if (per_thread <= 2) f(std::integral_constant<int, 2>{});
  else if (per_thread <= 4) f(std::integral_constant<int, 4>{});
  else f(std::integral_constant<int, 8>{});
}

}  // namespace moex::cuda
