#include "moex/core/progress.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>

namespace moex {

ProgressBar::ProgressBar(std::string label, int64_t total)
    : label_(std::move(label)), total_(std::max<int64_t>(1, total)), enabled_(::isatty(STDERR_FILENO) == 1) {
  start_ = last_draw_ = std::chrono::steady_clock::now();
  draw(true);
}

ProgressBar::~ProgressBar() { finish(); }

void ProgressBar::advance(int64_t amount) {
  done_ = std::min(total_, done_ + amount);
  draw(false);
}

void ProgressBar::finish() {
  if (finished_) return;
  done_ = total_;
  draw(true);
  if (enabled_) std::fputc('\n', stderr);
  finished_ = true;
}

void ProgressBar::draw(bool force) {
  if (!enabled_) return;
  auto now = std::chrono::steady_clock::now();
  if (!force && now - last_draw_ < std::chrono::milliseconds(100)) return;
  last_draw_ = now;
  constexpr int kWidth = 30;
  const int filled = static_cast<int>(kWidth * done_ / total_);
  const double seconds = std::chrono::duration<double>(now - start_).count();
  std::fprintf(stderr, "\r%s [%.*s%*s] %3d%% %.1fs", label_.c_str(), filled, "##############################",
               kWidth - filled, "", static_cast<int>(100 * done_ / total_), seconds);
  std::fflush(stderr);
}

}  // namespace moex
