#include "moex/moe/miss_path.h"

#include <algorithm>
#include <cmath>

#include "moex/core/error.h"

namespace moex {
namespace {

struct Option {
  MissChoice choice;
  PathLoad load;
  double makespan() const { return std::max(load.cpu_ms, load.link_ms); }
  double total() const { return load.cpu_ms + load.link_ms; }
};

bool better(const Option& a, const Option& b) {
  constexpr double kEps = 1e-9;
  if (a.makespan() < b.makespan() - kEps) return true;
  if (a.makespan() > b.makespan() + kEps) return false;
  return a.total() < b.total() - kEps;
}

}  // namespace

MissChoice choose_miss_path(const ExpertShape& shape, bool cpu_ok, bool split_ok, const MissCostModel& model,
                            PathLoad* load) {
  MOEX_ASSERT(shape.ffn > 0 && shape.row_bytes > 0 && shape.bytes >= shape.ffn * shape.row_bytes,
              "expert shape ffn {} row bytes {} bytes {}", shape.ffn, shape.row_bytes, shape.bytes);
  MOEX_ASSERT(model.host_read_gbs > 0 && model.copy_gbs > 0 && model.row_granule > 0,
              "bandwidths {} / {} GB/s, granule {}", model.host_read_gbs, model.copy_gbs, model.row_granule);
  // GB/s = 1e6 bytes per ms.
  const double cpu_ms_per_byte = 1.0 / (model.host_read_gbs * 1e6);
  const double link_ms_per_byte = 1.0 / (model.copy_gbs * 1e6);
  const double bytes = static_cast<double>(shape.bytes);

  Option best{{MissPath::kCopy, 0}, {load->cpu_ms, load->link_ms + bytes * link_ms_per_byte}};
  if (cpu_ok) {
    Option cpu{{MissPath::kCpu, 0}, {load->cpu_ms + bytes * cpu_ms_per_byte, load->link_ms}};
    if (!better(best, cpu)) best = cpu;  // ties to the CPU: the copy would also evict a cached expert
  }
  if (split_ok) {
    // Both paths end together when cpu + rows * row_bytes / R_cpu = link + (bytes - rows * row_bytes) / R_link.
    const double row_bytes = static_cast<double>(shape.row_bytes);
    const double cpu_ms = load->cpu_ms + model.split_overhead_ms;
    const double even = (load->link_ms - cpu_ms + bytes * link_ms_per_byte) /
                        (row_bytes * (cpu_ms_per_byte + link_ms_per_byte));
    const int64_t granule = model.row_granule;
    const int64_t down = static_cast<int64_t>(std::floor(std::max(0.0, even) / static_cast<double>(granule))) * granule;
    for (int64_t rows : {down, down + granule}) {
      rows = std::min(rows, shape.ffn);
      if (rows <= 0) continue;
      const double host_bytes = static_cast<double>(rows) * row_bytes;
      Option split{{MissPath::kSplit, rows},
                   {cpu_ms + host_bytes * cpu_ms_per_byte, load->link_ms + (bytes - host_bytes) * link_ms_per_byte}};
      if (better(split, best)) best = split;
    }
  }
  *load = best.load;
  return best.choice;
}

}  // namespace moex
