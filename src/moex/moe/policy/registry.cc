// The only list of eviction policies: adding one is a file in this folder plus a line here.
#include <fmt/format.h>
#include <fmt/ranges.h>

#include "moex/core/error.h"
#include "moex/moe/policy/policies.h"

namespace moex {
namespace {

struct PolicyEntry {
  const char* name;
  std::unique_ptr<EvictionPolicy> (*make)(const PolicyOptions&);
};

const PolicyEntry kPolicies[] = {
    {"lru", make_lru_policy},
    {"lfu", make_lfu_policy},
    {"activation", make_activation_policy},
    {"belady", make_belady_policy},
};

}  // namespace

std::vector<std::string> eviction_policy_names() {
  std::vector<std::string> names;
  for (const PolicyEntry& entry : kPolicies) names.emplace_back(entry.name);
  return names;
}

std::unique_ptr<EvictionPolicy> make_eviction_policy(std::string_view name, const PolicyOptions& options) {
  for (const PolicyEntry& entry : kPolicies)
    if (name == entry.name) return entry.make(options);
  throw UsageError(fmt::format("unknown cache policy \"{}\"; expected one of: {}", name,
                               fmt::join(eviction_policy_names(), ", ")));
}

}  // namespace moex
