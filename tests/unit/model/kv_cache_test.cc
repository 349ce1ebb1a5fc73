// KvCache bookkeeping on the CPU backend: pages taken from and returned to the free list, pools that grow
// keeping their contents, and the errors for a full cache and unknown sequences.
#include <gtest/gtest.h>

#include <algorithm>
#include <set>

#include "moex/backend/cpu/cpu_backend.h"
#include "moex/core/error.h"
#include "moex/model/kv_cache.h"

namespace moex {
namespace {

std::set<int32_t> pages_of(const KvCache& cache, int32_t seq) {
  auto table = cache.block_table(seq);
  return std::set<int32_t>(table.begin(), table.end());
}

TEST(KvCache, SequencesOwnDisjointPagesAndFreedPagesAreReused) {
  auto backend = make_cpu_backend(1);
  KvCache cache(*backend, 2, 2, 4, 3);
  const int32_t a = cache.add_sequence(), b = cache.add_sequence();
  cache.resize(a, 7);  // 3 pages
  cache.resize(b, 3);  // 1 page
  EXPECT_EQ(cache.length(a), 7);
  EXPECT_EQ(cache.block_table(a).size(), 3u);
  EXPECT_EQ(cache.block_table(b).size(), 1u);
  std::set<int32_t> both = pages_of(cache, a);
  for (int32_t page : pages_of(cache, b)) EXPECT_TRUE(both.insert(page).second) << "page " << page << " shared";
  for (int32_t page : both) EXPECT_LT(page, cache.capacity_pages());
  const std::set<int32_t> freed = pages_of(cache, a);
  cache.free_sequence(a);
  EXPECT_FALSE(cache.has_sequence(a));
  const int32_t c = cache.add_sequence();
  EXPECT_EQ(c, a) << "a freed id is reused";
  const int64_t capacity = cache.capacity_pages();
  cache.resize(c, 9);
  EXPECT_EQ(pages_of(cache, c), freed) << "the freed pages come back before the pools grow";
  EXPECT_EQ(cache.capacity_pages(), capacity);
  // Shrinking returns the pages past the new end.
  const int64_t free_before = cache.free_pages();
  cache.resize(c, 4);
  EXPECT_EQ(cache.block_table(c).size(), 2u);
  EXPECT_EQ(cache.free_pages(), free_before + 1);
}

TEST(KvCache, GrowingKeepsContents) {
  auto backend = make_cpu_backend(1);
  KvCache cache(*backend, 1, 1, 2, 2);
  const int32_t seq = cache.add_sequence();
  cache.resize(seq, 2);
  const int32_t page = cache.block_table(seq)[0];
  float* k = cache.k_pages(0).as<float>() + page * 4;
  for (int i = 0; i < 4; ++i) k[i] = static_cast<float>(i + 1);
  cache.resize(seq, 40);  // 20 pages: the pools grow
  EXPECT_GE(cache.capacity_pages(), 20);
  EXPECT_EQ(cache.block_table(seq)[0], page);
  const float* grown = cache.k_pages(0).as<float>() + page * 4;
  for (int i = 0; i < 4; ++i) EXPECT_EQ(grown[i], static_cast<float>(i + 1));
}

TEST(KvCache, FullCacheAndUnknownSequencesAreErrors) {
  auto backend = make_cpu_backend(1);
  KvCache cache(*backend, 1, 1, 2, 4, /*max_pages=*/3);
  const int32_t a = cache.add_sequence(), b = cache.add_sequence();
  cache.resize(a, 8);
  try {
    cache.resize(b, 5);
    ADD_FAILURE() << "a resize past the page limit was accepted";
  } catch (const BudgetError& e) {
    EXPECT_NE(std::string(e.what()).find("KV cache is full: sequence 1 needs 2 more pages of 4 positions, but 2 of the "
                                         "limit of 3 pages are held by 2 sequences"),
              std::string::npos)
        << e.what();
  }
  EXPECT_EQ(cache.length(b), 0) << "a rejected resize leaves the sequence as it was";
  cache.resize(b, 4);  // the last page still fits
  cache.free_sequence(a);
  EXPECT_THROW(cache.free_sequence(a), UsageError);
  try {
    cache.length(7);
    ADD_FAILURE() << "unknown sequence accepted";
  } catch (const UsageError& e) {
    EXPECT_NE(std::string(e.what()).find("sequence 7 does not exist"), std::string::npos) << e.what();
  }
  EXPECT_THROW(KvCache(*backend, 1, 1, 2, 0), UsageError);
}

}  // namespace
}  // namespace moex
