// A greedy pick's candidate as one 64-bit key whose integer order is the argmax's: the larger logit first, then the
// lower index (the first index of the maximum, whatever order the candidates meet in), and NaN never (key 0, below
// every number's key). The lm_head GEMV's blocks fold their rows' best into one word, an atomicMax a block
// (gemv.cu), so the decode step's greedy pick needs no pass over the logits of its own (sampling.cu). Host and
// device code: the host-side tests check the order against the sampler's argmax.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define MOEX_ARGMAX_KEY_FN __host__ __device__ __forceinline__
#else
#define MOEX_ARGMAX_KEY_FN inline
#endif

namespace moex::cuda {

// The key of logit `value` at column `index` (< 2^31). -0 and +0 are one value, as == says.
MOEX_ARGMAX_KEY_FN uint64_t argmax_key(float value, uint32_t index) {
  if (!(value == value)) return 0;
  if (value == 0.0f) value = 0.0f;
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  // IEEE floats compare as sign-magnitude: flipping every bit of a negative and the sign bit of a positive gives
  // unsigned integers in the floats' order (-inf lowest, at 0x007fffff: above 0, the "nothing" key).
  const uint32_t ordered = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  return (static_cast<uint64_t>(ordered) << 32) | (0xffffffffu - index);
}

// The pick from the largest key of a row and the row's first logit: the key's column, or 0 when the first logit
// is NaN or every logit was (the host sampler's argmax).
MOEX_ARGMAX_KEY_FN int32_t argmax_key_pick(uint64_t best_key, float first) {
  if (!(first == first) || best_key == 0) return 0;
  return static_cast<int32_t>(0xffffffffu - static_cast<uint32_t>(best_key));
}

}  // namespace moex::cuda

#undef MOEX_ARGMAX_KEY_FN
