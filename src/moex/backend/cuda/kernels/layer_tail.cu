// A decoder layer at batch 1 from its attention's output to the next layer's q/k/v in one persistent launch:
// o_proj and the residual sum, the norm and the router, the top-k, gate/up + SwiGLU, down + the weighted combine,
// the next norm and the next q/k/v (layer_tail.cuh has the contract).
//
// Why: as six launches (o_proj, router, gate/up, down, q/k/v around the attention) every kernel boundary cost the
// critical path ~2-3 us, because the next kernel's blocks got onto the SMs, and asked for their first weights, only
// as the blocks of the one before left (each big GEMV fills its SMs' registers); HBM idled meanwhile. Fusions that
// kept the launches' shapes lost (docs/cuda.md). Here one block per SM stays resident, and its weights do not wait
// for its activations: a producer warp streams the block's rows of every phase, in the order the block consumes
// them, into a ring of shared-memory slots (cp.async, completing on an mbarrier per slot), as
// far ahead as the ring reaches -- o_proj's rows while the attention still runs (the launch is programmatic:
// the producer starts before the attention ends), the next layer's q/k/v while down finishes. Only the top-k
// stops it: gate/up's and down's rows are known once every block's router rows are done. Eight consumer warps dot
// the rows they own (round-robin) with the phase's vector (in shared memory) and release each slot on their own;
// phases hand their vectors on through global memory and a grid-wide counter per phase.
//
// Status (H200, bench/RESULTS.md "Batch-1 decode: a layer's tail in one persistent launch"): correct, opt-in, and
// still slower than the launch per op (Model A 0.612 vs 0.497 ms/token, 12-layer Model B 0.953 vs 0.709). Where its
// time goes (MOEX_CUDA_TAIL_TIMES=1, Model A, us after the PDL wait): o_proj 3.9, its barrier 5.4, the router's rows
// 7.9, the top-k known 11.1, gate/up 35.9 (24.9 us for 683 KB a block: ~27 GB/s of the ~32 an SM's share of HBM
// needs), its barrier 39.2, down + combine 54.7 (341 KB: ~22 GB/s). The streams, not the hand-offs, are what is left.
//
// Work split: every phase's rows are cut evenly over the blocks (a block's share of each matrix is contiguous, so
// a chunk of rows is one contiguous copy): o_proj's hidden rows, the router's experts, gate/up's top_k * ffn (a gate
// and an up row together), down's hidden features (all picks of a feature in one block, combined in pick order), the
// q/k/v rows. The results differ from the launch-per-op path by summation order only.
#include <algorithm>

#include "moex/backend/cuda/cuda_resources.h"
#include "moex/backend/cuda/kernels/common.cuh"
#include "moex/backend/cuda/kernels/grid_sync.cuh"
#include "moex/backend/cuda/kernels/launch.cuh"
#include "moex/backend/cuda/kernels/layer_tail.cuh"
#include "moex/backend/cuda/kernels/residual_norm.cuh"
#include "moex/backend/cuda/kernels/router_warp.cuh"

namespace moex::cuda {
namespace {

constexpr int kConsumerWarps = 8;
constexpr int kConsumers = kConsumerWarps * 32;
constexpr int kThreads = kConsumers + 32;  // and the producer warp
constexpr int kMaxSlots = 16;
constexpr int kMinSlots = 3;
constexpr int kMaxTopK = 8;
constexpr int kMaxVectorBytes = 64 * 1024;

// ---- shared-memory barriers and bulk copies (sm_90) ----
__device__ __forceinline__ uint32_t shared_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void mbar_init(uint64_t* bar, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(shared_u32(bar)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(shared_u32(bar)) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, unsigned parity) {
  const uint32_t addr = shared_u32(bar);
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}"
        : "=r"(done)
        : "r"(addr), "r"(parity)
        : "memory");
  } while (!done);
}
// 16 bytes from global src into shared dst (both 16-byte aligned), through L2 only: the producer warp's 32 lanes
// each copy a share of a chunk. One bulk copy (cp.async.bulk) per chunk measured the same, when the consumers were
// what held the ring back (RESULTS); which of the two streams faster now that they no longer are is not measured.
__device__ __forceinline__ void copy16_async(void* dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(shared_u32(dst)), "l"(src) : "memory");
}
// bar's phase counts this thread's arrival once all its earlier cp.async copies have landed (its init count has one
// arrival per producer lane).
__device__ __forceinline__ void arrive_when_copied(uint64_t* bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared.b64 [%0];" ::"r"(shared_u32(bar)) : "memory");
}
// The consumer warps only (the producer runs ahead on its own).
__device__ __forceinline__ void consumers_sync() { asm volatile("bar.sync 1, %0;" ::"n"(kConsumers) : "memory"); }

// ---- grid-wide hand-offs between phases (consumer threads) ----
__device__ __forceinline__ void grid_arrive(unsigned* counter) {
  consumers_sync();  // the phase's stores of every consumer thread are issued
  if (threadIdx.x == 0) {
    fence_acq_rel();  // cumulative through the barrier: released with the count
    add_relaxed(counter, 1u);
  }
}
__device__ __forceinline__ void grid_wait(const unsigned* counter) {
  if (threadIdx.x == 0) {
    while (load_relaxed(counter) < gridDim.x) {
    }
    fence_acq_rel();
  }
  consumers_sync();
}

// ---- the work split: the same chunks, in the same order, for the producer and the consumers ----
enum Phase { kProject, kRoute, kGateUp, kDown, kNextQkv };

// Rows [rows, K] of one matrix (a), with the same rows of a second one (b: up beside gate) in pairs; row0: the
// first row's index in the phase's output, pick: the pick (gate/up, down) or the output (q/k/v).
struct Chunk {
  const uint16_t* a;
  const uint16_t* b;
  int rows, K, row0, pick;
};

__device__ __forceinline__ int rows_per_slot(const LayerTailParams& p, int K, bool pair) {
  return p.slot_bytes / (K * 2 * (pair ? 2 : 1));
}

// This block's share [begin, end) of n rows.
__device__ __forceinline__ void block_share(int n, int* begin, int* end) {
  *begin = static_cast<int>(static_cast<int64_t>(blockIdx.x) * n / gridDim.x);
  *end = static_cast<int>(static_cast<int64_t>(blockIdx.x + 1) * n / gridDim.x);
}

// Calls f(chunk) for this block's chunks of `phase`. picks: the picks' weights (the producer's; the consumers pass
// null and get the same chunks without their addresses).
template <typename F>
__device__ __forceinline__ void for_each_chunk(const LayerTailParams& p, Phase phase, const MoeExpertPtrs* picks,
                                               F&& f) {
  int begin = 0, end = 0;
  if (phase == kProject || phase == kRoute) {
    const int K = phase == kProject ? p.qdim : p.hidden;
    const uint16_t* w = phase == kProject ? p.o_proj : p.router;
    block_share(phase == kProject ? p.hidden : p.num_experts, &begin, &end);
    const int per = rows_per_slot(p, K, false);
    for (int r = begin; r < end; r += per) f(Chunk{w + int64_t(r) * K, nullptr, min(per, end - r), K, r, 0});
  } else if (phase == kGateUp) {
    block_share(p.top_k * p.ffn, &begin, &end);
    const int per = rows_per_slot(p, p.hidden, true);
    for (int u = begin; u < end;) {
      const int pick = u / p.ffn, j = u % p.ffn, rows = min(min(per, end - u), p.ffn - j);
      const uint16_t *gate = nullptr, *up = nullptr;
      if (picks) {
        gate = picks[pick].gate + int64_t(j) * p.hidden;
        up = picks[pick].up + int64_t(j) * p.hidden;
      }
      f(Chunk{gate, up, rows, p.hidden, u, pick});
      u += rows;
    }
  } else if (phase == kDown) {
    block_share(p.hidden, &begin, &end);
    const int per = rows_per_slot(p, p.ffn, false);
    for (int pick = 0; pick < p.top_k; ++pick) {
      const uint16_t* down = picks ? picks[pick].down : nullptr;
      for (int r = begin; r < end; r += per)
        f(Chunk{down ? down + int64_t(r) * p.ffn : nullptr, nullptr, min(per, end - r), p.ffn, r, pick});
    }
  } else {
    int total = 0;
    for (int i = 0; i < p.next_count; ++i) total += static_cast<int>(p.next[i].rows);
    block_share(total, &begin, &end);
    const int per = rows_per_slot(p, p.hidden, false);
    int base = 0;
    for (int i = 0; i < p.next_count; ++i) {
      const int rows_i = static_cast<int>(p.next[i].rows), lo = max(begin, base), hi = min(end, base + rows_i);
      for (int r = lo; r < hi; r += per)
        f(Chunk{p.next[i].w + int64_t(r - base) * p.hidden, nullptr, min(per, hi - r), p.hidden, r - base, i});
      base += rows_i;
    }
  }
}

// ---- the consumers' arithmetic ----
// acc[j] += the products of lanes j and j + 4 of the 8 weights in w with x0 | x1: four independent chains, so that
// a warp's FMAs do not wait on each other (one chain per row had kept the consumers at ~0.24 instructions a cycle per
// scheduler, Nsight Compute on an H200: the fixed-latency dependency was their largest stall).
__device__ __forceinline__ void fma8(const uint4& w, const float4& x0, const float4& x1, float (&acc)[4]) {
  float f[8];
  unpack_bf16x8(w, f);
  acc[0] = fmaf(f[0], x0.x, acc[0]);
  acc[1] = fmaf(f[1], x0.y, acc[1]);
  acc[2] = fmaf(f[2], x0.z, acc[2]);
  acc[3] = fmaf(f[3], x0.w, acc[3]);
  acc[0] = fmaf(f[4], x1.x, acc[0]);
  acc[1] = fmaf(f[5], x1.y, acc[1]);
  acc[2] = fmaf(f[6], x1.z, acc[2]);
  acc[3] = fmaf(f[7], x1.w, acc[3]);
}

// A phase's vector of K floats sits in shared memory split in halves: float4 c of it (elements 4c..4c+3) at
// split_index(c, K), so that the low four of each 8-element group are K / 8 consecutive float4s and the high four
// the K / 8 after them. A lane reading the 8 elements of its 16-byte weight vector i then takes float4 i of each half,
// and a warp's reads are consecutive (the plain layout had put lanes 0 and 4 of each quarter-warp on the same banks).
__device__ __forceinline__ int split_index(int c, int K) { return (c & 1) * (K / 8) + (c >> 1); }

// Lane-partial dots of 16-byte vectors [i0, i1) of row a (and row b: PAIR) with v (split_index's layout, K / 8 =
// k8), all in shared memory.
template <bool PAIR>
__device__ __forceinline__ void dot_rows(const uint4* a, const uint4* b, const float4* v, int k8, int i0, int i1,
                                         int lane, float* da, float* db) {
  float sa[4] = {}, sb[4] = {};
#pragma unroll 2
  for (int i = i0 + lane; i < i1; i += 32) {
    const float4 x0 = v[i], x1 = v[k8 + i];
    fma8(a[i], x0, x1, sa);
    if (PAIR) fma8(b[i], x0, x1, sb);
  }
  *da = warp_sum((sa[0] + sa[1]) + (sa[2] + sa[3]));
  *db = PAIR ? warp_sum((sb[0] + sb[1]) + (sb[2] + sb[3])) : 0.f;
}

__device__ __forceinline__ unsigned long long global_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t));
  return t;
}
// Event e of LayerTailTimes at offset t - wait_ns (thread 0 and the producer's lane 0 only).
__device__ __forceinline__ void record(LayerTailTimes* times, int e, unsigned long long wait_ns) {
  if (!times) return;
  const unsigned long long t = global_ns(), d = t > wait_ns ? t - wait_ns : 0;
  atomicAdd(&times->sum_ns[e], d);
  atomicMax(&times->max_ns[e], d);
}

struct Ring {
  uint64_t* full;   // [slots]: the producer's bytes have landed
  uint64_t* empty;  // [slots]: every consumer warp is done with the slot
  char* slots;
  int count, slot_bytes;
  LayerTailTimes* times;
};

// The consumers' side of one chunk: waits for its slot; each warp dots the rows it owns with v (shared fp32 [K]) and
// calls out(row, dot_a, dot_b) from its lane 0. Warps own rows round-robin over the phase (*phase_row counts the rows
// of the phase's earlier chunks) and release the slot each on its own: no barrier per chunk, so a warp runs on into
// the next chunks while others finish theirs. (Every warp on every chunk -- columns split into parts, a barrier and
// a serial sum per chunk -- had cost ~1 us per chunk whatever its size: H200, MOEX_CUDA_TAIL_TIMES.)
template <bool PAIR, typename Out>
__device__ __forceinline__ void consume(const Ring& ring, int* chunk_index, int* phase_row, const Chunk& ch,
                                        const float* v, Out&& out) {
  const int slot = *chunk_index % ring.count;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int first = ((warp - *phase_row) % kConsumerWarps + kConsumerWarps) % kConsumerWarps;
  // Every warp waits for the slot's rows, its own or not: an arrival on the slot's empty barrier before they landed
  // could count towards the slot's previous use while a slower warp still reads it.
  const unsigned long long t0 = ring.times && threadIdx.x == 0 ? global_ns() : 0;
  mbar_wait(&ring.full[slot], static_cast<unsigned>(*chunk_index / ring.count) & 1u);
  if (ring.times && threadIdx.x == 0) atomicAdd(&ring.times->consumer_wait_ns, global_ns() - t0);
  ++*chunk_index;
  *phase_row += ch.rows;
  if (first < ch.rows) {
    const int k8 = ch.K / 8;
    const uint4* a = reinterpret_cast<const uint4*>(ring.slots + static_cast<size_t>(slot) * ring.slot_bytes);
    const uint4* b = a + ch.rows * k8;
    const float4* v4 = reinterpret_cast<const float4*>(v);
    for (int r = first; r < ch.rows; r += kConsumerWarps) {
      float da, db;
      dot_rows<PAIR>(a + r * k8, b + r * k8, v4, k8, 0, k8, lane, &da, &db);
      if (lane == 0) out(r, da, db);
    }
    __syncwarp();
  }
  if (lane == 0) mbar_arrive(&ring.empty[slot]);
}

// s_vec = rms_norm(row) * w in split_index's layout, float4 c of the row = row4(c); visible to every consumer on
// return.
template <typename Row4>
__device__ __forceinline__ void consumers_norm(float* s_vec, int K, const void* w, bool w_bf16, float eps,
                                               float* s_red, Row4 row4) {
  float4* s4 = reinterpret_cast<float4*>(s_vec);
  float sum_sq = 0.f;
  for (int c = threadIdx.x; c < K / 4; c += kConsumers) {
    const float4 v = row4(c);
    s4[split_index(c, K)] = v;
    sum_sq += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
  }
  sum_sq = warp_sum(sum_sq);
  if ((threadIdx.x & 31) == 0) s_red[threadIdx.x >> 5] = sum_sq;
  consumers_sync();
  float total = 0.f;
  for (int i = 0; i < kConsumerWarps; ++i) total += s_red[i];
  const float inv = rsqrtf(total / static_cast<float>(K) + eps);
  for (int c = threadIdx.x; c < K / 4; c += kConsumers) {
    const float4 v = s4[split_index(c, K)], g = load_norm_weight4(w, w_bf16, c);
    s4[split_index(c, K)] = make_float4(v.x * inv * g.x, v.y * inv * g.y, v.z * inv * g.z, v.w * inv * g.w);
  }
  consumers_sync();
}

__device__ __forceinline__ float4 ldcg4(const float* p, int c) {
  return __ldcg(reinterpret_cast<const float4*>(p) + c);
}

// Shared memory past the slots' barriers: the down phase's dots [top_k, features of a block], the phase's vector,
// then the ring (each 128-byte aligned).
struct TailLayout {
  int slots, slot_bytes, dots_floats, vector_bytes;
  __host__ __device__ size_t dots_offset() const { return 2 * kMaxSlots * sizeof(uint64_t); }
  __host__ __device__ size_t vector_offset() const {
    return dots_offset() + align128(static_cast<size_t>(dots_floats) * 4);
  }
  __host__ __device__ size_t ring_offset() const {
    return vector_offset() + align128(static_cast<size_t>(vector_bytes));
  }
  __host__ __device__ size_t bytes() const { return ring_offset() + static_cast<size_t>(slots) * slot_bytes; }
  __host__ __device__ static size_t align128(size_t n) { return (n + 127) / 128 * 128; }
};

template <int PER_LANE>
__global__ __launch_bounds__(kThreads, 1) void layer_tail_kernel(LayerTailParams p, TailLayout layout) {
  extern __shared__ __align__(128) char smem[];
  __shared__ float s_red[kConsumerWarps];
  __shared__ int32_t s_ids[kMaxTopK], s_producer_ids[kMaxTopK];
  __shared__ float s_weights[kMaxTopK], s_producer_weights[kMaxTopK];
  __shared__ MoeExpertPtrs s_experts[kMaxTopK];  // the picks' weights, for the producer
  __shared__ unsigned long long s_wait_ns;  // MOEX_CUDA_TAIL_TIMES: when thread 0's PDL wait returned
  pdl_launch_dependents();
  const unsigned long long start_ns = p.times ? global_ns() : 0;
  const Ring ring{reinterpret_cast<uint64_t*>(smem), reinterpret_cast<uint64_t*>(smem) + kMaxSlots,
                  smem + layout.ring_offset(), layout.slots, p.slot_bytes, p.times};
  float* const s_dots = reinterpret_cast<float*>(smem + layout.dots_offset());
  float* const s_vec = reinterpret_cast<float*>(smem + layout.vector_offset());
  if (threadIdx.x == 0) {
    for (int s = 0; s < ring.count; ++s) {
      mbar_init(&ring.full[s], 32);
      mbar_init(&ring.empty[s], kConsumerWarps);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  LayerTailCounters* const counters = p.counters;

  if (warp == kConsumerWarps) {  // the producer: every chunk of the block, in order, as slots come free
    int chunk_index = 0;
    const auto issue = [&](const Chunk& ch) {
      const int slot = chunk_index % ring.count, use = chunk_index / ring.count;
      ++chunk_index;
      if (use > 0) {
        const unsigned long long t0 = p.times && lane == 0 ? global_ns() : 0;
        mbar_wait(&ring.empty[slot], static_cast<unsigned>(use - 1) & 1u);
        if (p.times && lane == 0) atomicAdd(&p.times->producer_wait_ns, global_ns() - t0);
      }
      const int n16 = ch.rows * ch.K / 8;  // 16-byte pieces of a
      auto* dst = reinterpret_cast<uint4*>(ring.slots + static_cast<size_t>(slot) * p.slot_bytes);
      const auto* a = reinterpret_cast<const uint4*>(ch.a);
      for (int i = lane; i < n16; i += 32) copy16_async(dst + i, a + i);
      if (ch.b) {
        const auto* b = reinterpret_cast<const uint4*>(ch.b);
        for (int i = lane; i < n16; i += 32) copy16_async(dst + n16 + i, b + i);
      }
      arrive_when_copied(&ring.full[slot]);
    };
    // Weights are never written by a kernel: o_proj's and the router's rows go before the wait.
    for_each_chunk(p, kProject, nullptr, issue);
    for_each_chunk(p, kRoute, nullptr, issue);
    pdl_wait();
    if (lane == 0) {
      while (load_relaxed(&counters->routed_logits) < gridDim.x) {
      }
      fence_acq_rel();
    }
    __syncwarp();
    router_warp<false, PER_LANE>(p.logits, p.num_experts, p.top_k, p.sigmoid_scoring, p.normalize, s_producer_ids,
                                 s_producer_weights);
    __syncwarp();
    // The picks' weight pointers once (a table read per chunk had put an L2 round trip before every gate/up chunk).
    if (lane < p.top_k) s_experts[lane] = p.table[s_producer_ids[lane]];
    __syncwarp();
    if (lane == 0 && p.times) record(p.times, 4, s_wait_ns);
    for_each_chunk(p, kGateUp, s_experts, issue);
    for_each_chunk(p, kDown, s_experts, issue);
    if (p.next_count > 0) for_each_chunk(p, kNextQkv, nullptr, issue);
    return;
  }

  int chunk_index = 0, phase_row = 0;
  pdl_wait();
  unsigned long long wait_ns = 0;
  if (p.times && threadIdx.x == 0) {
    wait_ns = global_ns();
    s_wait_ns = wait_ns;
    atomicAdd(&p.times->sum_ns[0], wait_ns - start_ns);
    atomicMax(&p.times->max_ns[0], wait_ns - start_ns);
    if (blockIdx.x == 0) atomicAdd(&p.times->samples, 1ull);
  }
  // o_proj: x = (x + pending) + attn o_proj^T, each block its rows; x + pending of those rows into s_dots first
  // (unused until down), so that storing a row waits for no load.
  for (int c = threadIdx.x; c < p.qdim / 4; c += kConsumers)
    reinterpret_cast<float4*>(s_vec)[split_index(c, p.qdim)] = ldcg4(p.attn, c);
  int o0 = 0, o1 = 0;
  block_share(p.hidden, &o0, &o1);
  for (int r = o0 + threadIdx.x; r < o1; r += kConsumers)
    s_dots[r - o0] = p.pending ? __ldcg(p.x + r) + __ldcg(p.pending + r) : __ldcg(p.x + r);
  consumers_sync();
  for_each_chunk(p, kProject, nullptr, [&](const Chunk& ch) {
    consume<false>(ring, &chunk_index, &phase_row, ch, s_vec, [&](int r, float d, float) {
      const int row = ch.row0 + r;
      p.x[row] = s_dots[row - o0] + d;
    });
  });
  if (threadIdx.x == 0) record(p.times, 1, wait_ns);
  grid_arrive(&counters->projected);
  grid_wait(&counters->projected);
  if (threadIdx.x == 0) record(p.times, 2, wait_ns);
  // The norm, then the router's rows.
  consumers_norm(s_vec, p.hidden, p.ffn_norm, p.ffn_norm_bf16, p.eps, s_red, [&](int c) { return ldcg4(p.x, c); });
  if (blockIdx.x == 0)
    for (int c = threadIdx.x; c < p.hidden / 4; c += kConsumers)
      reinterpret_cast<float4*>(p.normed)[c] = reinterpret_cast<const float4*>(s_vec)[split_index(c, p.hidden)];
  for_each_chunk(p, kRoute, nullptr, [&](const Chunk& ch) {
    consume<false>(ring, &chunk_index, &phase_row, ch, s_vec,
                   [&](int r, float d, float) { p.logits[ch.row0 + r] = d; });
  });
  if (threadIdx.x == 0) record(p.times, 3, wait_ns);
  grid_arrive(&counters->routed_logits);
  // gate/up + SwiGLU of this block's (pick, row) units, with the normalised row still in s_vec.
  for_each_chunk(p, kGateUp, nullptr, [&](const Chunk& ch) {
    consume<true>(ring, &chunk_index, &phase_row, ch, s_vec,
                  [&](int r, float g, float u) { p.act[ch.row0 + r] = silu(g) * u; });
  });
  if (threadIdx.x == 0) record(p.times, 5, wait_ns);
  grid_arrive(&counters->activated);
  grid_wait(&counters->activated);
  if (threadIdx.x == 0) record(p.times, 6, wait_ns);
  // down: this block's features of every pick, then the combine in pick order.
  if (warp == 0)
    router_warp<false, PER_LANE>(p.logits, p.num_experts, p.top_k, p.sigmoid_scoring, p.normalize, s_ids, s_weights);
  const int ffn4 = p.ffn / 4;
  for (int c = threadIdx.x; c < p.top_k * ffn4; c += kConsumers) {
    const int pick = c / ffn4;
    reinterpret_cast<float4*>(s_vec)[pick * ffn4 + split_index(c - pick * ffn4, p.ffn)] = ldcg4(p.act, c);
  }
  consumers_sync();
  int f0 = 0, f1 = 0;
  block_share(p.hidden, &f0, &f1);
  for_each_chunk(p, kDown, nullptr, [&](const Chunk& ch) {
    consume<false>(ring, &chunk_index, &phase_row, ch, s_vec + ch.pick * p.ffn,
                   [&](int r, float d, float) { s_dots[ch.pick * (f1 - f0) + ch.row0 - f0 + r] = d; });
  });
  consumers_sync();
  for (int t = threadIdx.x; t < f1 - f0; t += kConsumers) {
    float acc = 0.f;
    for (int k = 0; k < p.top_k; ++k) acc += s_weights[k] * s_dots[k * (f1 - f0) + t];
    p.out[f0 + t] = acc;
  }
  if (threadIdx.x == 0) record(p.times, 7, wait_ns);
  if (p.next_count > 0) {
    grid_arrive(&counters->combined);
    grid_wait(&counters->combined);
    if (threadIdx.x == 0) record(p.times, 8, wait_ns);
    // The next layer's norm of x + out (x keeps its value, as norm_linear_many leaves it), then its q/k/v.
    consumers_norm(s_vec, p.hidden, p.next_norm, p.next_norm_bf16, p.eps, s_red, [&](int c) {
      const float4 x = ldcg4(p.x, c), d = ldcg4(p.out, c);
      return make_float4(x.x + d.x, x.y + d.y, x.z + d.z, x.w + d.w);
    });
    for_each_chunk(p, kNextQkv, nullptr, [&](const Chunk& ch) {
      const GemvOutput& o = p.next[ch.pick];
      consume<false>(ring, &chunk_index, &phase_row, ch, s_vec, [&](int r, float d, float) {
        const int row = ch.row0 + r;
        o.y[row] = o.bias ? d + o.bias[row] : d;
      });
    });
  }
  if (threadIdx.x == 0 && p.next_count > 0) record(p.times, 9, wait_ns);
  // The last block out leaves the counters at 0 for the next launch (every block has passed every wait).
  consumers_sync();
  if (threadIdx.x == 0) {
    fence_acq_rel();
    if (atomicAdd(&counters->exited, 1u) == gridDim.x - 1) {
      counters->projected = 0;
      counters->routed_logits = 0;
      counters->activated = 0;
      counters->combined = 0;
      counters->exited = 0;
    }
  }
}

// Shared memory a block may take: all of it but what an attention block beside it needs (the attention launched
// after this one starts in its PDL wait while these blocks still run). MOEX_CUDA_TAIL_SMEM_KB overrides (A/B).
int tail_smem_budget() {
  static const int budget = [] {
    const int kb = env_int("MOEX_CUDA_TAIL_SMEM_KB", 200);
    return std::max(kb, 64) * 1024;
  }();
  return budget;
}

int device_smem_optin() {
  static const int optin = [] {
    int device = 0, bytes = 0;
    if (cudaGetDevice(&device) != cudaSuccess ||
        cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) {
      (void)cudaGetLastError();
      return 0;
    }
    return bytes;
  }();
  return optin;
}

bool tail_layout(const LayerTailParams& p, int num_sms, TailLayout* layout) {
  const int64_t vector_floats =
      std::max<int64_t>({p.qdim, p.hidden, static_cast<int64_t>(p.top_k) * p.ffn});
  const int features = static_cast<int>((p.hidden + num_sms - 1) / num_sms);
  *layout = TailLayout{0, p.slot_bytes, p.top_k * features, static_cast<int>(vector_floats * 4)};
  const int64_t room =
      std::min<int64_t>(tail_smem_budget(), device_smem_optin() - 1024) - static_cast<int64_t>(layout->ring_offset());
  layout->slots = static_cast<int>(std::min<int64_t>(kMaxSlots, room / p.slot_bytes));
  return vector_floats * 4 <= kMaxVectorBytes && layout->slots >= kMinSlots;
}

template <int PER_LANE>
bool launch_instance(const LayerTailParams& p, const TailLayout& layout, int num_sms, cudaStream_t stream) {
  static const bool ready = [&] {
    const bool ok = cudaFuncSetAttribute(layer_tail_kernel<PER_LANE>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         device_smem_optin() - 1024) == cudaSuccess;
    if (!ok) (void)cudaGetLastError();
    return ok;
  }();
  if (!ready) return false;
  launch_pdl(layer_tail_kernel<PER_LANE>, dim3(static_cast<unsigned>(num_sms)), dim3(kThreads), layout.bytes(), stream,
             p, layout);
  return true;
}

}  // namespace

bool layer_tail_fits(const LayerTailParams& p) {
  if (p.hidden <= 0 || p.qdim <= 0 || p.ffn <= 0 || p.hidden % 8 || p.qdim % 8 || p.ffn % 8) return false;
  if (p.top_k < 1 || p.top_k > kMaxTopK || p.top_k > p.num_experts || p.num_experts > 256) return false;
  if (p.next_count < 0 || p.next_count > kGemvMaxOutputs || !p.table || !p.counters) return false;
  // A slot holds at least one row of every phase (a gate and an up row together).
  if (p.slot_bytes < 4096 || p.slot_bytes % 16 || int64_t(p.hidden) * 4 > p.slot_bytes ||
      int64_t(p.qdim) * 2 > p.slot_bytes || int64_t(p.ffn) * 2 > p.slot_bytes)
    return false;
  for (const void* ptr : {static_cast<const void*>(p.attn), static_cast<const void*>(p.o_proj),
                          static_cast<const void*>(p.normed), static_cast<const void*>(p.router),
                          static_cast<const void*>(p.logits), static_cast<const void*>(p.act),
                          static_cast<const void*>(p.out)})
    if (!ptr || !aligned16(ptr)) return false;
  // The two norms read their rows and weights as the other consumer-side norms do (residual_norm.cuh).
  if (!residual_norm_fits(ResidualNormIn{p.x, p.pending, nullptr, p.ffn_norm, p.ffn_norm_bf16, p.eps}, p.hidden))
    return false;
  if (p.next_count > 0 &&
      !residual_norm_fits(ResidualNormIn{p.x, p.out, nullptr, p.next_norm, p.next_norm_bf16, p.eps}, p.hidden))
    return false;
  for (int i = 0; i < p.next_count; ++i)
    if (!aligned16(p.next[i].w) || !p.next[i].y || p.next[i].rows <= 0) return false;
  return true;
}

bool launch_layer_tail(const LayerTailParams& p, int num_sms, cudaStream_t stream) {
  TailLayout layout{};
  if (!layer_tail_fits(p) || !tail_layout(p, num_sms, &layout)) return false;
  if (p.num_experts <= 32) return launch_instance<1>(p, layout, num_sms, stream);
  if (p.num_experts <= 128) return launch_instance<4>(p, layout, num_sms, stream);
  return launch_instance<8>(p, layout, num_sms, stream);
}

}  // namespace moex::cuda
