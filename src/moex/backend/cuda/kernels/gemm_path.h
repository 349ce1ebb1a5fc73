// Which kernel runs the prefill GEMMs' large tiles: plain C++, no CUDA types, so tests can ask.
#pragma once

namespace moex::cuda {

// Whether the wgmma kernel (gemm_wgmma.cu) takes tiles of tile_rows rows (128 or 64): a build for sm_90a alone
// (MOEX_CUDA_SM90A), a compute capability 9.0 device, and MOEX_CUDA_WGMMA neither 0 (every tile on the mma.sync
// kernel of moe_gemm.cu) nor, for 64-row tiles, 128 (those on mma.sync). Read at every call: A/B in tests and
// benchmarks.
bool gemm_wgmma_available(int tile_rows);

}  // namespace moex::cuda
