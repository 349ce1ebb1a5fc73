// Online estimates of the two rates the miss path cost model (moe/miss_path.h) weighs: how fast the host
// CPU reads expert weights while it computes missed experts, and how fast the link copies them to the fast
// tier. Fixed flags get both wrong on a given machine, and the error lands on the long path: Mixtral-8x7B
// shape at 16 GiB with pre-gating and CPU experts on an H100 host read 8.99 GB per token on the CPU in 95.7
// ms (94 GB/s, not the assumed 100) while the link's 5.38 GB per token left the host waiting 15.7 ms per
// token after its own share: the model had booked more on the link than it carries in the CPU's time.
// The provider reports what each MoE layer step gave each path and how long the host took; the estimator
// keeps a moving average per path, bounded around the configured rates (the priors). Pure logic.
#pragma once

#include <cstdint>

namespace moex {

// One MoE layer step with a CPU share.
struct PathObservation {
  int64_t cpu_bytes = 0;   // expert weight bytes the host CPU read (whole misses and split rows)
  double cpu_ms = 0;       // host time computing them
  int64_t link_bytes = 0;  // bytes the link had to copy for the layer when the CPU started (demand copies,
                           // split remainders, the rest of taken-over prefetches)
  double stall_ms = 0;     // how long the host then waited for those copies
};

class PathRateEstimator {
 public:
  // The configured rates (GB/s), the estimates until observations move them.
  PathRateEstimator(double host_read_gbs, double copy_gbs);

  void observe(const PathObservation& observation);

  double host_read_gbs() const { return host_read_gbs_; }
  double copy_gbs() const { return copy_gbs_; }
  int64_t num_cpu_observations() const { return num_cpu_observations_; }
  int64_t num_link_observations() const { return num_link_observations_; }  // stalled layers: measured rates
  int64_t num_link_bounds() const { return num_link_bounds_; }  // layers without stall: lower bounds

 private:
  double prior_host_read_gbs_, prior_copy_gbs_;
  double host_read_gbs_, copy_gbs_;
  int64_t num_cpu_observations_ = 0, num_link_observations_ = 0, num_link_bounds_ = 0;
};

}  // namespace moex
