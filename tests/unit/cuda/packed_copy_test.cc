// Packed expert copies on the device (Backend::copy_packed_from_host_*): the link carries the packed rows and the
// copy stream unpacks them; the slot must hold exactly the bf16 rows the host packed, for row ranges that start
// anywhere, widths with and without the 16-wide vector path, exceptions in the middle and at the ends of rows,
// and ranges larger than one staging chunk. Guard words around the destination catch writes outside it.
#include <gtest/gtest.h>

#include <cstring>
#include <random>

#include "cuda_test_util.h"
#include "moex/core/packed_bf16.h"

namespace moex::cuda_test {
namespace {

TEST(CudaPackedCopy, SlotsHoldTheHostsBf16Rows) {
  MOEX_CUDA_BACKEND_OR_SKIP(backend);
  std::mt19937 rng(11);
  struct Case {
    int64_t rows, cols, row_begin, row_end;
  };
  // 14336 x 4096 rows of 4096: 44 MB packed, three staging chunks; 33 columns: the scalar path.
  for (const Case c : {Case{64, 4096, 0, 64}, Case{40, 768, 7, 33}, Case{9, 33, 2, 9}, Case{14336, 4096, 100, 14336}}) {
    SCOPED_TRACE(::testing::Message() << c.rows << " x " << c.cols << " rows " << c.row_begin << ".." << c.row_end);
    Bf16Weight w = random_bf16(rng, Shape{c.rows, c.cols}, 0.02f);
    // 40 rare exponents, so that 25 or more are exceptions whatever the size, spread over the matrix.
    for (size_t j = 0; j < 40; ++j) w.bits[(j * 7919) % w.bits.size()] = static_cast<uint16_t>((1 + j) << 7);
    w.bits[static_cast<size_t>(c.cols - 1)] = 0x7fc1;  // NaN payload at a row's end
    const PackedBf16 packed = pack_bf16(w.bits.data(), c.rows, c.cols);
    ASSERT_GT(packed.exc_col.size(), 0u);
    const int64_t rows = c.row_end - c.row_begin, n = rows * c.cols;
    for (bool enqueue : {false, true}) {
      SCOPED_TRACE(enqueue ? "enqueue" : "async path");
      // The destination as bf16 inside a guarded fp32 buffer: 2 bf16 per float, the guards stay floats.
      GuardedTensor guarded(*backend, Shape{(n + 1) / 2});
      const TensorView dst(guarded.view().data, DType::kBF16, Shape{rows, c.cols}, Device::kCuda);
      if (enqueue) {
        backend->copy_packed_from_host_enqueue(packed, c.row_begin, c.row_end, dst);
        backend->wait_enqueued_copies();
      } else {
        backend->copy_packed_from_host_async_path(packed, c.row_begin, c.row_end, dst);
      }
      backend->synchronize();
      const std::vector<float> words = guarded.read();
      std::vector<uint16_t> got(static_cast<size_t>(n));
      std::memcpy(got.data(), words.data(), got.size() * sizeof(uint16_t));
      const std::vector<uint16_t> want(w.bits.begin() + c.row_begin * c.cols, w.bits.begin() + c.row_end * c.cols);
      size_t first_bad = 0;
      while (first_bad < got.size() && got[first_bad] == want[first_bad]) ++first_bad;
      EXPECT_EQ(first_bad, got.size()) << "first difference at weight " << first_bad;
    }
  }
}

}  // namespace
}  // namespace moex::cuda_test
