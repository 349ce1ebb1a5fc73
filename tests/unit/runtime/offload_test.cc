// Expert offloading on the CPU backend (disk mmap -> bounded host-RAM slots): outputs identical to the
// fully resident run for every family and policy, the expected hit/miss counts, a clear error for a
// budget below one layer's top-k, and corrupt expert weights reported instead of served.
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>

#include <gtest/gtest.h>

#include "moex/core/error.h"
#include "moex/io/safetensors.h"
#include "moex/model/model.h"
#include "moex/moe/offload_provider.h"
#include "moex/runtime/engine.h"
#include "unit/model/fixture_util.h"
#include "unit/safetensors_writer.h"

namespace moex {
namespace {

struct RunOutput {
  std::vector<float> logits;
  std::vector<int32_t> greedy;
  ExpertProviderStats stats;
};

RunOutput run(const Model& model, const std::vector<int32_t>& prompt, int64_t budget, const std::string& policy,
              bool per_layer = false, bool scan_steps = false, int64_t stream_wave_bytes = 0) {
  EngineOptions options;
  options.num_threads = 2;
  options.scan_steps = scan_steps;
  options.stream_wave_bytes = stream_wave_bytes;
  options.expert_budget_bytes = budget;
  options.cache_policy = policy;
  options.per_layer_cache = per_layer;
  Engine engine(model, options);
  RunOutput out;
  out.logits = engine.prompt_logits(prompt);
  GenerationOptions greedy;
  greedy.max_new_tokens = 12;
  greedy.stop_at_eos = false;
  out.greedy = engine.generate(prompt, greedy).output_ids;
  out.stats = engine.experts().stats();
  return out;
}

class OffloadMatchesResident : public ::testing::TestWithParam<std::string> {};

TEST_P(OffloadMatchesResident, EveryPolicyAndBudget) {
  const auto dir = test::fixtures_root() / GetParam();
  auto model = Model::load(dir.string());
  const auto prompt = test::reference_prompt(dir);
  const ModelConfig& cfg = model->config();
  const int64_t expert_bytes = static_cast<int64_t>(cfg.expert_bytes());
  const RunOutput resident = run(*model, prompt, 0, "lru");
  const int64_t all_experts = cfg.num_moe_layers() * cfg.num_experts;
  for (const std::string policy : {"lru", "lfu", "activation"}) {
    for (int64_t slots : {cfg.top_k, cfg.top_k + 1, all_experts / 2, all_experts}) {
      // Scan steps as they fit, and streamed in waves of one expert (where three such waves leave room).
      for (int scan : {0, 1, 2}) {
        SCOPED_TRACE(policy + " with " + std::to_string(slots) + " expert slots" +
                     (scan == 1 ? ", scan steps" : scan == 2 ? ", streamed scan steps" : ""));
        RunOutput offloaded =
            run(*model, prompt, slots * expert_bytes, policy, false, scan > 0, scan == 2 ? 1 : 0);
        ASSERT_EQ(offloaded.logits.size(), resident.logits.size());
        // Waves change only the order of the expert sum in prefill: float rounding, nothing more.
        EXPECT_LT(test::max_abs_diff(offloaded.logits, resident.logits), 1e-5);
        EXPECT_EQ(offloaded.greedy, resident.greedy);
        EXPECT_GT(offloaded.stats.misses, 0);
        // Scan steps prefetch the next layer without a predictor; a prefetch cancelled before its copy
        // finished moves no counted bytes.
        EXPECT_GE(offloaded.stats.bytes_moved, offloaded.stats.misses * expert_bytes);
        EXPECT_LE(offloaded.stats.bytes_moved,
                  (offloaded.stats.misses + offloaded.stats.prefetch_issued) * expert_bytes);
        // Nothing is evicted with room for every expert: each one misses at most once.
        if (slots == all_experts) {
          EXPECT_LE(offloaded.stats.misses, all_experts);
        }
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Families, OffloadMatchesResident,
                         ::testing::Values("mixtral", "qwen2_moe", "qwen3_moe", "olmoe"),
                         [](const auto& info) { return info.param; });

// --pack-experts: the slots get the unpacked bf16 rows, so the outputs are the resident run's, and the host bytes
// moved are the packed ones (~3/4 of the bf16 bytes; every policy sees the same misses either way).
TEST(Offload, PackedExpertsMatchTheResidentRunWithAQuarterFewerBytes) {
  for (const char* fixture : {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe"}) {
    SCOPED_TRACE(fixture);
    const auto dir = test::fixtures_root() / fixture;
    auto model = Model::load(dir.string());
    LoadOptions load;
    load.pack_experts = true;
    auto packed = Model::load(dir.string(), load);
    const auto prompt = test::reference_prompt(dir);
    const ModelConfig& cfg = model->config();
    const int64_t budget = (cfg.top_k + 1) * static_cast<int64_t>(cfg.expert_bytes());
    const RunOutput resident = run(*model, prompt, 0, "lru");
    const RunOutput bf16 = run(*model, prompt, budget, "lru");
    const RunOutput got = run(*packed, prompt, budget, "lru");
    EXPECT_LT(test::max_abs_diff(got.logits, resident.logits), 1e-5);
    EXPECT_EQ(got.greedy, resident.greedy);
    EXPECT_EQ(got.stats.misses, bf16.stats.misses);
    const double ratio = static_cast<double>(got.stats.bytes_moved) / static_cast<double>(bf16.stats.bytes_moved);
    // 0.75, plus each row's 4-byte exception index: 3% of a 64-column fixture row, 0.05% of Mixtral's 4096.
    EXPECT_GT(ratio, 0.74);
    EXPECT_LT(ratio, 0.80);
  }
}

// Packing is for offloading: a packed model without an expert budget is refused, not run from null views.
TEST(Offload, PackedExpertsNeedABudget) {
  LoadOptions load;
  load.pack_experts = true;
  auto model = Model::load((test::fixtures_root() / "mixtral").string(), load);
  EngineOptions options;
  options.num_threads = 1;
  EXPECT_THROW(Engine(*model, options), UsageError);
}

TEST(Offload, PrefetchKeepsOutputsAndCountsPredictions) {
  const auto dir = test::fixtures_root() / "qwen3_moe";
  auto model = Model::load(dir.string());
  const ModelConfig& cfg = model->config();
  std::vector<int32_t> prompt = {7, 11, 13};
  const RunOutput resident = run(*model, prompt, 0, "lru");
  for (const std::string predictor : {"frequency", "stride", "affinity", "eam", "bayes", "pregate"}) {
    SCOPED_TRACE(predictor);
    EngineOptions options;
    options.num_threads = 2;
    options.expert_budget_bytes = (cfg.top_k + 4) * static_cast<int64_t>(cfg.expert_bytes());
    options.predictor = predictor;
    options.lookahead_layers = 1;
    Engine engine(*model, options);
    EXPECT_EQ(engine.prompt_logits(prompt), resident.logits);
    GenerationOptions greedy;
    greedy.max_new_tokens = 12;
    greedy.stop_at_eos = false;
    for (int repeat = 0; repeat < 3; ++repeat) EXPECT_EQ(engine.generate(prompt, greedy).output_ids, resident.greedy);
    const ExpertProviderStats stats = engine.experts().stats();
    EXPECT_LE(stats.prefetch_used, stats.prefetch_issued);
    EXPECT_EQ(stats.bytes_moved % static_cast<int64_t>(cfg.expert_bytes()), 0);
    if (predictor == "frequency" || predictor == "pregate") {
      EXPECT_GT(stats.prefetch_issued, 0);
    }
  }
}

// A prefill of many tokens routes to every expert of every layer: a cyclic scan longer than the cache. With a
// third of the experts' room, LRU hit nothing on a repeated prompt; the scan rule keeps a part resident.
TEST(Offload, RepeatedPrefillKeepsExpertsAcrossPrompts) {
  auto model = Model::load((test::fixtures_root() / "mixtral").string());
  const ModelConfig& cfg = model->config();
  const std::vector<int32_t> prompt = test::every_expert_prompt(3, 11);
  EngineOptions resident_options;
  resident_options.num_threads = 2;
  const std::vector<float> want = Engine(*model, resident_options).prompt_logits(prompt);
  const int64_t all_experts = cfg.num_moe_layers() * cfg.num_experts;
  for (const std::string policy : {"lru", "lfu", "activation"}) {
    SCOPED_TRACE(policy);
    EngineOptions options = resident_options;
    options.scan_steps = true;
    options.expert_budget_bytes = (all_experts / 3) * static_cast<int64_t>(cfg.expert_bytes());
    options.cache_policy = policy;
    Engine engine(*model, options);
    // The layers run in waves here, which changes only the order of the expert sum: float rounding.
    EXPECT_LT(test::max_abs_diff(engine.prompt_logits(prompt), want), 1e-5);
    const int64_t first_hits = engine.experts().stats().hits;
    EXPECT_LT(test::max_abs_diff(engine.prompt_logits(prompt), want), 1e-5);
    EXPECT_GT(engine.experts().stats().hits, first_hits);
  }
}

// While a prefill step runs a layer, the next layer's experts are prefetched with no predictor; outputs stay the
// resident run's.
TEST(Offload, PrefillPrefetchesTheNextLayerWithoutAPredictor) {
  auto model = Model::load((test::fixtures_root() / "mixtral").string());
  const ModelConfig& cfg = model->config();
  const std::vector<int32_t> prompt = test::every_expert_prompt(5, 13);
  EngineOptions options;
  options.num_threads = 2;
  const std::vector<float> want = Engine(*model, options).prompt_logits(prompt);
  // One layer's experts plus four: the layer runs in one wave and leaves room to prefetch the next.
  options.expert_budget_bytes = (cfg.num_experts + 4) * static_cast<int64_t>(cfg.expert_bytes());
  options.scan_steps = true;
  ASSERT_EQ(options.predictor, "none");
  Engine engine(*model, options);
  EXPECT_EQ(engine.prompt_logits(prompt), want);
  const ExpertProviderStats stats = engine.experts().stats();
  EXPECT_GT(stats.prefetch_issued, 0);
  EXPECT_GT(stats.prefetch_used, 0);
  EXPECT_GT(stats.hits, 0);  // the prefetched experts of layer 1
}

TEST(Offload, FullBudgetMissesOncePerDistinctExpert) {
  const auto dir = test::fixtures_root() / "mixtral";
  auto model = Model::load(dir.string());
  const ModelConfig& cfg = model->config();
  // Decode-only run (prompt of one token): each step touches top_k distinct experts per layer.
  EngineOptions options;
  options.num_threads = 1;
  options.expert_budget_bytes = cfg.num_moe_layers() * cfg.num_experts * static_cast<int64_t>(cfg.expert_bytes());
  Engine engine(*model, options);
  class Collect : public RouterObserver {
   public:
    void on_router(int32_t layer, int64_t, std::span<const float>, const Routing& routing) override {
      for (int32_t id : routing.expert_ids) touched.insert({layer, id});
      steps += 1;
    }
    std::set<std::pair<int32_t, int32_t>> touched;
    int64_t steps = 0;
  } collect;
  std::vector<int32_t> token = {5};
  std::vector<float> logits;
  for (int64_t pos = 0; pos < 20; ++pos) {
    engine.decoder().forward(token, pos, false, &logits, &collect);
    token[0] = static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
  }
  const ExpertProviderStats stats = engine.experts().stats();
  EXPECT_EQ(stats.misses, static_cast<int64_t>(collect.touched.size()));
  EXPECT_EQ(stats.hits + stats.misses, collect.steps * cfg.top_k);
}

TEST(Offload, BudgetBelowTopKNamesTheMinimum) {
  auto model = Model::load((test::fixtures_root() / "qwen3_moe").string());
  EngineOptions options;
  options.expert_budget_bytes = static_cast<int64_t>(model->config().expert_bytes()) * model->config().top_k - 1;
  try {
    Engine engine(*model, options);
    FAIL() << "expected BudgetError";
  } catch (const BudgetError& e) {
    EXPECT_NE(std::string(e.what()).find("cannot hold one layer's top-4 experts; the minimum is"), std::string::npos)
        << e.what();
  }
}

TEST(Offload, UnknownPolicyIsAUsageError) {
  auto model = Model::load((test::fixtures_root() / "mixtral").string());
  EngineOptions options;
  options.expert_budget_bytes = 1 << 30;
  options.cache_policy = "random";
  EXPECT_THROW(Engine(*model, options), UsageError);
}

TEST(Offload, CorruptExpertWeightsAreReportedNotServed) {
  namespace fs = std::filesystem;
  fs::path dir = test::temp_dir("corrupt_expert");
  fs::copy(test::fixtures_root() / "mixtral", dir, fs::copy_options::recursive | fs::copy_options::overwrite_existing);
  size_t offset = 0;
  {
    SafetensorsFile file((dir / "model.safetensors").string());
    TensorView w = file.tensor("model.layers.1.block_sparse_moe.experts.3.w2.weight");
    std::ifstream in(dir / "model.safetensors", std::ios::binary);
    std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    // The tensor's first bytes locate it in the file (random weights make them unique).
    offset = bytes.find(std::string(static_cast<const char*>(w.data), 16));
  }
  ASSERT_NE(offset, std::string::npos);
  {
    std::fstream out(dir / "model.safetensors", std::ios::binary | std::ios::in | std::ios::out);
    out.seekp(static_cast<std::streamoff>(offset + 10));
    const char nan_bf16[2] = {static_cast<char>(0xc0), static_cast<char>(0x7f)};  // 0x7fc0: a bf16 NaN
    out.write(nan_bf16, 2);
  }
  auto model = Model::load(dir.string());
  EngineOptions options;
  options.num_threads = 1;
  options.expert_budget_bytes = static_cast<int64_t>(model->config().expert_bytes()) * 16;
  Engine engine(*model, options);
  std::vector<int32_t> prompt(64);
  for (size_t idx = 0; idx < prompt.size(); ++idx) prompt[idx] = static_cast<int32_t>(3 + idx * 7 % 500);
  try {
    engine.prompt_logits(prompt);  // 64 tokens route to every expert of layer 1, including expert 3
    FAIL() << "expected IoError";
  } catch (const IoError& e) {
    EXPECT_NE(std::string(e.what()).find("MoE layer 1 expert 3: expert weights contain NaN or Inf"), std::string::npos)
        << e.what();
  }
}

TEST(Offload, ParseByteSize) {
  EXPECT_EQ(parse_byte_size("16GiB", "--x"), int64_t{16} << 30);
  EXPECT_EQ(parse_byte_size("512MiB", "--x"), int64_t{512} << 20);
  EXPECT_EQ(parse_byte_size("1.5KiB", "--x"), 1536);
  EXPECT_EQ(parse_byte_size("2GB", "--x"), 2000000000);
  EXPECT_EQ(parse_byte_size("4096", "--x"), 4096);
  EXPECT_THROW(parse_byte_size("lots", "--host-memory"), UsageError);
  EXPECT_THROW(parse_byte_size("3 parsecs", "--host-memory"), UsageError);
  EXPECT_THROW(parse_byte_size("-1GiB", "--host-memory"), UsageError);
}

}  // namespace
}  // namespace moex
