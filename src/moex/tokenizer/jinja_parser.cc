// Lexer and recursive-descent parser for the Jinja subset. Operator precedence follows jinja2's parser:
// ternary < or < and < not < comparison/in/is < ~ < + - < * / // % < ** < unary - < postfix (. [] () |).
#include <cctype>

#include "moex/core/error.h"
#include "moex/tokenizer/jinja_ast.h"

namespace moex::jinja {
namespace {

[[noreturn]] void fail(int line, const std::string& what) {
  throw FormatError(fmt::format("chat_template: line {}: {}", line, what));
}

struct Token {
  enum class Kind { kName, kString, kInt, kFloat, kOp, kEnd };
  Kind kind;
  std::string text;
  int line;
};

std::vector<Token> lex_tag(const std::string& src, int line) {
  std::vector<Token> out;
  size_t pos = 0;
  static const char* kOps[] = {"==", "!=", "<=", ">=", "//", "**", "+", "-", "*", "/", "%", "~", "<", ">", "=", "(", ")",
                               "[", "]", "{", "}", ",", ".", ":", "|"};
  while (pos < src.size()) {
    const char c = src[pos];
    if (c == '\n') ++line;
    if (std::isspace(static_cast<unsigned char>(c))) {
      ++pos;
      continue;
    }
    if (std::isalpha(static_cast<unsigned char>(c)) || c == '_') {
      size_t end = pos;
      while (end < src.size() && (std::isalnum(static_cast<unsigned char>(src[end])) || src[end] == '_')) ++end;
      out.push_back({Token::Kind::kName, src.substr(pos, end - pos), line});
      pos = end;
      continue;
    }
    if (std::isdigit(static_cast<unsigned char>(c))) {
      size_t end = pos;
      bool is_float = false;
      while (end < src.size() && (std::isdigit(static_cast<unsigned char>(src[end])) || src[end] == '_')) ++end;
      if (end + 1 < src.size() && src[end] == '.' && std::isdigit(static_cast<unsigned char>(src[end + 1]))) {
        is_float = true;
        ++end;
        while (end < src.size() && std::isdigit(static_cast<unsigned char>(src[end]))) ++end;
      }
      out.push_back({is_float ? Token::Kind::kFloat : Token::Kind::kInt, src.substr(pos, end - pos), line});
      pos = end;
      continue;
    }
    if (c == '\'' || c == '"') {
      std::string s;
      size_t end = pos + 1;
      for (; end < src.size() && src[end] != c; ++end) {
        if (src[end] == '\\' && end + 1 < src.size()) {
          const char e = src[++end];
          switch (e) {
            case 'n': s += '\n'; break;
            case 't': s += '\t'; break;
            case 'r': s += '\r'; break;
            case '\\': s += '\\'; break;
            case '\'': s += '\''; break;
            case '"': s += '"'; break;
            default: s += '\\', s += e;
          }
        } else {
          if (src[end] == '\n') ++line;
          s += src[end];
        }
      }
      if (end >= src.size()) fail(line, "unterminated string literal");
      out.push_back({Token::Kind::kString, s, line});
      pos = end + 1;
      continue;
    }
    bool matched = false;
    for (const char* op : kOps) {
      const size_t n = std::char_traits<char>::length(op);
      if (src.compare(pos, n, op) == 0) {
        out.push_back({Token::Kind::kOp, op, line});
        pos += n;
        matched = true;
        break;
      }
    }
    if (!matched) fail(line, fmt::format("unexpected character '{}' in a tag", c));
  }
  out.push_back({Token::Kind::kEnd, "", line});
  return out;
}

// One piece of template source: text, {{ expression }} or {% statement %}.
struct Segment {
  enum class Kind { kText, kExpr, kStmt };
  Kind kind;
  std::string body;
  int line;
};

// transformers renders with trim_blocks and lstrip_blocks, and jinja2 drops one trailing newline.
std::string preprocess(std::string src) {
  if (!src.empty() && src.back() == '\n') src.pop_back();
  std::string out;  // lstrip_blocks: spaces/tabs from a line start up to {% or {# go
  out.reserve(src.size());
  size_t line_start = 0;
  for (size_t pos = 0; pos < src.size(); ++pos) {
    if (src[pos] == '\n') line_start = pos + 1;
    if (src[pos] == '{' && pos + 1 < src.size() && (src[pos + 1] == '%' || src[pos + 1] == '#') && pos > line_start) {
      bool blank = true;
      for (size_t k = line_start; k < pos && blank; ++k) blank = src[k] == ' ' || src[k] == '\t';
      if (blank) out.resize(out.size() - (pos - line_start));
    }
    out += src[pos];
  }
  std::string trimmed;  // trim_blocks: the first newline after %} or #} goes
  trimmed.reserve(out.size());
  for (size_t pos = 0; pos < out.size(); ++pos) {
    trimmed += out[pos];
    if ((out[pos] == '%' || out[pos] == '#') && pos + 2 < out.size() && out[pos + 1] == '}' && out[pos + 2] == '\n') {
      trimmed += '}';
      pos += 2;
    }
  }
  return trimmed;
}

// The end of a tag: `close` outside string literals and brackets, as jinja2's lexer balances them, so
// `{{ f({'a': {'b': 1}}) }}` is one tag. Comments end at the first `#}`.
size_t find_close(const std::string& src, size_t pos, const char* close, bool balanced) {
  if (!balanced) return src.find(close, pos);
  int depth = 0;
  char quote = 0;
  for (; pos + 1 < src.size(); ++pos) {
    const char c = src[pos];
    if (quote) {
      if (c == '\\') ++pos;
      else if (c == quote) quote = 0;
      continue;
    }
    if (c == '\'' || c == '"') quote = c;
    else if (c == '(' || c == '[' || c == '{') ++depth;
    else if (depth > 0 && (c == ')' || c == ']' || c == '}')) --depth;
    else if (depth == 0 && src.compare(pos, 2, close) == 0) return pos;
  }
  return std::string::npos;
}

std::vector<Segment> split_segments(const std::string& raw) {
  const std::string src = preprocess(raw);
  std::vector<Segment> out;
  size_t pos = 0;
  int line = 1;
  bool strip_next = false;
  auto count_lines = [&](size_t from, size_t to) {
    for (size_t k = from; k < to; ++k) line += src[k] == '\n';
  };
  while (pos <= src.size()) {
    size_t open = src.find('{', pos);
    while (open != std::string::npos && open + 1 < src.size() && src[open + 1] != '{' && src[open + 1] != '%' &&
           src[open + 1] != '#')
      open = src.find('{', open + 1);
    if (open + 1 >= src.size()) open = std::string::npos;
    std::string text = src.substr(pos, open == std::string::npos ? std::string::npos : open - pos);
    const int text_line = line;
    count_lines(pos, open == std::string::npos ? src.size() : open);
    if (strip_next) {
      size_t k = 0;
      while (k < text.size() && std::isspace(static_cast<unsigned char>(text[k]))) ++k;
      text.erase(0, k);
    }
    strip_next = false;
    if (open == std::string::npos) {
      if (!text.empty()) out.push_back({Segment::Kind::kText, text, text_line});
      break;
    }
    const char type = src[open + 1];
    const char* close = type == '{' ? "}}" : type == '%' ? "%}" : "#}";
    const size_t end = find_close(src, open + 2, close, type != '#');
    if (end == std::string::npos) fail(line, fmt::format("tag opened with '{{{}' is never closed", type));
    size_t inner_begin = open + 2, inner_end = end;
    if (inner_begin < inner_end && src[inner_begin] == '-') {
      ++inner_begin;
      while (!text.empty() && std::isspace(static_cast<unsigned char>(text.back()))) text.pop_back();
    } else if (inner_begin < inner_end && src[inner_begin] == '+') {
      ++inner_begin;
    }
    if (inner_end > inner_begin && (src[inner_end - 1] == '-' || src[inner_end - 1] == '+')) {
      strip_next = src[inner_end - 1] == '-';
      --inner_end;
    }
    if (!text.empty()) out.push_back({Segment::Kind::kText, text, text_line});
    if (type != '#')
      out.push_back({type == '{' ? Segment::Kind::kExpr : Segment::Kind::kStmt,
                     src.substr(inner_begin, inner_end - inner_begin), line});
    count_lines(open, end + 2);
    pos = end + 2;
  }
  return out;
}

class ExprParser {
 public:
  ExprParser(std::vector<Token> tokens) : t_(std::move(tokens)) {}

  const Token& peek(size_t ahead = 0) const { return t_[std::min(i_ + ahead, t_.size() - 1)]; }
  bool at_end() const { return peek().kind == Token::Kind::kEnd; }
  bool is_op(const char* op, size_t ahead = 0) const {
    return peek(ahead).kind == Token::Kind::kOp && peek(ahead).text == op;
  }
  bool is_name(const char* name, size_t ahead = 0) const {
    return peek(ahead).kind == Token::Kind::kName && peek(ahead).text == name;
  }
  Token next() { return t_[std::min(i_++, t_.size() - 1)]; }
  void expect_op(const char* op) {
    if (!is_op(op)) fail(peek().line, fmt::format("expected '{}', found '{}'", op, peek().text));
    ++i_;
  }
  std::string expect_name() {
    if (peek().kind != Token::Kind::kName) fail(peek().line, fmt::format("expected a name, found '{}'", peek().text));
    return next().text;
  }
  void expect_end() {
    if (!at_end()) fail(peek().line, fmt::format("unexpected '{}'", peek().text));
  }

  ExprPtr make(Expr::Kind kind, int line) {
    auto e = std::make_unique<Expr>();
    e->kind = kind;
    e->line = line;
    return e;
  }

  ExprPtr expression() {  // ternary
    ExprPtr value = or_expr();
    if (is_name("if")) {
      const int line = next().line;
      auto e = make(Expr::Kind::kTernary, line);
      ExprPtr cond = or_expr();
      ExprPtr other = is_name("else") ? (next(), expression()) : make(Expr::Kind::kLiteral, line);
      e->args.push_back(std::move(value));
      e->args.push_back(std::move(cond));
      e->args.push_back(std::move(other));
      return e;
    }
    return value;
  }

  ExprPtr or_expr() {
    ExprPtr left = and_expr();
    while (is_name("or")) {
      auto e = make(Expr::Kind::kOr, next().line);
      e->args.push_back(std::move(left));
      e->args.push_back(and_expr());
      left = std::move(e);
    }
    return left;
  }

  ExprPtr and_expr() {
    ExprPtr left = not_expr();
    while (is_name("and")) {
      auto e = make(Expr::Kind::kAnd, next().line);
      e->args.push_back(std::move(left));
      e->args.push_back(not_expr());
      left = std::move(e);
    }
    return left;
  }

  ExprPtr not_expr() {
    if (is_name("not")) {
      auto e = make(Expr::Kind::kNot, next().line);
      e->args.push_back(not_expr());
      return e;
    }
    return comparison();
  }

  ExprPtr binary(const std::string& op, ExprPtr left, ExprPtr right, int line) {
    auto e = make(Expr::Kind::kBinary, line);
    e->name = op;
    e->args.push_back(std::move(left));
    e->args.push_back(std::move(right));
    return e;
  }

  ExprPtr comparison() {
    ExprPtr left = concat();
    for (;;) {
      const int line = peek().line;
      if (peek().kind == Token::Kind::kOp &&
          (peek().text == "==" || peek().text == "!=" || peek().text == "<" || peek().text == ">" ||
           peek().text == "<=" || peek().text == ">=")) {
        const std::string op = next().text;
        left = binary(op, std::move(left), concat(), line);
      } else if (is_name("in")) {
        next();
        left = binary("in", std::move(left), concat(), line);
      } else if (is_name("not") && is_name("in", 1)) {
        next();
        next();
        left = binary("not in", std::move(left), concat(), line);
      } else {
        return left;
      }
    }
  }

  ExprPtr concat() {
    ExprPtr left = additive();
    while (is_op("~")) {
      const int line = next().line;
      left = binary("~", std::move(left), additive(), line);
    }
    return left;
  }

  ExprPtr additive() {
    ExprPtr left = multiplicative();
    while (is_op("+") || is_op("-")) {
      const Token op = next();
      left = binary(op.text, std::move(left), multiplicative(), op.line);
    }
    return left;
  }

  ExprPtr multiplicative() {
    ExprPtr left = power();
    while (is_op("*") || is_op("/") || is_op("//") || is_op("%")) {
      const Token op = next();
      left = binary(op.text, std::move(left), power(), op.line);
    }
    return left;
  }

  ExprPtr power() {
    ExprPtr left = unary();
    while (is_op("**")) {
      const int line = next().line;
      left = binary("**", std::move(left), unary(), line);
    }
    return left;
  }

  ExprPtr unary() {
    if (is_op("-")) {
      auto e = make(Expr::Kind::kNeg, next().line);
      e->args.push_back(unary());
      return e;
    }
    if (is_op("+")) next();
    return filtered(postfix(primary()));
  }

  void call_args(Expr& e) {  // after '(' ; positional then keyword arguments
    std::vector<ExprPtr> kwargs;
    while (!is_op(")")) {
      if (peek().kind == Token::Kind::kName && is_op("=", 1)) {
        e.kwnames.push_back(next().text);
        next();
        kwargs.push_back(expression());
      } else {
        if (!kwargs.empty()) fail(peek().line, "positional argument after keyword argument");
        e.args.push_back(expression());
      }
      if (!is_op(")")) expect_op(",");
    }
    next();
    for (auto& k : kwargs) e.args.push_back(std::move(k));
  }

  ExprPtr postfix(ExprPtr value) {
    for (;;) {
      const int line = peek().line;
      if (is_op(".")) {
        next();
        auto e = make(Expr::Kind::kAttr, line);
        e->name = expect_name();
        e->args.push_back(std::move(value));
        value = std::move(e);
      } else if (is_op("[")) {
        next();
        ExprPtr parts[3];
        int colons = 0;
        while (!is_op("]")) {
          if (is_op(":")) {
            next();
            if (++colons > 2) fail(line, "a slice has at most two ':'");
            continue;
          }
          parts[colons] = expression();
        }
        next();
        auto e = make(colons ? Expr::Kind::kSlice : Expr::Kind::kItem, line);
        e->args.push_back(std::move(value));
        if (!colons && !parts[0]) fail(line, "empty subscript []");
        for (int k = 0; k < (colons ? 3 : 1); ++k) e->args.push_back(std::move(parts[k]));
        value = std::move(e);
      } else if (is_op("(")) {
        next();
        auto e = make(Expr::Kind::kCall, line);
        e->args.push_back(std::move(value));
        call_args(*e);
        value = std::move(e);
      } else {
        return value;
      }
    }
  }

  ExprPtr filtered(ExprPtr value) {
    for (;;) {
      const int line = peek().line;
      if (is_op("|")) {
        next();
        auto e = make(Expr::Kind::kFilter, line);
        e->name = expect_name();
        e->args.push_back(std::move(value));
        if (is_op("(")) {
          next();
          call_args(*e);
        }
        value = std::move(e);
      } else if (is_name("is")) {
        next();
        auto e = make(Expr::Kind::kTest, line);
        if (is_name("not")) {
          next();
          e->negated = true;
        }
        e->name = expect_name();
        e->args.push_back(std::move(value));
        if (is_op("(")) {
          next();
          call_args(*e);
        } else if (peek().kind == Token::Kind::kString || peek().kind == Token::Kind::kInt ||
                   (peek().kind == Token::Kind::kName && !is_name("and") && !is_name("or") && !is_name("else") &&
                    !is_name("if") && !is_name("in") && !is_name("not") && !is_name("is"))) {
          e->args.push_back(primary());  // `is divisibleby 3`, `is sameas none`
        }
        value = std::move(e);
      } else {
        return value;
      }
    }
  }

  ExprPtr primary() {
    const Token tok = next();
    switch (tok.kind) {
      case Token::Kind::kString: {
        auto e = make(Expr::Kind::kLiteral, tok.line);
        std::string s = tok.text;
        while (peek().kind == Token::Kind::kString) s += next().text;  // adjacent literals concatenate
        e->literal = Value(std::move(s));
        return e;
      }
      case Token::Kind::kInt: {
        auto e = make(Expr::Kind::kLiteral, tok.line);
        std::string digits;
        for (char c : tok.text)
          if (c != '_') digits += c;
        e->literal = Value(static_cast<int64_t>(std::stoll(digits)));
        return e;
      }
      case Token::Kind::kFloat: {
        auto e = make(Expr::Kind::kLiteral, tok.line);
        e->literal = Value(std::stod(tok.text));
        return e;
      }
      case Token::Kind::kName: {
        auto e = make(Expr::Kind::kLiteral, tok.line);
        if (tok.text == "true" || tok.text == "True") e->literal = Value(true);
        else if (tok.text == "false" || tok.text == "False") e->literal = Value(false);
        else if (tok.text == "none" || tok.text == "None") e->literal = Value::none();
        else {
          e->kind = Expr::Kind::kName;
          e->name = tok.text;
        }
        return e;
      }
      case Token::Kind::kOp:
        if (tok.text == "(") {
          ExprPtr inner = expression();
          if (is_op(",")) {  // tuple: evaluated as a list
            auto e = make(Expr::Kind::kList, tok.line);
            e->args.push_back(std::move(inner));
            while (is_op(",")) {
              next();
              if (is_op(")")) break;
              e->args.push_back(expression());
            }
            inner = std::move(e);
          }
          expect_op(")");
          return inner;
        }
        if (tok.text == "[") {
          auto e = make(Expr::Kind::kList, tok.line);
          while (!is_op("]")) {
            e->args.push_back(expression());
            if (!is_op("]")) expect_op(",");
          }
          next();
          return e;
        }
        if (tok.text == "{") {
          auto e = make(Expr::Kind::kDict, tok.line);
          while (!is_op("}")) {
            e->args.push_back(expression());
            expect_op(":");
            e->args.push_back(expression());
            if (!is_op("}")) expect_op(",");
          }
          next();
          return e;
        }
        break;
      case Token::Kind::kEnd: fail(tok.line, "unexpected end of expression");
    }
    fail(tok.line, fmt::format("unexpected '{}'", tok.text));
  }

 private:
  std::vector<Token> t_;
  size_t i_ = 0;
};

class TemplateParser {
 public:
  explicit TemplateParser(std::vector<Segment> segs) : segs_(std::move(segs)) {}

  // Parses nodes until a statement whose first word is in `stops` (left unconsumed) or the end.
  Body body(std::initializer_list<const char*> stops, std::string* stopped_at) {
    Body out;
    while (pos_ < segs_.size()) {
      const Segment& seg = segs_[pos_];
      if (seg.kind == Segment::Kind::kText) {
        auto n = node(Node::Kind::kText, seg.line);
        n->text = seg.body;
        out.push_back(std::move(n));
        ++pos_;
        continue;
      }
      ExprParser p(lex_tag(seg.body, seg.line));
      if (seg.kind == Segment::Kind::kExpr) {
        auto n = node(Node::Kind::kOutput, seg.line);
        n->expr = p.expression();
        p.expect_end();
        out.push_back(std::move(n));
        ++pos_;
        continue;
      }
      const std::string word = p.expect_name();
      for (const char* stop : stops) {
        if (word == stop) {
          *stopped_at = word;
          return out;
        }
      }
      ++pos_;
      out.push_back(statement(word, p, seg.line));
    }
    if (stops.size()) fail(segs_.empty() ? 1 : segs_.back().line, fmt::format("missing {{% {} %}}", *(stops.end() - 1)));
    return out;
  }

 private:
  static std::unique_ptr<Node> node(Node::Kind kind, int line) {
    auto n = std::make_unique<Node>();
    n->kind = kind;
    n->line = line;
    return n;
  }

  // The statement at segs_[pos_ - 1] with its first word consumed; returns after its end tag.
  ExprParser reopen() { return ExprParser(lex_tag(segs_[pos_].body, segs_[pos_].line)); }

  std::unique_ptr<Node> statement(const std::string& word, ExprParser& p, int line) {
    if (word == "if") {
      auto n = node(Node::Kind::kIf, line);
      n->conditions.push_back(p.expression());
      p.expect_end();
      for (;;) {
        std::string stop;
        n->bodies.push_back(body({"elif", "else", "endif"}, &stop));
        ExprParser q = reopen();
        q.expect_name();
        ++pos_;
        if (stop == "elif") {
          n->conditions.push_back(q.expression());
          q.expect_end();
        } else if (stop == "else") {
          q.expect_end();
          std::string end;
          n->bodies.push_back(body({"endif"}, &end));
          ++pos_;
          break;
        } else {
          break;
        }
      }
      return n;
    }
    if (word == "for") {
      auto n = node(Node::Kind::kFor, line);
      n->targets.push_back(p.expect_name());
      while (p.is_op(",")) {
        p.next();
        n->targets.push_back(p.expect_name());
      }
      if (!p.is_name("in")) fail(line, "expected 'in' in a for statement");
      p.next();
      n->expr = p.or_expr();  // not expression(): a trailing `if` is the loop filter, not a ternary
      if (p.is_name("if")) {
        p.next();
        n->filter = p.expression();
      }
      if (p.is_name("recursive")) fail(line, "recursive for loops are not supported");
      p.expect_end();
      std::string stop;
      n->bodies.push_back(body({"else", "endfor"}, &stop));
      ++pos_;
      if (stop == "else") {
        n->bodies.push_back(body({"endfor"}, &stop));
        ++pos_;
      }
      return n;
    }
    if (word == "set") {
      const std::string target = p.expect_name();
      std::string attr;
      if (p.is_op(".")) {
        p.next();
        attr = p.expect_name();
      }
      if (p.at_end()) {  // {% set x %}...{% endset %}
        auto n = node(Node::Kind::kSetBlock, line);
        n->text = target;
        std::string stop;
        n->bodies.push_back(body({"endset"}, &stop));
        ++pos_;
        return n;
      }
      auto n = node(Node::Kind::kSet, line);
      n->text = target;
      n->attr = attr;
      p.expect_op("=");
      n->expr = p.expression();
      p.expect_end();
      return n;
    }
    if (word == "macro") {
      auto n = node(Node::Kind::kMacro, line);
      n->text = p.expect_name();
      p.expect_op("(");
      while (!p.is_op(")")) {
        n->targets.push_back(p.expect_name());
        if (p.is_op("=")) {
          p.next();
          n->defaults.push_back(p.expression());
        } else {
          n->defaults.push_back(nullptr);
        }
        if (!p.is_op(")")) p.expect_op(",");
      }
      p.next();
      p.expect_end();
      std::string stop;
      n->bodies.push_back(body({"endmacro"}, &stop));
      ++pos_;
      return n;
    }
    if (word == "break" || word == "continue") {
      p.expect_end();
      return node(word == "break" ? Node::Kind::kBreak : Node::Kind::kContinue, line);
    }
    if (word == "generation" || word == "endgeneration") {  // transformers' assistant-mask markers: no output
      return node(Node::Kind::kText, line);
    }
    fail(line, fmt::format("statement '{}' is not supported (supported: if/elif/else, for, set, macro, break, "
                           "continue)", word));
  }

  std::vector<Segment> segs_;
  size_t pos_ = 0;
};

}  // namespace

Body parse_template(const std::string& source) {
  TemplateParser parser(split_segments(source));
  std::string stop;
  Body body = parser.body({}, &stop);
  return body;
}

}  // namespace moex::jinja
