// `moex bench`: end-to-end prefill and decode timings of a model (real or --load-format random at real
// shapes) on a device, with the bytes a decode step must read, so that the result can be set against
// the memory roofline; with --batch, batched decode of several sequences in lockstep (Decoder::forward_batch).
// Prints a table, and one JSON object with --json (for bench/ scripts). With --trace-out, the routing of the
// batch-1 decode repetitions (prompt and decoded tokens, one request per repetition) is written as a trace for
// `moex trace simulate|stats`: the cache and predictor behaviour behind a figure can be replayed offline.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <functional>
#include <iostream>
#include <numeric>
#include <optional>
#include <utility>

#include <nlohmann/json.hpp>

#include "cli_common.h"
#include "commands.h"
#include "gpu_telemetry.h"
#include "routing_replay.h"
#include "moex/core/dtype.h"
#include "moex/core/error.h"
#include "moex/core/progress.h"
#include "moex/moe/offload_provider.h"
#include "moex/trace/trace_writer.h"
#include "trace_record.h"

namespace moex::cli {
namespace {

struct Summary {
  double mean = 0, stddev = 0, min = 0;
};

Summary summarize(const std::vector<double>& values) {
  Summary s;
  if (values.empty()) return s;
  s.mean = std::accumulate(values.begin(), values.end(), 0.0) / values.size();
  double var = 0;
  for (double v : values) var += (v - s.mean) * (v - s.mean);
  s.stddev = values.size() > 1 ? std::sqrt(var / (values.size() - 1)) : 0;
  s.min = *std::min_element(values.begin(), values.end());
  return s;
}

// The host bytes of one expert: bf16, or the mean packed size with --pack-experts.
int64_t expert_host_bytes(const Model& model) {
  const auto& packed = model.weights().packed;
  if (packed.empty()) return static_cast<int64_t>(model.config().expert_bytes());
  int64_t total = 0;
  for (const auto& expert : packed) total += expert->bytes();
  return total / static_cast<int64_t>(packed.size());
}

// Bytes one batch-1 decode step must read: every resident weight once, except the token embedding, of which it
// reads the token's row (a tied embedding is the lm_head as well and is read whole); top_k experts per MoE layer.
// Until 2026-11-27 the whole embedding table was counted: 8% of Model A's bytes, 9% of Model B's, so the
// roofline fractions in bench/RESULTS.md before then are that much too high (the correction is there).
int64_t decode_bytes_per_token(const ModelConfig& cfg) {
  const int64_t row = cfg.hidden_size * static_cast<int64_t>(dtype_size(cfg.weight_dtype));
  const int64_t unread = cfg.tie_word_embeddings ? 0 : (cfg.vocab_size - 1) * row;
  return Engine::resident_weight_bytes(cfg) - unread +
         cfg.num_moe_layers() * cfg.top_k * static_cast<int64_t>(cfg.expert_bytes());
}

std::string now_iso() {
  std::time_t t = std::time(nullptr);
  char buf[32];
  std::strftime(buf, sizeof(buf), "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&t));
  return buf;
}

}  // namespace

CommandAction setup_bench(CLI::App* sub) {
  struct Options {
    ModelOptions model;
    std::vector<int64_t> prompt_lens{128};
    int64_t decode_tokens = 32;
    int64_t decode_context = 16;
    int reps = 5;
    int warmup = 1;
    double bandwidth_gbs = 0;
    std::vector<int64_t> batches;
    bool json = false;
    std::string trace_out;
    std::string gpu_telemetry = "auto";
    double gpu_energy_seconds = 2;
    std::string routing_trace;
    SamplingParams sampling;  // temperature 0: greedy decode steps
  };
  auto options = std::make_shared<Options>();
  add_model_options(sub, &options->model, /*model_required=*/true);
  sub->add_option("--prompt-lens", options->prompt_lens, "prefill lengths to time (tokens), e.g. 512,2048")
      ->delimiter(',')
      ->check(positive_number());
  sub->add_option("--decode-tokens", options->decode_tokens, "decode steps timed per repetition")
      ->check(non_negative_number());
  sub->add_option("--decode-context", options->decode_context, "prompt length before the timed decode steps")
      ->check(positive_number());
  sub->add_option("--reps", options->reps, "timed repetitions (mean +- stddev reported)")->check(positive_number());
  sub->add_option("--warmup", options->warmup, "untimed warm-up repetitions")->check(non_negative_number());
  sub->add_option("--bandwidth-gbs", options->bandwidth_gbs,
                  "memory bandwidth of the device (GB/s, measured elsewhere) for the roofline column");
  sub->add_option("--batch", options->batches,
                  "batched decode at these batch sizes, e.g. 1,8,32,128: that many sequences with a "
                  "--decode-context prompt each, --decode-tokens steps decoded together")
      ->delimiter(',')
      ->check(positive_number());
  sub->add_option("--temperature", options->sampling.temperature,
                  "decode by sampling at this temperature (with --top-k, --top-p, fixed seeds) instead of greedily: "
                  "times the pick on the device where the backend samples, else on the host")
      ->check(non_negative_number());
  sub->add_option("--top-p", options->sampling.top_p, "with --temperature: nucleus mass in (0, 1]")
      ->check(positive_number() & CLI::Range(0.0, 1.0));
  sub->add_option("--top-k", options->sampling.top_k, "with --temperature: keep the k most likely tokens (0: all)")
      ->check(non_negative_number());
  sub->add_flag("--json", options->json, "print one JSON object with every parameter and result");
  sub->add_option("--trace-out", options->trace_out,
                  "write the routing of the batch-1 decode repetitions (warm-up included, one request each: "
                  "the --decode-context prompt and the decoded tokens) to this file as a moex binary trace; "
                  "the decode timings then include the recording");
  add_gpu_telemetry_option(sub, &options->gpu_telemetry);
  sub->add_option("--gpu-energy-seconds", options->gpu_energy_seconds,
                  "with GPU telemetry: after each phase's timed repetitions (which run unmetered), repeat the phase "
                  "metered until its timed parts sum to this many seconds, for the energy, power and utilisation "
                  "figures (NVML's energy counter moves in steps; its power is an average over up to a second)")
      ->check(positive_number())
      ->capture_default_str();
  sub->add_option("--routing-trace", options->routing_trace,
                  "replay this routing trace (shared JSONL or moex binary, the model's MoE layers x experts x top-k) "
                  "in the batch-1 decode repetitions instead of the router's choice: repetition r replays request "
                  "r mod requests, position p its token p mod length. Real routing for the expert cache and "
                  "predictors on random weights; prefill timings keep the router's choice; not with --batch");
  return [options]() -> int {
    const auto load_start = std::chrono::steady_clock::now();
    auto model = load_model(options->model);
    const double load_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - load_start).count();
    const ModelConfig& cfg = model->config();
    std::unique_ptr<TraceWriter> trace;
    if (!options->trace_out.empty()) {
      if (cfg.num_moe_layers() == 0)
        throw UsageError(fmt::format("--trace-out: {} has no MoE layers to trace", cfg.summary()));
      trace = std::make_unique<TraceWriter>(options->trace_out, trace_info_for(cfg, false, "moex bench"));
    }
    std::unique_ptr<RoutingReplay> replay;
    if (!options->routing_trace.empty()) {
      if (!options->batches.empty()) throw UsageError("--routing-trace replays one sequence: not with --batch");
      replay = std::make_unique<RoutingReplay>(options->routing_trace, cfg);
    }
    const auto engine_start = std::chrono::steady_clock::now();
    Engine engine(*model, engine_options(options->model, cfg));
    const double engine_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - engine_start).count();
    nlohmann::json gpu_about;
    auto meter = open_gpu_meter(options->gpu_telemetry, options->model.device, engine.backend(), &gpu_about);
    const int64_t vocab = cfg.vocab_size;
    uint64_t state = 12345;
    auto random_ids = [&](int64_t count) {
      std::vector<int32_t> ids(count);
      for (auto& id : ids) {
        state = state * 6364136223846793005ull + 1442695040888963407ull;
        id = static_cast<int32_t>((state >> 33) % static_cast<uint64_t>(vocab));
      }
      return ids;
    };
    // Energy, power and utilisation of a phase: the timed repetitions run unmetered (tens of milliseconds each,
    // shorter than NVML can resolve: its energy counter moves in steps and its power readings average over up
    // to a second); after them the phase's repetition runs metered, its timed part a window each, until the
    // windows sum to --gpu-energy-seconds. Their inputs come from a saved generator state, so the phases after
    // see the same inputs with or without telemetry. rep(n, true) runs metered repetition n.
    auto energy_pass = [&](int64_t tokens_per_rep, const std::function<void(int, bool)>& rep) {
      const uint64_t saved = state;
      const auto start = std::chrono::steady_clock::now();
      int reps = 0;
      // The wall-clock guard ends a pass whose windows are tiny next to its untimed part.
      while (reps == 0 || (meter->pending_seconds() < options->gpu_energy_seconds &&
                           std::chrono::steady_clock::now() - start <
                               std::chrono::duration<double>(4 * options->gpu_energy_seconds)))
        rep(reps++, true);
      state = saved;
      return gpu_energy_json(meter->take(), tokens_per_rep * reps);
    };
    auto window = [&](bool metered, bool open) {
      if (!metered) return;
      if (open) meter->begin();
      else meter->end();
    };
    const int total_reps = options->warmup + options->reps;
    ProgressBar progress("benchmarking", total_reps * static_cast<int64_t>(options->prompt_lens.size() + 1 +
                                                                           options->batches.size()));
    nlohmann::json prefill_results = nlohmann::json::array();
    std::vector<float> logits;
    for (int64_t prompt_len : options->prompt_lens) {
      engine.decoder().reserve(prompt_len);
      std::vector<double> ms;
      auto prefill_rep = [&](int, bool metered) {
        auto ids = random_ids(prompt_len);
        window(metered, true);
        auto start = std::chrono::steady_clock::now();
        engine.decoder().forward(ids, 0, false, &logits);
        engine.backend().synchronize();
        double elapsed = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
        window(metered, false);
        engine.decoder().end_sequence();
        return elapsed;
      };
      for (int rep = 0; rep < total_reps; ++rep) {
        double elapsed = prefill_rep(rep, false);
        if (rep >= options->warmup) ms.push_back(elapsed);
        progress.advance();
      }
      Summary s = summarize(ms);
      prefill_results.push_back({{"prompt_tokens", prompt_len},
                                 {"ms_mean", s.mean},
                                 {"ms_stddev", s.stddev},
                                 {"tokens_per_s", prompt_len * 1000.0 / s.mean}});
      if (meter) prefill_results.back()["gpu"] = energy_pass(prompt_len, prefill_rep);
    }
    std::vector<double> per_token_ms;
    engine.decoder().reserve(options->decode_context + options->decode_tokens);
    if (replay) engine.decoder().set_routing_override(replay.get());  // host routing from here: no chained steps
    // Steps chained on the device where the engine would chain them (Engine::generate); a trace needs every step's
    // routing on the host.
    const bool sampled = options->sampling.temperature > 0.0f;
    const bool chained = !trace && engine.decoder().can_chain_steps(sampled) && options->decode_tokens > 0;
    Sampler sampler(options->sampling);  // the decode steps' draws (fixed seed): greedy without --temperature
    // Expert traffic of the timed decode steps alone (prefill traffic is reported apart).
    ExpertProviderStats decode_stats{};
    int64_t timed_steps = 0;
    // One repetition: a --decode-context prompt (untimed), then --decode-tokens greedy steps (timed). Metered
    // repetitions (the energy pass) record no trace. Returns the steps' ms and the provider's counters before them.
    struct DecodeRep {
      double ms;
      ExpertProviderStats before;
    };
    auto decode_rep = [&](int rep, bool metered) {
      if (replay) replay->select(rep);
      auto ids = random_ids(options->decode_context);
      std::optional<TraceRecorder> recorder;
      TraceWriter::RequestHandle request = 0;
      const bool record = trace && !metered;
      if (record) {
        request = trace->begin_request(fmt::format("decode-rep{}", rep));
        recorder.emplace(*trace, request, false, static_cast<int32_t>(cfg.num_experts));
        for (size_t idx = 0; idx < ids.size(); ++idx) trace->record_token_id(request, static_cast<int64_t>(idx), ids[idx]);
      }
      RouterObserver* observer = recorder ? &*recorder : nullptr;
      engine.decoder().forward(ids, 0, false, &logits, observer);
      int32_t token = static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
      engine.backend().synchronize();
      const ExpertProviderStats before = engine.experts().stats();
      window(metered, true);
      auto start = std::chrono::steady_clock::now();
      if (chained) {
        // As Engine::generate decodes: the device runs one step ahead of the host.
        engine.decoder().enqueue_step(token, options->decode_context, sampler.next_draw());
        for (int64_t step = 1; step < options->decode_tokens; ++step) {
          engine.decoder().enqueue_step(Backend::kTokenOnDevice, options->decode_context + step, sampler.next_draw());
          token = engine.decoder().next_token();
        }
        token = engine.decoder().next_token();
      } else {
        for (int64_t step = 0; step < options->decode_tokens; ++step) {
          const int64_t position = options->decode_context + step;
          if (record) trace->record_token_id(request, position, token);
          engine.decoder().forward(std::span<const int32_t>(&token, 1), position, false, &logits, observer);
          token = sampler.sample(logits);
        }
      }
      engine.backend().synchronize();
      double elapsed = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
      window(metered, false);
      engine.decoder().end_sequence();
      if (record) trace->end_request(request);
      return DecodeRep{elapsed, before};
    };
    for (int rep = 0; rep < total_reps; ++rep) {
      const auto [elapsed, before] = decode_rep(rep, false);
      if (rep >= options->warmup && options->decode_tokens > 0) {
        per_token_ms.push_back(elapsed / options->decode_tokens);
        const ExpertProviderStats after = engine.experts().stats();
        decode_stats.hits += after.hits - before.hits;
        decode_stats.misses += after.misses - before.misses;
        decode_stats.bytes_moved += after.bytes_moved - before.bytes_moved;
        decode_stats.stall_ms += after.stall_ms - before.stall_ms;
        decode_stats.prefetch_issued += after.prefetch_issued - before.prefetch_issued;
        decode_stats.prefetch_skipped += after.prefetch_skipped - before.prefetch_skipped;
        decode_stats.prefetch_used += after.prefetch_used - before.prefetch_used;
        decode_stats.cpu_computed += after.cpu_computed - before.cpu_computed;
        decode_stats.split_computed += after.split_computed - before.split_computed;
        decode_stats.cpu_read_bytes += after.cpu_read_bytes - before.cpu_read_bytes;
        decode_stats.cpu_ms += after.cpu_ms - before.cpu_ms;
        timed_steps += options->decode_tokens;
      }
      progress.advance();
    }
    std::optional<nlohmann::json> decode_energy;
    if (meter && options->decode_tokens > 0) decode_energy = energy_pass(options->decode_tokens, decode_rep);
    engine.decoder().set_routing_override(nullptr);
    nlohmann::json batch_results = nlohmann::json::array();
    for (int64_t batch : options->batches) {
      const int64_t context = options->decode_context, steps_per_rep = options->decode_tokens;
      engine.decoder().reserve(batch * (context + steps_per_rep + 1));
      std::vector<double> step_ms, pick_ms;
      std::vector<int32_t> picked;
      std::vector<TokenDraw> draws;
      bool picked_on_device = false, steps_chained = false;
      auto batch_rep = [&](int, bool metered) {
        std::vector<Decoder::DecodeStep> steps;
        for (int64_t idx = 0; idx < batch; ++idx) {
          const int32_t seq = engine.decoder().add_sequence();
          engine.decoder().forward_sequence(seq, random_ids(context), 0, false, &logits);
          steps.push_back({seq, argmax(logits), context});
        }
        engine.backend().synchronize();
        double picking = 0;  // host-side picking (ms)
        window(metered, true);
        auto start = std::chrono::steady_clock::now();
        // Steps chained on the device where the backend can, as Engine::generate_batch runs them: each step
        // enqueued before the previous one's picks are read (the same rows every step here).
        const bool chained = steps_per_rep > 0 && engine.decoder().can_chain_batches(batch, sampled);
        steps_chained = chained;
        picked.resize(static_cast<size_t>(batch));
        for (int64_t step = 0; chained && step < steps_per_rep; ++step) {
          draws.clear();
          for (int64_t row = 0; sampled && row < batch; ++row) draws.push_back(sampler.next_draw());
          engine.decoder().enqueue_batch(steps, draws);
          for (auto& row : steps) {
            row.token = Backend::kTokenOnDevice;
            ++row.position;
          }
          if (step > 0) engine.decoder().next_batch_tokens(picked);
        }
        if (chained) engine.decoder().next_batch_tokens(picked);
        picked_on_device = picked_on_device || chained;
        for (int64_t step = 0; !chained && step < steps_per_rep; ++step) {
          // Picks are part of a real step: on the device where the backend can (one id per row comes back), else
          // on the host, timed apart to tell them from the device's part. One generator serves every row here.
          // Greedy steps pass no draws: the backend's argmax then, as Engine::generate_batch.
          draws.clear();
          for (int64_t row = 0; row < batch; ++row) draws.push_back(sampler.next_draw());
          const bool on_device = engine.decoder().forward_batch(steps, &logits, &picked,
                                                                sampled ? std::span<const TokenDraw>(draws)
                                                                        : std::span<const TokenDraw>());
          picked_on_device = on_device;
          auto pick_start = std::chrono::steady_clock::now();
          for (int64_t row = 0; row < batch; ++row) {
            const auto row_logits = std::span<const float>(logits).subspan(row * vocab, vocab);
            steps[row].token = on_device ? picked[row] : sampler.sample(row_logits, draws[row]);
            ++steps[row].position;
          }
          picking += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - pick_start).count();
        }
        engine.backend().synchronize();
        double elapsed = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
        window(metered, false);
        for (const auto& step : steps) engine.decoder().free_sequence(step.seq);
        engine.decoder().end_sequence();
        return std::pair{elapsed, picking};  // ms of the steps, of which host-side picking
      };
      for (int rep = 0; rep < total_reps; ++rep) {
        const auto [elapsed, picking] = batch_rep(rep, false);
        if (rep >= options->warmup && steps_per_rep > 0) {
          step_ms.push_back(elapsed / steps_per_rep);
          pick_ms.push_back(picking / steps_per_rep);
        }
        progress.advance();
      }
      Summary s = summarize(step_ms);
      batch_results.push_back({{"batch", batch},
                               {"context", context},
                               {"steps", steps_per_rep},
                               {"ms_per_step_mean", s.mean},
                               {"ms_per_step_stddev", s.stddev},
                               {"host_pick_ms_per_step", summarize(pick_ms).mean},
                               {"pick_on_device", picked_on_device},
                               {"steps_chained", steps_chained},
                               {"tokens_per_s", s.mean > 0 ? batch * 1000.0 / s.mean : 0.0}});
      if (meter && steps_per_rep > 0) batch_results.back()["gpu"] = energy_pass(batch * steps_per_rep, batch_rep);
    }
    progress.finish();
    if (trace) trace->close();
    Summary decode = summarize(per_token_ms);
    const int64_t bytes = decode_bytes_per_token(cfg);
    const ExpertProviderStats stats = engine.experts().stats();
    nlohmann::json out = {
        {"date", now_iso()},
        {"model", cfg.summary()},
        {"device", options->model.device},
        {"load_format", options->model.load_format},
        // Start-up: the weights read, generated (random) or packed, then the engine (uploads, the expert store's
        // page-locking of its source tier).
        {"load_s", load_s},
        {"engine_s", engine_s},
        {"threads", options->model.num_threads},
        {"reps", options->reps},
        {"sampling", {{"temperature", options->sampling.temperature},
                      {"top_k", options->sampling.top_k},
                      {"top_p", options->sampling.top_p}}},
        {"prefill", prefill_results},
        {"decode", {{"context", options->decode_context},
                    {"tokens", options->decode_tokens},
                    {"ms_per_token_mean", decode.mean},
                    {"ms_per_token_stddev", decode.stddev},
                    {"tokens_per_s", decode.mean > 0 ? 1000.0 / decode.mean : 0.0},
                    {"steps", chained ? "chained" : "step_by_step"}}},
        {"batch_decode", batch_results},
        {"decode_bytes_per_token", bytes},
        {"expert_bytes", static_cast<int64_t>(cfg.expert_bytes())},
        // What one expert costs the host to read, copied or computed on the CPU: expert_bytes, or with
        // --pack-experts the mean packed size (the floor of a packed run is made of these).
        {"packed_experts", model->packed_experts()},
        {"expert_host_bytes", expert_host_bytes(*model)},
        {"decode_experts", {{"hits", decode_stats.hits},
                            {"misses", decode_stats.misses},
                            {"hit_rate", decode_stats.hits + decode_stats.misses
                                             ? static_cast<double>(decode_stats.hits) / (decode_stats.hits + decode_stats.misses)
                                             : 1.0},
                            {"bytes_moved_per_token", timed_steps ? decode_stats.bytes_moved / timed_steps : 0},
                            {"misses_per_token", timed_steps ? static_cast<double>(decode_stats.misses) / timed_steps : 0.0},
                            {"cpu_computed_per_token",
                             timed_steps ? static_cast<double>(decode_stats.cpu_computed) / timed_steps : 0.0},
                            {"split_computed_per_token",
                             timed_steps ? static_cast<double>(decode_stats.split_computed) / timed_steps : 0.0},
                            {"cpu_read_bytes_per_token", timed_steps ? decode_stats.cpu_read_bytes / timed_steps : 0},
                            // Copies and CPU reads alike: what the host's memory serves per token (both paths
                            // share its bandwidth; `moex trace simulate` reports the same as host reads).
                            {"host_read_bytes_per_token",
                             timed_steps ? (decode_stats.bytes_moved + decode_stats.cpu_read_bytes) / timed_steps : 0},
                            {"stall_ms_per_token", timed_steps ? decode_stats.stall_ms / timed_steps : 0.0},
                            {"cpu_ms_per_token", timed_steps ? decode_stats.cpu_ms / timed_steps : 0.0},
                            {"cpu_read_gbs", decode_stats.cpu_ms > 0
                                                 ? static_cast<double>(decode_stats.cpu_read_bytes) / decode_stats.cpu_ms / 1e6
                                                 : 0.0},
                            // The cache's size, in bytes and in whole experts of the model's size: the capacity to
                            // give `moex trace simulate` (--cache-fraction experts / (MoE layers x experts)) when
                            // it replays this run's --trace-out.
                            {"cache_bytes", stats.cache_bytes},
                            {"cache_experts", cfg.expert_bytes() > 0 ? stats.cache_bytes /
                                                                           static_cast<int64_t>(cfg.expert_bytes())
                                                                     : 0},
                            {"model_host_read_gbs", stats.model_host_read_gbs},  // the rates at the end
                            {"model_copy_gbs", stats.model_copy_gbs},
                            {"prefetch_issued", decode_stats.prefetch_issued},
                            {"prefetch_skipped", decode_stats.prefetch_skipped},
                            {"prefetch_precision", decode_stats.prefetch_issued
                                                       ? static_cast<double>(decode_stats.prefetch_used) / decode_stats.prefetch_issued
                                                       : 0.0},
                            {"prefetch_recall", decode_stats.misses + decode_stats.prefetch_used
                                                    ? static_cast<double>(decode_stats.prefetch_used) /
                                                          (decode_stats.misses + decode_stats.prefetch_used)
                                                    : 0.0}}},
        {"expert_hits", stats.hits},
        {"expert_misses", stats.misses},
        {"bytes_moved", stats.bytes_moved},
        {"stall_ms", stats.stall_ms}};
    if (trace) out["trace_out"] = options->trace_out;
    if (replay)
      out["routing_trace"] = {{"path", options->routing_trace},
                              {"model", replay->trace().model},
                              {"requests", replay->trace().requests.size()},
                              {"replayed_rows", replay->replayed_rows()}};
    if (!gpu_about.is_null()) out["gpu"] = gpu_about;
    // What the run held on the device at the end (buffers grow and stay: about its peak), against --gpu-memory.
    const Backend::DeviceMemoryUse memory = engine.backend().device_memory_use();
    if (memory.used > 0) {
      const int64_t budget =
          options->model.gpu_memory.empty() ? 0 : parse_byte_size(options->model.gpu_memory, "--gpu-memory");
      out["gpu_memory"] = {{"used_bytes", memory.used},
                           {"at_start_bytes", memory.at_start},
                           {"moex_bytes", memory.used - memory.at_start},
                           {"budget_bytes", budget}};
    }
    if (decode_energy) out["decode"]["gpu"] = *decode_energy;
    if (options->bandwidth_gbs > 0) {
      const double floor_ms = bytes / (options->bandwidth_gbs * 1e6);
      out["bandwidth_gbs"] = options->bandwidth_gbs;
      out["decode_roofline_ms"] = floor_ms;
      out["decode_fraction_of_roofline"] = decode.mean > 0 ? floor_ms / decode.mean : 0.0;
    }
    if (options->json) {
      std::cout << out.dump() << "\n";
      return 0;
    }
    std::printf("%s on %s\n", cfg.summary().c_str(), options->model.device.c_str());
    // The GPU's figures under each phase, from the JSON the phase wrote.
    auto print_gpu = [&](const nlohmann::json& phase) {
      if (phase.contains("gpu")) std::printf("                      %s\n", gpu_energy_line(phase["gpu"]).c_str());
    };
    if (out.contains("gpu") && out["gpu"].contains("name"))
      std::printf("GPU telemetry: %s (%s)\n", out["gpu"]["name"].get<std::string>().c_str(),
                  out["gpu"]["pci_bus_id"].get<std::string>().c_str());
    for (const auto& p : prefill_results) {
      std::printf("prefill %6lld tokens: %9.2f ms (+- %.2f)  %10.1f tokens/s\n",
                  static_cast<long long>(p["prompt_tokens"].get<int64_t>()), p["ms_mean"].get<double>(),
                  p["ms_stddev"].get<double>(), p["tokens_per_s"].get<double>());
      print_gpu(p);
    }
    std::printf("decode  (batch 1):    %9.3f ms/token (+- %.3f)  %10.1f tokens/s; reads %.1f MiB/token%s\n", decode.mean,
                decode.stddev, decode.mean > 0 ? 1000.0 / decode.mean : 0.0, bytes / 1048576.0,
                chained ? "; steps chained on the device" : "");
    print_gpu(out["decode"]);
    if (out.contains("gpu_memory")) {
      const nlohmann::json& m = out["gpu_memory"];
      const int64_t budget = m["budget_bytes"].get<int64_t>();
      std::printf("GPU memory:           %.2f GiB held by moex%s, %.2f GiB by the CUDA context\n",
                  m["moex_bytes"].get<int64_t>() / 1073741824.0,
                  budget > 0 ? fmt::format(" of --gpu-memory {:.2f} GiB", budget / 1073741824.0).c_str() : "",
                  m["at_start_bytes"].get<int64_t>() / 1073741824.0);
    }
    for (const auto& b : batch_results) {
      std::printf("decode  (batch %3lld):  %9.3f ms/step  (+- %.3f)  %10.1f tokens/s; host picks %.3f ms/step\n",
                  static_cast<long long>(b["batch"].get<int64_t>()), b["ms_per_step_mean"].get<double>(),
                  b["ms_per_step_stddev"].get<double>(), b["tokens_per_s"].get<double>(),
                  b["host_pick_ms_per_step"].get<double>());
      print_gpu(b);
    }
    if (decode_stats.misses > 0) {
      const std::string host_share =
          decode_stats.cpu_read_bytes > 0
              ? fmt::format(" (with the CPU's reads, the host serves {:.1f} MiB)",
                            out["decode_experts"]["host_read_bytes_per_token"].get<int64_t>() / 1048576.0)
              : "";
      std::printf("experts while decoding: hit rate %.3f, %.1f MiB moved/token%s, stall %.2f ms/token, prefetch "
                  "precision %.2f recall %.2f\n",
                  out["decode_experts"]["hit_rate"].get<double>(),
                  out["decode_experts"]["bytes_moved_per_token"].get<int64_t>() / 1048576.0, host_share.c_str(),
                  out["decode_experts"]["stall_ms_per_token"].get<double>(),
                  out["decode_experts"]["prefetch_precision"].get<double>(),
                  out["decode_experts"]["prefetch_recall"].get<double>());
    }
    if (options->bandwidth_gbs > 0)
      std::printf("roofline at %.1f GB/s: %.3f ms/token -> %.0f%% of the roofline\n", options->bandwidth_gbs,
                  out["decode_roofline_ms"].get<double>(), 100 * out["decode_fraction_of_roofline"].get<double>());
    return 0;
  };
}

}  // namespace moex::cli
