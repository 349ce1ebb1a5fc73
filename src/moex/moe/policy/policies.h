// Factories of the built-in eviction policies; registry.cc lists them by name.
#pragma once

#include "moex/moe/policy/eviction_policy.h"

namespace moex {

std::unique_ptr<EvictionPolicy> make_lru_policy(const PolicyOptions& options);
std::unique_ptr<EvictionPolicy> make_lfu_policy(const PolicyOptions& options);
std::unique_ptr<EvictionPolicy> make_activation_policy(const PolicyOptions& options);
std::unique_ptr<EvictionPolicy> make_belady_policy(const PolicyOptions& options);

}  // namespace moex
