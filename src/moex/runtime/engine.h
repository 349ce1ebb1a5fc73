// Engine: a loaded model on a backend, ready to generate. It owns the backend, the expert provider
// and the decoder, and runs the prefill + decode loop for one sequence, or for several in lockstep.
#pragma once

#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "moex/backend/backend.h"
#include "moex/model/decoder.h"
#include "moex/model/model.h"
#include "moex/moe/expert_provider.h"
#include "moex/runtime/sampler.h"

namespace moex {

struct EngineOptions {
  std::string device = "cpu";  // "cpu" or "cuda"
  int num_threads = 0;          // CPU threads; 0: all hardware threads
  int64_t max_seq_len = 0;      // KV cache positions allocated up front (all sequences); 0: grow on demand
  int64_t kv_page_size = 32;    // positions per KV cache page
  int64_t kv_max_tokens = 0;    // KV cache limit over all sequences (rounded up to pages); 0: none
  // Expert offloading: bytes of fast-tier memory for experts (host RAM on the CPU backend, GPU memory
  // with CUDA). 0: every expert resident.
  int64_t expert_budget_bytes = 0;
  std::string cache_policy = "lru";
  bool per_layer_cache = false;
  std::string predictor = "none";  // expert predictor driving prefetch when offloading
  int32_t lookahead_layers = 1;
  // GPU offloading: run missed experts on the host CPU where that beats copying them (see OffloadConfig).
  bool cpu_experts = false;
  int64_t cpu_max_tokens = 4;  // a miss routed to more tokens is always copied
  double host_read_gbs = 100.0;
  double copy_gbs = 50.0;
  double split_overhead_ms = -1;   // OffloadConfig::split_overhead_ms (< 0: by expert size)
  bool balance_prefetch = true;    // OffloadConfig::balance_prefetch (applies with cpu_experts)
  bool adapt_rates = false;        // OffloadConfig::adapt_rates (applies with cpu_experts)
  std::optional<bool> scan_steps;  // OffloadConfig::scan_steps (unset: by expert size)
  int64_t stream_wave_bytes = int64_t{96} << 20;  // OffloadConfig::stream_wave_bytes
};

struct GenerationOptions {
  int64_t max_new_tokens = 64;
  SamplingParams sampling;
  bool stop_at_eos = true;
};

struct GenerationResult {
  std::vector<int32_t> output_ids;
  std::string stop_reason;  // "length" or "eos"
  double prefill_ms = 0;
  double decode_ms = 0;     // all decode steps together
  int64_t decode_steps = 0;
};

// Makes the backend for a device name; throws UsageError for an unknown or unavailable device.
std::unique_ptr<Backend> make_backend(const std::string& device, int num_threads);

class Engine {
 public:
  // model must outlive the engine. Throws UsageError for an unknown device.
  Engine(const Model& model, const EngineOptions& options);
  // With a backend made elsewhere (options.device is then ignored): tests and embedders.
  Engine(const Model& model, const EngineOptions& options, std::unique_ptr<Backend> backend);
  ~Engine();

  const ModelConfig& config() const { return model_.config(); }
  Backend& backend() { return *backend_; }
  ExpertProvider& experts() { return *experts_; }
  Decoder& decoder() { return *decoder_; }

  // Runs the prompt from position 0 (a new sequence) and returns logits for every prompt position
  // ([prompt.size() * vocab]).
  std::vector<float> prompt_logits(std::span<const int32_t> prompt, RouterObserver* observer = nullptr);

  // Prefills the prompt as a new sequence, then samples up to max_new_tokens. on_token (optional) sees
  // each new id as it is produced and may return false to stop early.
  GenerationResult generate(std::span<const int32_t> prompt, const GenerationOptions& options,
                            const std::function<bool(int32_t)>& on_token = {}, RouterObserver* observer = nullptr);

  // generate() for several prompts at once: each is prefilled as its own sequence, then all decode in lockstep,
  // one Decoder::forward_batch step per token for the sequences still running (a sequence stops at eos or
  // max_new_tokens, as in generate()). Sequence i samples with seed options.sampling.seed + i. Results in
  // prompt order; decode_ms is the whole lockstep's time, decode_steps the steps each sequence took part in.
  std::vector<GenerationResult> generate_batch(std::span<const std::vector<int32_t>> prompts,
                                               const GenerationOptions& options);

  // Bytes of the weights that always stay on the backend (attention, norms, embeddings, dense MLPs,
  // shared experts, routers): what an offloading budget must leave room for. offloading: as the engine places
  // them when experts are offloaded (an untied token embedding then stays in host memory).
  static int64_t resident_weight_bytes(const ModelConfig& cfg, bool offloading = false);

 private:
  // Appends id to result->output_ids and shows it to on_token; whether generation goes on (not EOS, not stopped by
  // on_token, below max_new_tokens). EOS sets the stop reason.
  bool take_token(int32_t id, const GenerationOptions& options, const std::function<bool(int32_t)>& on_token,
                  GenerationResult* result) const;
  // Decode steps chained on the device (Decoder::enqueue_step) from token, the first new token (already sampled
  // from the prompt), at position, each picking with sampler's next draw: the same tokens, stops and counts as
  // generate()'s loop. max_new_tokens > 0.
  void decode_chained(int32_t token, int64_t position, const GenerationOptions& options, Sampler& sampler,
                      const std::function<bool(int32_t)>& on_token, GenerationResult* result);

  const Model& model_;
  std::unique_ptr<Backend> backend_;
  std::unique_ptr<Backend> host_backend_;  // CPU execution of missed experts next to a GPU backend
  std::unique_ptr<ExpertProvider> experts_;
  std::unique_ptr<Decoder> decoder_;
};

}  // namespace moex
