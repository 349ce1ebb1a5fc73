// Values of the chat-template interpreter (a Jinja subset): Python-like semantics for truthiness,
// equality, str() and json.dumps, because the real templates are written against Python's jinja2.
// Lists, dicts and callables are shared by reference, like Python objects (namespace() mutation relies on it).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace moex::jinja {

class Value;
using List = std::vector<Value>;
using Dict = std::vector<std::pair<std::string, Value>>;  // insertion-ordered, like Python dicts

struct CallArgs;
using Function = std::function<Value(CallArgs&)>;

class Value {
 public:
  enum class Kind { kUndefined, kNone, kBool, kInt, kFloat, kString, kList, kDict, kFunction };

  Value() = default;  // undefined
  static Value none() { Value v; v.kind_ = Kind::kNone; return v; }
  Value(bool b) : kind_(Kind::kBool), int_(b) {}
  Value(int64_t i) : kind_(Kind::kInt), int_(i) {}
  Value(int i) : kind_(Kind::kInt), int_(i) {}
  Value(size_t i) : kind_(Kind::kInt), int_(static_cast<int64_t>(i)) {}
  Value(double f) : kind_(Kind::kFloat), float_(f) {}
  Value(std::string s) : kind_(Kind::kString), str_(std::make_shared<std::string>(std::move(s))) {}
  Value(const char* s) : Value(std::string(s)) {}
  Value(List l) : kind_(Kind::kList), list_(std::make_shared<List>(std::move(l))) {}
  Value(Dict d) : kind_(Kind::kDict), dict_(std::make_shared<Dict>(std::move(d))) {}
  Value(Function f) : kind_(Kind::kFunction), fn_(std::make_shared<Function>(std::move(f))) {}

  Kind kind() const { return kind_; }
  bool is_undefined() const { return kind_ == Kind::kUndefined; }
  bool is_none() const { return kind_ == Kind::kNone; }
  bool is_string() const { return kind_ == Kind::kString; }
  bool is_number() const { return kind_ == Kind::kInt || kind_ == Kind::kFloat; }
  bool is_list() const { return kind_ == Kind::kList; }
  bool is_dict() const { return kind_ == Kind::kDict; }

  bool as_bool() const { return int_ != 0; }
  int64_t as_int() const { return kind_ == Kind::kFloat ? static_cast<int64_t>(float_) : int_; }
  double as_float() const { return kind_ == Kind::kFloat ? float_ : static_cast<double>(int_); }
  const std::string& str() const { return *str_; }
  List& list() const { return *list_; }
  Dict& dict() const { return *dict_; }
  const Function& fn() const { return *fn_; }

  // Dict lookup; nullptr when absent or not a dict.
  Value* find(const std::string& key) const;
  void set(const std::string& key, Value v) const;  // dict only

  bool truthy() const;
  std::string type_name() const;
  std::string to_str() const;   // Python str(); undefined is ""
  std::string repr() const;     // Python repr()
  // Python json.dumps(ensure_ascii=False) with default separators; indent < 0 means none.
  std::string to_json(int indent = -1, int depth = 0) const;

 private:
  Kind kind_ = Kind::kUndefined;
  int64_t int_ = 0;
  double float_ = 0;
  std::shared_ptr<std::string> str_;
  std::shared_ptr<List> list_;
  std::shared_ptr<Dict> dict_;
  std::shared_ptr<Function> fn_;
};

bool equals(const Value& a, const Value& b);
// <0, 0, >0; throws for values Python cannot order.
int compare(const Value& a, const Value& b);

struct CallArgs {
  std::vector<Value> args;
  std::vector<std::pair<std::string, Value>> kwargs;
  // Positional `index` or keyword `name`, else `fallback`.
  Value get(size_t index, const char* name, Value fallback = Value()) const;
};

// Converts JSON text to a Value (objects keep their key order).
Value from_json_text(const std::string& text);

}  // namespace moex::jinja
