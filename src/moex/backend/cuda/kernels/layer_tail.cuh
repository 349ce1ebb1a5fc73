// A decoder layer at batch 1 from its attention's output to the next layer's q/k/v -- o_proj, the residual sum,
// the norm, the router, the top-k, gate/up + SwiGLU, down + the weighted combine, the next norm and the next
// q/k/v -- as one persistent launch (layer_tail.cu says why, how, and where it stands: opt-in, MOEX_CUDA_LAYER_TAIL=1).
// Host-visible declarations.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "moex/backend/cuda/kernels/gemv.cuh"
#include "moex/backend/cuda/kernels/moe_group.h"

namespace moex::cuda {

// Grid-wide barriers of the launch: device memory, all 0 before the first launch; each launch leaves them at 0.
// No other launch may use them meanwhile.
struct LayerTailCounters {
  unsigned projected, routed_logits, activated, combined, exited, unused[3];
};

// Where a launch's time goes (MOEX_CUDA_TAIL_TIMES=1): per event, summed over blocks and launches, the ns from the
// block's PDL wait to it, and the largest such offset of any block (atomics on device memory, zeroed by the host).
// Events: the block's start (before its wait: negative offset, as wait - start), o_proj done, its barrier passed,
// the router's rows done, the producer's top-k known, gate/up done, its barrier passed, down + combine done, its
// barrier passed, q/k/v done.
constexpr int kLayerTailEvents = 10;
struct LayerTailTimes {
  unsigned long long sum_ns[kLayerTailEvents];
  unsigned long long max_ns[kLayerTailEvents];
  unsigned long long samples;
  unsigned long long consumer_wait_ns;  // thread 0's waits for a slot's rows to land, summed
  unsigned long long producer_wait_ns;  // the producer's waits for a slot to come free, summed
};

struct LayerTailParams {
  int hidden = 0, qdim = 0;              // o_proj: [hidden, qdim]
  const float* attn = nullptr;           // [qdim], the attention's output
  const uint16_t* o_proj = nullptr;
  float* x = nullptr;                    // [hidden]: x = (x + pending) + attn o_proj^T, stored
  const float* pending = nullptr;        // [hidden] or null: the previous layer's MoE output, not yet in x
  const void* ffn_norm = nullptr;        // [hidden], bf16 or fp32
  bool ffn_norm_bf16 = false;
  float eps = 0.f;
  float* normed = nullptr;               // [hidden]: rms_norm(x) * ffn_norm, stored
  const uint16_t* router = nullptr;      // [num_experts, hidden]
  float* logits = nullptr;               // [num_experts], stored
  int num_experts = 0, top_k = 0, ffn = 0;
  bool sigmoid_scoring = false, normalize = false;
  const MoeExpertPtrs* table = nullptr;  // [num_experts], device memory
  float* act = nullptr;                  // [top_k, ffn] scratch: silu(gate h) * up h of pick r in row r
  float* out = nullptr;                  // [hidden]: the MoE output (may be pending: read before it is written)
  // The next layer's q/k/v from rms_norm(x + out) * next_norm (next_count 0: none). x is left without out, as
  // norm_linear_many leaves it.
  int next_count = 0;
  GemvOutput next[kGemvMaxOutputs];
  const void* next_norm = nullptr;
  bool next_norm_bf16 = false;
  LayerTailCounters* counters = nullptr;
  LayerTailTimes* times = nullptr;  // null: not measured
  // Ring slot size (MOEX_CUDA_TAIL_SLOT_KB, A/B; 16 KB measured slower than 32 while consumers synchronised per chunk).
  int slot_bytes = 32 * 1024;
};

// Whether launch_layer_tail takes these parameters on this device: widths % 8 == 0, every weight and vector
// 16-byte aligned, top_k <= 8, num_experts <= 256, a row (a gate and an up row together) within a ring slot,
// [top_k, ffn] of activations within 64 KB, and room for at least three slots beside it.
bool layer_tail_fits(const LayerTailParams& p);
// One block per SM (num_sms blocks, all resident at once). Returns false, launching nothing, unless
// layer_tail_fits.
bool launch_layer_tail(const LayerTailParams& p, int num_sms, cudaStream_t stream);

}  // namespace moex::cuda
