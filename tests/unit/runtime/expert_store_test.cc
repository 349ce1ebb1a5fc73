// ExpertStore on the CPU backend: split loads copy only the rows the host does not compute (take_over, which
// needs a copy path the test can hold, is in cpu_experts_test.cc).
#include <algorithm>
#include <cstring>
#include <memory>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include "moex/backend/cpu/cpu_backend.h"
#include "moex/moe/expert_store.h"

namespace moex {
namespace {

struct HostExperts {
  std::vector<HostTensor> tensors;
  std::vector<std::vector<ExpertWeights>> layers;
};

// One layer of num_experts f32 experts, gate/up [ffn, hidden] and down [hidden, ffn], each value distinct.
HostExperts make_experts(int num_experts, int64_t hidden, int64_t ffn) {
  HostExperts out;
  out.tensors.reserve(static_cast<size_t>(3 * num_experts));
  out.layers.resize(1);
  float next = 0;
  for (int expert = 0; expert < num_experts; ++expert) {
    ExpertWeights weights;
    for (TensorView* view : {&weights.gate, &weights.up, &weights.down}) {
      const Shape shape = view == &weights.down ? Shape{hidden, ffn} : Shape{ffn, hidden};
      out.tensors.emplace_back(DType::kF32, shape);
      float* data = out.tensors.back().view().as<float>();
      for (int64_t idx = 0; idx < shape.numel(); ++idx) data[idx] = next++ * 1e-3f;
      *view = out.tensors.back().view();
    }
    out.layers[0].push_back(weights);
  }
  return out;
}

bool same(const TensorView& a, const TensorView& b) {
  return a.nbytes() == b.nbytes() && std::memcmp(a.data, b.data, a.nbytes()) == 0;
}

TEST(ExpertStore, SplitLoadCopiesOnlyTheRowsTheHostDoesNotCompute) {
  const HostExperts experts = make_experts(2, 64, 40);
  auto backend = make_cpu_backend(1);
  ExpertStore store(*backend, experts.layers, [](ExpertKey) { return std::string("expert"); }, false);
  const ExpertKey key{0, 1};
  const ExpertWeights got = store.load_split(key, 16);
  store.wait_loads();
  const ExpertWeights& want = experts.layers[0][1];
  EXPECT_EQ(store.host_rows(key), 16);
  EXPECT_EQ(got.gate.shape, want.gate.shape);
  EXPECT_TRUE(same(got.gate.rows(16, 24), want.gate.rows(16, 24)));
  EXPECT_TRUE(same(got.up.rows(16, 24), want.up.rows(16, 24)));
  EXPECT_TRUE(same(got.down, want.down));
  const ExpertStoreStats stats = store.stats();
  EXPECT_EQ(stats.bytes_moved, (2 * 24 * 64 + 64 * 40) * 4);
  EXPECT_EQ(stats.split_loads, 1);
  store.free(key);
  EXPECT_EQ(store.host_rows(key), 0);
}

// Slots hold gate, up and down side by side (one allocation per reserve_slots call, or per slot made on demand):
// every loaded expert reads back exactly, each tensor starts 256-byte aligned within its slot, and no two loaded
// tensors overlap. An odd ffn (40 x 63 f32 = 10080 bytes) makes the alignment padding matter.
TEST(ExpertStore, SlotsHoldEveryLoadedExpertInDisjointAlignedRanges) {
  const HostExperts experts = make_experts(5, 63, 40);
  auto backend = make_cpu_backend(1);
  ExpertStore store(*backend, experts.layers, [](ExpertKey) { return std::string("expert"); }, false);
  store.reserve_slots(3, 0);  // the other two are made on demand
  std::vector<ExpertWeights> loaded;
  for (int32_t expert = 0; expert < 5; ++expert) loaded.push_back(store.load({0, expert}));
  store.wait_loads();
  std::vector<std::pair<const char*, const char*>> ranges;
  for (int32_t expert = 0; expert < 5; ++expert) {
    const ExpertWeights& want = experts.layers[0][expert];
    EXPECT_TRUE(same(loaded[expert].gate, want.gate)) << expert;
    EXPECT_TRUE(same(loaded[expert].up, want.up)) << expert;
    EXPECT_TRUE(same(loaded[expert].down, want.down)) << expert;
    const char* base = static_cast<const char*>(loaded[expert].gate.data);
    for (const TensorView* view : {&loaded[expert].gate, &loaded[expert].up, &loaded[expert].down}) {
      const char* begin = static_cast<const char*>(view->data);
      EXPECT_EQ((begin - base) % 256, 0) << expert;
      ranges.emplace_back(begin, begin + view->nbytes());
    }
  }
  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); ++i) EXPECT_LE(ranges[i - 1].second, ranges[i].first) << i;
}

}  // namespace
}  // namespace moex
