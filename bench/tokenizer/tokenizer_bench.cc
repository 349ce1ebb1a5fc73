// Encode throughput of moex::Tokenizer (MB/s, one thread, one document per encode call) on real text;
// bench/tokenizer/run.sh runs it beside the Hugging Face `tokenizers` baseline on the same documents.
// Usage: moex_tokenizer_bench CHECKPOINT_DIR DOCS.jsonl [REPS]   (prints one JSON line)
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "moex/core/error.h"
#include "moex/tokenizer/tokenizer.h"

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s CHECKPOINT_DIR DOCS.jsonl [REPS]\n", argv[0]);
    return 2;
  }
  try {
    const int reps = argc > 3 ? std::stoi(argv[3]) : 5;
    const auto load_start = std::chrono::steady_clock::now();
    const moex::Tokenizer tok = moex::Tokenizer::from_dir(argv[1]);
    const double load_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - load_start).count();
    std::vector<std::string> docs;
    std::ifstream in(argv[2]);
    if (!in) throw moex::IoError(std::string(argv[2]) + ": cannot open");
    for (std::string line; std::getline(in, line);)
      if (!line.empty()) docs.push_back(nlohmann::json::parse(line).at("text").get<std::string>());
    size_t bytes = 0, tokens = 0;
    for (const auto& d : docs) {
      bytes += d.size();
      tokens += tok.encode(d, false).size();  // warm-up, and the output check against the peer's count
    }
    std::vector<double> rates;
    for (int r = 0; r < reps; ++r) {
      const auto t0 = std::chrono::steady_clock::now();
      size_t sink = 0;
      for (const auto& d : docs) sink += tok.encode(d, false).size();
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (sink != tokens) throw moex::Error("token count changed between repetitions");
      rates.push_back(static_cast<double>(bytes) / s / 1e6);
    }
    double mean = 0, var = 0;
    for (double x : rates) mean += x / rates.size();
    for (double x : rates) var += (x - mean) * (x - mean) / std::max<size_t>(1, rates.size() - 1);
    nlohmann::json out{{"bench", "tokenizer_encode"}, {"impl", "moex"}, {"bytes", bytes}, {"tokens", tokens},
                       {"docs", docs.size()}, {"reps", reps}, {"load_s", std::round(load_s * 1000) / 1000},
                       {"mb_per_s", std::round(mean * 1000) / 1000},
                       {"mb_per_s_stddev", std::round(std::sqrt(var) * 1000) / 1000}};
    std::printf("%s\n", out.dump().c_str());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moex_tokenizer_bench: %s\n", e.what());
    return 1;
  }
  return 0;
}
