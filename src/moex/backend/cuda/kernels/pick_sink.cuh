// The device side of PickSink (sampling.cuh): what the pick kernels do with a chained step's id. CUDA-only.
#pragma once

#include "moex/backend/cuda/kernels/sampling.cuh"

namespace moex::cuda {

// One thread, once per pick: the id into the next ring slot, the cursor and the KV row's position on by one.
__device__ __forceinline__ void deliver_pick(const PickSink& sink, int32_t id) {
  if (sink.advance) ++*sink.advance;
  if (!sink.ring) return;
  const uint32_t slot = *sink.cursor;
  *sink.cursor = slot + 1;
  sink.ring[slot % static_cast<uint32_t>(sink.ring_size)] = id;  // pinned host memory, written over the bus
  __threadfence_system();
}

}  // namespace moex::cuda
