// BPE merge loop and vocabulary loading; see bpe_model.h for the design.
#include "moex/tokenizer/bpe_model.h"

#include <algorithm>
#include <mutex>
#include <queue>

#include "moex/tokenizer/json_util.h"
#include "moex/tokenizer/pipeline.h"
#include "moex/tokenizer/utf8.h"

namespace moex::tok {
namespace {

uint64_t pair_key(int32_t left, int32_t right) {
  return ((static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) | static_cast<uint32_t>(right)) + 1;
}
uint64_t hash_key(uint64_t key) { return (key * 0x9E3779B97F4A7C15ull) ^ (key >> 29); }

std::string byte_token(uint8_t byte) { return fmt::format("<0x{:02X}>", byte); }

}  // namespace

BpeModel::BpeModel(const nlohmann::json& model, BpeData data, const std::string& where) {
  if (!data.has_vocab) throw FormatError(fmt::format("{}: missing field \"vocab\"", where));
  if (!data.has_merges) throw FormatError(fmt::format("{}: missing field \"merges\"", where));
  int32_t max_id = -1;
  size_t key_bytes = 0;
  for (auto& [token, id] : data.vocab) {
    max_id = std::max(max_id, id);
    key_bytes += token.size();
  }
  vocab_.reserve(data.vocab.size(), key_bytes);
  id_to_token_.resize(static_cast<size_t>(max_id + 1));
  for (auto& [token, id] : data.vocab) {
    vocab_.insert(token, id);
    id_to_token_[id] = std::move(token);
  }

  if (model.contains("dropout") && !model["dropout"].is_null() && model["dropout"].get<double>() != 0.0)
    throw FormatError(fmt::format("{}.dropout: BPE dropout is not supported for inference (found {})", where,
                                  model["dropout"].dump()));
  auto opt_string = [&](const char* key) -> std::string {
    return model.contains(key) && !model[key].is_null() ? get_string(model, key, where) : std::string();
  };
  continuing_prefix_ = opt_string("continuing_subword_prefix");
  end_suffix_ = opt_string("end_of_word_suffix");
  const std::string unk = opt_string("unk_token");
  if (!unk.empty()) {
    const int32_t id = vocab_.find(unk);
    if (id < 0) throw FormatError(fmt::format("{}.unk_token: \"{}\" is not in the vocabulary", where, unk));
    unk_id_ = id;
  }
  byte_fallback_ = get_bool(model, "byte_fallback", false, where);
  fuse_unk_ = get_bool(model, "fuse_unk", false, where);
  ignore_merges_ = get_bool(model, "ignore_merges", false, where);
  for (int b = 0; b < 256; ++b) {
    byte_fallback_ids_[b] = vocab_.find(byte_token(static_cast<uint8_t>(b)));
    byte_ids_[b] = vocab_.find(byte_to_unicode(static_cast<uint8_t>(b)));
  }

  constexpr std::string_view kMeta = "\xE2\x96\x81";  // ▁
  // Affixes and ignore_merges depend on where a word starts and ends: no cutting then.
  split_before_metaspace_ = vocab_.contains(kMeta) && continuing_prefix_.empty() && end_suffix_.empty() && !ignore_merges_;
  const auto& merges = data.merges;
  size_t capacity = 16;
  while (capacity < merges.size() * 2) capacity <<= 1;
  merge_keys_.assign(capacity, 0);
  merge_vals_.assign(capacity, 0);
  merge_mask_ = capacity - 1;
  std::string merged;
  for (size_t rank = 0; rank < merges.size(); ++rank) {
    const std::string& left = merges[rank].first;
    const std::string& right = merges[rank].second;
    const int32_t l = vocab_.find(left), r = vocab_.find(right);
    merged.assign(left);
    merged.append(right, std::min(right.size(), continuing_prefix_.size()));
    const int32_t n = vocab_.find(merged);
    if (l < 0 || r < 0 || n < 0)
      throw FormatError(fmt::format("{}.merges[{}]: \"{}\" + \"{}\" uses a token that is not in the vocabulary",
                                    where, rank, left, right));
    if (right.starts_with(kMeta) && !left.ends_with(kMeta)) split_before_metaspace_ = false;
    const uint64_t key = pair_key(l, r);
    for (uint64_t slot = hash_key(key) & merge_mask_;; slot = (slot + 1) & merge_mask_) {
      // A repeated pair keeps its last rank, as the reference's map built from the merge list does.
      if (merge_keys_[slot] == key || merge_keys_[slot] == 0) {
        merge_keys_[slot] = key;
        merge_vals_[slot] = (static_cast<uint64_t>(rank) << 32) | static_cast<uint32_t>(n);
        break;
      }
    }
  }
}

void BpeModel::set_byte_level(bool on) { byte_level_ = on; }

bool BpeModel::lookup_merge(int32_t left, int32_t right, uint32_t* rank, int32_t* merged) const {
  const uint64_t key = pair_key(left, right);
  for (uint64_t slot = hash_key(key) & merge_mask_;; slot = (slot + 1) & merge_mask_) {
    const uint64_t k = merge_keys_[slot];
    if (k == key) {
      *rank = static_cast<uint32_t>(merge_vals_[slot] >> 32);
      *merged = static_cast<int32_t>(merge_vals_[slot] & 0xFFFFFFFFu);
      return true;
    }
    if (k == 0) return false;
  }
}

std::optional<int32_t> BpeModel::token_to_id(std::string_view token) const {
  const int32_t id = vocab_.find(token);
  if (id < 0) return std::nullopt;
  return id;
}

const std::string* BpeModel::id_to_token(int32_t id) const {
  if (id < 0 || id >= size() || id_to_token_[id].empty()) return nullptr;
  return &id_to_token_[id];
}

void BpeModel::encode_word(std::string_view word, std::vector<int32_t>& out) const {
  if (word.empty()) return;
  if (!split_before_metaspace_ || byte_level_) {
    encode_cached(word, out);
    return;
  }
  constexpr std::string_view kMeta = "\xE2\x96\x81";
  size_t start = 0;
  for (size_t pos = word.find(kMeta, 1); pos != std::string_view::npos; pos = word.find(kMeta, pos + 1)) {
    if (pos >= 3 && word.compare(pos - 3, 3, kMeta) == 0) continue;  // inside a run of ▁: no cut
    encode_cached(word.substr(start, pos - start), out);
    start = pos;
  }
  encode_cached(word.substr(start), out);
}

void BpeModel::encode_cached(std::string_view word, std::vector<int32_t>& out) const {
  const bool cacheable = word.size() <= kCacheMaxWordBytes;
  const uint64_t h = cacheable ? WordCache::hash(word) : 0;
  if (cacheable) {
    std::shared_lock lock(cache_mutex_);
    if (cache_.find(word, h, out)) return;
  }
  const size_t first = out.size();
  merge_word(word, out);
  if (cacheable) {
    std::unique_lock lock(cache_mutex_);
    cache_.insert(word, h, out.data() + first, out.size() - first);
  }
}

void BpeModel::merge_word(std::string_view raw, std::vector<int32_t>& out) const {
  // Byte-level words are looked up in their ByteLevel spelling (needed for ignore_merges and unknowns).
  std::string mapped;
  if (byte_level_) {
    mapped.reserve(raw.size() * 2);
    for (unsigned char c : raw) mapped += byte_to_unicode(c);
  }
  const std::string_view word = byte_level_ ? std::string_view(mapped) : raw;
  if (ignore_merges_) {
    if (const int32_t id = vocab_.find(word); id >= 0) {
      out.push_back(id);
      return;
    }
  }

  struct Symbol {
    int32_t id, prev, next;
    bool removed;
  };
  std::vector<Symbol> symbols;
  symbols.reserve(word.size());
  auto add = [&](int32_t id) {
    const auto idx = static_cast<int32_t>(symbols.size());
    symbols.push_back({id, idx - 1, idx + 1, false});
  };
  int32_t pending_unk = -1;  // the reference's (fused) unknown run, flushed by the next known char
  std::string with_affixes;
  for (size_t pos = 0; pos < word.size();) {
    const size_t len = utf8::char_len(word, pos);
    const bool is_first = pos == 0, is_last = pos + len == word.size();
    std::string_view piece = word.substr(pos, len);
    int32_t id = -1;
    if (byte_level_ && continuing_prefix_.empty() && end_suffix_.empty()) {
      const int b = unicode_to_byte(utf8::decode(word, pos, len));
      id = b >= 0 ? byte_ids_[b] : -1;
    } else {
      if ((!is_first && !continuing_prefix_.empty()) || (is_last && !end_suffix_.empty())) {
        with_affixes.assign(!is_first ? continuing_prefix_ : std::string());
        with_affixes.append(piece);
        if (is_last) with_affixes += end_suffix_;
        piece = with_affixes;
      }
      id = vocab_.find(piece);
    }
    pos += len;
    if (id >= 0) {
      if (pending_unk >= 0) {
        add(pending_unk);
        pending_unk = -1;
      }
      add(id);
      continue;
    }
    if (byte_fallback_) {
      bool all = true;
      for (unsigned char c : piece) all = all && byte_fallback_ids_[c] >= 0;
      if (all) {
        for (unsigned char c : piece) add(byte_fallback_ids_[c]);
        continue;
      }
    }
    if (unk_id_) {
      if (pending_unk >= 0 && !fuse_unk_) add(pending_unk);
      pending_unk = *unk_id_;
    }
    // Without an unk token the reference drops the character silently; so do we.
  }
  if (pending_unk >= 0) add(pending_unk);
  if (symbols.empty()) return;
  symbols.back().next = -1;

  struct Merge {
    uint32_t rank;
    int32_t pos, merged;
    bool operator<(const Merge& o) const {  // max-heap: lowest rank first, then leftmost
      return rank != o.rank ? rank > o.rank : pos > o.pos;
    }
  };
  std::priority_queue<Merge> queue;
  for (size_t idx = 0; idx + 1 < symbols.size(); ++idx) {
    uint32_t rank;
    int32_t merged;
    if (lookup_merge(symbols[idx].id, symbols[idx + 1].id, &rank, &merged))
      queue.push({rank, static_cast<int32_t>(idx), merged});
  }
  while (!queue.empty()) {
    const Merge top = queue.top();
    queue.pop();
    Symbol& cur = symbols[top.pos];
    if (cur.removed || cur.next < 0) continue;
    const Symbol right = symbols[cur.next];
    uint32_t rank;
    int32_t merged;
    if (!lookup_merge(cur.id, right.id, &rank, &merged) || merged != top.merged) continue;  // stale entry
    symbols[cur.next].removed = true;
    cur.id = top.merged;
    cur.next = right.next;
    if (right.next >= 0) symbols[right.next].prev = top.pos;
    if (cur.prev >= 0 && lookup_merge(symbols[cur.prev].id, cur.id, &rank, &merged))
      queue.push({rank, cur.prev, merged});
    if (cur.next >= 0 && lookup_merge(cur.id, symbols[cur.next].id, &rank, &merged))
      queue.push({rank, top.pos, merged});
  }
  for (const Symbol& s : symbols)
    if (!s.removed) out.push_back(s.id);
}

}  // namespace moex::tok
