// The inner loop of the few-token matrix kernels (batched decode: 2-32 tokens against a weight read once):
// tensor-core mma.sync m16n8k16 with the weight rows as the 16-row A operand and up to 8 tokens per n-tile
// as B. CUDA-only header.
//
// Why this shape: the fp32 GEMV re-reads every activation from L1 for each weight load, so with 8 tokens it
// is bound by L1, not HBM (11-20% of HBM measured on an H200). Here a 16-byte weight load feeds 8 tokens'
// multiply-adds in two mma instructions.
// Precision: activations are split into bf16 hi + bf16 lo (x - hi), two mmas each, so x keeps ~16 mantissa
// bits (relative error ~1e-5, like fp32 summation) instead of bf16's 8; weights are bf16 already. The split
// doubles tensor-core work, which is idle in a bandwidth-bound kernel anyway.
// Layout trick: a lane loads 8 consecutive k of its weight row (16 bytes), and the 16 k columns of an mma are
// mapped onto them as logical (2t, 2t+1, 2t+8, 2t+9) -> actual (8t .. 8t+3) for lane group t; the B operand
// uses the same mapping, so the dot product is unchanged (k is summed in a permuted order).
#pragma once

#include "moex/backend/cuda/kernels/gemv_core.cuh"

namespace moex::cuda {

constexpr int kMmaRows = 16;        // weight rows per warp tile
constexpr int kMmaTileTokens = 8;   // tokens per n-tile
constexpr int kMmaKBlock = 32;      // k per 16-byte load of each lane group

__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                               uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Four 8x8 bf16 matrices from shared memory: lane i gives the address of row i % 8 of matrix i / 8 (16-byte
// aligned), and register j gets this lane's fragment of matrix j: (row lane / 4, cols 2 (lane % 4) + {0, 1}),
// or with .trans (rows 2 (lane % 4) + {0, 1}, col lane / 4). The prefill GEMMs and attention load their
// mma operands this way.
__device__ __forceinline__ void ldmatrix_x4(const void* smem_ptr, uint32_t (&r)[4]) {
  const auto addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem_ptr));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(const void* smem_ptr, uint32_t (&r)[4]) {
  const auto addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem_ptr));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ uint32_t pack_bf16x2(bf16 lo, bf16 hi) {
  return static_cast<uint32_t>(__bfloat16_as_ushort(lo)) | (static_cast<uint32_t>(__bfloat16_as_ushort(hi)) << 16);
}

// 8 floats -> 4 bf16x2 words of the rounded values (hi) and 4 of the remainders (lo).
__device__ __forceinline__ void split_bf16x8(const float4& v0, const float4& v1, uint32_t (&hi)[4], uint32_t (&lo)[4]) {
  const float v[8] = {v0.x, v0.y, v0.z, v0.w, v1.x, v1.y, v1.z, v1.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const bf16 a = __float2bfloat16_rn(v[2 * i]), b = __float2bfloat16_rn(v[2 * i + 1]);
    hi[i] = pack_bf16x2(a, b);
    lo[i] = pack_bf16x2(__float2bfloat16_rn(v[2 * i] - __bfloat162float(a)),
                        __float2bfloat16_rn(v[2 * i + 1] - __bfloat162float(b)));
  }
}

// k blocks a warp keeps in flight: weights (U x NR x 2 16-byte loads per lane) and activations (U x NT x 2
// float4) are all issued before the first mma of a round. With the activations loaded inside the mma loop
// instead, each n-tile's L2 round trip (~0.5 us) ran one after another behind the weights' (Model A at 32
// tokens: q/k/v/o at ~10% of HBM, Nsight Compute). Registers: 8 U (NR + NT) for the loads.
template <int NR, int NT>
constexpr int kMmaUnroll = NR + NT <= 2 ? 4 : 2;

// acc[r][nt] (m16n8 accumulator fragments) += rows [row0, row0 + 16) of weights w[r] ([n_rows, K] bf16, rows
// past n_rows read row n_rows - 1 and must be discarded by the caller) times this lane's token rows: x_row[nt]
// is the row of token nt * 8 + (lane / 4) (fp32, K floats, 16-byte aligned) or null for a missing token.
// Covers k blocks [kb_begin, kb_end) of kMmaKBlock; n-tiles from active_nt on hold no token (warp-uniform) and
// are skipped: a group sized for the step's largest (MoE: every expert's kernel gets NT for the most tokens
// any expert could have) would otherwise convert and multiply zeros. D layout: acc[..][0..1] = (row0 + lane/4, tokens 2t, 2t+1),
// acc[..][2..3] = (row0 + lane/4 + 8, same tokens), t = lane % 4.
template <int NR, int NT, int U>
__device__ __forceinline__ void warp_mma_tile(const bf16* const (&w)[NR], int row0, int n_rows, int64_t K,
                                              const float* const (&x_row)[NT], int active_nt, int kb_begin,
                                              int kb_end, int lane, float (&acc)[NR][NT][4]) {
  const int g = lane >> 2, t = lane & 3;
  const int64_t ra = min(row0 + g, n_rows - 1), rb = min(row0 + g + 8, n_rows - 1);
  const bf16* wa[NR];
  const bf16* wb[NR];
#pragma unroll
  for (int r = 0; r < NR; ++r) {
    wa[r] = w[r] + ra * K + 8 * t;
    wb[r] = w[r] + rb * K + 8 * t;
  }
  for (int kb = kb_begin; kb < kb_end; kb += U) {
    uint4 pa[U][NR], pb[U][NR];
    float4 xv[U][NT][2];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const bool ok = kb + u < kb_end;
#pragma unroll
      for (int r = 0; r < NR; ++r) {
        pa[u][r] = ok ? load_stream_16b(wa[r] + int64_t(kb + u) * kMmaKBlock) : uint4{};
        pb[u][r] = ok ? load_stream_16b(wb[r] + int64_t(kb + u) * kMmaKBlock) : uint4{};
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        // A missing token (or k block) multiplies zeros: its outputs are discarded.
        if (nt < active_nt && kb + u < kb_end && x_row[nt]) {
          const float4* xp = reinterpret_cast<const float4*>(x_row[nt] + int64_t(kb + u) * kMmaKBlock + 8 * t);
          xv[u][nt][0] = __ldg(xp);
          xv[u][nt][1] = __ldg(xp + 1);
        } else {
          xv[u][nt][0] = xv[u][nt][1] = make_float4(0.f, 0.f, 0.f, 0.f);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (kb + u >= kb_end) break;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        if (nt >= active_nt) break;
        uint32_t hi[4], lo[4];
        split_bf16x8(xv[u][nt][0], xv[u][nt][1], hi, lo);
#pragma unroll
        for (int r = 0; r < NR; ++r) {
          const uint4& a = pa[u][r];
          const uint4& b = pb[u][r];
          mma_bf16_16816(acc[r][nt], a.x, b.x, a.y, b.y, hi[0], hi[1]);
          mma_bf16_16816(acc[r][nt], a.x, b.x, a.y, b.y, lo[0], lo[1]);
          mma_bf16_16816(acc[r][nt], a.z, b.z, a.w, b.w, hi[2], hi[3]);
          mma_bf16_16816(acc[r][nt], a.z, b.z, a.w, b.w, lo[2], lo[3]);
        }
      }
    }
  }
}

// The block-level split-K of the few-token kernels: kWarps warps each take a contiguous share of the k
// blocks of the same 16 rows, then sum in warp order (deterministic). red: [warps][NR * NT * 4][32] floats.
// After the call, for v in [0, NT * 4 * 32) (one per thread and round), sums for r come from mma_block_sum.
template <int NR, int NT>
struct MmaBlockReduce {
  static constexpr int kValues = NR * NT * 4;
  // Stores this warp's accumulators.
  __device__ __forceinline__ static void store(float* red, const float (&acc)[NR][NT][4], int warp, int lane) {
#pragma unroll
    for (int r = 0; r < NR; ++r)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int c = 0; c < 4; ++c) red[(warp * kValues + (r * NT + nt) * 4 + c) * 32 + lane] = acc[r][nt][c];
  }
  // Sum over warps of value (r, nt, c) of lane `lane`.
  __device__ __forceinline__ static float sum(const float* red, int warps, int r, int nt, int c, int lane) {
    float total = 0.f;
    for (int w = 0; w < warps; ++w) total += red[(w * kValues + (r * NT + nt) * 4 + c) * 32 + lane];
    return total;
  }
};

// The (row offset within the 16-row tile, token) of accumulator element c of lane `lane` in n-tile nt.
__device__ __forceinline__ void mma_coords(int lane, int nt, int c, int* row, int* token) {
  *row = (lane >> 2) + (c >= 2 ? 8 : 0);
  *token = nt * kMmaTileTokens + 2 * (lane & 3) + (c & 1);
}

// Each lane's token row for n-tile nt: row_of(i) for token i = nt * 8 + lane / 4 when i < count, else null.
template <int NT, typename RowOf>
__device__ __forceinline__ void mma_token_rows(int lane, int count, RowOf row_of, const float* (&x_row)[NT]) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int i = nt * kMmaTileTokens + (lane >> 2);
    x_row[nt] = i < count ? row_of(i) : nullptr;
  }
}

// A block of `warps` warps computes rows [row0, row0 + 16) of the NR weights for the first `tokens` token rows
// (<= NT * 8): warp w takes the w-th share of K's blocks, then the partial sums land in red (MmaBlockReduce
// layout) and the block syncs.
template <int NR, int NT>
__device__ __forceinline__ void block_mma_tile(const bf16* const (&w)[NR], int row0, int n_rows, int64_t K,
                                               const float* const (&x_row)[NT], int tokens, int warps, float* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int blocks = static_cast<int>(K / kMmaKBlock);
  const int active_nt = (tokens + kMmaTileTokens - 1) / kMmaTileTokens;
  float acc[NR][NT][4] = {};
  warp_mma_tile<NR, NT, kMmaUnroll<NR, NT>>(w, row0, n_rows, K, x_row, active_nt, warp * blocks / warps,
                                            (warp + 1) * blocks / warps, lane, acc);
  MmaBlockReduce<NR, NT>::store(red, acc, warp, lane);
  __syncthreads();
}

// Calls out(row, token, sum_r) for every (row < n_rows, token < count) of the tile just reduced into red, with
// sum_r(r) the warp-ordered sum for weight r; the elements are spread over the block's threads.
template <int NR, int NT, typename Out>
__device__ __forceinline__ void for_each_mma_output(const float* red, int warps, int row0, int n_rows, int count,
                                                    Out out) {
  for (int v = threadIdx.x; v < NT * 4 * 32; v += blockDim.x) {
    const int l = v & 31, c = (v >> 5) & 3, nt = v >> 7;
    int row, token;
    mma_coords(l, nt, c, &row, &token);
    row += row0;
    if (row < n_rows && token < count)
      out(row, token, [&](int r) { return MmaBlockReduce<NR, NT>::sum(red, warps, r, nt, c, l); });
  }
}

}  // namespace moex::cuda
