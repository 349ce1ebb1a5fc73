// Test helpers around tests/fixtures: discovery of the transformers reference checkpoints and their
// reference.json (see docs/fixtures.md for the format).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include <unistd.h>

namespace moex::test {

inline std::filesystem::path fixtures_root() { return std::filesystem::path(MOEX_SOURCE_DIR) / "tests/fixtures"; }

// Every fixture directory that has a reference.json, sorted by name.
inline std::vector<std::string> fixture_names() {
  std::vector<std::string> names;
  if (!std::filesystem::exists(fixtures_root())) return names;
  for (const auto& entry : std::filesystem::directory_iterator(fixtures_root()))
    if (std::filesystem::exists(entry.path() / "reference.json") && std::filesystem::exists(entry.path() / "config.json"))
      names.push_back(entry.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

// The embedded default model (models/default) carries a reference.json of the same format.
inline std::filesystem::path default_model_dir() { return std::filesystem::path(MOEX_SOURCE_DIR) / "models/default"; }

inline nlohmann::json read_json(const std::filesystem::path& path) {
  std::ifstream in(path);
  return nlohmann::json::parse(in);
}

// The prompt token ids of a fixture directory's reference.json.
inline std::vector<int32_t> reference_prompt(const std::filesystem::path& fixture_dir) {
  return read_json(fixture_dir / "reference.json")["prompt_ids"].get<std::vector<int32_t>>();
}

// A copy of the checkpoint at source, in a folder of its own under the temporary directory, whose config.json and
// generation_config.json name eos as the only EOS id: a fixture that stops where a test wants it to. The caller
// loads it and removes the folder.
inline std::filesystem::path copy_with_eos(const std::filesystem::path& source, int32_t eos, const std::string& tag) {
  const auto dir = std::filesystem::temp_directory_path() / ("moex_" + tag + "_" + std::to_string(::getpid()));
  std::filesystem::remove_all(dir);
  std::filesystem::copy(source, dir);
  for (const char* file : {"config.json", "generation_config.json"}) {
    if (!std::filesystem::exists(dir / file)) continue;
    nlohmann::json config = read_json(dir / file);
    config["eos_token_id"] = eos;
    std::ofstream(dir / file) << config.dump(2);
  }
  return dir;
}

// The largest |a[i] - b[i]|; infinity when the sizes differ, so that a bound on it fails.
inline float max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size()) return std::numeric_limits<float>::infinity();
  float diff = 0;
  for (size_t idx = 0; idx < a.size(); ++idx) diff = std::max(diff, std::fabs(a[idx] - b[idx]));
  return diff;
}

// 32 tokens (first, first + step, ... mod 400): a prefill that routes to every expert of the mixtral fixture.
inline std::vector<int32_t> every_expert_prompt(int32_t first, int32_t step) {
  std::vector<int32_t> prompt(32);
  for (size_t idx = 0; idx < prompt.size(); ++idx) prompt[idx] = first + static_cast<int32_t>(idx) * step % 400;
  return prompt;
}

}  // namespace moex::test
