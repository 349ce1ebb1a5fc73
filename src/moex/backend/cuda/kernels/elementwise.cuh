// Launchers of the memory-bound elementwise kernels. bf16 tensors are passed as uint16_t bit patterns so
// that plain C++ callers need no CUDA headers. No launcher allocates; all are graph-capturable.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace moex::cuda {

// out[i, :] = table[ids[i], :]; table bf16 [vocab, hidden] (or fp32 when table_f32), ids on the device.
void launch_embedding(const int32_t* ids, int64_t num_ids, const void* table, bool table_f32, int64_t hidden,
                      float* out, cudaStream_t stream);
// out = a + b over n elements.
void launch_add(const float* a, const float* b, float* out, int64_t n, cudaStream_t stream);
// x = clamp(x, -limit, limit) over n elements.
void launch_clamp(float* x, int64_t n, float limit, cudaStream_t stream);
// out = silu(gate) * up over n elements.
void launch_silu_mul(const float* gate, const float* up, float* out, int64_t n, cudaStream_t stream);
// acc[r, :] += sigmoid(gate_logit[r]) * x[r, :]; acc/x [rows, cols].
void launch_add_sigmoid_gated(float* acc, const float* x, const float* gate_logit, int64_t rows, int64_t cols,
                              cudaStream_t stream);
// out[r, :] += bias over rows rows of cols (the bias of a GEMM that wrote out without it: cuBLAS's).
void launch_add_row_bias(float* out, const float* bias, int64_t rows, int64_t cols, cudaStream_t stream);
// y += alpha * x over n elements.
void launch_axpy(float alpha, const float* x, float* y, int64_t n, cudaStream_t stream);
// dst = bf16(src) (round to nearest even) over n elements.
void launch_f32_to_bf16(const float* src, uint16_t* dst, int64_t n, cudaStream_t stream);
// dst[0, bytes) = host[0, bytes): the device reads page-locked host memory (cudaMallocHost, mapped through unified
// addressing) itself. A small upload that way does not queue on the copy engine behind expert copies of
// hundreds of MB issued on another stream, as a cudaMemcpyAsync does (measured: each streamed prefill wave's
// plan upload waited for the expert copy in flight, serializing copies and compute).
void launch_copy_from_pinned(const void* host, void* dst, size_t bytes, cudaStream_t stream);
// dst[r, :] = bf16(src[rows[r], :]) for r < num_rows; src/dst [*, cols]. Gathers tokens by expert.
void launch_gather_rows_bf16(const float* src, const int32_t* rows, int64_t num_rows, int64_t cols,
                             uint16_t* dst, cudaStream_t stream);

}  // namespace moex::cuda
