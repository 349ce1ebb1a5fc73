#include "moex/backend/cuda/batch_picks.h"

#include <algorithm>

#include "moex/backend/cuda/cuda_check.h"
#include "moex/core/error.h"

namespace moex::cuda {

BatchPickRing::BatchPickRing(int64_t max_rows)
    : max_rows_(max_rows),
      ids_host_(kSlots * max_rows * sizeof(int32_t)),
      draws_host_(kSlots * max_rows * sizeof(DeviceDraw)),
      draws_device_(kSlots * max_rows * sizeof(DeviceDraw)) {
  for (cudaEvent_t& event : events_) MOEX_CUDA_CHECK(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
}

BatchPickRing::~BatchPickRing() {
  for (cudaEvent_t event : events_)
    if (event) cudaEventDestroy(event);
}

uint64_t BatchPickRing::next_slot() const {
  MOEX_ASSERT(pending() < kSlots, "cuda pick_rows: {} picks not read yet", kSlots);
  return enqueued_ % kSlots;
}

BatchPickRing::Draws BatchPickRing::next_draws() const {
  const int64_t offset = static_cast<int64_t>(next_slot()) * max_rows_;
  return Draws{static_cast<DeviceDraw*>(draws_host_.get()) + offset,
               static_cast<DeviceDraw*>(draws_device_.get()) + offset};
}

void BatchPickRing::enqueue(const int32_t* device_ids, int64_t rows, cudaStream_t stream) {
  MOEX_ASSERT(rows >= 1 && rows <= max_rows_, "cuda pick_rows: {} rows (at most {})", rows, max_rows_);
  const uint64_t slot = next_slot();
  auto* host = static_cast<int32_t*>(ids_host_.get()) + static_cast<int64_t>(slot) * max_rows_;
  MOEX_CUDA_CHECK(cudaMemcpyAsync(host, device_ids, static_cast<size_t>(rows) * sizeof(int32_t),
                                  cudaMemcpyDeviceToHost, stream));
  MOEX_CUDA_CHECK(cudaEventRecord(events_[slot], stream));
  rows_[slot] = rows;
  ++enqueued_;
}

void BatchPickRing::read(std::span<int32_t> ids) {
  MOEX_ASSERT(read_ < enqueued_, "cuda picked_rows: no pick_rows() waiting to be read");
  const uint64_t slot = read_ % kSlots;
  MOEX_ASSERT(static_cast<int64_t>(ids.size()) == rows_[slot], "cuda picked_rows: {} ids for {} rows", ids.size(),
              rows_[slot]);
  MOEX_CUDA_CHECK(cudaEventSynchronize(events_[slot]));
  const auto* host = static_cast<const int32_t*>(ids_host_.get()) + static_cast<int64_t>(slot) * max_rows_;
  std::copy(host, host + ids.size(), ids.begin());
  ++read_;
}

}  // namespace moex::cuda
