// Tensor-core GEMMs for prefill: out = A @ B^T with A [rows, K] and B [N, K] both K-contiguous (the
// checkpoint's [out, in] layout), bf16 in, fp32 accumulate, mma.sync m16n8k16 with fragments by ldmatrix. One
// launch covers every group of a layer: blockIdx.y indexes a tile list planned on the host (expert, up to 128
// or 64 rows: moe_gemm_tile_rows), so experts with no tokens cost nothing and there is no per-expert launch.
// The gate/up instance loads 64 gate and 64 up rows of B per block, arranged so that each thread holds the
// gate and the up sum of the same output elements, applies SwiGLU in registers and writes the activation
// once, as bf16, ready to be stage 2's A operand.
// Block tile BM (128 or 64) rows x 128 B rows x 64 k, BM / 16 warps (BM / 32 along rows x 2 along B) of
// 32 x 64, three cp.async stages (110 KB at 128 rows), two blocks per SM. 64-row tiles serve experts with few
// rows and dense GEMMs too small to give every SM a block of 128 rows.
// Why this size: the 64 x 64 WMMA tile before it loaded a byte of shared memory per 32 (plain) or 43 (SwiGLU)
// FLOPs and ran at 122-145 TFLOP/s on an H100; at 128 rows this one loads one per 64, and k tiles of 64 halve
// the barriers per FLOP (k tiles of 32: 142-194 TFLOP/s, of 64: 157-235). Tried: 128 x 256 tiles with warps of
// 64 x 64 (one block of 166 KB per SM): 8-11% slower (H200: grouped A 1.52 vs 1.37 ms, B 1.07 vs 0.99), too
// few warps to hide the loads.
// On an H100/H200 the wgmma kernel (gemm_wgmma.cu) takes these GEMMs' tiles (launch_gemm below says which).
#include <algorithm>

#include "moex/backend/cuda/kernels/common.cuh"
#include "moex/backend/cuda/kernels/prefill_gemm.cuh"
#include "moex/backend/cuda/kernels/mma_core.cuh"
#include "moex/backend/cuda/kernels/moe.cuh"

namespace moex::cuda {
namespace {

constexpr int kBB = 128;               // B rows per block: plain, 128 output columns; SwiGLU, 64 gate + 64 up
constexpr int kBK = 64;
constexpr int kStages = 3;
constexpr int kLds = kBK + 8;  // 144-byte smem rows: the 8 rows an ldmatrix reads land on distinct banks
template <int BM>
constexpr int threads() {
  return BM / 32 * 2 * 32;
}
template <int BM>
constexpr int stage_elems() {
  return (BM + kBB) * kLds;
}
template <int BM>
constexpr size_t smem_bytes() {
  return size_t(kStages) * stage_elems<BM>() * sizeof(bf16);
}

// Warp (wm, wn) computes rows wm * 32 + [0, 32) of the block against B rows wn * 64 + [0, 64): acc[i][j] is
// the m16n8 tile (rows i * 16, B rows j * 8); lane (g, t) holds rows g and g + 8, B rows 2t and 2t + 1.
// SwiGLU's B rows: warp half wn holds gate columns n0 + wn * 32 + [0, 32) in its first 32 rows and the up
// columns of the same outputs in the next 32, so acc[i][j] and acc[i][j + 4] pair element by element.
template <bool kSwiGLU, int BM>
__global__ __launch_bounds__(threads<BM>(), 2) void gemm_kernel(GemmParams p) {
  constexpr int kThreads = threads<BM>(), kStageElems = stage_elems<BM>(), kWarpsM = BM / 32;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  bf16* smem = reinterpret_cast<bf16*>(smem_raw);

  constexpr int kCols = kSwiGLU ? kBB / 2 : kBB;  // output columns per block
  const GemmCols cols = gemm_cols<kCols>(p, blockIdx.x);
  GemmTile tile;
  if (!gemm_tile<kSwiGLU>(p, blockIdx.y, BM, cols, &tile)) return;
  const int row_begin = tile.row_begin, row_end = tile.row_end;
  const bf16 *b0 = tile.b0, *b1 = tile.b1;
  const int n0 = cols.n0;
  const int K = p.K, N = cols.N;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int wm = warp % kWarpsM, wn = warp / kWarpsM;

  // The block's k range: all of K, or chunk blockIdx.z of a split GEMM.
  const int k_begin = p.k_chunk ? int(blockIdx.z) * p.k_chunk : 0;
  const int k_end = p.k_chunk && k_begin + p.k_chunk < K ? k_begin + p.k_chunk : K;
  // A stage's chunks c = tid + i * kThreads (row c / 8, 16-byte chunk c % 8): those of A come first, exactly
  // i < kAChunks, and sit in the same rows at every stage, so each one's A row (through p.a_rows where the GEMM
  // gathers the tokens' rows itself) is found once, before the k loop; -1 past the tile.
  constexpr int kChunksPerRow = kBK / 8, kAChunks = BM * kChunksPerRow / kThreads;
  static_assert(kAChunks * kThreads == BM * kChunksPerRow, "A's chunks fill whole rounds of the block's threads");
  int a_row[kAChunks];
#pragma unroll
  for (int i = 0; i < kAChunks; ++i) {
    const int row = row_begin + (tid + i * kThreads) / kChunksPerRow;
    a_row[i] = row < row_end ? (p.a_rows ? __ldg(p.a_rows + row) : row) : -1;
  }
  auto load_stage = [&](int stage, int k0) {
    bf16* s = smem + stage * kStageElems;
#pragma unroll
    for (int i = 0; i < kAChunks; ++i) {
      const int c = tid + i * kThreads, r = c / kChunksPerRow, kc = (c % kChunksPerRow) * 8;
      const bool valid = k0 + kc < k_end && a_row[i] >= 0;
      cp_async_16(s + r * kLds + kc, p.a + (valid ? int64_t(a_row[i]) * K + k0 + kc : 0), valid);
    }
#pragma unroll 2
    for (int c = tid + kAChunks * kThreads; c < (BM + kBB) * kChunksPerRow; c += kThreads) {
      const int r = c / kChunksPerRow, kc = (c % kChunksPerRow) * 8;
      const int br = r - BM;
      const bf16* b = b0;
      int n = n0 + br;
      if constexpr (kSwiGLU) {
        b = (br & 63) < 32 ? b0 : b1;
        n = n0 + (br >> 6) * 32 + (br & 31);
      }
      const bool valid = k0 + kc < k_end && n < N;
      cp_async_16(s + r * kLds + kc, b + (valid ? int64_t(n) * K + k0 + kc : 0), valid);
    }
  };

  float acc[2][8][4];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[i][j][0] = acc[i][j][1] = acc[i][j][2] = acc[i][j][3] = 0.f;

  const int k_tiles = (k_end - k_begin + kBK - 1) / kBK;
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < k_tiles) load_stage(s, k_begin + s * kBK);
    cp_async_commit();  // empty groups keep the wait count below uniform
  }
  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // tile kt is in; every warp is done with tile kt - 1, whose stage is refilled next
    const int next = kt + kStages - 1;
    if (next < k_tiles) load_stage(next % kStages, k_begin + next * kBK);
    cp_async_commit();

    const bf16* as = smem + (kt % kStages) * kStageElems;
    const bf16* bs = as + BM * kLds;
#pragma unroll
    for (int k32 = 0; k32 < kBK; k32 += 32) {
      uint32_t a[2][2][4];  // [m16 tile][k16 step]
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int ks = 0; ks < 2; ++ks)
          ldmatrix_x4(as + (wm * 32 + i * 16 + (lane & 15)) * kLds + k32 + ks * 16 + (lane >> 4) * 8, a[i][ks]);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        uint32_t b[4];  // B rows j * 8 + [0, 8), k 0/8/16/24: (b0, b1) of k step 0, then of step 1
        ldmatrix_x4(bs + (wn * 64 + j * 8 + (lane & 7)) * kLds + k32 + (lane >> 3) * 8, b);
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          mma_bf16_16816(acc[i][j], a[i][0][0], a[i][0][1], a[i][0][2], a[i][0][3], b[0], b[1]);
          mma_bf16_16816(acc[i][j], a[i][1][0], a[i][1][1], a[i][1][2], a[i][1][3], b[2], b[3]);
        }
      }
    }
  }
  cp_async_wait<0>();

  const int g = lane >> 2, t = lane & 3;
  float* const out = p.k_chunk ? p.split_out + int64_t(blockIdx.z) * p.rows * N : cols.out;
  const float* const bias = p.k_chunk ? nullptr : cols.bias;
  // acc[i][j][2h] and [2h + 1] are adjacent columns of one row: one store a pair where they stay aligned (n0 is a
  // multiple of 64).
  const bool pairs = kSwiGLU ? pair_stores_aligned(p.out_bf16, N) : pair_stores_aligned(out, N);
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = row_begin + wm * 32 + i * 16 + g + h * 8;
      if (row >= row_end) continue;
      if constexpr (kSwiGLU) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int col = n0 + wn * 32 + j * 8 + 2 * t;
          float v[2];
#pragma unroll
          for (int c = 0; c < 2; ++c) v[c] = silu(acc[i][j][2 * h + c]) * acc[i][j + 4][2 * h + c];
          store_pair(p.out_bf16 + int64_t(row) * N + col, v, col, N, pairs);
        }
      } else {
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const int col = n0 + wn * 64 + j * 8 + 2 * t;
          float v[2];
#pragma unroll
          for (int c = 0; c < 2; ++c) v[c] = acc[i][j][2 * h + c] + (bias && col + c < N ? bias[col + c] : 0.f);
          store_pair(out + int64_t(row) * N + col, v, col, N, pairs);
        }
      }
    }
}

// out[i] = (bias[i % N] or 0) + the splits' sums at i, added in split order.
__global__ void split_sum_kernel(const float* parts, int splits, int64_t count, int N, const float* bias,
                                 float* out) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < count; i += int64_t(gridDim.x) * blockDim.x) {
    float v = parts[i];
    for (int z = 1; z < splits; ++z) v += parts[z * count + i];
    out[i] = v + (bias ? bias[i % N] : 0.f);
  }
}

template <bool kSwiGLU, int BM>
void launch_bm(const GemmParams& p, unsigned grid_x, unsigned grid_y, cudaStream_t stream, unsigned grid_z = 1) {
  static const bool configured = [] {  // above 48 KiB of shared memory a kernel must opt in, once
    cudaFuncSetAttribute(gemm_kernel<kSwiGLU, BM>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem_bytes<BM>()));
    return true;
  }();
  (void)configured;
  gemm_kernel<kSwiGLU, BM><<<dim3(grid_x, grid_y, grid_z), threads<BM>(), smem_bytes<BM>(), stream>>>(p);
}

// grid_y: tiles (grouped) or row tiles of tile_rows (dense).
template <bool kSwiGLU>
void launch_gemm(GemmParams p, int tile_rows, unsigned grid_y, cudaStream_t stream) {
  // Hopper: the wgmma kernel (gemm_wgmma.cu), except a dense GEMM's 64-row tiles: those are GEMMs too small to
  // give every SM a 128-row block, and the wgmma kernel's 256 columns a block would halve their grid again (H200,
  // Model A prefill at 512 tokens: 80.3-83.5k tokens/s with them on it, 84.1-86.5k on mma.sync).
  if (gemm_wgmma_available(tile_rows) && (p.tiles || tile_rows == kMoeGemmTileRows)) {
    launch_gemm_wgmma(p, tile_rows, grid_y, stream);
    return;
  }
  const unsigned grid_x = gemm_col_blocks(p, kSwiGLU ? kBB / 2 : kBB);
  if (tile_rows > kMoeGemmSmallTileRows)
    launch_bm<kSwiGLU, kMoeGemmTileRows>(p, grid_x, grid_y, stream);
  else
    launch_bm<kSwiGLU, kMoeGemmSmallTileRows>(p, grid_x, grid_y, stream);
}

}  // namespace

void launch_moe_gemm_gate_up(const uint16_t* a, const int32_t* a_rows, const MoeGroup* tiles, int num_tiles,
                             int tile_rows, int64_t hidden, int64_t ffn, uint16_t* h, cudaStream_t stream,
                             const int32_t* device_num_tiles) {
  if (num_tiles == 0) return;
  GemmParams p{};
  p.a = reinterpret_cast<const bf16*>(a);
  p.a_rows = a_rows;
  p.tiles = tiles;
  p.device_tiles = device_num_tiles;
  p.K = static_cast<int>(hidden);
  p.N = static_cast<int>(ffn);
  p.out_bf16 = reinterpret_cast<bf16*>(h);
  launch_gemm<true>(p, tile_rows, static_cast<unsigned>(num_tiles), stream);
}

void launch_moe_gemm_down(const uint16_t* h, const MoeGroup* tiles, int num_tiles, int tile_rows, int64_t hidden,
                          int64_t ffn, float* y, cudaStream_t stream, const int32_t* device_num_tiles) {
  if (num_tiles == 0) return;
  GemmParams p{};
  p.a = reinterpret_cast<const bf16*>(h);
  p.tiles = tiles;
  p.device_tiles = device_num_tiles;
  p.K = static_cast<int>(ffn);
  p.N = static_cast<int>(hidden);
  p.use_down = true;
  p.out_f32 = y;
  launch_gemm<false>(p, tile_rows, static_cast<unsigned>(num_tiles), stream);
}

namespace {

// K chunks for a dense GEMM of one output whose 64-row tiles give fewer than half the SMs a block (a router: 2048
// tokens x 128 experts is 32 blocks, each walking all of K alone: 49 us on an H200 for 1 GFLOP), so that
// blocks x chunks covers the SMs; chunks of at least 256 of K. 1: no split.
int dense_gemm_splits(int64_t M, int64_t K, int64_t N, int num_sms, int64_t* k_chunk) {
  const int64_t blocks = ceil_div(N, int64_t{kBB}) * ceil_div(M, int64_t{kMoeGemmSmallTileRows});
  *k_chunk = K;
  if (blocks * 2 > num_sms || K < 512) return 1;
  const int64_t splits = std::min(ceil_div(int64_t{num_sms}, blocks), K / 256);
  *k_chunk = ceil_div(ceil_div(K, splits), int64_t{kBK}) * kBK;
  return static_cast<int>(ceil_div(K, *k_chunk));
}

}  // namespace

size_t dense_gemm_split_floats(int64_t M, int64_t K, int64_t N, int num_sms) {
  int64_t chunk = 0;
  const int splits = dense_gemm_splits(M, K, N, num_sms, &chunk);
  return splits > 1 ? static_cast<size_t>(splits * M * N) : 0;
}

void launch_dense_gemm(const uint16_t* a, int64_t M, int64_t K, const GemvOutput* outputs, int count, int num_sms,
                       cudaStream_t stream, float* split_scratch, size_t split_scratch_floats) {
  if (M == 0 || count == 0) return;
  // One grid for as many consecutive outputs as fit: all but the grid's last a multiple of 256 columns wide (the
  // wgmma kernel's column block; mma.sync's 128 divides it), so that no block straddles two outputs.
  size_t first = 0;
  while (first < size_t(count)) {
    size_t end = first + 1;
    while (end < size_t(count) && end - first < size_t{kDenseGemmMaxOutputs} && outputs[end - 1].rows % 256 == 0)
      ++end;
    GemmParams p{};
    p.a = reinterpret_cast<const bf16*>(a);
    p.rows = M;
    p.K = static_cast<int>(K);
    for (size_t i = first; i < end; ++i) {
      if (outputs[i].rows == 0) continue;
      p.dense[p.dense_count++] = DenseGemmOut{reinterpret_cast<const bf16*>(outputs[i].w), outputs[i].bias,
                                              outputs[i].y, static_cast<int>(outputs[i].rows), 0};
    }
    first = end;
    if (p.dense_count == 0) continue;
    if (p.dense_count == 1) {
      const DenseGemmOut& o = p.dense[0];
      int64_t chunk = 0;
      const int splits = dense_gemm_splits(M, K, o.N, num_sms, &chunk);
      if (splits > 1 && split_scratch && split_scratch_floats >= static_cast<size_t>(splits * M * o.N)) {
        p.k_chunk = static_cast<int>(chunk);
        p.split_out = split_scratch;
        const unsigned grid_x = gemm_col_blocks(p, kBB);
        const auto row_tiles = static_cast<unsigned>(ceil_div(M, int64_t{kMoeGemmSmallTileRows}));
        launch_bm<false, kMoeGemmSmallTileRows>(p, grid_x, row_tiles, stream, static_cast<unsigned>(splits));
        const int64_t count = M * o.N;
        split_sum_kernel<<<static_cast<unsigned>(std::min<int64_t>(ceil_div(count, 256), 4096)), 256, 0, stream>>>(
            split_scratch, splits, count, o.N, o.bias, o.out);
        continue;
      }
    }
    GemmParams counted = p;
    const int64_t col_blocks = gemm_col_blocks(counted, kBB);
    const int tile_rows =
        col_blocks * ceil_div(M, int64_t{kMoeGemmTileRows}) >= num_sms ? kMoeGemmTileRows : kMoeGemmSmallTileRows;
    launch_gemm<false>(p, tile_rows, static_cast<unsigned>(ceil_div(M, tile_rows)), stream);
  }
}

void launch_dense_gemm(const uint16_t* a, int64_t M, int64_t K, const uint16_t* w, int64_t N, const float* bias,
                       float* out, int num_sms, cudaStream_t stream, float* split_scratch,
                       size_t split_scratch_floats) {
  if (N == 0) return;
  const GemvOutput output{w, bias, out, N};
  launch_dense_gemm(a, M, K, &output, 1, num_sms, stream, split_scratch, split_scratch_floats);
}

}  // namespace moex::cuda
