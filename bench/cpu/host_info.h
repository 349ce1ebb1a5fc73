// What a CPU benchmark records about the machine and the tree it ran on (shared by the bench/cpu programs).
#pragma once

#include <cstdio>
#include <fstream>
#include <string>

#include <fmt/format.h>

namespace moex::bench {

// "0.52 0.61 0.70" from /proc/loadavg (1, 5 and 15 minutes): a busy host explains a slow run.
inline std::string load_average() {
  std::ifstream in("/proc/loadavg");
  double one = 0, five = 0, fifteen = 0;
  in >> one >> five >> fifteen;
  return fmt::format("{:.2f} {:.2f} {:.2f}", one, five, fifteen);
}

inline std::string cpu_model() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("model name", 0) == 0) return line.substr(line.find(':') + 2);
  return "unknown cpu";
}

// The first line a shell command prints, trailing newline and spaces removed ("" when it fails).
inline std::string shell_line(const char* cmd) {
  std::string out;
  if (FILE* pipe = popen(cmd, "r")) {
    char buf[256];
    while (std::fgets(buf, sizeof(buf), pipe)) out += buf;
    pclose(pipe);
  }
  while (!out.empty() && (out.back() == '\n' || out.back() == ' ')) out.pop_back();
  return out;
}

// The source tree's commit (MOEX_SOURCE_DIR is set by bench/CMakeLists.txt).
inline std::string git_commit() {
  return shell_line("git -C " MOEX_SOURCE_DIR " rev-parse --short HEAD 2>/dev/null");
}

}  // namespace moex::bench
