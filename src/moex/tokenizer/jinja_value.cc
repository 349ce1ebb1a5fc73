// Python semantics of template values: str(), repr(), json.dumps, ==, ordering, truthiness.
#include "moex/tokenizer/jinja_value.h"

#include <cmath>
#include <cstdio>

#include <nlohmann/json.hpp>

#include "moex/core/error.h"

namespace moex::jinja {
namespace {

std::string float_repr(double f) {
  if (std::isnan(f)) return "nan";
  if (std::isinf(f)) return f > 0 ? "inf" : "-inf";
  char buf[32];
  for (int precision = 1; precision <= 17; ++precision) {  // shortest round-trip, as Python's repr
    std::snprintf(buf, sizeof(buf), "%.*g", precision, f);
    if (std::strtod(buf, nullptr) == f) break;
  }
  std::string s = buf;
  if (s.find_first_of(".en") == std::string::npos) s += ".0";
  return s;
}

std::string json_string(const std::string& s) {
  std::string out = "\"";
  for (unsigned char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof(buf), "\\u%04x", c);
          out += buf;
        } else {
          out.push_back(static_cast<char>(c));
        }
    }
  }
  return out + "\"";
}

std::string py_string_repr(const std::string& s) {
  const bool use_double = s.find('\'') != std::string::npos && s.find('"') == std::string::npos;
  const char q = use_double ? '"' : '\'';
  std::string out(1, q);
  for (char c : s) {
    if (c == q || c == '\\') out += '\\', out += c;
    else if (c == '\n') out += "\\n";
    else if (c == '\t') out += "\\t";
    else if (c == '\r') out += "\\r";
    else out += c;
  }
  return out + q;
}

Value from_json(const nlohmann::ordered_json& j) {
  switch (j.type()) {
    case nlohmann::ordered_json::value_t::null: return Value::none();
    case nlohmann::ordered_json::value_t::boolean: return Value(j.get<bool>());
    case nlohmann::ordered_json::value_t::number_integer:
    case nlohmann::ordered_json::value_t::number_unsigned: return Value(j.get<int64_t>());
    case nlohmann::ordered_json::value_t::number_float: return Value(j.get<double>());
    case nlohmann::ordered_json::value_t::string: return Value(j.get<std::string>());
    case nlohmann::ordered_json::value_t::array: {
      List l;
      for (const auto& e : j) l.push_back(from_json(e));
      return Value(std::move(l));
    }
    case nlohmann::ordered_json::value_t::object: {
      Dict d;
      for (auto it = j.begin(); it != j.end(); ++it) d.emplace_back(it.key(), from_json(it.value()));
      return Value(std::move(d));
    }
    default: return Value();
  }
}

}  // namespace

Value* Value::find(const std::string& key) const {
  if (kind_ != Kind::kDict) return nullptr;
  for (auto& [k, v] : *dict_)
    if (k == key) return &v;
  return nullptr;
}

void Value::set(const std::string& key, Value v) const {
  if (Value* slot = find(key)) *slot = std::move(v);
  else dict_->emplace_back(key, std::move(v));
}

bool Value::truthy() const {
  switch (kind_) {
    case Kind::kUndefined:
    case Kind::kNone: return false;
    case Kind::kBool:
    case Kind::kInt: return int_ != 0;
    case Kind::kFloat: return float_ != 0;
    case Kind::kString: return !str_->empty();
    case Kind::kList: return !list_->empty();
    case Kind::kDict: return !dict_->empty();
    case Kind::kFunction: return true;
  }
  return false;
}

std::string Value::type_name() const {
  switch (kind_) {
    case Kind::kUndefined: return "undefined";
    case Kind::kNone: return "none";
    case Kind::kBool: return "bool";
    case Kind::kInt: return "int";
    case Kind::kFloat: return "float";
    case Kind::kString: return "string";
    case Kind::kList: return "list";
    case Kind::kDict: return "dict";
    case Kind::kFunction: return "function";
  }
  return "?";
}

std::string Value::to_str() const {
  switch (kind_) {
    case Kind::kUndefined: return "";
    case Kind::kString: return *str_;
    default: return repr();
  }
}

std::string Value::repr() const {
  switch (kind_) {
    case Kind::kUndefined: return "";
    case Kind::kNone: return "None";
    case Kind::kBool: return int_ ? "True" : "False";
    case Kind::kInt: return std::to_string(int_);
    case Kind::kFloat: return float_repr(float_);
    case Kind::kString: return py_string_repr(*str_);
    case Kind::kList: {
      std::string s = "[";
      for (size_t idx = 0; idx < list_->size(); ++idx) {
        if (idx) s += ", ";
        s += (*list_)[idx].repr();
      }
      return s + "]";
    }
    case Kind::kDict: {
      std::string s = "{";
      for (size_t idx = 0; idx < dict_->size(); ++idx) {
        if (idx) s += ", ";
        s += py_string_repr((*dict_)[idx].first);
        s += ": ";
        s += (*dict_)[idx].second.repr();
      }
      return s + "}";
    }
    case Kind::kFunction: return "<function>";
  }
  return "";
}

std::string Value::to_json(int indent, int depth) const {
  std::string nl, close_nl;  // appended, not built with operator+ (GCC 12 -Wrestrict false positive)
  if (indent >= 0) {
    nl.push_back('\n');
    nl.append(static_cast<size_t>(indent * (depth + 1)), ' ');
    close_nl.push_back('\n');
    close_nl.append(static_cast<size_t>(indent * depth), ' ');
  }
  const std::string sep = indent >= 0 ? "," : ", ";
  switch (kind_) {
    case Kind::kUndefined:
    case Kind::kNone: return "null";
    case Kind::kBool: return int_ ? "true" : "false";
    case Kind::kInt: return std::to_string(int_);
    case Kind::kFloat: return std::isfinite(float_) ? float_repr(float_) : (std::isnan(float_) ? "NaN" : float_ > 0 ? "Infinity" : "-Infinity");
    case Kind::kString: return json_string(*str_);
    case Kind::kList: {
      if (list_->empty()) return "[]";
      std::string s = "[";
      for (size_t idx = 0; idx < list_->size(); ++idx) {
        if (idx) s += sep;
        s += nl;
        s += (*list_)[idx].to_json(indent, depth + 1);
      }
      return s + close_nl + "]";
    }
    case Kind::kDict: {
      if (dict_->empty()) return "{}";
      std::string s = "{";
      for (size_t idx = 0; idx < dict_->size(); ++idx) {
        if (idx) s += sep;
        s += nl;
        s += json_string((*dict_)[idx].first);
        s += ": ";
        s += (*dict_)[idx].second.to_json(indent, depth + 1);
      }
      return s + close_nl + "}";
    }
    case Kind::kFunction: throw UsageError("chat template: tojson cannot serialize a function");
  }
  return "null";
}

bool equals(const Value& a, const Value& b) {
  if (a.is_number() && b.is_number()) return a.as_float() == b.as_float();
  if ((a.kind() == Value::Kind::kBool) != (b.kind() == Value::Kind::kBool)) {
    // Python: True == 1; keep it for numbers only
    if (a.kind() == Value::Kind::kBool && b.is_number()) return static_cast<double>(a.as_bool()) == b.as_float();
    if (b.kind() == Value::Kind::kBool && a.is_number()) return static_cast<double>(b.as_bool()) == a.as_float();
    return false;
  }
  if (a.kind() != b.kind()) return false;
  switch (a.kind()) {
    case Value::Kind::kUndefined:
    case Value::Kind::kNone: return true;
    case Value::Kind::kBool: return a.as_bool() == b.as_bool();
    case Value::Kind::kString: return a.str() == b.str();
    case Value::Kind::kList: {
      if (a.list().size() != b.list().size()) return false;
      for (size_t idx = 0; idx < a.list().size(); ++idx)
        if (!equals(a.list()[idx], b.list()[idx])) return false;
      return true;
    }
    case Value::Kind::kDict: {
      if (a.dict().size() != b.dict().size()) return false;
      for (const auto& [k, v] : a.dict()) {
        const Value* other = b.find(k);
        if (!other || !equals(v, *other)) return false;
      }
      return true;
    }
    default: return false;
  }
}

int compare(const Value& a, const Value& b) {
  if ((a.is_number() || a.kind() == Value::Kind::kBool) && (b.is_number() || b.kind() == Value::Kind::kBool)) {
    const double x = a.as_float(), y = b.as_float();
    return x < y ? -1 : x > y ? 1 : 0;
  }
  if (a.is_string() && b.is_string()) return a.str().compare(b.str()) < 0 ? -1 : a.str() == b.str() ? 0 : 1;
  throw UsageError("chat template: cannot order " + a.type_name() + " and " + b.type_name());
}

Value CallArgs::get(size_t index, const char* name, Value fallback) const {
  for (const auto& [k, v] : kwargs)
    if (k == name) return v;
  return index < args.size() ? args[index] : fallback;
}

Value from_json_text(const std::string& text) {
  try {
    return from_json(nlohmann::ordered_json::parse(text));
  } catch (const nlohmann::json::parse_error& e) {
    throw UsageError(std::string("chat template context: not valid JSON: ") + e.what());
  }
}

}  // namespace moex::jinja
