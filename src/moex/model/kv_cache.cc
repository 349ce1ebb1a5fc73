#include "moex/model/kv_cache.h"

#include <algorithm>

#include "moex/core/error.h"

namespace moex {

KvCache::KvCache(Backend& backend, int64_t num_layers, int64_t kv_heads, int64_t head_dim, int64_t page_size,
                 int64_t max_pages)
    : backend_(backend),
      num_layers_(num_layers),
      kv_heads_(kv_heads),
      head_dim_(head_dim),
      page_size_(page_size),
      max_pages_(max_pages) {
  if (page_size <= 0) throw UsageError(fmt::format("KV cache page size must be positive, got {}", page_size));
  if (max_pages < 0) throw UsageError(fmt::format("KV cache page limit must be >= 0, got {}", max_pages));
}

KvCache::~KvCache() = default;

int32_t KvCache::add_sequence() {
  for (size_t idx = 0; idx < sequences_.size(); ++idx) {
    if (!sequences_[idx].live) {
      sequences_[idx] = Sequence{true, 0, {}};
      return static_cast<int32_t>(idx);
    }
  }
  sequences_.push_back(Sequence{true, 0, {}});
  return static_cast<int32_t>(sequences_.size() - 1);
}

KvCache::Sequence& KvCache::sequence(int32_t seq, const char* what) {
  return const_cast<Sequence&>(static_cast<const KvCache*>(this)->sequence(seq, what));
}

const KvCache::Sequence& KvCache::sequence(int32_t seq, const char* what) const {
  if (!has_sequence(seq))
    throw UsageError(fmt::format("{}: sequence {} does not exist (never added, or already freed)", what, seq));
  return sequences_[static_cast<size_t>(seq)];
}

bool KvCache::has_sequence(int32_t seq) const {
  return seq >= 0 && static_cast<size_t>(seq) < sequences_.size() && sequences_[static_cast<size_t>(seq)].live;
}

int64_t KvCache::num_sequences() const {
  return std::count_if(sequences_.begin(), sequences_.end(), [](const Sequence& s) { return s.live; });
}

void KvCache::free_sequence(int32_t seq) {
  Sequence& s = sequence(seq, "free_sequence");
  // Pushed in reverse so that the next sequence takes them back in the same order.
  free_.insert(free_.end(), s.pages.rbegin(), s.pages.rend());
  s = Sequence{};
}

int64_t KvCache::length(int32_t seq) const { return sequence(seq, "length").length; }

std::span<const int32_t> KvCache::block_table(int32_t seq) const { return sequence(seq, "block_table").pages; }

void KvCache::resize(int32_t seq, int64_t num_tokens) {
  Sequence& s = sequence(seq, "resize");
  if (num_tokens < 0) throw UsageError(fmt::format("sequence {}: length {} is negative", seq, num_tokens));
  const int64_t want = (num_tokens + page_size_ - 1) / page_size_;
  const int64_t have = static_cast<int64_t>(s.pages.size());
  if (want > have) {
    const int64_t missing = want - have - free_pages();
    if (missing > 0) {
      if (max_pages_ > 0 && num_pages_ + missing > max_pages_)
        throw BudgetError(fmt::format(
            "KV cache is full: sequence {} needs {} more pages of {} positions, but {} of the limit of {} pages are "
            "held by {} sequences ---> HINT: free finished sequences, run fewer at once or raise the KV cache limit",
            seq, want - have, page_size_, num_pages_ - free_pages(), max_pages_, num_sequences()));
      int64_t target = std::max(num_pages_ + missing, 2 * num_pages_);
      if (max_pages_ > 0) target = std::min(target, max_pages_);
      grow(target);
    }
    for (int64_t idx = have; idx < want; ++idx) {
      s.pages.push_back(free_.back());
      free_.pop_back();
    }
  } else {
    for (int64_t idx = have - 1; idx >= want; --idx) free_.push_back(s.pages[static_cast<size_t>(idx)]);
    s.pages.resize(static_cast<size_t>(want));
  }
  s.length = num_tokens;
}

void KvCache::reserve(int64_t num_tokens) {
  int64_t pages = (num_tokens + page_size_ - 1) / page_size_;
  if (max_pages_ > 0) pages = std::min(pages, max_pages_);
  if (pages > num_pages_) grow(pages);
}

void KvCache::grow(int64_t num_pages) {
  MOEX_ASSERT(num_pages > num_pages_, "KvCache::grow to {} pages from {}", num_pages, num_pages_);
  const Shape shape{num_pages, page_size_, kv_heads_, head_dim_};
  const int64_t old_elems = num_pages_ * page_size_ * kv_heads_ * head_dim_;
  std::vector<float> host;
  for (int64_t idx = 0; idx < 2 * num_layers_; ++idx) {
    std::unique_ptr<Buffer> grown = backend_.alloc(DType::kF32, shape);
    if (old_elems > 0) {  // pages in use keep their contents: through the host, rare (pools double)
      host.resize(static_cast<size_t>(old_elems));
      backend_.copy_to_host(pools_[static_cast<size_t>(idx)]->view, host.data());
      backend_.copy_from_host(host.data(), grown->view.rows(0, num_pages_));
    }
    if (static_cast<size_t>(idx) < pools_.size())
      pools_[static_cast<size_t>(idx)] = std::move(grown);
    else
      pools_.push_back(std::move(grown));
  }
  // New pages go under the freed ones, lowest id on top of them.
  std::vector<int32_t> fresh;
  for (int64_t page = num_pages - 1; page >= num_pages_; --page) fresh.push_back(static_cast<int32_t>(page));
  free_.insert(free_.begin(), fresh.begin(), fresh.end());
  num_pages_ = num_pages;
  backend_.reset_step_recordings();  // recorded decode steps name the old pools
}

}  // namespace moex
