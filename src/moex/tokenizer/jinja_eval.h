// Runs a parsed chat template over a context of variables.
#pragma once

#include <string>

#include "moex/tokenizer/jinja_ast.h"

namespace moex::jinja {

// Renders `body` with `globals` (a dict: messages, add_generation_prompt, bos_token, ...). Throws
// UsageError for errors the inputs cause (raise_exception, a bad type, an undefined value called).
std::string render(const Body& body, const Value& globals);

// Applies a filter / test / method by name (jinja_builtins.cc); `where` labels errors.
Value apply_filter(const std::string& name, Value value, CallArgs& args, int line);
bool apply_test(const std::string& name, const Value& value, CallArgs& args, int line);
Value get_method(const Value& self, const std::string& name);  // undefined if no such method
Value global_function(const std::string& name);                // undefined if no such function

[[noreturn]] void runtime_error(int line, const std::string& what);

}  // namespace moex::jinja
