// Where a missed expert runs when the host CPU can compute from the source tier while the link copies
// to the fast tier: whole on the CPU, whole over the link, or split between them (the CPU computes the
// first intermediate rows of gate/up, the link carries the rest of gate/up and down). Both paths run
// at once, so the choice balances their finish times. Pure logic over bytes and bandwidths.
#pragma once

#include <cstdint>

namespace moex {

enum class MissPath : uint8_t { kCopy, kCpu, kSplit };

struct MissChoice {
  MissPath path = MissPath::kCopy;
  int64_t host_rows = 0;  // kSplit: gate/up rows [0, host_rows) run on the CPU, in (0, ffn]
};

struct ExpertShape {
  int64_t ffn = 0;        // intermediate rows of gate and up
  int64_t row_bytes = 0;  // one row of gate plus one row of up
  int64_t bytes = 0;      // gate + up + down
};

// Work already given to each path in the current step, in ms.
struct PathLoad {
  double cpu_ms = 0;
  double link_ms = 0;
};

struct MissCostModel {
  double host_read_gbs = 100.0;  // what the CPU expert kernels read from host DRAM
  double copy_gbs = 50.0;        // pinned host-to-device copies
  // host_rows is a multiple of this (or ffn): the kernels' row blocks, and fewer, larger copies.
  int64_t row_granule = 8;
  // What a split costs the step beyond its bytes: the host's extra GEMV dispatches, the synchronous uploads
  // of its act rows and the device's extra launches. Measured, not estimated: on an H100 host the Qwen3-30B-A3B
  // shape at 8 GiB went from 31.6 to 57.2 ms/token when 54 of its 9 MB experts per token split at a 0.05 ms
  // estimate, ~0.47 ms per split. At 0.5 ms only experts of tens of MB split (Mixtral-8x7B's are 352 MB).
  double split_overhead_ms = 0.5;
};

// The path for one more missed expert that ends the step earliest (the later of the two paths' finish
// times; ties go to the smaller sum of both, then to the CPU, then to the copy), and adds its work to
// *load. cpu_ok: the CPU may compute it (routed to few tokens); split_ok: it may be split (routed to one
// token); with neither it is copied.
MissChoice choose_miss_path(const ExpertShape& shape, bool cpu_ok, bool split_ok, const MissCostModel& model,
                            PathLoad* load);

}  // namespace moex
