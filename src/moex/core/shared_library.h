// A shared library loaded at run time (dlopen) and its C functions bound by name: the vendor libraries moex uses
// where they are present and runs without (NVML, cuBLAS), so that neither is a build-time dependency.
#pragma once

#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace moex {

class SharedLibrary {
 public:
  // The first of paths that loads (RTLD_NOW | RTLD_LOCAL); null, with *errors holding each path's dlerror
  // ("; "-separated), where none does.
  static std::unique_ptr<SharedLibrary> open(const std::vector<std::string>& paths, std::string* errors);
  ~SharedLibrary();
  SharedLibrary(const SharedLibrary&) = delete;
  SharedLibrary& operator=(const SharedLibrary&) = delete;

  const std::string& path() const { return path_; }

  // fn = the address of symbol (a C function of the library); where there is none, fn is null and the first such
  // symbol's name goes to *missing.
  template <typename Fn>
  void bind(Fn& fn, const char* symbol, std::string* missing) const {
    fn = reinterpret_cast<Fn>(address(symbol));
    if (!fn && missing->empty()) *missing = symbol;
  }

 private:
  SharedLibrary(void* handle, std::string path) : handle_(handle), path_(std::move(path)) {}
  void* address(const char* symbol) const;

  void* handle_;
  std::string path_;
};

}  // namespace moex
