// The online rate estimates of the miss path cost model: moving averages toward what each layer step shows,
// a link lowered only by layers the host waited for, bounds around the configured rates, small steps ignored.
#include <gtest/gtest.h>

#include "moex/moe/path_rates.h"

namespace moex {
namespace {

constexpr int64_t kMB = 1000 * 1000;

// The Mixtral-8x7B 16 GiB case with pre-gating and CPU experts on an H100 host, per token over its 32 MoE
// layers: the CPU read 8.99 GB in 95.7 ms, the link carried 5.38 GB and the host waited 15.7 ms for it after
// its share. One layer of it, repeated, takes the default rates (100 / 50 GB/s) to the ones it shows: 8.99 GB
// / 95.7 ms = 93.9 GB/s on the CPU, 5.38 GB / (95.7 + 15.7) ms = 48.3 GB/s on the link.
TEST(PathRates, TheMeasuredMixtralLayersMoveTheDefaultsToTheirRates) {
  PathRateEstimator rates(100, 50);
  const PathObservation layer{
      .cpu_bytes = 8990 * kMB / 32, .cpu_ms = 95.7 / 32, .link_bytes = 5380 * kMB / 32, .stall_ms = 15.7 / 32};
  for (int step = 0; step < 64; ++step) rates.observe(layer);
  EXPECT_NEAR(rates.host_read_gbs(), 8990 / 95.7, 0.01);
  EXPECT_NEAR(rates.copy_gbs(), 5380 / (95.7 + 15.7), 0.01);
  EXPECT_EQ(rates.num_cpu_observations(), 64);
  EXPECT_EQ(rates.num_link_observations(), 64);
  EXPECT_EQ(rates.num_link_bounds(), 0);
}

TEST(PathRates, CpuRateIsAMovingAverageOfBytesOverHostTime) {
  PathRateEstimator rates(100, 50);
  const PathObservation layer{.cpu_bytes = 800 * kMB, .cpu_ms = 10};  // 80 GB/s
  rates.observe(layer);
  EXPECT_NEAR(rates.host_read_gbs(), 95, 1e-9);  // a quarter of the way
  for (int step = 0; step < 40; ++step) rates.observe(layer);
  EXPECT_NEAR(rates.host_read_gbs(), 80, 0.01);
  EXPECT_EQ(rates.num_cpu_observations(), 41);
  EXPECT_EQ(rates.copy_gbs(), 50);  // no link bytes: the link estimate stays
  EXPECT_EQ(rates.num_link_observations() + rates.num_link_bounds(), 0);
}

// The host waited 4 ms after its 4 ms share for 300 MB of copies: the link moved them in 8 ms, 37.5 GB/s.
TEST(PathRates, AStalledLayerLowersTheLinkToBytesOverCpuAndStallTime) {
  PathRateEstimator rates(100, 50);
  const PathObservation layer{.cpu_bytes = 400 * kMB, .cpu_ms = 4, .link_bytes = 300 * kMB, .stall_ms = 4};
  rates.observe(layer);
  EXPECT_NEAR(rates.copy_gbs(), 50 + 0.25 * (37.5 - 50), 1e-9);
  for (int step = 0; step < 40; ++step) rates.observe(layer);
  EXPECT_NEAR(rates.copy_gbs(), 37.5, 0.01);
  EXPECT_EQ(rates.num_link_observations(), 41);
}

// Without a wait the copies ended before the CPU did, at a time not known: bytes over the CPU's time is a
// lower bound on the link's rate. A bound under the estimate says nothing; one above it raises it.
TEST(PathRates, ALayerWithoutStallRaisesTheLinkButNeverLowersIt) {
  PathRateEstimator rates(100, 50);
  PathObservation layer{.cpu_bytes = 400 * kMB, .cpu_ms = 4, .link_bytes = 100 * kMB};  // 25 GB/s over the CPU's time
  for (int step = 0; step < 10; ++step) rates.observe(layer);
  EXPECT_EQ(rates.copy_gbs(), 50);
  layer.stall_ms = 0.04;  // below the threshold: the host's own tail, no sign of a late link
  rates.observe(layer);
  EXPECT_EQ(rates.copy_gbs(), 50);
  EXPECT_EQ(rates.num_link_bounds(), 11);
  EXPECT_EQ(rates.num_link_observations(), 0);
  layer.link_bytes = 320 * kMB;  // 320 MB / 4.04 ms = 79.2 GB/s: the link is at least that fast
  rates.observe(layer);
  EXPECT_NEAR(rates.copy_gbs(), 50 + 0.25 * (320.0 / 4.04 - 50), 1e-9);
  layer.link_bytes = 100 * kMB;
  rates.observe(layer);
  EXPECT_NEAR(rates.copy_gbs(), 50 + 0.25 * (320.0 / 4.04 - 50), 1e-9);
}

TEST(PathRates, EstimatesStayWithinAQuarterAndTwiceThePriors) {
  PathRateEstimator rates(100, 50);
  // 1000 GB/s on the CPU, a 1000 GB/s lower bound on the link.
  const PathObservation fast{.cpu_bytes = 1000 * kMB, .cpu_ms = 1, .link_bytes = 1000 * kMB};
  for (int step = 0; step < 40; ++step) rates.observe(fast);
  EXPECT_EQ(rates.host_read_gbs(), 200);
  EXPECT_EQ(rates.copy_gbs(), 100);
  // 1 GB/s on the CPU, 0.5 GB/s on the link.
  const PathObservation slow{.cpu_bytes = 100 * kMB, .cpu_ms = 100, .link_bytes = 100 * kMB, .stall_ms = 100};
  for (int step = 0; step < 40; ++step) rates.observe(slow);
  EXPECT_EQ(rates.host_read_gbs(), 25);
  EXPECT_EQ(rates.copy_gbs(), 12.5);
}

// A few MB are too few to time against the host's fixed costs per layer: no estimate moves.
TEST(PathRates, TinyByteCountsAreNotTimed) {
  PathRateEstimator rates(100, 50);
  PathObservation tiny{.cpu_bytes = 15 * kMB, .cpu_ms = 0.01, .link_bytes = 15 * kMB, .stall_ms = 10};
  for (int step = 0; step < 10; ++step) rates.observe(tiny);
  EXPECT_EQ(rates.host_read_gbs(), 100);
  EXPECT_EQ(rates.copy_gbs(), 50);
  EXPECT_EQ(rates.num_cpu_observations() + rates.num_link_observations() + rates.num_link_bounds(), 0);
  // Untimed CPU work still times the link, which ran through it.
  tiny.link_bytes = 100 * kMB;  // 100 MB in 10.01 ms
  rates.observe(tiny);
  EXPECT_EQ(rates.host_read_gbs(), 100);
  EXPECT_NEAR(rates.copy_gbs(), 50 + 0.25 * (100 / 10.01 - 50), 1e-9);
}

}  // namespace
}  // namespace moex
