// Grid sizes of the kernels that loop over their work: plain C++, no CUDA types, so its tests build anywhere.
#pragma once

#include <cstdint>

namespace moex::cuda {

// Blocks for a grid whose blocks loop over `groups` units of work (unit b, b + blocks, ...): the fewest that take
// no more rounds than blocks_per_sm * num_sms blocks would. The kernel ends with its longest block, so the blocks
// the cap would add beyond these only do one round fewer for nothing -- and each block has a fixed cost (the
// q/k/v GEMV normalises the row in every block). Model B's q/k/v, 640 groups of 8 rows on 132 SMs at 2 per SM:
// 214 blocks of 3 rounds instead of 264 of 2 or 3. blocks_per_sm <= 0 or num_sms <= 0: one block per unit.
inline int64_t looping_grid_blocks(int64_t groups, int blocks_per_sm, int num_sms) {
  if (groups <= 0) return 1;
  if (blocks_per_sm <= 0 || num_sms <= 0) return groups;
  const int64_t cap = int64_t(blocks_per_sm) * num_sms;
  const int64_t rounds = (groups + cap - 1) / cap;
  return (groups + rounds - 1) / rounds;
}

}  // namespace moex::cuda
