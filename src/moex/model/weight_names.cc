#include "moex/model/weight_names.h"

namespace moex {

std::string WeightNames::format(const std::string& pattern, int64_t layer_idx, int64_t expert_idx) {
  std::string out;
  out.reserve(pattern.size() + 8);
  for (size_t pos = 0; pos < pattern.size(); ++pos) {
    if (pattern.compare(pos, 3, "{L}") == 0) {
      out += std::to_string(layer_idx);
      pos += 2;
    } else if (pattern.compare(pos, 3, "{E}") == 0) {
      out += std::to_string(expert_idx);
      pos += 2;
    } else {
      out += pattern[pos];
    }
  }
  return out;
}

}  // namespace moex
