// Attention over the paged KV cache: a block owns one kv head and up to 8 "rows" (query, head-of-group) pairs
// of one sequence, so the K/V tile it stages in shared memory (gathered through the block table) serves every
// query head of the group (GQA) and, for a prefill chunk, several queries. Keys are visited in tiles of 32,
// lane j scoring key j, with an online softmax per row in registers. When there are too few blocks to fill
// the GPU (decode), the key range is split across blocks and a second kernel merges the partial softmaxes.
// fp32 CUDA-core arithmetic: at decode the step is bound by weight bytes, not attention FLOPs.
#include "moex/backend/cuda/kernels/attention.cuh"
#include "moex/backend/cuda/kernels/common.cuh"

#include <algorithm>

namespace moex::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kRowsPerWarp = 2;
constexpr int kRowsPerBlock = kWarps * kRowsPerWarp;
constexpr int kKeyTile = 32;
constexpr int kMaxSplits = 64;
constexpr float kLog2e = 1.4426950408889634f;

struct Params {
  const float* q;
  const float* k_pages;
  const float* v_pages;
  PagedKvRows kv;
  float* out;
  float* part_acc;  // [splits, kv_heads * rows_per_head, head_dim]
  float* part_ml;   // [splits, kv_heads * rows_per_head, 2]
  int n, heads, kv_heads, head_dim, group, rows_per_head;
  int head_chunks;  // blocks per row in the one-row-per-block layout: ceil(group / kRowsPerBlock)
  bool one_sequence;
  int keys_per_split;
  float scale_log2;
};

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
        const int64_t slot = int64_t(table[key / page_size]) * page_size + key % page_size;
        const int64_t off = (slot * p.kv_heads + kv_head) * D + d;
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

int64_t grid_x(const AttentionShape& shape) {
  const int64_t group = shape.heads / shape.kv_heads;
  return shape.one_sequence ? ceil_div(shape.num_queries * group, int64_t(kRowsPerBlock))
                            : shape.num_queries * ceil_div(group, int64_t(kRowsPerBlock));
}

int choose_splits(const AttentionShape& shape, int num_sms, int* keys_per_split) {
  int64_t base_blocks = grid_x(shape) * shape.kv_heads;
  int64_t total_keys = std::max<int64_t>(shape.max_keys, 1);
  int64_t splits = ceil_div(2 * int64_t(num_sms), base_blocks);
  splits = std::min<int64_t>(splits, std::min<int64_t>(kMaxSplits, ceil_div(total_keys, 2 * kKeyTile)));
  if (splits < 1) splits = 1;
  int64_t per = ceil_div(ceil_div(total_keys, splits), kKeyTile) * kKeyTile;
  splits = ceil_div(total_keys, per);
  *keys_per_split = static_cast<int>(per);
  return static_cast<int>(splits);
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

}  // namespace

size_t attention_workspace_bytes(const AttentionShape& shape, int num_sms) {
  if (shape.num_queries == 0) return 0;
  int keys_per_split = 0;
  int splits = choose_splits(shape, num_sms, &keys_per_split);
  if (splits <= 1) return 0;
  size_t rows = static_cast<size_t>(shape.num_queries * shape.heads);
  return sizeof(float) * static_cast<size_t>(splits) * rows * static_cast<size_t>(shape.head_dim + 2);
}

void launch_attention(const float* q, const float* k_pages, const float* v_pages, const PagedKvRows& rows, float* out,
                      const AttentionShape& shape, float scale, void* workspace, int num_sms, cudaStream_t stream) {
  if (shape.num_queries == 0) return;
  Params p{};
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
  int splits = choose_splits(shape, num_sms, &p.keys_per_split);
  if (splits > 1) {
    size_t num_rows = static_cast<size_t>(p.kv_heads) * p.rows_per_head;
    p.part_acc = static_cast<float*>(workspace);
    p.part_ml = p.part_acc + static_cast<size_t>(splits) * num_rows * p.head_dim;
  }
  dim3 grid(static_cast<unsigned>(grid_x(shape)), p.kv_heads, splits);
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
  if (splits > 1) {
    int64_t total = int64_t(p.kv_heads) * p.rows_per_head;
    attention_merge_kernel<<<static_cast<unsigned>(ceil_div(total, 4)), 128, 0, stream>>>(p, splits);
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
