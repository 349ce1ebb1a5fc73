// Word -> ids cache of the BPE model: one flat open-addressing table (hash and offsets per slot) over two
// arenas, so a hit costs one hash, one probe and one memcmp. std::unordered_map was 40% of encode time:
// node chasing, and libstdc++ re-hashes string keys while walking a bucket. Cleared wholesale when full.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

namespace moex::tok {

class WordCache {
 public:
  static uint64_t hash(std::string_view s) {
    uint64_t h = 0x9E3779B97F4A7C15ull ^ s.size();
    size_t pos = 0;
    for (; pos + 8 <= s.size(); pos += 8) {
      uint64_t w;
      std::memcpy(&w, s.data() + pos, 8);
      h = (h ^ w) * 0xBF58476D1CE4E5B9ull;
      h ^= h >> 31;
    }
    uint64_t tail = 0;
    std::memcpy(&tail, s.data() + pos, s.size() - pos);
    h = (h ^ tail) * 0x94D049BB133111EBull;
    h ^= h >> 29;
    return h | 1;  // 0 marks an empty slot
  }

  // Appends the cached ids of `word` to `out`; false on a miss.
  bool find(std::string_view word, uint64_t h, std::vector<int32_t>& out) const {
    if (slots_.empty()) return false;
    for (size_t idx = h & mask_;; idx = (idx + 1) & mask_) {
      const Slot& s = slots_[idx];
      if (s.hash == 0) return false;
      if (s.hash == h && s.key_len == word.size() && std::memcmp(keys_.data() + s.key_off, word.data(), word.size()) == 0) {
        out.insert(out.end(), ids_.begin() + s.ids_off, ids_.begin() + s.ids_off + s.ids_len);
        return true;
      }
    }
  }

  void insert(std::string_view word, uint64_t h, const int32_t* ids, size_t num_ids) {
    if (slots_.empty()) reset();
    if (used_ * 2 >= slots_.size()) reset();
    for (size_t idx = h & mask_;; idx = (idx + 1) & mask_) {
      Slot& s = slots_[idx];
      if (s.hash == h && s.key_len == word.size() && std::memcmp(keys_.data() + s.key_off, word.data(), word.size()) == 0)
        return;  // another thread got here first
      if (s.hash == 0) {
        s = {h, static_cast<uint32_t>(keys_.size()), static_cast<uint32_t>(word.size()),
             static_cast<uint32_t>(ids_.size()), static_cast<uint32_t>(num_ids)};
        keys_.append(word);
        ids_.insert(ids_.end(), ids, ids + num_ids);
        ++used_;
        return;
      }
    }
  }

 private:
  static constexpr size_t kSlots = 1 << 18;  // at most 2^17 words (~6 MB of slots)
  struct Slot {
    uint64_t hash;
    uint32_t key_off, key_len, ids_off, ids_len;
  };
  void reset() {
    slots_.assign(kSlots, Slot{0, 0, 0, 0, 0});
    mask_ = kSlots - 1;
    keys_.clear();
    ids_.clear();
    used_ = 0;
  }
  std::vector<Slot> slots_;
  std::string keys_;
  std::vector<int32_t> ids_;
  size_t mask_ = 0, used_ = 0;
};

}  // namespace moex::tok
