// Decode at batch 1: a token's whole MoE block after the router's logits -- top-k, plan, residual sum, gate/up +
// SwiGLU, down and the weighted combine -- in one launch (MOEX_CUDA_MOE_ONE_LAUNCH; moe.cuh has the contract).
// Why: as two launches (moe_topk_gate_up.cu, then the down kernel) the down kernel's blocks got onto the SMs only
// as the gate/up blocks left them, and its first weights were requested only then: each kernel boundary had cost
// ~2-3 us of a layer's critical path (docs/cuda.md). Here the blocks stay resident and take work items from a
// device counter: every gate/up item (8 gate and up rows of one pick) has a lower ticket than every down item (a
// feature group: 8 / top_k features, all picks), so a block that draws a down item has its down weights in flight
// while the last gate/up items finish, and waits only for the count of finished gate/up items (the items it
// waits for were all drawn by running blocks, which wait for nothing: no deadlock, whatever the residency).
// The arithmetic is the two-launch path's, loop for loop: the outputs are bit-identical to it.
#include "moex/backend/cuda/kernels/gemv_core.cuh"
#include "moex/backend/cuda/kernels/grid_sync.cuh"
#include "moex/backend/cuda/kernels/launch.cuh"
#include "moex/backend/cuda/kernels/moe.cuh"
#include "moex/backend/cuda/kernels/moe_one_token.cuh"
#include "moex/backend/cuda/kernels/residual_norm.cuh"
#include "moex/backend/cuda/kernels/router_warp.cuh"

namespace moex::cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;

struct OneLaunchParams : OneTokenMoeParams {
  float* out;  // [hidden]; may be residual.d0
  MoeOneLaunchCounters* counters;
};

// PER_LANE: logits a lane holds (num_experts <= 32 * PER_LANE); U: gate/up loads in flight per lane and row
// (moe_one_token_gate_up_unroll). MIN_BLOCKS: the gate/up kernel's blocks per SM at that U (6 at U = 2, 4 at 4).
// A down row's 16-byte loads a lane has in flight: 4 (Model B's 768-wide rows: all of them) in the 40-register
// instance, 8 in the 64-register one.
template <int PER_LANE, int U, int MIN_BLOCKS>
__global__ __launch_bounds__(kThreads, MIN_BLOCKS) void moe_one_launch_kernel(OneLaunchParams p) {
  constexpr int kDownUnroll = U == 4 ? 8 : 4;
  __shared__ const uint16_t* s_table[3][32 * PER_LANE];  // gate, up, down of every expert
  __shared__ int32_t s_ids[kMoeOneTokenMaxTopK];          // pick order (router_warp's)
  __shared__ float s_weights[kMoeOneTokenMaxTopK];
  __shared__ int s_rank_expert[kMoeOneTokenMaxTopK];      // expert order
  __shared__ int s_slot[kMoeOneTokenMaxTopK];             // pick -> rank
  __shared__ float s_dot[kWarps];
  __shared__ unsigned s_ticket[2];
  pdl_launch_dependents();
  for (int e = threadIdx.x; e < p.num_experts; e += kThreads) {  // before the wait: uploaded once per layer
    const MoeExpertPtrs we = p.table[e];
    s_table[0][e] = we.gate;
    s_table[1][e] = we.up;
    s_table[2][e] = we.down;
  }
  pdl_wait();
  // The counters only after the wait: the previous layer's launch, which leaves them at 0, is then complete.
  MoeOneLaunchCounters* const c = p.counters;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  // Tickets are drawn by thread 32 (warp 1), so that warp 0's routing does not wait for the atomic's answer.
  constexpr int kDrawer = 32;
  if (threadIdx.x == kDrawer) s_ticket[0] = atomicAdd(&c->next, 1u);
  if (warp == 0) {
    // Every block routes the token itself (the same selection, weights and order as the planning launches), so
    // that no block waits for another's plan.
    const int id = router_warp<false, PER_LANE>(p.logits, p.num_experts, p.top_k, p.sigmoid_scoring, p.normalize,
                                                s_ids, s_weights);
    const int rank = warp_pick_rank(id, p.top_k);
    if (lane < p.top_k) {
      s_rank_expert[rank] = id;
      s_slot[lane] = rank;
    }
  }
  __syncthreads();
  if (blockIdx.x == 0 && threadIdx.x < p.top_k) {  // what the planning launches write, for the ops after this one
    const int a = threadIdx.x, e = s_ids[a];
    write_one_token_plan(p, a, e, s_weights[a], s_slot[a], MoeExpertPtrs{s_table[0][e], s_table[1][e], s_table[2][e]});
  }
  const int blocks_per_pick = (p.ffn + kWarps - 1) / kWarps;
  const unsigned gate_up_items = unsigned(blocks_per_pick * p.top_k);
  const int features_per_item = kWarps / p.top_k;
  const unsigned items = gate_up_items + unsigned((p.hidden + features_per_item - 1) / features_per_item);
  const int k8_ffn = p.ffn / 8;
  bool h_ready = false;
  int parity = 0;
  for (unsigned t = s_ticket[0]; t < items;) {
    // The next item's ticket, in flight during this one: stored (so waited for) only after the item's own work.
    unsigned next_ticket = 0;
    if (threadIdx.x == kDrawer) next_ticket = atomicAdd(&c->next, 1u);
    if (t < gate_up_items) {
      const int r = int(t) / blocks_per_pick, bx = int(t) % blocks_per_pick;
      if (r == 0) one_token_residual_sum(p, bx, blocks_per_pick);  // down items run after every part
      const int expert = s_rank_expert[r];
      const int j = bx * kWarps + warp;
      if (j < p.ffn) one_token_swiglu_row<U>(p, s_table[0][expert], s_table[1][expert], r, j, lane);
      if (threadIdx.x == kDrawer) s_ticket[parity ^ 1] = next_ticket;
      __syncthreads();  // the item's h and residual stores are all issued
      if (threadIdx.x == 0) {  // released: the block's stores before the count (cumulative through the barrier)
        fence_acq_rel();
        add_relaxed(&c->gate_up_done, 1u);
      }
    } else {
      // Warp (local, pick) of feature group g: the down row of feature g * features_per_item + local of the pick's
      // expert, against the pick's h row; the block then combines each feature's picks in pick order.
      const int g = int(t - gate_up_items);
      const int local = warp / p.top_k, pick = warp % p.top_k;
      const int feature = g * features_per_item + local;
      const bool active = local < features_per_item && feature < p.hidden;
      const bf16* row = reinterpret_cast<const bf16*>(s_table[2][s_ids[pick]]) + int64_t(feature) * p.ffn;
      uint4 first[kDownUnroll] = {};
      if (active) preload_row<kDownUnroll>(row, k8_ffn, lane, first);
      if (!h_ready) {  // block-uniform: the first down item of this block
        if (threadIdx.x == 0) {
          while (load_relaxed(&c->gate_up_done) < gate_up_items) __nanosleep(64);
          fence_acq_rel();
        }
        __syncthreads();
        h_ready = true;
      }
      float dot = 0.f;
      // h through plain (coherent) loads: it was written during this launch, after the acquire above.
      if (active) dot = warp_sum(dot_preloaded<kDownUnroll, true>(first, row, p.h + int64_t(s_slot[pick]) * p.ffn,
                                                                  k8_ffn, lane));
      if (lane == 0) s_dot[warp] = dot;
      if (threadIdx.x == kDrawer) s_ticket[parity ^ 1] = next_ticket;
      __syncthreads();
      if (threadIdx.x < features_per_item) {
        const int f = g * features_per_item + threadIdx.x;
        if (f < p.hidden) {
          float acc = 0.f;
          for (int k = 0; k < p.top_k; ++k) acc += s_weights[k] * s_dot[threadIdx.x * p.top_k + k];
          p.out[f] = acc;
        }
      }
      __syncthreads();  // s_dot and the next ticket
    }
    parity ^= 1;
    t = s_ticket[parity];
  }
  // The last block out leaves the counters at 0 for the next launch (every ticket was drawn before it).
  if (threadIdx.x == 0 && atomicAdd(&c->exited, 1u) == gridDim.x - 1) {
    c->next = 0;
    c->gate_up_done = 0;
    c->exited = 0;
  }
}

// A kernel instance and the blocks of it an SM holds at once (asked once per instance: a driver call).
struct OneLaunchInstance {
  void (*kernel)(OneLaunchParams);
  int blocks_per_sm;
};

template <int PER_LANE, int U, int MIN_BLOCKS>
OneLaunchInstance one_launch_instance() {
  static const int per_sm = std::max(blocks_per_sm(moe_one_launch_kernel<PER_LANE, U, MIN_BLOCKS>, kThreads), 1);
  return {moe_one_launch_kernel<PER_LANE, U, MIN_BLOCKS>, per_sm};
}

template <int U, int MIN_BLOCKS>
OneLaunchInstance one_launch_instance(int64_t num_experts) {
  if (num_experts <= 32) return one_launch_instance<1, U, MIN_BLOCKS>();
  if (num_experts <= 128) return one_launch_instance<4, U, MIN_BLOCKS>();
  return one_launch_instance<kRouterPerLane, U, MIN_BLOCKS>();
}

}  // namespace

bool moe_one_launch_pays(int64_t hidden) { return moe_one_token_gate_up_unroll(hidden) == 4; }

void launch_moe_one_launch_one_token(const float* x, const float* logits, int64_t hidden, int64_t ffn,
                                     int64_t num_experts, int64_t top_k, bool sigmoid_scoring, bool normalize,
                                     const MoeExpertPtrs* table, const MoePlanBuffers& plan, float* h,
                                     const ResidualNormIn& residual, float* out, MoeOneLaunchCounters* counters,
                                     int num_sms, cudaStream_t stream) {
  const OneLaunchParams p{one_token_moe_params(x, logits, hidden, ffn, num_experts, top_k, sigmoid_scoring, normalize,
                                               table, plan, h, residual),
                          out, counters};
  const OneLaunchInstance instance = moe_one_token_gate_up_unroll(hidden) == 2 ? one_launch_instance<2, 6>(num_experts)
                                                                               : one_launch_instance<4, 4>(num_experts);
  // As many blocks as the SMs hold at once: more would only queue behind them (they draw the same items).
  launch_pdl(instance.kernel, dim3(static_cast<unsigned>(num_sms * instance.blocks_per_sm)), dim3(kThreads), 0, stream,
             p);
}

}  // namespace moex::cuda
