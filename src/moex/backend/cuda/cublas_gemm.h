// Dense GEMMs through cuBLAS, loaded at run time: the CUDA backend's dense GEMMs past 32 rows where it loads
// (MOEX_CUDA_CUBLAS=0 keeps moex's own; H200: 1.5-2.0x them, bench/RESULTS.md). dlopen, not a link: the toolkit
// here ships no static cuBLAS, and a binary linked to the shared one (54 + 542 MB with cuBLASLt) would not start
// where the toolkit's libraries are absent; loaded at run time, a missing cuBLAS only leaves moex on its own kernels.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <memory>
#include <string>

namespace moex {
class SharedLibrary;
}

namespace moex::cuda {

class CublasGemm {
 public:
  // The library MOEX_CUBLAS_LIBRARY names, else libcublas.so.13 or .12 on the loader's path, else in
  // /usr/local/cuda/lib64; a handle on the current device. Null, with *why_not, where none loads.
  static std::unique_ptr<CublasGemm> open(std::string* why_not);
  ~CublasGemm();
  CublasGemm(const CublasGemm&) = delete;
  CublasGemm& operator=(const CublasGemm&) = delete;

  // out fp32 [M, N] = a bf16 [M, K] @ w bf16 [N, K]^T on stream, fp32 accumulation (cublasGemmEx, compute 32F).
  // False, with *why_not, where cuBLAS refuses the call (sizes past int, a bad stream).
  bool gemm(const uint16_t* a, int64_t M, int64_t K, const uint16_t* w, int64_t N, float* out, cudaStream_t stream,
            std::string* why_not);

  const std::string& library() const;  // its path

 private:
  struct Api;
  CublasGemm(std::unique_ptr<SharedLibrary> library, std::unique_ptr<Api> api, void* handle);

  std::unique_ptr<SharedLibrary> library_;  // closed after the destructor's cublasDestroy
  std::unique_ptr<Api> api_;
  void* handle_;  // cublasHandle_t
};

}  // namespace moex::cuda
