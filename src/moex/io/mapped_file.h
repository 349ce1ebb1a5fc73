// A read-only memory map of a whole file: checkpoint tensors are served as views into it, zero copy.
#pragma once

#include <cstddef>
#include <string>

namespace moex {

class MappedFile {
 public:
  // Throws IoError naming the path when the file is missing, unreadable or not a regular file.
  explicit MappedFile(const std::string& path);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const std::byte* data() const { return data_; }
  size_t size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  const std::byte* data_ = nullptr;
  size_t size_ = 0;
};

}  // namespace moex
