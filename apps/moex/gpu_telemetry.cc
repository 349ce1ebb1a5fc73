#include "gpu_telemetry.h"

#include <cstdio>

#include <fmt/format.h>

#include "moex/core/error.h"

namespace moex::cli {

void add_gpu_telemetry_option(CLI::App* sub, std::string* mode) {
  sub->add_option("--gpu-telemetry", *mode,
                  "GPU power, energy per token and utilisation through NVML (libnvidia-ml, loaded at run time; "
                  "$MOEX_NVML_LIBRARY names another path): auto = with --device cuda, where NVML loads; on = "
                  "required (an error where NVML is missing); off")
      ->check(CLI::IsMember({"auto", "on", "off"}))
      ->capture_default_str();
}

std::unique_ptr<GpuMeter> open_gpu_meter(const std::string& mode, const std::string& device, const Backend& backend,
                                         nlohmann::json* about) {
  *about = nullptr;
  if (mode == "off" || (mode == "auto" && device != "cuda")) return nullptr;
  const std::string bus_id = backend.pci_bus_id();
  std::string why;
  auto nvml = NvmlDevice::open(bus_id, &why);
  if (!nvml) {
    if (mode == "on") throw UsageError(fmt::format("--gpu-telemetry on: {}", why));
    std::fprintf(stderr, "moex: no GPU telemetry: %s\n", why.c_str());
    *about = {{"unavailable", why}};
    return nullptr;
  }
  *about = {{"name", nvml->name()}, {"pci_bus_id", bus_id.empty() ? "index 0" : bus_id}};
  return std::make_unique<GpuMeter>(std::move(nvml));
}

nlohmann::json gpu_energy_json(const GpuEnergy& energy, int64_t tokens) {
  auto or_null = [](double value) { return value >= 0 ? nlohmann::json(value) : nlohmann::json(nullptr); };
  return {{"windows", energy.windows},
          {"seconds", energy.seconds},
          {"energy_j", energy.energy_j},
          {"energy_source", energy.energy_from_counter ? "counter" : "power samples"},
          {"joules_per_token", tokens > 0 ? energy.energy_j / tokens : 0.0},
          {"power_w", energy.seconds > 0 ? energy.energy_j / energy.seconds : 0.0},
          {"power_w_sampled_mean", energy.power_w_mean},
          {"power_w_sampled_max", energy.power_w_max},
          {"gpu_util_mean", or_null(energy.gpu_util_mean)},
          {"memory_util_mean", or_null(energy.memory_util_mean)},
          {"samples", energy.samples}};
}

std::string gpu_energy_line(const nlohmann::json& gpu) {
  std::string line = fmt::format("GPU {:.0f} W, {:.4g} J/token", gpu["power_w"].get<double>(),
                                 gpu["joules_per_token"].get<double>());
  if (!gpu["gpu_util_mean"].is_null())
    line += fmt::format(", busy {:.0f}% (memory {:.0f}%)", gpu["gpu_util_mean"].get<double>(),
                        gpu["memory_util_mean"].get<double>());
  if (gpu["energy_source"] != "counter") line += " [energy from power samples]";
  // NVML's power and utilisation are averages over up to a second, and the energy counter moves in steps.
  if (gpu["seconds"].get<double>() < 1.0)
    line += fmt::format(" [measured over {:.2f} s: coarse below ~1 s]", gpu["seconds"].get<double>());
  return line;
}

}  // namespace moex::cli
