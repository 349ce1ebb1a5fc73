// Prefill GEMMs on Hopper's warpgroup MMA (wgmma, sm_90a): the same work and operands as moe_gemm.cu's mma.sync
// kernel (out = A @ B^T, A [rows, K] and B [N, K] K-contiguous, bf16 in, fp32 accumulate; grouped tiles of one
// expert, or dense), for its 128- and 64-row tiles.
// Block: 128 rows x 256 B rows x 64 k per stage, two warpgroups of 64 rows, each one m64n256k16 wgmma per 16 k
// (128 fp32 accumulators a thread), both operands read by the tensor cores from shared memory; the 64-row tiles
// (experts with few rows) one warpgroup. Every thread also copies (cp.async, 16 bytes, zero-filled past the rows,
// columns and K) into the 128-byte swizzle that the wgmma descriptors name, four stages deep: tile kt + 2 loads
// while tile kt multiplies and tile kt - 1 drains.
// The SwiGLU instance's B rows are 128 gate rows then the 128 up rows of the same outputs, so accumulator j and
// j + 64 of a thread are the gate and up sums of one element: SwiGLU in registers, one bf16 write.
// Blocks walk the row tiles first (blockIdx.x), so the blocks running at once share B's column block: each
// weight byte comes from HBM about once, the activations from L2.
// Why: the mma.sync kernel reaches 157-235 TFLOP/s on an H100 (under a third of the card's): every operand goes
// through registers by ldmatrix, and a warp's 32 x 64 tile loads a shared-memory byte per 64 FLOPs. H200, same
// call (moex_cuda_kernels_bench --gemm-only, MOEX_CUDA_WGMMA=0 as the baseline): grouped gate/up + down at 2048
// tokens, Model A 0.915 vs 1.382 ms (310 TFLOP/s), Model B 0.694 vs 1.008; Model B at 512 tokens (64-row tiles)
// 0.469 vs 0.523; dense 2048^3 0.058 vs 0.081, 2048 x 32000 x 2048 0.802 vs 1.144-1.169.
// What bounds it (Nsight Compute, H200, Model A's grouped GEMMs at 2048 tokens, before the row starts were found
// once): neither the tensor pipe (44-47% of its cycles) nor L2 (54-64%) nor DRAM (21-27%); the warps' top stalls
// were fixed-latency dependencies and dispatch, and the integer ALU and FMA pipes carried the copies' address
// arithmetic (a 64-bit multiply per B chunk and stage). With each thread's row starts found once (kRowPtrs) the
// same GEMMs took 1.04-1.13x less time, and with the results stored as pairs another 1.05-1.33x (bench/RESULTS.md,
// "Prefill: the wgmma GEMM's copy rows found once, the GEMMs' results stored as pairs"). Three
// k tiles ahead with the products waited for at every tile, and a persistent grid copying a block's next tile
// while it writes the last, were slower (same section). TMA from a producer warp and a weight tile multicast to a
// cluster of two blocks are the next steps (docs/cuda.md).
#include "moex/backend/cuda/kernels/prefill_gemm.cuh"

#include "moex/backend/cuda/kernels/common.cuh"

namespace moex::cuda {
namespace {

constexpr int kBRows = 256;  // B rows per block: plain 256 output columns; SwiGLU 128 gate + 128 up
constexpr int kK = 64;       // k per stage: one 128-byte swizzle row
constexpr int kStages = 4;
constexpr int kARowBytes = kK * 2;
// Per instance: kRows A rows per block (128: two warpgroups; 64: one), a warpgroup of 128 threads per 64 rows.
template <int kRows>
constexpr int kThreads = kRows * 2;
template <int kRows>
constexpr int kStageBytes = (kRows + kBRows) * kARowBytes;  // 48 KB at 128 rows, 40 KB at 64
template <int kRows>
constexpr size_t kSmemBytes = size_t(kStages) * kStageBytes<kRows> + 1024;  // + aligning the first stage to 1 KB

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define MOEX_WGMMA_BUILT 1
#endif

#ifdef MOEX_WGMMA_BUILT
// A K-major operand in shared memory with the 128-byte swizzle: rows of 128 bytes, 8-row groups 1024 bytes apart
// (the stride field), the 16-byte chunk c of row r stored at chunk c ^ (r % 8). The start address moves by 32
// bytes per 16 k within the row.
__device__ __forceinline__ uint64_t smem_descriptor(uint32_t addr) {
  uint64_t desc = (addr & 0x3FFFF) >> 4;
  desc |= uint64_t(16 >> 4) << 16;    // leading byte offset: unused with this swizzle, 1 by convention
  desc |= uint64_t(1024 >> 4) << 32;  // stride byte offset: the next 8 rows
  desc |= uint64_t(1) << 62;          // 128-byte swizzle
  return desc;
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}
// The copies this thread waited for, ordered before the tensor cores' (async proxy) reads of shared memory.
__device__ __forceinline__ void fence_async_shared() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }

// d += A (64 x 16, desc_a) * B (256 x 16, desc_b)^T; thread (warp w of the warpgroup, lane 4g + t) holds rows
// 16w + g and 16w + g + 8, columns 8j + 2t and 8j + 2t + 1 in d[4j .. 4j + 3] (row g: 0, 1; row g + 8: 2, 3).
__device__ __forceinline__ void wgmma_m64n256k16(float (&d)[128], uint64_t desc_a, uint64_t desc_b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "
      "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "
      "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "
      "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "
      "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
      "}, %128, %129, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]),
        "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]),
        "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]),
        "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]),
        "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]),
        "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]),
        "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]),
        "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]),
        "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
      : "l"(desc_a), "l"(desc_b), "r"(1));  // scale-d 1: d accumulates
}
#endif

// kRowPtrs: each thread finds the starts of its copies' rows (A and B) once; a stage's copy is then the start
// plus k0. Every chunk of a thread lies in the same 16-byte column kc = tid % 8 of its row and in rows tid / 8 +
// i * threads / 8, whose swizzled column (row % 8 == tid / 8 % 8: threads / 8 is a multiple of 8) is the same too.
// Off (MOEX_CUDA_WGMMA_ROW_PTRS=0): the row, the column and the B row's start are worked out per chunk and stage.
template <bool kSwiGLU, int kRows, bool kRowPtrs>
__global__ __launch_bounds__(kThreads<kRows>, 1) void gemm_wgmma_kernel(GemmParams p) {
  constexpr int kThreadCount = kThreads<kRows>, kStage = kStageBytes<kRows>;
#ifdef MOEX_WGMMA_BUILT
  extern __shared__ unsigned char smem_raw[];
  const uint32_t smem_base = (static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw)) + 1023u) & ~1023u;

  constexpr int kCols = kSwiGLU ? kBRows / 2 : kBRows;  // output columns per block
  const GemmCols cols = gemm_cols<kCols>(p, blockIdx.y);
  GemmTile tile;
  if (!gemm_tile<kSwiGLU>(p, blockIdx.x, kRows, cols, &tile)) return;
  const int row_begin = tile.row_begin, row_end = tile.row_end;
  const bf16 *b0 = tile.b0, *b1 = tile.b1;
  const int n0 = cols.n0;
  const int K = p.K, N = cols.N;
  const int tid = threadIdx.x;

  // Stage s: A rows at smem_base + s * kStageBytes, B rows after them. Chunk c of the stage's (rows + B rows) x 8
  // chunks: row c / 8, 16-byte chunk c % 8 of it. A thread's chunk c = tid + i * threads lies in A exactly for
  // i < kAChunks (2 kRows threads), in the same rows at every stage: their starts are found once, through p.a_rows
  // where the GEMM gathers the tokens' rows itself (no gathered copy of A written first), null past the tile.
  constexpr int kAChunks = kRows * 8 / kThreadCount;
  static_assert(kAChunks == 4, "two threads per A row of 8 chunks");
  constexpr int kChunks = (kRows + kBRows) * 8 / kThreadCount, kBChunks = kChunks - kAChunks;
  static_assert(kThreadCount % 64 == 0, "a thread's rows share their swizzled column");
  const int kc = tid & 7;
  const bf16* a_row[kAChunks];
#pragma unroll
  for (int i = 0; i < kAChunks; ++i) {
    const int row = row_begin + ((tid + i * kThreadCount) >> 3);
    a_row[i] = row < row_end ? p.a + int64_t(p.a_rows ? __ldg(p.a_rows + row) : row) * K : nullptr;
    if (kRowPtrs && a_row[i]) a_row[i] += kc * 8;
  }
  // The B row of chunk kAChunks + i: its weights and output column n (>= N: past the output).
  const auto b_row_of = [&](int i, const bf16** b, int* n) {
    const int br = ((tid + (kAChunks + i) * kThreadCount) >> 3) - kRows;
    *b = b0;
    *n = n0 + br;
    if constexpr (kSwiGLU) {
      *b = br < kCols ? b0 : b1;
      *n = n0 + (br < kCols ? br : br - kCols);
    }
  };
  const bf16* b_row[kRowPtrs ? kBChunks : 1];
  if constexpr (kRowPtrs) {
#pragma unroll
    for (int i = 0; i < kBChunks; ++i) {
      const bf16* b;
      int n;
      b_row_of(i, &b, &n);
      b_row[i] = n < N ? b + int64_t(n) * K + kc * 8 : nullptr;
    }
  }
  const uint32_t thread_dst = (tid >> 3) * kARowBytes + ((kc ^ ((tid >> 3) & 7)) << 4);
  auto load_stage = [&](int stage, int k0) {
    const uint32_t base = smem_base + stage * kStage;
    if constexpr (kRowPtrs) {
      const bool k_ok = k0 + kc * 8 < K;
#pragma unroll
      for (int i = 0; i < kChunks; ++i) {
        const bf16* row = i < kAChunks ? a_row[i] : b_row[i - kAChunks];
        const bool valid = k_ok && row;
        cp_async_16(base + thread_dst + i * (kThreadCount / 8) * kARowBytes, valid ? row + k0 : p.a, valid);
      }
    } else {
#pragma unroll
      for (int i = 0; i < kChunks; ++i) {
        const int r = (tid + i * kThreadCount) >> 3;  // the chunk's row; its 16-byte column is kc
        const bool k_ok = k0 + kc * 8 < K;
        const bf16* src;
        bool valid;
        if (i < kAChunks) {
          valid = k_ok && a_row[i];
          src = valid ? a_row[i] + k0 + kc * 8 : p.a;
        } else {
          const bf16* b;
          int n;
          b_row_of(i - kAChunks, &b, &n);
          valid = k_ok && n < N;
          src = b + (valid ? int64_t(n) * K + k0 + kc * 8 : 0);
        }
        cp_async_16(base + r * kARowBytes + ((kc ^ (r & 7)) << 4), src, valid);
      }
    }
  };

  float d[128];
#pragma unroll
  for (int i = 0; i < 128; ++i) d[i] = 0.f;

  const int k_tiles = (K + kK - 1) / kK;
#pragma unroll
  for (int s = 0; s < kStages - 2; ++s) {
    if (s < k_tiles) load_stage(s, s * kK);
    cp_async_commit();  // empty groups keep the wait count uniform
  }
  const int wg = tid >> 7;
  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<kStages - 3>();  // this thread's copies of tile kt are in
    fence_async_shared();
    // Every thread's copies of tile kt are in, and every warpgroup has finished tile kt - 2 (its wgmma_wait<1>
    // below, last iteration), whose stage the next copies overwrite.
    __syncthreads();
    const int next = kt + kStages - 2;
    if (next < k_tiles) load_stage(next % kStages, next * kK);
    cp_async_commit();

    const uint32_t a_addr = smem_base + (kt % kStages) * kStage + wg * 64 * kARowBytes;
    const uint32_t b_addr = smem_base + (kt % kStages) * kStage + kRows * kARowBytes;
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < kK / 16; ++ks)
      wgmma_m64n256k16(d, smem_descriptor(a_addr + ks * 32), smem_descriptor(b_addr + ks * 32));
    wgmma_commit();
    wgmma_wait<1>();  // tile kt - 1's products are done; tile kt's run on
  }
  wgmma_wait<0>();
  cp_async_wait<0>();

  const int warp = (tid >> 5) & 3, lane = tid & 31, g = lane >> 2, t = lane & 3;
  // A thread's two columns 2t, 2t + 1 of each 8 are adjacent: one store a pair where they stay aligned (n0 is a
  // multiple of 128).
  const bool pairs = kSwiGLU ? pair_stores_aligned(p.out_bf16, N) : pair_stores_aligned(cols.out, N);
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = row_begin + wg * 64 + warp * 16 + g + half * 8;
    if (row >= row_end) continue;
    if constexpr (kSwiGLU) {
#pragma unroll
      for (int j = 0; j < 16; ++j) {
        const int col = n0 + j * 8 + 2 * t;
        float v[2];
#pragma unroll
        for (int c = 0; c < 2; ++c) v[c] = silu(d[j * 4 + half * 2 + c]) * d[(j + 16) * 4 + half * 2 + c];
        store_pair(p.out_bf16 + int64_t(row) * N + col, v, col, N, pairs);
      }
    } else {
#pragma unroll
      for (int j = 0; j < 32; ++j) {
        const int col = n0 + j * 8 + 2 * t;
        float v[2];
#pragma unroll
        for (int c = 0; c < 2; ++c)
          v[c] = d[j * 4 + half * 2 + c] + (cols.bias && col + c < N ? cols.bias[col + c] : 0.f);
        store_pair(cols.out + int64_t(row) * N + col, v, col, N, pairs);
      }
    }
  }
#endif
}

template <bool kSwiGLU, int kRows, bool kRowPtrs>
void launch_instance(GemmParams p, unsigned row_tiles, cudaStream_t stream) {
  constexpr size_t smem = kSmemBytes<kRows>;
  static const bool configured = [] {  // above 48 KiB of shared memory a kernel must opt in, once
    cudaFuncSetAttribute(gemm_wgmma_kernel<kSwiGLU, kRows, kRowPtrs>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                         int(smem));
    return true;
  }();
  (void)configured;
  const unsigned col_blocks = gemm_col_blocks(p, kSwiGLU ? kBRows / 2 : kBRows);
  gemm_wgmma_kernel<kSwiGLU, kRows, kRowPtrs><<<dim3(row_tiles, col_blocks), kThreads<kRows>, smem, stream>>>(p);
}

template <bool kSwiGLU, int kRows>
void launch_kernel(const GemmParams& p, unsigned row_tiles, cudaStream_t stream) {
  static const bool row_ptrs = !env_equals("MOEX_CUDA_WGMMA_ROW_PTRS", "0");
  row_ptrs ? launch_instance<kSwiGLU, kRows, true>(p, row_tiles, stream)
           : launch_instance<kSwiGLU, kRows, false>(p, row_tiles, stream);
}

}  // namespace

bool gemm_wgmma_available(int tile_rows) {
#if defined(MOEX_CUDA_SM90A)
  static const bool hopper = [] {
    int device = 0, major = 0, minor = 0;
    const bool ok = cudaGetDevice(&device) == cudaSuccess &&
                    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess &&
                    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) == cudaSuccess;
    if (!ok) (void)cudaGetLastError();
    return ok && major == 9 && minor == 0;
  }();
  if (!hopper || (tile_rows != 128 && tile_rows != 64) || env_equals("MOEX_CUDA_WGMMA", "0")) return false;
  return tile_rows == 128 || !env_equals("MOEX_CUDA_WGMMA", "128");
#else
  (void)tile_rows;
  return false;
#endif
}

void launch_gemm_wgmma(const GemmParams& p, int tile_rows, unsigned row_tiles, cudaStream_t stream) {
  if (tile_rows == 128)
    p.out_bf16 ? launch_kernel<true, 128>(p, row_tiles, stream) : launch_kernel<false, 128>(p, row_tiles, stream);
  else
    p.out_bf16 ? launch_kernel<true, 64>(p, row_tiles, stream) : launch_kernel<false, 64>(p, row_tiles, stream);
}

}  // namespace moex::cuda
