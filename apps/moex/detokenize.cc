// `moex detokenize`: ids to text with the checkpoint's own tokenizer, as the reference's decode(ids).
#include <cstdio>

#include <nlohmann/json.hpp>

#include "cli_common.h"
#include "commands.h"
#include "moex/tokenizer/tokenizer.h"

namespace moex::cli {

CommandAction setup_detokenize(CLI::App* sub) {
  struct Options {
    std::string model_dir, ids;
    bool skip_special = false, json = false;
  };
  auto options = std::make_shared<Options>();
  sub->add_option("-m,--model", options->model_dir, "checkpoint directory (tokenizer.json or tokenizer.model)");
  sub->add_option("--ids", options->ids, "token ids, comma-separated")->required();
  sub->add_flag("--skip-special", options->skip_special, "drop special tokens from the text");
  sub->add_flag("--json", options->json, "print {\"text\":\"...\"}");
  return [options]() -> int {
    const std::vector<int32_t> ids = parse_id_list(options->ids, "--ids");
    const std::string dir = options->model_dir.empty() ? default_model_dir() : options->model_dir;
    const Tokenizer tokenizer = Tokenizer::from_dir(dir);
    const std::string text = tokenizer.decode(ids, options->skip_special);
    if (options->json) std::printf("%s\n", nlohmann::json{{"text", text}}.dump().c_str());
    else std::printf("%s\n", text.c_str());
    return 0;
  };
}

}  // namespace moex::cli
