#include "moex/backend/cuda/cuda_resources.h"

#include <cstring>
#include <utility>

#include "moex/backend/cuda/cuda_check.h"
#include "moex/backend/cuda/kernels/elementwise.cuh"

namespace moex::cuda {

DeviceMemory::DeviceMemory(size_t bytes) : bytes_(bytes) {
  if (bytes == 0) return;
  cudaError_t status = cudaMalloc(&ptr_, bytes);
  if (status != cudaSuccess) {
    cudaGetLastError();
    throw BudgetError(fmt::format("CUDA device: cannot allocate {} bytes ({}); hint: the model or batch does not "
                                  "fit in GPU memory",
                                  bytes, cudaGetErrorString(status)));
  }
}
DeviceMemory::~DeviceMemory() {
  if (ptr_) cudaFree(ptr_);
}
DeviceMemory::DeviceMemory(DeviceMemory&& other) noexcept
    : ptr_(std::exchange(other.ptr_, nullptr)), bytes_(std::exchange(other.bytes_, 0)) {}
DeviceMemory& DeviceMemory::operator=(DeviceMemory&& other) noexcept {
  if (this != &other) {
    if (ptr_) cudaFree(ptr_);
    ptr_ = std::exchange(other.ptr_, nullptr);
    bytes_ = std::exchange(other.bytes_, 0);
  }
  return *this;
}

PinnedMemory::PinnedMemory(size_t bytes) : bytes_(bytes) {
  if (bytes == 0) return;
  MOEX_CUDA_CHECK(cudaMallocHost(&ptr_, bytes));
}
PinnedMemory::~PinnedMemory() {
  if (ptr_) cudaFreeHost(ptr_);
}
PinnedMemory::PinnedMemory(PinnedMemory&& other) noexcept
    : ptr_(std::exchange(other.ptr_, nullptr)), bytes_(std::exchange(other.bytes_, 0)) {}
PinnedMemory& PinnedMemory::operator=(PinnedMemory&& other) noexcept {
  if (this != &other) {
    if (ptr_) cudaFreeHost(ptr_);
    ptr_ = std::exchange(other.ptr_, nullptr);
    bytes_ = std::exchange(other.bytes_, 0);
  }
  return *this;
}

void* WeightArena::allocate(size_t bytes) {
  size_t rounded = (bytes + 255) / 256 * 256;  // 256-byte alignment: every vector load width is safe
  if (rounded > kChunkBytes) {
    large_.emplace_back(rounded);
    used_total_ += rounded;
    return large_.back().get();
  }
  if (chunks_.empty() || chunk_used_ + rounded > chunks_.back().bytes()) {
    chunks_.emplace_back(kChunkBytes);
    chunk_used_ = 0;
  }
  void* ptr = static_cast<char*>(chunks_.back().get()) + chunk_used_;
  chunk_used_ += rounded;
  used_total_ += rounded;
  return ptr;
}

StagingRing::StagingRing() : host_(kSlots * kSlotBytes), device_(kSlots * kSlotBytes) {
  for (auto& event : events_) MOEX_CUDA_CHECK(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
}

StagingRing::~StagingRing() {
  for (auto& event : events_)
    if (event) cudaEventDestroy(event);
}

void* StagingRing::upload(const void* src, size_t bytes, cudaStream_t stream, bool by_kernel) {
  if (bytes > kSlotBytes) {
    MOEX_CUDA_CHECK(cudaStreamSynchronize(stream));
    if (big_host_.bytes() < bytes) {
      big_host_ = PinnedMemory(bytes * 5 / 4);
      big_device_ = DeviceMemory(bytes * 5 / 4);
    }
    std::memcpy(big_host_.get(), src, bytes);
    MOEX_CUDA_CHECK(cudaMemcpyAsync(big_device_.get(), big_host_.get(), bytes, cudaMemcpyHostToDevice, stream));
    return big_device_.get();
  }
  int slot = next_;
  next_ = (next_ + 1) % kSlots;
  MOEX_CUDA_CHECK(cudaEventSynchronize(events_[slot]));
  char* host = static_cast<char*>(host_.get()) + slot * kSlotBytes;
  char* device = static_cast<char*>(device_.get()) + slot * kSlotBytes;
  std::memcpy(host, src, bytes);
  copy_pinned_to_device(host, device, bytes, stream, by_kernel);
  MOEX_CUDA_CHECK(cudaEventRecord(events_[slot], stream));
  return device;
}

void copy_pinned_to_device(const void* host, void* device, size_t bytes, cudaStream_t stream, bool by_kernel) {
  if (by_kernel) {
    launch_copy_from_pinned(host, device, bytes, stream);
    MOEX_CUDA_CHECK(cudaGetLastError());
  } else {
    MOEX_CUDA_CHECK(cudaMemcpyAsync(device, host, bytes, cudaMemcpyHostToDevice, stream));
  }
}

}  // namespace moex::cuda
