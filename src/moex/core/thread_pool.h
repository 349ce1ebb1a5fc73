// A fixed pool of worker threads for data-parallel loops. The caller takes part in every loop, so
// a pool of N threads uses N-1 workers plus the caller. Workers spin briefly before sleeping: a
// decode step issues hundreds of short loops, and a futex wake per loop would cost more than the work.
// A loop ends when its chunks are done, not when every worker has checked in: on a busy machine a
// descheduled worker must not stall the caller (chunks are claimed with a generation-tagged CAS, so
// a late worker can never run a chunk of a loop it did not see start).
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace moex {

class ThreadPool {
 public:
  // num_threads <= 0: one per hardware thread.
  explicit ThreadPool(int num_threads = 0);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int num_threads() const { return static_cast<int>(workers_.size()) + 1; }

  // Splits [0, num_items) into contiguous chunks of at least min_chunk items, one call of
  // fn(begin, end) per chunk, spread over the threads. Blocks until all chunks are done; the first
  // exception thrown by fn is rethrown here. Not reentrant: fn must not call parallel_for.
  void parallel_for(int64_t num_items, int64_t min_chunk, const std::function<void(int64_t, int64_t)>& fn);

 private:
  void worker_loop();
  // Claims and runs chunks of loop `generation` until none is left or a newer loop has started.
  void run_chunks(uint32_t generation);

  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::atomic<uint32_t> generation_{0};  // the latest loop; workers wait for it to change
  std::atomic<uint64_t> cursor_{0};      // generation << 32 | index of the next unclaimed chunk
  std::atomic<int64_t> done_chunks_{0};
  std::atomic<int> sleepers_{0};
  std::atomic<bool> stop_{false};
  // The current loop; read by workers only between loading a cursor of its generation and the CAS
  // that validates it. parallel_for closes the old cursor before rewriting them, so a stale read
  // always fails that CAS.
  std::atomic<const std::function<void(int64_t, int64_t)>*> job_{nullptr};
  std::atomic<int64_t> job_items_{0};
  std::atomic<int64_t> job_chunk_{0};
  std::atomic<int64_t> job_num_chunks_{0};
  std::mutex error_mutex_;
  std::exception_ptr error_;
};

}  // namespace moex
