// Where tokenizer tests find real tokenizer files: npm downloads (tools/fetch_tokenizers.sh) and OLMoE's
// from ../shared. Tests that need a missing file skip with a hint instead of failing.
#pragma once

#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <map>
#include <memory>
#include <string>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "moex/tokenizer/tokenizer.h"

namespace moex::test {

inline std::filesystem::path source_dir() { return MOEX_SOURCE_DIR; }
inline std::filesystem::path fixture_dir() { return source_dir() / "tests/fixtures/tokenizer"; }

// Directory holding tokenizer.json (+ tokenizer_config.json) of `family`, or "" when unavailable.
inline std::filesystem::path family_dir(const std::string& family) {
  if (family == "olmoe") {
    const auto xz = source_dir() / "../shared/tokenizers/olmoe/tokenizer.json.xz";
    if (!std::filesystem::exists(xz)) return {};
    const auto dir = std::filesystem::temp_directory_path() / "moex_tokenizer_test_olmoe";
    if (!std::filesystem::exists(dir / "tokenizer.json")) {
      std::filesystem::create_directories(dir);
      // ctest runs test cases as parallel processes: each writes its own files and renames them into
      // place atomically, tokenizer.json last (its presence means both are complete).
      const std::string pid = std::to_string(::getpid());
      const auto config_tmp = dir / ("tokenizer_config.json.part" + pid);
      std::filesystem::copy_file(xz.parent_path() / "tokenizer_config.json", config_tmp,
                                 std::filesystem::copy_options::overwrite_existing);
      std::filesystem::rename(config_tmp, dir / "tokenizer_config.json");
      const std::string tmp = (dir / ("tokenizer.json.part" + pid)).string();
      const std::string cmd = "xz -dc '" + xz.string() + "' > '" + tmp + "' 2>/dev/null";
      if (std::system(cmd.c_str()) != 0) return {};
      std::filesystem::rename(tmp, dir / "tokenizer.json");
    }
    return dir;
  }
  const auto dir = source_dir() / "third_party/downloads/tokenizers" / family;
  return std::filesystem::exists(dir / "tokenizer.json") ? dir : std::filesystem::path();
}

// "variant_<name>": the family tokenizer.json patched as tests/fixtures/tokenizer/variants.json says (the
// same patch tools/tokenizer_reference.js applied before asking the reference).
inline std::unique_ptr<Tokenizer> load_variant(const std::string& name) {
  std::ifstream vin(fixture_dir() / "variants.json");
  const auto v = nlohmann::json::parse(vin)["variants"][name.substr(std::string("variant_").size())];
  const auto dir = family_dir(v["base"]);
  if (dir.empty()) return nullptr;
  std::ifstream in(dir / "tokenizer.json");
  auto j = nlohmann::json::parse(in);
  const auto replace = v.value("replace", nlohmann::json::object());
  const auto model_overrides = v.value("model_overrides", nlohmann::json::object());
  const auto added = v.value("added_tokens_extra", nlohmann::json::array());
  for (const auto& [k, val] : replace.items()) j[k] = val;
  for (const auto& [k, val] : model_overrides.items()) j["model"][k] = val;
  for (const auto& t : added) j["added_tokens"].push_back(t);
  return std::make_unique<Tokenizer>(Tokenizer::from_json(j.dump(), name));
}

// Loads each tokenizer once per test binary (the big vocabularies take ~1 s to parse).
inline const Tokenizer* family_tokenizer(const std::string& family) {
  static std::map<std::string, std::unique_ptr<Tokenizer>> cache;
  auto it = cache.find(family);
  if (it == cache.end()) {
    std::unique_ptr<Tokenizer> tok;
    if (family.starts_with("variant_")) {
      tok = load_variant(family);
    } else if (const auto dir = family_dir(family); !dir.empty()) {
      tok = std::make_unique<Tokenizer>(Tokenizer::from_dir(dir));
    }
    it = cache.emplace(family, std::move(tok)).first;
  }
  return it->second.get();
}

#define MOEX_REQUIRE_FAMILY(tok, family)                                                                 \
  const ::moex::Tokenizer* tok = ::moex::test::family_tokenizer(family);                                 \
  if (!tok) GTEST_SKIP() << "tokenizer files of " << (family)                                             \
                         << " are missing: run tools/fetch_tokenizers.sh (OLMoE: ../shared/tokenizers)"

}  // namespace moex::test
