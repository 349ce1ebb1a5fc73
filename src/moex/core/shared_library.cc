#include "moex/core/shared_library.h"

#include <dlfcn.h>

namespace moex {

std::unique_ptr<SharedLibrary> SharedLibrary::open(const std::vector<std::string>& paths, std::string* errors) {
  errors->clear();
  for (const std::string& path : paths) {
    if (void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL))
      return std::unique_ptr<SharedLibrary>(new SharedLibrary(handle, path));
    const char* error = dlerror();
    *errors += (errors->empty() ? "" : "; ") + (error ? std::string(error) : path + ": unknown error");
  }
  return nullptr;
}

SharedLibrary::~SharedLibrary() { dlclose(handle_); }

void* SharedLibrary::address(const char* symbol) const { return dlsym(handle_, symbol); }

}  // namespace moex
