#include "moex/io/safetensors.h"

#include <cstring>

#include <nlohmann/json.hpp>

#include "moex/core/error.h"

namespace moex {
namespace {
// Real headers are a few hundred KB at most; a larger claim means a corrupt length field.
constexpr uint64_t kMaxHeaderBytes = 100ull << 20;
}  // namespace

SafetensorsFile::SafetensorsFile(const std::string& path) : file_(std::make_unique<MappedFile>(path)) {
  const size_t file_bytes = file_->size();
  if (file_bytes < 8)
    throw IoError(fmt::format("{}: truncated safetensors file ({} bytes, the 8-byte header length is missing)",
                              path, file_bytes));
  uint64_t header_bytes = 0;
  std::memcpy(&header_bytes, file_->data(), 8);  // little-endian on every platform moex targets
  if (header_bytes > kMaxHeaderBytes || header_bytes > file_bytes - 8)
    throw IoError(fmt::format("{}: corrupt or truncated safetensors header: header length {} but the file has {} bytes",
                              path, header_bytes, file_bytes));
  const char* header_begin = reinterpret_cast<const char*>(file_->data() + 8);
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(header_begin, header_begin + header_bytes);
  } catch (const nlohmann::json::exception& e) {
    throw IoError(fmt::format("{}: corrupt safetensors header (not valid JSON): {}", path, e.what()));
  }
  if (!header.is_object()) throw IoError(fmt::format("{}: corrupt safetensors header: not a JSON object", path));
  const size_t data_begin = 8 + header_bytes;
  const size_t data_bytes = file_bytes - data_begin;
  for (auto& [name, entry] : header.items()) {
    if (name == "__metadata__") {
      if (entry.is_object())
        for (auto& [key, value] : entry.items())
          if (value.is_string()) metadata_[key] = value.get<std::string>();
      continue;
    }
    auto bad = [&](const std::string& what) {
      return IoError(fmt::format("{}: tensor \"{}\": {}", path, name, what));
    };
    if (!entry.is_object() || !entry.contains("dtype") || !entry.contains("shape") || !entry.contains("data_offsets"))
      throw bad("header entry lacks dtype/shape/data_offsets");
    const auto& dtype_json = entry["dtype"];
    DType dtype;
    if (!dtype_json.is_string() || !parse_dtype(dtype_json.get<std::string>(), &dtype))
      throw FormatError(fmt::format("{}: tensor \"{}\": unsupported dtype {} (moex reads BF16, F16, F32, I32, I64)",
                                    path, name, dtype_json.dump()));
    const auto& shape_json = entry["shape"];
    if (!shape_json.is_array() || shape_json.size() > static_cast<size_t>(kMaxDims))
      throw bad(fmt::format("shape {} is not an array of at most {} dims", shape_json.dump(), kMaxDims));
    Shape shape;
    for (const auto& dim : shape_json) {
      if (!dim.is_number_unsigned()) throw bad(fmt::format("shape {} has a non-integer dim", shape_json.dump()));
      shape.dims[shape.ndim++] = dim.get<int64_t>();
    }
    const auto& offsets = entry["data_offsets"];
    if (!offsets.is_array() || offsets.size() != 2 || !offsets[0].is_number_unsigned() ||
        !offsets[1].is_number_unsigned())
      throw bad("data_offsets is not [begin, end]");
    uint64_t begin = offsets[0].get<uint64_t>();
    uint64_t end = offsets[1].get<uint64_t>();
    uint64_t expected = static_cast<uint64_t>(shape.numel()) * dtype_size(dtype);
    if (end < begin || end - begin != expected)
      throw bad(fmt::format("data_offsets [{}, {}] hold {} bytes but shape {} of {} needs {}", begin, end,
                            end - begin, shape.str(), dtype_name(dtype), expected));
    if (end > data_bytes)
      throw IoError(fmt::format("{}: truncated: tensor \"{}\" ends at byte {} of the data section, which has only {} bytes",
                                path, name, end, data_bytes));
    void* ptr = const_cast<std::byte*>(file_->data() + data_begin + begin);
    tensors_.emplace(name, TensorView(ptr, dtype, shape));
  }
}

TensorView SafetensorsFile::tensor(const std::string& name) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end()) throw FormatError(fmt::format("{}: no tensor named \"{}\"", path(), name));
  return it->second;
}

std::vector<std::string> SafetensorsFile::names() const {
  std::vector<std::string> out;
  out.reserve(tensors_.size());
  for (const auto& [name, view] : tensors_) out.push_back(name);
  return out;
}

}  // namespace moex
