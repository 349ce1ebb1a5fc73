#include "moex/backend/cuda/cuda_check.h"

#include <fmt/format.h>

namespace moex::cuda {

void throw_cuda_error(cudaError_t status, const char* statement, const char* function, const char* file,
                      int line) {
  cudaGetLastError();  // a non-sticky error must not resurface at the next launch check
  throw Error(fmt::format("CUDA error {} ({}) in {} at {}:{}: {}", static_cast<int>(status),
                          cudaGetErrorString(status), function, file, line, statement));
}

}  // namespace moex::cuda
