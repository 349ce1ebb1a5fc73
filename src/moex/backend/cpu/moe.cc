// Expert execution. Work units are (expert, block of output rows) across every active expert, so at
// batch 1 the two selected experts' rows are split over all threads, and in prefill each expert runs
// the packed GEMM over its own tokens with the same units.
#include "moex/backend/cpu/moe.h"

#include <algorithm>

#include "moex/backend/cpu/linear_kernels.h"
#include "moex/backend/cpu/ops.h"
#include "moex/backend/cpu/packed_linear.h"
#include "moex/core/error.h"

namespace moex::cpu {
namespace {

template <typename T>
void grow(std::vector<T>& buffer, size_t size) {
  if (buffer.size() < size) buffer.resize(size);
}

LinearProblem make_problem(const float* x, int64_t ldx, int64_t m, const TensorView& w, float* out, int64_t ldo) {
  LinearProblem p;
  p.x = x;
  p.ldx = ldx;
  p.m = m;
  p.k = w.dim(1);
  p.w = w.data;
  p.w_dtype = w.dtype;
  p.out = out;
  p.ldo = ldo;
  return p;
}

// linear_block over rows [row_begin, row_end) of an expert matrix for its first `tokens` tokens; a matrix held in
// the 12-bit packing (packed non-null) is unpacked a row block at a time, with the same sums.
void expert_block(const LinearProblem& p, const PackedBf16* packed, int64_t row_begin, int64_t row_end,
                  int64_t tokens) {
  if (packed) packed_linear_block(p, *packed, row_begin, row_end, 0, tokens);
  else linear_block(p, row_begin, row_end, 0, tokens);
}

// Calls fn(expert, row_begin, row_end) once per maximal run of adjacent units [unit_begin, unit_end)
// that belong to one expert and cover contiguous rows.
template <typename Fn>
void for_each_run(const std::vector<MoeScratch::Unit>& units, int64_t unit_begin, int64_t unit_end, Fn&& fn) {
  int64_t run = unit_begin;
  while (run < unit_end) {
    int64_t next = run + 1;
    while (next < unit_end && units[next].expert == units[run].expert &&
           units[next].row_begin == units[next - 1].row_end)
      ++next;
    fn(units[run].expert, units[run].row_begin, units[next - 1].row_end);
    run = next;
  }
}

}  // namespace

void moe_experts(ThreadPool& pool, MoeScratch& s, const float* x, int64_t hidden, const Routing& routing,
                 std::span<const ExpertWeights> experts, float* out) {
  int64_t n = routing.num_tokens;
  int64_t top_k = routing.top_k;
  int64_t num_experts = static_cast<int64_t>(experts.size());
  int64_t num_rows = n * top_k;
  MOEX_ASSERT(static_cast<int64_t>(routing.expert_ids.size()) == num_rows &&
                  static_cast<int64_t>(routing.weights.size()) == num_rows,
              "routing holds {} ids / {} weights for {} tokens x top-{}", routing.expert_ids.size(),
              routing.weights.size(), n, top_k);
  if (n == 0) return;

  // Counting sort of (token, slot) rows by expert; tokens stay ascending within an expert.
  s.expert_offset.assign(static_cast<size_t>(num_experts + 1), 0);
  for (int32_t id : routing.expert_ids) {
    if (id < 0) continue;  // skipped entry (offloading runs a layer's experts in waves)
    MOEX_ASSERT(id < num_experts, "routed expert id {} of {}", id, num_experts);
    ++s.expert_offset[id + 1];
  }
  int64_t max_ffn = 0;
  for (int64_t e = 0; e < num_experts; ++e) {
    if (s.expert_offset[e + 1] == 0) continue;
    const ExpertWeights& w = experts[e];
    MOEX_ASSERT(w.valid(), "expert {} is routed to but has no weights", e);
    int64_t ffn = w.gate.dim(0);
    MOEX_ASSERT(w.gate.shape.ndim == 2 && w.gate.dim(1) == hidden && w.up.shape == w.gate.shape &&
                    w.down.shape.ndim == 2 && w.down.dim(0) == hidden && w.down.dim(1) == ffn,
                "expert {}: gate {} up {} down {} with hidden {}", e, w.gate.shape.str(), w.up.shape.str(),
                w.down.shape.str(), hidden);
    max_ffn = std::max(max_ffn, ffn);
  }
  for (int64_t e = 0; e < num_experts; ++e) s.expert_offset[e + 1] += s.expert_offset[e];
  s.expert_fill.assign(s.expert_offset.begin(), s.expert_offset.end() - 1);
  grow(s.slot_row, static_cast<size_t>(num_rows));
  grow(s.row_token, static_cast<size_t>(num_rows));
  for (int64_t token = 0; token < n; ++token)
    for (int64_t slot = 0; slot < top_k; ++slot) {
      int32_t e = routing.expert_ids[token * top_k + slot];
      if (e < 0) {
        s.slot_row[token * top_k + slot] = -1;
        continue;
      }
      int64_t row = s.expert_fill[e]++;
      s.slot_row[token * top_k + slot] = row;
      s.row_token[row] = static_cast<int32_t>(token);
    }

  grow(s.x_sorted, static_cast<size_t>(num_rows * hidden));
  grow(s.gate, static_cast<size_t>(num_rows * max_ffn));
  grow(s.up, static_cast<size_t>(num_rows * max_ffn));
  grow(s.down, static_cast<size_t>(num_rows * hidden));
  const int64_t active_rows = s.expert_offset[num_experts];
  for (int64_t row = 0; row < active_rows; ++row)
    std::copy_n(x + s.row_token[row] * hidden, hidden, s.x_sorted.data() + row * hidden);

  auto build_units = [&](bool down_pass) {
    s.units.clear();
    for (int64_t e = 0; e < num_experts; ++e) {
      int64_t count = s.expert_offset[e + 1] - s.expert_offset[e];
      if (count == 0) continue;
      int64_t rows = down_pass ? hidden : experts[e].gate.dim(0);
      int64_t block = linear_row_block(count);
      for (int64_t begin = 0; begin < rows; begin += block)
        s.units.push_back({static_cast<int32_t>(e), begin, std::min(rows, begin + block)});
    }
  };

  // Pass 1: gate and up rows of each unit, then silu(gate) * up on the same rows while still in cache.
  // Adjacent units of one expert in a chunk run as one row range: two long sequential weight streams.
  build_units(false);
  pool.parallel_for(static_cast<int64_t>(s.units.size()), 1, [&](int64_t unit_begin, int64_t unit_end) {
    for_each_run(s.units, unit_begin, unit_end, [&](int32_t expert, int64_t row_begin, int64_t row_end) {
      int64_t first = s.expert_offset[expert];
      int64_t count = s.expert_offset[expert + 1] - first;
      const ExpertWeights& w = experts[expert];
      const float* xs = s.x_sorted.data() + first * hidden;
      float* gate = s.gate.data() + first * max_ffn;
      float* up = s.up.data() + first * max_ffn;
      expert_block(make_problem(xs, hidden, count, w.gate, gate, max_ffn), w.packed ? &w.packed->gate : nullptr,
                   row_begin, row_end, count);
      expert_block(make_problem(xs, hidden, count, w.up, up, max_ffn), w.packed ? &w.packed->up : nullptr, row_begin,
                   row_end, count);
      for (int64_t row = 0; row < count; ++row) {
        int64_t offset = row * max_ffn + row_begin;
        silu_mul_span(gate + offset, up + offset, gate + offset, row_end - row_begin);
      }
    });
  });

  // Pass 2: down projection of each expert's rows.
  build_units(true);
  pool.parallel_for(static_cast<int64_t>(s.units.size()), 1, [&](int64_t unit_begin, int64_t unit_end) {
    for_each_run(s.units, unit_begin, unit_end, [&](int32_t expert, int64_t row_begin, int64_t row_end) {
      int64_t first = s.expert_offset[expert];
      int64_t count = s.expert_offset[expert + 1] - first;
      const ExpertWeights& w = experts[expert];
      expert_block(make_problem(s.gate.data() + first * max_ffn, max_ffn, count, w.down, s.down.data() + first * hidden,
                                hidden),
                   w.packed ? &w.packed->down : nullptr, row_begin, row_end, count);
    });
  });

  // Weighted sum per token, adding experts in ascending id order like transformers' index_add_ loop.
  int64_t min_tokens = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, hidden));
  MOEX_ASSERT(top_k <= 64, "top_k {} > 64", top_k);
  pool.parallel_for(n, min_tokens, [&](int64_t token_begin, int64_t token_end) {
    int64_t order[64];
    for (int64_t token = token_begin; token < token_end; ++token) {
      const int32_t* ids = routing.expert_ids.data() + token * top_k;
      for (int64_t slot = 0; slot < top_k; ++slot) order[slot] = slot;
      std::sort(order, order + top_k, [&](int64_t a, int64_t b) { return ids[a] < ids[b] || (ids[a] == ids[b] && a < b); });
      float* dst = out + token * hidden;
      std::fill(dst, dst + hidden, 0.0f);
      for (int64_t idx = 0; idx < top_k; ++idx) {
        int64_t slot = order[idx];
        if (s.slot_row[token * top_k + slot] < 0) continue;
        float weight = routing.weights[token * top_k + slot];
        const float* src = s.down.data() + s.slot_row[token * top_k + slot] * hidden;
        for (int64_t d = 0; d < hidden; ++d) dst[d] += src[d] * weight;
      }
    }
  });
}

}  // namespace moex::cpu

namespace moex::cpu {

void expert_gate_up_rows(ThreadPool& pool, const float* x_gate, const float* x_up, const ExpertWeights& w,
                         int64_t rows, float* gate_out, float* up_out) {
  const int64_t hidden = w.gate.dim(1), block = linear_row_block(1);
  pool.parallel_for((rows + block - 1) / block, 1, [&](int64_t first, int64_t last) {
    const int64_t row_begin = first * block, row_end = std::min(rows, last * block);
    expert_block(make_problem(x_gate, hidden, 1, w.gate, gate_out, rows), w.packed ? &w.packed->gate : nullptr,
                 row_begin, row_end, 1);
    expert_block(make_problem(x_up, hidden, 1, w.up, up_out, rows), w.packed ? &w.packed->up : nullptr, row_begin,
                 row_end, 1);
    silu_mul_span(gate_out + row_begin, up_out + row_begin, gate_out + row_begin, row_end - row_begin);
  });
}

}  // namespace moex::cpu
