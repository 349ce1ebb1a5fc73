// A Hugging Face checkpoint directory: config.json plus one safetensors file or a sharded set listed in
// model.safetensors.index.json. Tensors are looked up by their checkpoint names and served zero-copy.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "moex/core/tensor.h"
#include "moex/io/safetensors.h"

namespace moex {

class Checkpoint {
 public:
  // Opens dir; throws IoError when the directory, config.json or a listed shard is missing.
  static std::unique_ptr<Checkpoint> open(const std::string& dir);

  const std::string& dir() const { return dir_; }
  std::string config_path() const { return dir_ + "/config.json"; }
  bool has(const std::string& name) const { return index_.count(name) != 0; }
  // Throws FormatError naming the tensor when absent.
  TensorView tensor(const std::string& name) const;
  // The file a tensor lives in (for error messages).
  const std::string& file_of(const std::string& name) const;
  std::vector<std::string> names() const;

 private:
  std::string dir_;
  std::vector<std::unique_ptr<SafetensorsFile>> shards_;
  std::map<std::string, const SafetensorsFile*> index_;
};

}  // namespace moex
