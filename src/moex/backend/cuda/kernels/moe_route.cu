// Device-side router, routing and planning for the MoE decode path, one launch: at one token the grid's warps
// compute the router logits (one expert row each, the GEMV loop of gemv_core.cuh), and the last block to
// finish routes every token (a warp each, router_warp.cuh), orders the (token, pick) assignments by expert
// exactly as plan_moe() does on the host and cuts them into GEMV groups. The expert kernels then read the plan
// from device memory: no host round trip per MoE layer, so a decode step can be recorded as one CUDA graph.
// The router GEMV had been a launch of its own (6 us per layer at one token on an H100, for 32 KB of weights
// on Model A) and the planner built its groups on one thread (10 us per layer on Model B). Several tokens take
// the logits from linear() instead: a warp per expert re-reading every token's activations made Model A's
// 32-sequence step 8% slower than linear()'s tensor-core kernel, which reads them once per block; one block of a
// warp per token then routes and plans them (moe_plan_tokens_kernel).
#include "moex/backend/cuda/kernels/gemv_core.cuh"
#include "moex/backend/cuda/kernels/launch.cuh"
#include "moex/backend/cuda/kernels/moe.cuh"
#include "moex/backend/cuda/kernels/residual_norm.cuh"
#include "moex/backend/cuda/kernels/router_warp.cuh"

#include <cooperative_groups.h>

#include <map>
#include <mutex>
#include <tuple>

namespace moex::cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
static_assert(kThreads >= kMoeRoutePlanMaxAssignments, "the planner gives every assignment a thread");

struct RoutePlanParams {
  const float* x;
  const bf16* router;
  float* logits;
  int num_tokens, hidden, num_experts, top_k;
  bool sigmoid_scoring, normalize;
  const MoeExpertPtrs* table;
  int max_group_rows;
  MoePlanBuffers plan;
  unsigned* ticket;
  bool preload;  // the router rows' first loads before the PDL wait (gemv_preload_enabled)
  bool one_block_plan;  // a one-block grid plans without the ticket (MOEX_CUDA_ROUTER_TICKET=1 turns it off: A/B)
  bool cluster_plan;    // the grid is one thread block cluster: logits go to block 0's shared memory (see below)
  bool logits_only;     // one token, norm.x set: logits and normed only (launch_moe_topk_gate_up_one_token plans)
  // With norm.x set (one token): x is rms_norm((norm.x + d0) + d1) instead, computed by every block into shared
  // memory; the last block writes the residual sum back to norm.x and the normalised row to normed (x of the
  // expert kernels). With logits_only, block 0 writes normed and nobody the sum.
  ResidualNormIn norm;
  float* normed;
};

// The plan, by one block of WARPS warps, from logits other blocks wrote (router_warp reads them from L2) or,
// with s_logits set (a one-block grid at one token), from the block's shared memory. The layer's expert table is
// in s_table (loaded before the PDL wait). total = num_tokens * top_k <= kMoeRoutePlanMaxAssignments <= the
// block's threads. PER_LANE: logits a lane holds in router_warp (num_experts <= 32 * PER_LANE; the same picks and
// weights, bit for bit, at any PER_LANE that holds them).
template <int WARPS, int PER_LANE = kRouterPerLane>
__device__ void route_and_plan(const RoutePlanParams& p, const float* s_logits, const MoeExpertPtrs* s_table) {
  constexpr int kBlockThreads = WARPS * 32;
  // Threads per assignment in the rank scan: each scans a part of the assignments.
  constexpr int kParts = kBlockThreads / kMoeRoutePlanMaxAssignments;
  static_assert(kParts >= 1, "the planner gives every assignment a thread");
  __shared__ int32_t s_id[kMoeRoutePlanMaxAssignments];
  __shared__ int32_t s_sorted[kMoeRoutePlanMaxAssignments];  // expert of permuted row r
  __shared__ int32_t s_warp_starts[WARPS];
  __shared__ int32_t s_rank_part[kParts > 1 ? kParts : 1][kMoeRoutePlanMaxAssignments];
  const int total = p.num_tokens * p.top_k;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int token = warp; token < p.num_tokens; token += WARPS) {
    const int id = s_logits ? router_warp<true, PER_LANE>(s_logits, p.num_experts, p.top_k, p.sigmoid_scoring,
                                                          p.normalize, p.plan.ids, p.plan.weights)
                            : router_warp<false, PER_LANE>(p.logits + int64_t(token) * p.num_experts, p.num_experts,
                                                           p.top_k, p.sigmoid_scoring, p.normalize,
                                                           p.plan.ids + int64_t(token) * p.top_k,
                                                           p.plan.weights + int64_t(token) * p.top_k);
    if (lane < p.top_k) s_id[token * p.top_k + lane] = id;
  }
  __syncthreads();
  // Row of assignment a: its rank in (expert, a) order, the count of assignments before it in that order; a
  // linear scan (total <= 256), split over kParts threads per assignment where the block has them.
  const int a = threadIdx.x % kMoeRoutePlanMaxAssignments;
  int rank = 0;
  if (a < total) {
    const int e = s_id[a];
    const int part = threadIdx.x / kMoeRoutePlanMaxAssignments;
    for (int b = part * total / kParts; b < (part + 1) * total / kParts; ++b) {
      const int eb = s_id[b];
      rank += eb < e || (eb == e && b < a);
    }
  }
  if constexpr (kParts > 1) {
    if (a < total) s_rank_part[threadIdx.x / kMoeRoutePlanMaxAssignments][a] = rank;
    __syncthreads();
    if (threadIdx.x < total)
      for (int q = 1; q < kParts; ++q) rank += s_rank_part[q][a];
  }
  if (threadIdx.x < total) {
    p.plan.slot[a] = rank;
    p.plan.row_token[rank] = a / p.top_k;
    s_sorted[rank] = s_id[a];
  }
  __syncthreads();
  // Groups: runs of one expert's rows cut every max_group_rows rows. Row r opens a group if it is that far
  // into its run; a ballot per warp and the warps' counts give each opening row its group's index.
  const int r = threadIdx.x;
  const int e = r < total ? s_sorted[r] : -1;
  int run_begin = r;
  while (run_begin > 0 && r < total && s_sorted[run_begin - 1] == e) --run_begin;
  const bool opens = r < total && (r - run_begin) % p.max_group_rows == 0;
  const unsigned ballot = __ballot_sync(0xffffffffu, opens);
  if (lane == 0) s_warp_starts[warp] = __popc(ballot);
  __syncthreads();
  int index = __popc(ballot & ((1u << lane) - 1u)), count = 0;
  for (int w = 0; w < WARPS; ++w) {
    index += w < warp ? s_warp_starts[w] : 0;
    count += s_warp_starts[w];
  }
  if (opens) {
    int end = r + 1;
    while (end < total && end - r < p.max_group_rows && s_sorted[end] == e) ++end;
    const MoeExpertPtrs w = s_table[e];
    p.plan.groups[index] = MoeGroup{w.gate, w.up, w.down, r, end - r};
  }
  if (threadIdx.x == 0) *p.plan.num_groups = count;
}

// With p.router set (one token): the router GEMV, one expert row per warp with the decode GEMV's instance (8
// loads in flight per lane: the same loop and summation order as linear() at one row), then the plan. Without:
// one block plans from the logits already in p.logits.
// The router row's dot with x (global) or the block's normalised row (shared, XS): the decode GEMV's loop.
template <bool XS>
__device__ __forceinline__ float router_dot(const RoutePlanParams& p, const uint4 (&first)[8], const bf16* w_row,
                                            const float* x, int lane) {
  if (p.preload) return warp_sum(dot_preloaded<8, XS>(first, w_row, x, p.hidden / 8, lane));
  const bf16* w_rows[1] = {w_row};
  const float* x_rows[1] = {x};
  float acc[1][1] = {};
  warp_dot_bf16<1, 1, 8, XS>(w_rows, x_rows, 1, p.hidden / 8, lane, acc);
  return warp_sum(acc[0][0]);
}

// NW: the norm weight's float4s per thread (with_norm_weight_regs). Everything that does not depend on the
// kernel before -- the router rows' first loads, the norm weight, the layer's expert table -- is loaded before
// the PDL wait. A one-block grid (up to kWarps experts: Model A, Mixtral) keeps its logits in shared memory and
// plans without the ticket: the fence, the atomic and the logits' trip through L2 had been three dependent
// memory round trips of every MoE layer's critical path (H200, same call, against MOEX_CUDA_ROUTER_TICKET=1:
// 1.5 us per layer on Model A, 2.3 us on the 8x7B layer). A grid of up to 16 blocks at one token (Model B's 128
// experts) is launched as one thread block cluster: each block writes its logits into block 0's shared memory
// (distributed shared memory) and block 0 plans after the cluster barrier (1.1 us per layer on Model B).
template <int NW>
__global__ __launch_bounds__(kThreads) void moe_router_plan_kernel(RoutePlanParams p) {
  extern __shared__ float4 s_h4[];  // hidden floats with p.norm.x set
  __shared__ float s_scratch[32];
  __shared__ float s_logits[kRouterMaxExperts];
  __shared__ MoeExpertPtrs s_table[kRouterMaxExperts];
  __shared__ bool s_last;
  pdl_launch_dependents();
  const int lane = threadIdx.x & 31;
  const int expert = blockIdx.x * kWarps + (threadIdx.x >> 5);
  const bool gemv = p.router && expert < p.num_experts;
  const bf16* w_row = p.router + int64_t(gemv ? expert : 0) * p.hidden;
  uint4 first[8] = {};
  if (gemv && p.preload) preload_row<8>(w_row, p.hidden / 8, lane, first);
  float4 norm_w[NW];
  if (p.norm.x) preload_norm_weight(p.norm, p.hidden, norm_w);
  if (!p.logits_only)
    for (int e = threadIdx.x; e < p.num_experts; e += kThreads) s_table[e] = p.table[e];  // uploaded once per layer
  pdl_wait();
  float* s_h = reinterpret_cast<float*>(s_h4);
  if (p.norm.x) residual_norm_to_shared(p.norm, p.hidden, norm_w, s_h, s_scratch);  // every thread of the block
  const bool one_block = p.one_block_plan && gridDim.x == 1 && p.num_tokens == 1 && p.router;
  if (gemv) {
    const float v = p.norm.x ? router_dot<true>(p, first, w_row, s_h, lane) : router_dot<false>(p, first, w_row, p.x, lane);
    if (lane == 0) {
      p.logits[expert] = v;
      if (one_block) s_logits[expert] = v;
      else if (p.cluster_plan) *cooperative_groups::this_cluster().map_shared_rank(&s_logits[expert], 0) = v;
    }
  }
  if (p.logits_only) {
    // No hand-off: the gate/up launch routes. Every block holds the same normalised row; block 0 writes it.
    if (blockIdx.x == 0)
      for (int c = threadIdx.x; c < p.hidden / 4; c += kThreads) reinterpret_cast<float4*>(p.normed)[c] = s_h4[c];
    return;
  }
  if (one_block) {
    __syncthreads();  // s_logits complete; every thread has read norm.x
  } else if (p.cluster_plan) {
    // Block 0 of the cluster plans once every block's logits are in its shared memory (distributed shared
    // memory) and every block has read norm.x: one hardware barrier instead of the fence, the ticket and
    // the logits' trip through L2.
    cooperative_groups::this_cluster().sync();
    if (blockIdx.x != 0) return;
  } else {
    // The last block to finish plans (the threadfence reduction pattern): each writer's fence orders its
    // logits before the block's ticket; the ticket goes back to 0 for the next launch (graph replays).
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) s_last = atomicAdd(p.ticket, 1u) == gridDim.x - 1;
    __syncthreads();
    if (!s_last) return;
    __threadfence();
    if (threadIdx.x == 0) *p.ticket = 0;
  }
  if (p.norm.x) {
    // Every block has read norm.x (before its ticket): the residual sum can replace it now.
    for (int c = threadIdx.x; c < p.hidden / 4; c += kThreads) {
      reinterpret_cast<float4*>(p.norm.x)[c] = residual_sum4(p.norm, c);
      reinterpret_cast<float4*>(p.normed)[c] = s_h4[c];
    }
  }
  route_and_plan<kWarps>(p, one_block || p.cluster_plan ? s_logits : nullptr, s_table);
}

// Several tokens (batched decode): the logits come from linear(), and one block of kPlanWarps warps routes them,
// a warp per token, with PER_LANE logits a lane (the fewest that hold the experts). The router's launch (8 warps,
// 16 logits a lane for up to 512 experts) had routed 4 tokens a warp one after another at 32 sequences, and its
// share of the step had grown from 6.7 to 14.1 us a layer on Model A and from 15.9 to 28.6 us on Model B between 8
// and 32 sequences (H200 trace, 2026-11-29).
constexpr int kPlanWarps = 32;
template <int PER_LANE>
__global__ __launch_bounds__(kPlanWarps * 32) void moe_plan_tokens_kernel(RoutePlanParams p) {
  __shared__ MoeExpertPtrs s_table[kRouterMaxExperts];
  pdl_launch_dependents();
  for (int e = threadIdx.x; e < p.num_experts; e += blockDim.x) s_table[e] = p.table[e];  // uploaded once per layer
  pdl_wait();
  route_and_plan<kPlanWarps, PER_LANE>(p, nullptr, s_table);
}

// The plan kernel's instance for num_experts: the fewest logits a lane that hold them.
template <typename F>
void with_plan_per_lane(int64_t num_experts, F&& f) {
  if (num_experts <= 32) f(std::integral_constant<int, 1>{});
  else if (num_experts <= 64) f(std::integral_constant<int, 2>{});
  else if (num_experts <= 128) f(std::integral_constant<int, 4>{});
  else if (num_experts <= 256) f(std::integral_constant<int, 8>{});
  else f(std::integral_constant<int, kRouterPerLane>{});
}

// Whether the device places a cluster of this kernel, grid and shared memory: asked once per combination.
template <typename Kernel>
bool cluster_fits(Kernel kernel, PdlLaunchConfig& launch) {
  static std::mutex mutex;
  static std::map<std::tuple<const void*, unsigned, size_t>, bool> known;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto key =
      std::make_tuple(reinterpret_cast<const void*>(kernel), launch.config.gridDim.x, launch.config.dynamicSmemBytes);
  auto it = known.find(key);
  if (it != known.end()) return it->second;
  return known[key] = device_places_cluster(kernel, launch);
}

// The router as one cluster of grid.x blocks (PDL as launch_pdl). False, with nothing launched, where the
// device cannot run a cluster that size with this kernel's resources.
template <typename Kernel>
bool launch_as_cluster(Kernel kernel, dim3 grid, dim3 block, size_t smem, cudaStream_t stream, RoutePlanParams p) {
  p.cluster_plan = true;
  PdlLaunchConfig launch(grid, block, smem, stream, grid.x);
  if (!cluster_fits(kernel, launch)) return false;
  launch_config(launch, kernel, p);
  return true;
}

}  // namespace

bool moe_router_plan_fits(const float* x, const uint16_t* router, int64_t hidden) {
  return hidden % 8 == 0 && aligned16(x) && (!router || aligned16(router));
}

void launch_moe_router_plan(const float* x, const uint16_t* router, int64_t num_tokens, int64_t hidden,
                            int64_t num_experts, int64_t top_k, bool sigmoid_scoring, bool normalize,
                            const MoeExpertPtrs* table, int max_group_rows, float* logits,
                            const MoePlanBuffers& plan, unsigned* ticket, cudaStream_t stream,
                            const ResidualNormIn* norm, float* normed,
                            bool logits_only) {
  const RoutePlanParams p{x,
                          reinterpret_cast<const bf16*>(router),
                          logits,
                          static_cast<int>(num_tokens),
                          static_cast<int>(hidden),
                          static_cast<int>(num_experts),
                          static_cast<int>(top_k),
                          sigmoid_scoring,
                          normalize,
                          table,
                          max_group_rows,
                          plan,
                          ticket,
                          gemv_preload_enabled(),
                          !env_equals("MOEX_CUDA_ROUTER_TICKET", "1"),
                          false,
                          logits_only,
                          norm ? *norm : ResidualNormIn{},
                          normed};
  // Several tokens, logits given: the planning kernel of a warp per token (MOEX_CUDA_PLAN_WARPS=8: this kernel's
  // one block of 8 warps, A/B; read at every launch).
  if (!router && !norm && !env_equals("MOEX_CUDA_PLAN_WARPS", "8")) {
    with_plan_per_lane(num_experts, [&](auto per_lane) {
      launch_pdl(moe_plan_tokens_kernel<decltype(per_lane)::value>, dim3(1), dim3(kPlanWarps * 32), 0, stream, p);
    });
    return;
  }
  const dim3 grid(router ? static_cast<unsigned>(ceil_div(num_experts, int64_t(kWarps))) : 1u), block(kThreads);
  const size_t smem = norm ? static_cast<size_t>(hidden) * sizeof(float) : 0;
  // A one-token grid of 2..16 blocks (Model B: 16) runs as one cluster where the device can place it (H200, same
  // call: Model B 3.030 vs 3.082 ms/token with the ticket). MOEX_CUDA_ROUTER_CLUSTER=0 keeps the ticket (A/B;
  // read at every launch).
  const bool cluster = !logits_only && router && num_tokens == 1 && grid.x > 1 && grid.x <= 16 &&
                       !env_equals("MOEX_CUDA_ROUTER_CLUSTER", "0");
  with_norm_weight_regs(hidden, kThreads, [&](auto nw) {
    auto kernel = moe_router_plan_kernel<decltype(nw)::value>;
    if (cluster && launch_as_cluster(kernel, grid, block, smem, stream, p)) return;
    launch_pdl(kernel, grid, block, smem, stream, p);
  });
}

}  // namespace moex::cuda
