// Router: one warp per token (router_warp.cuh).
#include "moex/backend/cuda/kernels/router.cuh"
#include "moex/backend/cuda/kernels/router_warp.cuh"

namespace moex::cuda {
namespace {

constexpr int kWarps = 4;

__global__ __launch_bounds__(kWarps * 32) void router_kernel(const float* logits, int num_tokens, int num_experts,
                                                              int top_k, bool sigmoid_scoring, bool normalize,
                                                              int32_t* ids, float* weights) {
  int token = blockIdx.x * kWarps + (threadIdx.x >> 5);
  if (token >= num_tokens) return;
  router_warp(logits + int64_t(token) * num_experts, num_experts, top_k, sigmoid_scoring, normalize,
              ids + int64_t(token) * top_k, weights + int64_t(token) * top_k);
}

}  // namespace

void launch_router_topk(const float* logits, int64_t num_tokens, int64_t num_experts, int64_t top_k,
                        bool sigmoid_scoring, bool normalize, int32_t* ids, float* weights, cudaStream_t stream) {
  if (num_tokens == 0) return;
  unsigned blocks = static_cast<unsigned>(ceil_div(num_tokens, kWarps));
  router_kernel<<<blocks, kWarps * 32, 0, stream>>>(logits, static_cast<int>(num_tokens),
                                                    static_cast<int>(num_experts), static_cast<int>(top_k),
                                                    sigmoid_scoring, normalize, ids, weights);
}

}  // namespace moex::cuda
