// Anchors the Backend vtable in moex_backend.
#include "moex/backend/backend.h"

#include <algorithm>
#include <vector>

#include "moex/core/error.h"

namespace moex {
namespace {

// Rows [row_begin, row_end) of src unpacked into host memory, shaped like dst: the default packed copies' source.
const std::vector<uint16_t>& unpacked_rows(const PackedBf16& src, int64_t row_begin, int64_t row_end,
                                           const TensorView& dst, const char* op) {
  check_packed_copy_shapes(src, row_begin, row_end, dst, op);
  thread_local std::vector<uint16_t> rows;
  rows.resize(static_cast<size_t>((row_end - row_begin) * src.cols));
  unpack_bf16_rows(src, row_begin, row_end, rows.data());
  return rows;
}

}  // namespace

void Backend::copy_packed_from_host_async_path(const PackedBf16& src, int64_t row_begin, int64_t row_end,
                                               const TensorView& dst) {
  copy_from_host_async_path(unpacked_rows(src, row_begin, row_end, dst, "copy_packed_from_host_async_path").data(),
                            dst);
}

void Backend::copy_packed_from_host_enqueue(const PackedBf16& src, int64_t row_begin, int64_t row_end,
                                            const TensorView& dst) {
  // copy_from_host, not copy_from_host_enqueue: the unpacked rows do not outlive this call.
  copy_from_host(unpacked_rows(src, row_begin, row_end, dst, "copy_packed_from_host_enqueue").data(), dst);
}

void Backend::expert_gate_up_rows(const TensorView& x_gate, const TensorView& x_up, const ExpertWeights& w,
                                  int64_t rows, const TensorView& gate_out, const TensorView& up_out) {
  MOEX_ASSERT(w.packed == nullptr, "{}: expert_gate_up_rows of a packed expert", name());
  linear(x_gate, w.gate.rows(0, rows), nullptr, gate_out);
  linear(x_up, w.up.rows(0, rows), nullptr, up_out);
  silu_mul(gate_out, up_out, gate_out);
}

void check_kv_step(const KvStep& step, int64_t num_rows, int64_t num_pages, const char* op, int64_t* max_keys) {
  MOEX_ASSERT(step.page_size > 0 && step.table_stride > 0 &&
                  static_cast<int64_t>(step.block_tables.size()) % step.table_stride == 0,
              "{}: page_size {} table_stride {} for {} table entries", op, step.page_size, step.table_stride,
              step.block_tables.size());
  MOEX_ASSERT(static_cast<int64_t>(step.row_seq.size()) == num_rows && step.row_pos.size() == step.row_seq.size(),
              "{}: {} rows, KvStep has {} sequences / {} positions", op, num_rows, step.row_seq.size(),
              step.row_pos.size());
  const int64_t num_seqs = step.num_seqs(), capacity = step.table_stride * step.page_size;
  int64_t longest = 0;
  for (int64_t row = 0; row < num_rows; ++row) {
    MOEX_ASSERT(step.row_seq[row] >= 0 && step.row_seq[row] < num_seqs && step.row_pos[row] >= 0 &&
                    step.row_pos[row] < capacity,
                "{}: row {} is sequence {} (of {}) at position {} (table covers {})", op, row, step.row_seq[row],
                num_seqs, step.row_pos[row], capacity);
    longest = std::max<int64_t>(longest, step.row_pos[row] + 1);
  }
  for (int32_t page : step.block_tables)
    MOEX_ASSERT(page >= 0 && page < num_pages, "{}: block table names page {} of a pool of {}", op, page, num_pages);
  if (max_keys) *max_keys = longest;
}

void check_packed_copy_shapes(const PackedBf16& src, int64_t row_begin, int64_t row_end, const TensorView& dst,
                              const char* op) {
  MOEX_ASSERT(row_begin >= 0 && row_begin <= row_end && row_end <= src.rows && dst.dtype == DType::kBF16 &&
                  dst.numel() == (row_end - row_begin) * src.cols,
              "{}: rows [{}, {}) of a {} x {} packed matrix into {} {}", op, row_begin, row_end, src.rows, src.cols,
              dtype_name(dst.dtype), dst.shape.str());
}

LinearDims check_linear_shapes(const TensorView& x, const TensorView& w, const TensorView* bias, const TensorView& out,
                               const char* op) {
  MOEX_ASSERT(w.shape.ndim == 2, "{}: weight must be 2-D, got {}", op, w.shape.str());
  LinearDims dims;
  dims.out_features = w.dim(0);
  dims.in_features = w.dim(1);
  MOEX_ASSERT(dims.in_features > 0 && x.numel() % dims.in_features == 0, "{}: x {} vs weight {}", op, x.shape.str(),
              w.shape.str());
  dims.rows = x.numel() / dims.in_features;
  MOEX_ASSERT(out.numel() == dims.rows * dims.out_features, "{}: out {} for {} rows x {}", op, out.shape.str(),
              dims.rows, dims.out_features);
  if (bias && !bias->empty())
    MOEX_ASSERT(bias->numel() == dims.out_features, "{}: bias {} for {} outputs", op, bias->shape.str(),
                dims.out_features);
  return dims;
}

int64_t check_kv_write_shapes(const KvStep& step, const TensorView& k, const TensorView& v, const TensorView& k_pages,
                              const TensorView& v_pages, const char* op) {
  MOEX_ASSERT(k_pages.shape.ndim == 4 && k_pages.shape == v_pages.shape && k_pages.dim(1) == step.page_size,
              "{}: pages {} / {} for page size {}", op, k_pages.shape.str(), v_pages.shape.str(), step.page_size);
  const int64_t n = k.shape.ndim > 0 ? k.dim(0) : 0;
  MOEX_ASSERT(k.numel() == n * k_pages.dim(2) * k_pages.dim(3) && v.numel() == k.numel(), "{}: k {} v {} vs pages {}",
              op, k.shape.str(), v.shape.str(), k_pages.shape.str());
  return n;
}

void check_attention_shapes(const KvStep& step, const TensorView& q, const TensorView& k_pages,
                            const TensorView& v_pages, const TensorView& out, const char* op) {
  MOEX_ASSERT(q.shape.ndim == 3 && k_pages.shape.ndim == 4 && k_pages.shape == v_pages.shape &&
                  k_pages.dim(1) == step.page_size && q.dim(2) == k_pages.dim(3) && k_pages.dim(2) > 0 &&
                  q.dim(1) % k_pages.dim(2) == 0 && out.numel() == q.numel(),
              "{}: q {} pages {} / {} out {} page size {}", op, q.shape.str(), k_pages.shape.str(),
              v_pages.shape.str(), out.shape.str(), step.page_size);
}

void Backend::pick_token(const TensorView& logits, const TokenDraw& draw) {
  (void)logits, (void)draw;
  MOEX_ASSERT(false, "{}: pick_token on a backend that does not chain decode steps", name());
}

int32_t Backend::picked_token() {
  MOEX_ASSERT(false, "{}: picked_token on a backend that does not chain decode steps", name());
  return kTokenOnDevice;
}

void Backend::pick_rows(const TensorView& logits, std::span<const TokenDraw> draws) {
  (void)logits, (void)draws;
  MOEX_ASSERT(false, "{}: pick_rows on a backend that does not chain batched decode steps", name());
}

void Backend::picked_rows(std::span<int32_t> ids) {
  (void)ids;
  MOEX_ASSERT(false, "{}: picked_rows on a backend that does not chain batched decode steps", name());
}

}  // namespace moex
