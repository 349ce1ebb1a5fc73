// Entry point of the CUDA backend. A plain C++ header (no CUDA types) so that the engine and tests can
// name the factory in every build; the definitions exist only when moex is built with MOEX_CUDA=ON.
#pragma once

#include <memory>
#include <string>

#include "moex/backend/backend.h"

namespace moex {

// A backend whose tensors live on CUDA device `device_idx`. Activations are fp32; weights are stored
// bf16 (matrices) or fp32 (vectors: norms, biases) whatever the checkpoint's dtype. All ops run in order
// on one stream owned by the backend; a backend is used by one host thread at a time.
// Throws moex::Error when the device does not exist or cannot be initialised.
std::unique_ptr<Backend> make_cuda_backend(int device_idx);

// Decode-step CUDA graphs of a backend made by make_cuda_backend (zeros for any other backend): steps
// replayed, buckets captured, captures that failed (those steps ran eagerly).
struct CudaStepGraphStats {
  int64_t replays = 0;
  int64_t captures = 0;
  int64_t failures = 0;
  // prepare_kv_step: KV rows uploaded, and steps that found their row already on the device (advanced there by
  // the previous step's recorded pick).
  int64_t kv_uploads = 0;
  int64_t kv_rows_reused = 0;
  // Greedy picks enqueued (eagerly or into a recording) from the lm_head's argmax key (MOEX_CUDA_PICK_IN_LM_HEAD).
  int64_t argmax_key_picks = 0;
};
CudaStepGraphStats cuda_step_graph_stats(const Backend& backend);

// MoE batches of a backend made by make_cuda_backend whose tensor-core (prefill) plan was made on the device (0
// for any other backend).
int64_t cuda_prefill_plans_on_device(const Backend& backend);

// Dense GEMM outputs a backend made by make_cuda_backend computed through cuBLAS (where it loads and
// MOEX_CUDA_CUBLAS is not 0; 0 for any other backend).
int64_t cuda_cublas_gemms(const Backend& backend);

// Layer tails a backend made by make_cuda_backend ran as one persistent launch (moe_layer_tail; 0 for any other
// backend).
int64_t cuda_layer_tails(const Backend& backend);

// Number of usable CUDA devices; 0 (never an error) when there is no driver or no GPU.
int cuda_device_count();

// "NVIDIA H100 80GB HBM3, sm_90, 132 SMs, 79.1 GiB" for logs and benchmark tables.
std::string cuda_device_description(int device_idx);

}  // namespace moex
