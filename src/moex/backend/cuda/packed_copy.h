// Copies of packed expert rows (core/packed_bf16.h) to the device: the packed bytes cross the link into a staging
// buffer and a kernel unpacks them into the slot's bf16 rows (kernels/unpack_packed.cu), so the link carries ~3/4
// of the bf16 bytes. Both expert copy paths use it (the prefetch thread's and the caller's enqueued demand copies,
// which share the copy stream), so the staging buffer is taken under a lock while a copy is enqueued; stream order
// keeps a chunk's staging bytes until its unpack has read them.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <mutex>

#include "moex/backend/cuda/cuda_resources.h"
#include "moex/core/packed_bf16.h"

namespace moex::cuda {

class PackedCopier {
 public:
  // Enqueues rows [row_begin, row_end) of src into dst [row_end - row_begin][src.cols] (bf16, device; the caller
  // checks the shapes: check_packed_copy_shapes) on stream, in
  // chunks of at most the staging buffer (allocated on first use). src must stay valid until the stream has run
  // them (page-locked source memory: the copies are asynchronous).
  void enqueue(const PackedBf16& src, int64_t row_begin, int64_t row_end, uint16_t* dst, cudaStream_t stream);

 private:
  std::mutex mutex_;
  DeviceMemory staging_;
};

}  // namespace moex::cuda
