// One checking macro for every CUDA runtime call: a failure becomes a moex::Error naming the statement,
// the function, the file and line, and the CUDA error text.
#pragma once

#include <cuda_runtime_api.h>

#include "moex/core/error.h"

namespace moex::cuda {

[[noreturn]] void throw_cuda_error(cudaError_t status, const char* statement, const char* function,
                                   const char* file, int line);

}  // namespace moex::cuda

#define MOEX_CUDA_CHECK(statement)                                                              \
  do {                                                                                          \
    cudaError_t moex_cuda_status_ = (statement);                                                \
    if (moex_cuda_status_ != cudaSuccess)                                                       \
      ::moex::cuda::throw_cuda_error(moex_cuda_status_, #statement, __func__, __FILE__, __LINE__); \
  } while (0)

// After a kernel launch: catches bad launch configurations at the launch site, not at the next sync.
#define MOEX_CUDA_CHECK_LAUNCH() MOEX_CUDA_CHECK(cudaGetLastError())
