#include "moex/telemetry/nvml.h"

#include <cstdlib>

#include <fmt/format.h>

#include "moex/core/shared_library.h"

namespace moex {
namespace {

// NVML's C ABI, declared here so that the build needs no nvml.h (values from NVML's public header).
using nvmlReturn_t = int;
constexpr nvmlReturn_t kNvmlSuccess = 0;
using nvmlDevice_t = void*;
struct NvmlUtilizationRaw {
  unsigned int gpu;
  unsigned int memory;
};

}  // namespace

struct NvmlDevice::Api {
  nvmlReturn_t (*init)();
  nvmlReturn_t (*shutdown)();
  const char* (*error_string)(nvmlReturn_t);
  nvmlReturn_t (*by_index)(unsigned int, nvmlDevice_t*);
  nvmlReturn_t (*by_pci_bus_id)(const char*, nvmlDevice_t*);
  nvmlReturn_t (*get_name)(nvmlDevice_t, char*, unsigned int);
  nvmlReturn_t (*power_usage)(nvmlDevice_t, unsigned int*);                // milliwatts
  nvmlReturn_t (*total_energy)(nvmlDevice_t, unsigned long long*);         // millijoules
  nvmlReturn_t (*utilization_rates)(nvmlDevice_t, NvmlUtilizationRaw*);

  std::string error(nvmlReturn_t code) const {
    const char* text = error_string ? error_string(code) : nullptr;
    return text ? fmt::format("{} (NVML error {})", text, code) : fmt::format("NVML error {}", code);
  }
};

std::string NvmlDevice::library_path() {
  const char* env = std::getenv("MOEX_NVML_LIBRARY");
  return env && *env ? env : "libnvidia-ml.so.1";
}

std::unique_ptr<NvmlDevice> NvmlDevice::open(const std::string& pci_bus_id, std::string* why_not) {
  const std::string path = library_path();
  std::string error;
  std::unique_ptr<SharedLibrary> library = SharedLibrary::open({path}, &error);
  if (!library) {
    *why_not = fmt::format("cannot load {} (the NVIDIA driver's NVML): {}", path, error);
    return nullptr;
  }
  auto api = std::make_unique<Api>();
  std::string missing;
  library->bind(api->init, "nvmlInit_v2", &missing);
  library->bind(api->shutdown, "nvmlShutdown", &missing);
  library->bind(api->error_string, "nvmlErrorString", &missing);
  library->bind(api->by_index, "nvmlDeviceGetHandleByIndex_v2", &missing);
  library->bind(api->by_pci_bus_id, "nvmlDeviceGetHandleByPciBusId_v2", &missing);
  library->bind(api->get_name, "nvmlDeviceGetName", &missing);
  library->bind(api->power_usage, "nvmlDeviceGetPowerUsage", &missing);
  library->bind(api->total_energy, "nvmlDeviceGetTotalEnergyConsumption", &missing);
  library->bind(api->utilization_rates, "nvmlDeviceGetUtilizationRates", &missing);
  if (!missing.empty()) {
    *why_not = fmt::format("{} has no {}: not NVML, or one too old", path, missing);
    return nullptr;
  }
  if (nvmlReturn_t rc = api->init(); rc != kNvmlSuccess) {
    *why_not = fmt::format("nvmlInit failed: {}", api->error(rc));
    return nullptr;
  }
  nvmlDevice_t device = nullptr;
  nvmlReturn_t rc = pci_bus_id.empty() ? api->by_index(0, &device) : api->by_pci_bus_id(pci_bus_id.c_str(), &device);
  if (rc != kNvmlSuccess) {
    *why_not = fmt::format("NVML has no device {}: {}", pci_bus_id.empty() ? "0" : pci_bus_id, api->error(rc));
    api->shutdown();
    return nullptr;
  }
  char name[96] = {};
  std::string device_name = api->get_name(device, name, sizeof(name)) == kNvmlSuccess ? name : "unknown GPU";
  return std::unique_ptr<NvmlDevice>(
      new NvmlDevice(std::move(library), std::move(api), device, std::move(device_name)));
}

NvmlDevice::NvmlDevice(std::unique_ptr<SharedLibrary> library, std::unique_ptr<Api> api, void* device,
                       std::string name)
    : library_(std::move(library)), api_(std::move(api)), device_(device), name_(std::move(name)) {}

NvmlDevice::~NvmlDevice() { api_->shutdown(); }  // then library_ closes

std::optional<double> NvmlDevice::power_w() const {
  unsigned int milliwatts = 0;
  if (api_->power_usage(device_, &milliwatts) != kNvmlSuccess) return std::nullopt;
  return milliwatts / 1000.0;
}

std::optional<double> NvmlDevice::total_energy_j() const {
  unsigned long long millijoules = 0;
  if (api_->total_energy(device_, &millijoules) != kNvmlSuccess) return std::nullopt;
  return static_cast<double>(millijoules) / 1000.0;
}

std::optional<GpuUtilization> NvmlDevice::utilization() const {
  NvmlUtilizationRaw raw{};
  if (api_->utilization_rates(device_, &raw) != kNvmlSuccess) return std::nullopt;
  return GpuUtilization{raw.gpu, raw.memory};
}

}  // namespace moex
