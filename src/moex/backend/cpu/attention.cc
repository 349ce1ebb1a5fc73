// Causal GQA attention over a paged fp32 KV cache. One task is a block of up to 4 consecutive queries of one
// sequence and head; tasks of the same head are adjacent so a thread's consecutive tasks reread the same K/V
// rows from cache. Softmax is online over blocks of at most kKeyBlock keys that never cross a page, so each
// block's rows are contiguous; the running max keeps every exp argument <= 0.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "moex/backend/cpu/ops.h"
#include "moex/backend/cpu/simd.h"
#include "moex/core/error.h"

namespace moex::cpu {
namespace {

constexpr int64_t kKeyBlock = 64;
constexpr int64_t kMaxHeadDim = 1024;

// One kv head's keys and values of one sequence, through its block table.
struct PagedKeys {
  const float* k;  // page pool + kv_head * head_dim
  const float* v;
  const int32_t* table;
  int64_t page_size;
  int64_t stride;  // floats from one position to the next inside a page (kv_heads * head_dim)
  int64_t offset(int64_t key) const { return (table[key / page_size] * page_size + key % page_size) * stride; }
  // Keys from key on that share its page, capped at limit.
  int64_t run(int64_t key, int64_t limit) const { return std::min(limit, page_size - key % page_size); }
};

inline float dot(const float* a, const float* b, int64_t count) {
  int64_t idx = 0;
  float sum = 0.0f;
#ifdef MOEX_CPU_AVX2
  __m256 acc0 = _mm256_setzero_ps();
  __m256 acc1 = _mm256_setzero_ps();
  for (; idx + 16 <= count; idx += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + idx), _mm256_loadu_ps(b + idx), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + idx + 8), _mm256_loadu_ps(b + idx + 8), acc1);
  }
  for (; idx + 8 <= count; idx += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + idx), _mm256_loadu_ps(b + idx), acc0);
  sum = hsum(_mm256_add_ps(acc0, acc1));
#endif
  for (; idx < count; ++idx) sum += a[idx] * b[idx];
  return sum;
}

// acc[d] = acc[d] * scale + sum_j p[j] * v[j * stride + d]
inline void scale_accumulate(float* acc, float scale, const float* p, const float* v, int64_t stride, int64_t num,
                             int64_t head_dim) {
  int64_t d = 0;
#ifdef MOEX_CPU_AVX2
  __m256 s = _mm256_set1_ps(scale);
  for (; d + 8 <= head_dim; d += 8) {
    __m256 a = _mm256_mul_ps(_mm256_loadu_ps(acc + d), s);
    for (int64_t j = 0; j < num; ++j) a = _mm256_fmadd_ps(_mm256_set1_ps(p[j]), _mm256_loadu_ps(v + j * stride + d), a);
    _mm256_storeu_ps(acc + d, a);
  }
#endif
  for (; d < head_dim; ++d) {
    float a = acc[d] * scale;
    for (int64_t j = 0; j < num; ++j) a += p[j] * v[j * stride + d];
    acc[d] = a;
  }
}

// p[j] = exp(s[j] - max), returns the sum.
inline float exp_shifted(float* s, int64_t num, float max) {
  int64_t j = 0;
  float sum = 0.0f;
#ifdef MOEX_CPU_AVX2
  __m256 m = _mm256_set1_ps(max);
  __m256 acc = _mm256_setzero_ps();
  for (; j + 8 <= num; j += 8) {
    __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), m));
    _mm256_storeu_ps(s + j, e);
    acc = _mm256_add_ps(acc, e);
  }
  sum = hsum(acc);
#endif
  for (; j < num; ++j) {
    s[j] = std::exp(s[j] - max);
    sum += s[j];
  }
  return sum;
}

void attend_one(const float* q, const PagedKeys& keys, int64_t len, int64_t head_dim, float scale, float* out) {
  alignas(32) float acc[kMaxHeadDim];
  alignas(32) float scores[kKeyBlock];
  std::fill(acc, acc + head_dim, 0.0f);
  const int64_t stride = keys.stride;
  float running_max = -std::numeric_limits<float>::infinity();
  float running_sum = 0.0f;
  int64_t num = 0;
  for (int64_t key = 0; key < len; key += num) {
    num = keys.run(key, std::min(kKeyBlock, len - key));
    const float* k = keys.k + keys.offset(key);
    const float* v = keys.v + keys.offset(key);
    float block_max = -std::numeric_limits<float>::infinity();
    int64_t j = 0;
#ifdef MOEX_CPU_AVX2
    // Four keys per pass share the q loads and one hadd-tree reduction.
    if (head_dim % 8 == 0) {
      for (; j + 4 <= num; j += 4) {
        const float* k0 = k + j * stride;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t d = 0; d < head_dim; d += 8) {
          __m256 qv = _mm256_loadu_ps(q + d);
          a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + d), a0);
          a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + stride + d), a1);
          a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + 2 * stride + d), a2);
          a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + 3 * stride + d), a3);
        }
        _mm_storeu_ps(scores + j, _mm_mul_ps(hsum4(a0, a1, a2, a3), _mm_set1_ps(scale)));
      }
    }
#endif
    for (; j < num; ++j) scores[j] = dot(q, k + j * stride, head_dim) * scale;
    for (j = 0; j < num; ++j) block_max = std::max(block_max, scores[j]);
    float new_max = std::max(running_max, block_max);
    float correction = running_max == -std::numeric_limits<float>::infinity() ? 0.0f : std::exp(running_max - new_max);
    float block_sum = exp_shifted(scores, num, new_max);
    running_sum = running_sum * correction + block_sum;
    scale_accumulate(acc, correction, scores, v, stride, num, head_dim);
    running_max = new_max;
  }
  float inv = 1.0f / running_sum;
  for (int64_t d = 0; d < head_dim; ++d) out[d] = acc[d] * inv;
}

#ifdef MOEX_CPU_AVX2
// kQ consecutive queries of one head, query i seeing keys [0, len0 + i): every K and V row load is
// shared by the kQ queries (prefill), and one hadd tree yields the kQ scores of a key. Keys past a
// query's position are masked to -inf, which exp maps to 0. Needs head_dim % 8 == 0.
template <int kQ>
void attend_queries(const float* q, int64_t q_stride, const PagedKeys& keys, int64_t len0, int64_t head_dim,
                    float scale, float* out, int64_t out_stride) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  alignas(32) float acc[kQ][kMaxHeadDim];
  alignas(32) float scores[kQ][kKeyBlock];
  float running_max[kQ], running_sum[kQ], correction[kQ];
  for (int qi = 0; qi < kQ; ++qi) {
    std::fill(acc[qi], acc[qi] + head_dim, 0.0f);
    running_max[qi] = kNegInf;
    running_sum[qi] = 0.0f;
  }
  const __m256 zero = _mm256_setzero_ps();
  const int64_t stride = keys.stride;
  int64_t len_last = len0 + kQ - 1;
  int64_t num = 0;
  for (int64_t key = 0; key < len_last; key += num) {
    num = keys.run(key, std::min(kKeyBlock, len_last - key));
    const float* k = keys.k + keys.offset(key);
    const float* v = keys.v + keys.offset(key);
    for (int64_t j = 0; j < num; ++j) {
      const float* krow = k + j * stride;
      __m256 a[kQ];
      for (int qi = 0; qi < kQ; ++qi) a[qi] = zero;
      for (int64_t d = 0; d < head_dim; d += 8) {
        __m256 kv = _mm256_loadu_ps(krow + d);
#pragma GCC unroll 4
        for (int qi = 0; qi < kQ; ++qi) a[qi] = _mm256_fmadd_ps(_mm256_loadu_ps(q + qi * q_stride + d), kv, a[qi]);
      }
      alignas(16) float s[4];
      _mm_store_ps(s, _mm_mul_ps(hsum4(a[0], kQ > 1 ? a[kQ > 1 ? 1 : 0] : zero, kQ > 2 ? a[kQ > 2 ? 2 : 0] : zero,
                                       kQ > 3 ? a[kQ > 3 ? 3 : 0] : zero),
                                 _mm_set1_ps(scale)));
      for (int qi = 0; qi < kQ; ++qi) scores[qi][j] = key + j < len0 + qi ? s[qi] : kNegInf;
    }
    for (int qi = 0; qi < kQ; ++qi) {
      float block_max = kNegInf;
      for (int64_t j = 0; j < num; ++j) block_max = std::max(block_max, scores[qi][j]);
      float new_max = std::max(running_max[qi], block_max);
      correction[qi] = running_max[qi] == kNegInf ? 0.0f : std::exp(running_max[qi] - new_max);
      float block_sum = exp_shifted(scores[qi], num, new_max);
      running_sum[qi] = running_sum[qi] * correction[qi] + block_sum;
      running_max[qi] = new_max;
    }
    for (int64_t d = 0; d < head_dim; d += 8) {
      __m256 a[kQ];
#pragma GCC unroll 4
      for (int qi = 0; qi < kQ; ++qi) a[qi] = _mm256_mul_ps(_mm256_load_ps(acc[qi] + d), _mm256_set1_ps(correction[qi]));
      for (int64_t j = 0; j < num; ++j) {
        __m256 vv = _mm256_loadu_ps(v + j * stride + d);
#pragma GCC unroll 4
        for (int qi = 0; qi < kQ; ++qi) a[qi] = _mm256_fmadd_ps(_mm256_set1_ps(scores[qi][j]), vv, a[qi]);
      }
#pragma GCC unroll 4
      for (int qi = 0; qi < kQ; ++qi) _mm256_store_ps(acc[qi] + d, a[qi]);
    }
  }
  for (int qi = 0; qi < kQ; ++qi) {
    float inv = 1.0f / running_sum[qi];
    for (int64_t d = 0; d < head_dim; ++d) out[qi * out_stride + d] = acc[qi][d] * inv;
  }
}
#endif

}  // namespace

void kv_write(const KvStep& step, const float* k, const float* v, int64_t row_elems, float* k_pages, float* v_pages) {
  for (size_t row = 0; row < step.row_pos.size(); ++row) {
    const int64_t pos = step.row_pos[row];
    const int64_t page = step.block_tables[step.row_seq[row] * step.table_stride + pos / step.page_size];
    const int64_t dst = (page * step.page_size + pos % step.page_size) * row_elems;
    std::memcpy(k_pages + dst, k + row * row_elems, sizeof(float) * row_elems);
    std::memcpy(v_pages + dst, v + row * row_elems, sizeof(float) * row_elems);
  }
}

void attention(ThreadPool& pool, const KvStep& step, const float* q, const float* k_pages, const float* v_pages,
               int64_t heads, int64_t kv_heads, int64_t head_dim, float scale, float* out) {
  MOEX_ASSERT(head_dim <= kMaxHeadDim, "head_dim {} > {}", head_dim, kMaxHeadDim);
  MOEX_ASSERT(kv_heads > 0 && heads % kv_heads == 0, "heads {} not a multiple of kv_heads {}", heads, kv_heads);
  const int64_t n = static_cast<int64_t>(step.row_pos.size());
  const int64_t group = heads / kv_heads;
  const int64_t stride = kv_heads * head_dim;
  // Segments: runs of rows of one sequence at consecutive positions (a prefill chunk; one row per sequence
  // in batched decode). A task is up to kQueryBlock queries of one segment and head (they share K/V loads).
  constexpr int64_t kQueryBlock = 4;
  struct Segment {
    int64_t row, num_rows, blocks, first_task;
  };
  std::vector<Segment> segments;
  int64_t num_tasks = 0, total_keys = 0;
  for (int64_t row = 0; row < n;) {
    int64_t end = row + 1;
    while (end < n && step.row_seq[end] == step.row_seq[row] && step.row_pos[end] == step.row_pos[end - 1] + 1) ++end;
    const int64_t blocks = (end - row + kQueryBlock - 1) / kQueryBlock;
    segments.push_back(Segment{row, end - row, blocks, num_tasks});
    num_tasks += heads * blocks;
    total_keys += (step.row_pos[end - 1] + 1) * std::min(end - row, kQueryBlock);
    row = end;
  }
  // Work per task grows with the context: short contexts need bigger chunks.
  const int64_t avg_keys = std::max<int64_t>(1, total_keys / static_cast<int64_t>(segments.size()));
  const int64_t min_tasks = std::max<int64_t>(1, 8192 / std::max<int64_t>(1, avg_keys * head_dim));
  const int64_t q_stride = heads * head_dim;
  pool.parallel_for(num_tasks, min_tasks, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const auto seg_it = std::upper_bound(segments.begin(), segments.end(), task,
                                           [](int64_t t, const Segment& s) { return t < s.first_task; }) - 1;
      const Segment& seg = *seg_it;
      const int64_t local = task - seg.first_task;
      const int64_t head = local / seg.blocks;
      const int64_t first = local % seg.blocks * kQueryBlock;
      const int64_t num_queries = std::min(kQueryBlock, seg.num_rows - first);
      const int64_t row = seg.row + first;
      const int64_t kv_head = head / group;
      const int64_t offset = (row * heads + head) * head_dim;
      const PagedKeys keys{k_pages + kv_head * head_dim, v_pages + kv_head * head_dim,
                           step.block_tables.data() + step.row_seq[row] * step.table_stride, step.page_size, stride};
      const int64_t len0 = step.row_pos[row] + 1;
#ifdef MOEX_CPU_AVX2
      if (head_dim % 8 == 0 && num_queries > 1) {
        switch (num_queries) {
          case 2: attend_queries<2>(q + offset, q_stride, keys, len0, head_dim, scale, out + offset, q_stride); continue;
          case 3: attend_queries<3>(q + offset, q_stride, keys, len0, head_dim, scale, out + offset, q_stride); continue;
          case 4: attend_queries<4>(q + offset, q_stride, keys, len0, head_dim, scale, out + offset, q_stride); continue;
          default: break;
        }
      }
#endif
      for (int64_t i = 0; i < num_queries; ++i)
        attend_one(q + offset + i * q_stride, keys, len0 + i, head_dim, scale, out + offset + i * q_stride);
    }
  });
}

}  // namespace moex::cpu
