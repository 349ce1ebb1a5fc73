// Test helper: writes small safetensors files (and corrupt variants) so that loader tests do not
// depend on Python.
#pragma once

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include <unistd.h>

#include <nlohmann/json.hpp>

namespace moex::test {

struct RawTensor {
  std::string dtype;  // "BF16", "F32", ...
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;
};

inline std::string safetensors_bytes(const std::map<std::string, RawTensor>& tensors) {
  nlohmann::json header = nlohmann::json::object();
  std::string data;
  for (const auto& [name, tensor] : tensors) {
    header[name] = {{"dtype", tensor.dtype},
                    {"shape", tensor.shape},
                    {"data_offsets", {data.size(), data.size() + tensor.bytes.size()}}};
    data.append(reinterpret_cast<const char*>(tensor.bytes.data()), tensor.bytes.size());
  }
  std::string header_text = header.dump();
  while (header_text.size() % 8) header_text += ' ';
  uint64_t header_len = header_text.size();
  std::string out(8, '\0');
  std::memcpy(out.data(), &header_len, 8);
  return out + header_text + data;
}

inline void write_file(const std::filesystem::path& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

inline RawTensor f32_tensor(std::vector<int64_t> shape, float fill) {
  int64_t numel = 1;
  for (int64_t d : shape) numel *= d;
  RawTensor tensor{"F32", shape, std::vector<uint8_t>(numel * 4)};
  for (int64_t idx = 0; idx < numel; ++idx) {
    float value = fill + static_cast<float>(idx);
    std::memcpy(tensor.bytes.data() + idx * 4, &value, 4);
  }
  return tensor;
}

// A fresh empty directory under the test temp dir.
inline std::filesystem::path temp_dir(const std::string& name) {
  auto dir = std::filesystem::temp_directory_path() / ("moex_test_" + name + "_" + std::to_string(::getpid()));
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir;
}

}  // namespace moex::test
