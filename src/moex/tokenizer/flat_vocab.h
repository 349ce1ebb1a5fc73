// Token string -> id for large vocabularies: one open-addressing table over a key arena. Loading a 200k
// vocabulary does ~1.3M lookups (three per merge); std::unordered_map spent most of the load time there.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

#include "moex/tokenizer/word_cache.h"

namespace moex::tok {

class FlatVocab {
 public:
  // `total_key_bytes` sizes the arena up front (an upper bound is fine).
  void reserve(size_t num_keys, size_t total_key_bytes) {
    size_t capacity = 16;
    while (capacity < num_keys * 2) capacity <<= 1;
    slots_.assign(capacity, Slot{0, 0, 0, -1});
    mask_ = capacity - 1;
    keys_.reserve(total_key_bytes);
  }

  // Later insertions of the same key overwrite the id, as a JSON object read into a map does.
  void insert(std::string_view key, int32_t id) {
    if (slots_.empty() || (size_ + 1) * 2 > slots_.size()) grow();
    const uint64_t h = WordCache::hash(key);
    for (size_t idx = h & mask_;; idx = (idx + 1) & mask_) {
      Slot& s = slots_[idx];
      if (s.hash == 0) {
        s = {h, static_cast<uint32_t>(keys_.size()), static_cast<uint32_t>(key.size()), id};
        keys_.append(key);
        ++size_;
        return;
      }
      if (matches(s, h, key)) {
        s.id = id;
        return;
      }
    }
  }

  int32_t find(std::string_view key) const {  // -1 when absent
    if (slots_.empty()) return -1;
    const uint64_t h = WordCache::hash(key);
    for (size_t idx = h & mask_;; idx = (idx + 1) & mask_) {
      const Slot& s = slots_[idx];
      if (s.hash == 0) return -1;
      if (matches(s, h, key)) return s.id;
    }
  }
  bool contains(std::string_view key) const { return find(key) >= 0; }
  size_t size() const { return size_; }

 private:
  struct Slot {
    uint64_t hash;
    uint32_t key_off, key_len;
    int32_t id;
  };
  bool matches(const Slot& s, uint64_t h, std::string_view key) const {
    return s.hash == h && s.key_len == key.size() && std::memcmp(keys_.data() + s.key_off, key.data(), key.size()) == 0;
  }
  void grow() {
    std::vector<Slot> old = std::move(slots_);
    const size_t capacity = old.empty() ? 16 : old.size() * 2;
    slots_.assign(capacity, Slot{0, 0, 0, -1});
    mask_ = capacity - 1;
    for (const Slot& s : old) {
      if (s.hash == 0) continue;
      size_t idx = s.hash & mask_;
      while (slots_[idx].hash != 0) idx = (idx + 1) & mask_;
      slots_[idx] = s;
    }
  }
  std::vector<Slot> slots_;
  std::string keys_;
  size_t mask_ = 0, size_ = 0;
};

}  // namespace moex::tok
