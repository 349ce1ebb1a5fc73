#include "moex/core/tensor.h"

#include <sys/mman.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace moex {
namespace {

constexpr size_t kHugePageBytes = size_t{2} << 20;

}  // namespace

std::string Shape::str() const {
  std::string out = "[";
  for (int i = 0; i < ndim; ++i) {
    if (i) out += ", ";
    out += std::to_string(dims[i]);
  }
  return out + "]";
}

TensorView TensorView::rows(int64_t row_begin, int64_t num_rows) const {
  MOEX_ASSERT(shape.ndim >= 1 && row_begin >= 0 && row_begin + num_rows <= shape[0], "rows {}+{} of {}",
              row_begin, num_rows, shape.str());
  int64_t row_elems = shape[0] ? numel() / shape[0] : 0;
  TensorView out = *this;
  out.data = static_cast<char*>(data) + static_cast<size_t>(row_begin * row_elems) * dtype_size(dtype);
  out.shape.dims[0] = num_rows;
  return out;
}

TensorView TensorView::reshape(Shape dims) const {
  MOEX_ASSERT(dims.numel() == numel(), "reshape {} -> {}", shape.str(), dims.str());
  TensorView out = *this;
  out.shape = dims;
  return out;
}

HostTensor::HostTensor(DType dtype, Shape shape) : HostTensor(dtype, std::move(shape), true) {}

HostTensor HostTensor::uninitialized(DType dtype, Shape shape) { return HostTensor(dtype, std::move(shape), false); }

HostTensor::HostTensor(DType dtype, Shape shape, bool zero) {
  size_t bytes = static_cast<size_t>(shape.numel()) * dtype_size(dtype);
  size_t rounded = (bytes + 63) / 64 * 64;
  void* ptr = std::aligned_alloc(64, rounded ? rounded : 64);
  if (!ptr) throw BudgetError(fmt::format("out of host memory allocating {} bytes", bytes));
  if (zero) {
    std::memset(ptr, 0, rounded ? rounded : 64);
  } else if (rounded >= kHugePageBytes) {
    // Advice on the 2 MiB-aligned interior (the kernel rounds inward); failure only costs page faults.
    auto begin = (reinterpret_cast<uintptr_t>(ptr) + kHugePageBytes - 1) / kHugePageBytes * kHugePageBytes;
    auto end = (reinterpret_cast<uintptr_t>(ptr) + rounded) / kHugePageBytes * kHugePageBytes;
    if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
  }
  storage_ = std::shared_ptr<void>(ptr, [](void* p) { std::free(p); });
  view_ = TensorView(ptr, dtype, shape);
}

}  // namespace moex
