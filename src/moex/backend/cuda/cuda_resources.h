// RAII owners of CUDA resources used by the backend: device and pinned host memory, a bump arena for
// weights, and a ring of staging slots that carries small host arrays (token ids, positions, MoE plans)
// to the device without stalling the host on every op.
#pragma once

#include <cuda_runtime_api.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace moex::cuda {

// Whether environment variable name is set to value: the A/B switches of the backend and its kernels
// (MOEX_CUDA_GRAPHS=0, MOEX_CUDA_FUSED_ROPE=0, ...).
inline bool env_equals(const char* name, const char* value) {
  const char* env = std::getenv(name);
  return env && std::strcmp(env, value) == 0;
}

// Environment variable name as a non-negative integer (an A/B knob), or fallback when unset. A value that is not
// one is reported on stderr and ignored, so that a mistyped switch does not pass for a measured variant.
inline int env_int(const char* name, int fallback) {
  const char* env = std::getenv(name);
  if (!env || *env == '\0') return fallback;
  char* end = nullptr;
  const long value = std::strtol(env, &end, 10);
  if (*end == '\0' && value >= 0 && value <= 1 << 20) return static_cast<int>(value);
  std::fprintf(stderr, "moex: ignoring %s=\"%s\": expected a whole number from 0 to %d\n", name, env, 1 << 20);
  return fallback;
}

class DeviceMemory {
 public:
  DeviceMemory() = default;
  explicit DeviceMemory(size_t bytes);
  ~DeviceMemory();
  DeviceMemory(DeviceMemory&& other) noexcept;
  DeviceMemory& operator=(DeviceMemory&& other) noexcept;
  DeviceMemory(const DeviceMemory&) = delete;
  DeviceMemory& operator=(const DeviceMemory&) = delete;
  void* get() const { return ptr_; }
  size_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

class PinnedMemory {
 public:
  PinnedMemory() = default;
  explicit PinnedMemory(size_t bytes);
  ~PinnedMemory();
  PinnedMemory(PinnedMemory&& other) noexcept;
  PinnedMemory& operator=(PinnedMemory&& other) noexcept;
  PinnedMemory(const PinnedMemory&) = delete;
  PinnedMemory& operator=(const PinnedMemory&) = delete;
  void* get() const { return ptr_; }
  size_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

// Weights live as long as the backend and are never freed one by one: bump-allocate from large chunks
// (thousands of experts would otherwise cost thousands of cudaMalloc calls).
class WeightArena {
 public:
  void* allocate(size_t bytes);
  size_t bytes_used() const { return used_total_; }

 private:
  static constexpr size_t kChunkBytes = size_t{256} << 20;
  std::vector<DeviceMemory> chunks_;  // the last one is open for allocation
  std::vector<DeviceMemory> large_;   // allocations over kChunkBytes, one each
  size_t chunk_used_ = 0;
  size_t used_total_ = 0;
};

// A small host -> device copy on `stream` from page-locked memory: by a kernel that reads it
// (launch_copy_from_pinned) when by_kernel, else a cudaMemcpyAsync, which queues on the copy engine behind copies
// of other streams but costs less when there are none.
void copy_pinned_to_device(const void* host, void* device, size_t bytes, cudaStream_t stream, bool by_kernel);

// Host -> device transfer of small per-op arrays. Slot s is reused kSlots uploads later: the device side is
// safe by stream order, the pinned side waits on the event recorded after its last copy, so the host only
// blocks when it runs kSlots uploads ahead of the GPU. Larger uploads take a growable pair of buffers and
// synchronise the stream first (prefill-sized plans only).
class StagingRing {
 public:
  static constexpr int kSlots = 32;
  static constexpr size_t kSlotBytes = size_t{256} << 10;

  StagingRing();
  ~StagingRing();
  StagingRing(const StagingRing&) = delete;
  StagingRing& operator=(const StagingRing&) = delete;
  // Enqueues the copy of `bytes` bytes from `src` on `stream`; the returned device pointer is valid for work
  // enqueued on the same stream until kSlots further uploads. by_kernel: see copy_pinned_to_device.
  void* upload(const void* src, size_t bytes, cudaStream_t stream, bool by_kernel);

 private:
  PinnedMemory host_;
  DeviceMemory device_;
  std::array<cudaEvent_t, kSlots> events_{};
  int next_ = 0;
  PinnedMemory big_host_;
  DeviceMemory big_device_;
};

}  // namespace moex::cuda
