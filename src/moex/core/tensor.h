// Tensor = a typed, shaped view over memory that someone else owns (an mmap'd checkpoint, a backend
// buffer), plus an optional owner handle. Row-major and contiguous: every moex op works on that layout.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <string>

#include "moex/core/dtype.h"
#include "moex/core/error.h"

namespace moex {

enum class Device : uint8_t { kCpu, kCuda };

inline constexpr int kMaxDims = 4;

struct Shape {
  int ndim = 0;
  std::array<int64_t, kMaxDims> dims{};

  Shape() = default;
  Shape(std::initializer_list<int64_t> list) {
    MOEX_ASSERT(list.size() <= kMaxDims, "rank {} > {}", list.size(), kMaxDims);
    for (int64_t d : list) dims[ndim++] = d;
  }
  int64_t operator[](int idx) const { return dims[idx]; }
  int64_t numel() const {
    int64_t n = 1;
    for (int i = 0; i < ndim; ++i) n *= dims[i];
    return n;
  }
  bool operator==(const Shape& other) const {
    if (ndim != other.ndim) return false;
    for (int i = 0; i < ndim; ++i)
      if (dims[i] != other.dims[i]) return false;
    return true;
  }
  std::string str() const;  // "[2, 3, 4]"
};

struct TensorView {
  void* data = nullptr;
  DType dtype = DType::kF32;
  Shape shape;
  Device device = Device::kCpu;

  TensorView() = default;
  TensorView(void* ptr, DType type, Shape dims, Device dev = Device::kCpu)
      : data(ptr), dtype(type), shape(dims), device(dev) {}

  int64_t numel() const { return shape.numel(); }
  size_t nbytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype); }
  int64_t dim(int idx) const { return shape[idx < 0 ? shape.ndim + idx : idx]; }
  bool empty() const { return data == nullptr; }

  template <typename T>
  T* as() const {
    return static_cast<T*>(data);
  }
  // Rows [row_begin, row_begin + num_rows) along dim 0, sharing storage.
  TensorView rows(int64_t row_begin, int64_t num_rows) const;
  // The same bytes with another shape of equal element count.
  TensorView reshape(Shape dims) const;
};

// Owns host memory (64-byte aligned so SIMD loads never straddle a line start).
class HostTensor {
 public:
  HostTensor() = default;
  // Zero-filled.
  HostTensor(DType dtype, Shape shape);
  // Not zero-filled, for callers that write every element at once (in parallel: the first touch of a page is what
  // costs, so it is spread over the writers), and backed by transparent huge pages where the kernel allows them.
  static HostTensor uninitialized(DType dtype, Shape shape);
  const TensorView& view() const { return view_; }
  TensorView& view() { return view_; }
  template <typename T>
  T* as() const {
    return view_.as<T>();
  }
  int64_t numel() const { return view_.numel(); }

 private:
  HostTensor(DType dtype, Shape shape, bool zero);

  std::shared_ptr<void> storage_;
  TensorView view_;
};

}  // namespace moex
