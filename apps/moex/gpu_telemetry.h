// --gpu-telemetry for the subcommands that run a model: GPU power, energy per token and utilisation through
// NVML (moex/telemetry), reported next to the timings in the text and in --json.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "moex/backend/backend.h"
#include "moex/telemetry/gpu_meter.h"

namespace moex::cli {

// Declares --gpu-telemetry auto|on|off on sub (auto: on with --device cuda).
void add_gpu_telemetry_option(CLI::App* sub, std::string* mode);

// The meter of the backend's GPU (index 0 for a backend without one, with `on`), or nullptr: off, auto on the
// CPU, or NVML unavailable. In the last case `on` throws UsageError with the reason and `auto` warns once on
// stderr. *about gets the device ({"name", "pci_bus_id"}) or {"unavailable": reason}; null when not asked for.
std::unique_ptr<GpuMeter> open_gpu_meter(const std::string& mode, const std::string& device, const Backend& backend,
                                         nlohmann::json* about);

// One phase's figures; tokens: what the phase's windows produced or consumed, for joules per token.
nlohmann::json gpu_energy_json(const GpuEnergy& energy, int64_t tokens);
// "GPU 312 W (max 330), 0.215 J/token, busy 97% (memory 80%)": gpu_energy_json's object as a line of text.
std::string gpu_energy_line(const nlohmann::json& gpu);

}  // namespace moex::cli
