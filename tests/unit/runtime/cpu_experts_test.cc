// CPU execution of missed experts next to a GPU backend, checked without a GPU: a stand-in "device"
// backend that computes with the CPU backend but tags its memory as device memory and refuses host
// views, so the decoder must send every expert the provider hands over as a host view to the host
// backend, and the sum of both paths must equal the resident run. Also split experts (part CPU, part
// copied) and the expert store's take-over of an unfinished prefetch.
#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <mutex>
#include <thread>

#include <gtest/gtest.h>

#include "moex/backend/cpu/cpu_backend.h"
#include "moex/model/model.h"
#include "moex/moe/expert_store.h"
#include "moex/moe/offload_provider.h"
#include "moex/runtime/engine.h"
#include "moex/runtime/sampler.h"
#include "unit/model/fixture_util.h"

namespace moex {
namespace {

TensorView as_host(TensorView view) {
  view.device = Device::kCpu;
  return view;
}
TensorView as_device(TensorView view) {
  view.device = Device::kCuda;
  return view;
}

class StandInDevice : public Backend {
 public:
  StandInDevice() : cpu_(make_cpu_backend(1)) {}
  Device device() const override { return Device::kCuda; }
  std::string name() const override { return "stand-in device"; }
  std::unique_ptr<Buffer> alloc(DType dtype, Shape shape) override {
    if (shape.ndim == 2) {  // expert slots (a row a slot); the decoder's scratch is flat
      ++matrix_allocs;
      matrix_bytes += shape.numel() * static_cast<int64_t>(dtype_size(dtype));
    }
    auto buffer = cpu_->alloc(dtype, shape);
    buffer->view = as_device(buffer->view);
    return buffer;
  }
  TensorView upload_weight(const TensorView& host, const std::string&) override {
    uploads_.emplace_back(host.dtype, host.shape);
    std::memcpy(uploads_.back().view().data, host.data, host.nbytes());
    return as_device(uploads_.back().view());
  }
  TensorView map_host_weight(const TensorView& host, const std::string& name) override {
    mapped.push_back(name);
    return upload_weight(host, name);
  }
  void copy_to_host(const TensorView& src, void* dst) override { std::memcpy(dst, device(src, "copy_to_host").data, src.nbytes()); }
  void copy_from_host(const void* src, const TensorView& dst) override { std::memcpy(device(dst, "copy_from_host").data, src, dst.nbytes()); }
  void embedding(std::span<const int32_t> ids, const TensorView& table, const TensorView& out) override {
    cpu_->embedding(ids, device(table, "embedding"), device(out, "embedding"));
  }
  void linear(const TensorView& x, const TensorView& w, const TensorView* bias, const TensorView& out) override {
    TensorView b = bias ? device(*bias, "linear") : TensorView{};
    cpu_->linear(device(x, "linear"), device(w, "linear"), bias ? &b : nullptr, device(out, "linear"));
  }
  void rms_norm(const TensorView& x, const TensorView& w, float eps, const TensorView& out) override {
    cpu_->rms_norm(device(x, "rms_norm"), device(w, "rms_norm"), eps, device(out, "rms_norm"));
  }
  void add(const TensorView& a, const TensorView& b, const TensorView& out) override {
    cpu_->add(device(a, "add"), device(b, "add"), device(out, "add"));
  }
  void clamp(const TensorView& x, float limit) override { cpu_->clamp(device(x, "clamp"), limit); }
  void rope(const TensorView& x, std::span<const int32_t> positions, int64_t rotary_dim, double theta) override {
    cpu_->rope(device(x, "rope"), positions, rotary_dim, theta);
  }
  void prepare_kv_step(const KvStep& step) override { cpu_->prepare_kv_step(step); }
  void kv_write(const KvStep& step, const TensorView& k, const TensorView& v, const TensorView& kp,
                const TensorView& vp) override {
    cpu_->kv_write(step, device(k, "kv_write"), device(v, "kv_write"), device(kp, "kv_write"), device(vp, "kv_write"));
  }
  void attention(const KvStep& step, const TensorView& q, const TensorView& kp, const TensorView& vp, float scale,
                 const TensorView& out) override {
    cpu_->attention(step, device(q, "attention"), device(kp, "attention"), device(vp, "attention"), scale,
                    device(out, "attention"));
  }
  void silu_mul(const TensorView& gate, const TensorView& up, const TensorView& out) override {
    cpu_->silu_mul(device(gate, "silu_mul"), device(up, "silu_mul"), device(out, "silu_mul"));
  }
  void add_sigmoid_gated(const TensorView& acc, const TensorView& x, const TensorView& gate) override {
    cpu_->add_sigmoid_gated(device(acc, "add_sigmoid_gated"), device(x, "add_sigmoid_gated"), device(gate, "add_sigmoid_gated"));
  }
  void route(const TensorView& logits, int64_t top_k, RouterScoring scoring, bool normalize, Routing* routing) override {
    cpu_->route(device(logits, "route"), top_k, scoring, normalize, routing);
  }
  void moe_experts(const TensorView& x, const Routing& routing, std::span<const ExpertWeights> experts,
                   const TensorView& out) override {
    std::vector<ExpertWeights> table(experts.begin(), experts.end());
    std::vector<uint8_t> unwrapped(table.size(), 0);
    for (int32_t id : routing.expert_ids)
      if (id >= 0 && !unwrapped[id]++) table[id] = ExpertWeights{device(table[id].gate, "moe_experts"), device(table[id].up, "moe_experts"), device(table[id].down, "moe_experts")};
    cpu_->moe_experts(device(x, "moe_experts"), routing, table, device(out, "moe_experts"));
  }
  int64_t host_views_refused = 0;
  int64_t matrix_allocs = 0;
  int64_t matrix_bytes = 0;
  std::vector<std::string> mapped;  // weights placed through map_host_weight

 protected:
  // Unwraps a view that must be device memory; a host view reaching a device op is a routing bug.
  TensorView device(const TensorView& view, const char* op) const {
    EXPECT_EQ(view.device, Device::kCuda) << "a host view reached the device backend's " << op;
    if (view.device != Device::kCuda) ++const_cast<StandInDevice*>(this)->host_views_refused;
    return as_host(view);
  }

 private:
  std::unique_ptr<Backend> cpu_;
  std::vector<HostTensor> uploads_;
};

EngineOptions one_thread() {
  EngineOptions options;
  options.num_threads = 1;
  return options;
}

// A fixture as these tests use it: the model, its reference prompt, and the resident run (one thread) that
// the offloaded runs must reproduce.
struct FixtureRun {
  explicit FixtureRun(const char* name)
      : model(Model::load((test::fixtures_root() / name).string())),
        prompt(test::reference_prompt(test::fixtures_root() / name)),
        resident(*model, one_thread()) {}
  std::unique_ptr<Model> model;
  std::vector<int32_t> prompt;
  Engine resident;
};

// Offloading onto a stand-in device with room for top_k + spare experts, misses allowed on the host CPU.
EngineOptions cpu_expert_options(const ModelConfig& cfg, int64_t spare) {
  EngineOptions options = one_thread();
  options.expert_budget_bytes = (cfg.top_k + spare) * static_cast<int64_t>(cfg.expert_bytes());
  options.cpu_experts = true;
  return options;
}

TEST(CpuExperts, MissedExpertsRunOnTheHostAndSumToTheResidentRun) {
  for (const char* fixture : {"mixtral", "qwen2_moe", "olmoe"}) {
    SCOPED_TRACE(fixture);
    FixtureRun run(fixture);
    const std::vector<int32_t>& prompt = run.prompt;
    const std::vector<float> want = run.resident.prompt_logits(prompt);
    GenerationOptions greedy;
    greedy.max_new_tokens = 10;
    greedy.stop_at_eos = false;
    const auto want_ids = run.resident.generate(prompt, greedy).output_ids;

    EngineOptions options = cpu_expert_options(run.model->config(), 1);
    options.cpu_max_tokens = 64;  // also the prefill, so both paths run in the same step
    auto device = std::make_unique<StandInDevice>();
    StandInDevice* device_ptr = device.get();
    Engine engine(*run.model, options, std::move(device));
    EXPECT_LT(test::max_abs_diff(engine.prompt_logits(prompt), want), 1e-5);
    EXPECT_EQ(engine.generate(prompt, greedy).output_ids, want_ids);
    const ExpertProviderStats stats = engine.experts().stats();
    EXPECT_GT(stats.cpu_computed, 0);
    EXPECT_GT(stats.cpu_ms, 0);  // the host's expert time is counted
    EXPECT_LT(stats.cpu_computed, stats.misses);  // the cost model also sends some misses over the copy path
    EXPECT_EQ(device_ptr->host_views_refused, 0);
  }
}

// Offloading keeps an untied token embedding in host memory (map_host_weight), and the budget the CLI derives
// from --gpu-memory (resident_weight_bytes with offloading) leaves its bytes to experts; a tied one is the lm_head
// and stays on the device, as does every embedding when experts are resident.
TEST(CpuExperts, OffloadingMapsAnUntiedEmbeddingToHostMemory) {
  for (const auto& [fixture, tied] : {std::pair{"mixtral", false}, std::pair{"qwen3_moe_tied", true}}) {
    SCOPED_TRACE(fixture);
    FixtureRun run(fixture);
    const ModelConfig& cfg = run.model->config();
    ASSERT_EQ(cfg.tie_word_embeddings, tied);
    {
      auto device = std::make_unique<StandInDevice>();
      StandInDevice* device_ptr = device.get();
      Engine engine(*run.model, one_thread(), std::move(device));
      EXPECT_TRUE(device_ptr->mapped.empty());
    }
    auto device = std::make_unique<StandInDevice>();
    StandInDevice* device_ptr = device.get();
    Engine engine(*run.model, cpu_expert_options(cfg, 1), std::move(device));
    EXPECT_EQ(device_ptr->mapped, tied ? std::vector<std::string>{} : std::vector<std::string>{"embed"});
    EXPECT_LT(test::max_abs_diff(engine.prompt_logits(run.prompt), run.resident.prompt_logits(run.prompt)), 1e-5);
    const int64_t table = cfg.vocab_size * cfg.hidden_size * static_cast<int64_t>(dtype_size(cfg.weight_dtype));
    EXPECT_EQ(Engine::resident_weight_bytes(cfg, /*offloading=*/true),
              Engine::resident_weight_bytes(cfg) - (tied ? 0 : table));
  }
}

// One MoE layer of `count` f32 experts held in *tensors, for tests that drive an OffloadingExpertProvider
// directly.
std::vector<std::vector<ExpertWeights>> one_layer_of_experts(int count, int64_t hidden, int64_t ffn,
                                                             std::vector<HostTensor>* tensors) {
  std::vector<std::vector<ExpertWeights>> layers(1);
  tensors->reserve(tensors->size() + 3 * static_cast<size_t>(count));
  for (int expert = 0; expert < count; ++expert) {
    ExpertWeights weights;
    for (TensorView* view : {&weights.gate, &weights.up, &weights.down}) {
      tensors->emplace_back(DType::kF32, view == &weights.down ? Shape{hidden, ffn} : Shape{ffn, hidden});
      *view = tensors->back().view();
    }
    layers[0].push_back(weights);
  }
  return layers;
}

// --balance-prefetch: with a link far slower than the CPU every prefetch would make the link the long path,
// so after the first layer's booking the provider skips them; the CPU takes those misses, and the outputs are
// the resident run's either way.
TEST(CpuExperts, BalancedPrefetchSkipsPrefetchesWhileTheLinkIsTheLongPath) {
  FixtureRun run("mixtral");
  GenerationOptions greedy;
  greedy.max_new_tokens = 12;
  greedy.stop_at_eos = false;
  const auto want_ids = run.resident.generate(run.prompt, greedy).output_ids;

  ExpertProviderStats stats[2];
  for (bool balance : {false, true}) {
    SCOPED_TRACE(balance ? "balanced" : "plain");
    EngineOptions options = cpu_expert_options(run.model->config(), 2);
    // The last token's experts at the layer: the CPU ran them, so they are not resident and every guess that
    // changes is a prefetch to issue or skip (the layer's most frequent experts would be resident since the
    // prompt: CPU-run misses evict nothing).
    options.predictor = "stride";
    options.copy_gbs = 1e-4;  // a copy of this fixture's expert books ~150 ms on the link
    options.balance_prefetch = balance;
    auto device = std::make_unique<StandInDevice>();
    StandInDevice* device_ptr = device.get();
    Engine engine(*run.model, options, std::move(device));
    EXPECT_EQ(engine.generate(run.prompt, greedy).output_ids, want_ids);
    EXPECT_EQ(device_ptr->host_views_refused, 0);
    stats[balance] = engine.experts().stats();
  }
  EXPECT_GT(stats[0].prefetch_issued, 0);
  EXPECT_EQ(stats[0].prefetch_skipped, 0);
  EXPECT_GT(stats[1].prefetch_skipped, 0);
  EXPECT_LT(stats[1].prefetch_issued, stats[0].prefetch_issued);
  EXPECT_LT(stats[1].bytes_moved, stats[0].bytes_moved);  // the slow link carries less
}

// A miss the CPU runs takes no slot: the experts the cache holds stay resident through a step whose misses all
// ran on the host, and hit when they come back (making room for the CPU-run ones would have evicted both).
TEST(CpuExperts, CpuRunMissesEvictNothing) {
  const int64_t hidden = 64, ffn = 128;
  std::vector<HostTensor> tensors;
  const auto layers = one_layer_of_experts(4, hidden, ffn, &tensors);
  StandInDevice device;
  auto store = std::make_unique<ExpertStore>(device, layers, [](ExpertKey) { return std::string("expert"); }, true);
  const int64_t expert_bytes = store->expert_bytes(0);
  OffloadConfig config;
  config.budget_bytes = 2 * expert_bytes;
  config.cpu_experts = true;
  config.split_experts = false;
  config.cpu_max_tokens = 1;
  config.host_read_gbs = 100;
  config.copy_gbs = 1e-3;  // every miss the CPU may take goes to it
  OffloadingExpertProvider provider(std::move(store), /*top_k=*/2, config);
  std::vector<ExpertWeights> experts;
  auto step = [&](int64_t tokens, std::array<int32_t, 2> pair) {
    Routing routing{tokens, 2, {}, {}};
    for (int64_t t = 0; t < tokens; ++t)
      for (int32_t id : pair) {
        routing.expert_ids.push_back(id);
        routing.weights.push_back(0.5f);
      }
    const ExpertProviderStats before = provider.stats();
    provider.acquire(0, routing, TensorView{}, &experts);
    for (int32_t id : pair) EXPECT_TRUE(experts[id].valid()) << id;
    provider.release(0);
    const ExpertProviderStats after = provider.stats();
    return std::pair{after.hits - before.hits, after.cpu_computed - before.cpu_computed};
  };
  // Two tokens per expert: past cpu_max_tokens, so both are copied in and stay.
  EXPECT_EQ(step(2, {0, 1}), (std::pair<int64_t, int64_t>{0, 0}));
  EXPECT_EQ(step(1, {2, 3}), (std::pair<int64_t, int64_t>{0, 2}));  // both on the CPU
  EXPECT_EQ(step(1, {0, 1}), (std::pair<int64_t, int64_t>{2, 0}));  // still resident
  EXPECT_EQ(provider.stats().bytes_moved, 2 * expert_bytes);  // the first step's copies only
  provider.end_sequence();
}

// Holds the expert store's prefetch copies until opened, so that a test can take one over mid-way.
class HeldCopies final : public StandInDevice {
 public:
  void copy_from_host_async_path(const void* src, const TensorView& dst) override {
    {
      std::unique_lock<std::mutex> lock(mutex_);
      opened_.wait(lock, [&] { return open_; });
    }
    copy_from_host(src, dst);
  }
  void open() {
    std::lock_guard<std::mutex> lock(mutex_);
    open_ = true;
    opened_.notify_all();
  }

 private:
  std::mutex mutex_;
  std::condition_variable opened_;
  bool open_ = false;
};

// ExpertStore::take_over: the second prefetch is still queued behind the first, held in its first chunk; the
// first is taken over while held, so it stops after that chunk (when the request lands before the copy is let
// go, as it does but for a scheduler stall of 200 ms) and the rest is enqueued from there. Either way the slots
// must equal the source and every byte be counted once.
TEST(CpuExperts, TakeOverFinishesAPrefetchFromWhereItStopped) {
  const int64_t hidden = 1024, ffn = 2048;  // f32: 8 MiB gate, up and down, 6 chunks of 4 MiB
  std::vector<HostTensor> tensors;
  std::vector<std::vector<ExpertWeights>> layers(1);
  float next = 0;
  for (int expert = 0; expert < 2; ++expert) {
    ExpertWeights weights;
    for (TensorView* view : {&weights.gate, &weights.up, &weights.down}) {
      const Shape shape = view == &weights.down ? Shape{hidden, ffn} : Shape{ffn, hidden};
      tensors.emplace_back(DType::kF32, shape);
      float* data = tensors.back().view().as<float>();
      for (int64_t idx = 0; idx < shape.numel(); ++idx) data[idx] = next++ * 1e-3f;
      *view = tensors.back().view();
    }
    layers[0].push_back(weights);
  }
  HeldCopies device;
  ExpertStore store(device, layers, [](ExpertKey) { return std::string("expert"); }, /*verify=*/true);
  const int64_t expert_bytes = store.expert_bytes(0);
  store.load_async(ExpertKey{0, 0});
  store.load_async(ExpertKey{0, 1});
  int64_t queued = -1, held = -1;
  const ExpertWeights second = store.take_over(ExpertKey{0, 1}, &queued);
  EXPECT_EQ(queued, expert_bytes);
  std::thread opener([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    device.open();
  });
  const ExpertWeights first = store.take_over(ExpertKey{0, 0}, &held);
  opener.join();
  auto same = [](const TensorView& a, const TensorView& b) { return std::memcmp(a.data, b.data, b.nbytes()) == 0; };
  for (const auto& [got, want] : {std::pair{first, layers[0][0]}, std::pair{second, layers[0][1]}})
    EXPECT_TRUE(same(got.gate, want.gate) && same(got.up, want.up) && same(got.down, want.down))
        << "the first expert had " << held << " of " << expert_bytes << " bytes left";
  EXPECT_GE(held, 0);
  EXPECT_LE(held, expert_bytes);
  const ExpertStoreStats stats = store.stats();
  EXPECT_EQ(stats.bytes_moved, 2 * expert_bytes);
  EXPECT_EQ(stats.prefetch_loads, 2);
  store.free(ExpertKey{0, 0});
  store.free(ExpertKey{0, 1});
}

// Rates measured online (OffloadConfig::adapt_rates): the decoder's reports of a layer's host time and wait
// (played here by the test, for a link at 10 GB/s and a CPU at the assumed 50) teach the provider that its
// link is slow, and the cost model then sends the misses it copied to the CPU. Both paths start at 50 GB/s:
// of a step's two misses of 24 MiB experts one runs on the CPU, one is copied (2.5 ms on that link, 2 ms of
// wait after the CPU's 0.5). With fixed rates that split stays; measured, the link falls toward 10 GB/s, and
// below 25 GB/s the second CPU run ends first.
TEST(CpuExperts, MeasuredRatesMoveMissesOffASlowLink) {
  const int64_t hidden = 1024, ffn = 2048;  // f32: 8 MiB gate, up and down
  std::vector<HostTensor> tensors;
  const auto layers = one_layer_of_experts(6, hidden, ffn, &tensors);
  constexpr double kCpuGbs = 50, kLinkGbs = 10;
  int64_t cpu_runs[2] = {0, 0};
  int64_t last_step_copies[2] = {0, 0};
  for (bool adapt : {false, true}) {
    SCOPED_TRACE(adapt ? "adapting" : "fixed");
    StandInDevice device;
    auto store = std::make_unique<ExpertStore>(device, layers, [](ExpertKey) { return std::string("expert"); }, true);
    const double expert_bytes = static_cast<double>(store->expert_bytes(0));
    OffloadConfig config;
    config.budget_bytes = 2 * store->expert_bytes(0);
    config.cpu_experts = true;
    config.split_experts = false;  // whole paths only: the counts below are the choice
    config.host_read_gbs = kCpuGbs;
    config.copy_gbs = 50;
    config.adapt_rates = adapt;
    OffloadingExpertProvider provider(std::move(store), /*top_k=*/2, config);
    std::vector<ExpertWeights> experts;
    for (int step = 0; step < 12; ++step) {
      // Three expert pairs in turn, so that both experts of a step miss while one of each is copied: a CPU-run
      // miss takes no slot, so a step's copied expert stays resident for the next two steps (2 slots), past its
      // pair's next turn with only two pairs. Once every miss runs on the CPU the cache keeps what it holds, and
      // a pair may hit.
      Routing routing{1, 2, {2 * (step % 3), 2 * (step % 3) + 1}, {0.5f, 0.5f}};
      const int64_t hits_before = provider.stats().hits;
      provider.acquire(0, routing, TensorView{}, &experts);
      const int64_t hits = provider.stats().hits - hits_before;
      int64_t on_cpu = 0, on_device = 0;
      for (int32_t id : routing.expert_ids) {
        ASSERT_TRUE(experts[id].valid());
        (experts[id].gate.device == Device::kCpu ? on_cpu : on_device) += 1;
      }
      const int64_t copied = on_device - hits;
      const double cpu_ms = static_cast<double>(on_cpu) * expert_bytes / (kCpuGbs * 1e6);
      const double link_ms = static_cast<double>(copied) * expert_bytes / (kLinkGbs * 1e6);
      if (on_cpu > 0) {  // the decoder reports only layers with a host share
        provider.add_cpu_ms(cpu_ms);
        provider.add_stall_ms(std::max(0.0, link_ms - cpu_ms));
      }
      provider.release(0);
      cpu_runs[adapt] += on_cpu;
      last_step_copies[adapt] = copied;
    }
    const PathRateEstimator& rates = provider.path_rates();
    EXPECT_NEAR(rates.host_read_gbs(), kCpuGbs, 1e-6);  // the CPU ran at the assumed rate
    EXPECT_EQ(provider.stats().model_copy_gbs, rates.copy_gbs());
    EXPECT_EQ(provider.stats().model_host_read_gbs, rates.host_read_gbs());
    if (adapt) {
      EXPECT_LT(rates.copy_gbs(), 25);
      EXPECT_GE(rates.copy_gbs(), kLinkGbs);
      EXPECT_GT(rates.num_link_observations(), 0);
    } else {
      EXPECT_EQ(rates.copy_gbs(), 50);
    }
    provider.end_sequence();
  }
  EXPECT_EQ(last_step_copies[0], 1);  // fixed rates: one miss copied, one on the CPU, to the end
  EXPECT_EQ(last_step_copies[1], 0);  // measured: the slow link carries nothing
  EXPECT_GT(cpu_runs[1], cpu_runs[0]);
}

// Split experts: the CPU computes a missed expert's first intermediate rows while the rest is copied. At
// decode every routed expert has one token, so the cost model splits misses; the bandwidth pairs put the
// split point low, in the middle, and at ffn (only down copied). Logits of the prompt and of every decode
// step must match the resident run.
TEST(CpuExperts, SplitExpertsMatchTheResidentRunStepByStep) {
  struct Bandwidths {
    double host_read_gbs, copy_gbs;
  };
  for (const char* fixture : {"mixtral", "qwen2_moe", "olmoe"}) {
    for (const Bandwidths bandwidths : {Bandwidths{20, 50}, Bandwidths{100, 50}, Bandwidths{120, 50}}) {
      SCOPED_TRACE(::testing::Message() << fixture << " host " << bandwidths.host_read_gbs << " GB/s, copy "
                                        << bandwidths.copy_gbs << " GB/s");
      FixtureRun run(fixture);
      const ModelConfig& cfg = run.model->config();
      const std::vector<int32_t>& prompt = run.prompt;
      Engine& resident = run.resident;
      EngineOptions options = cpu_expert_options(cfg, 1);
      options.cpu_max_tokens = 64;
      options.host_read_gbs = bandwidths.host_read_gbs;
      options.copy_gbs = bandwidths.copy_gbs;
      options.split_overhead_ms = 0;  // the fixture's experts are 15 KB: any overhead outweighs a split
      auto device = std::make_unique<StandInDevice>();
      StandInDevice* device_ptr = device.get();
      Engine engine(*run.model, options, std::move(device));

      std::vector<float> want, got;
      resident.decoder().forward(prompt, 0, /*all_logits=*/true, &want);
      engine.decoder().forward(prompt, 0, /*all_logits=*/true, &got);
      EXPECT_LT(test::max_abs_diff(got, want), 1e-5) << "prompt";
      int64_t position = static_cast<int64_t>(prompt.size());
      for (int step = 0; step < 8; ++step, ++position) {
        const auto last = want.end() - cfg.vocab_size;
        const int32_t token = static_cast<int32_t>(std::max_element(last, want.end()) - last);
        resident.decoder().forward(std::span<const int32_t>(&token, 1), position, false, &want);
        engine.decoder().forward(std::span<const int32_t>(&token, 1), position, false, &got);
        EXPECT_LT(test::max_abs_diff(got, want), 1e-5) << "decode step " << step;
      }
      engine.decoder().end_sequence();
      resident.decoder().end_sequence();
      const ExpertProviderStats stats = engine.experts().stats();
      EXPECT_GT(stats.split_computed, 0);
      // A split copies only the rows the CPU does not compute: fewer bytes than whole copies.
      const int64_t copied = stats.misses - stats.cpu_computed;
      EXPECT_LT(stats.bytes_moved, copied * static_cast<int64_t>(cfg.expert_bytes()));
      EXPECT_GT(stats.bytes_moved, 0);
      EXPECT_EQ(device_ptr->host_views_refused, 0);
    }
  }
}

// --pack-experts next to a device: misses run on the host CPU from the packed source (cpu::packed_linear_block),
// split (the host's rows through expert_gate_up_rows) or copied (unpacked into the slot), and every step's logits
// are the unpacked resident run's.
TEST(CpuExperts, PackedExpertsRunOnTheHostSplitOrCopiedAsTheResidentRun) {
  for (const char* fixture : {"mixtral", "qwen2_moe", "olmoe"}) {
    SCOPED_TRACE(fixture);
    FixtureRun run(fixture);
    LoadOptions load;
    load.pack_experts = true;
    auto packed = Model::load((test::fixtures_root() / fixture).string(), load);
    const ModelConfig& cfg = run.model->config();
    EngineOptions options = cpu_expert_options(cfg, 1);
    options.cpu_max_tokens = 64;
    options.split_overhead_ms = 0;
    auto device = std::make_unique<StandInDevice>();
    StandInDevice* device_ptr = device.get();
    Engine engine(*packed, options, std::move(device));
    std::vector<float> want, got;
    run.resident.decoder().forward(run.prompt, 0, /*all_logits=*/true, &want);
    engine.decoder().forward(run.prompt, 0, /*all_logits=*/true, &got);
    EXPECT_LT(test::max_abs_diff(got, want), 1e-5) << "prompt";
    int64_t position = static_cast<int64_t>(run.prompt.size());
    for (int step = 0; step < 8; ++step, ++position) {
      const auto last = want.end() - cfg.vocab_size;
      const int32_t token = static_cast<int32_t>(std::max_element(last, want.end()) - last);
      run.resident.decoder().forward(std::span<const int32_t>(&token, 1), position, false, &want);
      engine.decoder().forward(std::span<const int32_t>(&token, 1), position, false, &got);
      EXPECT_LT(test::max_abs_diff(got, want), 1e-5) << "decode step " << step;
    }
    engine.decoder().end_sequence();
    run.resident.decoder().end_sequence();
    const ExpertProviderStats stats = engine.experts().stats();
    EXPECT_GT(stats.cpu_computed, 0);
    EXPECT_GT(stats.split_computed, 0);
    EXPECT_GT(stats.misses, stats.cpu_computed + stats.split_computed);  // some copied whole
    EXPECT_EQ(device_ptr->host_views_refused, 0);
  }
}

// Greedy batched decoding takes the device's picks (Backend::argmax_rows) when the backend has them: a
// stand-in device that picks like the host gives generate()'s tokens; one that always picks token 3 is obeyed.
class PickingDevice : public StandInDevice {
 public:
  explicit PickingDevice(int32_t forced) : forced_(forced) {}
  bool argmax_rows(const TensorView& logits, std::span<int32_t> ids) override {
    ++calls;
    const TensorView host = device(logits, "argmax_rows");
    const int64_t cols = host.dim(-1);
    for (size_t row = 0; row < ids.size(); ++row)
      ids[row] = forced_ >= 0 ? forced_
                              : argmax(std::span<const float>(host.as<const float>() + row * cols, static_cast<size_t>(cols)));
    return true;
  }
  int64_t calls = 0;

 private:
  int32_t forced_;
};

TEST(DeviceGreedy, BatchedGreedyDecodingUsesTheDevicePicks) {
  FixtureRun run("mixtral");
  const std::vector<int32_t>& prompt = run.prompt;
  const std::vector<std::vector<int32_t>> prompts = {prompt, {prompt.begin(), prompt.begin() + 3}};
  GenerationOptions greedy;
  greedy.max_new_tokens = 6;
  greedy.stop_at_eos = false;
  const EngineOptions options = one_thread();
  const std::unique_ptr<Model>& model = run.model;
  Engine& reference = run.resident;
  for (int32_t forced : {-1, 3}) {
    SCOPED_TRACE(forced);
    auto device = std::make_unique<PickingDevice>(forced);
    PickingDevice* picks = device.get();
    Engine engine(*model, options, std::move(device));
    const auto results = engine.generate_batch(prompts, greedy);
    EXPECT_GT(picks->calls, 0);
    for (size_t idx = 0; idx < prompts.size(); ++idx) {
      const auto want = reference.generate(prompts[idx], greedy).output_ids;
      // The first token comes from the prompt's own logits (read back); the rest from the device's picks.
      ASSERT_EQ(results[idx].output_ids.size(), want.size());
      EXPECT_EQ(results[idx].output_ids[0], want[0]);
      for (size_t t = 1; t < want.size(); ++t)
        EXPECT_EQ(results[idx].output_ids[t], forced >= 0 ? forced : want[t]) << "sequence " << idx << " token " << t;
    }
  }
}

// The default split overhead follows the expert's size (measured: small experts lose more than a split gains,
// large ones gain); a configured value holds for every size.
// A device's expert slots are allocated when the provider is made (all the budget holds), not while a step's
// copies and compute run (an allocation there stops CUDA streams from overlapping).
TEST(CpuExperts, DeviceSlotsAreAllocatedUpFront) {
  FixtureRun run("mixtral");
  const ModelConfig& cfg = run.model->config();
  EngineOptions options = one_thread();
  const int64_t slots = cfg.top_k + 3;
  options.expert_budget_bytes = slots * static_cast<int64_t>(cfg.expert_bytes());
  auto device = std::make_unique<StandInDevice>();
  StandInDevice* device_ptr = device.get();
  Engine engine(*run.model, options, std::move(device));
  const int64_t after_start = device_ptr->matrix_allocs;
  // All slots in one allocation: a cudaMalloc per tensor rounded each up to 2 MiB (27% of a Qwen3-30B-A3B expert).
  EXPECT_EQ(after_start, 1);
  EXPECT_GE(device_ptr->matrix_bytes, slots * static_cast<int64_t>(cfg.expert_bytes()));
  GenerationOptions greedy;
  greedy.max_new_tokens = 6;
  greedy.stop_at_eos = false;
  EXPECT_EQ(engine.generate(run.prompt, greedy).output_ids, run.resident.generate(run.prompt, greedy).output_ids);
  EXPECT_GT(engine.experts().stats().misses, slots);  // slots were reused
  EXPECT_EQ(device_ptr->matrix_allocs, after_start);
}

TEST(CpuExperts, SplitOverheadDefaultsByExpertSize) {
  const int64_t mib = int64_t{1} << 20;
  EXPECT_DOUBLE_EQ(split_overhead_ms_for(-1, 9 * mib), 0.5);          // Qwen3-30B-A3B's experts
  EXPECT_DOUBLE_EQ(split_overhead_ms_for(-1, 64 * mib - 1), 0.5);
  EXPECT_DOUBLE_EQ(split_overhead_ms_for(-1, 64 * mib), 0.1);
  EXPECT_DOUBLE_EQ(split_overhead_ms_for(-1, 352 * mib), 0.1);       // Mixtral-8x7B's
  EXPECT_DOUBLE_EQ(split_overhead_ms_for(0, 352 * mib), 0.0);
  EXPECT_DOUBLE_EQ(split_overhead_ms_for(0.5, 352 * mib), 0.5);
  EXPECT_DOUBLE_EQ(split_overhead_ms_for(2.0, 9 * mib), 2.0);
}

TEST(CpuExperts, ScanStepsDefaultByExpertSize) {
  const int64_t mib = int64_t{1} << 20;
  EXPECT_FALSE(scan_steps_for(std::nullopt, 9 * mib));  // Qwen3-30B-A3B's experts
  EXPECT_FALSE(scan_steps_for(std::nullopt, 64 * mib - 1));
  EXPECT_TRUE(scan_steps_for(std::nullopt, 64 * mib));
  EXPECT_TRUE(scan_steps_for(std::nullopt, 352 * mib));  // Mixtral-8x7B's
  EXPECT_TRUE(scan_steps_for(true, 9 * mib));
  EXPECT_FALSE(scan_steps_for(false, 352 * mib));
}

// A stand-in device whose enqueued copies land only when ops are told to wait for them
// (Backend::wait_copies_through), as on a GPU whose copy stream runs behind: a wave run before its own copies
// were waited for reads what its slots held before, and the outputs differ from the resident run.
class DeferredCopyDevice : public StandInDevice {
 public:
  void copy_from_host_enqueue(const void* src, const TensorView& dst) override { queued_.push_back({src, dst}); }
  uint64_t enqueued_copy_ticket() const override { return landed_ + queued_.size(); }
  void wait_copies_through(uint64_t ticket) override {
    if (ticket < enqueued_copy_ticket()) ++waits_behind_later_copies;
    while (landed_ < ticket) {
      const auto [src, dst] = queued_.front();
      queued_.pop_front();
      StandInDevice::copy_from_host(src, dst);
      ++landed_;
    }
  }
  void synchronize() override { wait_copies_through(enqueued_copy_ticket()); }
  // Waits that left later copies queued: a streamed layer's wave k running while wave k+1 copies.
  int64_t waits_behind_later_copies = 0;

 private:
  std::deque<std::pair<const void*, TensorView>> queued_;
  uint64_t landed_ = 0;
};

// Scan steps streamed one expert per wave through half of the experts' room (OffloadConfig::stream_wave_bytes):
// each wave's copies are waited for on the device only, the next wave's are enqueued before it runs, the
// layer's last wave enqueues the next layer's first expert, and what the three waves' room leaves is kept
// across prompts. Outputs stay the resident run's (up to the order of the expert sum).
TEST(StreamedScan, WavesWaitForTheirOwnCopiesAndKeepTheRestAcrossPrompts) {
  FixtureRun run("mixtral");
  const ModelConfig& cfg = run.model->config();
  const std::vector<int32_t> prompt = test::every_expert_prompt(3, 11);
  const std::vector<float> want = run.resident.prompt_logits(prompt);
  const int64_t all_experts = cfg.num_moe_layers() * cfg.num_experts;
  ASSERT_EQ(all_experts, 16);
  int64_t repeat_misses[2] = {0, 0};
  for (int64_t wave_bytes : {int64_t{1}, int64_t{0}}) {
    SCOPED_TRACE(wave_bytes ? "streamed" : "waves as they fit");
    EngineOptions options = one_thread();
    options.expert_budget_bytes = (all_experts / 2) * static_cast<int64_t>(cfg.expert_bytes());
    options.scan_steps = true;
    options.stream_wave_bytes = wave_bytes;  // 1: one expert per wave
    auto device = std::make_unique<DeferredCopyDevice>();
    DeferredCopyDevice* device_ptr = device.get();
    Engine engine(*run.model, options, std::move(device));
    EXPECT_LT(test::max_abs_diff(engine.prompt_logits(prompt), want), 1e-5);
    const ExpertProviderStats first = engine.experts().stats();
    EXPECT_EQ(first.misses + first.prefetch_issued, all_experts);  // every expert once, missed or streamed ahead
    EXPECT_LT(test::max_abs_diff(engine.prompt_logits(prompt), want), 1e-5);
    const ExpertProviderStats second = engine.experts().stats();
    repeat_misses[wave_bytes ? 0 : 1] = second.misses - first.misses;
    if (wave_bytes) {
      EXPECT_GT(device_ptr->waits_behind_later_copies, 0);
      // 8 slots, 3 of them streaming: the 5 kept experts hit on the repeat, and layer 1's first expert was
      // enqueued by layer 0's last wave.
      EXPECT_GE(second.hits - first.hits, 5);
      EXPECT_LE(second.misses - first.misses, all_experts - 5);
      EXPECT_GT(second.prefetch_issued, 0);
      EXPECT_GT(second.prefetch_used, 0);
    }
  }
  EXPECT_LT(repeat_misses[0], repeat_misses[1]);
}

// A prompt of 16 tokens routes 4 per expert on average: not a scan (fewer than 8), so it is not streamed: no
// wave waits behind a later wave's copies and nothing is streamed ahead.
TEST(StreamedScan, ShortPromptsAreNotScans) {
  FixtureRun run("mixtral");
  const ModelConfig& cfg = run.model->config();
  std::vector<int32_t> prompt = test::every_expert_prompt(3, 11);
  prompt.resize(16);
  EngineOptions options = one_thread();
  options.expert_budget_bytes = cfg.num_moe_layers() * cfg.num_experts / 2 * static_cast<int64_t>(cfg.expert_bytes());
  options.scan_steps = true;
  options.stream_wave_bytes = 1;
  auto device = std::make_unique<DeferredCopyDevice>();
  DeferredCopyDevice* device_ptr = device.get();
  Engine engine(*run.model, options, std::move(device));
  const std::vector<float> want = run.resident.prompt_logits(prompt);
  EXPECT_LT(test::max_abs_diff(engine.prompt_logits(prompt), want), 1e-5);
  EXPECT_EQ(device_ptr->waits_behind_later_copies, 0);
  EXPECT_EQ(engine.experts().stats().prefetch_issued, 0);
}

}  // namespace
}  // namespace moex
