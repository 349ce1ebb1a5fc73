#include "moex/moe/path_rates.h"

#include <algorithm>

#include "moex/core/error.h"

namespace moex {
namespace {

// Weight of one observation. A decode step gives one per MoE layer (32 for Mixtral), so the estimates follow
// a change within a token while one noisy layer moves them by a quarter of its error.
constexpr double kAlpha = 0.25;
// Fewer bytes are not timed: the host's fixed costs per layer (thread pool dispatch, the timer) are tens of
// microseconds, which at 16 MiB and ~100 GB/s (0.17 ms) stay near a tenth of the time. Test fixtures' experts
// (15 KB) never move the estimates; a layer of Qwen3-30B-A3B (9 MB experts) does from two CPU experts on.
constexpr int64_t kMinTimedBytes = int64_t{16} << 20;
// A wait shorter than this is no sign of a late link: the host's result upload and the device's work on the
// experts that were already resident take about this long after the CPU's share.
constexpr double kStallThresholdMs = 0.05;
// The estimates stay within these factors of the priors: a misread layer (a descheduled host thread, a page
// fault storm) cannot drive the cost model to send everything to one path.
constexpr double kMinScale = 0.25, kMaxScale = 2.0;

double ewma(double estimate, double observed) { return estimate + kAlpha * (observed - estimate); }

}  // namespace

PathRateEstimator::PathRateEstimator(double host_read_gbs, double copy_gbs)
    : prior_host_read_gbs_(host_read_gbs),
      prior_copy_gbs_(copy_gbs),
      host_read_gbs_(host_read_gbs),
      copy_gbs_(copy_gbs) {
  MOEX_ASSERT(host_read_gbs > 0 && copy_gbs > 0, "rate priors {} / {} GB/s", host_read_gbs, copy_gbs);
}

void PathRateEstimator::observe(const PathObservation& observation) {
  // GB/s = 1e6 bytes per ms.
  if (observation.cpu_bytes >= kMinTimedBytes && observation.cpu_ms > 0) {
    const double observed = static_cast<double>(observation.cpu_bytes) / observation.cpu_ms / 1e6;
    host_read_gbs_ = std::clamp(ewma(host_read_gbs_, observed), kMinScale * prior_host_read_gbs_,
                                kMaxScale * prior_host_read_gbs_);
    ++num_cpu_observations_;
  }
  // The link's copies of the layer were enqueued before the CPU started on its share. When the host waited
  // for them afterwards, they ended then (cpu_ms + stall_ms after the start): that is the link's rate. Both
  // ends are a little off, in opposite directions: the copies started shortly before the CPU (the host
  // uploads the step's inputs first), and the wait also covers the device's work on the last copied expert.
  // Without a wait the copies ended earlier, at an unknown time: bytes over the CPU's time is only a lower
  // bound on the rate, which may raise the estimate but never lower it (else a link that finished early would
  // be taken for one as slow as the CPU's share was long).
  const double elapsed_ms = observation.cpu_ms + observation.stall_ms;
  if (observation.link_bytes >= kMinTimedBytes && elapsed_ms > 0) {
    const double observed = static_cast<double>(observation.link_bytes) / elapsed_ms / 1e6;
    double estimate = copy_gbs_;
    if (observation.stall_ms > kStallThresholdMs) {
      estimate = ewma(copy_gbs_, observed);
      ++num_link_observations_;
    } else {
      if (observed > copy_gbs_) estimate = ewma(copy_gbs_, observed);
      ++num_link_bounds_;
    }
    copy_gbs_ = std::clamp(estimate, kMinScale * prior_copy_gbs_, kMaxScale * prior_copy_gbs_);
  }
}

}  // namespace moex
