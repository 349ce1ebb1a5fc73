// Syntax tree of the chat-template Jinja subset, produced by jinja_parser.cc and run by jinja_eval.cc.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "moex/tokenizer/jinja_value.h"

namespace moex::jinja {

struct Expr {
  enum class Kind {
    kLiteral, kName, kList, kDict, kAttr, kItem, kSlice, kCall, kFilter, kTest, kNot, kNeg, kBinary, kAnd, kOr,
    kTernary,
  };
  Kind kind;
  int line = 0;
  Value literal;
  std::string name;  // variable, attribute, filter, test or operator
  bool negated = false;  // `is not`
  std::vector<std::unique_ptr<Expr>> args;  // operands; slices use nullptr for a missing bound
  std::vector<std::string> kwnames;         // names of the trailing keyword arguments of calls/filters
};
using ExprPtr = std::unique_ptr<Expr>;

struct Node;
using Body = std::vector<std::unique_ptr<Node>>;

struct Node {
  enum class Kind { kText, kOutput, kIf, kFor, kSet, kSetBlock, kMacro, kBreak, kContinue };
  Kind kind;
  int line = 0;
  std::string text;               // kText; kSet/kSetBlock/kMacro: target name
  std::string attr;               // kSet: `ns.attr` target attribute
  std::vector<std::string> targets;  // kFor loop variables; kMacro parameter names
  ExprPtr expr;                   // kOutput, kSet value, kFor iterable
  ExprPtr filter;                 // kFor `if` clause
  std::vector<ExprPtr> conditions;  // kIf: one per branch (elif included)
  std::vector<Body> bodies;         // kIf: one per condition, then an optional else; kFor: body, else
  std::vector<ExprPtr> defaults;    // kMacro: default per parameter (nullptr if none)
};

// Parses template source (transformers' settings: trim_blocks, lstrip_blocks, one trailing newline
// dropped). Throws FormatError "chat_template: line N: ..." on syntax it does not support.
Body parse_template(const std::string& source);

}  // namespace moex::jinja
