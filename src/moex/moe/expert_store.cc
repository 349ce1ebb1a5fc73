#include "moex/moe/expert_store.h"

#include <chrono>
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
  slot_of_.assign(total, -1);
  verified_.assign(total, 0);
  views_.resize(total);
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

bool ExpertStore::is_loaded(ExpertKey key) const { return slot_of_[index(key)] >= 0; }

const ExpertWeights& ExpertStore::resident(ExpertKey key) const {
  MOEX_ASSERT(is_loaded(key), "expert ({}, {}) is not loaded", key.layer_idx, key.expert_idx);
  return views_[index(key)];
}

void ExpertStore::verify_source(ExpertKey key, const ExpertWeights& weights) {
  for (const TensorView* view : {&weights.gate, &weights.up, &weights.down})
    if (has_non_finite(*view))
      throw IoError(fmt::format("{}: expert weights contain NaN or Inf values; the file is corrupt, so the expert "
                                "is not served",
                                describe_(key)));
}

ExpertWeights ExpertStore::load(ExpertKey key) {
  const size_t key_idx = index(key);
  MOEX_ASSERT(slot_of_[key_idx] < 0, "expert ({}, {}) loaded twice", key.layer_idx, key.expert_idx);
  const ExpertWeights& src = source_[key.layer_idx][key.expert_idx];
  auto start = std::chrono::steady_clock::now();
  if (verify_ && !verified_[key_idx]) {
    verify_source(key, src);
    verified_[key_idx] = 1;
  }
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
  auto fill = [&](std::unique_ptr<Buffer>& buffer, const TensorView& from) {
    if (!buffer || buffer->view.nbytes() < from.nbytes() || buffer->view.dtype != from.dtype)
      buffer = backend_.alloc(from.dtype, from.shape);
    TensorView dst(buffer->view.data, from.dtype, from.shape, buffer->view.device);
    backend_.copy_from_host(from.data, dst);
    return dst;
  };
  ExpertWeights& view = views_[key_idx];
  view.gate = fill(slot.gate, src.gate);
  view.up = fill(slot.up, src.up);
  view.down = fill(slot.down, src.down);
  slot_of_[key_idx] = slot_idx;
  stats_.loads += 1;
  stats_.bytes_moved += static_cast<int64_t>(src.gate.nbytes() + src.up.nbytes() + src.down.nbytes());
  stats_.load_ms += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  return view;
}

void ExpertStore::free(ExpertKey key) {
  const size_t key_idx = index(key);
  MOEX_ASSERT(slot_of_[key_idx] >= 0, "freeing expert ({}, {}) that is not loaded", key.layer_idx, key.expert_idx);
  free_slots_.push_back(slot_of_[key_idx]);
  slot_of_[key_idx] = -1;
  views_[key_idx] = ExpertWeights{};
}

}  // namespace moex
