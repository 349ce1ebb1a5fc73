// A one-line progress bar on stderr for long work (loading, benchmarking). Draws only when stderr is a
// terminal, so logs and CI output stay clean; at most ~10 redraws per second.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

namespace moex {

class ProgressBar {
 public:
  ProgressBar(std::string label, int64_t total);
  ~ProgressBar();
  void advance(int64_t amount = 1);
  void finish();

 private:
  void draw(bool force);

  std::string label_;
  int64_t total_;
  int64_t done_ = 0;
  bool enabled_;
  bool finished_ = false;
  std::chrono::steady_clock::time_point start_;
  std::chrono::steady_clock::time_point last_draw_;
};

}  // namespace moex
