// NVML (the NVIDIA driver's management library), loaded at run time with dlopen: moex builds without it and
// runs where it is missing; then open() says why and telemetry reports nothing instead of failing the command.
// Only what GpuMeter needs is bound: power, the total-energy counter, utilisation rates and the device name.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>

namespace moex {

class SharedLibrary;

// NVML's utilisation rates: percent of the driver's last sample period (1/6 s to 1 s by GPU) during which a
// kernel ran (gpu) and device memory was read or written (memory).
struct GpuUtilization {
  uint32_t gpu = 0;
  uint32_t memory = 0;
};

class NvmlDevice {
 public:
  // The library's path: $MOEX_NVML_LIBRARY when set (a driver installed outside the loader's path, or a
  // test's stand-in), else libnvidia-ml.so.1 from the loader's path.
  static std::string library_path();

  // Loads the library, initialises NVML and opens one device: by PCI bus id ("00000000:3B:00.0", what the CUDA
  // backend reports) when given, else index 0. nullptr, with *why_not set to a one-line reason, where any step
  // fails (no library, a library without NVML's symbols, nvmlInit failing, no such device).
  static std::unique_ptr<NvmlDevice> open(const std::string& pci_bus_id, std::string* why_not);

  ~NvmlDevice();
  NvmlDevice(const NvmlDevice&) = delete;
  NvmlDevice& operator=(const NvmlDevice&) = delete;

  const std::string& name() const { return name_; }
  // Board power draw in watts; nullopt where the board does not report it.
  std::optional<double> power_w() const;
  // Energy the board used since the driver loaded, in joules (Volta and newer); nullopt where unsupported.
  std::optional<double> total_energy_j() const;
  std::optional<GpuUtilization> utilization() const;

 private:
  struct Api;
  NvmlDevice(std::unique_ptr<SharedLibrary> library, std::unique_ptr<Api> api, void* device, std::string name);

  std::unique_ptr<SharedLibrary> library_;  // closed after the destructor's nvmlShutdown
  std::unique_ptr<Api> api_;
  void* device_ = nullptr;  // nvmlDevice_t
  std::string name_;
};

}  // namespace moex
