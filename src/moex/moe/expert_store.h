// ExpertStore: the tiers an expert's weights move through. The source tier is where the loader left
// them (the checkpoint's mmap = disk, or host RAM for random weights; with --pack-experts the 12-bit packing
// in host RAM, which copies unpack on their way into a slot); the fast tier is a pool of slots
// in the backend's memory (host RAM on the CPU build, GPU memory with CUDA), bounded by a byte budget.
// Every move goes through here and is accounted: bytes, time, loads. The store decides nothing: the
// ExpertCache picks what is resident; the store just fills and frees slots.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "moex/backend/backend.h"
#include "moex/moe/expert_provider.h"

namespace moex {

struct ExpertStoreStats {
  int64_t loads = 0;          // demand loads (whole or split), enqueued by the caller's thread
  int64_t split_loads = 0;    // of which split: only gate/up rows [host_rows, ffn) and down copied
  int64_t prefetch_loads = 0; // copies completed by the prefetch thread
  int64_t prefetch_cancelled = 0;
  int64_t prefetch_taken_over = 0;  // async copies finished by take_over() (counted in prefetch_loads)
  int64_t bytes_moved = 0;
  double load_ms = 0;
};

class ExpertStore {
 public:
  // source[layer][expert]: host views of every expert. describe(key) names an expert in error
  // messages (its tensor names and file). verify: check each expert's weights for NaN/Inf the first
  // time it is read from the source tier, so that a corrupt file is reported, never served.
  ExpertStore(Backend& backend, std::vector<std::vector<ExpertWeights>> source,
              std::function<std::string(ExpertKey)> describe, bool verify);
  ~ExpertStore();

  int32_t num_layers() const { return static_cast<int32_t>(source_.size()); }
  Device backend_device() const { return backend_.device(); }  // where the fast tier's slots live
  int32_t num_experts(int32_t layer_idx) const { return static_cast<int32_t>(source_[layer_idx].size()); }
  // The source-tier (host) views of an expert, for computing it on the CPU without loading it
  // (checked for corruption on first use, like a load).
  const ExpertWeights& source(ExpertKey key);
  // The layer's first expert's source views, for shapes and dtypes only (unverified: not to be read).
  const ExpertWeights& layout(int32_t layer_idx) const { return source_[layer_idx].front(); }
  // Bytes of one expert (gate + up + down) of a layer in the fast tier (a slot: the source dtype, bf16 for a
  // packed source).
  int64_t expert_bytes(int32_t layer_idx) const;
  // Host bytes that reading one of the layer's experts costs, copied or computed on the CPU: expert_bytes, or
  // for a packed source tier its packed size (the layer's mean).
  int64_t host_bytes(int32_t layer_idx) const { return host_bytes_[layer_idx]; }
  // Whether the source tier holds experts in the 12-bit packing (--pack-experts).
  bool packed() const { return !source_.empty() && !source_.front().empty() && source_.front().front().packed; }

  // Copies key's weights into a fast-tier slot (allocating or reusing a freed one) and returns the
  // backend views. The copy is enqueued (Backend::copy_from_host_enqueue): ops that read the views must
  // come after Backend::wait_enqueued_copies(). Throws IoError if the source weights are corrupt.
  ExpertWeights load(ExpertKey key);
  // Like load(), but leaves gate/up rows [0, host_rows) out: the slot gets rows [host_rows, ffn) of gate and
  // up and all of down, for an expert whose first host_rows intermediate rows the host CPU computes from
  // source() while the rest is copied. The views keep the full shapes; their first host_rows rows of gate/up
  // are not filled. Such a slot is not a resident expert: free it once its layer ran.
  ExpertWeights load_split(ExpertKey key, int64_t host_rows);
  // Blocks until every load()/load_split() copy is done and visible to the backend's ops.
  void wait_loads();
  // Rows of gate/up left out of key's slot by load_split() (0 for a whole expert).
  int64_t host_rows(ExpertKey key) const { return host_rows_[index(key)]; }
  // Starts copying key into a slot on the prefetch thread; the copy runs in chunks so that a demand
  // load on the caller's thread is never queued behind it, and cancel() stops it between chunks.
  // The caller keeps the key pinned in its cache until wait() or cancel().
  void load_async(ExpertKey key);
  bool in_flight(ExpertKey key) const;
  // Blocks until key's async copy is done and returns its views; rethrows a copy error.
  ExpertWeights wait(ExpertKey key);
  // True when key's async copy has finished (wait() then returns at once).
  bool ready(ExpertKey key) const;
  // Stops key's async copy (queued or between chunks) and frees its slot.
  void cancel(ExpertKey key);
  // For a wanted async copy still queued or copying: stops it between chunks and enqueues what is left
  // (Backend::copy_from_host_enqueue), so the caller's host work need not wait for it; ops see the views
  // after Backend::wait_enqueued_copies(). Like wait() for a finished copy. Returns the views and the
  // bytes it enqueued in *enqueued_bytes. Rethrows a copy error.
  ExpertWeights take_over(ExpertKey key, int64_t* enqueued_bytes);
  // Returns key's slot to the free list (its views become invalid).
  void free(ExpertKey key);
  // Allocates `count` free slots sized for layer_idx's experts now rather than on first use. A device
  // allocation is a barrier for the streams around it (CUDA: work on two streams does not overlap across a
  // cudaMalloc), so slots allocated while expert copies and compute run would serialize them.
  void reserve_slots(int32_t count, int32_t layer_idx);
  // The resident views of a loaded key.
  const ExpertWeights& resident(ExpertKey key) const;
  bool is_loaded(ExpertKey key) const;

  ExpertStoreStats stats() const;

 private:
  // An expert's gate, up and down side by side in one piece of fast-tier memory: its own allocation
  // (assign_slot, when no free slot is left) or a share of a reserve_slots() block. Three allocations a slot
  // had cost Qwen3-30B-A3B's 9.4 MB experts 27% more device memory than their bytes (cudaMalloc rounds each to
  // 2 MiB), an 8 GiB budget ending at 8.76 GiB held (bench/RESULTS.md).
  struct Slot {
    std::unique_ptr<Buffer> own;
    char* base = nullptr;
    size_t capacity = 0;  // bytes from base
    Device device = Device::kCpu;
  };
  enum class CopyState : uint8_t { kIdle, kQueued, kCopying, kDone, kFailed };
  enum class CopyPath : uint8_t { kEnqueue, kAsync };  // Backend::copy_from_host_enqueue / _async_path
  static int64_t host_bytes_of(const ExpertWeights& w);
  // Host bytes of one row of part (0 gate, 1 up, 2 down) of src: a bf16 row, or a packed row without exceptions.
  static int64_t host_row_bytes(const ExpertWeights& src, int part);
  // Copies rows [row, row + rows) of src's part into the same rows of dst (that part's slot view) on path;
  // returns the host bytes it moved.
  int64_t copy_rows(const ExpertWeights& src, int part, int64_t row, int64_t rows, const TensorView& dst,
                    CopyPath path);
  size_t index(ExpertKey key) const;
  void verify_source(ExpertKey key, const ExpertWeights& weights);
  // Allocates or reuses a slot and sets views_[key] to its (not yet filled) views.
  int32_t assign_slot(ExpertKey key);
  void prefetch_loop();
  // Takes key_idx off the prefetch queue, or stops its running copy between chunks and waits for the thread
  // to let go of it (mutex_ held through lock). The state is then kIdle (partial progress kept) or kDone.
  void stop_async_copy(size_t key_idx, std::unique_lock<std::mutex>& lock);
  // Page-locks the source tier on backends that copy faster from it (CUDA).
  void register_source();

  Backend& backend_;
  std::vector<std::vector<ExpertWeights>> source_;
  std::function<std::string(ExpertKey)> describe_;
  bool verify_;
  std::vector<int32_t> layer_offset_;
  std::vector<int64_t> host_bytes_;     // [layer] host_bytes()
  std::vector<int32_t> slot_of_;        // [key] -> slot index or -1
  std::vector<uint8_t> verified_;       // [key]
  std::vector<ExpertWeights> views_;    // [key] resident views
  std::vector<int64_t> host_rows_;      // [key] gate/up rows not copied (load_split)
  std::vector<Slot> slots_;
  std::vector<std::unique_ptr<Buffer>> slot_blocks_;  // reserve_slots' allocations, each holding several slots
  std::vector<int32_t> free_slots_;
  ExpertStoreStats stats_;

  // Prefetch thread: copies queued keys chunk by chunk; state_ is guarded by mutex_.
  mutable std::mutex mutex_;
  std::condition_variable work_ready_, copy_done_;
  std::deque<size_t> queue_;              // key indices
  std::vector<CopyState> state_;          // [key]
  std::vector<uint8_t> cancel_requested_; // [key]
  std::vector<int64_t> copied_rows_;      // [key] rows an async copy finished, in gate, up, down order
  std::vector<int64_t> copied_bytes_;     // [key] the host bytes of those rows
  std::vector<std::string> copy_error_;   // [key]
  bool stop_ = false;
  std::thread worker_;
};

}  // namespace moex
