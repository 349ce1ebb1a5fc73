// The MoE expert block on the CPU: tokens grouped by expert (exactly the routed ones), then two
// threaded passes over all active experts at once — gate/up + silu*up, then down — and a weighted
// sum in expert-id order (the order transformers accumulates in).
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "moex/backend/backend.h"
#include "moex/core/thread_pool.h"

namespace moex::cpu {

// Buffers reused across calls, so a steady-state decode step allocates nothing. Not thread-safe:
// one per backend, used by one caller at a time.
struct MoeScratch {
  struct Unit {
    int32_t expert;
    int64_t row_begin;
    int64_t row_end;
  };
  std::vector<int64_t> expert_offset;  // [num_experts + 1]: first sorted row of each expert
  std::vector<int64_t> expert_fill;    // [num_experts]
  std::vector<int64_t> slot_row;       // [n * top_k]: sorted row that holds (token, slot)
  std::vector<int32_t> row_token;      // [n * top_k]: token of each sorted row
  std::vector<float> x_sorted;         // [n * top_k, hidden]
  std::vector<float> gate;             // [n * top_k, ffn]; becomes silu(gate) * up
  std::vector<float> up;               // [n * top_k, ffn]
  std::vector<float> down;             // [n * top_k, hidden]
  std::vector<Unit> units;
};

// x, out: [n, hidden] fp32 (out is overwritten). Validates expert shapes (MOEX_ASSERT: a bad id or
// shape here is a bug of the caller, the model code checks its inputs).
void moe_experts(ThreadPool& pool, MoeScratch& scratch, const float* x, int64_t hidden, const Routing& routing,
                 std::span<const ExpertWeights> experts, float* out);

// A split miss's host share for one token: gate_out[0:rows] = silu(x_gate gate[0:rows]^T) * (x_up up[0:rows]^T),
// up_out[0:rows] scratch; w bf16/f16/f32 or packed. Row blocks over the pool, each block's three steps together.
void expert_gate_up_rows(ThreadPool& pool, const float* x_gate, const float* x_up, const ExpertWeights& w,
                         int64_t rows, float* gate_out, float* up_out);

}  // namespace moex::cpu
