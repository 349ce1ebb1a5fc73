#include "moex/core/thread_pool.h"

#include <algorithm>

namespace moex {
namespace {
// ~50 us of spinning before a worker sleeps: longer than the gap between two loops of a decode step.
constexpr int kSpinIterations = 20000;
}  // namespace

ThreadPool::ThreadPool(int num_threads) {
  if (num_threads <= 0) num_threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  for (int idx = 1; idx < num_threads; ++idx) workers_.emplace_back([this, idx] { worker_loop(idx); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
    generation_.fetch_add(1);
  }
  wake_.notify_all();
  for (auto& worker : workers_) worker.join();
}

void ThreadPool::run_chunks() {
  for (;;) {
    int64_t chunk_idx = next_chunk_.fetch_add(1);
    if (chunk_idx >= job_num_chunks_) return;
    int64_t begin = chunk_idx * job_chunk_;
    int64_t end = std::min(job_items_, begin + job_chunk_);
    try {
      (*job_)(begin, end);
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex_);
      if (!error_) error_ = std::current_exception();
    }
  }
}

void ThreadPool::worker_loop(int /*worker_idx*/) {
  uint64_t seen = 0;
  for (;;) {
    int spins = 0;
    while (generation_.load(std::memory_order_acquire) == seen && spins < kSpinIterations) ++spins;
    if (generation_.load(std::memory_order_acquire) == seen) {
      std::unique_lock<std::mutex> lock(mutex_);
      wake_.wait(lock, [&] { return generation_.load() != seen; });
    }
    seen = generation_.load(std::memory_order_acquire);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (stop_) return;
    }
    run_chunks();
    pending_workers_.fetch_sub(1, std::memory_order_acq_rel);
  }
}

void ThreadPool::parallel_for(int64_t num_items, int64_t min_chunk,
                              const std::function<void(int64_t, int64_t)>& fn) {
  if (num_items <= 0) return;
  min_chunk = std::max<int64_t>(1, min_chunk);
  int64_t threads = num_threads();
  // A few chunks per thread balance uneven work without much scheduling overhead.
  int64_t chunk = std::max(min_chunk, (num_items + threads * 4 - 1) / (threads * 4));
  int64_t num_chunks = (num_items + chunk - 1) / chunk;
  if (workers_.empty() || num_chunks == 1) {
    fn(0, num_items);
    return;
  }
  job_ = &fn;
  job_items_ = num_items;
  job_chunk_ = chunk;
  job_num_chunks_ = num_chunks;
  error_ = nullptr;
  next_chunk_.store(0);
  pending_workers_.store(static_cast<int>(workers_.size()));
  {
    std::lock_guard<std::mutex> lock(mutex_);
    generation_.fetch_add(1, std::memory_order_acq_rel);
  }
  wake_.notify_all();
  run_chunks();
  while (pending_workers_.load(std::memory_order_acquire) != 0) {
  }
  job_ = nullptr;
  if (error_) std::rethrow_exception(error_);
}

}  // namespace moex
