#include "moex/backend/cuda/packed_copy.h"

#include <algorithm>

#include "moex/backend/cuda/cuda_check.h"
#include "moex/backend/cuda/kernels/unpack_packed.cuh"
#include "moex/core/error.h"

namespace moex::cuda {
namespace {

// 16 MiB: ~0.3 ms of PCIe time a chunk, against ~10 us for its unpack kernel, which waits in the same stream.
constexpr size_t kStagingBytes = size_t{16} << 20;

size_t aligned(size_t bytes) { return (bytes + 255) / 256 * 256; }

// Where a chunk's arrays sit in the staging buffer, each 256-byte aligned.
struct ChunkLayout {
  size_t codes, index, cols, values, total;
};
ChunkLayout chunk_layout(const PackedBf16& src, int64_t rows, int64_t exceptions) {
  ChunkLayout layout;
  layout.codes = aligned(static_cast<size_t>(rows * src.cols));
  layout.index = layout.codes + aligned(static_cast<size_t>(rows * src.code_stride()));
  layout.cols = layout.index + aligned(4 * static_cast<size_t>(rows + 1));
  layout.values = layout.cols + aligned(4 * static_cast<size_t>(exceptions));
  layout.total = layout.values + 2 * static_cast<size_t>(exceptions);
  return layout;
}

void copy_in(void* dst, const void* src, size_t bytes, cudaStream_t stream) {
  if (bytes > 0) MOEX_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream));
}

}  // namespace

void PackedCopier::enqueue(const PackedBf16& src, int64_t row_begin, int64_t row_end, uint16_t* dst,
                           cudaStream_t stream) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (staging_.get() == nullptr) staging_ = DeviceMemory(kStagingBytes);
  char* staging = static_cast<char*>(staging_.get());
  auto exceptions = [&](int64_t first, int64_t rows) {
    return static_cast<int64_t>(src.exc_begin[first + rows]) - src.exc_begin[first];
  };
  const int64_t row_bytes = src.cols + src.code_stride() + 4;
  for (int64_t row = row_begin; row < row_end;) {
    int64_t rows = std::min<int64_t>(row_end - row, std::max<int64_t>(1, (kStagingBytes - 4096) / row_bytes));
    while (rows > 1 && chunk_layout(src, rows, exceptions(row, rows)).total > kStagingBytes) rows /= 2;
    const int64_t count = exceptions(row, rows);
    const ChunkLayout layout = chunk_layout(src, rows, count);
    MOEX_ASSERT(layout.total <= kStagingBytes, "packed copy: row {} of {} columns needs {} staging bytes", row,
                src.cols, layout.total);
    const uint32_t first_exception = src.exc_begin[row];
    copy_in(staging, src.lo.data() + row * src.cols, static_cast<size_t>(rows * src.cols), stream);
    copy_in(staging + layout.codes, src.codes.data() + row * src.code_stride(),
            static_cast<size_t>(rows * src.code_stride()), stream);
    copy_in(staging + layout.index, src.exc_begin.data() + row, 4 * static_cast<size_t>(rows + 1), stream);
    copy_in(staging + layout.cols, src.exc_col.data() + first_exception, 4 * static_cast<size_t>(count), stream);
    copy_in(staging + layout.values, src.exc_value.data() + first_exception, 2 * static_cast<size_t>(count), stream);
    PackedRows rows_args;
    rows_args.lo = reinterpret_cast<const uint8_t*>(staging);
    rows_args.codes = reinterpret_cast<const uint8_t*>(staging + layout.codes);
    rows_args.exc_begin = reinterpret_cast<const uint32_t*>(staging + layout.index);
    rows_args.exc_col = reinterpret_cast<const uint32_t*>(staging + layout.cols);
    rows_args.exc_value = reinterpret_cast<const uint16_t*>(staging + layout.values);
    rows_args.exc_base = first_exception;
    rows_args.rows = rows;
    rows_args.cols = src.cols;
    rows_args.code_stride = src.code_stride();
    std::copy(src.exponent.begin(), src.exponent.end(), rows_args.exponent);
    launch_unpack_packed_rows(rows_args, dst + (row - row_begin) * src.cols, stream);
    MOEX_CUDA_CHECK_LAUNCH();
    row += rows;
  }
}

}  // namespace moex::cuda
