// Constants of moex's binary trace format, shared by the writer and the reader (docs/trace-format.md).
#pragma once

#include <cstdint>

namespace moex::trace_format {

inline constexpr char kMagic[8] = {'M', 'O', 'E', 'X', 'T', 'R', 'C', '1'};
inline constexpr int32_t kVersion = 1;
inline constexpr uint8_t kRequestTag = 'R';
inline constexpr uint8_t kEndTag = 'E';
// Ids take one byte when every expert id fits (num_experts <= 256), two otherwise.
inline constexpr int32_t kMaxExperts = 65536;
inline constexpr int64_t kMaxTokensPerRequest = int64_t{1} << 31;

}  // namespace moex::trace_format
