// The subcommand table's entry type. Each subcommand lives in its own file (apps/moex/<cmd>.cc) and
// exports one setup function: it declares the subcommand's options on `sub` (whose lifetime outlives
// parsing) and returns the action main() runs when that subcommand was chosen.
#pragma once

#include <functional>

#include <CLI/CLI.hpp>

namespace moex::cli {

using CommandAction = std::function<int()>;
using CommandSetup = CommandAction (*)(CLI::App* sub);

struct CommandEntry {
  const char* name;
  const char* description;
  CommandSetup setup;
};

// One declaration per subcommand file.
CommandAction setup_run(CLI::App* sub);
CommandAction setup_logits(CLI::App* sub);
CommandAction setup_bench(CLI::App* sub);
CommandAction setup_tokenize(CLI::App* sub);
CommandAction setup_detokenize(CLI::App* sub);
CommandAction setup_trace(CLI::App* sub);

}  // namespace moex::cli
