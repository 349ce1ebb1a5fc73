// `moex trace simulate|stats|convert`: replay routing traces through the cache policies and
// predictors, describe a trace's routing structure, convert between the JSONL and binary formats.
#include <cstdio>
#include <iostream>
#include <sstream>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "cli_common.h"
#include "commands.h"
#include "trace_record.h"
#include "moex/core/error.h"
#include "moex/trace/simulator.h"
#include "moex/trace/trace.h"
#include "moex/trace/trace_stats.h"

namespace moex::cli {
namespace {

std::vector<std::string> split_list(const std::string& text, const std::string& flag) {
  std::vector<std::string> items;
  std::stringstream stream(text);
  std::string item;
  while (std::getline(stream, item, ',')) {
    size_t first = item.find_first_not_of(' ');
    size_t last = item.find_last_not_of(' ');
    if (first == std::string::npos) throw UsageError(fmt::format("{}: empty item in \"{}\"", flag, text));
    items.push_back(item.substr(first, last - first + 1));
  }
  if (items.empty()) throw UsageError(fmt::format("{}: expected a comma-separated list, got \"{}\"", flag, text));
  return items;
}

double parse_number(const std::string& text, const std::string& flag) {
  try {
    size_t used = 0;
    double value = std::stod(text, &used);
    if (used == text.size()) return value;
  } catch (const std::exception&) {
  }
  throw UsageError(fmt::format("{}: \"{}\" is not a number", flag, text));
}

// Bytes of one expert (gate, up, down in bf16) for models whose traces moex knows.
int64_t known_expert_bytes(const std::string& model) {
  if (model.find("Mixtral-8x7B") != std::string::npos) return int64_t{3} * 4096 * 14336 * 2;
  return 0;
}

struct SimulateOptions {
  std::string trace_path;
  std::string policies = "lru,lfu,activation,belady";
  std::string predictors = "none";
  std::string fractions = "0.25,0.5";
  std::string scopes = "layer";
  std::string prefetch = "ideal";
  std::string training = "online";
  int32_t prefetch_width = 0;
  int32_t lookahead = 1;
  double pregate_accuracy = 0.9;
  uint64_t seed = 1;
  int64_t expert_bytes = 0;
  double link_gbps = 55;
  double layer_compute_us = 250;
  double chunk_mib = 16;
  bool cpu_misses = false;
  bool policy_admission = false;
  double host_gbs = 0;  // > 0: floors in ms per token at this host-memory rate (copies and CPU reads together)
  bool json = false;
};

// Host reads per token as time: every read at the host's memory rate, copies and CPU reads sharing it.
double host_ms_per_token(double reads_per_token, int64_t expert_bytes, double host_gbs) {
  return reads_per_token * static_cast<double>(expert_bytes) / (host_gbs * 1e6);
}

nlohmann::json result_json(const SimResult& r, double belady_hit_rate, double min_host_reads, double host_gbs) {
  const SimConfig& c = r.config;
  nlohmann::json out = {
      {"scope", c.scope == CacheScope::kPerLayer ? "layer" : "global"},
      {"cache_fraction", c.cache_fraction},
      {"cache_slots", r.cache_slots},
      {"policy", c.policy},
      {"predictor", c.predictor.empty() ? "none" : c.predictor},
      {"tokens", r.num_tokens},
      {"accesses", r.accesses},
      {"hits", r.hits},
      {"misses", r.misses},
      {"hit_rate", r.hit_rate()},
      {"belady_hit_rate", belady_hit_rate},
      {"experts_moved_per_token",
       r.num_tokens ? static_cast<double>(r.misses - r.cpu_reads + r.prefetch_inserted) / r.num_tokens : 0.0},
      {"cpu_misses", c.cpu_misses},
      {"policy_admission", c.policy_admission},
      {"cpu_reads_per_token", r.num_tokens ? static_cast<double>(r.cpu_reads) / r.num_tokens : 0.0},
      // What the host's memory serves per token, copies and CPU reads alike (ideal prefetch: whole experts).
      {"host_reads_per_token", r.host_reads_per_token()},
      // The fewest any policy can do at this size (Belady's MIN with bypass): what the floor of a run is built on.
      {"min_host_reads_per_token", min_host_reads},
      {"bytes_moved", r.bytes_moved},
  };
  if (host_gbs > 0) {
    out["host_gbs"] = host_gbs;
    out["host_ms_per_token"] = host_ms_per_token(r.host_reads_per_token(), c.expert_bytes, host_gbs);
    out["min_host_floor_ms_per_token"] = host_ms_per_token(min_host_reads, c.expert_bytes, host_gbs);
  }
  std::vector<double> layer_rates;
  for (size_t idx = 0; idx < r.layer_hits.size(); ++idx)
    layer_rates.push_back(r.layer_accesses[idx] ? static_cast<double>(r.layer_hits[idx]) / r.layer_accesses[idx] : 0.0);
  out["layer_hit_rate"] = layer_rates;
  if (!c.predictor.empty()) {
    out["prefetch"] = {{"mode", c.prefetch_mode == PrefetchMode::kIdeal ? "ideal" : "link"},
                       {"training", c.training == PredictorTraining::kOnline ? "online" : "loo"},
                       {"width", c.prefetch_width},
                       {"lookahead", c.lookahead_layers},
                       {"inserted", r.prefetch_inserted},
                       {"used", r.prefetch_used},
                       {"precision", r.prefetch_precision()},
                       {"recall", r.prefetch_recall()},
                       {"late", r.late_prefetches},
                       {"cancelled", r.prefetch_cancelled}};
    out["prediction"] = {{"precision", r.prediction.precision()}, {"recall", r.prediction.recall()}};
    if (c.predictor == "pregate") {
      if (r.pregate_recorded) out["prefetch"]["pregate_logits"] = "recorded";
      else out["prefetch"]["synthetic_pregate_accuracy"] = c.pregate_accuracy;
    }
  }
  if (c.prefetch_mode == PrefetchMode::kLink) {
    out["link"] = {{"expert_bytes", c.expert_bytes},
                   {"gbps", c.link_bytes_per_us / 1e3},
                   {"layer_compute_us", c.layer_compute_us},
                   {"chunk_bytes", c.chunk_bytes},
                   {"stall_ms_per_token", r.num_tokens ? r.stall_ms / r.num_tokens : 0.0},
                   {"compute_ms_per_token", r.num_tokens ? r.compute_ms / r.num_tokens : 0.0}};
  }
  return out;
}

int run_simulate(const SimulateOptions& o) {
  Trace trace = read_trace(o.trace_path);
  std::vector<std::string> policies = split_list(o.policies, "--policy");
  std::vector<std::string> predictors = split_list(o.predictors, "--predictor");
  std::vector<double> fractions;
  for (const std::string& item : split_list(o.fractions, "--cache-fraction"))
    fractions.push_back(parse_number(item, "--cache-fraction"));
  std::vector<CacheScope> scopes;
  for (const std::string& item : split_list(o.scopes, "--scope")) {
    if (item == "layer") {
      scopes.push_back(CacheScope::kPerLayer);
    } else if (item == "global") {
      scopes.push_back(CacheScope::kGlobal);
    } else {
      throw UsageError(fmt::format("--scope: \"{}\", expected layer or global", item));
    }
  }
  // Names are checked before any output, so a typo fails at once.
  for (const std::string& policy : policies) make_eviction_policy(policy, {1, 1, {{0, 0}}});
  for (const std::string& predictor : predictors)
    if (predictor != "none") make_expert_predictor(predictor, {1, 1, 1, 1});
  SimConfig base;
  if (o.prefetch == "ideal") {
    base.prefetch_mode = PrefetchMode::kIdeal;
  } else if (o.prefetch == "link") {
    base.prefetch_mode = PrefetchMode::kLink;
  } else {
    throw UsageError(fmt::format("--prefetch: \"{}\", expected ideal or link", o.prefetch));
  }
  if (o.training == "online") {
    base.training = PredictorTraining::kOnline;
  } else if (o.training == "loo") {
    base.training = PredictorTraining::kLeaveOneOut;
  } else {
    throw UsageError(fmt::format("--training: \"{}\", expected online or loo", o.training));
  }
  base.prefetch_width = o.prefetch_width;
  base.lookahead_layers = o.lookahead;
  base.pregate_accuracy = o.pregate_accuracy;
  base.seed = o.seed;
  base.expert_bytes = o.expert_bytes > 0 ? o.expert_bytes : known_expert_bytes(trace.model);
  base.link_bytes_per_us = o.link_gbps * 1e3;
  base.layer_compute_us = o.layer_compute_us;
  base.chunk_bytes = static_cast<int64_t>(o.chunk_mib * (1 << 20));
  base.cpu_misses = o.cpu_misses;
  base.policy_admission = o.policy_admission;
  if (o.host_gbs > 0 && base.expert_bytes <= 0)
    throw UsageError(fmt::format("--host-gbs turns host reads into time and needs the bytes of one expert: the trace's "
                                 "model (\"{}\") is not one moex knows, give --expert-bytes",
                                 trace.model));

  nlohmann::json results = nlohmann::json::array();
  if (!o.json) {
    std::printf("trace %s: %s, %zu requests, %lld tokens, %d layers x %d experts, top-%d\n", o.trace_path.c_str(),
                trace.model.c_str(), trace.requests.size(), static_cast<long long>(trace.num_tokens()),
                trace.num_layers, trace.num_experts, trace.top_k);
    std::printf("%-6s %5s %5s  %-10s %-9s %6s %7s  %9s %9s  %9s %9s  %9s\n", "scope", "cache", "slots", "policy",
                "predictor", "hit", "/belady", "pf.prec", "pf.recall", "pred.prec", "pred.rec", "moved/tok");
  }
  for (CacheScope scope : scopes)
    for (double fraction : fractions) {
      SimConfig belady = base;
      // The reference is demand loading's optimum, whatever the rows do with their misses.
      belady.scope = scope, belady.cache_fraction = fraction, belady.policy = "belady", belady.predictor.clear();
      belady.cpu_misses = false, belady.policy_admission = false;
      double belady_rate = simulate(trace, belady).hit_rate();
      // And the bound on host reads: MIN with bypass (a miss needed later than everything resident runs on the host).
      belady.policy_admission = true;
      double min_reads = simulate(trace, belady).host_reads_per_token();
      if (!o.json) {
        std::string floor;
        if (o.host_gbs > 0) {
          const double ms = host_ms_per_token(min_reads, base.expert_bytes, o.host_gbs);
          floor = fmt::format(", at {:g} GB/s {:.1f} ms/token ({:.2f} tokens/s)", o.host_gbs, ms, 1e3 / ms);
        }
        std::printf("%-6s %5.2f: fewest host reads per token at this size (Belady's MIN with bypass): %.1f%s\n",
                    scope == CacheScope::kPerLayer ? "layer" : "global", fraction, min_reads, floor.c_str());
      }
      for (const std::string& predictor : predictors)
        for (const std::string& policy : policies) {
          SimConfig config = base;
          config.scope = scope;
          config.cache_fraction = fraction;
          config.policy = policy;
          config.predictor = predictor == "none" ? "" : predictor;
          SimResult r = simulate(trace, config);
          nlohmann::json row = result_json(r, belady_rate, min_reads, o.host_gbs);
          results.push_back(row);
          if (o.json) continue;
          bool pf = !config.predictor.empty();
          std::string stall;
          // The row's figures, as its JSON has them.
          if (config.cpu_misses || config.policy_admission)
            stall = fmt::format("  of which on the CPU {:.1f}", row["cpu_reads_per_token"].get<double>());
          if (o.host_gbs > 0) stall += fmt::format("  host {:.1f} ms/tok", row["host_ms_per_token"].get<double>());
          if (config.prefetch_mode == PrefetchMode::kLink)
            stall += fmt::format("  stall {:.1f} ms/tok (compute {:.1f})", r.stall_ms / r.num_tokens,
                                r.compute_ms / r.num_tokens);
          std::printf("%-6s %5.2f %5lld  %-10s %-9s %6.3f %7.3f  %9s %9s  %9s %9s  %9.1f%s\n",
                      scope == CacheScope::kPerLayer ? "layer" : "global", fraction,
                      static_cast<long long>(r.cache_slots), policy.c_str(), predictor.c_str(), r.hit_rate(),
                      belady_rate > 0 ? r.hit_rate() / belady_rate : 0.0,
                      pf ? fmt::format("{:.3f}", r.prefetch_precision()).c_str() : "-",
                      pf ? fmt::format("{:.3f}", r.prefetch_recall()).c_str() : "-",
                      pf ? fmt::format("{:.3f}", r.prediction.precision()).c_str() : "-",
                      pf ? fmt::format("{:.3f}", r.prediction.recall()).c_str() : "-",
                      row["host_reads_per_token"].get<double>(), stall.c_str());
        }
    }
  if (o.json) {
    nlohmann::json out = {{"trace", o.trace_path},
                          {"model", trace.model},
                          {"requests", trace.requests.size()},
                          {"tokens", trace.num_tokens()},
                          {"num_layers", trace.num_layers},
                          {"num_experts", trace.num_experts},
                          {"top_k", trace.top_k},
                          {"results", results}};
    std::cout << out.dump() << '\n';
  } else if (base.prefetch_mode == PrefetchMode::kIdeal && predictors != std::vector<std::string>{"none"}) {
    std::printf("prefetch: ideal (a predicted expert is resident at once; it still takes a slot and evicts)\n");
  }
  return 0;
}

int run_stats(const std::string& path, bool json) {
  Trace trace = read_trace(path);
  TraceStats stats = compute_trace_stats(trace);
  if (json) {
    nlohmann::json layers = nlohmann::json::array();
    for (const LayerTraceStats& l : stats.layers) {
      nlohmann::json row = {{"layer", l.layer_idx},         {"load_skew", l.load_skew},
                            {"unused_experts", l.unused_experts}, {"p_reuse", l.p_reuse},
                            {"reuse_fraction", l.reuse_fraction}};
      if (l.p_share_next_layer) {
        row["p_share_next_layer"] = *l.p_share_next_layer;
        row["next_layer_affinity_recall"] = *l.next_layer_affinity_recall;
        row["next_layer_frequency_recall"] = *l.next_layer_frequency_recall;
      }
      layers.push_back(row);
    }
    nlohmann::json out = {{"trace", path},
                          {"model", trace.model},
                          {"requests", stats.num_requests},
                          {"tokens", stats.num_tokens},
                          {"num_layers", trace.num_layers},
                          {"num_experts", trace.num_experts},
                          {"top_k", trace.top_k},
                          {"random_p_reuse", stats.random_p_reuse},
                          {"random_reuse_fraction", stats.random_reuse_fraction},
                          {"mean_load_skew", stats.mean_load_skew()},
                          {"mean_p_reuse", stats.mean_p_reuse()},
                          {"mean_reuse_fraction", stats.mean_reuse_fraction()},
                          {"mean_p_share_next_layer", stats.mean_p_share_next_layer()},
                          {"mean_next_layer_affinity_recall", stats.mean_next_layer_affinity_recall()},
                          {"mean_next_layer_frequency_recall", stats.mean_next_layer_frequency_recall()},
                          {"layers", layers}};
    std::cout << out.dump() << '\n';
    return 0;
  }
  std::printf("trace %s: %s, %lld requests, %lld tokens, %d layers x %d experts, top-%d\n", path.c_str(),
              trace.model.c_str(), static_cast<long long>(stats.num_requests),
              static_cast<long long>(stats.num_tokens), trace.num_layers, trace.num_experts, trace.top_k);
  std::printf("load skew max/mean: %.2f (mean over layers)\n", stats.mean_load_skew());
  std::printf("same layer, previous token: P(reuse >= 1 expert) %.3f (random %.3f), reuse fraction %.3f (random %.3f)\n",
              stats.mean_p_reuse(), stats.random_p_reuse, stats.mean_reuse_fraction(), stats.random_reuse_fraction);
  std::printf("same token, next layer: P(share >= 1 expert id) %.3f (random %.3f; ids of different layers are "
              "different experts)\n",
              stats.mean_p_share_next_layer(), stats.random_p_reuse);
  std::printf("same token, next layer: top-%d recall from this layer's experts (in-sample transitions) %.3f, "
              "from layer frequency %.3f (random %.3f)\n",
              trace.top_k, stats.mean_next_layer_affinity_recall(), stats.mean_next_layer_frequency_recall(),
              stats.random_reuse_fraction);
  std::printf("%5s %6s %6s %8s %8s %10s %10s %10s\n", "layer", "skew", "unused", "P(reuse)", "reuse", "P(share+1)",
              "aff.rec+1", "freq.rec+1");
  for (const LayerTraceStats& l : stats.layers) {
    auto opt = [](const std::optional<double>& v) { return v ? fmt::format("{:.3f}", *v) : std::string("-"); };
    std::printf("%5d %6.2f %6d %8.3f %8.3f %10s %10s %10s\n", l.layer_idx, l.load_skew, l.unused_experts, l.p_reuse,
                l.reuse_fraction, opt(l.p_share_next_layer).c_str(), opt(l.next_layer_affinity_recall).c_str(),
                opt(l.next_layer_frequency_recall).c_str());
  }
  return 0;
}

int run_convert(const std::string& in, const std::string& out, const std::string& format) {
  Trace trace = read_trace(in);
  if (format == "moex") {
    write_moex_trace(trace, out);
  } else if (format == "jsonl") {
    write_jsonl_trace(trace, out);
  } else {
    throw UsageError(fmt::format("--format: \"{}\", expected moex or jsonl", format));
  }
  std::printf("%s: %zu requests, %lld tokens written as %s\n", out.c_str(), trace.requests.size(),
              static_cast<long long>(trace.num_tokens()), format.c_str());
  return 0;
}

}  // namespace

CommandAction setup_trace(CLI::App* sub) {
  sub->require_subcommand(1);
  auto sim = std::make_shared<SimulateOptions>();
  CLI::App* simulate_cmd = sub->add_subcommand("simulate", "replay a trace through expert caches and predictors");
  simulate_cmd->add_option("--trace", sim->trace_path, "trace file (shared JSONL or moex binary)")->required();
  simulate_cmd->add_option("--policy", sim->policies, "eviction policies, comma-separated: lru,lfu,activation,belady");
  simulate_cmd->add_option("--predictor", sim->predictors,
                           "predictors, comma-separated: none,frequency,stride,affinity,eam,pregate");
  simulate_cmd->add_option("--cache-fraction", sim->fractions, "cache sizes as fractions of the experts, e.g. 0.25,0.5");
  simulate_cmd->add_option("--scope", sim->scopes, "cache budget per layer or global: layer, global or layer,global");
  simulate_cmd->add_option("--prefetch", sim->prefetch,
                           "ideal (a prediction is resident at once) or link (copies cross a link of --link-gbps)");
  simulate_cmd->add_option("--training", sim->training,
                           "online (predictor learns during replay) or loo (first trained on all other requests)");
  simulate_cmd->add_option("--prefetch-width", sim->prefetch_width, "experts prefetched per predicted layer (0: top_k)")
      ->check(non_negative_number());
  simulate_cmd->add_option("--lookahead", sim->lookahead, "layers ahead to predict and prefetch")
      ->check(positive_number());
  simulate_cmd->add_option("--pregate-accuracy", sim->pregate_accuracy,
                           "pregate on a trace without recorded pre-gating logits: synthetic lookahead logits keep each true "
                           "expert with this probability");
  simulate_cmd->add_option("--seed", sim->seed, "seed of the synthetic pre-gating noise");
  simulate_cmd->add_option("--expert-bytes", sim->expert_bytes, "bytes of one expert (default: known model sizes)")
      ->check(non_negative_number());
  simulate_cmd->add_option("--link-gbps", sim->link_gbps, "link model: host-to-device GB/s");
  simulate_cmd->add_option("--layer-compute-us", sim->layer_compute_us, "link model: compute time of one layer (us)");
  simulate_cmd->add_option("--chunk-mib", sim->chunk_mib, "link model: copy chunk size (MiB), the preemption grain");
  auto cpu_misses_flag = simulate_cmd->add_flag("--cpu-misses", sim->cpu_misses,
                         "misses run on the host CPU and bypass the cache (no slot, no eviction): only prefetches fill "
                         "it; moved/tok then counts copies and CPU reads, what the host's memory serves");
  auto admission_flag = simulate_cmd->add_flag(
      "--policy-admission", sim->policy_admission,
      "a miss that must evict asks the policy whether it is worth its victim; a declined one runs on the host CPU "
      "(belady: Belady's MIN with bypass, the fewest host reads possible; lfu: TinyLFU's rule, admitted when used "
      "more often than the victim; lru and activation admit every miss)");
  cpu_misses_flag->excludes(admission_flag);
  simulate_cmd->add_option("--host-gbs", sim->host_gbs,
                           "host memory rate (GB/s) that copies and CPU reads of experts share: host reads per token "
                           "then also as ms per token, and the MIN line as the floor of a decode step (needs the "
                           "expert's bytes: known models or --expert-bytes)")
      ->check(non_negative_number());
  simulate_cmd->add_flag("--json", sim->json, "print one JSON object");

  auto stats_path = std::make_shared<std::string>();
  auto stats_json = std::make_shared<bool>(false);
  CLI::App* stats_cmd = sub->add_subcommand("stats", "routing structure of a trace: load skew, reuse, next-layer");
  stats_cmd->add_option("--trace", *stats_path, "trace file (shared JSONL or moex binary)")->required();
  stats_cmd->add_flag("--json", *stats_json, "print one JSON object");

  auto convert_in = std::make_shared<std::string>();
  auto convert_out = std::make_shared<std::string>();
  auto convert_format = std::make_shared<std::string>("moex");
  CLI::App* convert_cmd = sub->add_subcommand("convert", "rewrite a trace as moex binary or shared JSONL");
  convert_cmd->add_option("--in", *convert_in, "input trace")->required();
  convert_cmd->add_option("--out", *convert_out, "output file")->required();
  convert_cmd->add_option("--format", *convert_format, "moex (binary) or jsonl");

  auto record_action = std::make_shared<std::function<int()>>();
  CLI::App* record_cmd = add_trace_record_command(sub, record_action.get());

  return [=]() -> int {
    if (record_cmd->parsed()) return (*record_action)();
    if (simulate_cmd->parsed()) return run_simulate(*sim);
    if (stats_cmd->parsed()) return run_stats(*stats_path, *stats_json);
    return run_convert(*convert_in, *convert_out, *convert_format);
  };
}

}  // namespace moex::cli
