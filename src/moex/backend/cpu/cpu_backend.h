// The CPU backend: every Backend op on host memory, threaded over a moex::ThreadPool, with
// AVX2/FMA/F16C kernels (scalar fallbacks elsewhere). Weights stay where the caller put them (an
// mmap'd checkpoint): upload_weight is zero-copy.
#pragma once

#include <memory>

#include "moex/backend/backend.h"

namespace moex {

// num_threads <= 0: one thread per hardware thread. The backend is used by one caller thread at a
// time (the engine's step loop); its ops run on the pool it owns.
std::unique_ptr<Backend> make_cpu_backend(int num_threads = 0);

}  // namespace moex
