// PrefetchPlanner timing on a link of 1 byte/us with 10-byte chunks, so every time is exact.
#include <gtest/gtest.h>

#include "moex/core/error.h"
#include "moex/moe/prefetch_planner.h"

namespace moex {
namespace {

PrefetchPlanner make_planner() { return PrefetchPlanner(PlannerConfig{1.0, 10}); }

std::vector<int32_t> experts_of(const std::vector<TransferDone>& done) {
  std::vector<int32_t> out;
  for (const TransferDone& d : done) out.push_back(d.key.expert_idx);
  return out;
}

TEST(PrefetchPlanner, HigherPriorityFirstThenEarlierStepThenFifo) {
  PrefetchPlanner planner = make_planner();
  planner.prefetch({0, 1}, 10, /*priority=*/1.0, /*stale_after_step=*/5);
  planner.prefetch({0, 2}, 10, 3.0, 5);
  planner.prefetch({0, 3}, 10, 1.0, 4);
  planner.prefetch({0, 4}, 10, 1.0, 4);
  std::vector<TransferDone> done;
  planner.advance_to(100, &done);
  EXPECT_EQ(experts_of(done), (std::vector<int32_t>{2, 3, 4, 1}));
  EXPECT_DOUBLE_EQ(done[0].done_us, 10);
  EXPECT_DOUBLE_EQ(done[3].done_us, 40);
  EXPECT_DOUBLE_EQ(planner.now_us(), 100);
  EXPECT_EQ(planner.stats().prefetch_transfers, 4);
  EXPECT_EQ(planner.stats().bytes_copied, 40);
}

TEST(PrefetchPlanner, DemandOvertakesAtTheNextChunkBoundary) {
  PrefetchPlanner planner = make_planner();
  planner.prefetch({0, 1}, 30, 1.0, 9);  // three chunks: 0-10, 10-20, 20-30
  std::vector<TransferDone> done;
  planner.advance_to(15, &done);  // second chunk in flight until 20
  EXPECT_TRUE(done.empty());
  planner.demand({0, 2}, 10);
  // The chunk in flight cannot be stopped: the demand starts at 20 and ends at 30.
  EXPECT_DOUBLE_EQ(planner.run_until_done({0, 2}, &done), 30);
  ASSERT_EQ(done.size(), 1u);
  EXPECT_EQ(done[0].kind, TransferKind::kDemand);
  planner.advance_to(100, &done);
  ASSERT_EQ(done.size(), 2u);
  EXPECT_EQ(done[1].key.expert_idx, 1);
  EXPECT_DOUBLE_EQ(done[1].done_us, 40);  // resumed, only its last chunk left
  EXPECT_EQ(planner.stats().preemptions, 1);
  EXPECT_EQ(planner.stats().bytes_copied, 40);
}

TEST(PrefetchPlanner, DemandOfAPendingPrefetchPromotesItAndKeepsItsBytes) {
  PrefetchPlanner planner = make_planner();
  planner.prefetch({0, 1}, 30, 1.0, 9);
  planner.prefetch({0, 2}, 10, 5.0, 9);
  std::vector<TransferDone> done;
  planner.advance_to(20, &done);  // 2 done at 10, 1 has one chunk copied at 20
  planner.demand({0, 1}, 30);
  EXPECT_DOUBLE_EQ(planner.run_until_done({0, 1}, &done), 40);
  EXPECT_EQ(done.back().kind, TransferKind::kDemand);
  EXPECT_EQ(planner.stats().promoted, 1);
  EXPECT_EQ(planner.stats().demand_transfers, 1);
  EXPECT_EQ(planner.stats().bytes_copied, 40);
}

TEST(PrefetchPlanner, CancelDropsQueuedAndWastesCopiedBytes) {
  PrefetchPlanner planner = make_planner();
  planner.prefetch({0, 1}, 30, 2.0, 9);
  planner.prefetch({0, 2}, 10, 1.0, 9);
  std::vector<TransferDone> done;
  planner.advance_to(15, &done);  // 1: chunk 10-20 in flight
  EXPECT_TRUE(planner.cancel({0, 1}));
  EXPECT_FALSE(planner.pending({0, 1}));
  EXPECT_FALSE(planner.cancel({0, 1}));
  planner.advance_to(100, &done);
  // The in-flight chunk still held the link until 20; then 2 ran 20-30.
  ASSERT_EQ(done.size(), 1u);
  EXPECT_EQ(done[0].key.expert_idx, 2);
  EXPECT_DOUBLE_EQ(done[0].done_us, 30);
  EXPECT_EQ(planner.stats().bytes_wasted, 20);
  EXPECT_EQ(planner.stats().cancelled, 1);
}

TEST(PrefetchPlanner, StalePrefetchesAreCancelledDemandsAreNot) {
  PrefetchPlanner planner = make_planner();
  planner.prefetch({0, 1}, 10, 1.0, 3);
  planner.prefetch({0, 2}, 10, 1.0, 4);
  planner.prefetch({0, 3}, 10, 1.0, 5);
  planner.demand({0, 4}, 10);
  EXPECT_EQ(planner.cancel_stale(5), 2);  // steps 3 and 4 are past
  EXPECT_TRUE(planner.pending({0, 3}));
  EXPECT_TRUE(planner.pending({0, 4}));
  EXPECT_FALSE(planner.cancel({0, 4}));  // a demand cannot be cancelled
  std::vector<TransferDone> done;
  planner.advance_to(100, &done);
  EXPECT_EQ(experts_of(done), (std::vector<int32_t>{4, 3}));
}

TEST(PrefetchPlanner, RequeueRaisesPriority) {
  PrefetchPlanner planner = make_planner();
  planner.prefetch({0, 1}, 10, 1.0, 9);
  planner.prefetch({0, 2}, 10, 2.0, 9);
  planner.prefetch({0, 1}, 10, 3.0, 9);
  EXPECT_EQ(planner.num_pending(), 2);
  std::vector<TransferDone> done;
  planner.advance_to(100, &done);
  EXPECT_EQ(experts_of(done), (std::vector<int32_t>{1, 2}));
}

TEST(PrefetchPlanner, IdleLinkFollowsTheClock) {
  PrefetchPlanner planner = make_planner();
  std::vector<TransferDone> done;
  planner.advance_to(50, &done);
  planner.demand({1, 0}, 25);
  EXPECT_DOUBLE_EQ(planner.run_until_done({1, 0}, &done), 75);
}

TEST(PrefetchPlanner, RejectsABadLink) {
  EXPECT_THROW(PrefetchPlanner(PlannerConfig{0.0, 10}), UsageError);
  EXPECT_THROW(PrefetchPlanner(PlannerConfig{1.0, 0}), UsageError);
}

}  // namespace
}  // namespace moex
