#include "moex/backend/cuda/step_graphs.h"

#include "moex/backend/cuda/cuda_check.h"

namespace moex::cuda {

StepGraphs::~StepGraphs() { reset(); }

void StepGraphs::reset() {
  for (auto& [key, entry] : entries_)
    if (entry.exec) cudaGraphExecDestroy(entry.exec);
  entries_.clear();
}

void StepGraphs::run(int64_t key, cudaStream_t stream, const std::function<void()>& ops, bool* capturing,
                     const std::function<void()>& before_eager) {
  auto it = entries_.find(key);
  if (it != entries_.end() && it->second.exec) {
    MOEX_CUDA_CHECK(cudaGraphLaunch(it->second.exec, stream));
    ++replays_;
    return;
  }
  if (it == entries_.end() || !it->second.warm || it->second.failed) {
    if (before_eager) before_eager();
    ops();  // may reset() (a workspace grew): look the entry up again
    entries_[key].warm = true;
    return;
  }
  cudaGraphExec_t exec = capture(stream, ops, capturing);
  Entry& entry = entries_[key];
  if (exec) {
    entry.exec = exec;
    ++captures_;
    return;
  }
  entry.failed = true;
  ++failures_;
  if (before_eager) before_eager();
  ops();
}

cudaGraphExec_t StepGraphs::capture(cudaStream_t stream, const std::function<void()>& ops, bool* capturing) {
  // Thread-local mode: the expert prefetch thread's copies on another stream stay legal meanwhile.
  if (cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal) != cudaSuccess) {
    cudaGetLastError();
    return nullptr;
  }
  bool ok = true;
  *capturing = true;
  try {
    ops();
  } catch (const std::exception&) {
    ok = false;  // the ops refused to be recorded; the caller reruns them eagerly
  }
  *capturing = false;
  cudaGraph_t graph = nullptr;
  cudaError_t status = cudaStreamEndCapture(stream, &graph);
  cudaGraphExec_t exec = nullptr;
  if (ok && status == cudaSuccess && graph) status = cudaGraphInstantiate(&exec, graph, 0);
  if (graph) cudaGraphDestroy(graph);
  if (!ok || status != cudaSuccess || !exec) {
    cudaGetLastError();
    if (exec) cudaGraphExecDestroy(exec);
    return nullptr;
  }
  MOEX_CUDA_CHECK(cudaGraphLaunch(exec, stream));
  return exec;
}

}  // namespace moex::cuda
