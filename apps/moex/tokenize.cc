// `moex tokenize`: text to ids with the checkpoint's own tokenizer, as the reference's
// encode(text, add_special_tokens=True) (CLI contract in ARCHITECTURE.md).
#include <cstdio>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "cli_common.h"
#include "commands.h"
#include "moex/core/error.h"
#include "moex/tokenizer/tokenizer.h"

namespace moex::cli {

CommandAction setup_tokenize(CLI::App* sub) {
  struct Options {
    std::string model_dir, prompt, file;
    bool no_special = false, json = false;
  };
  auto options = std::make_shared<Options>();
  sub->add_option("-m,--model", options->model_dir, "checkpoint directory (tokenizer.json or tokenizer.model)");
  auto* prompt = sub->add_option("-p,--prompt", options->prompt, "text to tokenize");
  auto* file = sub->add_option("--file", options->file, "file whose content to tokenize");
  prompt->excludes(file);
  sub->add_flag("--no-special", options->no_special, "do not add the post-processor's special tokens (BOS/EOS)");
  sub->add_flag("--json", options->json, "print {\"ids\":[...]}");
  return [options, prompt, file]() -> int {
    if (!*prompt && !*file) throw UsageError("moex tokenize: give the text with -p TEXT or --file F");
    std::string text = options->prompt;
    if (*file) {
      std::ifstream in(options->file, std::ios::binary);
      if (!in) throw IoError(fmt::format("{}: cannot open file", options->file));
      std::ostringstream ss;
      ss << in.rdbuf();
      text = std::move(ss).str();
    }
    const std::string dir = options->model_dir.empty() ? default_model_dir() : options->model_dir;
    const Tokenizer tokenizer = Tokenizer::from_dir(dir);
    const std::vector<int32_t> ids = tokenizer.encode(text, !options->no_special);
    if (options->json) {
      std::printf("%s\n", nlohmann::json{{"ids", ids}}.dump().c_str());
    } else {
      for (size_t idx = 0; idx < ids.size(); ++idx) std::printf(idx ? ",%d" : "%d", ids[idx]);
      std::printf("\n");
    }
    return 0;
  };
}

}  // namespace moex::cli
