#include "moex/io/checkpoint.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "moex/core/error.h"

namespace moex {
namespace fs = std::filesystem;

std::unique_ptr<Checkpoint> Checkpoint::open(const std::string& dir) {
  if (!fs::exists(dir)) throw IoError(fmt::format("{}: model directory does not exist", dir));
  if (!fs::is_directory(dir)) throw IoError(fmt::format("{}: not a directory (expected a Hugging Face model directory)", dir));
  auto ckpt = std::unique_ptr<Checkpoint>(new Checkpoint());
  ckpt->dir_ = dir;
  const fs::path index_path = fs::path(dir) / "model.safetensors.index.json";
  std::vector<std::string> shard_names;
  std::map<std::string, std::string> weight_map;
  if (fs::exists(index_path)) {
    std::ifstream in(index_path);
    nlohmann::json index;
    try {
      index = nlohmann::json::parse(in);
    } catch (const nlohmann::json::exception& e) {
      throw IoError(fmt::format("{}: not valid JSON: {}", index_path.string(), e.what()));
    }
    if (!index.contains("weight_map") || !index["weight_map"].is_object())
      throw FormatError(fmt::format("{}: missing the \"weight_map\" object", index_path.string()));
    for (auto& [name, shard] : index["weight_map"].items()) {
      if (!shard.is_string())
        throw FormatError(fmt::format("{}: weight_map[\"{}\"] is not a file name", index_path.string(), name));
      weight_map[name] = shard.get<std::string>();
      if (std::find(shard_names.begin(), shard_names.end(), weight_map[name]) == shard_names.end())
        shard_names.push_back(weight_map[name]);
    }
    for (const auto& [name, shard] : weight_map)
      if (!fs::exists(fs::path(dir) / shard))
        throw IoError(fmt::format("{}: tensor \"{}\" listed in shard \"{}\", which does not exist",
                                  index_path.string(), name, shard));
  } else {
    for (const auto& entry : fs::directory_iterator(dir))
      if (entry.path().extension() == ".safetensors") shard_names.push_back(entry.path().filename().string());
    std::sort(shard_names.begin(), shard_names.end());
    if (shard_names.empty())
      throw IoError(fmt::format("{}: no *.safetensors file and no model.safetensors.index.json", dir));
  }
  for (const auto& shard : shard_names) {
    ckpt->shards_.push_back(std::make_unique<SafetensorsFile>((fs::path(dir) / shard).string()));
    const SafetensorsFile* file = ckpt->shards_.back().get();
    for (const auto& name : file->names()) {
      if (!weight_map.empty()) {
        auto it = weight_map.find(name);
        if (it == weight_map.end() || it->second != shard) continue;  // the index decides where a tensor lives
      }
      ckpt->index_[name] = file;
    }
  }
  for (const auto& [name, shard] : weight_map)
    if (!ckpt->index_.count(name))
      throw FormatError(fmt::format("{}: tensor \"{}\" listed in shard \"{}\" is not in that file",
                                    index_path.string(), name, shard));
  return ckpt;
}

TensorView Checkpoint::tensor(const std::string& name) const {
  auto it = index_.find(name);
  if (it == index_.end()) throw FormatError(fmt::format("{}: checkpoint has no tensor \"{}\"", dir_, name));
  return it->second->tensor(name);
}

const std::string& Checkpoint::file_of(const std::string& name) const {
  auto it = index_.find(name);
  if (it == index_.end()) return dir_;
  return it->second->path();
}

std::vector<std::string> Checkpoint::names() const {
  std::vector<std::string> out;
  for (const auto& [name, file] : index_) out.push_back(name);
  return out;
}

}  // namespace moex
