#include "moex/backend/cuda/timeline.h"

#include <cstdio>
#include <cstdlib>

namespace moex::cuda {

StreamTimeline::StreamTimeline() {
  if (const char* path = std::getenv("MOEX_CUDA_TIMELINE")) path_ = path;
}

StreamTimeline::~StreamTimeline() {
  for (const Span& span : spans_) {
    cudaEventDestroy(span.start);
    cudaEventDestroy(span.end);
  }
  if (origin_) cudaEventDestroy(origin_);
}

void StreamTimeline::begin(cudaStream_t stream) {
  if (!enabled()) return;
  if (!origin_) {
    cudaEventCreate(&origin_);
    cudaEventRecord(origin_, stream);
  }
  cudaEventCreate(&open_);
  cudaEventRecord(open_, stream);
}

void StreamTimeline::end(cudaStream_t stream, const char* kind, int64_t bytes) {
  if (!enabled() || !open_) return;
  Span span;
  span.start = open_;
  open_ = nullptr;
  cudaEventCreate(&span.end);
  cudaEventRecord(span.end, stream);
  span.kind = kind;
  span.bytes = bytes;
  spans_.push_back(span);
}

void StreamTimeline::write() {
  if (!enabled() || spans_.empty()) return;
  FILE* file = std::fopen(path_.c_str(), "w");
  if (!file) {
    std::fprintf(stderr, "MOEX_CUDA_TIMELINE: cannot write %s\n", path_.c_str());
    return;
  }
  std::fprintf(file, "kind,start_ms,end_ms,bytes\n");
  for (const Span& span : spans_) {
    float start = 0, end = 0;
    cudaEventSynchronize(span.end);
    cudaEventElapsedTime(&start, origin_, span.start);
    cudaEventElapsedTime(&end, origin_, span.end);
    std::fprintf(file, "%s,%.4f,%.4f,%lld\n", span.kind, start, end, static_cast<long long>(span.bytes));
  }
  std::fclose(file);
}

}  // namespace moex::cuda
