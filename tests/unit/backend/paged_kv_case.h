// A paged-KV test scenario shared by the CPU and CUDA op tests: several sequences with cached positions in
// shuffled pages, a step whose rows append to them (a prefill chunk of one sequence, single decode rows of
// others, in scrambled sequence order), every unused pool slot poisoned with NaN, and double-precision
// references for kv_write (the whole pool afterwards) and for causal GQA attention.
#pragma once

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "moex/backend/backend.h"
#include "unit/backend/backend_test_util.h"

namespace moex::test {

struct PagedCase {
  int64_t heads, kv_heads, head_dim, page_size;
  std::vector<int64_t> cached;  // positions already in the cache, per sequence
  std::vector<int64_t> rows;    // rows of the step, per sequence (0: the sequence sits this step out)
  std::string str() const {
    return fmt::format("paged_attention(heads={},kv_heads={},head_dim={},page_size={},cached=[{}],rows=[{}])", heads,
                       kv_heads, head_dim, page_size, fmt::join(cached, ","), fmt::join(rows, ","));
  }
};

struct PagedData {
  int64_t n = 0, num_pages = 0, stride = 0;
  std::vector<int32_t> row_seq, row_pos, tables;
  std::vector<float> k_pool, v_pool;              // before the step: cached positions set, the rest NaN
  std::vector<float> k_pool_after, v_pool_after;  // after kv_write
  std::vector<float> k_new, v_new;                // [n, kv_heads, head_dim]
  std::vector<float> q;                           // [n, heads, head_dim]
  std::vector<double> ref, tol;                   // attention output [n, heads, head_dim]
  int64_t page_size = 0;
  KvStep step() const { return KvStep{row_seq, row_pos, tables, stride, page_size}; }
  Shape pool_shape(const PagedCase& c) const { return Shape{num_pages, c.page_size, c.kv_heads, c.head_dim}; }
};

inline PagedData make_paged(const PagedCase& c, uint64_t seed) {
  std::mt19937_64 rng(seed);
  PagedData d;
  d.page_size = c.page_size;
  const int64_t num_seqs = static_cast<int64_t>(c.cached.size());
  const int64_t row_elems = c.kv_heads * c.head_dim;
  std::vector<int64_t> total(num_seqs), pages(num_seqs);
  for (int64_t s = 0; s < num_seqs; ++s) {
    total[s] = c.cached[s] + c.rows[s];
    pages[s] = (total[s] + c.page_size - 1) / c.page_size;
    d.stride = std::max(d.stride, pages[s]);
  }
  // Shuffled page ids plus spare pages that nobody owns (they must stay NaN and untouched).
  d.num_pages = std::accumulate(pages.begin(), pages.end(), int64_t{0}) + 3;
  std::vector<int32_t> ids(static_cast<size_t>(d.num_pages));
  std::iota(ids.begin(), ids.end(), 0);
  std::shuffle(ids.begin(), ids.end(), rng);
  d.tables.assign(static_cast<size_t>(num_seqs * d.stride), 0);
  size_t next = 0;
  for (int64_t s = 0; s < num_seqs; ++s)
    for (int64_t b = 0; b < pages[s]; ++b) d.tables[s * d.stride + b] = ids[next++];
  // Every sequence's keys and values, position by position; the step writes the last rows[s] of them.
  std::vector<std::vector<float>> keys(num_seqs), values(num_seqs);
  for (int64_t s = 0; s < num_seqs; ++s) {
    keys[s].resize(static_cast<size_t>(total[s] * row_elems));
    values[s].resize(keys[s].size());
    for (auto& x : keys[s]) x = uniform_sym(rng, 0.8f);
    for (auto& x : values[s]) x = uniform_sym(rng, 1.0f);
  }
  const size_t pool = static_cast<size_t>(d.num_pages * c.page_size * row_elems);
  d.k_pool.assign(pool, std::nanf(""));
  d.v_pool = d.k_pool;
  auto slot = [&](int64_t s, int64_t pos) {
    return static_cast<size_t>((d.tables[s * d.stride + pos / c.page_size] * c.page_size + pos % c.page_size) *
                               row_elems);
  };
  for (int64_t s = 0; s < num_seqs; ++s)
    for (int64_t pos = 0; pos < c.cached[s]; ++pos)
      for (int64_t e = 0; e < row_elems; ++e) {
        d.k_pool[slot(s, pos) + e] = keys[s][pos * row_elems + e];
        d.v_pool[slot(s, pos) + e] = values[s][pos * row_elems + e];
      }
  d.k_pool_after = d.k_pool;
  d.v_pool_after = d.v_pool;
  // Rows: sequences in reverse order, each one's rows consecutive (the decoder's prefill and decode layouts).
  for (int64_t s = num_seqs - 1; s >= 0; --s)
    for (int64_t r = 0; r < c.rows[s]; ++r) {
      const int64_t pos = c.cached[s] + r;
      d.row_seq.push_back(static_cast<int32_t>(s));
      d.row_pos.push_back(static_cast<int32_t>(pos));
      for (int64_t e = 0; e < row_elems; ++e) {
        d.k_new.push_back(keys[s][pos * row_elems + e]);
        d.v_new.push_back(values[s][pos * row_elems + e]);
        d.k_pool_after[slot(s, pos) + e] = keys[s][pos * row_elems + e];
        d.v_pool_after[slot(s, pos) + e] = values[s][pos * row_elems + e];
      }
    }
  d.n = static_cast<int64_t>(d.row_seq.size());
  d.q.resize(static_cast<size_t>(d.n * c.heads * c.head_dim));
  for (auto& x : d.q) x = uniform_sym(rng, 0.8f);
  const double scale = 1.0 / std::sqrt(static_cast<double>(c.head_dim));
  const int64_t group = c.heads / c.kv_heads;
  d.ref.resize(d.q.size());
  d.tol.resize(d.q.size());
  for (int64_t row = 0; row < d.n; ++row) {
    const int64_t s = d.row_seq[row], visible = d.row_pos[row] + 1;
    for (int64_t h = 0; h < c.heads; ++h) {
      const int64_t kvh = h / group;
      std::vector<double> p(static_cast<size_t>(visible));
      double max = -INFINITY, sum = 0.0, vmax = 0.0;
      for (int64_t j = 0; j < visible; ++j) {
        double dot = 0.0;
        for (int64_t dd = 0; dd < c.head_dim; ++dd)
          dot += static_cast<double>(d.q[(row * c.heads + h) * c.head_dim + dd]) *
                 keys[s][(j * c.kv_heads + kvh) * c.head_dim + dd];
        p[j] = dot * scale;
        max = std::max(max, p[j]);
      }
      for (auto& x : p) sum += (x = std::exp(x - max));
      for (int64_t dd = 0; dd < c.head_dim; ++dd) {
        double acc = 0.0;
        for (int64_t j = 0; j < visible; ++j) {
          const double vv = values[s][(j * c.kv_heads + kvh) * c.head_dim + dd];
          acc += p[j] / sum * vv;
          vmax = std::max(vmax, std::fabs(vv));
        }
        d.ref[(row * c.heads + h) * c.head_dim + dd] = acc;
        d.tol[(row * c.heads + h) * c.head_dim + dd] = 2e-5 * vmax;
      }
    }
  }
  return d;
}

// Model A at batch 32: contexts spread over 1..683 keys.
inline PagedCase model_a_batch32() {
  PagedCase c{16, 8, 128, 32, {}, {}};
  for (int64_t s = 0; s < 32; ++s) {
    c.cached.push_back(s * 22);
    c.rows.push_back(1);
  }
  return c;
}

// Cases for both backends. Real shapes: 16/8 x 128 Model A (Mixtral-shaped), 32/4 x 128 Qwen3-30B-A3B,
// 32/8 x 128 Mixtral-8x7B; odd head_dims and page sizes 1, 3, 5, 7 for page-boundary tails.
inline std::vector<PagedCase> paged_cases() {
  return {
      PagedCase{1, 1, 8, 4, {0}, {1}},                          // a first token
      PagedCase{4, 2, 16, 3, {0}, {7}},                         // prefill across pages of 3
      PagedCase{6, 3, 31, 5, {11}, {9}},                        // chunked prefill starting mid-page
      PagedCase{8, 2, 64, 1, {4, 9, 0}, {1, 1, 1}},             // page size 1
      PagedCase{16, 8, 128, 16, {130, 3, 47, 64}, {1, 1, 1, 1}},  // batched decode, Model A heads
      PagedCase{32, 4, 128, 32, {2047, 31, 500}, {1, 1, 1}},    // Model B decode, one long sequence
      PagedCase{32, 8, 128, 7, {20, 0, 33}, {1, 13, 1}},        // decode rows around a prefill chunk
      PagedCase{2, 2, 16, 32, {5, 0, 9}, {0, 129, 1}},          // a sequence sitting the step out
      PagedCase{4, 1, 3, 3, {2, 6}, {4, 1}},                    // head_dim 3
      PagedCase{2, 1, 256, 32, {0}, {7}},                       // head_dim 256, the CUDA kernel's largest
      PagedCase{8, 8, 40, 16, {1000, 10}, {1, 1}},              // 1000 keys: CUDA splits them across blocks
      PagedCase{16, 8, 128, 32, {0}, {129}},                    // Model A prefill chunk
      PagedCase{32, 4, 128, 16, {5, 300, 17, 64, 0, 2047, 9, 33}, {1, 1, 1, 1, 1, 1, 1, 1}},  // Model B batch 8
      model_a_batch32(),
      PagedCase{16, 8, 128, 16, {17}, {1}},                     // Model A batch-1 decode (one row)
      PagedCase{4, 4, 64, 16, {100, 7, 300}, {1, 1, 1}},        // no GQA (one head per kv head), decode
      PagedCase{32, 4, 128, 16, {4000}, {1}},                   // Model B batch 1, long: 32 splits merged

  };
}

}  // namespace moex::test
