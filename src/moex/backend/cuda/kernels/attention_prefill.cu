// Causal GQA attention for prefill chunks on the tensor cores, FlashAttention-2 style.
//
// A block owns 128 queries of one query head (8 warps x 16 queries; 64 and 4 warps at head_dim > 128) and
// walks the keys in tiles of 64 (32 at head_dim > 128). The tile's K and V rows come from dense bf16 copies of the
// sequence's keys, made once per launch (launch_prefill_dense_kv), by cp.async into two stages of shared memory, the
// next tile in flight while the warps compute on the current one; where head_dim % 8 != 0 (or
// MOEX_CUDA_PREFILL_KV_BF16=0) they are gathered from the paged fp32 cache and rounded to bf16 into shared memory
// by every block, one tile after another. Each warp computes S = Q K^T and O += P V with mma.sync
// m16n8k16 (bf16 in, fp32 accumulate), keeping its rows' online softmax (max and sum, in log2 units) and the
// output tile in registers. P never leaves registers: an m16n8 accumulator pair has the layout of an m16k16 A
// operand.
//
// Why: the fp32 kernel (attention.cu) runs prefill on the CUDA cores at ~4 TFLOP/s, 8.5 ms per layer for a
// 2048-token Mixtral prompt on an H100, which both the resident prefill and the offloaded one (whose expert
// copies wait for the next layer's routing) paid in full. The gathering version: 0.27 / 0.39 ms for Model A / B at
// 2048 tokens (64-89 TFLOP/s), bound by the fp32 K/V bytes each block pulled from L2 (64 KB a tile), not by its
// mma work; the bf16 copies halve those bytes and overlap them with the mma work.
// Precision: Q (pre-scaled), K, P and V are rounded to bf16, as in FlashAttention; the products and the
// softmax are fp32. Relative error 2e-3..3e-3 against a double-precision reference.
// Head dims are padded with zeros to 64, 128 or 256 (the template's DP); padded dims add nothing to Q K^T and
// their output columns are not written.
#include "moex/backend/cuda/cuda_resources.h"
#include "moex/backend/cuda/kernels/attention_params.cuh"
#include "moex/backend/cuda/kernels/common.cuh"
#include "moex/backend/cuda/kernels/mma_core.cuh"
#include "moex/backend/cuda/kernels/prefill_gemm.cuh"

#include <algorithm>

namespace moex::cuda {
namespace {

// At DP 256 the output tile alone is 128 registers a lane: fewer keys per tile and 4 warps a block.
template <int DP>
constexpr int key_tile() {
  return DP > 128 ? 32 : 64;
}
template <int DP>
constexpr int block_queries() {
  return DP > 128 ? 64 : 128;
}
// Row stride in bf16 elements: 16 bytes of padding put the 8 rows an ldmatrix reads in distinct banks.
template <int DP>
constexpr int row_stride() {
  return DP + 8;
}
// Q, then K and V of one key tile (gathering) or of two (dense copies: the next tile lands while one is read).
template <int DP, bool DENSE>
constexpr size_t smem_bytes() {
  return sizeof(bf16) * row_stride<DP>() * (block_queries<DP>() + (DENSE ? 4 : 2) * key_tile<DP>());
}

__device__ __forceinline__ uint32_t pack_f32x2(float lo, float hi) {
  return pack_bf16x2(__float2bfloat16_rn(lo), __float2bfloat16_rn(hi));
}

__device__ __forceinline__ void store_bf16x4(bf16* dst, const float4& v) {
  *reinterpret_cast<uint2*>(dst) = make_uint2(pack_f32x2(v.x, v.y), pack_f32x2(v.z, v.w));
}

__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// Lane (g = lane / 4, t = lane % 4) of warp w holds two rows of the block: queries q0 + 16 w + g ("a") and
// + 8 ("b"); accumulator elements 0-1 belong to a, 2-3 to b, at columns 2t, 2t + 1 of each 8-wide n-tile.
// Two blocks per SM: the K/V bytes each block pulls from L2 per tile, not the mma work, set the pace, so the
// more queries share a tile the better, as long as two blocks overlap each other's loads (<= 128 registers).
// DENSE: K and V from p.k_dense / p.v_dense by cp.async, two stages; otherwise gathered from the fp32 pages.
template <int DP, bool DENSE>
__global__ __launch_bounds__(block_queries<DP>() * 2, 2) void prefill_mma_kernel(AttentionParams p) {
  constexpr int BM = block_queries<DP>(), BN = key_tile<DP>(), S = row_stride<DP>(), C4 = DP / 4, C8 = DP / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* q_s = reinterpret_cast<bf16*>(smem_raw);  // [BM][S]
  bf16* kv_s = q_s + BM * S;                      // per stage: K [BN][S], then V [BN][S]
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int D = p.head_dim;
  // The last query tiles see the most keys: they are scheduled first.
  const int q0 = (gridDim.x - 1 - blockIdx.x) * BM;
  const int head = blockIdx.y, split = blockIdx.z, kv_head = head / p.group;
  const int q_end = min(q0 + BM, p.n);
  const int32_t* table = p.kv.tables + int64_t(p.kv.row_seq[q0]) * p.kv.table_stride;
  const int page_size = static_cast<int>(p.kv.page_size);
  // Positions grow with the query: the block's last query sees the most keys, a warp's last its most.
  const int split_begin = split * p.keys_per_split;
  const int split_end = min(split_begin + p.keys_per_split, p.kv.row_pos[q_end - 1] + 1);

  // Dense copies: tile k0's rows into stage `stage`, zero-filled past the split's keys and head_dim (one
  // commit group per tile).
  // (The copies' addresses are made from p inside: kept live across the loop they spilled at 128 registers.)
  auto issue_tile = [&](int k0, int stage) {
    bf16* ks = kv_s + stage * 2 * BN * S;
    bf16* vs = ks + BN * S;
    const int64_t head_base = int64_t(kv_head) * p.dense_keys * D;
    for (int i = threadIdx.x; i < BN * C8; i += blockDim.x) {
      const int j = i / C8, d = (i % C8) * 8, key = k0 + j;
      const bool valid = key < split_end && d < D;
      const int64_t off = valid ? head_base + int64_t(key) * D + d : 0;
      cp_async_16(ks + j * S + d, p.k_dense + off, valid);
      cp_async_16(vs + j * S + d, p.v_dense + off, valid);
    }
    cp_async_commit();
  };
  if constexpr (DENSE) {
    if (split_begin < split_end) issue_tile(split_begin, 0);  // lands while Q is loaded
  }

  for (int i = threadIdx.x; i < BM * C4; i += blockDim.x) {
    const int r = i / C4, d = (i % C4) * 4;
    float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
    if (q0 + r < p.n && d < D) {
      v = __ldg(reinterpret_cast<const float4*>(p.q + (int64_t(q0 + r) * p.heads + head) * D + d));
      v = make_float4(v.x * p.scale_log2, v.y * p.scale_log2, v.z * p.scale_log2, v.w * p.scale_log2);
    }
    store_bf16x4(q_s + r * S + d, v);
  }

  const int qa = q0 + warp * 16 + g, qb = qa + 8;
  const int lim_a = qa < p.n ? min(p.kv.row_pos[qa] + 1, split_end) : split_begin;
  const int lim_b = qb < p.n ? min(p.kv.row_pos[qb] + 1, split_end) : split_begin;
  const int warp_q_last = min(q0 + warp * 16 + 15, p.n - 1);
  const int warp_end = q0 + warp * 16 < p.n ? min(p.kv.row_pos[warp_q_last] + 1, split_end) : split_begin;

  float o[DP / 8][4];
#pragma unroll
  for (int nt = 0; nt < DP / 8; ++nt) o[nt][0] = o[nt][1] = o[nt][2] = o[nt][3] = 0.f;
  float m_a = -INFINITY, m_b = -INFINITY, l_a = 0.f, l_b = 0.f;  // l: this lane's columns only, summed at the end

  for (int k0 = split_begin, stage = 0; k0 < split_end; k0 += BN, stage ^= 1) {
    __syncthreads();  // the previous tile's readers are done (DENSE: its stage is refilled next)
    const bf16* k_s = kv_s + (DENSE ? stage * 2 * BN * S : 0);
    const bf16* v_s = k_s + BN * S;
    if constexpr (DENSE) {
      if (k0 + BN < split_end) {
        issue_tile(k0 + BN, stage ^ 1);
        cp_async_wait<1>();  // this thread's copies of tile k0 have landed
      } else {
        cp_async_wait<0>();
      }
    } else {
      for (int i = threadIdx.x; i < BN * C4; i += blockDim.x) {
        const int j = i / C4, d = (i % C4) * 4, key = k0 + j;
        float4 kv = make_float4(0.f, 0.f, 0.f, 0.f), vv = kv;
        if (key < split_end && d < D) {
          const int64_t off = (paged_slot(table, key, page_size) * p.kv_heads + kv_head) * D + d;
          kv = __ldg(reinterpret_cast<const float4*>(p.k_pages + off));
          vv = __ldg(reinterpret_cast<const float4*>(p.v_pages + off));
        }
        store_bf16x4(kv_s + j * S + d, kv);
        store_bf16x4(kv_s + (BN + j) * S + d, vv);
      }
    }
    __syncthreads();
    if (k0 >= warp_end) continue;  // warp-uniform: the whole tile is in this warp's future

    // S = Q K^T for the warp's 16 queries and the tile's BN keys, two k16 steps per K ldmatrix.
    float s[BN / 8][4];
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
    const bf16* q_warp = q_s + warp * 16 * S;
#pragma unroll
    for (int kk = 0; kk < DP / 16; kk += 2) {
      uint32_t a0[4], a1[4];
      ldmatrix_x4(q_warp + (lane & 15) * S + kk * 16 + (lane >> 4) * 8, a0);
      ldmatrix_x4(q_warp + (lane & 15) * S + (kk + 1) * 16 + (lane >> 4) * 8, a1);
#pragma unroll
      for (int j = 0; j < BN / 8; ++j) {
        uint32_t b[4];  // keys j*8.., dims kk*16 + 0/8/16/24: (b0, b1) of step kk, then of kk + 1
        ldmatrix_x4(k_s + (j * 8 + (lane & 7)) * S + kk * 16 + (lane >> 3) * 8, b);
        mma_bf16_16816(s[j], a0[0], a0[1], a0[2], a0[3], b[0], b[1]);
        mma_bf16_16816(s[j], a1[0], a1[1], a1[2], a1[3], b[2], b[3]);
      }
    }

    // Causal mask (and the split's end), then the online softmax of rows a and b.
    float mx_a = m_a, mx_b = m_b;
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
      const int key = k0 + j * 8 + 2 * t;
      if (key >= lim_a) s[j][0] = -INFINITY;
      if (key + 1 >= lim_a) s[j][1] = -INFINITY;
      if (key >= lim_b) s[j][2] = -INFINITY;
      if (key + 1 >= lim_b) s[j][3] = -INFINITY;
      mx_a = fmaxf(mx_a, fmaxf(s[j][0], s[j][1]));
      mx_b = fmaxf(mx_b, fmaxf(s[j][2], s[j][3]));
    }
    mx_a = quad_max(mx_a);
    mx_b = quad_max(mx_b);
    // A row with no key yet keeps max -inf: exponentiate against 0 so that it gets zeros, not NaN.
    const float base_a = mx_a == -INFINITY ? 0.f : mx_a, base_b = mx_b == -INFINITY ? 0.f : mx_b;
    const float corr_a = exp2f(m_a - base_a), corr_b = exp2f(m_b - base_b);
    m_a = mx_a;
    m_b = mx_b;
    float sum_a = 0.f, sum_b = 0.f;
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
      s[j][0] = exp2f(s[j][0] - base_a);
      s[j][1] = exp2f(s[j][1] - base_a);
      s[j][2] = exp2f(s[j][2] - base_b);
      s[j][3] = exp2f(s[j][3] - base_b);
      sum_a += s[j][0] + s[j][1];
      sum_b += s[j][2] + s[j][3];
    }
    l_a = l_a * corr_a + sum_a;
    l_b = l_b * corr_b + sum_b;
#pragma unroll
    for (int nt = 0; nt < DP / 8; ++nt) {
      o[nt][0] *= corr_a;
      o[nt][1] *= corr_a;
      o[nt][2] *= corr_b;
      o[nt][3] *= corr_b;
    }

    // O += P V: n-tiles 2kk and 2kk + 1 of S are the A operand of key step kk; V through ldmatrix.trans.
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      const uint32_t a0 = pack_f32x2(s[2 * kk][0], s[2 * kk][1]), a1 = pack_f32x2(s[2 * kk][2], s[2 * kk][3]);
      const uint32_t a2 = pack_f32x2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      const uint32_t a3 = pack_f32x2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
      for (int dp = 0; dp < DP / 16; ++dp) {
        uint32_t b[4];  // keys kk*16 + 0/8, dims dp*16 + 0/8: (b0, b1) of n-tile 2dp, then of 2dp + 1
        ldmatrix_x4_trans(v_s + (kk * 16 + (lane & 15)) * S + dp * 16 + (lane >> 4) * 8, b);
        mma_bf16_16816(o[2 * dp], a0, a1, a2, a3, b[0], b[1]);
        mma_bf16_16816(o[2 * dp + 1], a0, a1, a2, a3, b[2], b[3]);
      }
    }
  }

  l_a = quad_sum(l_a);
  l_b = quad_sum(l_b);
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int query = half ? qb : qa;
    if (query >= p.n) continue;
    const float m = half ? m_b : m_a, l = half ? l_b : l_a;
    if (p.part_acc) {
      const int64_t prow = (int64_t(split) * p.kv_heads + kv_head) * p.rows_per_head + int64_t(query) * p.group +
                           head % p.group;
#pragma unroll
      for (int nt = 0; nt < DP / 8; ++nt) {
        const int d = nt * 8 + 2 * t;  // D is even: d < D covers d + 1
        if (d < D)
          *reinterpret_cast<float2*>(p.part_acc + prow * D + d) = make_float2(o[nt][2 * half], o[nt][2 * half + 1]);
      }
      if (t == 0) {
        p.part_ml[prow * 2] = m;
        p.part_ml[prow * 2 + 1] = l;
      }
    } else {
      const float inv = 1.f / l;
      float* dst = p.out + (int64_t(query) * p.heads + head) * D;
#pragma unroll
      for (int nt = 0; nt < DP / 8; ++nt) {
        const int d = nt * 8 + 2 * t;
        if (d < D) *reinterpret_cast<float2*>(dst + d) = make_float2(o[nt][2 * half] * inv, o[nt][2 * half + 1] * inv);
      }
    }
  }
}

template <int DP, bool DENSE>
void launch_dp(const AttentionParams& p, dim3 grid, cudaStream_t stream) {
  constexpr size_t smem = smem_bytes<DP, DENSE>();
  static const bool configured = [] {  // above 48 KiB a kernel must opt in, once
    if (smem > 48 * 1024)
      cudaFuncSetAttribute(prefill_mma_kernel<DP, DENSE>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    return true;
  }();
  (void)configured;
  prefill_mma_kernel<DP, DENSE><<<grid, block_queries<DP>() * 2, smem, stream>>>(p);
}

template <int DP>
void launch_dp(const AttentionParams& p, dim3 grid, cudaStream_t stream) {
  if (p.k_dense) launch_dp<DP, true>(p, grid, stream);
  else launch_dp<DP, false>(p, grid, stream);
}

// Thread i of the grid: 8 dims of one (key, kv head) of K and of V, from the key's page to
// dense[kv_head][key][d], rounded as store_bf16x4 rounds (the gathering kernel's shared-memory tiles).
__global__ void prefill_dense_kv_kernel(AttentionParams p) {
  const int D = p.head_dim, chunks = D / 8;
  const int keys = p.kv.row_pos[p.n - 1] + 1;
  const int32_t* table = p.kv.tables + int64_t(p.kv.row_seq[0]) * p.kv.table_stride;
  const int64_t page_size = p.kv.page_size;
  const int64_t total = int64_t(keys) * p.kv_heads * chunks;
  bf16* k_out = const_cast<bf16*>(p.k_dense);
  bf16* v_out = const_cast<bf16*>(p.v_dense);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t key = i / (int64_t(p.kv_heads) * chunks);
    const int rest = static_cast<int>(i - key * p.kv_heads * chunks);
    const int kv_head = rest / chunks, d = (rest % chunks) * 8;
    const int64_t src = (paged_slot(table, key, page_size) * p.kv_heads + kv_head) * D + d;
    const int64_t dst = (int64_t(kv_head) * p.dense_keys + key) * D + d;
    const float4* k4 = reinterpret_cast<const float4*>(p.k_pages + src);
    const float4* v4 = reinterpret_cast<const float4*>(p.v_pages + src);
    const float4 k_lo = __ldg(k4), k_hi = __ldg(k4 + 1), v_lo = __ldg(v4), v_hi = __ldg(v4 + 1);
    store_bf16x4(k_out + dst, k_lo);
    store_bf16x4(k_out + dst + 4, k_hi);
    store_bf16x4(v_out + dst, v_lo);
    store_bf16x4(v_out + dst + 4, v_hi);
  }
}

}  // namespace

bool prefill_dense_kv_takes(const AttentionShape& shape) {
  return prefill_mma_fits(shape) && shape.head_dim % 8 == 0 && !env_equals("MOEX_CUDA_PREFILL_KV_BF16", "0");
}

size_t prefill_dense_kv_bytes(const AttentionShape& shape) {
  if (!prefill_dense_kv_takes(shape)) return 0;
  return 2 * sizeof(bf16) * static_cast<size_t>(shape.max_keys * shape.kv_heads * shape.head_dim);
}

void launch_prefill_dense_kv(const AttentionParams& p, cudaStream_t stream) {
  constexpr int kThreads = 256;
  const int64_t most = p.dense_keys * p.kv_heads * (p.head_dim / 8);
  const int64_t blocks = std::min<int64_t>(ceil_div(most, kThreads), 4096);
  if (blocks > 0) prefill_dense_kv_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
}

bool prefill_mma_fits(const AttentionShape& shape) {
  // MOEX_CUDA_FP32_ATTENTION=1 keeps every step on the fp32 kernels (A/B measurements, precision checks).
  static const bool fp32_only = env_equals("MOEX_CUDA_FP32_ATTENTION", "1");
  return !fp32_only && shape.one_sequence && shape.num_queries >= kPrefillMmaMinQueries && shape.head_dim % 4 == 0 &&
         shape.head_dim <= kAttentionMaxHeadDim;
}

int prefill_mma_key_tile(int head_dim) { return head_dim > 128 ? key_tile<256>() : key_tile<128>(); }

int prefill_mma_queries(int head_dim) { return head_dim > 128 ? block_queries<256>() : block_queries<128>(); }

void launch_prefill_mma(const AttentionParams& p, dim3 grid, cudaStream_t stream) {
  if (p.head_dim <= 64)
    launch_dp<64>(p, grid, stream);
  else if (p.head_dim <= 128)
    launch_dp<128>(p, grid, stream);
  else
    launch_dp<256>(p, grid, stream);
}

}  // namespace moex::cuda
