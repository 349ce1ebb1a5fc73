// Helpers shared by the backend op tests: seeded random tensors in any float dtype (with the exact
// values the kernel sees, as doubles, for the references), outputs framed by guard bytes, and
// comparison helpers that name the case and seed on failure.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "moex/core/dtype.h"
#include "moex/core/tensor.h"

namespace moex::test {

// A tensor's bytes in its storage dtype plus the same values widened to double.
struct RandomTensor {
  DType dtype = DType::kF32;
  Shape shape;
  std::vector<uint8_t> bytes;
  std::vector<double> values;

  TensorView view() { return TensorView(bytes.data(), dtype, shape); }
  int64_t numel() const { return shape.numel(); }
};

// Uniform on [-scale*sqrt(3), scale*sqrt(3)] (unit variance at scale 1). Hand-rolled rather than
// std::*_distribution, whose output differs between standard libraries: a seed must mean one tensor.
inline float uniform_sym(std::mt19937_64& rng, float scale) {
  double unit = static_cast<double>(rng() >> 11) * 0x1.0p-53;  // [0, 1)
  return static_cast<float>((2.0 * unit - 1.0) * 1.7320508075688772 * scale);
}

inline RandomTensor random_tensor(std::mt19937_64& rng, DType dtype, Shape shape, double scale = 1.0) {
  RandomTensor t;
  t.dtype = dtype;
  t.shape = shape;
  int64_t count = shape.numel();
  t.bytes.resize(static_cast<size_t>(count) * dtype_size(dtype));
  t.values.resize(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) {
    float v = uniform_sym(rng, static_cast<float>(scale));
    switch (dtype) {
      case DType::kF32:
        std::memcpy(t.bytes.data() + i * 4, &v, 4);
        t.values[i] = v;
        break;
      case DType::kBF16: {
        uint16_t bits = f32_to_bf16(v);
        std::memcpy(t.bytes.data() + i * 2, &bits, 2);
        t.values[i] = bf16_to_f32(bits);
        break;
      }
      case DType::kF16: {
        uint16_t bits = f32_to_f16(v);
        std::memcpy(t.bytes.data() + i * 2, &bits, 2);
        t.values[i] = f16_to_f32(bits);
        break;
      }
      case DType::kI32:
      case DType::kI64: ADD_FAILURE() << "random_tensor: not a float dtype"; break;
    }
  }
  return t;
}

// An fp32 tensor with kGuard sentinel floats on each side; the body starts as NaN so an element the
// kernel forgets to write shows up as NaN.
class GuardedF32 {
 public:
  static constexpr int64_t kGuard = 64;
  static constexpr uint32_t kSentinel = 0x7f8dead1u;  // a signalling-NaN pattern no kernel produces

  explicit GuardedF32(Shape shape) : shape_(shape), storage_(static_cast<size_t>(shape.numel() + 2 * kGuard)) {
    for (int64_t i = 0; i < kGuard; ++i) {
      std::memcpy(&storage_[i], &kSentinel, 4);
      std::memcpy(&storage_[kGuard + shape.numel() + i], &kSentinel, 4);
    }
    std::fill(storage_.begin() + kGuard, storage_.begin() + kGuard + shape.numel(), std::nanf(""));
  }
  GuardedF32(Shape shape, const std::vector<double>& init) : GuardedF32(shape) {
    for (int64_t i = 0; i < shape.numel(); ++i) data()[i] = static_cast<float>(init[i]);
  }
  float* data() { return storage_.data() + kGuard; }
  TensorView view() { return TensorView(data(), DType::kF32, shape_); }
  int64_t numel() const { return shape_.numel(); }
  float operator[](int64_t i) const { return storage_[kGuard + i]; }
  bool guards_intact() const {
    for (int64_t i = 0; i < kGuard; ++i) {
      uint32_t lo, hi;
      std::memcpy(&lo, &storage_[i], 4);
      std::memcpy(&hi, &storage_[kGuard + shape_.numel() + i], 4);
      if (lo != kSentinel || hi != kSentinel) return false;
    }
    return true;
  }

 private:
  Shape shape_;
  std::vector<float> storage_;
};

inline std::vector<double> to_double(const std::vector<float>& values) {
  return std::vector<double>(values.begin(), values.end());
}

// Every element finite and within tol[i] of ref[i]; reports the first few mismatches.
inline void expect_close(const GuardedF32& got, const std::vector<double>& ref, const std::vector<double>& tol,
                         const std::string& label) {
  ASSERT_TRUE(got.guards_intact()) << label << ": write outside the output tensor";
  int reported = 0;
  int64_t bad = 0;
  for (int64_t i = 0; i < got.numel(); ++i) {
    double g = got[i];
    bool ok = std::isfinite(g) == std::isfinite(ref[i]) && (!std::isfinite(ref[i]) || std::fabs(g - ref[i]) <= tol[i]);
    if (!ok) {
      ++bad;
      if (reported++ < 5)
        ADD_FAILURE() << label << ": element " << i << " got " << g << " want " << ref[i] << " (tol " << tol[i]
                      << ", diff " << std::fabs(g - ref[i]) << ")";
    }
  }
  EXPECT_EQ(bad, 0) << label;
}

inline void expect_close(const GuardedF32& got, const std::vector<double>& ref, double tol, const std::string& label) {
  expect_close(got, ref, std::vector<double>(ref.size(), tol), label);
}

inline std::vector<double> copy_values(const GuardedF32& t) {
  std::vector<double> out(static_cast<size_t>(t.numel()));
  for (int64_t i = 0; i < t.numel(); ++i) out[i] = t[i];
  return out;
}

inline std::string dtype_str(DType dtype) { return std::string(dtype_name(dtype)); }

}  // namespace moex::test
