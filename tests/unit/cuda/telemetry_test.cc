// NVML against the real driver: the CUDA backend's PCI bus id names a device NVML opens, and a window around
// real work reads a positive energy and power. Skips without a device, and where NVML does not load (the
// telemetry is optional by design); the stand-in library's tests (tests/unit/telemetry) run everywhere.
#include <gtest/gtest.h>

#include <chrono>
#include <thread>

#include "cuda_test_util.h"
#include "moex/telemetry/gpu_meter.h"

namespace moex {
namespace {

TEST(CudaTelemetry, TheBackendsBusIdOpensInNvmlAndWorkUsesEnergy) {
  MOEX_CUDA_BACKEND_OR_SKIP(backend);
  const std::string bus_id = backend->pci_bus_id();
  ASSERT_FALSE(bus_id.empty()) << "a CUDA backend must name its GPU";
  std::string why;
  auto nvml = NvmlDevice::open(bus_id, &why);
  if (!nvml) GTEST_SKIP() << "NVML unavailable: " << why;
  EXPECT_FALSE(nvml->name().empty());
  std::printf("NVML device %s at %s\n", nvml->name().c_str(), bus_id.c_str());
  GpuMeter meter(std::move(nvml));
  // A second of repeated large GEMMs: long enough for NVML's one-second power average and its counters.
  const int64_t n = 4096;
  auto a = backend->alloc(DType::kF32, Shape{n, n});
  auto w = backend->alloc(DType::kBF16, Shape{n, n});
  auto out = backend->alloc(DType::kF32, Shape{n, n});
  meter.begin();
  const auto start = std::chrono::steady_clock::now();
  while (std::chrono::steady_clock::now() - start < std::chrono::milliseconds(1200)) {
    for (int rep = 0; rep < 10; ++rep) backend->linear(a->view, w->view, nullptr, out->view);
    backend->synchronize();
  }
  meter.end();
  const GpuEnergy energy = meter.take();
  std::printf("%.2f s: %.1f J from the %s, %.0f W sampled (max %.0f), busy %.0f%%\n", energy.seconds, energy.energy_j,
              energy.energy_from_counter ? "counter" : "power samples", energy.power_w_mean, energy.power_w_max,
              energy.gpu_util_mean);
  EXPECT_GE(energy.seconds, 1.2);
  EXPECT_GT(energy.energy_j, 0.0);
  EXPECT_GT(energy.power_w_max, 0.0);
  // An H100/H200 draws 60-700 W: outside that, a unit is wrong (mW read as W, mJ as J).
  const double watts = energy.energy_j / energy.seconds;
  EXPECT_GT(watts, 20.0);
  EXPECT_LT(watts, 1500.0);
  EXPECT_GE(energy.gpu_util_mean, 0.0);
}

}  // namespace
}  // namespace moex
