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

// One warp per (token, head) of q and then k (warp_norm_rope_head): the head row goes to shared memory (RoPE
// pairs dim d with d + rotary_dim / 2, which another lane holds), optionally RMS-normalised over head_dim first,
// then rotated and written back. Same arithmetic as rms_norm_kernel + rope_kernel, except the norm's sum is one
// warp's.
// With kv.k_pages set, a k head's warp also stores the rotated row and the token's v row of that head in
// the paged cache (kv_write_paged_kernel's layout): one launch fewer per layer.
__global__ __launch_bounds__(kHeadWarps * 32) void qk_norm_rope_kernel(float* q, float* k, int heads, int kv_heads,
                                                                       int head_dim, const void* q_norm,
                                                                       const void* k_norm, bool norm_bf16, float eps,
                                                                       const int32_t* positions, int rotary_dim,
                                                                       float theta, KvWrite kv) {
  __shared__ float s_rows[kHeadWarps][kQkNormRopeMaxHeadDim];
  pdl_launch_dependents();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t token = blockIdx.y;
  const int head = blockIdx.x * kHeadWarps + warp;
  // Returns before the wait touch nothing an earlier kernel writes; block 0's first warp always reaches it.
  if (head >= heads + kv_heads) return;
  const bool is_q = head < heads;
  float* row = is_q ? q + (token * heads + head) * head_dim : k + (token * kv_heads + (head - heads)) * head_dim;
  const HeadNormRope r{is_q ? q_norm : k_norm, norm_bf16, eps, rotary_dim, theta};
  // Before the wait, everything but the rows: the positions and block tables (uploaded before the step), the
  // cache slot, the norm weight and the rotation's angles. After it, one load of the row, one warp sum.
  const int32_t position = positions[token];
  float* k_slot = nullptr;  // this k head's row in the cache, when the op writes it
  float* v_slot = nullptr;
  const float* v_row = nullptr;
  if (kv.k_pages && !is_q) {
    const int64_t slot_pos = kv.rows.row_pos[token];
    const PagedKvRows& rows = kv.rows;
    const int64_t page = rows.tables[int64_t(rows.row_seq[token]) * rows.table_stride + slot_pos / rows.page_size];
    const int64_t slot = page * rows.page_size + slot_pos % rows.page_size;
    const int64_t offset = (slot * kv_heads + (head - heads)) * head_dim;
    k_slot = kv.k_pages + offset;
    v_slot = kv.v_pages + offset;
    v_row = kv.v + (token * kv_heads + (head - heads)) * head_dim;
  }
  LaneRope lr;
  prepare_lane_rope(head_dim, r, static_cast<float>(position), lane, &lr);
  pdl_wait();
  warp_norm_rope_head_prepared(row, s_rows[warp], head_dim, r, lr, lane, [&](int d, float v) {
    row[d] = v;
    if (k_slot) {
      k_slot[d] = v;
      v_slot[d] = v_row[d];
    }
  });
}
static_assert(kQkNormRopeMaxHeadDim <= 32 * kHeadRopeLaneDims, "a lane's dims of a head outgrew LaneRope");

}  // namespace

void launch_qk_norm_rope(float* q, float* k, int64_t n, int64_t heads, int64_t kv_heads, int64_t head_dim,
                         const void* q_norm, const void* k_norm, bool norm_bf16, float eps, const int32_t* positions,
                         int64_t rotary_dim, double theta, const KvWrite& kv, cudaStream_t stream) {
  if (n == 0) return;
  const dim3 grid(static_cast<unsigned>(ceil_div(heads + kv_heads, kHeadWarps)), static_cast<unsigned>(n));
  launch_pdl(qk_norm_rope_kernel, grid, dim3(kHeadWarps * 32), 0, stream, q, k, static_cast<int>(heads),
             static_cast<int>(kv_heads), static_cast<int>(head_dim), q_norm, k_norm, norm_bf16, eps, positions,
             static_cast<int>(rotary_dim), static_cast<float>(theta), kv);
}

void launch_rope(float* x, const int32_t* positions, int64_t n, int64_t heads, int64_t head_dim,
                 int64_t rotary_dim, double theta, cudaStream_t stream) {
  if (n == 0 || rotary_dim == 0) return;
  launch_pdl(rope_kernel, dim3(static_cast<unsigned>(n)), dim3(256), 0, stream, x, positions, heads, head_dim,
             static_cast<int>(rotary_dim), static_cast<float>(theta));
}

}  // namespace moex::cuda
