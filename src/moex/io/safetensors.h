// safetensors reader: an 8-byte little-endian header length, a JSON header mapping tensor names to
// {dtype, shape, data_offsets}, then the raw data. Every header field is validated against the file
// size before any tensor is served, so a truncated or corrupt file is an error, never a wild read.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "moex/core/tensor.h"
#include "moex/io/mapped_file.h"

namespace moex {

class SafetensorsFile {
 public:
  // Maps and validates the file; throws IoError/FormatError naming the path and the bad field.
  explicit SafetensorsFile(const std::string& path);

  const std::string& path() const { return file_->path(); }
  bool contains(const std::string& name) const { return tensors_.count(name) != 0; }
  // A zero-copy view into the mapped file (valid while this object lives).
  TensorView tensor(const std::string& name) const;
  std::vector<std::string> names() const;
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

 private:
  std::unique_ptr<MappedFile> file_;
  std::map<std::string, TensorView> tensors_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace moex
