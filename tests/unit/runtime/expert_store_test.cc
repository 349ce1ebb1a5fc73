// ExpertStore on the CPU backend: split loads copy only the rows the host does not compute (take_over, which
// needs a copy path the test can hold, is in cpu_experts_test.cc).
#include <algorithm>
#include <cstring>
#include <memory>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include "moex/backend/cpu/cpu_backend.h"
#include "moex/core/dtype.h"
#include "moex/core/error.h"
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

// One layer of bf16 experts (weight-like values) packed, for the store's packed source tier; *values keeps the bf16.
struct PackedExperts {
  std::vector<std::vector<uint16_t>> values;  // [expert * 3 + part]
  std::vector<std::unique_ptr<PackedExpert>> packed;
  std::vector<std::vector<ExpertWeights>> layers{1};
};
PackedExperts make_packed_experts(int num_experts, int64_t hidden, int64_t ffn) {
  PackedExperts out;
  uint32_t state = 12345;
  for (int expert = 0; expert < num_experts; ++expert) {
    auto packed = std::make_unique<PackedExpert>();
    ExpertWeights weights;
    for (int part = 0; part < 3; ++part) {
      const Shape shape = part == 2 ? Shape{hidden, ffn} : Shape{ffn, hidden};
      std::vector<uint16_t> values(static_cast<size_t>(shape.numel()));
      for (uint16_t& v : values) {
        state = state * 1664525u + 1013904223u;
        v = f32_to_bf16(static_cast<float>(static_cast<int32_t>(state)) * 1e-11f);  // |v| < 0.0215
      }
      PackedBf16& matrix = part == 0 ? packed->gate : part == 1 ? packed->up : packed->down;
      matrix = pack_bf16(values.data(), shape[0], shape[1]);
      (part == 0 ? weights.gate : part == 1 ? weights.up : weights.down) = TensorView(nullptr, DType::kBF16, shape);
      out.values.push_back(std::move(values));
    }
    weights.packed = packed.get();
    out.packed.push_back(std::move(packed));
    out.layers[0].push_back(weights);
  }
  return out;
}

bool holds(const TensorView& got, const std::vector<uint16_t>& want, int64_t first_row = 0) {
  const int64_t cols = got.dim(1);
  return std::memcmp(got.as<uint16_t>() + first_row * cols, want.data() + first_row * cols,
                     (got.numel() - first_row * cols) * sizeof(uint16_t)) == 0;
}

// A packed source tier: loads (whole, split, and through the prefetch thread) give the bf16 rows in the slots,
// the store counts the packed bytes it moved, and a corrupt packing or a NaN is reported on first use.
TEST(ExpertStore, PackedSourceFillsSlotsWithTheBf16RowsAndCountsPackedBytes) {
  const int64_t hidden = 96, ffn = 40;
  PackedExperts experts = make_packed_experts(4, hidden, ffn);
  auto backend = make_cpu_backend(1);
  ExpertStore store(*backend, experts.layers, [](ExpertKey key) { return fmt::format("expert {}", key.expert_idx); },
                    /*verify=*/true);
  EXPECT_TRUE(store.packed());
  EXPECT_EQ(store.expert_bytes(0), 3 * hidden * ffn * 2);
  int64_t mean = 0;
  for (const auto& packed : experts.packed) mean += packed->bytes();
  EXPECT_EQ(store.host_bytes(0), mean / 4);
  EXPECT_LT(store.host_bytes(0), store.expert_bytes(0) * 4 / 5);

  const ExpertWeights whole = store.load(ExpertKey{0, 0});
  const ExpertWeights split = store.load_split(ExpertKey{0, 1}, 16);
  store.load_async(ExpertKey{0, 2});
  const ExpertWeights async = store.wait(ExpertKey{0, 2});
  store.wait_loads();
  EXPECT_TRUE(holds(whole.gate, experts.values[0]) && holds(whole.up, experts.values[1]) &&
              holds(whole.down, experts.values[2]));
  EXPECT_TRUE(holds(split.gate, experts.values[3], 16) && holds(split.up, experts.values[4], 16) &&
              holds(split.down, experts.values[5]));
  EXPECT_TRUE(holds(async.gate, experts.values[6]) && holds(async.up, experts.values[7]) &&
              holds(async.down, experts.values[8]));
  const PackedExpert& second = *experts.packed[1];
  const int64_t want = experts.packed[0]->bytes() - 3 * 16 + packed_bf16_rows_bytes(second.gate, 16, ffn) +
                       packed_bf16_rows_bytes(second.up, 16, ffn) + packed_bf16_rows_bytes(second.down, 0, hidden) +
                       experts.packed[2]->bytes() - 3 * 16;  // each copy moves all but the exponent tables
  EXPECT_EQ(store.stats().bytes_moved, want);

  auto load_error = [&] {
    try {
      store.load(ExpertKey{0, 3});
    } catch (const IoError& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  experts.packed[3]->down.exc_begin.back() += 1;  // an exception index past its list
  EXPECT_NE(load_error().find("expert 3: packed expert weights are corrupt"), std::string::npos) << load_error();
  experts.packed[3]->down.exc_begin.back() -= 1;
  experts.packed[3]->up.exponent[0] = 0xff;  // the most frequent exponent decodes as NaN/Inf
  EXPECT_NE(load_error().find("NaN or Inf"), std::string::npos) << load_error();
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
