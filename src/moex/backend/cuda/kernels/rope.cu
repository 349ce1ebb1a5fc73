// RoPE. Frequencies follow transformers' fp32 recipe (inv_freq = 1 / theta^(2d/rot), angle = pos * inv_freq
// in fp32) so that rounding matches the reference; sincosf (not the fast intrinsic) because angles reach
// thousands of radians at long positions.
#include "moex/backend/cuda/kernels/common.cuh"
#include "moex/backend/cuda/kernels/head_rope.cuh"
#include "moex/backend/cuda/kernels/launch.cuh"
#include "moex/backend/cuda/kernels/rope.cuh"

namespace moex::cuda {
namespace {

__global__ void rope_kernel(float* x, const int32_t* positions, int64_t heads, int64_t head_dim, int rotary_dim,
                            float theta) {
  pdl_launch_dependents();
  pdl_wait();
  int64_t token = blockIdx.x;
  int half = rotary_dim / 2;
  float pos = static_cast<float>(positions[token]);
  for (int idx = threadIdx.x; idx < heads * half; idx += blockDim.x) {
    int64_t head = idx / half;
    int d = idx % half;
    float inv_freq = 1.f / powf(theta, static_cast<float>(2 * d) / static_cast<float>(rotary_dim));
    float sin_v, cos_v;
    sincosf(pos * inv_freq, &sin_v, &cos_v);
    float* row = x + (token * heads + head) * head_dim;
    float x1 = row[d], x2 = row[d + half];
    row[d] = x1 * cos_v - x2 * sin_v;
    row[d + half] = x2 * cos_v + x1 * sin_v;
  }
}

constexpr int kHeadWarps = 4;

// A warp per (token, head) of q and then k, or, with heads_per_warp > 1, heads warp, warp + kHeadWarps, ... of the
// block's kHeadWarps * heads_per_warp (warp_norm_rope_head): each head row goes to shared memory (RoPE pairs dim
// d with d + rotary_dim / 2, which another lane holds), optionally RMS-normalised over head_dim first, then
// rotated and written back. Same arithmetic as rms_norm_kernel + rope_kernel, except the norm's sum is one warp's.
// The rotation's angles depend on the token and the lane, not on the head, so a warp that takes several heads of
// its token computes them once: a powf and a sincosf per dim had made the kernel compute-bound at prefill (H200
// trace, Model B at 2048 tokens: 98 us a layer for 38 MB of rows, a warp per head).
// With kv.k_pages set, a k head's warp also stores the rotated row and the token's v row of that head in
// the paged cache (kv_write_paged_kernel's layout): one launch fewer per layer.
__global__ __launch_bounds__(kHeadWarps * 32) void qk_norm_rope_kernel(float* q, float* k, int heads, int kv_heads,
                                                                       int head_dim, const void* q_norm,
                                                                       const void* k_norm, bool norm_bf16, float eps,
                                                                       const int32_t* positions, int rotary_dim,
                                                                       float theta, KvWrite kv, int heads_per_warp) {
  __shared__ float s_rows[kHeadWarps][kQkNormRopeMaxHeadDim];
  pdl_launch_dependents();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t token = blockIdx.y;
  const int first = blockIdx.x * kHeadWarps * heads_per_warp + warp;
  const int end = min(heads + kv_heads, static_cast<int>(blockIdx.x + 1) * kHeadWarps * heads_per_warp);
  // Returns before the wait touch nothing an earlier kernel writes; block 0's first warp always reaches it.
  if (first >= end) return;
  const HeadNormRope rq{q_norm, norm_bf16, eps, rotary_dim, theta}, rk{k_norm, norm_bf16, eps, rotary_dim, theta};
  // Before the wait, everything but the rows: the positions and block tables (uploaded before the step), the
  // cache slot, the norm weights and the rotation's angles. After it, per head one load of the row, one warp sum.
  const int32_t position = positions[token];
  int64_t slot = -1;  // the token's row in the cache, when the op writes it
  if (kv.k_pages && end > heads) {
    const int64_t slot_pos = kv.rows.row_pos[token];
    const PagedKvRows& rows = kv.rows;
    const int64_t page = rows.tables[int64_t(rows.row_seq[token]) * rows.table_stride + slot_pos / rows.page_size];
    slot = page * rows.page_size + slot_pos % rows.page_size;
  }
  LaneRope lr;  // q's norm weights; k's in wk
  prepare_lane_rope(head_dim, rq, static_cast<float>(position), lane, &lr);
  float wk[kHeadRopeLaneDims];
#pragma unroll
  for (int i = 0; i < kHeadRopeLaneDims; ++i)
    wk[i] = lane + 32 * i < head_dim ? head_norm_weight(rk, lane + 32 * i) : 1.f;
  float wq[kHeadRopeLaneDims];
#pragma unroll
  for (int i = 0; i < kHeadRopeLaneDims; ++i) wq[i] = lr.w[i];
  pdl_wait();
  for (int head = first; head < end; head += kHeadWarps) {
    const bool is_q = head < heads;
    float* row = is_q ? q + (token * heads + head) * head_dim : k + (token * kv_heads + (head - heads)) * head_dim;
#pragma unroll
    for (int i = 0; i < kHeadRopeLaneDims; ++i) lr.w[i] = is_q ? wq[i] : wk[i];
    float* k_slot = nullptr;
    float* v_slot = nullptr;
    const float* v_row = nullptr;
    if (slot >= 0 && !is_q) {
      const int64_t offset = (slot * kv_heads + (head - heads)) * head_dim;
      k_slot = kv.k_pages + offset;
      v_slot = kv.v_pages + offset;
      v_row = kv.v + (token * kv_heads + (head - heads)) * head_dim;
    }
    warp_norm_rope_head_prepared(row, s_rows[warp], head_dim, is_q ? rq : rk, lr, lane, [&](int d, float v) {
      row[d] = v;
      if (k_slot) {
        k_slot[d] = v;
        v_slot[d] = v_row[d];
      }
    });
    __syncwarp();  // the next head's row goes to the same shared memory
  }
}
static_assert(kQkNormRopeMaxHeadDim <= 32 * kHeadRopeLaneDims, "a lane's dims of a head outgrew LaneRope");

}  // namespace

void launch_qk_norm_rope(float* q, float* k, int64_t n, int64_t heads, int64_t kv_heads, int64_t head_dim,
                         const void* q_norm, const void* k_norm, bool norm_bf16, float eps, const int32_t* positions,
                         int64_t rotary_dim, double theta, const KvWrite& kv, cudaStream_t stream) {
  if (n == 0) return;
  // Prefill-sized n: a block per token, its warps sharing out every head (a few thousand blocks still); fewer
  // tokens keep a warp per head, so that the grid still covers the SMs.
  const int64_t total = heads + kv_heads;
  const int64_t per_warp = n >= 256 ? ceil_div(total, int64_t{kHeadWarps}) : 1;
  const dim3 grid(static_cast<unsigned>(ceil_div(total, kHeadWarps * per_warp)), static_cast<unsigned>(n));
  launch_pdl(qk_norm_rope_kernel, grid, dim3(kHeadWarps * 32), 0, stream, q, k, static_cast<int>(heads),
             static_cast<int>(kv_heads), static_cast<int>(head_dim), q_norm, k_norm, norm_bf16, eps, positions,
             static_cast<int>(rotary_dim), static_cast<float>(theta), kv, static_cast<int>(per_warp));
}

void launch_rope(float* x, const int32_t* positions, int64_t n, int64_t heads, int64_t head_dim,
                 int64_t rotary_dim, double theta, cudaStream_t stream) {
  if (n == 0 || rotary_dim == 0) return;
  launch_pdl(rope_kernel, dim3(static_cast<unsigned>(n)), dim3(256), 0, stream, x, positions, heads, head_dim,
             static_cast<int>(rotary_dim), static_cast<float>(theta));
}

}  // namespace moex::cuda
