// ExpertStore: the tiers an expert's weights move through. The source tier is where the loader left
// them (the checkpoint's mmap = disk, or host RAM for random weights); the fast tier is a pool of slots
// in the backend's memory (host RAM on the CPU build, GPU memory with CUDA), bounded by a byte budget.
// Every move goes through here and is accounted: bytes, time, loads. The store decides nothing: the
// ExpertCache picks what is resident; the store just fills and frees slots.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "moex/backend/backend.h"
#include "moex/moe/expert_provider.h"

namespace moex {

struct ExpertStoreStats {
  int64_t loads = 0;
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

  int32_t num_layers() const { return static_cast<int32_t>(source_.size()); }
  int32_t num_experts(int32_t layer_idx) const { return static_cast<int32_t>(source_[layer_idx].size()); }
  // Bytes of one expert (gate + up + down) of a layer in the source dtype.
  int64_t expert_bytes(int32_t layer_idx) const;

  // Copies key's weights into a fast-tier slot (allocating or reusing a freed one) and returns the
  // backend views. Throws IoError if the source weights are corrupt.
  ExpertWeights load(ExpertKey key);
  // Returns key's slot to the free list (its views become invalid).
  void free(ExpertKey key);
  // The resident views of a loaded key.
  const ExpertWeights& resident(ExpertKey key) const;
  bool is_loaded(ExpertKey key) const;

  const ExpertStoreStats& stats() const { return stats_; }

 private:
  struct Slot {
    std::unique_ptr<Buffer> gate, up, down;
  };
  size_t index(ExpertKey key) const;
  void verify_source(ExpertKey key, const ExpertWeights& weights);

  Backend& backend_;
  std::vector<std::vector<ExpertWeights>> source_;
  std::function<std::string(ExpertKey)> describe_;
  bool verify_;
  std::vector<int32_t> layer_offset_;
  std::vector<int32_t> slot_of_;        // [key] -> slot index or -1
  std::vector<uint8_t> verified_;       // [key]
  std::vector<ExpertWeights> views_;    // [key] resident views
  std::vector<Slot> slots_;
  std::vector<int32_t> free_slots_;
  ExpertStoreStats stats_;
};

}  // namespace moex
