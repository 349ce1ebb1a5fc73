#include "moex/core/dtype.h"

#include <cmath>

namespace moex {

bool parse_dtype(std::string_view name, DType* out) {
  if (name == "F32") *out = DType::kF32;
  else if (name == "F16") *out = DType::kF16;
  else if (name == "BF16") *out = DType::kBF16;
  else if (name == "I32") *out = DType::kI32;
  else if (name == "I64") *out = DType::kI64;
  else return false;
  return true;
}

// IEEE half: 1 sign, 5 exponent, 10 mantissa bits. Portable bit manipulation; the hot loops use F16C.
float f16_to_f32(uint16_t bits) {
  uint32_t sign = static_cast<uint32_t>(bits & 0x8000u) << 16;
  uint32_t exponent = (bits >> 10) & 0x1fu;
  uint32_t mantissa = bits & 0x3ffu;
  uint32_t out;
  if (exponent == 0) {
    if (mantissa == 0) {
      out = sign;
    } else {  // subnormal: renormalise
      int shift = 0;
      while ((mantissa & 0x400u) == 0) {
        mantissa <<= 1;
        ++shift;
      }
      mantissa &= 0x3ffu;
      out = sign | (static_cast<uint32_t>(127 - 15 - shift + 1) << 23) | (mantissa << 13);
    }
  } else if (exponent == 31) {
    out = sign | 0x7f800000u | (mantissa << 13);
  } else {
    out = sign | ((exponent + 127 - 15) << 23) | (mantissa << 13);
  }
  float value;
  std::memcpy(&value, &out, sizeof(value));
  return value;
}

uint16_t f32_to_f16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  if (std::isnan(value)) return sign | 0x7e00u;
  float magnitude = std::fabs(value);
  if (magnitude >= 65520.0f) return sign | 0x7c00u;
  if (magnitude < 6.103515625e-05f) {  // subnormal half
    return sign | static_cast<uint16_t>(std::nearbyint(magnitude * 16777216.0f));
  }
  uint32_t abs_bits = bits & 0x7fffffffu;
  uint32_t rounding = 0xfffu + ((abs_bits >> 13) & 1u);
  abs_bits += rounding;
  return sign | static_cast<uint16_t>(((abs_bits >> 13) - (112u << 10)) & 0x7fffu);
}

}  // namespace moex
