// The tensor-core (prefill) MoE path's plan made on the device: no host round trip per layer. The host plan
// (moe_plan.cc) had needed the ids on the host -- a synchronising copy after the router in every MoE layer,
// during which the GPU idled (Model B's 2048-token prefill, 48 layers: 13.5 of 120 ms outside every kernel on an
// H100, part of it these round trips). One block: a counting sort of the picks by expert, stable in pick order,
// so rows, slots and tiles come out exactly as plan_moe makes them.
#include "moex/backend/cuda/kernels/common.cuh"
#include "moex/backend/cuda/kernels/launch.cuh"
#include "moex/backend/cuda/kernels/moe.cuh"

namespace moex::cuda {
namespace {

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;

// Phase 1 counts picks per expert; one thread turns the counts into row and tile offsets (at most
// kMoePrefillPlanMaxExperts steps); every thread then writes its experts' tiles. Phase 2 takes the picks in
// chunks of one per thread: a pick's row is its expert's cursor + the same expert's picks in earlier warps of
// the chunk + those in earlier lanes of its warp (__match_any_sync), so rows follow pick order within an expert.
__global__ __launch_bounds__(kThreads) void moe_prefill_plan_kernel(const int32_t* ids, int total, int top_k,
                                                                    int num_experts, const MoeExpertPtrs* table,
                                                                    int tile_rows, int32_t* row_token, int32_t* slot,
                                                                    MoeGroup* tiles, int32_t* num_tiles) {
  __shared__ int s_count[kMoePrefillPlanMaxExperts];
  __shared__ int s_cursor[kMoePrefillPlanMaxExperts];
  __shared__ int s_tile[kMoePrefillPlanMaxExperts];
  __shared__ int s_warp[kWarps][kMoePrefillPlanMaxExperts];  // the chunk's picks per warp and expert
  pdl_launch_dependents();
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  for (int e = tid; e < num_experts; e += kThreads) s_count[e] = 0;
  pdl_wait();
  __syncthreads();
  for (int a = tid; a < total; a += kThreads) atomicAdd(&s_count[ids[a]], 1);
  __syncthreads();
  if (tid == 0) {
    int rows = 0, count = 0;
    for (int e = 0; e < num_experts; ++e) {
      s_cursor[e] = rows;
      s_tile[e] = count;
      rows += s_count[e];
      count += (s_count[e] + tile_rows - 1) / tile_rows;
    }
    *num_tiles = count;
  }
  __syncthreads();
  for (int e = tid; e < num_experts; e += kThreads) {
    const MoeExpertPtrs w = table[e];
    for (int j = 0, begin = s_cursor[e]; begin < s_cursor[e] + s_count[e]; ++j, begin += tile_rows)
      tiles[s_tile[e] + j] = MoeGroup{w.gate, w.up, w.down, begin, min(tile_rows, s_cursor[e] + s_count[e] - begin)};
  }
  for (int chunk = 0; chunk < total; chunk += kThreads) {
    for (int i = tid; i < kWarps * num_experts; i += kThreads) s_warp[i / num_experts][i % num_experts] = 0;
    __syncthreads();
    const int a = chunk + tid;
    const int e = a < total ? ids[a] : -1;
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
    __syncthreads();  // every row of the chunk is placed: the cursors move on
    for (int x = tid; x < num_experts; x += kThreads) {
      int sum = 0;
      for (int w = 0; w < kWarps; ++w) sum += s_warp[w][x];
      s_cursor[x] += sum;
    }
    __syncthreads();
  }
}

}  // namespace

void launch_moe_prefill_plan(const int32_t* ids, int64_t total, int64_t top_k, int64_t num_experts,
                             const MoeExpertPtrs* table, int tile_rows, int32_t* row_token, int32_t* slot,
                             MoeGroup* tiles, int32_t* num_tiles, cudaStream_t stream) {
  launch_pdl(moe_prefill_plan_kernel, dim3(1), dim3(kThreads), 0, stream, ids, static_cast<int>(total),
             static_cast<int>(top_k), static_cast<int>(num_experts), table, tile_rows, row_token, slot, tiles,
             num_tiles);
}

}  // namespace moex::cuda
