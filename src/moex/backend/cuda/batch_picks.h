// The ring through which chained batched decode steps hand their picks to the host (CudaBackend::pick_rows and
// picked_rows): kSlots slots of up to max_rows ids in pinned memory, each filled by a copy from the device after the
// pick's kernel and marked by its own event, and each with the sampled pick's draws (pinned and device). A slot is
// reused only once the host has read the pick that filled it, so its draws and ids are free by then.
#pragma once

#include <cuda_runtime_api.h>

#include <array>
#include <cstdint>
#include <span>

#include "moex/backend/backend.h"
#include "moex/backend/cuda/cuda_resources.h"
#include "moex/backend/cuda/kernels/sampling.cuh"

namespace moex::cuda {

class BatchPickRing {
 public:
  static constexpr int kSlots = Backend::kMaxPendingPicks;
  explicit BatchPickRing(int64_t max_rows);
  ~BatchPickRing();
  BatchPickRing(const BatchPickRing&) = delete;
  BatchPickRing& operator=(const BatchPickRing&) = delete;

  // The next pick's draws (max_rows each, pinned and device memory). Asserts a slot is free.
  struct Draws {
    DeviceDraw* host;
    DeviceDraw* device;
  };
  Draws next_draws() const;
  // The pick just enqueued on stream wrote rows ids at device_ids: copies them into the next slot and records its
  // event. Asserts a slot is free and rows <= max_rows.
  void enqueue(const int32_t* device_ids, int64_t rows, cudaStream_t stream);
  // The oldest pick not yet read, into ids (as many as it has rows); waits for its copy.
  void read(std::span<int32_t> ids);
  int64_t pending() const { return static_cast<int64_t>(enqueued_ - read_); }

 private:
  uint64_t next_slot() const;

  int64_t max_rows_;
  PinnedMemory ids_host_;
  PinnedMemory draws_host_;
  DeviceMemory draws_device_;
  std::array<cudaEvent_t, kSlots> events_{};
  std::array<int64_t, kSlots> rows_{};
  uint64_t enqueued_ = 0, read_ = 0;
};

}  // namespace moex::cuda
