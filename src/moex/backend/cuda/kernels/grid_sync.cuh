// Hand-offs between the blocks of one launch through device-memory counters (persistent kernels: every block
// resident at once, so a block may wait for others). CUDA-only header.
#pragma once

namespace moex::cuda {

// Waits poll with relaxed loads and acquire once: an acquire at every poll would also drop the SM's L1 lines,
// which blocks still running beside the waiter may read through.
__device__ __forceinline__ unsigned load_relaxed(const unsigned* p) {
  unsigned v;
  asm volatile("ld.relaxed.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void fence_acq_rel() { asm volatile("fence.acq_rel.gpu;" ::: "memory"); }
__device__ __forceinline__ void add_relaxed(unsigned* p, unsigned v) {
  asm volatile("red.relaxed.gpu.global.add.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

}  // namespace moex::cuda
