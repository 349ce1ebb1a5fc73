// A diagnostic timeline of the CUDA backend's streams: when MOEX_CUDA_TIMELINE names a file, spans of work
// (expert copies on the copy stream; expert computation, attention, dense GEMMs, routing and read-backs on the
// compute stream) are bracketed
// by timing events and written there as CSV (kind,start_ms,end_ms,bytes) when the backend is destroyed. It
// answers where a step's time goes between the link and the device, e.g. whether expert copies overlap the
// compute they feed. Off (no events, no cost) without the variable.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>
#include <vector>

namespace moex::cuda {

class StreamTimeline {
 public:
  StreamTimeline();  // reads MOEX_CUDA_TIMELINE
  ~StreamTimeline();
  StreamTimeline(const StreamTimeline&) = delete;
  StreamTimeline& operator=(const StreamTimeline&) = delete;

  bool enabled() const { return !path_.empty(); }
  // Brackets work enqueued on stream between begin() and end(); kind names it in the file.
  void begin(cudaStream_t stream);
  void end(cudaStream_t stream, const char* kind, int64_t bytes = 0);
  // Resolves the events (the streams must be idle) and writes the file.
  void write();

 private:
  struct Span {
    cudaEvent_t start = nullptr, end = nullptr;
    const char* kind = "";
    int64_t bytes = 0;
  };
  std::string path_;
  cudaEvent_t origin_ = nullptr;
  cudaEvent_t open_ = nullptr;  // the begin() awaiting its end()
  std::vector<Span> spans_;
};

}  // namespace moex::cuda
