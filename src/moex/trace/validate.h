// Checks shared by both trace readers, so both formats reject the same bad content the same way.
#pragma once

#include <string>

#include "moex/trace/trace.h"

namespace moex {

// num_layers, num_experts, top_k in range. Throws FormatError prefixed with `where`.
void check_trace_shape(const Trace& trace, const std::string& where);
// Every expert id in [0, num_experts) and distinct within a (token, layer). Throws FormatError.
void check_request_ids(const Trace& trace, const TraceRequest& request, const std::string& where);

}  // namespace moex
