// A kernel timeline for moex (or any CUDA program) on machines without Nsight Systems: a CUDA injection
// library that records every kernel's start and end through CUPTI's activity API and writes them as CSV at
// exit. Unlike Nsight Compute it does not serialise kernels, so kernels launched with programmatic dependent
// launch and inside CUDA graphs keep their overlap; that overlap is what decides a batch-1 decode step.
//
//   CUDA_INJECTION64_PATH=libmoex_kernel_trace.so MOEX_KERNEL_TRACE=trace.csv moex bench ...
//   python3 tools/kernel_trace.py trace.csv       # each kernel's share of the decode step's critical path
//
// Columns: start_ns, end_ns, correlation (shared by the kernels of one graph launch), graph_id, stream,
// grid (x*y*z blocks), block (threads), dynamic shared bytes, registers, name (demangled).
#include <cupti.h>
#include <cxxabi.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

namespace {

struct Record {
  uint64_t start, end;
  uint32_t correlation, graph_id, stream;
  int64_t grid;
  int32_t block, shared;
  uint16_t registers;
  std::string name;
};

std::mutex g_mutex;
std::vector<Record> g_records;
size_t g_dropped = 0;

constexpr size_t kBufferBytes = 8u << 20;

void CUPTIAPI buffer_requested(uint8_t** buffer, size_t* size, size_t* max_records) {
  *size = kBufferBytes;
  *buffer = static_cast<uint8_t*>(std::aligned_alloc(8, kBufferBytes));
  *max_records = 0;
}

std::string demangle(const char* mangled) {
  if (!mangled) return "?";
  int status = 0;
  char* plain = abi::__cxa_demangle(mangled, nullptr, nullptr, &status);
  std::string name = status == 0 && plain ? plain : mangled;
  std::free(plain);
  // The parameter list says nothing the template arguments do not: cut at the '(' matching the final ')' (names
  // hold parentheses of their own: "(anonymous namespace)"), and the return type.
  if (!name.empty() && name.back() == ')') {
    int depth = 0;
    for (size_t i = name.size(); i-- > 0;) {
      depth += name[i] == ')' ? 1 : name[i] == '(' ? -1 : 0;
      if (depth == 0) {
        name.resize(i);
        break;
      }
    }
  }
  if (name.rfind("void ", 0) == 0) name.erase(0, 5);
  for (char& c : name)  // commas would split the CSV field
    if (c == ',') c = ';';
  return name;
}

void CUPTIAPI buffer_completed(CUcontext, uint32_t, uint8_t* buffer, size_t, size_t valid) {
  CUpti_Activity* record = nullptr;
  std::vector<Record> batch;
  while (cuptiActivityGetNextRecord(buffer, valid, &record) == CUPTI_SUCCESS) {
    if (record->kind != CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL && record->kind != CUPTI_ACTIVITY_KIND_KERNEL) continue;
    const auto* k = reinterpret_cast<const CUpti_ActivityKernel10*>(record);
    batch.push_back(Record{k->start, k->end, k->correlationId, k->graphId, k->streamId,
                           int64_t(k->gridX) * k->gridY * k->gridZ, k->blockX * k->blockY * k->blockZ,
                           k->dynamicSharedMemory, k->registersPerThread, demangle(k->name)});
  }
  size_t dropped = 0;
  cuptiActivityGetNumDroppedRecords(nullptr, 0, &dropped);
  std::free(buffer);
  std::lock_guard<std::mutex> lock(g_mutex);
  g_dropped += dropped;
  for (auto& r : batch) g_records.push_back(std::move(r));
}

void write_trace() {
  cuptiActivityFlushAll(1);
  const char* path = std::getenv("MOEX_KERNEL_TRACE");
  if (!path) path = "kernel_trace.csv";
  std::lock_guard<std::mutex> lock(g_mutex);
  FILE* f = std::fopen(path, "w");
  if (!f) {
    std::fprintf(stderr, "kernel_trace: cannot write %s\n", path);
    return;
  }
  std::fprintf(f, "start_ns,end_ns,correlation,graph_id,stream,grid,block,shared,registers,name\n");
  for (const Record& r : g_records)
    std::fprintf(f, "%llu,%llu,%u,%u,%u,%lld,%d,%d,%u,%s\n", static_cast<unsigned long long>(r.start),
                 static_cast<unsigned long long>(r.end), r.correlation, r.graph_id, r.stream,
                 static_cast<long long>(r.grid), r.block, r.shared, r.registers, r.name.c_str());
  std::fclose(f);
  std::fprintf(stderr, "kernel_trace: %zu kernels (%zu dropped) -> %s\n", g_records.size(), g_dropped, path);
}

bool check(CUptiResult result, const char* what) {
  if (result == CUPTI_SUCCESS) return true;
  const char* text = nullptr;
  cuptiGetResultString(result, &text);
  std::fprintf(stderr, "kernel_trace: %s failed: %s\n", what, text ? text : "?");
  return false;
}

}  // namespace

// Called by the CUDA driver when CUDA_INJECTION64_PATH names this library (before the first context).
extern "C" int InitializeInjection() {
  if (!check(cuptiActivityRegisterCallbacks(buffer_requested, buffer_completed), "cuptiActivityRegisterCallbacks"))
    return 0;
  // CONCURRENT_KERNEL: records without serialising kernels (KIND_KERNEL would serialise them).
  if (!check(cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL), "cuptiActivityEnable")) return 0;
  std::atexit(write_trace);
  return 1;
}
