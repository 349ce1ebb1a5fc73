// The paged KV cache: per layer one pool of fixed-size pages for k and one for v, each
// [num_pages, page_size, kv_heads, head_dim] fp32 on the backend's device, shared by every sequence through
// per-sequence block tables (vLLM's PagedAttention layout). Sequences grow a page at a time from a free list;
// the pools grow (doubling, contents kept) when the list runs dry, up to an optional page limit.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "moex/backend/backend.h"

namespace moex {

class KvCache {
 public:
  // max_pages 0: no limit. Allocates nothing until the first page is needed (or reserve()).
  KvCache(Backend& backend, int64_t num_layers, int64_t kv_heads, int64_t head_dim, int64_t page_size,
          int64_t max_pages = 0);
  ~KvCache();

  // A new empty sequence; ids of freed sequences are reused.
  int32_t add_sequence();
  // Returns seq's pages to the free list. Throws UsageError for an unknown id.
  void free_sequence(int32_t seq);
  bool has_sequence(int32_t seq) const;
  int64_t num_sequences() const;

  // Makes seq hold positions [0, num_tokens): pages past the new end go back to the free list, missing ones
  // are taken from it (growing the pools). Throws BudgetError, leaving seq as it was, when max_pages cannot
  // hold them. Contents of kept positions stay; new positions are undefined until written.
  void resize(int32_t seq, int64_t num_tokens);
  int64_t length(int32_t seq) const;
  // seq's pages in position order: page b holds positions [b * page_size, (b + 1) * page_size).
  std::span<const int32_t> block_table(int32_t seq) const;

  // Grows the pools to hold at least num_tokens tokens in total (a benchmark's steps then never grow them).
  void reserve(int64_t num_tokens);

  int64_t page_size() const { return page_size_; }
  int64_t capacity_pages() const { return num_pages_; }
  int64_t free_pages() const { return static_cast<int64_t>(free_.size()); }
  int64_t max_pages() const { return max_pages_; }
  // [num_pages, page_size, kv_heads, head_dim]; the views change when the pools grow.
  const TensorView& k_pages(int64_t layer_idx) const { return pools_[2 * layer_idx]->view; }
  const TensorView& v_pages(int64_t layer_idx) const { return pools_[2 * layer_idx + 1]->view; }

 private:
  struct Sequence {
    bool live = false;
    int64_t length = 0;
    std::vector<int32_t> pages;
  };
  void grow(int64_t num_pages);
  Sequence& sequence(int32_t seq, const char* what);
  const Sequence& sequence(int32_t seq, const char* what) const;

  Backend& backend_;
  int64_t num_layers_, kv_heads_, head_dim_, page_size_, max_pages_;
  int64_t num_pages_ = 0;
  std::vector<std::unique_ptr<Buffer>> pools_;  // 2 per layer: k, v
  std::vector<int32_t> free_;                   // a stack: the most recently freed page is reused first
  std::vector<Sequence> sequences_;
};

}  // namespace moex
