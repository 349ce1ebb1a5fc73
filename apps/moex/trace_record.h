// `moex trace record`, a subcommand of `moex trace` (apps/moex/trace.cc holds the others).
#pragma once

#include <functional>

#include <CLI/CLI.hpp>

namespace moex::cli {

// Adds `record` under `trace`; *action runs it when it was the chosen subcommand.
CLI::App* add_trace_record_command(CLI::App* trace, std::function<int()>* action);

}  // namespace moex::cli
