// Helpers for the CUDA op tests: a backend per test (skipped without a device), seeded random tensors,
// bf16-rounded weights whose exact values the double-precision references use, poisoned outputs with guard
// margins, and the relative-error metric.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <initializer_list>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "moex/backend/backend.h"
#include "moex/backend/cuda/cuda_backend.h"
#include "moex/core/dtype.h"
#include "moex/model/model.h"
#include "unit/model/fixture_util.h"

namespace moex::cuda_test {

// The transformers fixtures: MOEX_FIXTURES_DIR (the GPU machine's copy) or the source tree's tests/fixtures.
inline std::filesystem::path fixtures_dir() {
  const char* env = std::getenv("MOEX_FIXTURES_DIR");
  return env ? std::filesystem::path(env) : test::fixtures_root();
}

// A transformers fixture loaded for an end-to-end test: its model and the reference prompt.
struct LoadedFixture {
  std::string name;
  std::unique_ptr<Model> model;
  std::vector<int32_t> prompt;
};
// The named fixtures under fixtures_dir(); empty when one of them is missing (the caller then skips).
inline std::vector<LoadedFixture> load_fixtures(std::initializer_list<const char*> names) {
  std::vector<LoadedFixture> fixtures;
  for (const char* name : names) {
    const auto dir = fixtures_dir() / name;
    if (!std::filesystem::exists(dir)) return {};
    fixtures.push_back(LoadedFixture{name, Model::load(dir.string()), test::reference_prompt(dir)});
  }
  return fixtures;
}
// In a TEST body: skips the test without a CUDA device or a fixture, else loads the fixtures into `var`.
#define MOEX_CUDA_FIXTURES_OR_SKIP(var, ...)                                                     \
  if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";                               \
  auto var = load_fixtures({__VA_ARGS__});                                                       \
  if (var.empty()) GTEST_SKIP() << "fixtures missing under " << fixtures_dir()

inline std::unique_ptr<Backend> make_backend_or_null() {
  if (cuda_device_count() == 0) return nullptr;
  return make_cuda_backend(0);
}

#define MOEX_CUDA_BACKEND_OR_SKIP(var)                             \
  auto var = ::moex::cuda_test::make_backend_or_null();            \
  if (!var) GTEST_SKIP() << "no CUDA device";

inline std::vector<float> random_floats(std::mt19937& rng, size_t count, float scale = 1.f) {
  std::normal_distribution<float> dist(0.f, scale);
  std::vector<float> out(count);
  for (auto& v : out) v = dist(rng);
  return out;
}

// A bf16 weight: host bits for upload, and the rounded values as floats for the reference.
struct Bf16Weight {
  std::vector<uint16_t> bits;
  std::vector<float> values;
  Shape shape;
  TensorView host_view() { return TensorView(bits.data(), DType::kBF16, shape); }
};

inline Bf16Weight random_bf16(std::mt19937& rng, Shape shape, float scale) {
  Bf16Weight w;
  w.shape = shape;
  auto raw = random_floats(rng, static_cast<size_t>(shape.numel()), scale);
  w.bits.resize(raw.size());
  w.values.resize(raw.size());
  for (size_t i = 0; i < raw.size(); ++i) {
    w.bits[i] = f32_to_bf16(raw[i]);
    w.values[i] = bf16_to_f32(w.bits[i]);
  }
  return w;
}

// A device fp32 tensor of `shape` inside an allocation with kGuard poisoned floats before and after, so
// that out-of-bounds writes are caught as well as unwritten elements (the interior starts as NaN).
class GuardedTensor {
 public:
  static constexpr int64_t kGuard = 64;
  GuardedTensor(Backend& backend, Shape shape) : backend_(backend), shape_(shape) {
    total_ = shape.numel() + 2 * kGuard;
    buffer_ = backend.alloc(DType::kF32, Shape{total_});
    std::vector<float> poison(static_cast<size_t>(total_), std::nanf(""));
    for (int64_t i = 0; i < kGuard; ++i) poison[i] = poison[total_ - 1 - i] = kSentinel;
    backend.copy_from_host(poison.data(), buffer_->view);
  }
  TensorView view() const {
    return TensorView(static_cast<float*>(buffer_->view.data) + kGuard, DType::kF32, shape_, Device::kCuda);
  }
  void fill(const std::vector<float>& values) { backend_.copy_from_host(values.data(), view()); }
  // The interior; fails the test if a guard float changed.
  std::vector<float> read() const {
    std::vector<float> all(static_cast<size_t>(total_));
    backend_.copy_to_host(buffer_->view, all.data());
    for (int64_t i = 0; i < kGuard; ++i) {
      EXPECT_EQ(all[i], kSentinel) << "write before the tensor at guard " << i;
      EXPECT_EQ(all[total_ - 1 - i], kSentinel) << "write after the tensor at guard " << i;
    }
    return std::vector<float>(all.begin() + kGuard, all.end() - kGuard);
  }

 private:
  static constexpr float kSentinel = -12345.25f;
  Backend& backend_;
  Shape shape_;
  int64_t total_ = 0;
  std::unique_ptr<Buffer> buffer_;
};

// ||out - ref|| / ||ref||; any NaN/inf in out that ref does not have makes it infinite.
inline double relative_error(const std::vector<float>& out, const std::vector<double>& ref) {
  double diff = 0, norm = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    if (!std::isfinite(out[i]) && std::isfinite(ref[i])) return INFINITY;
    diff += (out[i] - ref[i]) * (out[i] - ref[i]);
    norm += ref[i] * ref[i];
  }
  return norm > 0 ? std::sqrt(diff / norm) : std::sqrt(diff);
}

inline std::string first_mismatch(const std::vector<float>& out, const std::vector<double>& ref) {
  double worst = -1;
  size_t at = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    double d = std::isfinite(out[i]) ? std::abs(out[i] - ref[i]) : INFINITY;
    if (d > worst) {
      worst = d;
      at = i;
    }
  }
  return "max abs diff " + std::to_string(worst) + " at " + std::to_string(at) + ": got " + std::to_string(out[at]) +
         " want " + std::to_string(ref[at]);
}

#define MOEX_EXPECT_CLOSE(out, ref, tol) \
  EXPECT_LT(::moex::cuda_test::relative_error(out, ref), tol) << ::moex::cuda_test::first_mismatch(out, ref)

}  // namespace moex::cuda_test
