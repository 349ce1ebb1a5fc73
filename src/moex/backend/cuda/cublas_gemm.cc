#include "moex/backend/cuda/cublas_gemm.h"

#include <cstdlib>
#include <limits>
#include <vector>

#include <fmt/format.h>
#include <library_types.h>

#include "moex/core/shared_library.h"

namespace moex::cuda {
namespace {

// cuBLAS's C ABI, declared here so that the build needs no cuBLAS headers (values from cublas_api.h, CUDA 12/13).
using cublasStatus_t = int;
constexpr cublasStatus_t kCublasSuccess = 0;
using cublasHandle_t = void*;
constexpr int kCublasOpN = 0, kCublasOpT = 1;
constexpr int kCublasCompute32F = 68;
constexpr int kCublasGemmDefault = -1;

std::vector<std::string> candidate_paths() {
  const char* env = std::getenv("MOEX_CUBLAS_LIBRARY");
  if (env && *env) return {env};
  return {"libcublas.so.13", "libcublas.so.12", "/usr/local/cuda/lib64/libcublas.so.13",
          "/usr/local/cuda/lib64/libcublas.so.12"};
}

}  // namespace

struct CublasGemm::Api {
  cublasStatus_t (*create)(cublasHandle_t*);
  cublasStatus_t (*destroy)(cublasHandle_t);
  cublasStatus_t (*set_stream)(cublasHandle_t, cudaStream_t);
  cublasStatus_t (*gemm_ex)(cublasHandle_t, int transa, int transb, int m, int n, int k, const void* alpha,
                            const void* a, cudaDataType a_type, int lda, const void* b, cudaDataType b_type, int ldb,
                            const void* beta, void* c, cudaDataType c_type, int ldc, int compute, int algo);
  const char* (*status_name)(cublasStatus_t);

  std::string error(cublasStatus_t status) const {
    const char* name = status_name ? status_name(status) : nullptr;
    return name ? fmt::format("{} (cuBLAS status {})", name, status) : fmt::format("cuBLAS status {}", status);
  }
};

std::unique_ptr<CublasGemm> CublasGemm::open(std::string* why_not) {
  std::string errors;
  std::unique_ptr<SharedLibrary> library = SharedLibrary::open(candidate_paths(), &errors);
  if (!library) {
    *why_not = fmt::format("cannot load cuBLAS (MOEX_CUBLAS_LIBRARY names one): {}", errors);
    return nullptr;
  }
  auto api = std::make_unique<Api>();
  std::string missing;
  library->bind(api->create, "cublasCreate_v2", &missing);
  library->bind(api->destroy, "cublasDestroy_v2", &missing);
  library->bind(api->set_stream, "cublasSetStream_v2", &missing);
  library->bind(api->gemm_ex, "cublasGemmEx", &missing);
  library->bind(api->status_name, "cublasGetStatusName", &missing);
  if (!missing.empty()) {
    *why_not = fmt::format("{} has no {}: not cuBLAS, or one too old", library->path(), missing);
    return nullptr;
  }
  cublasHandle_t handle = nullptr;
  if (cublasStatus_t status = api->create(&handle); status != kCublasSuccess) {
    *why_not = fmt::format("cublasCreate failed: {}", api->error(status));
    return nullptr;
  }
  return std::unique_ptr<CublasGemm>(new CublasGemm(std::move(library), std::move(api), handle));
}

CublasGemm::CublasGemm(std::unique_ptr<SharedLibrary> library, std::unique_ptr<Api> api, void* handle)
    : library_(std::move(library)), api_(std::move(api)), handle_(handle) {}

CublasGemm::~CublasGemm() { api_->destroy(handle_); }  // then library_ closes

const std::string& CublasGemm::library() const { return library_->path(); }

bool CublasGemm::gemm(const uint16_t* a, int64_t M, int64_t K, const uint16_t* w, int64_t N, float* out,
                      cudaStream_t stream, std::string* why_not) {
  constexpr int64_t kMax = std::numeric_limits<int>::max();
  if (M > kMax || N > kMax || K > kMax) {
    *why_not = fmt::format("GEMM {} x {} x {} past cuBLAS's int sizes", M, N, K);
    return false;
  }
  if (cublasStatus_t status = api_->set_stream(handle_, stream); status != kCublasSuccess) {
    *why_not = fmt::format("cublasSetStream failed: {}", api_->error(status));
    return false;
  }
  // cuBLAS is column-major: moex's row-major out [M, N] is its N x M matrix (ld N), w [N, K] its K x N (ld K),
  // taken transposed, and a [M, K] its K x M (ld K): out = w^T(cuBLAS) * a.
  const float alpha = 1.f, beta = 0.f;
  const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
  const cublasStatus_t status = api_->gemm_ex(handle_, kCublasOpT, kCublasOpN, m, n, k, &alpha, w, CUDA_R_16BF, k, a,
                                              CUDA_R_16BF, k, &beta, out, CUDA_R_32F, m, kCublasCompute32F,
                                              kCublasGemmDefault);
  if (status != kCublasSuccess) {
    *why_not = fmt::format("cublasGemmEx ({} x {} x {}) failed: {}", M, N, K, api_->error(status));
    return false;
  }
  return true;
}

}  // namespace moex::cuda
