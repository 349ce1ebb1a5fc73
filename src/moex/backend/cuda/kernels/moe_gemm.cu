// Tensor-core GEMMs for prefill: out = A @ B^T with A [rows, K] and B [N, K] both K-contiguous (the
// checkpoint's [out, in] layout), bf16 in, fp32 accumulate, via WMMA (mma.sync 16x16x16). One launch covers
// every group of a layer: blockIdx.y indexes a tile list planned on the host (expert, up to 64 rows), so
// experts with no tokens cost nothing and there is no per-expert launch. The gate/up instance keeps two
// accumulator sets and applies SwiGLU on the fragments (both share one element layout), so the activation
// is written once, as bf16, ready to be stage 2's A operand.
// Block tile 64x64x32, 4 warps of 32x32, two cp.async stages.
#include <mma.h>

#include "moex/backend/cuda/kernels/common.cuh"
#include "moex/backend/cuda/kernels/moe.cuh"

namespace moex::cuda {
namespace {

using namespace nvcuda;

constexpr int kBM = kMoeGemmTileRows, kBN = 64, kBK = 32;
constexpr int kLds = kBK + 8;  // 80-byte smem rows: ldmatrix rows land on distinct banks
constexpr int kLdc = kBN + 4;
constexpr int kThreads = 128;

struct GemmParams {
  const bf16* a;  // [rows, K]
  const MoeGroup* tiles;  // null: dense, one B for all rows
  const bf16* dense_b;
  const float* bias;
  int64_t rows;  // dense only
  int K, N;
  bool use_down;  // grouped: B = tile.down (stage 2) instead of tile.gate/up
  float* out_f32;
  bf16* out_bf16;
};

__device__ __forceinline__ void cp_async_16(void* smem_ptr, const void* gmem_ptr, bool valid) {
  unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_ptr));
  int src_size = valid ? 16 : 0;  // 0: zero-fill, nothing read
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(gmem_ptr), "r"(src_size));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N)); }

template <bool kSwiGLU>
__global__ __launch_bounds__(kThreads) void gemm_kernel(GemmParams p) {
  constexpr int kNumB = kSwiGLU ? 2 : 1;
  constexpr int kStageRows = kBM + kNumB * kBN;
  constexpr int kStageElems = kStageRows * kLds;
  constexpr int kPipeBytes = 2 * kStageElems * 2;
  constexpr int kEpiBytes = kBM * kLdc * 4;
  __shared__ __align__(128) unsigned char smem_raw[kPipeBytes > kEpiBytes ? kPipeBytes : kEpiBytes];
  bf16* smem = reinterpret_cast<bf16*>(smem_raw);

  int row_begin, row_end;
  const bf16* b0;
  const bf16* b1 = nullptr;
  if (p.tiles) {
    MoeGroup t = p.tiles[blockIdx.y];
    row_begin = t.row_begin;
    row_end = t.row_begin + t.num_rows;
    b0 = reinterpret_cast<const bf16*>(p.use_down ? t.down : t.gate);
    if constexpr (kSwiGLU) b1 = reinterpret_cast<const bf16*>(t.up);
  } else {
    row_begin = blockIdx.y * kBM;
    row_end = static_cast<int>(row_begin + kBM < p.rows ? row_begin + kBM : p.rows);
    b0 = p.dense_b;
  }
  const int n0 = blockIdx.x * kBN;
  const int K = p.K, N = p.N;
  const int tid = threadIdx.x, warp = tid >> 5;
  const int wm = warp >> 1, wn = warp & 1;

  auto load_stage = [&](int stage, int k0) {
    bf16* s = smem + stage * kStageElems;
    for (int c = tid; c < kStageRows * (kBK / 8); c += kThreads) {
      int r = c / (kBK / 8), kc = (c % (kBK / 8)) * 8;
      bool k_ok = k0 + kc < K;
      const bf16* src;
      bool valid;
      if (r < kBM) {
        int row = row_begin + r;
        valid = k_ok && row < row_end;
        src = p.a + (valid ? int64_t(row) * K + k0 + kc : 0);
      } else {
        int br = r - kBM;
        const bf16* b = (kSwiGLU && br >= kBN) ? b1 : b0;
        int n = n0 + br % kBN;
        valid = k_ok && n < N;
        src = b + (valid ? int64_t(n) * K + k0 + kc : 0);
      }
      cp_async_16(s + r * kLds + kc, src, valid);
    }
    cp_async_commit();
  };

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc0[2][2], acc1[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      wmma::fill_fragment(acc0[i][j], 0.f);
      if constexpr (kSwiGLU) wmma::fill_fragment(acc1[i][j], 0.f);
    }

  const int k_tiles = (K + kBK - 1) / kBK;
  load_stage(0, 0);
  for (int kt = 0; kt < k_tiles; ++kt) {
    if (kt + 1 < k_tiles) {
      load_stage((kt + 1) & 1, (kt + 1) * kBK);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const bf16* s = smem + (kt & 1) * kStageElems;
    const bf16* as = s;
    const bf16* bs0 = s + kBM * kLds;
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> fb[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], as + (wm * 32 + i * 16) * kLds + kk, kLds);
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], bs0 + (wn * 32 + j * 16) * kLds + kk, kLds);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc0[i][j], fa[i], fb[j], acc0[i][j]);
      if constexpr (kSwiGLU) {
        const bf16* bs1 = bs0 + kBN * kLds;
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], bs1 + (wn * 32 + j * 16) * kLds + kk, kLds);
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int j = 0; j < 2; ++j) wmma::mma_sync(acc1[i][j], fa[i], fb[j], acc1[i][j]);
      }
    }
    __syncthreads();
  }

  float* cs = reinterpret_cast<float*>(smem_raw);
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      if constexpr (kSwiGLU) {
#pragma unroll
        for (int e = 0; e < acc0[i][j].num_elements; ++e) acc0[i][j].x[e] = silu(acc0[i][j].x[e]) * acc1[i][j].x[e];
      }
      wmma::store_matrix_sync(cs + (wm * 32 + i * 16) * kLdc + wn * 32 + j * 16, acc0[i][j], kLdc,
                              wmma::mem_row_major);
    }
  __syncthreads();
  for (int idx = tid; idx < kBM * kBN; idx += kThreads) {
    int r = idx / kBN, c = idx % kBN;
    int row = row_begin + r, col = n0 + c;
    if (row >= row_end || col >= N) continue;
    float v = cs[r * kLdc + c];
    if constexpr (kSwiGLU) {
      p.out_bf16[int64_t(row) * N + col] = __float2bfloat16_rn(v);
    } else {
      if (p.bias) v += p.bias[col];
      p.out_f32[int64_t(row) * N + col] = v;
    }
  }
}

}  // namespace

void launch_moe_gemm_gate_up(const uint16_t* a, const MoeGroup* tiles, int num_tiles, int64_t hidden, int64_t ffn,
                             uint16_t* h, cudaStream_t stream) {
  if (num_tiles == 0) return;
  GemmParams p{};
  p.a = reinterpret_cast<const bf16*>(a);
  p.tiles = tiles;
  p.K = static_cast<int>(hidden);
  p.N = static_cast<int>(ffn);
  p.out_bf16 = reinterpret_cast<bf16*>(h);
  dim3 grid(static_cast<unsigned>(ceil_div(ffn, kBN)), static_cast<unsigned>(num_tiles));
  gemm_kernel<true><<<grid, kThreads, 0, stream>>>(p);
}

void launch_moe_gemm_down(const uint16_t* h, const MoeGroup* tiles, int num_tiles, int64_t hidden, int64_t ffn,
                          float* y, cudaStream_t stream) {
  if (num_tiles == 0) return;
  GemmParams p{};
  p.a = reinterpret_cast<const bf16*>(h);
  p.tiles = tiles;
  p.K = static_cast<int>(ffn);
  p.N = static_cast<int>(hidden);
  p.use_down = true;
  p.out_f32 = y;
  dim3 grid(static_cast<unsigned>(ceil_div(hidden, kBN)), static_cast<unsigned>(num_tiles));
  gemm_kernel<false><<<grid, kThreads, 0, stream>>>(p);
}

void launch_dense_gemm(const uint16_t* a, int64_t M, int64_t K, const uint16_t* w, int64_t N, const float* bias,
                       float* out, cudaStream_t stream) {
  if (M == 0 || N == 0) return;
  GemmParams p{};
  p.a = reinterpret_cast<const bf16*>(a);
  p.dense_b = reinterpret_cast<const bf16*>(w);
  p.bias = bias;
  p.rows = M;
  p.K = static_cast<int>(K);
  p.N = static_cast<int>(N);
  p.out_f32 = out;
  dim3 grid(static_cast<unsigned>(ceil_div(N, kBN)), static_cast<unsigned>(ceil_div(M, kBM)));
  gemm_kernel<false><<<grid, kThreads, 0, stream>>>(p);
}

}  // namespace moex::cuda
