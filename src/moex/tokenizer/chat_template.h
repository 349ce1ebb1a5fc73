// Renders a checkpoint's chat template (tokenizer_config.json's `chat_template`, Jinja) for a list of
// messages, as transformers' apply_chat_template(tokenize=False) does. The interpreter implements the Jinja
// subset the real templates of the supported families use; see docs/tokenizers.md.
#pragma once

#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace moex {

class Tokenizer;

struct ChatMessage {
  std::string role;     // "system", "user", "assistant", "tool"
  std::string content;
};

class ChatTemplate {
 public:
  // Parses `source` once. bos/eos texts are the template's bos_token/eos_token variables.
  // Throws FormatError "chat_template: line N: ..." for syntax outside the supported subset.
  ChatTemplate(const std::string& source, std::string bos_token = "", std::string eos_token = "");
  // The tokenizer's template (tokenizer_config.json / chat_template.jinja); throws FormatError if it has none.
  static ChatTemplate from_tokenizer(const Tokenizer& tokenizer);

  ChatTemplate(ChatTemplate&&) noexcept;
  ChatTemplate& operator=(ChatTemplate&&) noexcept;
  ~ChatTemplate();

  // The prompt text for `messages`; add_generation_prompt appends the assistant turn opener.
  // Throws UsageError when the template rejects the messages (raise_exception) or they are empty.
  // Encode the result with add_special_tokens=false: templates write BOS themselves. Thread-safe.
  std::string apply(std::span<const ChatMessage> messages, bool add_generation_prompt = true) const;

  // Full control: `context_json` is a JSON object of template variables ({"messages": [...], "tools": [...],
  // "add_generation_prompt": true, ...}); bos_token/eos_token are added unless given.
  std::string render_json(std::string_view context_json) const;

 private:
  struct Parsed;
  std::unique_ptr<Parsed> parsed_;
  std::string bos_token_, eos_token_;
};

}  // namespace moex
