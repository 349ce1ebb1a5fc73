// Power, energy and utilisation of one GPU over measured windows (a benchmark's timed repetitions, one
// generation), through NVML. Energy comes from the board's total-energy counter where it has one (Volta and
// newer), else from the power samples integrated over the window; a sampler thread reads power and utilisation
// every `period` while a window is open, and begin()/end() take one sample each, so every window has two.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include "moex/telemetry/nvml.h"

namespace moex {

struct GpuEnergy {
  int64_t windows = 0;
  double seconds = 0;  // the windows' lengths, summed
  double energy_j = 0;
  bool energy_from_counter = false;  // every window read the energy counter (else power samples, integrated)
  // NVML's power readings during the windows (on Ampere and newer each is an average over the last second, so
  // energy_j / seconds is the window's own figure).
  double power_w_mean = 0;
  double power_w_max = 0;
  double gpu_util_mean = -1;  // percent, mean of NVML's utilisation samples; < 0: none reported
  double memory_util_mean = -1;
  int64_t samples = 0;
};

class GpuMeter {
 public:
  explicit GpuMeter(std::unique_ptr<NvmlDevice> device,
                    std::chrono::microseconds period = std::chrono::milliseconds(20));
  ~GpuMeter();
  GpuMeter(const GpuMeter&) = delete;
  GpuMeter& operator=(const GpuMeter&) = delete;

  const NvmlDevice& device() const { return *device_; }

  // Opens and closes a window. Call begin() before a timed region starts and end() after it is synchronised: the
  // NVML reads they make are not free (tens of microseconds to a millisecond).
  void begin();
  void end();
  // The windows closed since the last take(); starts over.
  GpuEnergy take();
  // Summed length of the windows closed since the last take() (to meter until a phase has run long enough).
  double pending_seconds();

 private:
  struct Sample {
    std::chrono::steady_clock::time_point time;
    double power_w = -1;  // < 0: not reported
    int32_t gpu_util = -1;
    int32_t memory_util = -1;
  };

  Sample read() const;
  void sampler_loop();
  void close_window();

  std::unique_ptr<NvmlDevice> device_;
  std::chrono::microseconds period_;
  std::thread sampler_;
  std::mutex mutex_;
  std::condition_variable wake_;
  bool open_ = false;
  bool stop_ = false;
  // The open window.
  std::chrono::steady_clock::time_point window_start_;
  std::optional<double> energy_start_;
  std::vector<Sample> window_samples_;
  // Closed windows since take().
  GpuEnergy totals_;
  double power_sum_ = 0, gpu_util_sum_ = 0, memory_util_sum_ = 0;
  int64_t power_count_ = 0, util_count_ = 0;
  int64_t counter_windows_ = 0;  // closed windows whose energy came from the counter
};

}  // namespace moex
