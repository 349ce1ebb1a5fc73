// The tensor-core (prefill) MoE path's plan made on the device: no host round trip per layer. The host plan
// (moe_plan.cc) had needed the ids on the host -- a synchronising copy after the router in every MoE layer,
// during which the GPU idled (Model B's 2048-token prefill, 48 layers: 13.5 of 120 ms outside every kernel on an
// H100, part of it these round trips). A counting sort of the picks by expert, stable in pick order, so rows,
// slots and tiles come out exactly as plan_moe makes them.
// Two launches, a block per chunk of kChunk picks: the first counts each chunk's picks per expert, the second
// places each chunk's picks after the earlier chunks' (each block sums the counts it needs). It had been one block
// walking the chunks in turn, five barriers a chunk: 54 us of each Model B layer's 2048-token prefill (16 chunks;
// H200 trace, bench/RESULTS.md "Prefill: q/k/v in one grid").
#include "moex/backend/cuda/kernels/common.cuh"
#include "moex/backend/cuda/kernels/launch.cuh"
#include "moex/backend/cuda/kernels/moe.cuh"

namespace moex::cuda {
namespace {

constexpr int kThreads = 1024;
constexpr int kChunk = kThreads;  // picks per block: one a thread
constexpr int kWarps = kThreads / 32;

int plan_blocks(int64_t total) { return static_cast<int>((total + kChunk - 1) / kChunk); }

// counts[b][e]: the picks of chunk b routed to expert e.
__global__ __launch_bounds__(kThreads) void moe_prefill_count_kernel(const int32_t* ids, int total, int num_experts,
                                                                     int32_t* counts) {
  __shared__ int s_count[kMoePrefillPlanMaxExperts];
  pdl_launch_dependents();
  for (int e = threadIdx.x; e < num_experts; e += kThreads) s_count[e] = 0;
  pdl_wait();
  __syncthreads();
  const int a = blockIdx.x * kChunk + threadIdx.x;
  if (a < total) atomicAdd(&s_count[ids[a]], 1);
  __syncthreads();
  for (int e = threadIdx.x; e < num_experts; e += kThreads) counts[blockIdx.x * num_experts + e] = s_count[e];
}

// Block b: its chunk's picks. Each expert's first row (the picks of every chunk: an exclusive scan over experts)
// plus the expert's picks in earlier chunks is the chunk's cursor; a pick's row is its cursor + the same expert's
// picks in earlier warps of the chunk + those in earlier lanes of its warp (__match_any_sync), so rows follow pick
// order within an expert. Block 0 also writes the tiles and their count.
__global__ __launch_bounds__(kThreads) void moe_prefill_place_kernel(const int32_t* ids, int total, int top_k,
                                                                     int num_experts, const MoeExpertPtrs* table,
                                                                     int tile_rows, const int32_t* counts,
                                                                     int32_t* row_token, int32_t* slot,
                                                                     MoeGroup* tiles, int32_t* num_tiles) {
  __shared__ int s_total[kMoePrefillPlanMaxExperts];   // the expert's picks, all chunks
  __shared__ int s_cursor[kMoePrefillPlanMaxExperts];  // the row of the chunk's first pick of the expert
  __shared__ int s_first[kMoePrefillPlanMaxExperts];   // the expert's first row
  __shared__ int s_tile[kMoePrefillPlanMaxExperts];    // the expert's first tile
  // The chunk's picks per warp and expert; first the count sums' parts (before: [0, kThreads), all: after it).
  __shared__ int s_warp[kWarps][kMoePrefillPlanMaxExperts];
  int* const s_part = &s_warp[0][0];
  pdl_launch_dependents();
  pdl_wait();
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, chunk = blockIdx.x;
  const int a = chunk * kChunk + tid;
  const int e = a < total ? ids[a] : -1;
  // The counts summed over chunks by parts of threads: thread (part, expert) takes chunks part, part + parts, ...
  const int parts = kThreads / num_experts, blocks = gridDim.x;
  if (tid < parts * num_experts) {
    const int x = tid % num_experts, part = tid / num_experts;
    int before = 0, all = 0;
    for (int b = part; b < blocks; b += parts) {
      const int c = counts[b * num_experts + x];
      all += c;
      before += b < chunk ? c : 0;
    }
    s_part[tid] = before;
    s_part[kThreads + tid] = all;
  }
  __syncthreads();
  if (tid < num_experts) {
    int before = 0, all = 0;
    for (int part = 0; part < parts; ++part) {
      before += s_part[part * num_experts + tid];
      all += s_part[kThreads + part * num_experts + tid];
    }
    s_total[tid] = all;
    s_cursor[tid] = before;
  }
  __syncthreads();
  if (warp == 0) {  // exclusive scans over experts of rows and tiles, 32 experts a step
    int rows = 0, count = 0;
    for (int base = 0; base < num_experts; base += 32) {
      const int x = base + lane;
      const int n = x < num_experts ? s_total[x] : 0, t = (n + tile_rows - 1) / tile_rows;
      int row_incl = n, tile_incl = t;
#pragma unroll
      for (int d = 1; d < 32; d <<= 1) {
        const int r = __shfl_up_sync(0xffffffffu, row_incl, d), q = __shfl_up_sync(0xffffffffu, tile_incl, d);
        if (lane >= d) {
          row_incl += r;
          tile_incl += q;
        }
      }
      if (x < num_experts) {
        s_first[x] = rows + row_incl - n;
        s_tile[x] = count + tile_incl - t;
        s_cursor[x] += s_first[x];
      }
      rows += __shfl_sync(0xffffffffu, row_incl, 31);
      count += __shfl_sync(0xffffffffu, tile_incl, 31);
    }
    if (chunk == 0 && lane == 0) *num_tiles = count;
  }
  for (int i = tid; i < kWarps * num_experts; i += kThreads) s_warp[i / num_experts][i % num_experts] = 0;
  __syncthreads();
  if (chunk == 0) {
    for (int x = tid; x < num_experts; x += kThreads) {
      const MoeExpertPtrs w = table[x];
      const int end = s_first[x] + s_total[x];
      for (int j = 0, begin = s_first[x]; begin < end; ++j, begin += tile_rows)
        tiles[s_tile[x] + j] = MoeGroup{w.gate, w.up, w.down, begin, min(tile_rows, end - begin)};
    }
  }
  const unsigned same = __match_any_sync(0xffffffffu, e);
  const int rank = __popc(same & ((1u << lane) - 1));
  if (e >= 0 && rank == 0) s_warp[warp][e] = __popc(same);
  __syncthreads();
  if (e >= 0) {
    int row = s_cursor[e] + rank;
    for (int w = 0; w < warp; ++w) row += s_warp[w][e];
    row_token[row] = a / top_k;
    slot[a] = row;
  }
}

}  // namespace

int64_t moe_prefill_plan_counts(int64_t total, int64_t num_experts) { return plan_blocks(total) * num_experts; }

void launch_moe_prefill_plan(const int32_t* ids, int64_t total, int64_t top_k, int64_t num_experts,
                             const MoeExpertPtrs* table, int tile_rows, int32_t* counts, int32_t* row_token,
                             int32_t* slot, MoeGroup* tiles, int32_t* num_tiles, cudaStream_t stream) {
  if (total == 0) {  // no chunk, no block: the count the GEMMs read is still written
    (void)cudaMemsetAsync(num_tiles, 0, sizeof(int32_t), stream);  // an error surfaces at the caller's launch check
    return;
  }
  const dim3 grid(static_cast<unsigned>(plan_blocks(total)));
  launch_pdl(moe_prefill_count_kernel, grid, dim3(kThreads), 0, stream, ids, static_cast<int>(total),
             static_cast<int>(num_experts), counts);
  launch_pdl(moe_prefill_place_kernel, grid, dim3(kThreads), 0, stream, ids, static_cast<int>(total),
             static_cast<int>(top_k), static_cast<int>(num_experts), table, tile_rows, counts, row_token, slot,
             tiles, num_tiles);
}

}  // namespace moex::cuda
