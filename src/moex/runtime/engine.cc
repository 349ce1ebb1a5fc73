#include "moex/runtime/engine.h"

#include <algorithm>
#include <chrono>
#include <thread>

#include "moex/backend/cpu/cpu_backend.h"
#include "moex/core/error.h"
#include "moex/moe/offload_provider.h"
#include "moex/moe/resident_provider.h"
#ifdef MOEX_WITH_CUDA
#include "moex/backend/cuda/cuda_backend.h"
#endif

namespace moex {
namespace {
double elapsed_ms(std::chrono::steady_clock::time_point since) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - since).count();
}
}  // namespace

std::unique_ptr<Backend> make_backend(const std::string& device, int num_threads) {
  if (device == "cpu") return make_cpu_backend(num_threads);
  if (device == "cuda") {
#ifdef MOEX_WITH_CUDA
    return make_cuda_backend(0);
#else
    throw UsageError("--device cuda: this moex build has no CUDA backend (build with the cuda-release preset)");
#endif
  }
  throw UsageError(fmt::format("--device \"{}\": unknown device (cpu or cuda)", device));
}

Engine::Engine(const Model& model, const EngineOptions& options)
    : Engine(model, options, make_backend(options.device, options.num_threads)) {}

Engine::Engine(const Model& model, const EngineOptions& options, std::unique_ptr<Backend> backend) : model_(model) {
  backend_ = std::move(backend);
  std::vector<std::vector<ExpertWeights>> host_experts;
  for (const LayerWeights& layer : model.weights().layers)
    if (layer.is_moe) host_experts.push_back(layer.experts);
  const bool offloading = options.expert_budget_bytes > 0 && !host_experts.empty();
  if (model.packed_experts() && !offloading)
    throw UsageError("--pack-experts holds the experts for offloading: give --gpu-memory or --host-memory as well");
  if (offloading) {
    const std::string dir = model.dir();
    auto describe = [dir](ExpertKey key) {
      return fmt::format("{}: MoE layer {} expert {}", dir.empty() ? "model" : dir, key.layer_idx, key.expert_idx);
    };
    // Weights read from a checkpoint are checked for corruption on first use; random ones need no check.
    const bool verify = !model.random_weights();
    auto store = std::make_unique<ExpertStore>(*backend_, host_experts, describe, verify);
    OffloadConfig offload;
    offload.budget_bytes = options.expert_budget_bytes;
    offload.policy = options.cache_policy;
    offload.scope = options.per_layer_cache ? CacheScope::kPerLayer : CacheScope::kGlobal;
    offload.predictor = options.predictor;
    offload.lookahead_layers = options.lookahead_layers;
    offload.cpu_experts = options.cpu_experts && backend_->device() != Device::kCpu;
    offload.host_read_gbs = options.host_read_gbs;
    offload.cpu_max_tokens = options.cpu_max_tokens;
    offload.copy_gbs = options.copy_gbs;
    offload.split_overhead_ms = options.split_overhead_ms;
    offload.balance_prefetch = options.balance_prefetch;
    offload.adapt_rates = options.adapt_rates;
    offload.scan_steps = options.scan_steps;
    offload.stream_wave_bytes = options.stream_wave_bytes;
    if (offload.cpu_experts) {
      // One core stays free for the thread that drives expert copies: a copy driver starved by a busy
      // OpenMP-style pool cut host reads from 86 to 17 GB/s on the GPU machines (PEERS.md).
      const int threads = options.num_threads > 0 ? options.num_threads
                                                  : std::max(1, static_cast<int>(std::thread::hardware_concurrency()) - 1);
      host_backend_ = make_cpu_backend(threads);
    }
    experts_ = std::make_unique<OffloadingExpertProvider>(std::move(store), model.config().top_k, offload);
  } else {
    experts_ = std::make_unique<ResidentExpertProvider>(*backend_, host_experts);
  }
  KvCacheOptions kv;
  kv.page_size = options.kv_page_size;
  if (kv.page_size <= 0) throw UsageError(fmt::format("KV cache page size must be positive, got {}", kv.page_size));
  kv.max_pages = (options.kv_max_tokens + kv.page_size - 1) / kv.page_size;
  decoder_ = std::make_unique<Decoder>(model.config(), model.weights(), *backend_, *experts_, kv, offloading);
  if (host_backend_) decoder_->set_host_backend(host_backend_.get());
  if (options.max_seq_len > 0) decoder_->reserve(options.max_seq_len);
}

Engine::~Engine() = default;

std::vector<float> Engine::prompt_logits(std::span<const int32_t> prompt, RouterObserver* observer) {
  std::vector<float> logits;
  decoder_->forward(prompt, 0, /*all_logits=*/true, &logits, observer);
  decoder_->end_sequence();
  return logits;
}

GenerationResult Engine::generate(std::span<const int32_t> prompt, const GenerationOptions& options,
                                  const std::function<bool(int32_t)>& on_token, RouterObserver* observer) {
  if (prompt.empty()) throw UsageError("the prompt is empty: give at least one token");
  if (options.max_new_tokens < 0) throw UsageError("-n must be >= 0");
  Sampler sampler(options.sampling);
  GenerationResult result;
  decoder_->reserve(static_cast<int64_t>(prompt.size()) + options.max_new_tokens);
  std::vector<float> logits;
  auto start = std::chrono::steady_clock::now();
  decoder_->forward(prompt, 0, /*all_logits=*/false, &logits, observer);
  result.prefill_ms = elapsed_ms(start);
  int64_t position = static_cast<int64_t>(prompt.size());
  start = std::chrono::steady_clock::now();
  result.stop_reason = "length";
  if (options.max_new_tokens > 0) {
    int32_t token = sampler.sample(logits);
    if (observer == nullptr && decoder_->can_chain_steps(options.sampling.temperature > 0.0f)) {
      decode_chained(token, position, options, sampler, on_token, &result);
    } else {
      while (take_token(token, options, on_token, &result)) {
        decoder_->forward(std::span<const int32_t>(&token, 1), position++, false, &logits, observer);
        ++result.decode_steps;
        token = sampler.sample(logits);
      }
    }
  }
  result.decode_ms = elapsed_ms(start);
  decoder_->end_sequence();
  return result;
}

bool Engine::take_token(int32_t id, const GenerationOptions& options, const std::function<bool(int32_t)>& on_token,
                        GenerationResult* result) const {
  const auto& eos = config().eos_token_ids;
  result->output_ids.push_back(id);
  const bool keep_going = !on_token || on_token(id);
  if (options.stop_at_eos && std::find(eos.begin(), eos.end(), id) != eos.end()) {
    result->stop_reason = "eos";
    return false;
  }
  return keep_going && static_cast<int64_t>(result->output_ids.size()) < options.max_new_tokens;
}

void Engine::decode_chained(int32_t token, int64_t position, const GenerationOptions& options, Sampler& sampler,
                            const std::function<bool(int32_t)>& on_token, GenerationResult* result) {
  // Steps enqueued whose picks are not read yet. The device runs one step ahead of the host: step t+1 is enqueued
  // before step t's token is read, so reading, checking and printing it overlap the device's work. A stop
  // discards at most that one step.
  int64_t in_flight = 0;
  auto take = [&](int32_t id) { return take_token(id, options, on_token, result); };
  auto known = [&] { return static_cast<int64_t>(result->output_ids.size()); };
  // A step enqueued past a stop still runs; its pick is read so that the next generation starts clean.
  auto drain = [&] {
    for (; in_flight > 0; --in_flight) decoder_->next_token();
  };
  try {
    bool running = take(token);
    if (running) {
      decoder_->enqueue_step(token, position++, sampler.next_draw());
      ++in_flight;
    }
    while (running) {
      // known + in_flight tokens exist or are coming; another step is worth it only if its token may be kept.
      if (known() + in_flight < options.max_new_tokens) {
        decoder_->enqueue_step(Backend::kTokenOnDevice, position++, sampler.next_draw());
        ++in_flight;
      }
      --in_flight;
      ++result->decode_steps;
      running = take(decoder_->next_token());
    }
  } catch (...) {
    try {
      drain();
    } catch (...) {  // the device failed: the first error is the one to report
    }
    throw;
  }
  drain();
}

std::vector<GenerationResult> Engine::generate_batch(std::span<const std::vector<int32_t>> prompts,
                                                    const GenerationOptions& options) {
  if (prompts.empty()) throw UsageError("generate_batch: no prompts");
  for (size_t idx = 0; idx < prompts.size(); ++idx)
    if (prompts[idx].empty()) throw UsageError(fmt::format("prompt {} is empty: give at least one token", idx));
  if (options.max_new_tokens < 0) throw UsageError("-n must be >= 0");
  struct Running {
    int32_t seq = -1;
    Sampler sampler;
    int64_t position = 0;
  };
  std::vector<Running> running;
  std::vector<GenerationResult> results(prompts.size());
  int64_t total_tokens = 0;
  for (const auto& prompt : prompts) total_tokens += static_cast<int64_t>(prompt.size()) + options.max_new_tokens;
  decoder_->reserve(total_tokens);
  const auto& eos = config().eos_token_ids;
  std::vector<float> logits;
  std::vector<Decoder::DecodeStep> steps;
  std::vector<size_t> step_owner;
  // Records token (sampled from sequence idx's logits) as its next; false when the sequence is finished.
  auto keep = [&](size_t idx, int32_t token) {
    GenerationResult& result = results[idx];
    result.output_ids.push_back(token);
    if (options.stop_at_eos && std::find(eos.begin(), eos.end(), token) != eos.end()) {
      result.stop_reason = "eos";
      return false;
    }
    return static_cast<int64_t>(result.output_ids.size()) < options.max_new_tokens;
  };
  // Sequence idx's next step, of token, into `steps`.
  auto push_step = [&](size_t idx, int32_t token) {
    Running& r = running[idx];
    steps.push_back(Decoder::DecodeStep{r.seq, token, r.position++});
    step_owner.push_back(idx);
  };
  // keep(), and the sequence's next step while it goes on.
  auto take = [&](size_t idx, int32_t token) {
    if (!keep(idx, token)) return false;
    push_step(idx, token);
    return true;
  };
  // Batched steps chained on the device (Decoder::enqueue_batch): the next step of the same sequences is
  // enqueued, its tokens the picks still on the device, before the host reads this step's picks, so the device
  // does not wait for the host between steps. A sequence that reaches max_new_tokens is not enqueued ahead; one
  // that ends on EOS is seen only when its picks are read, and the step already enqueued for it is dropped. When
  // the batch changes, the survivors' next steps go to `steps` (the loop below goes on from the host). Every pick
  // enqueued is read before this returns or throws. Each enqueued step takes its rows' next draws, as the steps run
  // one by one do (a dropped step's draw belongs to a sequence that has ended).
  auto run_chained = [&](std::vector<Decoder::DecodeStep>& batch, const std::vector<size_t>& owners, bool sampled) {
    const size_t n = batch.size();
    std::vector<TokenDraw> step_draws;
    auto enqueue = [&] {
      step_draws.clear();
      for (size_t row = 0; sampled && row < n; ++row) step_draws.push_back(running[owners[row]].sampler.next_draw());
      decoder_->enqueue_batch(batch, step_draws);
    };
    std::vector<int32_t> ids(n);
    std::vector<bool> done(n, false);
    bool changed = false;
    int in_flight = 0;
    try {
      enqueue();
      ++in_flight;
      while (in_flight > 0) {
        const bool ahead = !changed && in_flight == 1 && std::all_of(owners.begin(), owners.end(), [&](size_t idx) {
          return static_cast<int64_t>(results[idx].output_ids.size()) + 1 < options.max_new_tokens;
        });
        if (ahead) {
          for (size_t row = 0; row < n; ++row) {
            batch[row].token = Backend::kTokenOnDevice;
            batch[row].position = running[owners[row]].position++;
          }
          enqueue();
          ++in_flight;
        }
        decoder_->next_batch_tokens(ids);
        --in_flight;
        for (size_t row = 0; row < n; ++row) {
          if (done[row]) continue;  // ended at an earlier step: this pick is dropped
          ++results[owners[row]].decode_steps;
          if (!keep(owners[row], ids[row])) done[row] = changed = true;
        }
      }
    } catch (...) {
      try {
        for (; in_flight > 0; --in_flight) decoder_->next_batch_tokens(ids);
      } catch (...) {  // the device failed: the first error is the one to report
      }
      throw;
    }
    for (size_t row = 0; row < n; ++row)
      if (!done[row]) push_step(owners[row], ids[row]);
  };
  // Tokens are picked on the device when the backend can: one id per sequence comes back, not its logits. Each
  // row's draw comes from its sequence's sampler either way, so a fallback to the host picks the same tokens.
  const bool greedy = options.sampling.temperature == 0.0f;
  std::vector<int32_t> picked;
  std::vector<TokenDraw> draws;
  try {
    for (size_t idx = 0; idx < prompts.size(); ++idx) {
      SamplingParams sampling = options.sampling;
      sampling.seed += idx;
      running.push_back(Running{decoder_->add_sequence(), Sampler(sampling), static_cast<int64_t>(prompts[idx].size())});
      results[idx].stop_reason = "length";
      auto start = std::chrono::steady_clock::now();
      decoder_->forward_sequence(running[idx].seq, prompts[idx], 0, /*all_logits=*/false, &logits);
      results[idx].prefill_ms = elapsed_ms(start);
      if (options.max_new_tokens > 0) take(idx, running[idx].sampler.sample(logits));
    }
    auto start = std::chrono::steady_clock::now();
    const size_t vocab = static_cast<size_t>(config().vocab_size);
    auto logits_row = [&](size_t row) { return std::span<const float>(logits).subspan(row * vocab, vocab); };
    std::vector<Decoder::DecodeStep> batch;
    std::vector<size_t> owners;
    while (!steps.empty()) {
      batch.swap(steps);
      owners.swap(step_owner);
      steps.clear();
      step_owner.clear();
      if (decoder_->can_chain_batches(static_cast<int64_t>(batch.size()), !greedy)) {
        run_chained(batch, owners, !greedy);
        continue;
      }
      draws.clear();
      for (size_t row = 0; row < batch.size(); ++row) draws.push_back(running[owners[row]].sampler.next_draw());
      const bool on_device =
          decoder_->forward_batch(batch, &logits, &picked, greedy ? std::span<const TokenDraw>() : draws);
      for (size_t row = 0; row < batch.size(); ++row) {
        ++results[owners[row]].decode_steps;
        if (on_device) take(owners[row], picked[row]);
        else take(owners[row], running[owners[row]].sampler.sample(logits_row(row), draws[row]));
      }
    }
    const double decode_ms = elapsed_ms(start);
    for (auto& result : results) result.decode_ms = decode_ms;
  } catch (...) {
    for (const Running& r : running) decoder_->free_sequence(r.seq);
    decoder_->end_sequence();
    throw;
  }
  for (const Running& r : running) decoder_->free_sequence(r.seq);
  decoder_->end_sequence();
  return results;
}

int64_t Engine::resident_weight_bytes(const ModelConfig& cfg, bool offloading) {
  const int64_t elem = static_cast<int64_t>(dtype_size(cfg.weight_dtype));
  const int64_t hidden = cfg.hidden_size, q_dim = cfg.num_heads * cfg.head_dim;
  const int64_t kv_dim = cfg.num_kv_heads * cfg.head_dim;
  // The lm_head, and the embedding when it is a separate matrix and experts are not offloaded (the decoder then
  // keeps it in host memory: Decoder's embedding_on_host).
  int64_t elems = cfg.vocab_size * hidden * (cfg.tie_word_embeddings || offloading ? 1 : 2);
  for (int64_t layer_idx = 0; layer_idx < cfg.num_layers; ++layer_idx) {
    elems += hidden * (q_dim + 2 * kv_dim) + q_dim * hidden;
    if (cfg.layer_is_moe[layer_idx]) {
      elems += cfg.num_experts * hidden + 3 * cfg.shared_expert_ffn_size * hidden + (cfg.shared_expert_gate ? hidden : 0);
    } else {
      elems += 3 * cfg.dense_ffn_size * hidden;
    }
  }
  return elems * elem;
}

}  // namespace moex
