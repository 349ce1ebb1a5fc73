#include "moex/moe/expert_store.h"

#include <chrono>
#include <algorithm>
#include <cstring>

#include "moex/core/error.h"

namespace moex {
namespace {

// True when any element is NaN or +-Inf (all exponent bits set), read straight from the bits.
bool has_non_finite(const TensorView& view) {
  const int64_t numel = view.numel();
  switch (view.dtype) {
    case DType::kBF16: {
      const uint16_t* bits = view.as<uint16_t>();
      uint16_t any = 0;
      for (int64_t idx = 0; idx < numel; ++idx) any |= static_cast<uint16_t>((bits[idx] & 0x7f80u) == 0x7f80u);
      return any != 0;
    }
    case DType::kF16: {
      const uint16_t* bits = view.as<uint16_t>();
      uint16_t any = 0;
      for (int64_t idx = 0; idx < numel; ++idx) any |= static_cast<uint16_t>((bits[idx] & 0x7c00u) == 0x7c00u);
      return any != 0;
    }
    case DType::kF32: {
      const uint32_t* bits = view.as<uint32_t>();
      uint32_t any = 0;
      for (int64_t idx = 0; idx < numel; ++idx) any |= static_cast<uint32_t>((bits[idx] & 0x7f800000u) == 0x7f800000u);
      return any != 0;
    }
    case DType::kI32:
    case DType::kI64: return false;
  }
  return false;
}

}  // namespace

ExpertStore::ExpertStore(Backend& backend, std::vector<std::vector<ExpertWeights>> source,
                         std::function<std::string(ExpertKey)> describe, bool verify)
    : backend_(backend), source_(std::move(source)), describe_(std::move(describe)), verify_(verify) {
  int32_t total = 0;
  for (const auto& layer : source_) {
    layer_offset_.push_back(total);
    total += static_cast<int32_t>(layer.size());
  }
  for (const auto& layer : source_) {
    int64_t bytes = 0;
    for (const ExpertWeights& expert : layer) bytes += host_bytes_of(expert);
    host_bytes_.push_back(layer.empty() ? 0 : bytes / static_cast<int64_t>(layer.size()));
  }
  slot_of_.assign(total, -1);
  verified_.assign(total, 0);
  views_.resize(total);
  host_rows_.assign(total, 0);
  state_.assign(total, CopyState::kIdle);
  cancel_requested_.assign(total, 0);
  copied_rows_.assign(total, 0);
  copied_bytes_.assign(total, 0);
  copy_error_.resize(total);
  if (backend_.device() != Device::kCpu) register_source();
}

void ExpertStore::register_source() {
  // Whole pages around every source tensor, merged where they touch: tensors of one safetensors file
  // share pages, and a page can be page-locked only once.
  constexpr uintptr_t kPage = 4096;
  std::vector<std::pair<uintptr_t, uintptr_t>> ranges;
  auto add = [&](const void* data, size_t bytes) {
    if (bytes == 0) return;
    const auto begin = reinterpret_cast<uintptr_t>(data);
    ranges.emplace_back(begin & ~(kPage - 1), (begin + bytes + kPage - 1) & ~(kPage - 1));
  };
  for (const auto& layer : source_)
    for (const ExpertWeights& expert : layer) {
      if (!expert.packed) {
        for (const TensorView* view : {&expert.gate, &expert.up, &expert.down}) add(view->data, view->nbytes());
        continue;
      }
      for (const PackedBf16* m : {&expert.packed->gate, &expert.packed->up, &expert.packed->down}) {
        add(m->lo.data(), m->lo.size());
        add(m->codes.data(), m->codes.size());
        add(m->exc_begin.data(), 4 * m->exc_begin.size());
        add(m->exc_col.data(), 4 * m->exc_col.size());
        add(m->exc_value.data(), 2 * m->exc_value.size());
      }
    }
  std::sort(ranges.begin(), ranges.end());
  std::vector<std::pair<uintptr_t, uintptr_t>> merged;
  for (const auto& range : ranges) {
    if (!merged.empty() && range.first <= merged.back().second) merged.back().second = std::max(merged.back().second, range.second);
    else merged.push_back(range);
  }
  for (const auto& [begin, end] : merged) backend_.register_host_memory(reinterpret_cast<const void*>(begin), end - begin);
}

ExpertStore::~ExpertStore() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
  }
  work_ready_.notify_all();
  if (worker_.joinable()) worker_.join();
}

size_t ExpertStore::index(ExpertKey key) const {
  MOEX_ASSERT(key.layer_idx >= 0 && key.layer_idx < num_layers() && key.expert_idx >= 0 &&
                  key.expert_idx < num_experts(key.layer_idx),
              "expert ({}, {}) out of range", key.layer_idx, key.expert_idx);
  return static_cast<size_t>(layer_offset_[key.layer_idx] + key.expert_idx);
}

int64_t ExpertStore::expert_bytes(int32_t layer_idx) const {
  const ExpertWeights& w = source_[layer_idx].front();
  return static_cast<int64_t>(w.gate.nbytes() + w.up.nbytes() + w.down.nbytes());
}

int64_t ExpertStore::host_bytes_of(const ExpertWeights& w) {
  if (w.packed) return w.packed->bytes();
  return static_cast<int64_t>(w.gate.nbytes() + w.up.nbytes() + w.down.nbytes());
}

bool ExpertStore::is_loaded(ExpertKey key) const { return slot_of_[index(key)] >= 0; }

const ExpertWeights& ExpertStore::resident(ExpertKey key) const {
  MOEX_ASSERT(is_loaded(key), "expert ({}, {}) is not loaded", key.layer_idx, key.expert_idx);
  return views_[index(key)];
}

void ExpertStore::verify_source(ExpertKey key, const ExpertWeights& weights) {
  if (weights.packed) {
    for (const PackedBf16* m : {&weights.packed->gate, &weights.packed->up, &weights.packed->down}) {
      const std::string error = packed_bf16_error(*m);
      if (!error.empty())
        throw IoError(fmt::format("{}: packed expert weights are corrupt ({}), so the expert is not served",
                                  describe_(key), error));
      if (packed_bf16_has_non_finite(*m))
        throw IoError(fmt::format("{}: expert weights contain NaN or Inf values; the file is corrupt, so the "
                                  "expert is not served",
                                  describe_(key)));
    }
    return;
  }
  for (const TensorView* view : {&weights.gate, &weights.up, &weights.down})
    if (has_non_finite(*view))
      throw IoError(fmt::format("{}: expert weights contain NaN or Inf values; the file is corrupt, so the expert "
                                "is not served",
                                describe_(key)));
}

namespace {
// Byte offsets of up and down in a slot and its size: each tensor starts 256-byte aligned (the kernels' vector
// loads, and what a separate allocation gave them).
struct SlotLayout {
  size_t up, down, total;
};
SlotLayout slot_layout(const ExpertWeights& w) {
  auto aligned = [](size_t bytes) { return (bytes + 255) / 256 * 256; };
  const size_t up = aligned(w.gate.nbytes()), down = up + aligned(w.up.nbytes());
  return {up, down, down + aligned(w.down.nbytes())};
}
}  // namespace

int32_t ExpertStore::assign_slot(ExpertKey key) {
  const size_t key_idx = index(key);
  const ExpertWeights& src = source_[key.layer_idx][key.expert_idx];
  int32_t slot_idx;
  if (!free_slots_.empty()) {
    slot_idx = free_slots_.back();
    free_slots_.pop_back();
  } else {
    slot_idx = static_cast<int32_t>(slots_.size());
    slots_.emplace_back();
  }
  Slot& slot = slots_[slot_idx];
  // Slots are sized for the largest expert they held; layers of one model share expert shapes.
  const SlotLayout layout = slot_layout(src);
  if (slot.capacity < layout.total) {
    slot.own = backend_.alloc(DType::kF32, Shape{1, static_cast<int64_t>(layout.total / sizeof(float))});
    slot.base = static_cast<char*>(slot.own->view.data);
    slot.capacity = layout.total;
    slot.device = slot.own->view.device;
  }
  auto at = [&](size_t offset, const TensorView& from) {
    return TensorView(slot.base + offset, from.dtype, from.shape, slot.device);
  };
  ExpertWeights& view = views_[key_idx];
  view.gate = at(0, src.gate);
  view.up = at(layout.up, src.up);
  view.down = at(layout.down, src.down);
  slot_of_[key_idx] = slot_idx;
  return slot_idx;
}

const ExpertWeights& ExpertStore::source(ExpertKey key) {
  const size_t key_idx = index(key);
  const ExpertWeights& src = source_[key.layer_idx][key.expert_idx];
  if (verify_ && !verified_[key_idx]) {
    verify_source(key, src);
    verified_[key_idx] = 1;
  }
  return src;
}

ExpertWeights ExpertStore::load(ExpertKey key) { return load_split(key, 0); }

ExpertWeights ExpertStore::load_split(ExpertKey key, int64_t host_rows) {
  const size_t key_idx = index(key);
  MOEX_ASSERT(slot_of_[key_idx] < 0, "expert ({}, {}) loaded twice", key.layer_idx, key.expert_idx);
  const ExpertWeights& src = source_[key.layer_idx][key.expert_idx];
  const int64_t ffn = src.gate.dim(0);
  MOEX_ASSERT(host_rows >= 0 && host_rows <= ffn, "expert ({}, {}): {} host rows of {}", key.layer_idx,
              key.expert_idx, host_rows, ffn);
  auto start = std::chrono::steady_clock::now();
  if (verify_ && !verified_[key_idx]) {
    verify_source(key, src);
    verified_[key_idx] = 1;
  }
  assign_slot(key);
  host_rows_[key_idx] = host_rows;
  const ExpertWeights& view = views_[key_idx];
  int64_t bytes = 0;
  if (host_rows < ffn) {
    bytes += copy_rows(src, 0, host_rows, ffn - host_rows, view.gate, CopyPath::kEnqueue);
    bytes += copy_rows(src, 1, host_rows, ffn - host_rows, view.up, CopyPath::kEnqueue);
  }
  bytes += copy_rows(src, 2, 0, src.down.dim(0), view.down, CopyPath::kEnqueue);
  std::lock_guard<std::mutex> lock(mutex_);  // the prefetch thread updates stats_ too
  stats_.loads += 1;
  stats_.split_loads += host_rows > 0 ? 1 : 0;
  stats_.bytes_moved += bytes;
  // Enqueueing time only: the wait for the copy is the decoder's, accounted as stall by the provider.
  stats_.load_ms += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  return view;
}

namespace {
const TensorView& part_view(const ExpertWeights& w, int part) { return part == 0 ? w.gate : part == 1 ? w.up : w.down; }
const PackedBf16& part_packed(const PackedExpert& w, int part) {
  return part == 0 ? w.gate : part == 1 ? w.up : w.down;
}
}  // namespace

int64_t ExpertStore::host_row_bytes(const ExpertWeights& src, int part) {
  if (src.packed) {
    const PackedBf16& m = part_packed(*src.packed, part);
    return m.cols + m.code_stride();
  }
  const TensorView& view = part_view(src, part);
  return static_cast<int64_t>(view.nbytes()) / view.dim(0);
}

int64_t ExpertStore::copy_rows(const ExpertWeights& src, int part, int64_t row, int64_t rows, const TensorView& dst,
                               CopyPath path) {
  const TensorView to = dst.rows(row, rows);
  if (src.packed) {
    const PackedBf16& m = part_packed(*src.packed, part);
    if (path == CopyPath::kAsync) backend_.copy_packed_from_host_async_path(m, row, row + rows, to);
    else backend_.copy_packed_from_host_enqueue(m, row, row + rows, to);
    return packed_bf16_rows_bytes(m, row, row + rows);
  }
  const int64_t row_bytes = host_row_bytes(src, part);
  const char* from = static_cast<const char*>(part_view(src, part).data) + row * row_bytes;
  if (path == CopyPath::kAsync) backend_.copy_from_host_async_path(from, to);
  else backend_.copy_from_host_enqueue(from, to);
  return rows * row_bytes;
}

void ExpertStore::wait_loads() {
  backend_.wait_enqueued_copies();
  backend_.synchronize();
}

namespace {
// Prefetch copies move this many bytes between checks for cancellation: small enough that a stale
// prefetch stops within ~0.1 ms of PCIe time, large enough to keep copies efficient.
constexpr size_t kChunkBytes = size_t{4} << 20;
}  // namespace

void ExpertStore::load_async(ExpertKey key) {
  const size_t key_idx = index(key);
  MOEX_ASSERT(slot_of_[key_idx] < 0, "expert ({}, {}) loaded twice", key.layer_idx, key.expert_idx);
  assign_slot(key);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    state_[key_idx] = CopyState::kQueued;
    cancel_requested_[key_idx] = 0;
    copied_rows_[key_idx] = 0;
    copied_bytes_[key_idx] = 0;
    copy_error_[key_idx].clear();
    queue_.push_back(key_idx);
    if (!worker_.joinable()) worker_ = std::thread([this] { prefetch_loop(); });
  }
  work_ready_.notify_one();
}

bool ExpertStore::in_flight(ExpertKey key) const {
  std::lock_guard<std::mutex> lock(mutex_);
  CopyState state = state_[index(key)];
  return state == CopyState::kQueued || state == CopyState::kCopying || state == CopyState::kDone ||
         state == CopyState::kFailed;
}

bool ExpertStore::ready(ExpertKey key) const {
  std::lock_guard<std::mutex> lock(mutex_);
  CopyState state = state_[index(key)];
  return state == CopyState::kDone || state == CopyState::kFailed || state == CopyState::kIdle;
}

ExpertWeights ExpertStore::wait(ExpertKey key) {
  const size_t key_idx = index(key);
  std::unique_lock<std::mutex> lock(mutex_);
  copy_done_.wait(lock, [&] { return state_[key_idx] == CopyState::kDone || state_[key_idx] == CopyState::kFailed ||
                                     state_[key_idx] == CopyState::kIdle; });
  if (state_[key_idx] == CopyState::kFailed) {
    std::string error = copy_error_[key_idx];
    state_[key_idx] = CopyState::kIdle;
    lock.unlock();
    free(key);
    throw IoError(error);
  }
  state_[key_idx] = CopyState::kIdle;
  return views_[key_idx];
}

void ExpertStore::stop_async_copy(size_t key_idx, std::unique_lock<std::mutex>& lock) {
  if (state_[key_idx] == CopyState::kQueued) {
    queue_.erase(std::find(queue_.begin(), queue_.end(), key_idx));
    state_[key_idx] = CopyState::kIdle;
  } else if (state_[key_idx] == CopyState::kCopying) {
    cancel_requested_[key_idx] = 1;
    copy_done_.wait(lock, [&] { return state_[key_idx] != CopyState::kCopying; });
    // A copy that finished before it saw the request is kDone; a stopped one is kIdle with its progress.
  }
}

void ExpertStore::cancel(ExpertKey key) {
  const size_t key_idx = index(key);
  std::unique_lock<std::mutex> lock(mutex_);
  stop_async_copy(key_idx, lock);
  state_[key_idx] = CopyState::kIdle;
  ++stats_.prefetch_cancelled;
  lock.unlock();
  free(key);
}

ExpertWeights ExpertStore::take_over(ExpertKey key, int64_t* enqueued_bytes) {
  const size_t key_idx = index(key);
  *enqueued_bytes = 0;
  std::unique_lock<std::mutex> lock(mutex_);
  stop_async_copy(key_idx, lock);
  if (state_[key_idx] != CopyState::kIdle) {
    lock.unlock();
    return wait(key);
  }
  const int64_t done_rows = copied_rows_[key_idx], done_bytes = copied_bytes_[key_idx];
  const bool needs_verify = verify_ && !verified_[key_idx];  // the thread had not started it
  lock.unlock();
  const ExpertWeights& src = source_[key.layer_idx][key.expert_idx];
  const ExpertWeights& dst = views_[key_idx];
  if (needs_verify) {
    try {
      verify_source(key, src);
    } catch (...) {
      free(key);
      throw;
    }
    verified_[key_idx] = 1;
  }
  int64_t skip = done_rows;  // the thread copies whole rows of gate, then up, then down
  for (int part = 0; part < 3; ++part) {
    const int64_t rows = part_view(src, part).dim(0);
    if (skip >= rows) {
      skip -= rows;
      continue;
    }
    *enqueued_bytes += copy_rows(src, part, skip, rows - skip, part_view(dst, part), CopyPath::kEnqueue);
    skip = 0;
  }
  lock.lock();
  stats_.prefetch_loads += 1;
  stats_.prefetch_taken_over += 1;
  stats_.bytes_moved += done_bytes + *enqueued_bytes;
  return dst;
}

void ExpertStore::prefetch_loop() {
  std::unique_lock<std::mutex> lock(mutex_);
  for (;;) {
    work_ready_.wait(lock, [&] { return stop_ || !queue_.empty(); });
    if (stop_) return;
    const size_t key_idx = queue_.front();
    queue_.pop_front();
    state_[key_idx] = CopyState::kCopying;
    // Find the key of this index (layers are contiguous ranges of layer_offset_).
    int32_t layer_idx = 0;
    while (layer_idx + 1 < num_layers() && layer_offset_[layer_idx + 1] <= static_cast<int32_t>(key_idx)) ++layer_idx;
    const ExpertKey key{layer_idx, static_cast<int32_t>(key_idx) - layer_offset_[layer_idx]};
    const ExpertWeights src = source_[layer_idx][key.expert_idx];
    const ExpertWeights dst = views_[key_idx];
    const bool needs_verify = verify_ && !verified_[key_idx];
    lock.unlock();
    bool cancelled = false;
    std::string error;
    auto start = std::chrono::steady_clock::now();
    try {
      if (needs_verify) {
        verify_source(key, src);
        std::lock_guard<std::mutex> verified(mutex_);
        verified_[key_idx] = 1;
      }
      for (int part = 0; part < 3 && !cancelled; ++part) {
        const int64_t total_rows = part_view(src, part).dim(0);
        const int64_t rows_per_chunk =
            std::max<int64_t>(1, static_cast<int64_t>(kChunkBytes) / host_row_bytes(src, part));
        for (int64_t row = 0; row < total_rows && !cancelled; row += rows_per_chunk) {
          const int64_t rows = std::min(rows_per_chunk, total_rows - row);
          const int64_t bytes = copy_rows(src, part, row, rows, part_view(dst, part), CopyPath::kAsync);
          std::lock_guard<std::mutex> check(mutex_);
          copied_rows_[key_idx] += rows;
          copied_bytes_[key_idx] += bytes;
          cancelled = cancel_requested_[key_idx] != 0;
        }
      }
    } catch (const std::exception& e) {
      error = e.what();
    }
    const double elapsed = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
    lock.lock();
    if (!error.empty()) {
      state_[key_idx] = CopyState::kFailed;
      copy_error_[key_idx] = error;
    } else if (cancelled) {
      state_[key_idx] = CopyState::kIdle;
    } else {
      state_[key_idx] = CopyState::kDone;
      if (needs_verify) verified_[key_idx] = 1;
      stats_.prefetch_loads += 1;
      stats_.bytes_moved += copied_bytes_[key_idx];
      stats_.load_ms += elapsed;
    }
    copy_done_.notify_all();
  }
}

ExpertStoreStats ExpertStore::stats() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return stats_;
}

void ExpertStore::reserve_slots(int32_t count, int32_t layer_idx) {
  if (count <= 0) return;
  const SlotLayout layout = slot_layout(source_[layer_idx].front());
  // One allocation for all of them (a row a slot): no rounding per slot.
  auto block = backend_.alloc(DType::kF32, Shape{count, static_cast<int64_t>(layout.total / sizeof(float))});
  for (int32_t made = 0; made < count; ++made) {
    Slot slot;
    slot.base = static_cast<char*>(block->view.data) + static_cast<size_t>(made) * layout.total;
    slot.capacity = layout.total;
    slot.device = block->view.device;
    free_slots_.push_back(static_cast<int32_t>(slots_.size()));
    slots_.push_back(std::move(slot));
  }
  slot_blocks_.push_back(std::move(block));
}

void ExpertStore::free(ExpertKey key) {
  const size_t key_idx = index(key);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    MOEX_ASSERT(state_[key_idx] == CopyState::kIdle, "freeing expert ({}, {}) while its copy is in flight",
                key.layer_idx, key.expert_idx);
  }
  MOEX_ASSERT(slot_of_[key_idx] >= 0, "freeing expert ({}, {}) that is not loaded", key.layer_idx, key.expert_idx);
  free_slots_.push_back(slot_of_[key_idx]);
  slot_of_[key_idx] = -1;
  host_rows_[key_idx] = 0;
  views_[key_idx] = ExpertWeights{};
}

}  // namespace moex
