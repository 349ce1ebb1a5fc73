// Tree-walking interpreter for the Jinja subset. Scopes follow jinja2: a for loop (and a macro call) opens
// a scope whose `set`s vanish at its end, which is why templates carry state in namespace() objects.
#include "moex/tokenizer/jinja_eval.h"

#include <cmath>
#include <unordered_map>

#include "moex/core/error.h"

namespace moex::jinja {

void runtime_error(int line, const std::string& what) {
  throw UsageError(fmt::format("chat template: line {}: {}", line, what));
}

namespace {

enum class Flow { kNormal, kBreak, kContinue };

class Interpreter {
 public:
  explicit Interpreter(const Value& globals) {
    scopes_.emplace_back();
    for (const auto& [k, v] : globals.dict()) scopes_.back()[k] = v;
  }

  Flow run(const Body& body, std::string& out) {
    for (const auto& node : body) {
      const Flow flow = exec(*node, out);
      if (flow != Flow::kNormal) return flow;
    }
    return Flow::kNormal;
  }

 private:
  Value lookup(const std::string& name) const {
    for (auto it = scopes_.rbegin(); it != scopes_.rend(); ++it) {
      auto found = it->find(name);
      if (found != it->end()) return found->second;
    }
    return global_function(name);
  }

  Flow exec(const Node& n, std::string& out) {
    switch (n.kind) {
      case Node::Kind::kText: out += n.text; return Flow::kNormal;
      case Node::Kind::kOutput: out += eval(*n.expr).to_str(); return Flow::kNormal;
      case Node::Kind::kIf:
        for (size_t idx = 0; idx < n.conditions.size(); ++idx)
          if (eval(*n.conditions[idx]).truthy()) return run(n.bodies[idx], out);
        if (n.bodies.size() > n.conditions.size()) return run(n.bodies.back(), out);
        return Flow::kNormal;
      case Node::Kind::kFor: exec_for(n, out); return Flow::kNormal;
      case Node::Kind::kSet: {
        Value v = eval(*n.expr);
        if (n.attr.empty()) {
          scopes_.back()[n.text] = std::move(v);
        } else {
          const Value target = lookup(n.text);
          if (!target.is_dict()) runtime_error(n.line, fmt::format("cannot set attribute '{}' of {} '{}'", n.attr, target.type_name(), n.text));
          target.set(n.attr, std::move(v));
        }
        return Flow::kNormal;
      }
      case Node::Kind::kSetBlock: {
        std::string captured;
        run(n.bodies[0], captured);
        scopes_.back()[n.text] = Value(std::move(captured));
        return Flow::kNormal;
      }
      case Node::Kind::kMacro: scopes_.back()[n.text] = make_macro(n); return Flow::kNormal;
      case Node::Kind::kBreak: return Flow::kBreak;
      case Node::Kind::kContinue: return Flow::kContinue;
    }
    return Flow::kNormal;
  }

  Value make_macro(const Node& n) {
    return Value(Function([this, &n](CallArgs& call) -> Value {
      scopes_.emplace_back();
      for (size_t idx = 0; idx < n.targets.size(); ++idx) {
        Value v = call.get(idx, n.targets[idx].c_str());
        if (v.is_undefined() && n.defaults[idx]) v = eval(*n.defaults[idx]);
        scopes_.back()[n.targets[idx]] = v;
      }
      std::string out;
      run(n.bodies[0], out);
      scopes_.pop_back();
      return Value(std::move(out));
    }));
  }

  void exec_for(const Node& n, std::string& out) {
    const Value iterable = eval(*n.expr);
    List items;
    if (iterable.is_list()) items = iterable.list();
    else if (iterable.is_dict()) for (const auto& [k, v] : iterable.dict()) items.emplace_back(k);
    else if (iterable.is_string()) for (char c : iterable.str()) items.emplace_back(std::string(1, c));
    else if (!iterable.is_undefined() && !iterable.is_none())
      runtime_error(n.line, fmt::format("cannot loop over a {}", iterable.type_name()));
    scopes_.emplace_back();
    auto bind = [&](const Value& item) {
      if (n.targets.size() == 1) {
        scopes_.back()[n.targets[0]] = item;
        return;
      }
      if (!item.is_list() || item.list().size() != n.targets.size())
        runtime_error(n.line, fmt::format("cannot unpack {} into {} loop variables", item.repr(), n.targets.size()));
      for (size_t k = 0; k < n.targets.size(); ++k) scopes_.back()[n.targets[k]] = item.list()[k];
    };
    if (n.filter) {
      List kept;
      for (const Value& item : items) {
        bind(item);
        if (eval(*n.filter).truthy()) kept.push_back(item);
      }
      items = std::move(kept);
    }
    const size_t count = items.size();
    for (size_t idx = 0; idx < count; ++idx) {
      bind(items[idx]);
      Dict loop{{"index", Value(idx + 1)}, {"index0", Value(idx)}, {"first", Value(idx == 0)},
                {"last", Value(idx + 1 == count)}, {"length", Value(count)}, {"revindex", Value(count - idx)},
                {"revindex0", Value(count - idx - 1)},
                {"previtem", idx > 0 ? items[idx - 1] : Value()},
                {"nextitem", idx + 1 < count ? items[idx + 1] : Value()}};
      const size_t at = idx;
      loop.emplace_back("cycle", Value(Function([at](CallArgs& c) -> Value {
                          return c.args.empty() ? Value() : c.args[at % c.args.size()];
                        })));
      scopes_.back()["loop"] = Value(std::move(loop));
      if (run(n.bodies[0], out) == Flow::kBreak) break;
    }
    if (count == 0 && n.bodies.size() > 1) run(n.bodies[1], out);
    scopes_.pop_back();
  }

  CallArgs eval_args(const Expr& e, size_t first) {
    CallArgs call;
    const size_t num_kw = e.kwnames.size();
    const size_t num_pos = e.args.size() - first - num_kw;
    for (size_t k = 0; k < num_pos; ++k) call.args.push_back(eval(*e.args[first + k]));
    for (size_t k = 0; k < num_kw; ++k) call.kwargs.emplace_back(e.kwnames[k], eval(*e.args[first + num_pos + k]));
    return call;
  }

  static int64_t norm_index(int64_t i, int64_t size) { return i < 0 ? i + size : i; }

  Value item(const Value& obj, const Value& key, int line) {
    if (obj.is_dict()) {
      const Value* v = obj.find(key.is_string() ? key.str() : key.to_str());
      return v ? *v : Value();
    }
    if (obj.is_list() || obj.is_string()) {
      if (!key.is_number()) runtime_error(line, fmt::format("index of a {} must be an integer, found {}", obj.type_name(), key.type_name()));
      const int64_t size = obj.is_list() ? static_cast<int64_t>(obj.list().size()) : static_cast<int64_t>(obj.str().size());
      const int64_t i = norm_index(key.as_int(), size);
      if (i < 0 || i >= size) return Value();
      return obj.is_list() ? obj.list()[static_cast<size_t>(i)] : Value(obj.str().substr(static_cast<size_t>(i), 1));
    }
    if (obj.is_undefined()) runtime_error(line, fmt::format("cannot index an undefined value with {}", key.repr()));
    return Value();
  }

  Value slice(const Value& obj, const Expr& e) {
    const int64_t size = obj.is_list() ? static_cast<int64_t>(obj.list().size())
                         : obj.is_string() ? static_cast<int64_t>(obj.str().size())
                                           : (runtime_error(e.line, fmt::format("cannot slice a {}", obj.type_name())), 0);
    const int64_t step = e.args[3] ? eval(*e.args[3]).as_int() : 1;
    if (step == 0) runtime_error(e.line, "slice step cannot be zero");
    auto bound = [&](const ExprPtr& x, int64_t fallback) {
      if (!x) return fallback;
      int64_t v = eval(*x).as_int();
      if (v < 0) v += size;
      return step > 0 ? std::clamp<int64_t>(v, 0, size) : std::clamp<int64_t>(v, -1, size - 1);
    };
    const int64_t start = bound(e.args[1], step > 0 ? 0 : size - 1);
    const int64_t stop = bound(e.args[2], step > 0 ? size : -1);
    List list_out;
    std::string str_out;
    for (int64_t i = start; step > 0 ? i < stop : i > stop; i += step) {
      if (obj.is_list()) list_out.push_back(obj.list()[static_cast<size_t>(i)]);
      else str_out += obj.str()[static_cast<size_t>(i)];
    }
    return obj.is_list() ? Value(std::move(list_out)) : Value(std::move(str_out));
  }

  Value binary(const std::string& op, const Value& a, const Value& b, int line) {
    if (op == "~") return Value(a.to_str() + b.to_str());
    if (op == "==") return Value(equals(a, b));
    if (op == "!=") return Value(!equals(a, b));
    if (op == "<") return Value(compare(a, b) < 0);
    if (op == ">") return Value(compare(a, b) > 0);
    if (op == "<=") return Value(compare(a, b) <= 0);
    if (op == ">=") return Value(compare(a, b) >= 0);
    if (op == "in" || op == "not in") {
      bool found = false;
      if (b.is_string()) {
        if (!a.is_string()) runtime_error(line, fmt::format("'in <string>' needs a string on the left, found {}", a.type_name()));
        found = b.str().find(a.str()) != std::string::npos;
      } else if (b.is_list()) {
        for (const Value& v : b.list()) found = found || equals(a, v);
      } else if (b.is_dict()) {
        found = a.is_string() && b.find(a.str()) != nullptr;
      } else if (!b.is_undefined()) {
        runtime_error(line, fmt::format("'in' needs a string, list or dict on the right, found {}", b.type_name()));
      }
      return Value(op == "in" ? found : !found);
    }
    if (op == "+") {
      if (a.is_string() && b.is_string()) return Value(a.str() + b.str());
      if (a.is_list() && b.is_list()) {
        List l = a.list();
        l.insert(l.end(), b.list().begin(), b.list().end());
        return Value(std::move(l));
      }
    }
    if (op == "*" && a.is_string() && b.is_number()) {
      std::string s;
      for (int64_t k = 0; k < b.as_int(); ++k) s += a.str();
      return Value(std::move(s));
    }
    const bool numeric = (a.is_number() || a.kind() == Value::Kind::kBool) && (b.is_number() || b.kind() == Value::Kind::kBool);
    if (!numeric)
      runtime_error(line, fmt::format("unsupported operand types for {}: {} and {}", op, a.type_name(), b.type_name()));
    const bool ints = a.kind() != Value::Kind::kFloat && b.kind() != Value::Kind::kFloat;
    const double x = a.as_float(), y = b.as_float();
    if ((op == "/" || op == "//" || op == "%") && y == 0) runtime_error(line, "division by zero");
    if (op == "+") return ints ? Value(a.as_int() + b.as_int()) : Value(x + y);
    if (op == "-") return ints ? Value(a.as_int() - b.as_int()) : Value(x - y);
    if (op == "*") return ints ? Value(a.as_int() * b.as_int()) : Value(x * y);
    if (op == "/") return Value(x / y);
    if (op == "//") return ints ? Value(static_cast<int64_t>(std::floor(x / y))) : Value(std::floor(x / y));
    if (op == "%") {
      if (ints) {
        const int64_t m = a.as_int() % b.as_int();
        return Value(m != 0 && ((m < 0) != (b.as_int() < 0)) ? m + b.as_int() : m);
      }
      return Value(x - y * std::floor(x / y));
    }
    if (op == "**") return ints && b.as_int() >= 0 ? Value(static_cast<int64_t>(std::llround(std::pow(x, y)))) : Value(std::pow(x, y));
    runtime_error(line, "unknown operator " + op);
  }

  Value eval(const Expr& e) {
    switch (e.kind) {
      case Expr::Kind::kLiteral: return e.literal;
      case Expr::Kind::kName: return lookup(e.name);
      case Expr::Kind::kList: {
        List l;
        for (const auto& a : e.args) l.push_back(eval(*a));
        return Value(std::move(l));
      }
      case Expr::Kind::kDict: {
        Value d{Dict{}};
        for (size_t k = 0; k + 1 < e.args.size(); k += 2) d.set(eval(*e.args[k]).to_str(), eval(*e.args[k + 1]));
        return d;
      }
      case Expr::Kind::kAttr: {
        const Value obj = eval(*e.args[0]);
        if (obj.is_dict()) {
          if (const Value* v = obj.find(e.name)) return *v;
        }
        if (obj.is_undefined())
          runtime_error(e.line, fmt::format("cannot read attribute '{}' of an undefined value", e.name));
        return get_method(obj, e.name);
      }
      case Expr::Kind::kItem: return item(eval(*e.args[0]), eval(*e.args[1]), e.line);
      case Expr::Kind::kSlice: return slice(eval(*e.args[0]), e);
      case Expr::Kind::kCall: {
        const Value callee = eval(*e.args[0]);
        CallArgs call = eval_args(e, 1);
        if (callee.kind() != Value::Kind::kFunction) {
          const std::string what = e.args[0]->kind == Expr::Kind::kName || e.args[0]->kind == Expr::Kind::kAttr
                                       ? "'" + e.args[0]->name + "'"
                                       : std::string("this value");
          runtime_error(e.line, fmt::format("{} is not callable ({})", what, callee.type_name()));
        }
        return callee.fn()(call);
      }
      case Expr::Kind::kFilter: {
        Value v = eval(*e.args[0]);
        CallArgs call = eval_args(e, 1);
        return apply_filter(e.name, std::move(v), call, e.line);
      }
      case Expr::Kind::kTest: {
        const Value v = eval(*e.args[0]);
        CallArgs call = eval_args(e, 1);
        return Value(apply_test(e.name, v, call, e.line) != e.negated);
      }
      case Expr::Kind::kNot: return Value(!eval(*e.args[0]).truthy());
      case Expr::Kind::kNeg: {
        const Value v = eval(*e.args[0]);
        if (v.kind() == Value::Kind::kInt) return Value(-v.as_int());
        if (v.kind() == Value::Kind::kFloat) return Value(-v.as_float());
        runtime_error(e.line, fmt::format("cannot negate a {}", v.type_name()));
      }
      case Expr::Kind::kBinary: return binary(e.name, eval(*e.args[0]), eval(*e.args[1]), e.line);
      case Expr::Kind::kAnd: {
        Value a = eval(*e.args[0]);
        return a.truthy() ? eval(*e.args[1]) : a;
      }
      case Expr::Kind::kOr: {
        Value a = eval(*e.args[0]);
        return a.truthy() ? a : eval(*e.args[1]);
      }
      case Expr::Kind::kTernary: return eval(*e.args[1]).truthy() ? eval(*e.args[0]) : eval(*e.args[2]);
    }
    return Value();
  }

  std::vector<std::unordered_map<std::string, Value>> scopes_;
};

}  // namespace

std::string render(const Body& body, const Value& globals) {
  Interpreter interp(globals);
  std::string out;
  interp.run(body, out);
  return out;
}

}  // namespace moex::jinja
