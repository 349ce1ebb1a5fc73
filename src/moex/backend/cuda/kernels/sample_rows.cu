// The host sampler's pick (runtime/sampler.h) on the device: one thread block cluster per row, each block holding
// its slice of the row in shared memory, so the row is read from global memory once and every later pass runs on
// chip. Each block counts (and, for top-p, weighs) its slice's tokens in 256 buckets of the distance below the best
// score; the cluster's blocks merge the buckets through distributed shared memory and every block scans them to the
// bucket of the cut. The few tokens around the cut (at most 2048; a too-full bucket is split 256 ways once more)
// are gathered from every block and sorted, which gives the exact top-k and top-p cuts (select_by_gather). Rows too
// flat for that (thousands of tokens within 1/2048 of one another) select by radix levels over the bytes of the
// scores' order-preserving keys instead (radix_select). The pick then walks the kept tokens in index order as the
// host does: per-thread runs of contiguous tokens, scanned over the block and the cluster.
//
// Same bits as the host: scores are logit * inv_t and weights sample_weight(score - max) from the same fused
// multiply-adds (no contraction: __fmul_rn and friends). Masses that decide a cut are summed as integers (weights
// in units of 2^-44), so that they do not depend on the order atomics land in: a seed reproduces a run. The draw's
// own sums are fp64, as the host's.
#include <cooperative_groups.h>

#include <climits>
#include <mutex>

#include "moex/backend/cuda/kernels/common.cuh"
#include "moex/backend/cuda/kernels/launch.cuh"
#include "moex/backend/cuda/kernels/pick_sink.cuh"

namespace moex::cuda {
namespace {

namespace cg = cooperative_groups;

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxCluster = 8;
constexpr int kMaxSlice = static_cast<int>(kSampleMaxCols / kMaxCluster);
constexpr int kColsPerBlock = 4096;  // rows up to this many columns take one block; longer ones up to 8
constexpr uint32_t kNoDigit = 0xffffffffu;
constexpr float kMassScale = 17592186044416.0f;  // 2^44: a vocabulary of up to 2^19 weights of at most 1 fits

struct Params {
  const float* logits;
  int64_t cols;
  const DeviceDraw* draws;
  DeviceDraw single;
  int32_t* ids;
  PickSink sink;
  int slice;  // columns per block
};

// What other blocks of the cluster read from this block's shared memory, one field per use (no reuse hazards).
struct Shared {
  float max_logit;
  int first_max;
  uint32_t ties;
  double mass;
};

// The order of scores as unsigned keys (larger score, larger key); -0 is made +0 before, so that equal scores have
// equal keys. NaN never gets here.
__device__ __forceinline__ uint32_t score_key(float score) {
  const uint32_t bits = __float_as_uint(score);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}
__device__ __forceinline__ float key_score(uint32_t key) {
  return __uint_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

// runtime/sampler.cc's exp_weight, operation for operation.
__device__ __forceinline__ float sample_weight(float x) {
  x = x > -87.0f ? x : -87.0f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23
  const float n = __fsub_rn(__fmaf_rn(x, 1.44269504088896341f, kRound), kRound);
  float r = __fmaf_rn(n, -0.693359375f, x);
  r = __fmaf_rn(n, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = __fmaf_rn(p, r, 1.3981999507e-3f);
  p = __fmaf_rn(p, r, 8.3334519073e-3f);
  p = __fmaf_rn(p, r, 4.1665795894e-2f);
  p = __fmaf_rn(p, r, 1.6666665459e-1f);
  p = __fmaf_rn(p, r, 5.0000001201e-1f);
  p = __fadd_rn(__fmaf_rn(__fmul_rn(p, r), r, r), 1.0f);
  return __fmul_rn(p, __int_as_float((static_cast<int>(n) + 127) << 23));
}

__device__ __forceinline__ unsigned long long fixed_mass(float weight) { return __float2ull_rn(weight * kMassScale); }

__device__ __forceinline__ unsigned long long warp_sum_u64(unsigned long long v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ bool is_valid(float score) { return score > -INFINITY; }  // not NaN, not -inf

// ---- block reductions and scans (every thread gets the result) ----------------------------------------------

__device__ __forceinline__ float block_max(float v, float* s_f) {
  v = warp_max(v);
  __syncthreads();
  if ((threadIdx.x & 31) == 0) s_f[threadIdx.x >> 5] = v;
  __syncthreads();
  v = (threadIdx.x & 31) < kWarps ? s_f[threadIdx.x & 31] : -INFINITY;
  return warp_max(v);
}

__device__ __forceinline__ int block_min(int v, int* s_i) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = min(v, __shfl_xor_sync(0xffffffffu, v, offset));
  __syncthreads();
  if ((threadIdx.x & 31) == 0) s_i[threadIdx.x >> 5] = v;
  __syncthreads();
  v = (threadIdx.x & 31) < kWarps ? s_i[threadIdx.x & 31] : INT_MAX;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = min(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// Inclusive scan over the block in thread order; *total gets the block's sum.
template <typename T>
__device__ __forceinline__ T block_inclusive_scan(T v, T* s_warp, T* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    const T other = __shfl_up_sync(0xffffffffu, v, offset);
    if (lane >= offset) v += other;
  }
  __syncthreads();
  if (lane == 31) s_warp[warp] = v;
  __syncthreads();
  T base = 0, sum = 0;
  for (int w = 0; w < kWarps; ++w) {  // 16 values, the same order in every thread
    if (w == warp) base = sum;
    sum += s_warp[w];
  }
  *total = sum;
  return base + v;
}

// ---- radix selection --------------------------------------------------------------------------------------

// A cut found by selection: the threshold key, and over the tokens considered: how many (and how much weight)
// lie strictly above it, how many have it, and (level 0) how many and how much in all.
struct Cut {
  uint32_t key;
  uint32_t above;
  unsigned long long above_mass;
  uint32_t ties;
  uint32_t total;
  unsigned long long total_mass;
};

// A block's histograms (two pairs: a level clears one while another block may still merge the other), the
// cluster's merged buckets, and the scan's results.
struct SelectShared {
  uint32_t count[2][256];
  unsigned long long mass[2][256];
  uint32_t merged_count[256];
  unsigned long long merged_mass[256];
  uint32_t digit;
  uint32_t add_count;
  unsigned long long add_mass;
  uint32_t total;
  unsigned long long total_mass;
};

// What a selection must reach, fixed once level 0's totals are known: the k-th token, or a prefix weight.
struct Need {
  bool by_mass;
  uint32_t count;  // by count: the k-th token in order
  double mass;     // by mass: the prefix's weight must reach this
};

// The first level's digit: how far below the best score, in steps of 1/8 (255: 31.875 or more), counted from the
// top so that a larger digit is a better score. Monotone in the score, and spread over many buckets for real
// logits: the score keys' own top byte (sign and exponent) puts most of a row into two or three buckets.
__device__ __forceinline__ uint32_t distance_digit(float score, float max_score) {
  const float steps = __fmul_rn(__fsub_rn(max_score, score), 8.0f);
  return 255u - static_cast<uint32_t>(steps < 255.0f ? steps : 255.0f);
}

// Within distance_digit's bucket `coarse` (below 255: not the clamped bottom one), the distance in steps of 1/2048:
// the same difference scaled by a power of two more, so the 256 fine digits split the coarse step exactly.
__device__ __forceinline__ uint32_t fine_digit(float score, float max_score, uint32_t coarse) {
  const float steps = __fmul_rn(__fsub_rn(max_score, score), 2048.0f);
  return 255u - (static_cast<uint32_t>(steps) - (255u - coarse) * 256u);
}

// histogram_level's level after 0 that splits level 0's bucket by fine_digit (select_by_gather), not by key bytes.
constexpr int kFineLevel = 5;

// One level's histogram of the cluster's valid scores at or above the key `floor`, merged into sh.merged_* of every
// block. Level 0 buckets by distance_digit; levels 1-4 by byte 4 - level of the score key, among the tokens of
// level 0's bucket `first` whose key agrees with `prefix` above that byte; kFineLevel by fine_digit among the
// tokens of level 0's bucket `first`. Flips
// `parity`: the next level's buffers are the other pair, as another block may still be merging these.
__device__ void histogram_level(const float* s_score, int n, float max_score, uint32_t floor, int level,
                                uint32_t first, uint32_t prefix, bool with_mass, SelectShared& sh, int& parity) {
  cg::cluster_group cluster = cg::this_cluster();
  const unsigned blocks = cluster.num_blocks();
  const int lane = threadIdx.x & 31, shift = 32 - 8 * level;
  uint32_t* count = sh.count[parity];
  unsigned long long* mass = sh.mass[parity];
  parity ^= 1;
  for (int d = threadIdx.x; d < 256; d += kThreads) {
    count[d] = 0;
    mass[d] = 0;
  }
  __syncthreads();
  for (int base = 0; base < n; base += kThreads) {
    const int i = base + threadIdx.x;
    uint32_t digit = kNoDigit;
    unsigned long long q = 0;
    if (i < n) {
      const float score = s_score[i];
      if (is_valid(score)) {
        const uint32_t key = score_key(score);
        if (key >= floor) {
          const uint32_t d0 = distance_digit(score, max_score);
          if (level == 0) digit = d0;
          else if (level == kFineLevel) digit = d0 == first ? fine_digit(score, max_score, first) : kNoDigit;
          else if (d0 == first && (level == 1 || (key >> (shift + 8)) == (prefix >> (shift + 8))))
            digit = (key >> shift) & 255u;
          if (digit != kNoDigit && with_mass) q = fixed_mass(sample_weight(__fsub_rn(score, max_score)));
        }
      }
    }
    if (!__any_sync(0xffffffffu, digit != kNoDigit)) continue;
    // A warp whose lanes all share one digit adds once (a flat row, or a narrow bucket at a later level); other
    // lanes add their own (spread digits: few conflicts).
    const uint32_t lane0 = __shfl_sync(0xffffffffu, digit, 0);
    if (__all_sync(0xffffffffu, digit == lane0)) {
      const unsigned long long sum = with_mass ? warp_sum_u64(q) : 0ull;
      if (lane == 0) {
        atomicAdd(&count[digit], 32u);
        if (with_mass) atomicAdd(&mass[digit], sum);
      }
    } else if (digit != kNoDigit) {
      atomicAdd(&count[digit], 1u);
      if (with_mass) atomicAdd(&mass[digit], q);
    }
  }
  __syncthreads();
  cluster.sync();  // every block's histogram complete
  for (int d = threadIdx.x; d < 256; d += kThreads) {
    uint32_t c = 0;
    unsigned long long m = 0;
#pragma unroll
    for (int r = 0; r < kMaxCluster; ++r) {  // unrolled: the remote loads go out together
      if (r < static_cast<int>(blocks)) {
        c += cluster.map_shared_rank(count, r)[d];
        if (with_mass) m += cluster.map_shared_rank(mass, r)[d];
      }
    }
    sh.merged_count[d] = c;
    sh.merged_mass[d] = m;
  }
  __syncthreads();
}

// Warp 0 finds the merged histogram's digit where the running count (or weight), from the top digit down and on
// top of cut's `above`, first reaches the need; lane l holds digits 255 - 8l down to 248 - 8l. Every thread then
// gets the digit, and cut's above sums take the digits over it. Ends with a barrier (the merged buckets may be
// rewritten after it).
__device__ uint32_t scan_digit(SelectShared& sh, const Need& need, Cut* cut) {
  const int lane = threadIdx.x & 31;
  if (threadIdx.x < 32) {
    uint32_t c = 0;
    unsigned long long m = 0;
    for (int j = 0; j < 8; ++j) {
      c += sh.merged_count[255 - 8 * lane - j];
      m += sh.merged_mass[255 - 8 * lane - j];
    }
    uint32_t c_incl = c;
    unsigned long long m_incl = m;
#pragma unroll
    for (int offset = 1; offset < 32; offset <<= 1) {
      const uint32_t oc = __shfl_up_sync(0xffffffffu, c_incl, offset);
      const unsigned long long om = __shfl_up_sync(0xffffffffu, m_incl, offset);
      if (lane >= offset) {
        c_incl += oc;
        m_incl += om;
      }
    }
    auto reaches = [&](uint32_t cnt, unsigned long long ms) {
      return need.by_mass ? static_cast<double>(cut->above_mass + ms) >= need.mass : cut->above + cnt >= need.count;
    };
    const unsigned hits = __ballot_sync(0xffffffffu, reaches(c_incl, m_incl));
    // The need is at most what is left, so some lane reaches it; rounding aside, the last lane does.
    const int crossing = hits ? __ffs(hits) - 1 : 31;
    if (lane == crossing) {
      uint32_t run_c = c_incl - c;
      unsigned long long run_m = m_incl - m;
      int digit = 255 - 8 * lane - 7;
      for (int j = 0; j < 8; ++j) {
        const int d = 255 - 8 * lane - j;
        if (reaches(run_c + sh.merged_count[d], run_m + sh.merged_mass[d]) || j == 7) {
          digit = d;
          break;
        }
        run_c += sh.merged_count[d];
        run_m += sh.merged_mass[d];
      }
      sh.digit = static_cast<uint32_t>(digit);
      sh.add_count = run_c;
      sh.add_mass = run_m;
    }
  }
  __syncthreads();
  const uint32_t digit = sh.digit;
  cut->above += sh.add_count;
  cut->above_mass += sh.add_mass;
  cut->ties = sh.merged_count[digit];
  __syncthreads();
  return digit;
}

// sh.total / sh.total_mass: the merged histogram's sums, for every thread after the barrier.
__device__ void merged_totals(SelectShared& sh) {
  if (threadIdx.x < 32) {
    uint32_t c = 0;
    unsigned long long m = 0;
    for (int d = threadIdx.x; d < 256; d += 32) {
      c += sh.merged_count[d];
      m += sh.merged_mass[d];
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      c += __shfl_xor_sync(0xffffffffu, c, offset);
      m += __shfl_xor_sync(0xffffffffu, m, offset);
    }
    if (threadIdx.x == 0) {
      sh.total = c;
      sh.total_mass = m;
    }
  }
  __syncthreads();
}

// Radix selection over the slice's valid scores at or above the key `floor`, in descending score order: the key of
// the token where the running count (or weight) first reaches the need. `need_of` turns level 0's totals into the
// need; it returns false to stop there (no cut needed), leaving only the totals in the result. The fallback for
// rows whose cut lies in a bucket too full to gather (select_by_gather): flat rows, tiny temperatures.
template <typename NeedOf>
__device__ bool radix_select(const float* s_score, int n, float max_score, uint32_t floor, bool with_mass,
                             NeedOf need_of, SelectShared& sh, int& parity, Cut* cut) {
  uint32_t first = 0, prefix = 0;
  Need need{};
  *cut = Cut{};
  for (int level = 0; level < 5; ++level) {
    histogram_level(s_score, n, max_score, floor, level, first, prefix, with_mass, sh, parity);
    if (level == 0) {
      merged_totals(sh);
      cut->total = sh.total;
      cut->total_mass = sh.total_mass;
      if (!need_of(*cut, &need)) return false;
    }
    const uint32_t digit = scan_digit(sh, need, cut);
    if (level == 0) first = digit;
    else prefix |= digit << (32 - 8 * level);
  }
  cut->key = prefix;
  return true;
}

// ---- the cut from one histogram and a sort of the tokens around it -------------------------------------------

struct Member {
  uint32_t key;
  int32_t index;
};
constexpr int kGatherCap = 2048;

struct GatherShared {
  Member list[kGatherCap];    // this block's members (the other blocks copy them)
  Member sorted[kGatherCap];  // the cluster's members, best first (each block sorts its own copy)
  uint32_t count;
  int found, first_tie, last_tie;
};

// a before b: the higher score, the lower id on ties.
__device__ __forceinline__ bool before(const Member& a, const Member& b) {
  return a.key > b.key || (a.key == b.key && a.index < b.index);
}

// Bitonic sort of sorted[0, size) (size a power of two), best first.
__device__ void sort_members(Member* sorted, int size) {
  for (int k = 2; k <= size; k <<= 1) {
    for (int j = k >> 1; j > 0; j >>= 1) {
      for (int i = threadIdx.x; i < size; i += kThreads) {
        const int other = i ^ j;
        if (other > i) {
          const Member a = sorted[i], b = sorted[other];
          const bool best_first = (i & k) == 0;
          if (best_first ? before(b, a) : before(a, b)) {
            sorted[i] = b;
            sorted[other] = a;
          }
        }
      }
      __syncthreads();
    }
  }
}

// The cut for draw from one distance histogram (level 0 of radix_select) and a sort of the tokens that decide it:
// with top-k, every token of the bucket holding the k-th and above (the top-k set and the rest of that bucket),
// sorted, then the first k of them and top-p's prefix among those; with top-p alone, the tokens of the bucket where
// the mass crosses top_p, above which everything is kept. Returns 0 when nothing is cut (every valid token kept),
// 1 with the cut in *cut_key / *take / *ties (as the kernel's final pass takes them), or -1 when those tokens are
// more than kGatherCap (the caller then selects by radix_select).
__device__ int select_by_gather(const float* s_score, int n, int64_t begin, float max_score, const DeviceDraw& draw,
                                bool want_k, bool want_p, SelectShared& sh, GatherShared& gs, int& parity,
                                uint32_t* cut_key, uint32_t* take, uint32_t* ties) {
  cg::cluster_group cluster = cg::this_cluster();
  const unsigned blocks = cluster.num_blocks();
  histogram_level(s_score, n, max_score, 0u, 0, 0, 0, want_p && !want_k, sh, parity);
  merged_totals(sh);
  const bool by_k = want_k && sh.total > static_cast<uint32_t>(draw.top_k);
  if (!by_k && !want_p) return 0;
  if (want_k && !by_k) return -1;  // top-p alone after all (k >= the valid tokens): this histogram has no masses
  const unsigned long long total_mass = sh.total_mass;
  Cut cut{};
  const Need need = by_k ? Need{false, static_cast<uint32_t>(draw.top_k), 0.0}
                         : Need{true, 0u, static_cast<double>(draw.top_p) * static_cast<double>(total_mass)};
  const uint32_t bucket = scan_digit(sh, need, &cut);
  int members = static_cast<int>(by_k ? cut.above + cut.ties : cut.ties);  // known from the histogram
  // Too many to sort (a flat row: thousands of tokens within 1/8 of one another): split that bucket 256 ways once.
  uint32_t fine = kNoDigit;
  if (members > kGatherCap && bucket > 0) {
    histogram_level(s_score, n, max_score, 0u, kFineLevel, bucket, 0, want_p && !want_k, sh, parity);
    fine = scan_digit(sh, need, &cut);
    members = static_cast<int>(by_k ? cut.above + cut.ties : cut.ties);
  }
  if (members > kGatherCap) return -1;
  // Whether a token is gathered: in (or, with top-k, above) the chosen bucket, and its chosen fine digit.
  auto gathered = [&](float score) {
    const uint32_t d = distance_digit(score, max_score);
    if (fine == kNoDigit) return by_k ? d >= bucket : d == bucket;
    if (d != bucket) return by_k && d > bucket;
    const uint32_t f = fine_digit(score, max_score, bucket);
    return by_k ? f >= fine : f == fine;
  };

  if (threadIdx.x == 0) gs.count = 0;
  __syncthreads();
  for (int i = threadIdx.x; i < n; i += kThreads) {
    const float score = s_score[i];
    if (is_valid(score) && gathered(score)) gs.list[atomicAdd(&gs.count, 1u)] = Member{score_key(score), int(begin + i)};
  }
  __syncthreads();
  cluster.sync();  // every block's list complete
  int size = 2;
  while (size < members) size <<= 1;
  int offset = 0;
  for (unsigned r = 0; r < blocks; ++r) {  // the order of arrival does not matter: sorted next
    const Member* remote = cluster.map_shared_rank(gs.list, r);
    const int count = static_cast<int>(*cluster.map_shared_rank(&gs.count, r));
    for (int j = threadIdx.x; j < count; j += kThreads) gs.sorted[offset + j] = remote[j];
    offset += count;
  }
  for (int j = members + threadIdx.x; j < size; j += kThreads) gs.sorted[j] = Member{0u, INT_MAX};  // sorts last
  __syncthreads();
  sort_members(gs.sorted, size);

  // The kept prefix: top-k's first k, or top-p's shortest prefix whose weight (on top of the buckets above) reaches
  // top_p of the candidates' (the top-k set's, or every valid token's).
  int kept = draw.top_k;
  if (want_p) {
    const int limit = by_k ? draw.top_k : members;
    const int per_thread = (limit + kThreads - 1) / kThreads;
    const int from = min(limit, static_cast<int>(threadIdx.x) * per_thread), to = min(limit, from + per_thread);
    auto weight_of = [&](int i) {
      return fixed_mass(sample_weight(__fsub_rn(key_score(gs.sorted[i].key), max_score)));
    };
    unsigned long long own = 0;
    for (int i = from; i < to; ++i) own += weight_of(i);
    __shared__ unsigned long long s_warp[kWarps];
    unsigned long long candidates = 0;
    const unsigned long long incl = block_inclusive_scan<unsigned long long>(own, s_warp, &candidates);
    const double target = static_cast<double>(draw.top_p) * static_cast<double>(by_k ? candidates : total_mass);
    const unsigned long long above = by_k ? 0ull : cut.above_mass;
    if (threadIdx.x == 0) gs.found = limit;
    __syncthreads();
    unsigned long long running = above + incl - own;
    for (int i = from; i < to; ++i) {
      running += weight_of(i);
      if (static_cast<double>(running) >= target) {
        atomicMin(&gs.found, i + 1);
        break;
      }
    }
    __syncthreads();
    kept = gs.found;
  }
  // The tokens at the last kept key are contiguous in the sorted list: take those up to the cut, of all of them.
  const uint32_t last_key = gs.sorted[kept - 1].key;
  if (threadIdx.x == 0) {
    gs.first_tie = INT_MAX;
    gs.last_tie = -1;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < members; i += kThreads) {
    if (gs.sorted[i].key == last_key) {
      atomicMin(&gs.first_tie, i);
      atomicMax(&gs.last_tie, i);
    }
  }
  __syncthreads();
  *cut_key = last_key;
  *take = static_cast<uint32_t>(kept - gs.first_tie);
  *ties = static_cast<uint32_t>(gs.last_tie - gs.first_tie + 1);
  return 1;
}

__global__ __launch_bounds__(kThreads) void sample_rows_kernel(Params p) {
  extern __shared__ float s_score[];  // this block's slice: logits, then scores
  __shared__ SelectShared sh;
  __shared__ GatherShared gs;
  __shared__ Shared s_out;
  __shared__ float s_f[kWarps];
  __shared__ int s_i[kWarps];
  __shared__ uint32_t s_u[kWarps];
  __shared__ double s_d[kWarps];
  __shared__ int s_owner, s_last;
  cg::cluster_group cluster = cg::this_cluster();
  const unsigned blocks = cluster.num_blocks(), rank = cluster.block_rank();
  const int64_t row = blockIdx.x / blocks;
  pdl_launch_dependents();
  pdl_wait();
  const DeviceDraw draw = p.draws ? p.draws[row] : p.single;
  const float* in = p.logits + row * p.cols;
  const int64_t begin = int64_t(rank) * p.slice;
  const int64_t left = p.cols - begin;
  const int n = left <= 0 ? 0 : static_cast<int>(left < p.slice ? left : int64_t(p.slice));

  float local_max = -INFINITY;  // NaN never wins
  for (int i = threadIdx.x; i < n; i += kThreads) {
    const float logit = in[begin + i];
    s_score[i] = logit;
    local_max = logit > local_max ? logit : local_max;
  }
  local_max = block_max(local_max, s_f);
  if (threadIdx.x == 0) s_out.max_logit = local_max;
  cluster.sync();
  float max_logit = -INFINITY;
  for (unsigned r = 0; r < blocks; ++r) max_logit = fmaxf(max_logit, *cluster.map_shared_rank(&s_out.max_logit, r));
  const float max_score = __fmul_rn(max_logit, draw.inv_t);

  auto write_id = [&](int32_t id) {
    p.ids[row] = id;
    deliver_pick(p.sink, id);
  };

  if (draw.inv_t == 0.0f || !isfinite(max_score)) {
    // Greedy, or nothing to weigh (no valid score, an infinite logit, an overflow): the argmax, as the host's.
    int first = INT_MAX;
    for (int i = threadIdx.x; i < n; i += kThreads)
      if (s_score[i] == max_logit) first = min(first, static_cast<int>(begin + i));
    first = block_min(first, s_i);
    if (threadIdx.x == 0) s_out.first_max = first;
    cluster.sync();
    if (rank == 0 && threadIdx.x == 0) {
      for (unsigned r = 0; r < blocks; ++r) first = min(first, *cluster.map_shared_rank(&s_out.first_max, r));
      const float row0 = in[0];
      write_id(!(row0 == row0) || first == INT_MAX ? 0 : first);
    }
    cluster.sync();  // no block leaves while another may still read its shared memory
    return;
  }

  for (int i = threadIdx.x; i < n; i += kThreads) {
    const float score = __fmul_rn(s_score[i], draw.inv_t);
    s_score[i] = score == 0.0f ? 0.0f : score;  // -0 as +0: one key for equal scores
  }
  __syncthreads();

  // The cut: from one histogram and a sort of the tokens around it where they are few (real logits), else by radix
  // selection, top-k first (the k-th token in score order, lower ids first among equal scores), then top-p.
  const bool want_k = draw.top_k > 0 && draw.top_k < p.cols, want_p = draw.top_p < 1.0f;
  uint32_t cut_key = 0, take = UINT_MAX, ties = 0;
  int parity = 0;
  const int gathered = want_k || want_p ? select_by_gather(s_score, n, begin, max_score, draw, want_k, want_p, sh, gs,
                                                           parity, &cut_key, &take, &ties)
                                        : 0;
  if (gathered < 0) {
    // Top-k: the k-th token in score order (lower ids first among equal scores), when k leaves some valid one out.
    Cut top_k{};
    bool by_k = false;
    if (want_k) {
      by_k = radix_select(
          s_score, n, max_score, 0u, false,
          [&](const Cut& totals, Need* need) {
            *need = Need{false, static_cast<uint32_t>(draw.top_k), 0.0};
            return totals.total > static_cast<uint32_t>(draw.top_k);
          },
          sh, parity, &top_k);
    }
    const uint32_t k_ties = by_k ? draw.top_k - top_k.above : 0u;  // of the tokens at top_k.key, the lowest ids

    // Top-p over the top-k tokens: all of top-k's threshold ties are counted, only k_ties of them weighed in the
    // total the nucleus is a share of.
    auto weight_at = [&](uint32_t key) { return fixed_mass(sample_weight(__fsub_rn(key_score(key), max_score))); };
    const unsigned long long left_out = by_k ? (top_k.ties - k_ties) * weight_at(top_k.key) : 0ull;
    Cut top_p{};
    bool by_p = false;
    double nucleus_need = 0;
    if (want_p) {
      by_p = radix_select(
          s_score, n, max_score, by_k ? top_k.key : 0u, true,
          [&](const Cut& totals, Need* need) {
            nucleus_need = static_cast<double>(draw.top_p) * static_cast<double>(totals.total_mass - left_out);
            *need = Need{true, 0u, nucleus_need};
            return true;
          },
          sh, parity, &top_p);
    }

    // The kept tokens: keys above the cut, and of those at it the `take` lowest ids.
    if (by_p) {
      // The nucleus ends inside the tokens at top_p.key (all of one weight): as many as its mass still needs.
      const double tie_mass = static_cast<double>(weight_at(top_p.key));
      const double want = fmax(1.0, ceil((nucleus_need - static_cast<double>(top_p.above_mass)) / tie_mass));
      const uint32_t limit = by_k && top_p.key == top_k.key ? k_ties : top_p.ties;
      cut_key = top_p.key;
      take = want >= static_cast<double>(limit) ? limit : static_cast<uint32_t>(want);
      ties = top_p.ties;
    } else if (by_k) {
      cut_key = top_k.key;
      take = k_ties;
      ties = top_k.ties;
    }
  }
  const bool rank_ties = take < ties;  // only some of the tokens at the cut are kept: rank them by id

  // Each thread's run of contiguous tokens, in index order over the block.
  const int per_thread = (n + kThreads - 1) / kThreads;
  const int run_begin = min(n, static_cast<int>(threadIdx.x) * per_thread);
  const int run_end = min(n, run_begin + per_thread);
  uint32_t tie_base = 0;
  if (rank_ties) {
    uint32_t mine = 0;
    for (int i = run_begin; i < run_end; ++i) {
      const float score = s_score[i];
      mine += is_valid(score) && score_key(score) == cut_key;
    }
    uint32_t block_ties = 0;
    tie_base = block_inclusive_scan<uint32_t>(mine, s_u, &block_ties) - mine;
    if (threadIdx.x == 0) s_out.ties = block_ties;
    cluster.sync();
    for (unsigned r = 0; r < rank; ++r) tie_base += *cluster.map_shared_rank(&s_out.ties, r);
  }
  auto kept_weight = [&](float score, uint32_t* tie_rank) -> float {
    if (!is_valid(score)) return 0.0f;
    const uint32_t key = score_key(score);
    if (key < cut_key) return 0.0f;
    if (key == cut_key && rank_ties && (*tie_rank)++ >= take) return 0.0f;
    return sample_weight(__fsub_rn(score, max_score));
  };
  double own = 0;
  {
    uint32_t tie_rank = tie_base;
    for (int i = run_begin; i < run_end; ++i) own += kept_weight(s_score[i], &tie_rank);
  }
  double block_total = 0;
  const double incl = block_inclusive_scan<double>(own, s_d, &block_total);
  if (threadIdx.x == 0) s_out.mass = block_total;
  cluster.sync();
  // Every block sums the blocks' masses in rank order: the same total, bases and owner everywhere.
  double total = 0, base = 0;
  int owner = -1, last_with_mass = -1;
  double totals[kMaxCluster];
  for (unsigned r = 0; r < blocks; ++r) {
    totals[r] = *cluster.map_shared_rank(&s_out.mass, r);
    total += totals[r];
  }
  const double target = fmin(draw.uniform * total, total);
  double running = 0;
  for (unsigned r = 0; r < blocks; ++r) {
    if (r == rank) base = running;
    if (totals[r] > 0) {
      last_with_mass = static_cast<int>(r);
      if (owner < 0 && running + totals[r] >= target) owner = static_cast<int>(r);
    }
    running += totals[r];
  }
  if (owner < 0) owner = last_with_mass;
  if (owner == static_cast<int>(rank)) {
    // The first thread whose running weight reaches the target walks its run; rounding past every thread: the last
    // thread with weight.
    if (threadIdx.x == 0) {
      s_owner = INT_MAX;
      s_last = -1;
    }
    __syncthreads();
    if (own > 0 && base + incl >= target) atomicMin(&s_owner, static_cast<int>(threadIdx.x));
    if (own > 0) atomicMax(&s_last, static_cast<int>(threadIdx.x));
    __syncthreads();
    const int thread = s_owner != INT_MAX ? s_owner : s_last;
    if (static_cast<int>(threadIdx.x) == thread) {
      double running_mass = base + (incl - own);
      uint32_t tie_rank = tie_base;
      int picked = -1;
      for (int i = run_begin; i < run_end; ++i) {
        const float weight = kept_weight(s_score[i], &tie_rank);
        if (weight <= 0.0f) continue;
        picked = i;
        running_mass += weight;
        if (running_mass >= target) break;
      }
      write_id(static_cast<int32_t>(begin + picked));
    }
  }
  cluster.sync();  // no block leaves while another may still read its shared memory
}

int cluster_size(int64_t cols) {
  return static_cast<int>(std::min<int64_t>(kMaxCluster, std::max<int64_t>(1, ceil_div(cols, kColsPerBlock))));
}

size_t slice_bytes(int64_t cols) {
  return static_cast<size_t>(ceil_div(cols, cluster_size(cols))) * sizeof(float);
}

void allow_large_slices() {
  static std::once_flag once;
  std::call_once(once, [] {
    (void)cudaFuncSetAttribute(sample_rows_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               kMaxSlice * static_cast<int>(sizeof(float)));
  });
}

}  // namespace

bool sample_rows_supported() {
  static const bool supported = [] {
    allow_large_slices();
    PdlLaunchConfig launch(dim3(kMaxCluster), dim3(kThreads), kMaxSlice * sizeof(float), nullptr, kMaxCluster);
    return device_places_cluster(sample_rows_kernel, launch);
  }();
  return supported;
}

void launch_sample_rows(const float* logits, int64_t rows, int64_t cols, const DeviceDraw* draws,
                        const DeviceDraw& single, int32_t* ids, cudaStream_t stream, const PickSink& sink) {
  if (rows == 0) return;
  allow_large_slices();
  const int blocks = cluster_size(cols);
  const Params p{logits, cols, draws, single, ids, sink, static_cast<int>(ceil_div(cols, blocks))};
  PdlLaunchConfig launch(dim3(static_cast<unsigned>(rows * blocks)), dim3(kThreads), slice_bytes(cols), stream,
                         static_cast<unsigned>(blocks));
  launch_config(launch, sample_rows_kernel, p);
}

}  // namespace moex::cuda
