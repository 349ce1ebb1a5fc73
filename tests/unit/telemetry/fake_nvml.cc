// A stand-in for libnvidia-ml with fixed readings, loaded by the telemetry tests through MOEX_NVML_LIBRARY:
// power 250 W, utilisation 87% / 42%, an energy counter that advances 1.5 J per read, one device at index 0 or
// PCI bus id 0000:3B:00.0. FAKE_NVML_INIT_ERROR=N makes nvmlInit_v2 return N; FAKE_NVML_NO_ENERGY=1 makes the
// energy counter unsupported (as on boards before Volta).
#include <cstdlib>
#include <cstring>

namespace {
int g_device_token = 0;  // the handle's target
unsigned long long g_energy_mj = 1000000;
bool env_set(const char* name) {
  const char* value = std::getenv(name);
  return value && *value && std::strcmp(value, "0") != 0;
}
}  // namespace

extern "C" {
struct FakeUtilization {
  unsigned int gpu;
  unsigned int memory;
};

int nvmlInit_v2() {
  const char* error = std::getenv("FAKE_NVML_INIT_ERROR");
  return error && *error ? std::atoi(error) : 0;
}
int nvmlShutdown() { return 0; }
const char* nvmlErrorString(int code) { return code == 6 ? "Not Found" : "fake error"; }
int nvmlDeviceGetHandleByIndex_v2(unsigned int index, void** device) {
  if (index != 0) return 6;
  *device = &g_device_token;
  return 0;
}
int nvmlDeviceGetHandleByPciBusId_v2(const char* bus_id, void** device) {
  if (std::strcmp(bus_id, "0000:3B:00.0") != 0) return 6;
  *device = &g_device_token;
  return 0;
}
int nvmlDeviceGetName(void* device, char* name, unsigned int length) {
  if (device != &g_device_token) return 2;
  std::strncpy(name, "Fake GPU", length - 1);
  return 0;
}
int nvmlDeviceGetPowerUsage(void* device, unsigned int* milliwatts) {
  if (device != &g_device_token) return 2;
  *milliwatts = 250000;
  return 0;
}
int nvmlDeviceGetTotalEnergyConsumption(void* device, unsigned long long* millijoules) {
  if (device != &g_device_token) return 2;
  if (env_set("FAKE_NVML_NO_ENERGY")) return 3;  // NVML_ERROR_NOT_SUPPORTED
  *millijoules = g_energy_mj;
  g_energy_mj += 1500;
  return 0;
}
int nvmlDeviceGetUtilizationRates(void* device, FakeUtilization* rates) {
  if (device != &g_device_token) return 2;
  rates->gpu = 87;
  rates->memory = 42;
  return 0;
}
}
