#include "moex/telemetry/gpu_meter.h"

#include <algorithm>

#include "moex/core/error.h"

namespace moex {

GpuMeter::GpuMeter(std::unique_ptr<NvmlDevice> device, std::chrono::microseconds period)
    : device_(std::move(device)), period_(period) {
  MOEX_ASSERT(device_ != nullptr, "GpuMeter needs an opened NVML device");
  sampler_ = std::thread([this] { sampler_loop(); });
}

GpuMeter::~GpuMeter() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
  }
  wake_.notify_all();
  sampler_.join();
}

GpuMeter::Sample GpuMeter::read() const {
  Sample sample;
  if (auto power = device_->power_w()) sample.power_w = *power;
  if (auto util = device_->utilization()) {
    sample.gpu_util = static_cast<int32_t>(util->gpu);
    sample.memory_util = static_cast<int32_t>(util->memory);
  }
  sample.time = std::chrono::steady_clock::now();
  return sample;
}

void GpuMeter::sampler_loop() {
  std::unique_lock<std::mutex> lock(mutex_);
  for (;;) {
    wake_.wait(lock, [&] { return open_ || stop_; });
    if (stop_) return;
    // One sample per period while the window stays open; NVML is read without the lock so that end() never
    // waits for a slow read.
    if (wake_.wait_for(lock, period_, [&] { return !open_ || stop_; })) continue;
    lock.unlock();
    Sample sample = read();
    lock.lock();
    if (open_) window_samples_.push_back(sample);
  }
}

void GpuMeter::begin() {
  MOEX_ASSERT(!open_, "GpuMeter::begin() with a window already open");
  std::optional<double> energy = device_->total_energy_j();
  Sample first = read();
  {
    std::lock_guard<std::mutex> lock(mutex_);
    window_samples_.assign(1, first);
    energy_start_ = energy;
    window_start_ = first.time;
    open_ = true;
  }
  wake_.notify_all();
}

void GpuMeter::end() {
  MOEX_ASSERT(open_, "GpuMeter::end() without begin()");
  Sample last = read();
  std::optional<double> energy = device_->total_energy_j();
  std::lock_guard<std::mutex> lock(mutex_);
  open_ = false;
  window_samples_.push_back(last);
  std::sort(window_samples_.begin(), window_samples_.end(),
            [](const Sample& a, const Sample& b) { return a.time < b.time; });
  const double seconds = std::chrono::duration<double>(last.time - window_start_).count();
  double energy_j = 0;
  if (energy_start_ && energy && *energy >= *energy_start_) {
    energy_j = *energy - *energy_start_;
    ++counter_windows_;
  } else {
    // No counter (or it went back: a driver reload): the trapezoid over the power samples, which always include
    // the window's two ends.
    for (size_t idx = 1; idx < window_samples_.size(); ++idx) {
      const Sample& a = window_samples_[idx - 1];
      const Sample& b = window_samples_[idx];
      if (a.power_w < 0 || b.power_w < 0) continue;
      energy_j += 0.5 * (a.power_w + b.power_w) * std::chrono::duration<double>(b.time - a.time).count();
    }
  }
  totals_.windows += 1;
  totals_.seconds += seconds;
  totals_.energy_j += energy_j;
  for (const Sample& sample : window_samples_) {
    totals_.samples += 1;
    if (sample.power_w >= 0) {
      power_sum_ += sample.power_w;
      power_count_ += 1;
      totals_.power_w_max = std::max(totals_.power_w_max, sample.power_w);
    }
    if (sample.gpu_util >= 0) {
      gpu_util_sum_ += sample.gpu_util;
      memory_util_sum_ += sample.memory_util;
      util_count_ += 1;
    }
  }
  window_samples_.clear();
}

double GpuMeter::pending_seconds() {
  std::lock_guard<std::mutex> lock(mutex_);
  return totals_.seconds;
}

GpuEnergy GpuMeter::take() {
  std::lock_guard<std::mutex> lock(mutex_);
  GpuEnergy result = totals_;
  result.energy_from_counter = result.windows > 0 && counter_windows_ == result.windows;
  result.power_w_mean = power_count_ ? power_sum_ / power_count_ : 0.0;
  if (util_count_) {
    result.gpu_util_mean = gpu_util_sum_ / util_count_;
    result.memory_util_mean = memory_util_sum_ / util_count_;
  }
  totals_ = GpuEnergy{};
  counter_windows_ = 0;
  power_sum_ = gpu_util_sum_ = memory_util_sum_ = 0;
  power_count_ = util_count_ = 0;
  return result;
}

}  // namespace moex
