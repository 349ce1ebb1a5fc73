// NVML loading and the GPU meter against a stand-in library (fake_nvml.cc): every way loading can fail gives a
// reason and no meter; windows add up energy from the counter, or from power samples where there is none.
#include "moex/telemetry/gpu_meter.h"

#include <gtest/gtest.h>
#include <stdlib.h>

#include <chrono>
#include <string>
#include <thread>

#include "unit/scoped_env.h"

namespace moex {
namespace {

using test::ScopedEnv;

std::string open_error(const std::string& bus_id = "") {
  std::string why;
  auto device = NvmlDevice::open(bus_id, &why);
  EXPECT_EQ(device, nullptr);
  return why;
}

TEST(Nvml, MissingLibraryIsAReasonNotAnError) {
  ScopedEnv lib("MOEX_NVML_LIBRARY", "/nonexistent/libnvidia-ml.so.1");
  std::string why = open_error();
  EXPECT_NE(why.find("cannot load /nonexistent/libnvidia-ml.so.1"), std::string::npos) << why;
}

TEST(Nvml, ALibraryWithoutNvmlSymbolsIsNamed) {
  ScopedEnv lib("MOEX_NVML_LIBRARY", "libm.so.6");
  std::string why = open_error();
  EXPECT_NE(why.find("libm.so.6 has no nvmlInit_v2"), std::string::npos) << why;
}

TEST(Nvml, InitFailureCarriesNvmlsMessage) {
  ScopedEnv lib("MOEX_NVML_LIBRARY", MOEX_FAKE_NVML);
  ScopedEnv init("FAKE_NVML_INIT_ERROR", "9");
  std::string why = open_error();
  EXPECT_NE(why.find("nvmlInit failed: fake error (NVML error 9)"), std::string::npos) << why;
}

TEST(Nvml, UnknownBusIdIsNamed) {
  ScopedEnv lib("MOEX_NVML_LIBRARY", MOEX_FAKE_NVML);
  std::string why = open_error("0000:99:00.0");
  EXPECT_NE(why.find("NVML has no device 0000:99:00.0: Not Found"), std::string::npos) << why;
}

TEST(Nvml, ReadsTheDevice) {
  ScopedEnv lib("MOEX_NVML_LIBRARY", MOEX_FAKE_NVML);
  for (const char* bus_id : {"", "0000:3B:00.0"}) {
    std::string why;
    auto device = NvmlDevice::open(bus_id, &why);
    ASSERT_NE(device, nullptr) << why;
    EXPECT_EQ(device->name(), "Fake GPU");
    EXPECT_EQ(device->power_w(), 250.0);
    auto util = device->utilization();
    ASSERT_TRUE(util.has_value());
    EXPECT_EQ(util->gpu, 87u);
    EXPECT_EQ(util->memory, 42u);
    auto first = device->total_energy_j(), second = device->total_energy_j();
    ASSERT_TRUE(first && second);
    EXPECT_DOUBLE_EQ(*second - *first, 1.5);
  }
}

std::unique_ptr<GpuMeter> fake_meter() {
  std::string why;
  auto device = NvmlDevice::open("0000:3B:00.0", &why);
  EXPECT_NE(device, nullptr) << why;
  return device ? std::make_unique<GpuMeter>(std::move(device), std::chrono::milliseconds(1)) : nullptr;
}

TEST(GpuMeter, EnergyFromTheCounterAddsUpOverWindows) {
  ScopedEnv lib("MOEX_NVML_LIBRARY", MOEX_FAKE_NVML);
  auto meter = fake_meter();
  ASSERT_NE(meter, nullptr);
  meter->begin();
  std::this_thread::sleep_for(std::chrono::milliseconds(20));  // the sampler adds samples of its own
  meter->end();
  meter->begin();
  meter->end();
  GpuEnergy energy = meter->take();
  EXPECT_EQ(energy.windows, 2);
  EXPECT_TRUE(energy.energy_from_counter);
  EXPECT_DOUBLE_EQ(energy.energy_j, 3.0);  // one counter read at each end of each window, 1.5 J apart
  EXPECT_GE(energy.seconds, 0.02);
  EXPECT_GE(energy.samples, 4);
  EXPECT_DOUBLE_EQ(energy.power_w_mean, 250.0);
  EXPECT_DOUBLE_EQ(energy.power_w_max, 250.0);
  EXPECT_DOUBLE_EQ(energy.gpu_util_mean, 87.0);
  EXPECT_DOUBLE_EQ(energy.memory_util_mean, 42.0);

  GpuEnergy empty = meter->take();  // take() starts over
  EXPECT_EQ(empty.windows, 0);
  EXPECT_EQ(empty.energy_j, 0.0);
  EXPECT_EQ(empty.samples, 0);
  EXPECT_FALSE(empty.energy_from_counter);
}

TEST(GpuMeter, WithoutACounterPowerSamplesAreIntegrated) {
  ScopedEnv lib("MOEX_NVML_LIBRARY", MOEX_FAKE_NVML);
  ScopedEnv no_energy("FAKE_NVML_NO_ENERGY", "1");
  auto meter = fake_meter();
  ASSERT_NE(meter, nullptr);
  for (int window = 0; window < 3; ++window) {
    meter->begin();
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
    meter->end();
  }
  GpuEnergy energy = meter->take();
  EXPECT_EQ(energy.windows, 3);
  EXPECT_FALSE(energy.energy_from_counter);
  ASSERT_GT(energy.seconds, 0.0);
  // Constant 250 W: the trapezoid over samples that include both ends of each window is exact.
  EXPECT_NEAR(energy.energy_j, 250.0 * energy.seconds, 1e-9 * energy.energy_j);
}

}  // namespace
}  // namespace moex
