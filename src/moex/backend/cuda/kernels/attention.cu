// Attention over the paged KV cache, two kernels:
// - Decode rows (one query per sequence, any number of sequences): decode_attention_kernel. A block owns one
//   row's GQA group of query heads (or a part of it: see choose_layout) for one kv head and one split of its
//   keys; its 4 warps take 32-key chunks in turn. Lane j scores key j of a chunk for every head of the block
//   (K read straight from the page, float4), then lanes own head dims for P.V, so all 128 threads work even at
//   group 2 and short contexts. The warps' online softmaxes merge in shared memory; with several splits a
//   second kernel merges the splits. The first kernel (below) ran one warp of four per group-of-2 block and a
//   serial 128-step dot per lane: 19 us per layer at 18 keys on an H100 (Model A), 14% of the batch-1 step.
//   Rows of distinct sequences (every decode step) take decode_attention_dims_kernel instead: lanes own head
//   dims and warps take keys, so a row is one coalesced load and earlier steps' keys load before the PDL wait.
//   Both hold the step's q/k norm + RoPE and KV write as a prologue (rope_kv_attention).
// - Prefill chunks of >= 16 queries go to the tensor-core kernel (attention_prefill.cu); shorter ones and the
//   shapes neither covers (head_dim not a multiple of 4, several sequences' rows): attention_kernel. A block
//   owns one kv head and up to 8 "rows" (query, head-of-group) pairs of one sequence, so the K/V tile it stages
//   in shared memory (gathered through the block table) serves every query head of the group and several
//   queries. Keys are visited in tiles of 32, lane j scoring key j, with an online softmax per row in registers.
// fp32 CUDA-core arithmetic: at decode the step is bound by weight bytes, not attention FLOPs.
#include "moex/backend/cuda/kernels/attention.cuh"
#include "moex/backend/cuda/kernels/attention_params.cuh"
#include "moex/backend/cuda/kernels/common.cuh"
#include "moex/backend/cuda/kernels/launch.cuh"

#include <cooperative_groups.h>

#include <algorithm>
#include <type_traits>
#include <vector>

namespace moex::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kRowsPerWarp = 2;
constexpr int kRowsPerBlock = kWarps * kRowsPerWarp;
constexpr int kKeyTile = 32;
constexpr int kMaxSplits = 64;
constexpr float kLog2e = 1.4426950408889634f;

using Params = AttentionParams;

size_t smem_bytes(int head_dim) {
  return sizeof(float) * (kRowsPerBlock * head_dim + kKeyTile * (head_dim + 1) + kKeyTile * head_dim);
}

template <int DPL>
__global__ __launch_bounds__(kWarps * 32) void attention_kernel(Params p) {
  extern __shared__ float smem[];
  const int D = p.head_dim;
  float* q_s = smem;                              // [kRowsPerBlock][D]
  float* k_s = q_s + kRowsPerBlock * D;           // [kKeyTile][D + 1]: padded so lane j's row is its own bank
  float* v_s = k_s + kKeyTile * (D + 1);          // [kKeyTile][D]
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int kv_head = blockIdx.y, split = blockIdx.z;
  // Rows are (query, head of the group) pairs, r = query * group + head_in_group. A prefill chunk tiles them
  // 8 at a time across queries; otherwise a block takes up to 8 heads of one query.
  int row0, row_end;
  if (p.one_sequence) {
    row0 = blockIdx.x * kRowsPerBlock;
    row_end = min(row0 + kRowsPerBlock, p.rows_per_head);
  } else {
    const int query = blockIdx.x / p.head_chunks;
    row0 = query * p.group + (blockIdx.x % p.head_chunks) * kRowsPerBlock;
    row_end = min(row0 + kRowsPerBlock, (query + 1) * p.group);
  }
  const int32_t* table = p.kv.tables + int64_t(p.kv.row_seq[row0 / p.group]) * p.kv.table_stride;
  const int page_size = static_cast<int>(p.kv.page_size);

  for (int idx = threadIdx.x; idx < kRowsPerBlock * D; idx += blockDim.x) {
    int r = row0 + idx / D, d = idx % D;
    float v = 0.f;
    if (r < row_end) {
      int query = r / p.group, head = kv_head * p.group + r % p.group;
      v = p.q[(int64_t(query) * p.heads + head) * D + d] * p.scale_log2;
    }
    q_s[idx] = v;
  }

  // Positions grow with the query inside a prefill chunk: the block's last row sees the most keys.
  const int64_t block_key_end = int64_t(p.kv.row_pos[(row_end - 1) / p.group]) + 1;
  const int64_t split_begin = int64_t(split) * p.keys_per_split;
  const int64_t split_end = min(split_begin + p.keys_per_split, block_key_end);

  float m[kRowsPerWarp], l[kRowsPerWarp], acc[kRowsPerWarp][DPL];
  int64_t row_limit[kRowsPerWarp];
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    int r = row0 + warp * kRowsPerWarp + rr;
    row_limit[rr] = r < row_end ? min(int64_t(p.kv.row_pos[r / p.group]) + 1, split_end) : split_begin;
    m[rr] = -INFINITY;
    l[rr] = 0.f;
#pragma unroll
    for (int i = 0; i < DPL; ++i) acc[rr][i] = 0.f;
  }

  for (int64_t tile = split_begin; tile < split_end; tile += kKeyTile) {
    __syncthreads();
    for (int idx = threadIdx.x; idx < kKeyTile * D; idx += blockDim.x) {
      int j = idx / D, d = idx % D;
      int64_t key = tile + j;
      float kv = 0.f, vv = 0.f;
      if (key < split_end) {
        const int64_t off = (paged_slot<int64_t>(table, key, page_size) * p.kv_heads + kv_head) * D + d;
        kv = p.k_pages[off];
        vv = p.v_pages[off];
      }
      k_s[j * (D + 1) + d] = kv;
      v_s[j * D + d] = vv;
    }
    __syncthreads();
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      if (tile >= row_limit[rr]) continue;  // warp-uniform
      const float* qr = q_s + (warp * kRowsPerWarp + rr) * D;
      const float* kr = k_s + lane * (D + 1);
      float s = 0.f;
      for (int d = 0; d < D; ++d) s += qr[d] * kr[d];
      if (tile + lane >= row_limit[rr]) s = -INFINITY;
      float m_new = fmaxf(m[rr], warp_max(s));
      float prob = exp2f(s - m_new);
      float corr = exp2f(m[rr] - m_new);
      l[rr] = l[rr] * corr + warp_sum(prob);
#pragma unroll
      for (int i = 0; i < DPL; ++i) acc[rr][i] *= corr;
      for (int j = 0; j < kKeyTile; ++j) {
        float pj = __shfl_sync(0xffffffffu, prob, j);
#pragma unroll
        for (int i = 0; i < DPL; ++i) {
          int d = lane + 32 * i;
          if (d < D) acc[rr][i] += pj * v_s[j * D + d];
        }
      }
      m[rr] = m_new;
    }
  }

#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    int r = row0 + warp * kRowsPerWarp + rr;
    if (r >= row_end) continue;
    if (p.part_acc) {
      int64_t prow = int64_t(split) * p.kv_heads * p.rows_per_head + int64_t(kv_head) * p.rows_per_head + r;
#pragma unroll
      for (int i = 0; i < DPL; ++i) {
        int d = lane + 32 * i;
        if (d < D) p.part_acc[prow * D + d] = acc[rr][i];
      }
      if (lane == 0) {
        p.part_ml[prow * 2] = m[rr];
        p.part_ml[prow * 2 + 1] = l[rr];
      }
    } else {
      int query = r / p.group, head = kv_head * p.group + r % p.group;
      float inv = 1.f / l[rr];
#pragma unroll
      for (int i = 0; i < DPL; ++i) {
        int d = lane + 32 * i;
        if (d < D) p.out[(int64_t(query) * p.heads + head) * D + d] = acc[rr][i] * inv;
      }
    }
  }
}

// One warp per (kv head, row): merges the splits' (m, l, acc) into the final normalised output.
__global__ void attention_merge_kernel(Params p, int splits) {
  pdl_launch_dependents();
  pdl_wait();
  int lane = threadIdx.x & 31;
  int64_t flat = blockIdx.x * int64_t(blockDim.x >> 5) + (threadIdx.x >> 5);
  int64_t total = int64_t(p.kv_heads) * p.rows_per_head;
  if (flat >= total) return;
  int kv_head = static_cast<int>(flat / p.rows_per_head), r = static_cast<int>(flat % p.rows_per_head);
  float m_max = -INFINITY;
  for (int s = 0; s < splits; ++s) m_max = fmaxf(m_max, p.part_ml[(s * total + flat) * 2]);
  float l_sum = 0.f;
  for (int s = 0; s < splits; ++s) {
    float ms = p.part_ml[(s * total + flat) * 2];
    if (ms != -INFINITY) l_sum += p.part_ml[(s * total + flat) * 2 + 1] * exp2f(ms - m_max);
  }
  int query = r / p.group, head = kv_head * p.group + r % p.group;
  for (int d = lane; d < p.head_dim; d += 32) {
    float v = 0.f;
    for (int s = 0; s < splits; ++s) {
      float ms = p.part_ml[(s * total + flat) * 2];
      if (ms != -INFINITY) v += p.part_acc[(s * total + flat) * p.head_dim + d] * exp2f(ms - m_max);
    }
    p.out[(int64_t(query) * p.heads + head) * p.head_dim + d] = v / l_sum;
  }
}


// ---- decode rows ------------------------------------------------------------------------------------------

constexpr int kDecodeWarps = 4;
// A split gives every warp at least two chunks: a recorded step sizes its grid for its bucket (256 keys at
// least), and at one chunk per warp the second split of a short context and its merge kernel were pure cost.
constexpr int kDecodeSplitKeys = 2 * kDecodeWarps * kKeyTile;
constexpr int kPvBatch = 8;                                  // V rows in flight per lane in P.V

bool decode_kernel_fits(const AttentionShape& shape) {
  const int64_t group = shape.heads / shape.kv_heads;
  // One row is "one sequence" too: batch-1 decode.
  return (!shape.one_sequence || shape.num_queries == 1) && (group == 1 || group == 2 || group == 4 || group == 8) &&
         shape.head_dim % 32 == 0 && shape.head_dim <= kAttentionMaxHeadDim;
}

constexpr size_t decode_smem_bytes(int group, int head_dim, bool rope, int warps = kDecodeWarps) {
  // q [G][D], then per warp: m [G], l [G], acc [G][D]; with the RoPE prologue the step's k and v rows [2][D] and
  // a row of scratch per warp.
  return sizeof(float) * (group * head_dim + warps * group * (head_dim + 2) + (rope ? (2 + warps) * head_dim : 0));
}
// So no launch needs the opt-in to more than the default dynamic shared memory.
static_assert(decode_smem_bytes(8, kAttentionMaxHeadDim, true) <= 48 * 1024, "decode attention outgrew 48 KiB of smem");

// Blocks of twice the warps (twice the keys a round, the first round loaded before the PDL wait) for the
// dims-per-lane kernel's blocks of one or two heads, where the kernel before leaves room for them
// (wide_decode_heads).
constexpr int kWideDecodeWarps = 8, kWideDecodeMaxGroup = 2;
static_assert(decode_smem_bytes(kWideDecodeMaxGroup, kAttentionMaxHeadDim, true, kWideDecodeWarps) <= 48 * 1024,
              "wide decode attention outgrew 48 KiB of smem");

// Dynamic shared memory of the dims-per-lane kernel: m, l, acc per warp; with ROPE also q [G][D], the step's k and
// v [2][D] and a scratch row per warp (the key-per-lane kernel's layout, decode_smem_bytes, checked against the
// 48 KB default); in cluster mode the block's merged rows [G][2 + D] after them.
size_t decode_dims_smem_bytes(int group, int head_dim, bool rope, bool cluster, int warps = kDecodeWarps) {
  const size_t warp_rows = sizeof(float) * (warps * group * (head_dim + 2));
  return (rope ? decode_smem_bytes(group, head_dim, true, warps) : warp_rows) +
         (cluster ? sizeof(float) * group * (head_dim + 2) : 0);
}

// A decode row's keys in the paged cache for one split: the range it reads and where each key's row of this kv
// head starts. Built before the PDL wait (the rows and tables are uploaded before the step).
struct DecodeKeys {
  const int32_t* table;
  int page_size;
  int end;          // the row's keys are [0, end): end - 1 is the step's own
  int split_begin;  // this block's split: [split_begin, split_end)
  int split_end;
  int64_t head_stride;  // floats between consecutive slots
  int64_t head_offset;  // the kv head's row within a slot
  __device__ __forceinline__ DecodeKeys(const Params& p, int query, int split, int kv_head, int head_dim)
      : table(p.kv.tables + int64_t(p.kv.row_seq[query]) * p.kv.table_stride),
        page_size(static_cast<int>(p.kv.page_size)),
        end(p.kv.row_pos[query] + 1),
        split_begin(split * p.keys_per_split),
        split_end(min(split_begin + p.keys_per_split, end)),
        head_stride(int64_t(p.kv_heads) * head_dim),
        head_offset(int64_t(kv_head) * head_dim) {}
  // Where key's row of the kv head starts in k_pages / v_pages.
  __device__ __forceinline__ int64_t offset(int key) const {
    return paged_slot(table, key, page_size) * head_stride + head_offset;
  }
};

template <int G, int DPL>
struct WarpSoftmax {  // a warp's online softmax per head of the block, acc over the lane's dims
  float m[G], l[G], acc[G][DPL];
  __device__ __forceinline__ WarpSoftmax() {
#pragma unroll
    for (int g = 0; g < G; ++g) {
      m[g] = -INFINITY;
      l[g] = 0.f;
#pragma unroll
      for (int i = 0; i < DPL; ++i) acc[g][i] = 0.f;
    }
  }
};

// The end of both decode kernels: each warp's online softmax (m, l, acc over the lane's dims d = lane + 32 i)
// merged across the block's warps in shared memory (m_s, l_s [warps][G], acc_s [warps][G][D]; a warp that saw
// no key holds m = -inf, l = 0, acc = 0), then store(g, d, m, l, acc) for each of the block's G * D outputs (m and
// l repeat along d).
template <int DPL, int G, int W, typename Store>
__device__ __forceinline__ void merge_warps(const WarpSoftmax<G, DPL>& softmax, float* m_s, float* l_s, float* acc_s,
                                            Store store) {
  constexpr int D = DPL * 32;
  const auto& m = softmax.m;
  const auto& l = softmax.l;
  const auto& acc = softmax.acc;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int g = 0; g < G; ++g) {
    if (lane == 0) {
      m_s[warp * G + g] = m[g];
      l_s[warp * G + g] = l[g];
    }
#pragma unroll
    for (int i = 0; i < DPL; ++i) acc_s[(warp * G + g) * D + lane + 32 * i] = acc[g][i];
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < G * D; idx += blockDim.x) {
    const int g = idx / D, d = idx % D;
    float m_max = -INFINITY;
#pragma unroll
    for (int w = 0; w < W; ++w) m_max = fmaxf(m_max, m_s[w * G + g]);
    float l_sum = 0.f, a_sum = 0.f;
    if (m_max != -INFINITY) {
#pragma unroll
      for (int w = 0; w < W; ++w) {
        const float f = exp2f(m_s[w * G + g] - m_max);
        l_sum += l_s[w * G + g] * f;
        a_sum += acc_s[(w * G + g) * D + d] * f;
      }
    }
    store(g, d, m_max, l_sum, a_sum);
  }
}

// The block's rows written: normalised to p.out, or with several splits as the split's partials.
template <int DPL, int G, int W = kDecodeWarps>
__device__ __forceinline__ void merge_warps_and_store(const Params& p, const WarpSoftmax<G, DPL>& softmax, float* m_s,
                                                      float* l_s, float* acc_s, int query, int head0, int split) {
  constexpr int D = DPL * 32;
  const int kv_head = head0 / p.group, head_in_group = head0 % p.group;
  merge_warps<DPL, G, W>(softmax, m_s, l_s, acc_s, [&](int g, int d, float m_max, float l_sum, float a_sum) {
    const int r = query * p.group + head_in_group + g;  // the (query, head of group) row, as in attention_kernel
    if (p.part_acc) {
      const int64_t prow = int64_t(split) * p.kv_heads * p.rows_per_head + int64_t(kv_head) * p.rows_per_head + r;
      p.part_acc[prow * D + d] = a_sum;
      if (d == 0) {
        p.part_ml[prow * 2] = m_max;
        p.part_ml[prow * 2 + 1] = l_sum;
      }
    } else {
      p.out[(int64_t(query) * p.heads + head0 + g) * D + d] = a_sum / l_sum;
    }
  });
}

// Cluster mode (Params::cluster_merge): the blocks of one (query, head block) are the splits of its keys and one
// thread block cluster along z. Each block's merged softmax goes to its own shared memory (blk_s [G][2 + D]: m,
// l, acc), and after the cluster barrier block r of the cluster merges slice r of the G * D outputs from every
// block's blk_s (distributed shared memory) and stores it normalised. No partials in global memory and no merge
// launch, and each block's first round of keys loads before the PDL wait: at a 512-key bucket a split is one round
// of 32 keys, where the path before ran two splits of 8 rounds and a merge launch (bench/RESULTS.md). A split past
// the row's keys holds m = -inf, l = 0 and adds nothing (split 0 always has the step's own key). The second
// barrier keeps each block's shared memory alive until the others have read it.
template <int DPL, int G, int W>
__device__ __forceinline__ void merge_cluster_and_store(const Params& p, const WarpSoftmax<G, DPL>& softmax,
                                                        float* m_s, float* l_s, float* acc_s, float* blk_s, int query,
                                                        int head0) {
  constexpr int D = DPL * 32, kRow = D + 2;
  merge_warps<DPL, G, W>(softmax, m_s, l_s, acc_s, [&](int g, int d, float m_max, float l_sum, float a_sum) {
    blk_s[g * kRow + 2 + d] = a_sum;
    if (d == 0) {
      blk_s[g * kRow] = m_max;
      blk_s[g * kRow + 1] = l_sum;
    }
  });
  cooperative_groups::cluster_group cluster = cooperative_groups::this_cluster();
  cluster.sync();
  const int splits = static_cast<int>(cluster.num_blocks()), rank = static_cast<int>(cluster.block_rank());
  const int per = (G * D + splits - 1) / splits, last = min(G * D, (rank + 1) * per);
  for (int idx = rank * per + threadIdx.x; idx < last; idx += blockDim.x) {
    const int g = idx / D, d = idx % D;
    float m_max = -INFINITY;
    for (int s = 0; s < splits; ++s) m_max = fmaxf(m_max, cluster.map_shared_rank(blk_s, s)[g * kRow]);
    float l_sum = 0.f, a_sum = 0.f;
    for (int s = 0; s < splits; ++s) {
      const float* other = cluster.map_shared_rank(blk_s, s) + g * kRow;
      const float f = exp2f(other[0] - m_max);  // 0 for a split without keys
      l_sum += other[1] * f;
      a_sum += other[2 + d] * f;
    }
    p.out[(int64_t(query) * p.heads + head0 + g) * D + d] = a_sum / l_sum;
  }
  cluster.sync();
}

// Block (query, head block, split); DPL = head_dim / 32 dims per lane, G = query heads per block: the whole
// GQA group, or a part of it when the group's blocks alone would leave most SMs idle (choose_layout). ROPE: q and
// the step's k are rotated here (Params' k_new / v_new); the step's own key is read from shared memory, since the
// block that stores it in the cache runs alongside.
template <int DPL, int G, bool ROPE>
__global__ __launch_bounds__(kDecodeWarps * 32) void decode_attention_kernel(Params p) {
  extern __shared__ float smem[];
  constexpr int D = DPL * 32;
  float* q_s = smem;                               // [G][D], pre-scaled by scale * log2(e)
  float* m_s = q_s + G * D;                        // [warps][G]
  float* l_s = m_s + kDecodeWarps * G;             // [warps][G]
  float* acc_s = l_s + kDecodeWarps * G;           // [warps][G][D]
  float* new_s = acc_s + kDecodeWarps * G * D;     // ROPE: the step's rotated k [D] and v [D], scratch [warps][D]
  pdl_launch_dependents();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int query = blockIdx.x, head0 = blockIdx.y * G, split = blockIdx.z;
  const int kv_head = head0 / p.group, head_in_group = head0 % p.group;
  // Before the wait: the rows and block tables, uploaded before the step (the kernels before do not write them).
  // An L2 prefetch of the first keys' K/V rows here as well was measured no faster (H200: Model A 0.5675 ms/token
  // either way).
  const DecodeKeys keys(p, query, split, kv_head, D);
  const int key_end = keys.end, split_begin = keys.split_begin, split_end = keys.split_end;
  pdl_wait();
  if constexpr (ROPE) {
    // Warps take the block's G query heads, then its kv head (h == G): warp_norm_rope_head as
    // qk_norm_rope_kernel, so the rows are the ones the separate ops would have written.
    const float pos = static_cast<float>(key_end - 1);
    float* scratch = new_s + (2 + warp) * D;
    for (int h = warp; h <= G; h += kDecodeWarps) {
      if (h < G) {
        warp_norm_rope_head(p.q + (int64_t(query) * p.heads + head0 + h) * D, scratch, D, p.q_rope, pos, lane,
                            [&](int d, float v) { q_s[h * D + d] = v * p.scale_log2; });
      } else {
        const int64_t row = (int64_t(query) * p.kv_heads + kv_head) * D;
        float* k_slot = nullptr;  // one block per (query, kv head) stores the step's k and v
        float* v_slot = nullptr;
        if (head_in_group == 0 && split == 0) {
          const int64_t offset = keys.offset(key_end - 1);
          k_slot = p.k_write + offset;
          v_slot = p.v_write + offset;
        }
        warp_norm_rope_head(p.k_new + row, scratch, D, p.k_rope, pos, lane, [&](int d, float v) {
          new_s[d] = v;
          if (k_slot) k_slot[d] = v;
        });
        for (int d = lane; d < D; d += 32) {
          const float v = p.v_new[row + d];
          new_s[D + d] = v;
          if (v_slot) v_slot[d] = v;
        }
      }
      __syncwarp();  // the warp's scratch row serves its next head
    }
  } else {
    for (int idx = threadIdx.x; idx < G * D; idx += blockDim.x)
      q_s[idx] = p.q[(int64_t(query) * p.heads + head0) * D + idx] * p.scale_log2;
  }
  __syncthreads();

  WarpSoftmax<G, DPL> softmax;
  auto& m = softmax.m;
  auto& l = softmax.l;
  auto& acc = softmax.acc;
  for (int chunk = split_begin + warp * kKeyTile; chunk < split_end; chunk += kDecodeWarps * kKeyTile) {
    const int key = chunk + lane;
    const bool valid = key < split_end;
    int64_t offset = 0;  // this lane's key: its K/V row
    float s[G];
#pragma unroll
    for (int g = 0; g < G; ++g) s[g] = 0.f;
    // Lane j's key: its dot with every head of the block, K read from k4 (the page, or the step's own row).
    auto dot_key = [&](const float4* k4) {
#pragma unroll 16
      for (int i = 0; i < D / 4; ++i) {
        const float4 kv = k4[i];
#pragma unroll
        for (int g = 0; g < G; ++g) {
          const float4 qv = reinterpret_cast<const float4*>(q_s + g * D)[i];
          s[g] += qv.x * kv.x + qv.y * kv.y + qv.z * kv.z + qv.w * kv.w;
        }
      }
    };
    if (valid) {
      offset = keys.offset(key);
      if (ROPE && key == key_end - 1) dot_key(reinterpret_cast<const float4*>(new_s));
      else dot_key(reinterpret_cast<const float4*>(p.k_pages + offset));
    }
    float prob[G];
#pragma unroll
    for (int g = 0; g < G; ++g) {
      const float score = valid ? s[g] : -INFINITY;
      const float m_new = fmaxf(m[g], warp_max(score));  // finite: lane 0's key is valid
      prob[g] = exp2f(score - m_new);
      const float corr = exp2f(m[g] - m_new);
      l[g] = l[g] * corr + warp_sum(prob[g]);
#pragma unroll
      for (int i = 0; i < DPL; ++i) acc[g][i] *= corr;
      m[g] = m_new;
    }
    // P.V, 8 keys' V rows loaded before their multiply-adds: one key at a time, each iteration waited for its
    // loads (a memory latency per key, ~10 us per layer at 18 keys on an H100). Loading the chunk's first 8 V
    // rows before the K dot instead was slower (H200, same call: Model A 0.5767 vs 0.5672 ms/token, Model B 3.203
    // vs 3.119).
    const int count = min(kKeyTile, split_end - chunk);
    for (int j0 = 0; j0 < count; j0 += kPvBatch) {
      float v[kPvBatch][DPL];
#pragma unroll
      for (int jj = 0; jj < kPvBatch; ++jj) {
        const int64_t row = __shfl_sync(0xffffffffu, offset, (j0 + jj) & 31);
        if (ROPE && chunk + j0 + jj == key_end - 1) {  // the step's own key: the block's copy of its v row
#pragma unroll
          for (int i = 0; i < DPL; ++i) v[jj][i] = new_s[D + lane + 32 * i];
        } else {
#pragma unroll
          for (int i = 0; i < DPL; ++i) v[jj][i] = j0 + jj < count ? p.v_pages[row + lane + 32 * i] : 0.f;
        }
      }
#pragma unroll
      for (int jj = 0; jj < kPvBatch; ++jj) {
#pragma unroll
        for (int g = 0; g < G; ++g) {
          const float pj = __shfl_sync(0xffffffffu, prob[g], (j0 + jj) & 31);  // 0 past the split's keys
#pragma unroll
          for (int i = 0; i < DPL; ++i) acc[g][i] += pj * v[jj][i];
        }
      }
    }
  }

  merge_warps_and_store<DPL, G>(p, softmax, m_s, l_s, acc_s, query, head0, split);
}

// Decode rows whose sequences are all distinct (AttentionShape::distinct_sequences), without the RoPE prologue:
// lanes own head dims (d = lane + 32 i) and warp w takes keys w, w + 4, ... of each round of 4 KEYS keys, so a K
// or V row is one coalesced load per 32 dims and a round's rows are in registers at once. The keys of earlier
// steps do not depend on the kernels before, so the first round's rows are loaded before the PDL wait; after it
// only q and the step's own key are read. The key-per-lane kernel above chained q, the page table, two rounds
// of K and two of V after its wait (decode_attention_kernel: 7.4 us of each Model A layer's critical path on an
// H200). Scores are warp sums; the online softmax and the merge of the warps are as above.
// ROPE: the step's q/k norm + RoPE and its KV write inside (rope_kv_attention; what qk_norm_rope_kernel does, with
// head_rope.cuh's arithmetic, so the rows are bit-identical): the angles and norm weights are computed before the
// wait; after it warps take the block's query heads and then its kv head, the step's own key is read from shared
// memory, and the block of head 0 of the group and split 0 stores the rotated k and the v row in the cache. One
// launch fewer per layer than qk_norm_rope_kv_write + this kernel (H200, same call: Model A 0.5077 vs 0.5275
// ms/token, Model B 2.4256 vs 2.5796).
template <int DPL, int G, int KEYS, bool ROPE, int W = kDecodeWarps>
__global__ __launch_bounds__(W * 32) void decode_attention_dims_kernel(Params p) {
  extern __shared__ float smem[];
  constexpr int D = DPL * 32;
  constexpr int kRound = W * KEYS;
  float* m_s = smem;               // [warps][G]
  float* l_s = m_s + W * G;        // [warps][G]
  float* acc_s = l_s + W * G;      // [warps][G][D]
  float* q_s = acc_s + W * G * D;  // ROPE: the rotated q [G][D] (pre-scaled), then the step's k and v
  float* new_s = q_s + G * D;      // [2][D], then a row of scratch per warp [warps][D]
  // Cluster mode: the block's merged rows [G][2 + D] after the ROPE rows (or the warps' rows), read by the cluster.
  float* blk_s = ROPE ? new_s + (2 + W) * D : q_s;
  pdl_launch_dependents();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int query = blockIdx.x, head0 = blockIdx.y * G, split = blockIdx.z;
  const int kv_head = head0 / p.group;
  const DecodeKeys keys(p, query, split, kv_head, D);
  const int key_end = keys.end, split_begin = keys.split_begin, split_end = keys.split_end;
  const int own = key_end - 1;  // the step's key: the kernel before writes it (ROPE: this launch does)
  // A split past the row's keys (cluster mode sizes the splits for the bucket): nothing to read or rotate; it
  // joins the cluster's merge with m = -inf.
  const bool idle = split_begin >= split_end;
  float kr[KEYS][DPL], vr[KEYS][DPL];
  // Row j of the warp's round: key round + warp + W j. mine(key): whether it is read now.
  auto load_round = [&](int round, auto mine) {
#pragma unroll
    for (int j = 0; j < KEYS; ++j) {
      const int key = round + warp + W * j;
      if (key < split_end && mine(key)) {
        if (ROPE && key == own) {  // the block's copy: its cache row is stored by one block of this launch
#pragma unroll
          for (int i = 0; i < DPL; ++i) {
            kr[j][i] = new_s[lane + 32 * i];
            vr[j][i] = new_s[D + lane + 32 * i];
          }
          continue;
        }
        const int64_t offset = keys.offset(key);
#pragma unroll
        for (int i = 0; i < DPL; ++i) {
          kr[j][i] = p.k_pages[offset + lane + 32 * i];
          vr[j][i] = p.v_pages[offset + lane + 32 * i];
        }
      }
    }
  };
#pragma unroll
  for (int j = 0; j < KEYS; ++j)
#pragma unroll
    for (int i = 0; i < DPL; ++i) kr[j][i] = vr[j][i] = 0.f;
  load_round(split_begin, [&](int key) { return key != own; });
  // ROPE, before the wait: the angles at the step's position and the lane's norm weights (q's; k's too for the
  // warp of the kv head, q and k sharing the angles), and the cache rows this block stores.
  [[maybe_unused]] LaneRope lr;
  [[maybe_unused]] float k_w[DPL];
  [[maybe_unused]] float* k_slot = nullptr;
  [[maybe_unused]] float* v_slot = nullptr;
  if constexpr (ROPE) {
    const bool kv_warp = warp == G % W;
    prepare_lane_rope(D, p.q_rope, static_cast<float>(own), lane, &lr);
#pragma unroll
    for (int i = 0; i < DPL; ++i) k_w[i] = kv_warp ? head_norm_weight(p.k_rope, lane + 32 * i) : 1.f;
    if (kv_warp && head0 % p.group == 0 && split == 0) {
      const int64_t offset = keys.offset(own);
      k_slot = p.k_write + offset;
      v_slot = p.v_write + offset;
    }
  }
  pdl_wait();
  float q[G][DPL];
  if (idle) {
#pragma unroll
    for (int g = 0; g < G; ++g)
#pragma unroll
      for (int i = 0; i < DPL; ++i) q[g][i] = 0.f;
  } else if constexpr (ROPE) {
    float* scratch = new_s + (2 + warp) * D;
    for (int h = warp; h <= G; h += W) {  // warp G % W takes the kv head last
      if (h < G) {
        warp_norm_rope_head_prepared(p.q + (int64_t(query) * p.heads + head0 + h) * D, scratch, D, p.q_rope, lr,
                                     lane, [&](int d, float v) { q_s[h * D + d] = v * p.scale_log2; });
      } else {
        const int64_t row = (int64_t(query) * p.kv_heads + kv_head) * D;
        LaneRope lk = lr;
#pragma unroll
        for (int i = 0; i < DPL; ++i) lk.w[i] = k_w[i];
        warp_norm_rope_head_prepared(p.k_new + row, scratch, D, p.k_rope, lk, lane, [&](int d, float v) {
          new_s[d] = v;
          if (k_slot) k_slot[d] = v;
        });
#pragma unroll
        for (int i = 0; i < DPL; ++i) {
          const float v = p.v_new[row + lane + 32 * i];
          new_s[D + lane + 32 * i] = v;
          if (v_slot) v_slot[lane + 32 * i] = v;
        }
      }
      __syncwarp();  // the warp's scratch row serves its next head
    }
    __syncthreads();
    load_round(split_begin, [&](int key) { return key == own; });
#pragma unroll
    for (int g = 0; g < G; ++g)
#pragma unroll
      for (int i = 0; i < DPL; ++i) q[g][i] = q_s[g * D + lane + 32 * i];
  } else {
    load_round(split_begin, [&](int key) { return key == own; });
#pragma unroll
    for (int g = 0; g < G; ++g)
#pragma unroll
      for (int i = 0; i < DPL; ++i)
        q[g][i] = p.q[(int64_t(query) * p.heads + head0 + g) * D + lane + 32 * i] * p.scale_log2;
  }

  WarpSoftmax<G, DPL> softmax;
  auto& m = softmax.m;
  auto& l = softmax.l;
  auto& acc = softmax.acc;
  for (int round = split_begin; round < split_end; round += kRound) {  // none when idle
    if (round != split_begin) load_round(round, [](int) { return true; });
    float s[KEYS][G];
#pragma unroll
    for (int j = 0; j < KEYS; ++j)
#pragma unroll
      for (int g = 0; g < G; ++g) {
        float part = 0.f;
#pragma unroll
        for (int i = 0; i < DPL; ++i) part += q[g][i] * kr[j][i];
        s[j][g] = warp_sum(part);
      }
#pragma unroll
    for (int g = 0; g < G; ++g) {
      float m_new = m[g];
#pragma unroll
      for (int j = 0; j < KEYS; ++j)
        if (round + warp + W * j < split_end) m_new = fmaxf(m_new, s[j][g]);
      if (m_new == -INFINITY) continue;  // no key of this warp in the round (warp-uniform)
      const float corr = exp2f(m[g] - m_new);
      l[g] *= corr;
#pragma unroll
      for (int i = 0; i < DPL; ++i) acc[g][i] *= corr;
#pragma unroll
      for (int j = 0; j < KEYS; ++j) {
        if (round + warp + W * j >= split_end) continue;
        const float prob = exp2f(s[j][g] - m_new);
        l[g] += prob;
#pragma unroll
        for (int i = 0; i < DPL; ++i) acc[g][i] += prob * vr[j][i];
      }
      m[g] = m_new;
    }
  }

  if (p.cluster_merge) merge_cluster_and_store<DPL, G, W>(p, softmax, m_s, l_s, acc_s, blk_s, query, head0);
  else merge_warps_and_store<DPL, G, W>(p, softmax, m_s, l_s, acc_s, query, head0, split);
}

// f(std::integral_constant<int, DPL>) for DPL = head_dim / 32 (1..8): the decode kernels' dims per lane.
template <typename F>
void with_dims_per_lane(int64_t head_dim, F f) {
  switch (head_dim / 32) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    default: f(std::integral_constant<int, 8>{}); break;
  }
}

// KEYS rows of K and V per warp and round: 8 where the block's heads leave the registers (G <= 2), else 4.
// A round past the first costs the batch-1 step about 1.6 us a layer (H200 trace, Model A: the attention's share
// of a layer 3.6 us at 17-32 keys, 5.2-6.2 at 33-64, 7.3-8.0 at 65-80). Measured and dropped (bench/RESULTS.md):
// 16 warps a block (128 keys a round before the wait; a 512-thread block waits for a whole SM to empty, where
// 4-warp blocks start beside the q/k/v GEMV's: Model A 0.513 vs 0.493 ms/token), the later rounds prefetched
// into L2 before the wait (no change: 0.4953 vs 0.4930; the cost is not HBM's), and the later rounds staged in
// shared memory with cp.async (64 KB a block: 0.563 vs 0.496, the SMs' carveout changing between kernels; one
// carveout for every kernel cost more than it saved), and the next round's rows loaded into a second set of
// registers before the current round is summed (no spills, yet Model A 0.5325 vs 0.4981 ms/token, the 12-layer
// Model B 0.7247 vs 0.7216: H200, same call). Past 256 keys the rounds go to a cluster of blocks instead.
template <int G, bool ROPE, int W = kDecodeWarps>
void launch_decode_dims(const Params& p, dim3 grid, cudaStream_t stream) {
  constexpr int KEYS = G <= 2 ? 8 : 4;
  const size_t smem = decode_dims_smem_bytes(G, p.head_dim, ROPE, p.cluster_merge, W);
  const dim3 cluster = p.cluster_merge ? dim3(1, 1, grid.z) : dim3(0, 0, 0);
  with_dims_per_lane(p.head_dim, [&](auto dpl) {
    constexpr auto kernel = decode_attention_dims_kernel<decltype(dpl)::value, G, KEYS, ROPE, W>;
    if (cluster.z > 8) allow_nonportable_clusters<kernel>();
    launch_config(PdlLaunchConfig(grid, dim3(W * 32), smem, stream, cluster), kernel, p);
  });
}

template <int G, bool ROPE>
void launch_decode_group(const Params& p, dim3 grid, cudaStream_t stream) {
  const size_t smem = decode_smem_bytes(G, p.head_dim, ROPE);
  auto launch = [&](auto kernel) { launch_pdl(kernel, grid, dim3(kDecodeWarps * 32), smem, stream, p); };
  with_dims_per_lane(p.head_dim, [&](auto dpl) { launch(decode_attention_kernel<decltype(dpl)::value, G, ROPE>); });
}

template <bool ROPE>
void launch_decode(const Params& p, int heads_per_block, dim3 grid, cudaStream_t stream, bool dims_per_lane,
                   bool wide) {
  if (dims_per_lane && wide) {
    if (heads_per_block == 1) launch_decode_dims<1, ROPE, kWideDecodeWarps>(p, grid, stream);
    else launch_decode_dims<2, ROPE, kWideDecodeWarps>(p, grid, stream);
    return;
  }
  if (dims_per_lane) {
    switch (heads_per_block) {
      case 1: launch_decode_dims<1, ROPE>(p, grid, stream); break;
      case 2: launch_decode_dims<2, ROPE>(p, grid, stream); break;
      case 4: launch_decode_dims<4, ROPE>(p, grid, stream); break;
      default: launch_decode_dims<8, ROPE>(p, grid, stream); break;
    }
    return;
  }
  switch (heads_per_block) {
    case 1: launch_decode_group<1, ROPE>(p, grid, stream); break;
    case 2: launch_decode_group<2, ROPE>(p, grid, stream); break;
    case 4: launch_decode_group<4, ROPE>(p, grid, stream); break;
    default: launch_decode_group<8, ROPE>(p, grid, stream); break;
  }
}

// ---- shared by both -----------------------------------------------------------------------------------------

// Blocks per head block before any split: decode blocks per (query, head block), the tensor-core kernel's
// query tiles (one head per block), the tiled kernel's per row tile.
int64_t grid_x(const AttentionShape& shape) {
  const int64_t group = shape.heads / shape.kv_heads;
  if (prefill_mma_fits(shape))
    return ceil_div(shape.num_queries, int64_t(prefill_mma_queries(static_cast<int>(shape.head_dim))));
  if (decode_kernel_fits(shape)) return shape.num_queries;
  return shape.one_sequence ? ceil_div(shape.num_queries * group, int64_t(kRowsPerBlock))
                            : shape.num_queries * ceil_div(group, int64_t(kRowsPerBlock));
}

int choose_splits(const AttentionShape& shape, int64_t head_blocks, int num_sms, int* keys_per_split) {
  int64_t base_blocks = grid_x(shape) * head_blocks;
  int64_t total_keys = std::max<int64_t>(shape.max_keys, 1);
  int64_t splits = ceil_div(2 * int64_t(num_sms), base_blocks);
  // The decode kernel's split feeds its 4 warps a chunk each; the others', two key tiles.
  const int64_t tile = prefill_mma_fits(shape) ? prefill_mma_key_tile(static_cast<int>(shape.head_dim)) : kKeyTile;
  const int64_t min_keys = decode_kernel_fits(shape) ? kDecodeSplitKeys : 2 * tile;
  splits = std::min<int64_t>(splits, std::min<int64_t>(kMaxSplits, ceil_div(total_keys, min_keys)));
  if (splits < 1) splits = 1;
  int64_t per = ceil_div(ceil_div(total_keys, splits), tile) * tile;
  splits = ceil_div(total_keys, per);
  *keys_per_split = static_cast<int>(per);
  return static_cast<int>(splits);
}

struct Layout {
  int heads_per_block;  // tiled kernel: the group (its blocks tile rows); tensor cores: 1; decode: see choose_layout
  int splits;
  int keys_per_split;
  bool cluster;  // the splits are one thread block cluster that merges itself (merge_cluster_and_store)
  int warps = kDecodeWarps;  // of a decode block: kWideDecodeWarps where wide_decode_heads takes them
};

// The decode kernel a step's rows take: dims-per-lane for rows of distinct sequences (it reads earlier keys before
// its PDL wait, so no row may write a key another reads). MOEX_CUDA_ATTENTION_KEY_LANES=1 keeps the key-per-lane
// kernel (A/B; read at every launch, so tests can compare both).
bool dims_per_lane_takes(const AttentionShape& shape) {
  return shape.distinct_sequences && !env_equals("MOEX_CUDA_ATTENTION_KEY_LANES", "1");
}

// Cluster mode (merge_cluster_and_store): batch-1 decode on the dims-per-lane kernel past 256 keys splits the keys
// over a cluster of 16 blocks per head block (8 where the device does not place non-portable clusters of 16), 32
// keys a split at a 512-key bucket (one round, loaded before the PDL wait) up to 128 at a 2048-key one; longer
// rows take the splits and merge launch of choose_splits. The split length follows the bucket of the row's keys
// (the power of two >= 256 that a recorded step is sized for), not the keys, so an eager step and a replayed one
// split alike and give the same bits. H200, same call (bench/RESULTS.md): clusters of 8 made the step 1.19-1.25x
// faster than one block and a merge launch at 417-480 and 961-1024 keys (Model A 0.552 against 0.679 ms/token at
// 417-480), clusters of 16 another 1.03-1.07x. Not at a 256-key bucket: there the cluster's attention took 9.2 us
// of each Model A layer's critical path at every context, where one block per head block takes 4.6 at 17-32 keys
// and 8.8 at 65-80 (H200 trace). MOEX_CUDA_ATTENTION_CLUSTER=0 keeps one block per head block and the merge
// launch, =8 clusters of 8 (A/B; read at every launch).
constexpr int kClusterSplits = 16, kPortableClusterSplits = 8;
constexpr int64_t kClusterMinBucket = 512, kClusterMaxBucket = 2048;

bool device_launches_clusters() {
  static const bool supported = [] {
    int device = 0, value = 0;
    const bool ok = cudaGetDevice(&device) == cudaSuccess &&
                    cudaDeviceGetAttribute(&value, cudaDevAttrClusterLaunch, device) == cudaSuccess;
    if (!ok) (void)cudaGetLastError();
    return ok && value != 0;
  }();
  return supported;
}

// Clusters of 16 blocks are beyond the portable 8: asked once whether the device places one of the largest blocks
// cluster mode launches (two heads of 256 dims, with the RoPE prologue).
bool device_places_clusters_of_16() {
  static const bool fits = [] {
    if (!device_launches_clusters()) return false;
    auto kernel = decode_attention_dims_kernel<8, 2, 8, true>;
    PdlLaunchConfig launch(dim3(1, 1, kClusterSplits), dim3(kDecodeWarps * 32),
                           decode_dims_smem_bytes(2, kAttentionMaxHeadDim, true, true), nullptr,
                           dim3(1, 1, kClusterSplits));
    return device_places_cluster(kernel, launch);
  }();
  return fits;
}

bool cluster_layout_takes(const AttentionShape& shape) {
  const int64_t bucket = attention_key_bucket(shape.max_keys);
  return shape.num_queries == 1 && decode_kernel_fits(shape) && dims_per_lane_takes(shape) &&
         bucket >= kClusterMinBucket && bucket <= kClusterMaxBucket &&
         !env_equals("MOEX_CUDA_ATTENTION_CLUSTER", "0") && device_launches_clusters();
}

// Decode blocks of kWideDecodeWarps warps (64 keys a round at one or two heads a block, against 32): a context of
// 33-64 keys is then one round, loaded before the PDL wait, where 4-warp blocks read a second round after it (~1.6
// us a layer, H200 trace). A block of 8 warps (~120 registers a thread) needs half an SM's registers, so it starts
// while the q/k/v GEMV runs only in a half that GEMV's grid left empty (AttentionShape::free_half_sms); a block that
// starts late has its first round on the critical path. H200, same call, 8 warps against 4: Model A (16 blocks, 8
// free halves) 0.5194 vs 0.4994 ms/token, the 12-layer Model B (32 blocks, 50 free halves) 0.7072 vs 0.7210. Not
// in cluster mode (its splits are sized for 4 warps). MOEX_CUDA_ATTENTION_WARPS=4 / 8 forces either (A/B; read at
// every launch, so tests can switch it).
// Where the layout's grid does not fit, a block takes two heads of the group instead of one (Model A: 8 blocks
// beside 8 free halves; H200, same call: 0.4966 vs 0.4997 ms/token with 4-warp blocks of one head;
// MOEX_CUDA_ATTENTION_WIDE_REGROUP=0 keeps the layout's heads). Returns the heads a block of 8 warps takes, or 0
// for 4-warp blocks.
int wide_decode_heads(const AttentionShape& shape, const Layout& layout) {
  if (layout.cluster || layout.heads_per_block > kWideDecodeMaxGroup || !dims_per_lane_takes(shape)) return 0;
  if (env_equals("MOEX_CUDA_ATTENTION_WARPS", "4")) return 0;
  if (env_equals("MOEX_CUDA_ATTENTION_WARPS", "8")) return layout.heads_per_block;
  const int group = static_cast<int>(shape.heads / shape.kv_heads);
  const bool regroup = !env_equals("MOEX_CUDA_ATTENTION_WIDE_REGROUP", "0");
  for (int heads = layout.heads_per_block; heads <= std::min(group, kWideDecodeMaxGroup); heads *= 2) {
    if (grid_x(shape) * shape.kv_heads * (group / heads) * layout.splits <= shape.free_half_sms) return heads;
    if (!regroup) break;
  }
  return 0;
}

// Decode blocks take the whole GQA group (K/V read once per group) unless that leaves most SMs idle: batch 1
// at a short context is 4-8 blocks (one per kv head), each with a long serial per-lane chain (a key's dot
// for every head of the group). Halving the heads per block until the grid covers the SMs turns that into
// 32 short blocks on Model B; the group's K/V rows are then read by several blocks, from L2.
// Cluster mode: at most 2 heads a block (8 keys a warp and round, so a round is 32 keys), halved while the grid
// of splits covers less than half the SMs: Model A 128 blocks of one head, Model B 128 of two. Last, blocks of 8
// warps where the grid fits beside the kernel before (wide_decode_heads), so the launch and its grid follow from
// the layout alone.
Layout choose_layout(const AttentionShape& shape, int num_sms) {
  const int group = static_cast<int>(shape.heads / shape.kv_heads);
  Layout layout{prefill_mma_fits(shape) ? 1 : group, 1, 0, false};
  auto head_blocks = [&] { return shape.kv_heads * (group / layout.heads_per_block); };
  if (cluster_layout_takes(shape)) {
    const int splits = env_equals("MOEX_CUDA_ATTENTION_CLUSTER", "8") || !device_places_clusters_of_16()
                           ? kPortableClusterSplits
                           : kClusterSplits;
    layout = Layout{std::min(group, 2), splits, static_cast<int>(attention_key_bucket(shape.max_keys) / splits), true};
    while (layout.heads_per_block > 1 && head_blocks() * splits < num_sms / 2) layout.heads_per_block /= 2;
    return layout;
  }
  layout.splits = choose_splits(shape, head_blocks(), num_sms, &layout.keys_per_split);
  if (!decode_kernel_fits(shape)) return layout;
  while (layout.heads_per_block > 1 && grid_x(shape) * head_blocks() * layout.splits < num_sms) {
    layout.heads_per_block /= 2;
    layout.splits = choose_splits(shape, head_blocks(), num_sms, &layout.keys_per_split);
  }
  if (const int heads = wide_decode_heads(shape, layout)) {
    layout.heads_per_block = heads;
    layout.warps = kWideDecodeWarps;
  }
  return layout;
}

__global__ void kv_write_paged_kernel(const float* k, const float* v, float* k_pages, float* v_pages, PagedKvRows kv,
                                      int64_t count, int64_t row_elems) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < count; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = i / row_elems, pos = kv.row_pos[row];
    const int64_t page = kv.tables[int64_t(kv.row_seq[row]) * kv.table_stride + pos / kv.page_size];
    const int64_t dst = (page * kv.page_size + pos % kv.page_size) * row_elems + i % row_elems;
    k_pages[dst] = k[i];
    v_pages[dst] = v[i];
  }
}

void launch_tiled(const Params& p, dim3 grid, cudaStream_t stream) {
  size_t smem = smem_bytes(p.head_dim);
  auto launch = [&](auto kernel) {
    if (smem > 48 * 1024) cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    kernel<<<grid, kWarps * 32, smem, stream>>>(p);
  };
  if (p.head_dim <= 32)
    launch(attention_kernel<1>);
  else if (p.head_dim <= 64)
    launch(attention_kernel<2>);
  else if (p.head_dim <= 128)
    launch(attention_kernel<4>);
  else
    launch(attention_kernel<8>);
}

// The workspace: split-K partials (none with one split or a cluster), then the prefill kernel's dense bf16 K/V.
size_t dense_kv_offset(const AttentionShape& shape, const Layout& layout) {
  if (layout.splits <= 1 || layout.cluster) return 0;
  const size_t rows = static_cast<size_t>(shape.num_queries * shape.heads);
  const size_t partials = sizeof(float) * static_cast<size_t>(layout.splits) * rows * size_t(shape.head_dim + 2);
  return (partials + 255) / 256 * 256;
}

}  // namespace

size_t attention_workspace_bytes(const AttentionShape& shape, int num_sms) {
  if (shape.num_queries == 0) return 0;
  return dense_kv_offset(shape, choose_layout(shape, num_sms)) + prefill_dense_kv_bytes(shape);
}

int64_t attention_key_bucket(int64_t keys) {
  int64_t bucket = 256;
  while (bucket < keys) bucket *= 2;
  return bucket;
}

int attention_cluster_splits(const AttentionShape& shape, int num_sms) {
  if (shape.num_queries == 0) return 0;
  const Layout layout = choose_layout(shape, num_sms);
  return layout.cluster ? layout.splits : 0;
}

int attention_decode_warps(const AttentionShape& shape, int num_sms) {
  if (shape.num_queries == 0 || prefill_mma_fits(shape) || !decode_kernel_fits(shape)) return 0;
  return choose_layout(shape, num_sms).warps;
}

bool attention_rounds_to_bf16(const AttentionShape& shape) { return prefill_mma_fits(shape); }

bool rows_form_one_chunk(const int32_t* row_seq, const int32_t* row_pos, int64_t n) {
  for (int64_t row = 1; row < n; ++row)
    if (row_seq[row] != row_seq[0] || row_pos[row] != row_pos[row - 1] + 1) return false;
  return true;
}

bool rows_are_distinct_sequences(const int32_t* row_seq, int64_t n) {
  if (n <= 1) return true;  // batch-1 decode: no copy and sort on every step
  std::vector<int32_t> seqs(row_seq, row_seq + n);
  std::sort(seqs.begin(), seqs.end());
  return std::adjacent_find(seqs.begin(), seqs.end()) == seqs.end();
}

// Only rows of distinct sequences: the kernel's blocks store the step's keys while other blocks read the cache, so
// a row must not read a key another row of the step writes (decode rows around a prefill chunk raced here).
bool decode_rope_fits(const AttentionShape& shape, int64_t rotary_dim) {
  return shape.distinct_sequences && decode_kernel_fits(shape) && !prefill_mma_fits(shape) &&
         shape.head_dim <= kAttentionMaxHeadDim && rotary_dim % 2 == 0 && rotary_dim >= 0 &&
         rotary_dim <= shape.head_dim;
}

void launch_attention(const float* q, const float* k_pages, const float* v_pages, const PagedKvRows& rows, float* out,
                      const AttentionShape& shape, float scale, void* workspace, int num_sms, cudaStream_t stream,
                      const DecodeRope* rope) {
  if (shape.num_queries == 0) return;
  Params p{};
  if (rope) {
    p.k_new = rope->k;
    p.v_new = rope->v;
    p.k_write = rope->k_pages;
    p.v_write = rope->v_pages;
    p.q_rope = HeadNormRope{rope->q_norm, rope->norm_bf16, rope->eps, rope->rotary_dim, rope->theta};
    p.k_rope = HeadNormRope{rope->k_norm, rope->norm_bf16, rope->eps, rope->rotary_dim, rope->theta};
  }
  p.q = q;
  p.k_pages = k_pages;
  p.v_pages = v_pages;
  p.kv = rows;
  p.out = out;
  p.n = static_cast<int>(shape.num_queries);
  p.heads = static_cast<int>(shape.heads);
  p.kv_heads = static_cast<int>(shape.kv_heads);
  p.head_dim = static_cast<int>(shape.head_dim);
  p.group = p.heads / p.kv_heads;
  p.rows_per_head = p.n * p.group;
  p.head_chunks = static_cast<int>(ceil_div(int64_t(p.group), int64_t(kRowsPerBlock)));
  p.one_sequence = shape.one_sequence;
  p.scale_log2 = scale * kLog2e;
  const Layout layout = choose_layout(shape, num_sms);
  const int splits = layout.splits;
  p.keys_per_split = layout.keys_per_split;
  p.cluster_merge = layout.cluster;
  if (splits > 1 && !layout.cluster) {
    size_t num_rows = static_cast<size_t>(p.kv_heads) * p.rows_per_head;
    p.part_acc = static_cast<float*>(workspace);
    p.part_ml = p.part_acc + static_cast<size_t>(splits) * num_rows * p.head_dim;
  }
  const int head_blocks = p.kv_heads * (p.group / layout.heads_per_block);
  dim3 grid(static_cast<unsigned>(grid_x(shape)), head_blocks, splits);
  if (prefill_mma_fits(shape)) {
    if (prefill_dense_kv_takes(shape)) {
      const size_t offset = dense_kv_offset(shape, layout);
      p.k_dense = reinterpret_cast<const __nv_bfloat16*>(static_cast<char*>(workspace) + offset);
      p.v_dense = p.k_dense + shape.max_keys * shape.kv_heads * shape.head_dim;
      p.dense_keys = shape.max_keys;
      launch_prefill_dense_kv(p, stream);
    }
    launch_prefill_mma(p, grid, stream);
  } else if (decode_kernel_fits(shape)) {
    const bool dims_per_lane = layout.cluster || dims_per_lane_takes(shape);
    const bool wide = layout.warps == kWideDecodeWarps;
    if (rope) launch_decode<true>(p, layout.heads_per_block, grid, stream, dims_per_lane, wide);
    else launch_decode<false>(p, layout.heads_per_block, grid, stream, dims_per_lane, wide);
  } else {
    launch_tiled(p, grid, stream);
  }
  if (splits > 1 && !layout.cluster) {
    int64_t total = int64_t(p.kv_heads) * p.rows_per_head;
    launch_pdl(attention_merge_kernel, dim3(static_cast<unsigned>(ceil_div(total, 4))), dim3(128), 0, stream, p,
               splits);
  }
}


void launch_kv_write_paged(const float* k, const float* v, float* k_pages, float* v_pages, const PagedKvRows& rows,
                           int64_t n, int64_t row_elems, cudaStream_t stream) {
  const int64_t count = n * row_elems;
  if (count == 0) return;
  constexpr int kThreads = 256;
  const int64_t blocks = std::min<int64_t>(ceil_div(count, int64_t(kThreads)), 4096);
  kv_write_paged_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(k, v, k_pages, v_pages, rows, count,
                                                                                 row_elems);
}

}  // namespace moex::cuda
