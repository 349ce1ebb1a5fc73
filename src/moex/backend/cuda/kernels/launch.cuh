// Kernel launches with programmatic dependent launch (PDL, sm_90): a kernel launched through launch_pdl()
// may be scheduled while the kernel before it in the stream is still finishing, so its launch latency and
// whatever it does before pdl_wait() overlap the tail of that kernel. A decode step is ~10 dependent kernels per layer of a few microseconds each; without
// this each one pays its launch gap and ramp-up on an idle GPU. CUDA-only header.
//
// The contract for every kernel launched with launch_pdl():
//   - call pdl_wait() before reading anything an earlier kernel of the stream wrote, and before writing
//     anything an earlier kernel may still read; every thread that returns early must do so only after
//     pdl_wait() or without touching such memory, and at least one thread of the grid must reach
//     pdl_wait(), so that this grid never completes before its predecessor (a later kernel relies on that);
//   - call pdl_launch_dependents() once its own blocks are all running (first statement is fine): the next
//     kernel's blocks then start and wait in their own pdl_wait().
// Both are no-ops when the kernel was launched without the attribute (MOEX_CUDA_PDL=0, or <<<>>>).
#pragma once

#include <cuda_runtime.h>

#include <utility>

#include "moex/backend/cuda/cuda_resources.h"
#include "moex/backend/cuda/kernels/grid_shape.h"

namespace moex::cuda {

__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// MOEX_CUDA_PDL=0 launches every kernel plainly (for A/B measurements and as an escape hatch).
inline bool pdl_enabled() {
  static const bool enabled = !env_equals("MOEX_CUDA_PDL", "0");
  return enabled;
}

// MOEX_CUDA_GEMV_PRELOAD=0 keeps one-row GEMVs (and the router GEMV of the MoE planner) from loading their
// first weights before the PDL wait (gemv_core.cuh, preload_row), for A/B measurements.
inline bool gemv_preload_enabled() {
  static const bool enabled = !env_equals("MOEX_CUDA_GEMV_PRELOAD", "0");
  return enabled;
}

// A launch configuration with the PDL attribute (unless MOEX_CUDA_PDL=0) and, with cluster.x > 0, the grid as
// thread block clusters of cluster.x * cluster.y * cluster.z blocks (sm_90; a plain count is a cluster along x).
// The cluster attribute comes first, so that with_pdl(false) leaves only it (what cudaOccupancyMaxActiveClusters
// is asked with).
struct PdlLaunchConfig {
  cudaLaunchAttribute attribute[2];
  cudaLaunchConfig_t config{};
  PdlLaunchConfig(dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t stream, dim3 cluster = dim3(0, 0, 0)) {
    int n = 0;
    if (cluster.x > 0) {
      attribute[n].id = cudaLaunchAttributeClusterDimension;
      attribute[n].val.clusterDim.x = cluster.x;
      attribute[n].val.clusterDim.y = cluster.y;
      attribute[n].val.clusterDim.z = cluster.z;
      ++n;
    }
    attribute[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attribute[n].val.programmaticStreamSerializationAllowed = 1;
    config.gridDim = grid;
    config.blockDim = block;
    config.dynamicSmemBytes = shared_bytes;
    config.stream = stream;
    config.attrs = attribute;
    clusters_ = cluster.x > 0 ? 1 : 0;
    with_pdl(pdl_enabled());
  }
  PdlLaunchConfig(const PdlLaunchConfig&) = delete;  // config.attrs points into this object
  PdlLaunchConfig& operator=(const PdlLaunchConfig&) = delete;
  void with_pdl(bool on) { config.numAttrs = static_cast<unsigned>(clusters_ + (on ? 1 : 0)); }
  // Blocks per cluster; 0 without the cluster attribute.
  unsigned cluster_blocks() const {
    if (clusters_ == 0) return 0;
    const auto& dim = attribute[0].val.clusterDim;
    return dim.x * dim.y * dim.z;
  }

 private:
  int clusters_ = 0;
};

template <typename... Params, typename... Args>
void launch_config(const PdlLaunchConfig& launch, void (*kernel)(Params...), Args&&... args) {
  // A failed launch is left in the runtime's last error, which every op checks (MOEX_CUDA_CHECK_LAUNCH).
  (void)cudaLaunchKernelEx(&launch.config, kernel, static_cast<Params>(args)...);
}

// Blocks of `threads` threads (no dynamic shared memory) of kernel that one SM holds at once; 0 when the query
// fails, which is cleared so that the launch check after it does not see it. Callers ask once (a static).
template <typename... Params>
int blocks_per_sm(void (*kernel)(Params...), int threads) {
  int n = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, threads, 0) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return n;
}

// Allows kKernel clusters of more than the portable 8 blocks, once per kernel: a driver call, which had run at
// every eager launch of the decode attention's clusters of 16. What the device then places is
// device_places_cluster's answer.
template <auto kKernel>
void allow_nonportable_clusters() {
  static const bool allowed = [] {
    const bool ok = cudaFuncSetAttribute(kKernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) == cudaSuccess;
    if (!ok) (void)cudaGetLastError();
    return ok;
  }();
  (void)allowed;
}

// Whether the device places at least one cluster of kernel launched as `launch` (its grid, block, shared memory
// and cluster shape), by cudaOccupancyMaxActiveClusters, which is asked with the cluster attribute alone. Clusters
// of more than the portable 8 blocks are allowed on the kernel first. A refused query is cleared, so that the
// launch check after it does not see it. A driver call each time: callers ask once per shape and keep the answer.
template <typename... Params>
bool device_places_cluster(void (*kernel)(Params...), PdlLaunchConfig& launch) {
  const unsigned blocks = launch.cluster_blocks();
  if (blocks == 0) return false;
  const unsigned attrs = launch.config.numAttrs;
  launch.with_pdl(false);
  int clusters = 0;
  bool ok = blocks <= 8 ||
            cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) == cudaSuccess;
  ok = ok && cudaOccupancyMaxActiveClusters(&clusters, kernel, &launch.config) == cudaSuccess && clusters >= 1;
  launch.config.numAttrs = attrs;
  if (!ok) (void)cudaGetLastError();
  return ok;
}

template <typename... Params, typename... Args>
void launch_pdl(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t stream,
                Args&&... args) {
  const PdlLaunchConfig launch(grid, block, shared_bytes, stream);
  launch_config(launch, kernel, std::forward<Args>(args)...);
}

}  // namespace moex::cuda
