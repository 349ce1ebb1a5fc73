// Anchors the Backend vtable in moex_backend.
#include "moex/backend/backend.h"

#include <algorithm>

#include "moex/core/error.h"

namespace moex {

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

}  // namespace moex
