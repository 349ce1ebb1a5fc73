// Picking tokens on the device: per-row argmax of the logits (greedy), and the host sampler's pick from a draw
// (temperature, top-k, top-p, and the host generator's uniform), so a decode step reads back one int per
// sequence instead of a row of vocab floats, and chained steps need no host round trip for sampling either.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace moex::cuda {

// Columns one block of the argmax scans (2048: 8 per thread of 256).
constexpr int kArgmaxSplitCols = 2048;
// Device scratch launch_argmax_rows needs for rows x cols logits.
size_t argmax_scratch_bytes(int64_t rows, int64_t cols);

// Where a chained step's pick goes besides ids (one row only): a ring of pinned host slots the host reads once the
// launch completed (no copy launch on the way back), the slot chosen on the device: ring[*cursor % ring_size], then
// ++*cursor. The cursor lives on the device so that a recorded decode step (a CUDA graph, replayed with the same
// arguments) fills the next slot each time; every pick into the ring goes through it, so the host's count of picks
// names the slot. advance (or null) is incremented too: the prepared KV row's position, so the next step of the
// sequence needs no upload (CudaBackend::prepare_kv_step).
struct PickSink {
  int32_t* ring = nullptr;  // pinned host memory, mapped
  uint32_t* cursor = nullptr;
  int ring_size = 0;
  int32_t* advance = nullptr;
};

// ids[r] = first index of the largest value of logits[r, :] (fp32 [rows, cols]); NaN never wins, and row[0]
// wins when it is NaN (the host sampler's argmax). scratch: argmax_scratch_bytes(rows, cols) of device memory.
// sink (rows == 1 only) also receives the id, as PickSink says.
void launch_argmax_rows(const float* logits, int64_t rows, int64_t cols, int32_t* ids, void* scratch,
                        cudaStream_t stream, const PickSink& sink = {});

// The greedy pick of one row whose argmax key the lm_head GEMV folded into *argmax_key (launch_gemv_bf16_multi_normed):
// ids[0] = that column, as launch_argmax_rows would give it (row[0] when logits[0] is NaN, 0 when every logit is
// NaN), then *argmax_key = 0 for the next step's lm_head. sink as launch_argmax_rows. One launch of one thread in
// place of the argmax's two, which read the whole row.
void launch_argmax_key_pick(const float* logits, unsigned long long* argmax_key, int32_t* ids, cudaStream_t stream,
                            const PickSink& sink = {});

// One row's draw as the kernel takes it: inv_t = 1 / temperature as the host sampler rounds it (0: greedy).
struct DeviceDraw {
  float inv_t = 0.0f;
  float top_p = 1.0f;
  int32_t top_k = 0;
  double uniform = 0.0;
};

// The largest row launch_sample_rows takes (its row lives in the shared memory of one thread block cluster).
constexpr int64_t kSampleMaxCols = 8 * 44 * 1024;
// Whether this device runs the sampler's clusters (asked once).
bool sample_rows_supported();

// ids[r] = the token draws[r] (or `single` when draws is null; one row) picks from logits[r, :] (fp32 [rows,
// cols], cols <= kSampleMaxCols): what moex::Sampler::sample(row, draw) picks (runtime/sampler.h), computed by one
// cluster of blocks per row from the same fp32 scores and weights. sink as launch_argmax_rows.
void launch_sample_rows(const float* logits, int64_t rows, int64_t cols, const DeviceDraw* draws,
                        const DeviceDraw& single, int32_t* ids, cudaStream_t stream, const PickSink& sink = {});

}  // namespace moex::cuda
