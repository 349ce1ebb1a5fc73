// CUDA graphs of decode steps, one per key: a single-token step's context-length bucket, a batched step's batch
// size and bucket (the caller's step_graph_key). The first step of a key runs eagerly (it grows every workspace to
// the step's size), the second is captured and launched, later ones replay. A capture that fails (an op that must
// synchronise, a shape outside the device-side paths) marks the key eager for good; the step is then run eagerly,
// so a failure costs time, never a result.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <functional>
#include <map>

namespace moex::cuda {

class StepGraphs {
 public:
  StepGraphs() = default;
  ~StepGraphs();
  StepGraphs(const StepGraphs&) = delete;
  StepGraphs& operator=(const StepGraphs&) = delete;

  // Runs (or replays) ops on stream for key. *capturing is true while ops() is being recorded. before_eager
  // (may be empty) runs before ops() runs eagerly, never before a recording is launched.
  void run(int64_t key, cudaStream_t stream, const std::function<void()>& ops, bool* capturing,
           const std::function<void()>& before_eager = {});
  // Drops every recording (a buffer the steps use moved).
  void reset();

  int64_t replays() const { return replays_; }
  int64_t captures() const { return captures_; }
  int64_t failures() const { return failures_; }

 private:
  struct Entry {
    cudaGraphExec_t exec = nullptr;
    bool warm = false;
    bool failed = false;
  };
  // Records ops() into a graph and launches it; null (and the stream back to normal) when capture failed.
  cudaGraphExec_t capture(cudaStream_t stream, const std::function<void()>& ops, bool* capturing);

  std::map<int64_t, Entry> entries_;
  int64_t replays_ = 0, captures_ = 0, failures_ = 0;
};

}  // namespace moex::cuda
