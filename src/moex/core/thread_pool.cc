#include "moex/core/thread_pool.h"

#include <algorithm>
#include <chrono>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define MOEX_CPU_RELAX() _mm_pause()
#else
#define MOEX_CPU_RELAX() std::this_thread::yield()
#endif

namespace moex {
namespace {
// A worker spins this long after its last loop before it sleeps: longer than the gap between two
// loops of a decode step (~1 us of host work), short enough to sleep at once otherwise. Spinning
// longer hurts on a shared machine: a spinning worker spends its scheduler share while idle and is
// then preempted when work arrives, where a sleeper is woken straight onto a core. Measured on the
// 2-core CI machine at load average ~7 (bench/cpu, decode vs bandwidth ceiling): 5 us 95-98%,
// 20 us 86-91%, 50 us 87%, 200 us 72-80%, 2 ms 58-62%.
constexpr auto kSpinTime = std::chrono::microseconds(5);
// The caller yields its core after this many idle polls, so a worker that shares it can finish.
constexpr int kCallerPollsBeforeYield = 2000;
}  // namespace

ThreadPool::ThreadPool(int num_threads) {
  if (num_threads <= 0) num_threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  for (int idx = 1; idx < num_threads; ++idx) workers_.emplace_back([this] { worker_loop(); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_.store(true);
    generation_.fetch_add(1);
  }
  wake_.notify_all();
  for (auto& worker : workers_) worker.join();
}

void ThreadPool::run_chunks(uint32_t generation) {
  for (;;) {
    uint64_t cursor = cursor_.load(std::memory_order_acquire);
    if (static_cast<uint32_t>(cursor >> 32) != generation) return;
    // Acquire loads: a field of the next loop is written after parallel_for closes this cursor, so
    // reading one makes the CAS below see the closed cursor and fail.
    const auto* fn = job_.load(std::memory_order_acquire);
    int64_t items = job_items_.load(std::memory_order_acquire);
    int64_t chunk = job_chunk_.load(std::memory_order_acquire);
    int64_t num_chunks = job_num_chunks_.load(std::memory_order_acquire);
    int64_t chunk_idx = static_cast<int64_t>(cursor & 0xffffffffu);
    if (chunk_idx >= num_chunks) return;
    // Succeeds only while this loop's cursor is still open at this chunk, which proves the fields
    // read above belong to this loop.
    if (!cursor_.compare_exchange_weak(cursor, cursor + 1, std::memory_order_acq_rel)) continue;
    int64_t begin = chunk_idx * chunk;
    int64_t end = std::min(items, begin + chunk);
    try {
      (*fn)(begin, end);
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex_);
      if (!error_) error_ = std::current_exception();
    }
    done_chunks_.fetch_add(1, std::memory_order_acq_rel);
  }
}

void ThreadPool::worker_loop() {
  uint32_t seen = 0;
  for (;;) {
    auto spin_start = std::chrono::steady_clock::now();
    for (int polls = 0; generation_.load(std::memory_order_acquire) == seen; ++polls) {
      MOEX_CPU_RELAX();
      if ((polls & 63) == 63 && std::chrono::steady_clock::now() - spin_start > kSpinTime) {
        std::unique_lock<std::mutex> lock(mutex_);
        // seq_cst increment then predicate check, against the caller's seq_cst generation store then
        // sleepers_ load: one of the two sides always sees the other, so no wake-up is lost.
        sleepers_.fetch_add(1);
        wake_.wait(lock, [&] { return generation_.load() != seen || stop_.load(); });
        sleepers_.fetch_sub(1);
        break;
      }
    }
    // The generation first, then stop_: the destructor sets stop_ before it bumps the generation, so a worker
    // that takes the bumped generation as seen also sees stop_. The other order let a worker read stop_ =
    // false, then adopt the destructor's generation and sleep waiting for a change that never came (a hang
    // at pool destruction, seen once in CI).
    seen = generation_.load(std::memory_order_acquire);
    if (stop_.load()) return;
    run_chunks(seen);
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
  uint32_t generation = generation_.load(std::memory_order_relaxed) + 1;
  // Close the previous loop's cursor before its fields change. Its chunks are all claimed, but a
  // worker may still hold its cursor at "chunk num_chunks"; had it read this loop's larger chunk
  // count, its CAS on the open cursor would claim a chunk that belongs to neither loop and run it
  // with a mix of both loops' fields (a segfault seen in CI). The closed cursor carries the new
  // generation, so a stale CAS fails, and an index no loop reaches.
  cursor_.store(static_cast<uint64_t>(generation) << 32 | 0xffffffffu, std::memory_order_seq_cst);
  job_.store(&fn, std::memory_order_release);
  job_items_.store(num_items, std::memory_order_release);
  job_chunk_.store(chunk, std::memory_order_release);
  job_num_chunks_.store(num_chunks, std::memory_order_release);
  error_ = nullptr;
  done_chunks_.store(0, std::memory_order_relaxed);
  cursor_.store(static_cast<uint64_t>(generation) << 32, std::memory_order_release);
  generation_.store(generation);
  if (sleepers_.load() > 0) {
    { std::lock_guard<std::mutex> lock(mutex_); }
    wake_.notify_all();
  }
  run_chunks(generation);
  for (int polls = 0; done_chunks_.load(std::memory_order_acquire) < num_chunks; ++polls) {
    if (polls < kCallerPollsBeforeYield) MOEX_CPU_RELAX();
    else std::this_thread::yield();
  }
  job_.store(nullptr, std::memory_order_relaxed);
  if (error_) std::rethrow_exception(error_);
}

}  // namespace moex
