// moex CLI entry: the subcommand table and the one place where exceptions become an error line and a
// non-zero exit status.
#include <cstdio>
#include <exception>
#include <vector>

#include "commands.h"
#include "moex/core/error.h"

namespace moex::cli {
namespace {

// The only list of subcommands; adding one is a file plus a line here.
const CommandEntry kCommands[] = {
    {"run", "generate text or token ids from a prompt", setup_run},
    {"logits", "print the model's logits (and router logits) for a prompt as JSON", setup_logits},
    {"bench", "time prefill and decode of a model (real or random weights at real shapes)", setup_bench},
    {"tokenize", "text to token ids with the checkpoint's tokenizer", setup_tokenize},
    {"detokenize", "token ids to text with the checkpoint's tokenizer", setup_detokenize},
    {"trace", "simulate expert caches and predictors on routing traces; trace statistics", setup_trace},
};

}  // namespace
}  // namespace moex::cli

int main(int argc, char** argv) {
  using namespace moex::cli;
  CLI::App app{"moex: Mixture-of-Experts inference engine (Hugging Face checkpoints, CPU and CUDA)"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "moex 0.1.0");
  std::vector<std::pair<CLI::App*, CommandAction>> actions;
  for (const CommandEntry& entry : kCommands) {
    CLI::App* sub = app.add_subcommand(entry.name, entry.description);
    actions.emplace_back(sub, entry.setup(sub));
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  try {
    for (auto& [sub, action] : actions)
      if (sub->parsed()) return action();
  } catch (const moex::Error& e) {
    std::fprintf(stderr, "moex: error: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moex: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
