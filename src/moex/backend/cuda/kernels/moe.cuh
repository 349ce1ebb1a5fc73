// Launchers of the MoE expert computation. The host plans (it holds the routing): assignments (token,
// expert) are sorted by expert into rows of a permuted batch, and cut into groups of consecutive rows of
// one expert. Every kernel below covers all groups of a layer in one launch.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "moex/backend/cuda/kernels/gemv.cuh"
#include "moex/backend/cuda/kernels/moe_group.h"

namespace moex::cuda {

// GEMV path. x fp32 [*, hidden]; row_token[r] = token of permuted row r; h fp32 [rows, ffn] (scratch);
// y fp32 [rows, hidden] = down(silu(gate x) * up x) per row, unweighted. groups on the device.
// max_rows: the largest num_rows among groups (selects the kernel instance). hidden, ffn % 8 == 0.
// device_num_groups (optional): the real group count, read on the device; num_groups then only bounds it
// (blocks of groups beyond it exit at once), so a plan made on the device needs no host round trip.
// num_sms > 0 allows the row-split tensor-core kernels (mma_rows.cuh; MOEX_CUDA_MMA_ROWS=0: the 16-row ones) for
// groups of 2-kMoeGemvMaxRows rows, which split K over a cluster where expected_groups (about the plan's group
// count; 0: num_groups) gives too few blocks.
void launch_moe_gemv(const float* x, const int32_t* row_token, const MoeGroup* groups, int num_groups,
                     int max_rows, int64_t hidden, int64_t ffn, float* h, float* y, cudaStream_t stream,
                     const int32_t* device_num_groups = nullptr, int num_sms = 0, int expected_groups = 0);
// Whether launch_moe_gemv takes the row-split kernels for groups of up to max_rows rows of these shapes (given
// num_sms and 16-byte aligned x and h): the device-side planner then keeps every expert one group.
bool moe_rows_kernels_take(int64_t max_rows, int64_t hidden, int64_t ffn);

// One token's top_k experts planned on the device (launch_moe_router_plan with one token: top_k groups of one
// row each, group r = row r): gate/up + SwiGLU into h [top_k, ffn], then down and the weighted combine in one
// kernel into out [hidden]. Bit-identical to launch_moe_gemv + launch_moe_combine, two launches instead of three.
// top_k <= kMoeOneTokenMaxTopK. preload_down (MOEX_CUDA_DOWN_PRELOAD=1, opt-in: no gain on an H200, 2026-11-27): the
// down kernel reads the plan and loads its first weights before waiting for gate/up (same results).
constexpr int kMoeOneTokenMaxTopK = 8;
void launch_moe_gemv_one_token(const float* x, const int32_t* row_token, const MoeGroup* groups, int top_k,
                               int64_t hidden, int64_t ffn, const int32_t* slot, const float* weights, float* h,
                               float* out, int num_sms, cudaStream_t stream, bool preload_down = false);

// The down + combine half of launch_moe_gemv_one_token: h [top_k, ffn] from gate/up, out [hidden].
void launch_moe_down_one_token(const float* h, const MoeGroup* groups, int top_k, int64_t hidden, int64_t ffn,
                               const int32_t* slot, const float* weights, float* out, int num_sms, cudaStream_t stream,
                               bool preload_down);
// 16-byte loads in flight per lane and row of the one-token gate/up kernels (2 or 4; moe_gemv.cu says why).
int moe_one_token_gate_up_unroll(int64_t hidden);

// Where a layer's routing and plan go on the device (launch_moe_router_plan's outputs): ids and weights [tokens,
// top_k], row_token and slot [tokens * top_k], groups (at most tokens * top_k) and their count.
struct MoePlanBuffers {
  int32_t* ids;
  float* weights;
  int32_t* row_token;
  int32_t* slot;
  MoeGroup* groups;
  int32_t* num_groups;
};

// One token's top-k, plan and residual sum inside the gate/up launch, then down + combine
// (MOEX_CUDA_TOPK_IN_GATE_UP; kernels/moe_topk_gate_up.cu says why). logits [num_experts]: the router launch's
// (launch_moe_router_plan with logits_only); x: the normalised row it wrote. Every gate/up block routes the
// logits as launch_moe_router_plan does (ids, weights and the plan bit-identical to it) and takes the pick of
// its blockIdx.y in expert order; block (0, 0) writes ids, weights and the plan (plan's row_token, slot, groups,
// num_groups); the blocks of row 0 write residual.x = (x + d0) + d1 (only x, d0, d1 are read, before the down
// kernel writes out, which may be d0). top_k <= kMoeOneTokenMaxTopK, num_experts <= kRouterMaxExperts, hidden and
// ffn % 8 == 0.
void launch_moe_topk_gate_up_one_token(const float* x, const float* logits, int64_t hidden, int64_t ffn,
                                       int64_t num_experts, int64_t top_k, bool sigmoid_scoring, bool normalize,
                                       const MoeExpertPtrs* table, const MoePlanBuffers& plan, float* h,
                                       const ResidualNormIn& residual, float* out, int num_sms, cudaStream_t stream);

// The top-k, plan, residual sum, gate/up and down + combine of launch_moe_topk_gate_up_one_token in one launch
// (kernels/moe_one_launch.cu says why), with the same contract and bit-identical outputs. Its blocks draw work
// items from counters (device memory, all 0 before the first launch; each launch leaves them at 0), which no
// other launch may use meanwhile.
struct MoeOneLaunchCounters {
  unsigned next, gate_up_done, exited, unused;
};
void launch_moe_one_launch_one_token(const float* x, const float* logits, int64_t hidden, int64_t ffn,
                                     int64_t num_experts, int64_t top_k, bool sigmoid_scoring, bool normalize,
                                     const MoeExpertPtrs* table, const MoePlanBuffers& plan, float* h,
                                     const ResidualNormIn& residual, float* out, MoeOneLaunchCounters* counters,
                                     int num_sms, cudaStream_t stream);
// Whether the one launch is the faster path for rows of this width (H200, against the two launches in the same
// calls, bench/RESULTS.md): it is for the 8x7B-shaped layer's 4096-wide rows (the gate/up rows with 4 loads in
// flight, 64 registers: 0.2817-0.2820 vs 0.2863 ms/token, and 0.2772 vs 0.2833), not at 2048 (the 40-register
// instance: Model A 0.5667 vs 0.4991, 12-layer Model B 0.7808 vs 0.7226; with 64 registers too, 0.5514 and 0.7747).
bool moe_one_launch_pays(int64_t hidden);

// Largest num_tokens * top_k the device-side planner takes (one block).
constexpr int kMoeRoutePlanMaxAssignments = 256;

// Router, routing and GEMV planning on the device, one launch: with router set (num_tokens == 1 only), logits
// fp32 [1, num_experts] = x fp32 [1, hidden] times router bf16 [num_experts, hidden]^T (the same loop and
// summation order as launch_gemv_bf16); with router null, logits [num_tokens, num_experts] as given. Then
// ids/weights [num_tokens, top_k] (as launch_router_topk), then the plan that
// plan_moe() makes on the host for the GEMV path: assignments ordered by expert then (token, pick); row_token
// [total], slot [total], groups (at most total, of <= max_group_rows rows, weights from table [num_experts])
// and their count in *num_groups. total = num_tokens * top_k <= kMoeRoutePlanMaxAssignments; hidden % 8 == 0,
// x and router 16-byte aligned. ticket: one device counter, 0 before the launch and 0 again after it.
// norm (one token with a router; residual_norm_fits(*norm, hidden)): the residual step rides in the launch: x
// is ignored, the router reads rms_norm((norm->x + d0) + d1), and the kernel writes that residual sum back
// to norm->x and the normalised row to normed [hidden] (which the expert kernels then take as x).
// logits_only (one token with a router and norm): the logits and normed only -- no routing, no plan, norm->x
// left as it is (launch_moe_topk_gate_up_one_token routes, plans and writes the residual sum).
void launch_moe_router_plan(const float* x, const uint16_t* router, int64_t num_tokens, int64_t hidden,
                            int64_t num_experts, int64_t top_k, bool sigmoid_scoring, bool normalize,
                            const MoeExpertPtrs* table, int max_group_rows, float* logits,
                            const MoePlanBuffers& plan, unsigned* ticket, cudaStream_t stream,
                            const ResidualNormIn* norm = nullptr,
                            float* normed = nullptr, bool logits_only = false);
// Whether launch_moe_router_plan takes this x and router (hidden % 8 == 0, both 16-byte aligned; router may be null).
bool moe_router_plan_fits(const float* x, const uint16_t* router, int64_t hidden);
// The GEMM path's plan made on the device (moe_prefill_plan.cu): ids [total] (all in [0, num_experts), the
// router's picks, token-major), the layer's expert table -> row_token [total], slot [total], tiles of at most
// tile_rows rows of one expert and their count, exactly as plan_moe orders them. tiles has room for
// moe_prefill_max_tiles(total, num_experts, tile_rows). num_experts <= kMoePrefillPlanMaxExperts. counts: scratch
// of moe_prefill_plan_counts(total, num_experts) ints (each chunk's picks per expert).
constexpr int kMoePrefillPlanMaxExperts = 256;
inline int64_t moe_prefill_max_tiles(int64_t total, int64_t num_experts, int tile_rows) {
  return (total + tile_rows - 1) / tile_rows + num_experts;  // each expert's last tile may be partial
}
int64_t moe_prefill_plan_counts(int64_t total, int64_t num_experts);
void launch_moe_prefill_plan(const int32_t* ids, int64_t total, int64_t top_k, int64_t num_experts,
                             const MoeExpertPtrs* table, int tile_rows, int32_t* counts, int32_t* row_token,
                             int32_t* slot, MoeGroup* tiles, int32_t* num_tiles, cudaStream_t stream);

// GEMM path, stage 1: h bf16 [rows, ffn] = silu(a gate^T) * (a up^T); plan row r of a bf16 is row a_rows[r] (the
// plan's row_token over the tokens' rows: the kernel gathers), or row r where a_rows is null (a gathered in
// permuted order). Stage 2: y fp32 [rows, hidden] = h down^T. hidden, ffn % 8 == 0. tile_rows:
// the plan's (kMoeGemmTileRows or kMoeGemmSmallTileRows), no tile has more rows. device_num_tiles (a plan made
// on the device): the real tile count, read by the kernels; num_tiles then only bounds it (blocks of tiles past
// it exit at once).
void launch_moe_gemm_gate_up(const uint16_t* a, const int32_t* a_rows, const MoeGroup* tiles, int num_tiles,
                             int tile_rows, int64_t hidden, int64_t ffn, uint16_t* h, cudaStream_t stream,
                             const int32_t* device_num_tiles = nullptr);
void launch_moe_gemm_down(const uint16_t* h, const MoeGroup* tiles, int num_tiles, int tile_rows, int64_t hidden,
                          int64_t ffn, float* y, cudaStream_t stream, const int32_t* device_num_tiles = nullptr);

// out[t, :] = sum_j weights[t, j] * y[slot[t, j], :] over slot >= 0; slot/weights [num_tokens, top_k]. Overwrites out, in a
// fixed order (no atomics), so results are bit-reproducible.
void launch_moe_combine(const float* y, const int32_t* slot, const float* weights, int64_t num_tokens,
                        int64_t top_k, int64_t hidden, float* out, cudaStream_t stream);

// Dense tensor-core GEMM: out fp32 [M, N] = a bf16 [M, K] @ w bf16 [N, K]^T (+ bias fp32 [N]). K % 8 == 0.
// Tiles of 128 rows when they still give every SM a block, else of 64. A GEMM too narrow for its 64-row tiles to
// cover the SMs (a router) splits K over blocks and adds the chunks' sums up in a second launch, where
// split_scratch holds dense_gemm_split_floats(M, K, N, num_sms) floats (0: it is not split; without the scratch
// it runs unsplit).
void launch_dense_gemm(const uint16_t* a, int64_t M, int64_t K, const uint16_t* w, int64_t N, const float* bias,
                       float* out, int num_sms, cudaStream_t stream, float* split_scratch = nullptr,
                       size_t split_scratch_floats = 0);
size_t dense_gemm_split_floats(int64_t M, int64_t K, int64_t N, int num_sms);
// Several outputs of the same a (q/k/v; GemvOutput: w [rows, K], y [M, rows]): one grid for up to three of them
// side by side where every one but the last is a multiple of 256 columns wide (else more grids). One output alone
// is split as above.
void launch_dense_gemm(const uint16_t* a, int64_t M, int64_t K, const GemvOutput* outputs, int count, int num_sms,
                       cudaStream_t stream, float* split_scratch = nullptr, size_t split_scratch_floats = 0);

}  // namespace moex::cuda
