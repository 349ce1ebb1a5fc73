// ChatTemplate: the public face of the Jinja-subset interpreter (jinja_*.cc).
#include "moex/tokenizer/chat_template.h"

#include "moex/core/error.h"
#include "moex/tokenizer/jinja_eval.h"
#include "moex/tokenizer/tokenizer.h"

namespace moex {

struct ChatTemplate::Parsed {
  jinja::Body body;
};

ChatTemplate::ChatTemplate(const std::string& source, std::string bos_token, std::string eos_token)
    : parsed_(std::make_unique<Parsed>(Parsed{jinja::parse_template(source)})),
      bos_token_(std::move(bos_token)),
      eos_token_(std::move(eos_token)) {}

ChatTemplate ChatTemplate::from_tokenizer(const Tokenizer& tokenizer) {
  if (tokenizer.chat_template().empty())
    throw FormatError("the checkpoint has no chat template (no chat_template in tokenizer_config.json and no "
                      "chat_template.jinja); use a plain prompt instead of --chat");
  return ChatTemplate(tokenizer.chat_template(), tokenizer.bos_token(), tokenizer.eos_token());
}

ChatTemplate::ChatTemplate(ChatTemplate&&) noexcept = default;
ChatTemplate& ChatTemplate::operator=(ChatTemplate&&) noexcept = default;
ChatTemplate::~ChatTemplate() = default;

std::string ChatTemplate::apply(std::span<const ChatMessage> messages, bool add_generation_prompt) const {
  if (messages.empty()) throw UsageError("chat template: no messages to render");
  jinja::List list;
  for (const ChatMessage& m : messages) {
    if (m.role.empty()) throw UsageError("chat template: a message has an empty role");
    list.emplace_back(jinja::Dict{{"role", jinja::Value(m.role)}, {"content", jinja::Value(m.content)}});
  }
  jinja::Value globals{jinja::Dict{{"messages", jinja::Value(std::move(list))},
                                   {"add_generation_prompt", jinja::Value(add_generation_prompt)},
                                   {"bos_token", jinja::Value(bos_token_)},
                                   {"eos_token", jinja::Value(eos_token_)}}};
  return jinja::render(parsed_->body, globals);
}

std::string ChatTemplate::render_json(std::string_view context_json) const {
  jinja::Value globals = jinja::from_json_text(std::string(context_json));
  if (!globals.is_dict()) throw UsageError("chat template context: expected a JSON object");
  if (!globals.find("bos_token")) globals.set("bos_token", jinja::Value(bos_token_));
  if (!globals.find("eos_token")) globals.set("eos_token", jinja::Value(eos_token_));
  return jinja::render(parsed_->body, globals);
}

}  // namespace moex
