// Filters, tests, string/dict/list methods and global functions of the chat-template interpreter: the
// ones the real templates of the supported families call, with Python/jinja2 behaviour.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <ctime>

#include "moex/core/error.h"
#include "moex/tokenizer/jinja_eval.h"

namespace moex::jinja {
namespace {

bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; }

std::string strip_chars(const std::string& s, const Value& chars, bool left, bool right) {
  auto drop = [&](char c) { return chars.is_string() ? chars.str().find(c) != std::string::npos : is_space(c); };
  size_t b = 0, e = s.size();
  if (left) while (b < e && drop(s[b])) ++b;
  if (right) while (e > b && drop(s[e - 1])) --e;
  return s.substr(b, e - b);
}

List split(const std::string& s, const Value& sep, int64_t maxsplit) {
  List out;
  if (!sep.is_string()) {  // Python split(): runs of whitespace, no empty pieces
    size_t pos = 0;
    while (pos < s.size()) {
      while (pos < s.size() && is_space(s[pos])) ++pos;
      if (pos >= s.size()) break;
      if (maxsplit >= 0 && static_cast<int64_t>(out.size()) == maxsplit) {
        size_t end = s.size();
        while (end > pos && is_space(s[end - 1])) --end;
        out.emplace_back(s.substr(pos, end - pos));
        break;
      }
      size_t end = pos;
      while (end < s.size() && !is_space(s[end])) ++end;
      out.emplace_back(s.substr(pos, end - pos));
      pos = end;
    }
    return out;
  }
  const std::string& d = sep.str();
  if (d.empty()) throw UsageError("chat template: split() separator is empty");
  size_t pos = 0;
  for (size_t hit; (maxsplit < 0 || static_cast<int64_t>(out.size()) < maxsplit) && (hit = s.find(d, pos)) != std::string::npos;
       pos = hit + d.size())
    out.emplace_back(s.substr(pos, hit - pos));
  out.emplace_back(s.substr(pos));
  return out;
}

std::string replace_all(std::string s, const std::string& from, const std::string& to, int64_t count) {
  if (from.empty()) return s;
  std::string out;
  size_t pos = 0;
  for (size_t hit; count != 0 && (hit = s.find(from, pos)) != std::string::npos; pos = hit + from.size(), --count)
    out += s.substr(pos, hit - pos) + to;
  return out + s.substr(pos);
}

std::string upper(std::string s) {
  for (char& c : s) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  return s;
}
std::string lower(std::string s) {
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}
std::string title(std::string s) {
  bool start = true;
  for (char& c : s) {
    const bool alpha = std::isalpha(static_cast<unsigned char>(c));
    c = static_cast<char>(start ? std::toupper(static_cast<unsigned char>(c)) : std::tolower(static_cast<unsigned char>(c)));
    start = !alpha;
  }
  return s;
}
std::string capitalize(std::string s) {
  s = lower(std::move(s));
  if (!s.empty()) s[0] = static_cast<char>(std::toupper(static_cast<unsigned char>(s[0])));
  return s;
}

bool prefix_test(const std::string& s, const Value& arg, bool ends) {
  auto one = [&](const Value& p) {
    if (!p.is_string()) return false;
    return ends ? s.ends_with(p.str()) : s.starts_with(p.str());
  };
  if (arg.is_list()) return std::any_of(arg.list().begin(), arg.list().end(), one);
  return one(arg);
}

Value attr_of(const Value& v, const std::string& path) {
  Value cur = v;
  size_t pos = 0;
  while (pos <= path.size()) {
    const size_t dot = path.find('.', pos);
    const std::string key = path.substr(pos, dot == std::string::npos ? std::string::npos : dot - pos);
    const Value* next = cur.find(key);
    cur = next ? *next : Value();
    if (dot == std::string::npos) break;
    pos = dot + 1;
  }
  return cur;
}

Value bound(Function f) { return Value(std::move(f)); }

const Value& need_string(const Value& v, const char* what, int line) {
  if (!v.is_string()) runtime_error(line, fmt::format("{} expects a string, found {}", what, v.type_name()));
  return v;
}

}  // namespace

Value get_method(const Value& self, const std::string& name) {
  if (self.is_string()) {
    const std::string s = self.str();
    if (name == "strip" || name == "lstrip" || name == "rstrip")
      return bound([s, name](CallArgs& c) {
        return Value(strip_chars(s, c.get(0, "chars"), name != "rstrip", name != "lstrip"));
      });
    if (name == "split") return bound([s](CallArgs& c) { return Value(split(s, c.get(0, "sep"), c.get(1, "maxsplit", Value(int64_t{-1})).as_int())); });
    if (name == "startswith") return bound([s](CallArgs& c) { return Value(prefix_test(s, c.get(0, "prefix"), false)); });
    if (name == "endswith") return bound([s](CallArgs& c) { return Value(prefix_test(s, c.get(0, "suffix"), true)); });
    if (name == "upper") return bound([s](CallArgs&) { return Value(upper(s)); });
    if (name == "lower") return bound([s](CallArgs&) { return Value(lower(s)); });
    if (name == "title") return bound([s](CallArgs&) { return Value(title(s)); });
    if (name == "capitalize") return bound([s](CallArgs&) { return Value(capitalize(s)); });
    if (name == "replace")
      return bound([s](CallArgs& c) {
        return Value(replace_all(s, c.get(0, "old").to_str(), c.get(1, "new").to_str(), c.get(2, "count", Value(int64_t{-1})).as_int()));
      });
    if (name == "find") return bound([s](CallArgs& c) {
      const size_t pos = s.find(c.get(0, "sub").to_str());
      return Value(pos == std::string::npos ? int64_t{-1} : static_cast<int64_t>(pos));
    });
    if (name == "join") return bound([s](CallArgs& c) {
      const Value items = c.get(0, "iterable");
      std::string out;
      if (items.is_list())
        for (size_t k = 0; k < items.list().size(); ++k) out += (k ? s : "") + items.list()[k].to_str();
      return Value(out);
    });
    if (name == "splitlines") return bound([s](CallArgs&) {
      List out;
      size_t pos = 0;
      while (pos < s.size()) {
        size_t end = s.find('\n', pos);
        if (end == std::string::npos) end = s.size();
        std::string line = s.substr(pos, end - pos);
        if (!line.empty() && line.back() == '\r') line.pop_back();
        out.emplace_back(line);
        pos = end + 1;
      }
      return Value(std::move(out));
    });
    if (name == "isdigit") return bound([s](CallArgs&) {
      return Value(!s.empty() && std::all_of(s.begin(), s.end(), [](char ch) { return ch >= '0' && ch <= '9'; }));
    });
    if (name == "isspace") return bound([s](CallArgs&) { return Value(!s.empty() && std::all_of(s.begin(), s.end(), is_space)); });
  }
  if (self.is_dict()) {
    if (name == "items") return bound([self](CallArgs&) {
      List out;
      for (const auto& [k, v] : self.dict()) out.emplace_back(List{Value(k), v});
      return Value(std::move(out));
    });
    if (name == "keys") return bound([self](CallArgs&) {
      List out;
      for (const auto& [k, v] : self.dict()) out.emplace_back(k);
      return Value(std::move(out));
    });
    if (name == "values") return bound([self](CallArgs&) {
      List out;
      for (const auto& [k, v] : self.dict()) out.push_back(v);
      return Value(std::move(out));
    });
    if (name == "get") return bound([self](CallArgs& c) {
      const Value* v = self.find(c.get(0, "key").to_str());
      return v ? *v : c.get(1, "default", Value::none());
    });
  }
  if (self.is_list()) {
    if (name == "append") return bound([self](CallArgs& c) {
      self.list().push_back(c.get(0, "item"));
      return Value::none();
    });
  }
  return Value();
}

Value global_function(const std::string& name) {
  if (name == "raise_exception")
    return bound([](CallArgs& c) -> Value {
      throw UsageError("chat template rejected the messages: " + c.get(0, "message").to_str());
    });
  if (name == "namespace" || name == "dict")
    return bound([](CallArgs& c) {
      Value ns{Dict{}};
      for (const Value& a : c.args)
        if (a.is_dict()) for (const auto& [k, v] : a.dict()) ns.set(k, v);
      for (const auto& [k, v] : c.kwargs) ns.set(k, v);
      return ns;
    });
  if (name == "range")
    return bound([](CallArgs& c) {
      int64_t start = 0, stop = 0, step = 1;
      if (c.args.size() == 1) stop = c.args[0].as_int();
      else if (c.args.size() >= 2) start = c.args[0].as_int(), stop = c.args[1].as_int();
      if (c.args.size() >= 3) step = c.args[2].as_int();
      if (step == 0) throw UsageError("chat template: range() step must not be zero");
      List out;
      for (int64_t i = start; step > 0 ? i < stop : i > stop; i += step) out.emplace_back(i);
      return Value(std::move(out));
    });
  if (name == "strftime_now")
    return bound([](CallArgs& c) {
      const std::time_t now = std::chrono::system_clock::to_time_t(std::chrono::system_clock::now());
      std::tm tm{};
      localtime_r(&now, &tm);
      char buf[128];
      const size_t n = std::strftime(buf, sizeof(buf), c.get(0, "format").to_str().c_str(), &tm);
      return Value(std::string(buf, n));
    });
  return Value();
}

bool apply_test(const std::string& name, const Value& v, CallArgs& c, int line) {
  using K = Value::Kind;
  if (name == "defined") return !v.is_undefined();
  if (name == "undefined") return v.is_undefined();
  if (name == "none") return v.is_none();
  if (name == "string") return v.is_string();
  if (name == "number") return v.is_number();
  if (name == "integer") return v.kind() == K::kInt;
  if (name == "float") return v.kind() == K::kFloat;
  if (name == "boolean") return v.kind() == K::kBool;
  if (name == "true") return v.kind() == K::kBool && v.as_bool();
  if (name == "false") return v.kind() == K::kBool && !v.as_bool();
  if (name == "mapping") return v.is_dict();
  if (name == "sequence") return v.is_list() || v.is_string() || v.is_dict();
  if (name == "iterable") return v.is_list() || v.is_string() || v.is_dict();
  if (name == "callable") return v.kind() == K::kFunction;
  if (name == "odd") return v.as_int() % 2 != 0;
  if (name == "even") return v.as_int() % 2 == 0;
  if (name == "divisibleby") return c.get(0, "num").as_int() != 0 && v.as_int() % c.get(0, "num").as_int() == 0;
  if (name == "lower") return v.is_string() && lower(v.str()) == v.str();
  if (name == "upper") return v.is_string() && upper(v.str()) == v.str();
  if (name == "equalto" || name == "eq" || name == "==" || name == "sameas") return equals(v, c.get(0, "other"));
  if (name == "ne" || name == "!=") return !equals(v, c.get(0, "other"));
  if (name == "lt" || name == "lessthan") return compare(v, c.get(0, "other")) < 0;
  if (name == "gt" || name == "greaterthan") return compare(v, c.get(0, "other")) > 0;
  if (name == "le") return compare(v, c.get(0, "other")) <= 0;
  if (name == "ge") return compare(v, c.get(0, "other")) >= 0;
  if (name == "in") {
    const Value seq = c.get(0, "seq");
    if (seq.is_list()) return std::any_of(seq.list().begin(), seq.list().end(), [&](const Value& x) { return equals(v, x); });
    if (seq.is_string()) return v.is_string() && seq.str().find(v.str()) != std::string::npos;
    if (seq.is_dict()) return v.is_string() && seq.find(v.str());
    return false;
  }
  runtime_error(line, fmt::format("test '{}' is not supported", name));
}

Value apply_filter(const std::string& name, Value v, CallArgs& c, int line) {
  if (name == "trim" || name == "strip") return Value(strip_chars(need_string(v, "trim", line).str(), c.get(0, "chars"), true, true));
  if (name == "length" || name == "count") {
    if (v.is_string()) return Value(v.str().size());
    if (v.is_list()) return Value(v.list().size());
    if (v.is_dict()) return Value(v.dict().size());
    if (v.is_undefined()) return Value(int64_t{0});
    runtime_error(line, fmt::format("length of a {} is undefined", v.type_name()));
  }
  if (name == "tojson") {
    const Value indent = c.get(0, "indent");
    return Value(v.to_json(indent.is_number() ? static_cast<int>(indent.as_int()) : -1));
  }
  if (name == "string") return Value(v.to_str());
  if (name == "upper") return Value(upper(v.to_str()));
  if (name == "lower") return Value(lower(v.to_str()));
  if (name == "title") return Value(title(v.to_str()));
  if (name == "capitalize") return Value(capitalize(v.to_str()));
  if (name == "safe") return v;
  if (name == "int") {
    if (v.is_string()) {
      try { return Value(static_cast<int64_t>(std::stoll(v.str()))); } catch (...) { return c.get(0, "default", Value(int64_t{0})); }
    }
    return v.is_number() || v.kind() == Value::Kind::kBool ? Value(v.as_int()) : c.get(0, "default", Value(int64_t{0}));
  }
  if (name == "float") {
    if (v.is_string()) {
      try { return Value(std::stod(v.str())); } catch (...) { return Value(0.0); }
    }
    return Value(v.as_float());
  }
  if (name == "abs") return v.kind() == Value::Kind::kFloat ? Value(std::fabs(v.as_float())) : Value(static_cast<int64_t>(std::llabs(v.as_int())));
  if (name == "round") {
    const double p = std::pow(10.0, static_cast<double>(c.get(0, "precision", Value(int64_t{0})).as_int()));
    return Value(std::round(v.as_float() * p) / p);
  }
  if (name == "default" || name == "d") {
    const bool boolean = c.get(1, "boolean", Value(false)).truthy();
    return (v.is_undefined() || (boolean && !v.truthy())) ? c.get(0, "default_value", Value(std::string())) : v;
  }
  if (name == "first" || name == "last") {
    if (v.is_list()) return v.list().empty() ? Value() : (name == "first" ? v.list().front() : v.list().back());
    if (v.is_string()) return v.str().empty() ? Value() : Value(std::string(1, name == "first" ? v.str().front() : v.str().back()));
    runtime_error(line, fmt::format("{} of a {} is undefined", name, v.type_name()));
  }
  if (name == "list") {
    if (v.is_list()) return v;
    List out;
    if (v.is_string()) for (char ch : v.str()) out.emplace_back(std::string(1, ch));
    if (v.is_dict()) for (const auto& [k, x] : v.dict()) out.emplace_back(k);
    return Value(std::move(out));
  }
  if (name == "items") {
    if (!v.is_dict()) runtime_error(line, fmt::format("items expects a dict, found {}", v.type_name()));
    CallArgs none;
    return get_method(v, "items").fn()(none);
  }
  if (name == "reverse") {
    if (v.is_string()) return Value(std::string(v.str().rbegin(), v.str().rend()));
    if (v.is_list()) return Value(List(v.list().rbegin(), v.list().rend()));
  }
  if (name == "join") {
    const std::string sep = c.get(0, "d", Value(std::string())).to_str();
    const Value attribute = c.get(1, "attribute");
    std::string out;
    if (v.is_list())
      for (size_t k = 0; k < v.list().size(); ++k)
        out += (k ? sep : "") + (attribute.is_string() ? attr_of(v.list()[k], attribute.str()) : v.list()[k]).to_str();
    return Value(out);
  }
  if (name == "replace")
    return Value(replace_all(v.to_str(), c.get(0, "old").to_str(), c.get(1, "new").to_str(), c.get(2, "count", Value(int64_t{-1})).as_int()));
  if (name == "indent") {
    const Value width = c.get(0, "width", Value(int64_t{4}));
    const std::string pad = width.is_string() ? width.str() : std::string(static_cast<size_t>(width.as_int()), ' ');
    const bool first = c.get(1, "first", Value(false)).truthy(), blank = c.get(2, "blank", Value(false)).truthy();
    const List lines = split(v.to_str(), Value("\n"), -1);
    std::string out;
    for (size_t k = 0; k < lines.size(); ++k) {
      const std::string& l = lines[k].str();
      if (k) out += "\n";
      if ((k > 0 || first) && (blank || !l.empty())) out += pad;
      out += l;
    }
    return Value(out);
  }
  if (name == "map" || name == "select" || name == "reject" || name == "selectattr" || name == "rejectattr" || name == "unique") {
    if (!v.is_list()) return Value(List{});
    List out;
    for (const Value& item : v.list()) {
      if (name == "map") {
        const Value attribute = c.get(99, "attribute");
        if (attribute.is_string()) {
          Value got = attr_of(item, attribute.str());
          out.push_back(got.is_undefined() ? c.get(99, "default") : got);
        } else {
          CallArgs rest{std::vector<Value>(c.args.begin() + (c.args.empty() ? 0 : 1), c.args.end()), {}};
          out.push_back(apply_filter(c.get(0, "filter").to_str(), item, rest, line));
        }
      } else if (name == "unique") {
        if (std::none_of(out.begin(), out.end(), [&](const Value& x) { return equals(x, item); })) out.push_back(item);
      } else {
        const bool by_attr = name.ends_with("attr");
        const Value subject = by_attr ? attr_of(item, c.get(0, "attribute").to_str()) : item;
        const size_t test_at = by_attr ? 1 : 0;
        bool ok;
        if (test_at < c.args.size()) {
          CallArgs rest{std::vector<Value>(c.args.begin() + static_cast<ptrdiff_t>(test_at) + 1, c.args.end()), {}};
          ok = apply_test(c.args[test_at].to_str(), subject, rest, line);
        } else {
          ok = subject.truthy();
        }
        if (ok == name.starts_with("select")) out.push_back(item);
      }
    }
    return Value(std::move(out));
  }
  if (name == "sum") {
    Value total(int64_t{0});
    if (v.is_list())
      for (const Value& x : v.list()) total = total.kind() == Value::Kind::kInt && x.kind() == Value::Kind::kInt ? Value(total.as_int() + x.as_int()) : Value(total.as_float() + x.as_float());
    return total;
  }
  runtime_error(line, fmt::format("filter '{}' is not supported", name));
}

}  // namespace moex::jinja
