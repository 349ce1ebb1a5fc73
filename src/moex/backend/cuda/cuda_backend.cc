// CudaBackend: the Backend ops on one CUDA device and one stream. Each op validates its tensors once on the
// host, then calls a kernel launcher (kernels/*.cuh); no op allocates except when a scratch buffer must grow
// (never in steady-state decode). Only route() and the copy_* calls synchronise with the host.
// Decode steps (decode_step, and batched ones: decode_rows_step) run in "step mode": tokens and positions come from
// small device buffers written once per step, so the whole step can be recorded as a CUDA graph and replayed
// (step_graphs.h), and moe_routed() routes and plans on the device, so no MoE layer needs the host.
#include "moex/backend/cuda/cuda_backend.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <limits>
#include <unordered_map>
#include <utility>
#include <vector>

#include "moex/backend/cuda/batch_picks.h"
#include "moex/backend/cuda/cublas_gemm.h"
#include "moex/backend/cuda/cuda_check.h"
#include "moex/backend/cuda/cuda_resources.h"
#include "moex/backend/cuda/moe_plan.h"
#include "moex/backend/cuda/packed_copy.h"
#include "moex/backend/cuda/step_graphs.h"
#include "moex/backend/cuda/timeline.h"
#include "moex/backend/cuda/kernels/attention.cuh"
#include "moex/backend/cuda/kernels/elementwise.cuh"
#include "moex/backend/cuda/kernels/gemv.cuh"
#include "moex/backend/cuda/kernels/layer_tail.cuh"
#include "moex/backend/cuda/kernels/moe.cuh"
#include "moex/backend/cuda/kernels/norm.cuh"
#include "moex/backend/cuda/kernels/rope.cuh"
#include "moex/backend/cuda/kernels/router.cuh"
#include "moex/backend/cuda/kernels/sampling.cuh"

namespace moex {
namespace cuda {
namespace {

class CudaBuffer final : public Buffer {
 public:
  CudaBuffer(DType dtype, Shape shape) : memory_(std::max<size_t>(shape.numel() * dtype_size(dtype), 1)) {
    view = TensorView(memory_.get(), dtype, shape, Device::kCuda);
  }

 private:
  DeviceMemory memory_;
};

void check_weight_dtype(const TensorView& host, const std::string& name) {
  if (host.dtype != DType::kBF16 && host.dtype != DType::kF16 && host.dtype != DType::kF32)
    throw FormatError(fmt::format("weight \"{}\": dtype {} is not supported by the CUDA backend (expected BF16, F16 or "
                                  "F32)",
                                  name, dtype_name(host.dtype)));
}

void check_device(const TensorView& t, const char* op, const char* what) {
  MOEX_ASSERT(t.device == Device::kCuda && t.data != nullptr, "cuda {}: {} must be a CUDA tensor", op, what);
}

void check_f32(const TensorView& t, const char* op, const char* what) {
  check_device(t, op, what);
  MOEX_ASSERT(t.dtype == DType::kF32, "cuda {}: {} must be F32, got {}", op, what, dtype_name(t.dtype));
}

const uint16_t* bf16_data(const TensorView& t, const char* op, const char* what) {
  check_device(t, op, what);
  MOEX_ASSERT(t.dtype == DType::kBF16, "cuda {}: weight {} must be BF16 on the device (use upload_weight), got {}",
              op, what, dtype_name(t.dtype));
  return static_cast<const uint16_t*>(t.data);
}

// Norm weights and biases are kept fp32 by upload_weight; a bf16 vector is accepted too.
const void* vector_data(const TensorView& t, bool* is_bf16, const char* op) {
  check_device(t, op, "weight");
  MOEX_ASSERT(t.dtype == DType::kF32 || t.dtype == DType::kBF16, "cuda {}: weight must be F32 or BF16, got {}", op,
              dtype_name(t.dtype));
  *is_bf16 = t.dtype == DType::kBF16;
  return t.data;
}

size_t align16(size_t bytes) { return (bytes + 15) / 16 * 16; }

// A draw as the sampling kernel takes it: 1 / temperature rounded as the host sampler rounds it.
DeviceDraw device_draw(const TokenDraw& draw) {
  DeviceDraw d;
  d.inv_t = draw.temperature > 0.0f ? 1.0f / draw.temperature : 0.0f;
  d.top_p = draw.top_p;
  d.top_k = draw.top_k;
  d.uniform = draw.uniform;
  return d;
}

// Above this many rows linear() rounds x to bf16 and uses the tiled tensor-core GEMM; at or below it, one row
// takes the fp32 GEMV and 2..32 rows the few-token tensor-core kernel (weights read once, activations split
// into two bf16 parts; gemv.cuh).
constexpr int64_t kLinearGemmMinRows = 32;

// *flag is true for the scope's life and false again on the way out, an exception included: the backend's
// "inside a step" states (step mode; a greedy pick follows the step's ops) must not outlive a step that threw.
class ScopedFlag {
 public:
  explicit ScopedFlag(bool* flag) : flag_(flag) { *flag_ = true; }
  ~ScopedFlag() { *flag_ = false; }
  ScopedFlag(const ScopedFlag&) = delete;
  ScopedFlag& operator=(const ScopedFlag&) = delete;

 private:
  bool* flag_;
};

// Batched decode steps of up to this many rows are recorded (decode_rows_step): more rows take cuBLAS, which is not
// called inside a recording, so a replay would run other kernels than the step's eager run.
constexpr int64_t kStepGraphMaxRows = kLinearGemmMinRows;

// A recorded step's key: its context bucket, its rows (1 for decode_step) and whether the recording ends with the
// pick (decode_step_with_pick).
int64_t step_graph_key(int64_t bucket, int64_t rows, bool with_pick) {
  return (bucket * (kStepGraphMaxRows + 1) + rows) * 2 + (with_pick ? 1 : 0);
}

// Prefill's gate/up GEMM reads the tokens' rows itself through the plan's row_token, where a kernel had first
// written them gathered (top_k bf16 copies of every token: Model B's 2048-token prompt read 134 MB and wrote 67 MB
// a layer for it). MOEX_CUDA_GEMM_GATHER=0 keeps the gathered copy (A/B; read at every call, so tests compare both).
bool gemm_gathers() { return !env_equals("MOEX_CUDA_GEMM_GATHER", "0"); }

// Host-side blob of several arrays uploaded in one staging copy.
class ArgBlob {
 public:
  template <typename T>
  size_t add(const T* data, size_t count) {
    return add_bytes(data, count * sizeof(T));
  }
  const std::vector<char>& bytes() const { return bytes_; }

 private:
  // Not inlined: once inlined into its callers, GCC 12's -Wstringop-overflow misjudges the resize's bound.
  [[gnu::noinline]] size_t add_bytes(const void* data, size_t bytes) {
    const size_t offset = bytes_.size();
    bytes_.resize(offset + align16(bytes));
    if (bytes) std::memcpy(bytes_.data() + offset, data, bytes);
    return offset;
  }
  std::vector<char> bytes_;
};

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(int device_idx) : device_idx_(device_idx) {
    int count = cuda_device_count();
    if (device_idx < 0 || device_idx >= count)
      throw UsageError(fmt::format("--device cuda:{}: no such CUDA device ({} found)", device_idx, count));
    MOEX_CUDA_CHECK(cudaSetDevice(device_idx));
    MOEX_CUDA_CHECK(cudaDeviceGetAttribute(&num_sms_, cudaDevAttrMultiProcessorCount, device_idx));
    MOEX_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    // The copy stream's kernels (unpacking packed expert rows) get the highest priority: a block of theirs is
    // scheduled before the compute stream's next ones, so the link's next chunk does not wait behind a step.
    int least_priority = 0, greatest_priority = 0;
    MOEX_CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&least_priority, &greatest_priority));
    MOEX_CUDA_CHECK(cudaStreamCreateWithPriority(&copy_stream_, cudaStreamNonBlocking, greatest_priority));
    staging_ = std::make_unique<StagingRing>();
    step_values_ = DeviceMemory(16);
    MOEX_CUDA_CHECK(cudaMemset(step_values_.get(), 0, 16));  // [2]: the pick ring's cursor starts at slot 0
    step_host_ = PinnedMemory(kStepHostIds * sizeof(int32_t) + kStepGraphMaxRows * sizeof(int32_t));
    step_ids_ = DeviceMemory(kStepGraphMaxRows * sizeof(int32_t));
    argmax_key_ = DeviceMemory(sizeof(unsigned long long));
    MOEX_CUDA_CHECK(cudaMemset(argmax_key_.get(), 0, sizeof(unsigned long long)));
    route_ticket_ = DeviceMemory(16 + sizeof(MoeOneLaunchCounters));
    MOEX_CUDA_CHECK(cudaMemset(route_ticket_.get(), 0, 16 + sizeof(MoeOneLaunchCounters)));
    tail_counters_ = DeviceMemory(sizeof(LayerTailCounters));
    MOEX_CUDA_CHECK(cudaMemset(tail_counters_.get(), 0, sizeof(LayerTailCounters)));
    if (env_equals("MOEX_CUDA_TAIL_TIMES", "1")) {
      tail_times_ = DeviceMemory(sizeof(LayerTailTimes));
      MOEX_CUDA_CHECK(cudaMemset(tail_times_.get(), 0, sizeof(LayerTailTimes)));
    }
    MOEX_CUDA_CHECK(cudaEventCreateWithFlags(&step_event_, cudaEventDisableTiming));
    picks_host_ = PinnedMemory(kMaxPendingPicks * sizeof(int32_t));
    for (cudaEvent_t& event : pick_events_) MOEX_CUDA_CHECK(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
    batch_picks_ = std::make_unique<BatchPickRing>(kStepGraphMaxRows);
    MOEX_CUDA_CHECK(cudaEventCreateWithFlags(&kv_event_, cudaEventDisableTiming));
    MOEX_CUDA_CHECK(cudaEventCreateWithFlags(&compute_mark_, cudaEventDisableTiming));
    for (cudaEvent_t& event : copy_events_) MOEX_CUDA_CHECK(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
    graphs_enabled_ = !env_equals("MOEX_CUDA_GRAPHS", "0");         // eager decode steps (A/B measurements)
    fused_norms_ = !env_equals("MOEX_CUDA_FUSED_NORMS", "0");       // norms as launches of their own (A/B)
    chain_steps_ = !env_equals("MOEX_CUDA_CHAIN_STEPS", "0");       // decode steps wait for the host (A/B)
    sample_on_device_ = !env_equals("MOEX_CUDA_SAMPLE", "0");       // sampled picks on the host (A/B)
    fused_rope_ = !env_equals("MOEX_CUDA_FUSED_ROPE", "0");         // RoPE + KV write as launches of their own (A/B)
    preload_down_ = env_equals("MOEX_CUDA_DOWN_PRELOAD", "1");      // batch-1 down weights before the PDL wait
    pick_in_step_ = !env_equals("MOEX_CUDA_PICK_IN_STEP", "0");     // greedy picks after the step's graph (A/B)
    pick_in_lm_head_ = !env_equals("MOEX_CUDA_PICK_IN_LM_HEAD", "0");  // the argmax's own launches (A/B)
    fused_embedding_ = !env_equals("MOEX_CUDA_FUSED_EMBEDDING", "0");  // the embedding as a launch of its own
    memory_at_start_ = device_memory_use().used;
  }

  ~CudaBackend() override {
    cudaStreamSynchronize(stream_);
    cudaStreamSynchronize(copy_stream_);
    timeline_.write();
    print_tail_times();
    for (void* ptr : registered_) cudaHostUnregister(ptr);
    graphs_.reset();
    if (step_event_) cudaEventDestroy(step_event_);
    for (cudaEvent_t event : pick_events_)
      if (event) cudaEventDestroy(event);
    if (kv_event_) cudaEventDestroy(kv_event_);
    if (compute_mark_) cudaEventDestroy(compute_mark_);
    for (cudaEvent_t event : copy_events_)
      if (event) cudaEventDestroy(event);
    staging_.reset();
    cudaStreamDestroy(copy_stream_);
    cudaStreamDestroy(stream_);
  }

  Device device() const override { return Device::kCuda; }
  std::string name() const override { return fmt::format("cuda:{}", device_idx_); }
  // cudaMemGetInfo counts the whole device (other processes too): on a GPU of its own, what moex holds.
  DeviceMemoryUse device_memory_use() const override {
    size_t free = 0, total = 0;
    if (cudaSetDevice(device_idx_) != cudaSuccess || cudaMemGetInfo(&free, &total) != cudaSuccess) {
      cudaGetLastError();
      return {};
    }
    return {static_cast<int64_t>(total - free), memory_at_start_};
  }

  std::string pci_bus_id() const override {
    char id[32] = {};
    return cudaDeviceGetPCIBusId(id, sizeof(id), device_idx_) == cudaSuccess ? id : "";
  }

  std::unique_ptr<Buffer> alloc(DType dtype, Shape shape) override {
    refuse_while_capturing("alloc");
    MOEX_CUDA_CHECK(cudaSetDevice(device_idx_));
    return std::make_unique<CudaBuffer>(dtype, shape);
  }

  TensorView upload_weight(const TensorView& host, const std::string& name) override {
    refuse_while_capturing("upload_weight");
    MOEX_CUDA_CHECK(cudaSetDevice(device_idx_));
    // Matrices become bf16 (the kernels' one weight format); vectors (norms, biases) fp32 for precision.
    DType target = host.shape.ndim >= 2 ? DType::kBF16 : DType::kF32;
    check_weight_dtype(host, name);
    if (host.device == Device::kCuda && host.dtype == target) return host;
    MOEX_ASSERT(host.device == Device::kCpu, "upload_weight {}: source on an unexpected device", name);
    int64_t count = host.numel();
    size_t bytes = static_cast<size_t>(count) * dtype_size(target);
    void* dst = arena_.allocate(bytes);
    if (host.dtype == target) {
      copy_host_to_device(dst, host.data, bytes);
      MOEX_CUDA_CHECK(cudaStreamSynchronize(stream_));
    } else {
      std::vector<char> converted(bytes);
      convert(host, target, converted.data());
      MOEX_CUDA_CHECK(cudaMemcpy(dst, converted.data(), bytes, cudaMemcpyHostToDevice));
    }
    return TensorView(dst, target, host.shape, Device::kCuda);
  }

  // The rows travel over PCIe when a kernel reads them: a decode step's embedding row (4-8 KB) costs a bus round
  // trip, prefill's rows a few MB. Page-locked memory is mapped into the device's address space (unified
  // addressing), so the embedding kernel and a recorded decode graph take the view like any other.
  TensorView map_host_weight(const TensorView& host, const std::string& name) override {
    refuse_while_capturing("map_host_weight");
    if (host.shape.ndim < 2) return upload_weight(host, name);
    check_weight_dtype(host, name);
    MOEX_ASSERT(host.device == Device::kCpu, "map_host_weight {}: source on an unexpected device", name);
    MOEX_CUDA_CHECK(cudaSetDevice(device_idx_));
    const size_t bytes = static_cast<size_t>(host.numel()) * dtype_size(DType::kBF16);
    PinnedMemory& mapped = host_weights_.emplace_back(bytes);
    if (host.dtype == DType::kBF16) std::memcpy(mapped.get(), host.data, bytes);
    else convert(host, DType::kBF16, mapped.get());
    void* device_ptr = nullptr;
    MOEX_CUDA_CHECK(cudaHostGetDevicePointer(&device_ptr, mapped.get(), 0));
    host_weight_views_.emplace_back(static_cast<const char*>(device_ptr), bytes);
    return TensorView(device_ptr, DType::kBF16, host.shape, Device::kCuda);
  }

  void copy_to_host(const TensorView& src, void* dst) override {
    check_device(src, "copy_to_host", "src");
    refuse_while_capturing("copy_to_host");
    timeline_.begin(stream_);
    cudaError_t status = cudaMemcpyAsync(dst, src.data, src.nbytes(), cudaMemcpyDeviceToHost, stream_);
    if (status == cudaErrorInvalidValue && !registered_.empty()) {
      // dst straddles a page-locked range (copy_host_to_device's case, the other way). A bounce buffer of whole
      // pages of its own takes it.
      cudaGetLastError();
      PackedArray<char> bounce(src.nbytes());
      MOEX_CUDA_CHECK(cudaMemcpyAsync(bounce.data(), src.data, src.nbytes(), cudaMemcpyDeviceToHost, stream_));
      MOEX_CUDA_CHECK(cudaStreamSynchronize(stream_));
      std::memcpy(dst, bounce.data(), bounce.size());
    } else {
      MOEX_CUDA_CHECK(status);
    }
    timeline_.end(stream_, "readback", static_cast<int64_t>(src.nbytes()));
    MOEX_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }

  void copy_from_host(const void* src, const TensorView& dst) override {
    check_device(dst, "copy_from_host", "dst");
    refuse_while_capturing("copy_from_host");
    copy_host_to_device(dst.data, src, dst.nbytes());
    MOEX_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }

  // Runs on the prefetch thread: its own stream, so expert copies overlap the compute stream's kernels.
  void copy_from_host_async_path(const void* src, const TensorView& dst) override {
    check_device(dst, "copy_from_host_async_path", "dst");
    expert_copies_seen_.store(true, std::memory_order_relaxed);
    MOEX_CUDA_CHECK(cudaSetDevice(device_idx_));
    MOEX_CUDA_CHECK(cudaMemcpyAsync(dst.data, src, dst.nbytes(), cudaMemcpyHostToDevice, copy_stream_));
    MOEX_CUDA_CHECK(cudaStreamSynchronize(copy_stream_));
  }

  // Expert demand copies go on the prefetcher's copy stream, so a prefetch issued later queues behind them
  // instead of sharing the link, and after the compute stream's work so far (dst may be a slot it read).
  void copy_from_host_enqueue(const void* src, const TensorView& dst) override {
    check_device(dst, "copy_from_host_enqueue", "dst");
    enqueue_expert_copy("copy_from_host_enqueue", static_cast<int64_t>(dst.nbytes()), [&] {
      cudaError_t status = cudaMemcpyAsync(dst.data, src, dst.nbytes(), cudaMemcpyHostToDevice, copy_stream_);
      if (status == cudaErrorInvalidValue && !registered_.empty()) {  // see copy_host_to_device
        cudaGetLastError();
        PackedArray<char> bounce(static_cast<const char*>(src), static_cast<const char*>(src) + dst.nbytes());
        MOEX_CUDA_CHECK(cudaMemcpyAsync(dst.data, bounce.data(), dst.nbytes(), cudaMemcpyHostToDevice, copy_stream_));
        MOEX_CUDA_CHECK(cudaStreamSynchronize(copy_stream_));  // bounce dies here
      } else {
        MOEX_CUDA_CHECK(status);
      }
    });
  }
  // Packed expert rows: the packed bytes cross the link, the copy stream unpacks them (PackedCopier).
  void copy_packed_from_host_async_path(const PackedBf16& src, int64_t row_begin, int64_t row_end,
                                        const TensorView& dst) override {
    check_device(dst, "copy_packed_from_host_async_path", "dst");
    check_packed_copy_shapes(src, row_begin, row_end, dst, "cuda copy_packed_from_host_async_path");
    expert_copies_seen_.store(true, std::memory_order_relaxed);
    MOEX_CUDA_CHECK(cudaSetDevice(device_idx_));
    packed_copier_.enqueue(src, row_begin, row_end, static_cast<uint16_t*>(dst.data), copy_stream_);
    MOEX_CUDA_CHECK(cudaStreamSynchronize(copy_stream_));
  }
  void copy_packed_from_host_enqueue(const PackedBf16& src, int64_t row_begin, int64_t row_end,
                                     const TensorView& dst) override {
    check_device(dst, "copy_packed_from_host_enqueue", "dst");
    check_packed_copy_shapes(src, row_begin, row_end, dst, "cuda copy_packed_from_host_enqueue");
    enqueue_expert_copy("copy_packed_from_host_enqueue", packed_bf16_rows_bytes(src, row_begin, row_end), [&] {
      packed_copier_.enqueue(src, row_begin, row_end, static_cast<uint16_t*>(dst.data), copy_stream_);
    });
  }
  uint64_t enqueued_copy_ticket() const override { return copies_enqueued_; }
  void wait_copies_through(uint64_t ticket) override {
    refuse_while_capturing("wait_copies_through");
    MOEX_ASSERT(ticket <= copies_enqueued_, "cuda wait_copies_through: ticket {} of {} copies", ticket,
                copies_enqueued_);
    if (ticket == 0) return;
    // A ring entry re-recorded since marks a later copy of the same FIFO stream: waiting for it is safe, only
    // longer.
    MOEX_CUDA_CHECK(cudaStreamWaitEvent(stream_, copy_events_[(ticket - 1) % kCopyEvents], 0));
  }

  // Pageable host memory copies at 6-10 GB/s, page-locked at ~55 GB/s: offloaded experts' source tier
  // is registered once (the caller passes whole, non-overlapping pages).
  void register_host_memory(const void* ptr, size_t bytes) override {
    MOEX_CUDA_CHECK(cudaSetDevice(device_idx_));
    void* base = const_cast<void*>(ptr);
    cudaError_t status = cudaHostRegister(base, bytes, cudaHostRegisterPortable | cudaHostRegisterReadOnly);
    if (status == cudaSuccess) registered_.push_back(base);
    else cudaGetLastError();  // clear it: an unregistered range only copies slower
  }

  void synchronize() override {
    refuse_while_capturing("synchronize");
    MOEX_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }

  void decode_step(int32_t token, int64_t position, const std::function<void()>& ops) override {
    run_step(token, position, ops, /*with_pick=*/false);
  }

  // A batched decode step (forward_batch: row i the next token of a sequence of its own), recorded per batch size
  // and context bucket as the single-row steps are per bucket: the rows' tokens are uploaded into step_ids_, which
  // the embedding reads; positions, block tables and the attention's grid (the bucket's) come from the prepared
  // KvStep, uploaded before. Dense engines pad a batch up to a bucket of sizes; here a padding row would be routed to
  // experts, whose weights the step would then read, and an MoE step's time is its experts' bytes: so one recording
  // per exact size (at most kStepGraphMaxRows - 1 per context bucket, made on a size's second step).
  // A chained batch (ids all kTokenOnDevice: the picks pick_rows() wrote into step_ids_) uploads no tokens.
  void decode_rows_step(std::span<const int32_t> ids, const std::function<void()>& ops) override {
    const int64_t n = static_cast<int64_t>(ids.size());
    const bool on_device = n > 0 && ids[0] == kTokenOnDevice;
    MOEX_ASSERT(!on_device || rows_picked_ == n, "cuda decode_rows_step: {} rows on the device only after pick_rows() "
                "of as many ({} picked)", n, rows_picked_);
    rows_picked_ = 0;
    const bool fits = n >= 2 && n <= kStepGraphMaxRows && kv_rows_ == n && kv_distinct_sequences_;
    MOEX_ASSERT(fits || !on_device, "cuda decode_rows_step: {} chained rows outside the recordable steps", n);
    if (!fits || (!graphs_enabled_ && !on_device)) {
      ops();
      return;
    }
    if (!on_device) upload_step_values(kStepHostIds, ids, step_ids_.get());
    step_rows_ = n;
    step_ids_on_device_ = on_device;
    step_bucket_keys_ = kv_bucket_keys_;
    run_in_step_mode(step_graph_key(kv_bucket_keys_, n, /*with_pick=*/false), ops);
  }

  void reset_step_recordings() override { graphs_.reset(); }
  CudaStepGraphStats step_graph_stats() const {
    return CudaStepGraphStats{graphs_.replays(), graphs_.captures(), graphs_.failures(), kv_uploads_,
                              kv_rows_reused_, argmax_key_picks_};
  }
  int64_t prefill_plans_on_device() const { return prefill_plans_on_device_; }
  int64_t cublas_gemms() const { return cublas_gemms_; }
  int64_t layer_tails() const { return layer_tails_; }

  void embedding(std::span<const int32_t> ids, const TensorView& table, const TensorView& out) override {
    check_f32(out, "embedding", "out");
    check_device(table, "embedding", "table");
    MOEX_ASSERT(table.dtype == DType::kBF16 || table.dtype == DType::kF32, "cuda embedding: table dtype {}",
                dtype_name(table.dtype));
    int64_t n = static_cast<int64_t>(ids.size()), hidden = table.dim(-1), vocab = table.dim(0);
    MOEX_ASSERT(out.numel() == n * hidden, "cuda embedding: out {} for {} ids x {}", out.shape.str(), n, hidden);
    if (n == 0) return;
    launch_embedding(device_token_ids(ids, vocab, "embedding"), n, table.data, table.dtype == DType::kF32, hidden,
                     out.as<float>(), stream_);
    MOEX_CUDA_CHECK_LAUNCH();
  }

  // One row: the first q/k/v GEMV reads the token's embedding row itself and block 0 stores it in x (EmbedRowIn),
  // one launch fewer per decode step. Only for a table in device memory: every block reads the row, which from a
  // host-mapped table (offloading) would cross the bus hundreds of times. MOEX_CUDA_FUSED_EMBEDDING=0: the
  // embedding's own launch, as the default.
  void embed_norm_linear_many(std::span<const int32_t> ids, const TensorView& table, const TensorView& x,
                              const TensorView& weight, float eps, const TensorView& scratch,
                              std::span<const LinearOutput> outputs) override {
    const int64_t K = x.dim(-1);
    if (fused_embedding_ && ids.size() == 1 && x.numel() == K && table.shape.ndim == 2 && table.dim(1) == K &&
        (table.dtype == DType::kBF16 || table.dtype == DType::kF32) && !host_mapped(table.data)) {
      check_device(table, "embed_norm_linear_many", "table");
      const EmbedRowIn embed{table.data, device_token_ids(ids, table.dim(0), "embed_norm_linear_many"),
                             table.dtype == DType::kF32};
      if (launch_normed(x, nullptr, weight, eps, outputs, "embed_norm_linear_many", embed)) return;
    }
    Backend::embed_norm_linear_many(ids, table, x, weight, eps, scratch, outputs);
  }

  void linear(const TensorView& x, const TensorView& w, const TensorView* bias, const TensorView& out) override {
    check_f32(x, "linear", "x");
    check_f32(out, "linear", "out");
    const uint16_t* wp = bf16_data(w, "linear", "w");
    const LinearDims dims = check_linear_shapes(x, w, bias, out, "cuda linear");
    const int64_t N = dims.out_features, K = dims.in_features, rows = dims.rows;
    const float* bp = nullptr;
    if (bias && !bias->empty()) {
      check_f32(*bias, "linear", "bias");
      bp = bias->as<float>();
    }
    if (rows > kLinearGemmMinRows && K % 8 == 0) {
      const GemvOutput output{wp, bp, out.as<float>(), N};
      linear_gemm(x, rows, K, &output, 1);
      return;
    }
    // Up to kLinearGemmMinRows rows: the launcher picks the few-token tensor-core kernel, fp32 GEMV passes or
    // the scalar fallback (gemv.cuh).
    launch_gemv_bf16(x.as<float>(), rows, wp, N, K, bp, out.as<float>(), num_sms_, stream_);
    MOEX_CUDA_CHECK_LAUNCH();
  }

  void rms_norm(const TensorView& x, const TensorView& weight, float eps, const TensorView& out) override {
    check_f32(x, "rms_norm", "x");
    check_f32(out, "rms_norm", "out");
    bool w_bf16 = false;
    const void* wp = vector_data(weight, &w_bf16, "rms_norm");
    int64_t cols = x.dim(-1), rows = x.numel() / std::max<int64_t>(cols, 1);
    MOEX_ASSERT(weight.numel() == cols && out.numel() == x.numel(), "cuda rms_norm: x {} weight {} out {}",
                x.shape.str(), weight.shape.str(), out.shape.str());
    launch_rms_norm(x.as<float>(), wp, w_bf16, eps, out.as<float>(), rows, cols, stream_);
    MOEX_CUDA_CHECK_LAUNCH();
  }

  void add(const TensorView& a, const TensorView& b, const TensorView& out) override {
    check_f32(a, "add", "a");
    check_f32(b, "add", "b");
    check_f32(out, "add", "out");
    MOEX_ASSERT(a.numel() == b.numel() && a.numel() == out.numel(), "cuda add: {} + {} -> {}", a.shape.str(),
                b.shape.str(), out.shape.str());
    launch_add(a.as<float>(), b.as<float>(), out.as<float>(), a.numel(), stream_);
    MOEX_CUDA_CHECK_LAUNCH();
  }

  // The tensor-core path of linear and linear_many (more than kLinearGemmMinRows rows, K % 8 == 0): x rounded to
  // bf16 once into the workspace for every output, then launch_dense_gemm, which puts q/k/v in one grid (they had
  // been three GEMMs, each rounding x again, and k and v too narrow for 128-row tiles: H200 trace, Model B at 2048
  // tokens, q 112 us on wgmma, k and v 51 us each on mma.sync, 10 us per rounding). A single narrow output (the
  // MoE router) splits K over blocks: room for the chunks' sums after x's copy.
  void linear_gemm(const TensorView& x, int64_t rows, int64_t K, const GemvOutput* outputs, int count) {
    const size_t xb_bytes = align16(static_cast<size_t>(rows * K) * 2);
    const size_t split_floats = count == 1 ? dense_gemm_split_floats(rows, K, outputs[0].rows, num_sms_) : 0;
    auto* ws = static_cast<char*>(workspace(xb_bytes + split_floats * sizeof(float)));
    auto* xb = reinterpret_cast<uint16_t*>(ws);
    if (!capturing_) timeline_.begin(stream_);
    launch_f32_to_bf16(x.as<float>(), xb, rows * K, stream_);
    dense_gemm(xb, rows, K, outputs, count, reinterpret_cast<float*>(ws + xb_bytes), split_floats);
    if (!capturing_) timeline_.end(stream_, "gemm", rows);
    MOEX_CUDA_CHECK_LAUNCH();
  }

  // y_i fp32 [rows, N_i] = xb bf16 [rows, K] @ w_i^T (+ bias_i) for each output: launch_dense_gemm (moex's
  // kernels; split_scratch for a narrow single output), or cuBLAS one output at a time where it loads (not inside a
  // recording: cuBLAS's own workspace is not set up for graph capture here; MOEX_CUDA_CUBLAS=0: moex's kernels).
  void dense_gemm(const uint16_t* xb, int64_t rows, int64_t K, const GemvOutput* outputs, int count,
                  float* split_scratch, size_t split_floats) {
    if (CublasGemm* blas = capturing_ ? nullptr : cublas()) {
      for (int i = 0; i < count; ++i) {
        const GemvOutput& o = outputs[i];
        std::string why_not;
        MOEX_ASSERT(blas->gemm(xb, rows, K, o.w, o.rows, o.y, stream_, &why_not), "cuda linear through {}: {}",
                    blas->library(), why_not);
        if (o.bias) launch_add_row_bias(o.y, o.bias, rows, o.rows, stream_);
      }
      cublas_gemms_ += count;
      return;
    }
    launch_dense_gemm(xb, rows, K, outputs, count, num_sms_, stream_, split_scratch, split_floats);
  }

  // The cuBLAS library for dense GEMMs, loaded on first use; null where MOEX_CUDA_CUBLAS=0 (read at every call, so
  // tests and benchmarks compare both) or where it does not load (said once on stderr: moex's own GEMMs then run).
  // The default since it was measured on an H200 (bench/RESULTS.md, "Prefill: dense bf16 K/V ..."): 1.5-2.0x
  // moex's wgmma kernel on the dense GEMMs (625-726 against 344-468 TFLOP/s), Model B's 2048-token prefill 1.07x,
  // batched decode at 128 sequences 1.04-1.08x, 8 and 32 sequences unchanged.
  CublasGemm* cublas() {
    if (env_equals("MOEX_CUDA_CUBLAS", "0")) return nullptr;
    if (!cublas_tried_) {
      cublas_tried_ = true;
      std::string why_not;
      cublas_ = CublasGemm::open(&why_not);
      if (!cublas_) std::fprintf(stderr, "moex: no cuBLAS for the dense GEMMs (%s); moex's own GEMMs run\n",
                                 why_not.c_str());
    }
    return cublas_.get();
  }

  void linear_many(const TensorView& x, std::span<const LinearOutput> outputs) override {
    check_f32(x, "linear_many", "x");
    const int64_t K = x.dim(-1), rows = x.numel() / std::max<int64_t>(K, 1);
    if (rows > kLinearGemmMinRows && K % 8 == 0) {
      std::vector<GemvOutput> gemm(outputs.size());
      gemv_outputs(x, outputs, "linear_many", gemm.data());
      linear_gemm(x, rows, K, gemm.data(), static_cast<int>(gemm.size()));
      return;
    }
    // One launch only where every output takes the GEMV path.
    if (K % 8 != 0 || outputs.size() > static_cast<size_t>(kGemvMaxOutputs)) {
      Backend::linear_many(x, outputs);
      return;
    }
    GemvOutput gemv[kGemvMaxOutputs];
    gemv_outputs(x, outputs, "linear_many", gemv);
    launch_gemv_bf16_multi(x.as<float>(), rows, K, gemv, static_cast<int>(outputs.size()), num_sms_, stream_);
    MOEX_CUDA_CHECK_LAUNCH();
  }

  bool fuses_residual_norms(int64_t rows) const override { return rows == 1 && fused_norms_; }

  // One row: each block of the q/k/v GEMV normalises x + delta itself (residual_norm.cuh); scratch is unused.
  void norm_linear_many(const TensorView& x, const TensorView* delta, const TensorView& weight, float eps,
                        const TensorView& scratch, std::span<const LinearOutput> outputs) override {
    if (!launch_normed(x, delta, weight, eps, outputs, "norm_linear_many"))
      Backend::norm_linear_many(x, delta, weight, eps, scratch, outputs);
  }

  // One row whose fused norm loops over a grid sized to the SMs (hidden <= 2048: Model A, Model B): the final norm
  // inside the lm_head GEMV's blocks (norm_linear_many with the lm_head as its one output), one launch fewer per
  // decode step (H200, same call: Model A 0.4986 vs 0.5074 ms/token with the step's position below). Wider rows
  // would take a block per 8 of the vocabulary's rows, each normalising the row (the 8x7B shape: 5.8 us slower per
  // step), and keep add_rms_norm + linear.
  void norm_logits(const TensorView& x, const TensorView* delta, const TensorView& weight, float eps,
                   const TensorView& normed, const TensorView& lm_head, const TensorView& logits) override {
    const int64_t K = x.dim(-1);
    if (fuses_residual_norms(x.numel() / std::max<int64_t>(K, 1)) && gemv_normed_loops(K)) {
      const LinearOutput head[1] = {{&lm_head, nullptr, &logits}};
      // A step whose greedy pick follows (decode_step_with_pick): the lm_head's blocks fold the argmax too.
      auto* key = greedy_pick_follows_ && pick_in_lm_head_ ? static_cast<unsigned long long*>(argmax_key_.get())
                                                           : nullptr;
      if (key && argmax_key_logits_) {  // a step before stopped between its lm_head and its pick: the key is stale
        MOEX_CUDA_CHECK(cudaMemsetAsync(key, 0, sizeof(unsigned long long), stream_));
        argmax_key_logits_ = nullptr;
      }
      if (launch_normed(x, delta, weight, eps, head, "norm_logits", {}, key))
        argmax_key_logits_ = key ? logits.as<float>() : nullptr;
      else
        Backend::norm_linear_many(x, delta, weight, eps, normed, head);
      free_half_sms_ = 0;  // no attention runs beside the lm_head: the next step's may be a batched one
      return;
    }
    Backend::norm_logits(x, delta, weight, eps, normed, lm_head, logits);
  }

  void norm_moe_routed(const TensorView& x, const TensorView* delta0, const TensorView& delta1,
                       const TensorView& weight, float eps, const TensorView& normed, const TensorView& router,
                       const TensorView& logits, int64_t top_k, RouterScoring scoring, bool normalize,
                       std::span<const ExpertWeights> experts, const TensorView& out) override {
    ResidualNormIn in;
    check_f32(normed, "norm_moe_routed", "normed");
    if (x.numel() == x.dim(-1) && normed.numel() == x.numel() &&
        residual_norm_in(x, delta0, &delta1, weight, eps, "norm_moe_routed", &in) &&
        moe_routed_on_device(normed, router, logits, top_k, scoring, normalize, experts, out, &in))
      return;
    Backend::norm_moe_routed(x, delta0, delta1, weight, eps, normed, router, logits, top_k, scoring, normalize,
                             experts, out);
  }

  // One persistent launch per layer tail (kernels/layer_tail.cu) where it fits, opt-in (MOEX_CUDA_LAYER_TAIL=1;
  // read at every call so that tests can switch it): on an H200 it is still slower than the launch per op (Model A
  // 0.612 vs 0.497 ms/token, 12-layer Model B 0.953 vs 0.709, same call; bench/RESULTS.md).
  bool fuses_layer_tail() const override { return fused_norms_ && env_equals("MOEX_CUDA_LAYER_TAIL", "1"); }

  void moe_layer_tail(const TensorView& attn, const TensorView& o_proj, const TensorView& proj, const TensorView& x,
                      const TensorView* pending, const TensorView& ffn_norm, float eps, const TensorView& normed,
                      const TensorView& router, const TensorView& logits, int64_t top_k, RouterScoring scoring,
                      bool normalize, std::span<const ExpertWeights> experts, const TensorView& out,
                      const LayerTailNext* next) override {
    if (fuses_layer_tail() && launch_layer_tail_op(attn, o_proj, x, pending, ffn_norm, eps, normed, router, logits,
                                                   top_k, scoring, normalize, experts, out, next))
      return;
    Backend::moe_layer_tail(attn, o_proj, proj, x, pending, ffn_norm, eps, normed, router, logits, top_k, scoring,
                            normalize, experts, out, next);
  }

  void add_rms_norm(const TensorView& x, const TensorView& delta, const TensorView& weight, float eps,
                    const TensorView& out) override {
    check_f32(x, "add_rms_norm", "x");
    check_f32(delta, "add_rms_norm", "delta");
    check_f32(out, "add_rms_norm", "out");
    bool w_bf16 = false;
    const void* wp = vector_data(weight, &w_bf16, "add_rms_norm");
    const int64_t cols = x.dim(-1), rows = x.numel() / std::max<int64_t>(cols, 1);
    MOEX_ASSERT(weight.numel() == cols && out.numel() == x.numel() && delta.numel() == x.numel() &&
                    out.data != delta.data,
                "cuda add_rms_norm: x {} delta {} weight {} out {}", x.shape.str(), delta.shape.str(),
                weight.shape.str(), out.shape.str());
    launch_add_rms_norm(x.as<float>(), delta.as<float>(), wp, w_bf16, eps, out.as<float>(), rows, cols, stream_);
    MOEX_CUDA_CHECK_LAUNCH();
  }

  void qk_norm_rope(const TensorView& q, const TensorView& k, const TensorView* q_norm, const TensorView* k_norm,
                    float eps, std::span<const int32_t> positions, int64_t rotary_dim, double theta) override {
    if (!qk_norm_rope_launch(q, k, q_norm, k_norm, eps, positions, rotary_dim, theta, KvWrite{}))
      Backend::qk_norm_rope(q, k, q_norm, k_norm, eps, positions, rotary_dim, theta);
  }

  void qk_norm_rope_kv_write(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView* q_norm,
                             const TensorView* k_norm, float eps, std::span<const int32_t> positions,
                             int64_t rotary_dim, double theta, const KvStep& step, const TensorView& k_pages,
                             const TensorView& v_pages) override {
    checked_kv_write_rows(step, k, v, k_pages, v_pages);
    const KvWrite kv{v.as<float>(), k_pages.as<float>(), v_pages.as<float>(), kv_device_rows_};
    if (!qk_norm_rope_launch(q, k, q_norm, k_norm, eps, positions, rotary_dim, theta, kv))
      Backend::qk_norm_rope_kv_write(q, k, v, q_norm, k_norm, eps, positions, rotary_dim, theta, step, k_pages,
                                     v_pages);
  }

  void clamp(const TensorView& x, float limit) override {
    check_f32(x, "clamp", "x");
    launch_clamp(x.as<float>(), x.numel(), limit, stream_);
    MOEX_CUDA_CHECK_LAUNCH();
  }

  void rope(const TensorView& x, std::span<const int32_t> positions, int64_t rotary_dim, double theta) override {
    check_f32(x, "rope", "x");
    MOEX_ASSERT(x.shape.ndim == 3, "cuda rope: x must be [n, heads, head_dim], got {}", x.shape.str());
    int64_t n = x.dim(0), heads = x.dim(1), head_dim = x.dim(2);
    MOEX_ASSERT(static_cast<int64_t>(positions.size()) == n, "cuda rope: {} positions for {} tokens",
                positions.size(), n);
    MOEX_ASSERT(rotary_dim % 2 == 0 && rotary_dim <= head_dim, "cuda rope: rotary_dim {} for head_dim {}",
                rotary_dim, head_dim);
    if (n == 0) return;
    launch_rope(x.as<float>(), device_positions(positions, "rope"), n, heads, head_dim, rotary_dim, theta, stream_);
    MOEX_CUDA_CHECK_LAUNCH();
  }

  // Copies the step's rows and block tables into kv_device_ (one async copy from pinned memory), with the
  // tables widened to the stride of the context bucket: a recorded decode step then finds the same layout at
  // every position of its bucket and needs no other input than this buffer's contents.
  void prepare_kv_step(const KvStep& step) override {
    refuse_while_capturing("prepare_kv_step");
    const int64_t n = static_cast<int64_t>(step.row_seq.size());
    int64_t max_keys = 0;
    check_kv_step(step, n, std::numeric_limits<int32_t>::max(), "cuda prepare_kv_step", &max_keys);
    const int64_t bucket = attention_key_bucket(max_keys);
    const int64_t stride = (bucket + step.page_size - 1) / step.page_size, num_seqs = step.num_seqs();
    const size_t count = static_cast<size_t>(2 * n + num_seqs * stride);
    const int64_t used = std::min(stride, step.table_stride);
    kv_row_reused_ = graphs_enabled_ && kv_row_on_device(step, bucket, stride, used);
    if (kv_row_reused_) {
      ++kv_rows_reused_;
    } else {
      if (kv_device_.bytes() < count * sizeof(int32_t)) {
        MOEX_CUDA_CHECK(cudaStreamSynchronize(stream_));
        kv_device_ = DeviceMemory(2 * count * sizeof(int32_t));
        kv_host_ = PinnedMemory(2 * count * sizeof(int32_t));
        graphs_.reset();  // recorded steps name the old buffer
      } else {
        MOEX_CUDA_CHECK(cudaEventSynchronize(kv_event_));  // the previous step's copy has left kv_host_
      }
      auto* host = static_cast<int32_t*>(kv_host_.get());
      std::copy(step.row_seq.begin(), step.row_seq.end(), host);
      std::copy(step.row_pos.begin(), step.row_pos.end(), host + n);
      int32_t* tables = host + 2 * n;
      std::fill(tables, tables + num_seqs * stride, 0);
      for (int64_t seq = 0; seq < num_seqs; ++seq)
        std::copy_n(step.block_tables.begin() + seq * step.table_stride, used, tables + seq * stride);
      upload_pinned(host, kv_device_.get(), count * sizeof(int32_t));
      MOEX_CUDA_CHECK(cudaEventRecord(kv_event_, stream_));
      kv_device_pos_ = n == 1 ? step.row_pos[0] : -1;
      ++kv_uploads_;
    }
    const auto* device = static_cast<const int32_t*>(kv_device_.get());
    kv_device_rows_ = PagedKvRows{device, device + n, device + 2 * n, stride, step.page_size};
    kv_rows_ = n;
    kv_max_keys_ = max_keys;
    kv_bucket_keys_ = bucket;
    // A prefill chunk (one sequence, consecutive positions) lets attention blocks share K/V tiles across queries.
    kv_one_sequence_ = rows_form_one_chunk(step.row_seq.data(), step.row_pos.data(), n);
    kv_distinct_sequences_ = rows_are_distinct_sequences(step.row_seq.data(), n);
    kv_host_seq_ = step.row_seq.data();
    kv_host_pos_ = step.row_pos.data();
  }

  void kv_write(const KvStep& step, const TensorView& k, const TensorView& v, const TensorView& k_pages,
                const TensorView& v_pages) override {
    const int64_t n = checked_kv_write_rows(step, k, v, k_pages, v_pages);
    launch_kv_write_paged(k.as<float>(), v.as<float>(), k_pages.as<float>(), v_pages.as<float>(), kv_device_rows_, n,
                          k_pages.dim(2) * k_pages.dim(3), stream_);
    MOEX_CUDA_CHECK_LAUNCH();
  }

  void attention(const KvStep& step, const TensorView& q, const TensorView& k_pages, const TensorView& v_pages,
                 float scale, const TensorView& out) override {
    attention_launch(step, q, k_pages, v_pages, scale, out, nullptr, 0);
  }

  // Decode rows: the attention kernel rotates q and the step's k itself and stores the step's k and v: one launch
  // fewer per layer (H200, same call, against MOEX_CUDA_FUSED_ROPE=0: Model A 0.5077 vs 0.5275 ms/token, Model B
  // 2.4256 vs 2.5796). Other rows (several of one sequence), or MOEX_CUDA_FUSED_ROPE=0: the two ops.
  void rope_kv_attention(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView* q_norm,
                         const TensorView* k_norm, float eps, std::span<const int32_t> positions, int64_t rotary_dim,
                         double theta, const KvStep& step, const TensorView& k_pages, const TensorView& v_pages,
                         float scale, const TensorView& out) override {
    // The kernel reads each row's position from the prepared step (decode_rope_fits checks the shape).
    if (fused_rope_ && std::equal(positions.begin(), positions.end(), step.row_pos.begin(), step.row_pos.end())) {
      checked_kv_write_rows(step, k, v, k_pages, v_pages);
      DecodeRope rope;
      rope.k = k.as<float>();
      rope.v = v.as<float>();
      rope.k_pages = k_pages.as<float>();
      rope.v_pages = v_pages.as<float>();
      qk_norm_pointers(q_norm, k_norm, k.dim(-1), &rope.q_norm, &rope.k_norm, &rope.norm_bf16);
      rope.eps = eps;
      rope.rotary_dim = static_cast<int>(rotary_dim);
      rope.theta = static_cast<float>(theta);
      if (attention_launch(step, q, k_pages, v_pages, scale, out, &rope, rotary_dim)) return;
    }
    Backend::rope_kv_attention(q, k, v, q_norm, k_norm, eps, positions, rotary_dim, theta, step, k_pages, v_pages,
                               scale, out);
  }

  // attention(), or with rope the decode kernel's RoPE prologue: false (nothing launched) when rope is given and
  // the shape is not the decode kernel's (decode_rope_fits).
  bool attention_launch(const KvStep& step, const TensorView& q, const TensorView& k_pages, const TensorView& v_pages,
                        float scale, const TensorView& out, const DecodeRope* rope, int64_t rotary_dim) {
    check_f32(q, "attention", "q");
    check_f32(k_pages, "attention", "k_pages");
    check_f32(v_pages, "attention", "v_pages");
    check_f32(out, "attention", "out");
    check_attention_shapes(step, q, k_pages, v_pages, out, "cuda attention");
    AttentionShape shape;
    shape.num_queries = q.dim(0);
    shape.heads = q.dim(1);
    shape.head_dim = q.dim(2);
    shape.kv_heads = k_pages.dim(2);
    MOEX_ASSERT(shape.head_dim <= kAttentionMaxHeadDim, "cuda attention: head_dim {} (at most {})", shape.head_dim,
                kAttentionMaxHeadDim);
    check_prepared(step, shape.num_queries, k_pages.dim(0), "attention");
    shape.one_sequence = kv_one_sequence_;
    shape.distinct_sequences = kv_distinct_sequences_;
    // Inside a decode step the grid covers the bucket, so that one recording serves all of its positions.
    shape.max_keys = step_mode_ ? step_bucket_keys_ : kv_max_keys_;
    // Room the q/k/v GEMV just before leaves (launch_normed); gone once read, so no later launch takes it.
    shape.free_half_sms = std::exchange(free_half_sms_, 0);
    if (rope && !decode_rope_fits(shape, rotary_dim)) return false;
    void* ws = workspace(attention_workspace_bytes(shape, num_sms_));
    if (!capturing_) timeline_.begin(stream_);
    launch_attention(q.as<float>(), k_pages.as<float>(), v_pages.as<float>(), kv_device_rows_, out.as<float>(), shape,
                     scale, ws, num_sms_, stream_, rope);
    if (!capturing_) timeline_.end(stream_, "attention", shape.num_queries);
    MOEX_CUDA_CHECK_LAUNCH();
    return true;
  }

  void silu_mul(const TensorView& gate, const TensorView& up, const TensorView& out) override {
    check_f32(gate, "silu_mul", "gate");
    check_f32(up, "silu_mul", "up");
    check_f32(out, "silu_mul", "out");
    MOEX_ASSERT(gate.numel() == up.numel() && gate.numel() == out.numel(), "cuda silu_mul: shapes {} {} {}",
                gate.shape.str(), up.shape.str(), out.shape.str());
    launch_silu_mul(gate.as<float>(), up.as<float>(), out.as<float>(), gate.numel(), stream_);
    MOEX_CUDA_CHECK_LAUNCH();
  }

  void add_sigmoid_gated(const TensorView& acc, const TensorView& x, const TensorView& gate_logit) override {
    check_f32(acc, "add_sigmoid_gated", "acc");
    check_f32(x, "add_sigmoid_gated", "x");
    check_f32(gate_logit, "add_sigmoid_gated", "gate_logit");
    int64_t rows = gate_logit.numel(), cols = acc.numel() / std::max<int64_t>(rows, 1);
    MOEX_ASSERT(acc.numel() == x.numel() && rows * cols == acc.numel(), "cuda add_sigmoid_gated: {} {} {}",
                acc.shape.str(), x.shape.str(), gate_logit.shape.str());
    launch_add_sigmoid_gated(acc.as<float>(), x.as<float>(), gate_logit.as<float>(), rows, cols, stream_);
    MOEX_CUDA_CHECK_LAUNCH();
  }

  void route(const TensorView& logits, int64_t top_k, RouterScoring scoring, bool normalize,
             Routing* routing) override {
    check_f32(logits, "route", "logits");
    int64_t num_experts = logits.dim(-1), n = logits.numel() / std::max<int64_t>(num_experts, 1);
    MOEX_ASSERT(num_experts <= kRouterMaxExperts && top_k >= 1 && top_k <= std::min<int64_t>(kRouterMaxTopK, num_experts),
                "cuda route: {} experts (max {}), top_k {} (max {})", num_experts, kRouterMaxExperts, top_k,
                kRouterMaxTopK);
    refuse_while_capturing("route");
    routing->num_tokens = n;
    routing->top_k = top_k;
    routing->expert_ids.resize(static_cast<size_t>(n * top_k));
    routing->weights.resize(static_cast<size_t>(n * top_k));
    if (n == 0) return;
    size_t count = static_cast<size_t>(n * top_k);
    auto* dev = static_cast<char*>(workspace(2 * align16(count * 4)));
    auto* ids = reinterpret_cast<int32_t*>(dev);
    auto* weights = reinterpret_cast<float*>(dev + align16(count * 4));
    timeline_.begin(stream_);
    launch_router_topk(logits.as<float>(), n, num_experts, top_k, scoring == RouterScoring::kSigmoid, normalize,
                       ids, weights, stream_);
    MOEX_CUDA_CHECK_LAUNCH();
    if (readback_.bytes() < 2 * align16(count * 4)) readback_ = PinnedMemory(2 * align16(count * 4) * 2);
    MOEX_CUDA_CHECK(cudaMemcpyAsync(readback_.get(), dev, 2 * align16(count * 4), cudaMemcpyDeviceToHost, stream_));
    timeline_.end(stream_, "route", static_cast<int64_t>(count));
    MOEX_CUDA_CHECK(cudaStreamSynchronize(stream_));
    const char* host = static_cast<const char*>(readback_.get());
    std::memcpy(routing->expert_ids.data(), host, count * 4);
    std::memcpy(routing->weights.data(), host + align16(count * 4), count * 4);
  }

  bool argmax_rows(const TensorView& logits, std::span<int32_t> ids) override {
    check_f32(logits, "argmax_rows", "logits");
    const int64_t cols = logits.dim(-1), rows = logits.numel() / std::max<int64_t>(cols, 1);
    MOEX_ASSERT(static_cast<int64_t>(ids.size()) == rows && cols > 0, "cuda argmax_rows: {} ids for logits {}",
                ids.size(), logits.shape.str());
    refuse_while_capturing("argmax_rows");
    if (rows == 0) return true;
    const size_t ids_bytes = align16(static_cast<size_t>(rows) * sizeof(int32_t));
    auto* dev = static_cast<int32_t*>(workspace(ids_bytes + argmax_scratch_bytes(rows, cols)));
    launch_argmax_rows(logits.as<float>(), rows, cols, dev, reinterpret_cast<char*>(dev) + ids_bytes, stream_);
    MOEX_CUDA_CHECK_LAUNCH();
    read_ids(dev, ids);
    return true;
  }
  // ids from device memory, through the pinned readback buffer; waits for them.
  void read_ids(const int32_t* dev, std::span<int32_t> ids) {
    const size_t bytes = ids.size() * sizeof(int32_t);
    if (readback_.bytes() < bytes) readback_ = PinnedMemory(bytes * 2);
    MOEX_CUDA_CHECK(cudaMemcpyAsync(readback_.get(), dev, bytes, cudaMemcpyDeviceToHost, stream_));
    MOEX_CUDA_CHECK(cudaStreamSynchronize(stream_));
    std::memcpy(ids.data(), readback_.get(), bytes);
  }

  bool samples_on_device(int64_t vocab) const override {
    return sample_on_device_ && vocab <= kSampleMaxCols && sample_rows_supported();
  }
  bool sample_rows(const TensorView& logits, std::span<const TokenDraw> draws, std::span<int32_t> ids) override {
    check_f32(logits, "sample_rows", "logits");
    const int64_t cols = logits.dim(-1), rows = logits.numel() / std::max<int64_t>(cols, 1);
    MOEX_ASSERT(static_cast<int64_t>(ids.size()) == rows && static_cast<int64_t>(draws.size()) == rows && cols > 0,
                "cuda sample_rows: {} draws and {} ids for logits {}", draws.size(), ids.size(), logits.shape.str());
    refuse_while_capturing("sample_rows");
    const bool sampled = std::any_of(draws.begin(), draws.end(), [](const TokenDraw& d) { return d.temperature > 0; });
    if (!sampled) return argmax_rows(logits, ids);
    if (!samples_on_device(cols)) return false;
    if (rows == 0) return true;
    const size_t draw_bytes = align16(static_cast<size_t>(rows) * sizeof(DeviceDraw));
    const size_t ids_bytes = static_cast<size_t>(rows) * sizeof(int32_t);
    if (draws_host_.bytes() < draw_bytes) draws_host_ = PinnedMemory(draw_bytes * 2);  // the last call synchronized
    auto* host = static_cast<DeviceDraw*>(draws_host_.get());
    for (int64_t r = 0; r < rows; ++r) host[r] = device_draw(draws[r]);
    auto* dev = static_cast<char*>(workspace(draw_bytes + ids_bytes));
    upload_pinned(host, dev, static_cast<size_t>(rows) * sizeof(DeviceDraw));
    auto* dev_ids = reinterpret_cast<int32_t*>(dev + draw_bytes);
    launch_sample_rows(logits.as<float>(), rows, cols, reinterpret_cast<const DeviceDraw*>(dev), DeviceDraw{}, dev_ids,
                       stream_);
    MOEX_CUDA_CHECK_LAUNCH();
    read_ids(dev_ids, ids);
    return true;
  }

  // The pick kernel writes the id twice: into step_values_[0] (the next chained step's token) and into the pinned
  // slot that the device-side cursor names (PickSink), which the host reads once the slot's event completed (no
  // copy launch on the way back). A sampled draw travels as a kernel argument.
  bool chains_steps() const override { return chain_steps_; }
  void pick_token(const TensorView& logits, const TokenDraw& draw) override {
    refuse_while_capturing("pick_token");
    check_pick(logits, draw);
    enqueue_pick(logits, draw, /*advance_kv_row=*/false);
    note_pick();
  }

  // A greedy pick rides in the step's recording: the argmax's two launches follow the lm_head inside the graph
  // instead of after its end, and the pick moves the prepared KV row's position on by one, so the next step of the
  // sequence finds its row on the device (prepare_kv_step uploads nothing). MOEX_CUDA_PICK_IN_STEP=0: the pick
  // after the step, as the default decode_step_with_pick. A sampled draw changes every step: it stays outside.
  void decode_step_with_pick(int32_t token, int64_t position, const std::function<void()>& ops,
                             const TensorView& logits, const TokenDraw& draw) override {
    if (!pick_in_step_ || draw.temperature > 0.0f) {
      Backend::decode_step_with_pick(token, position, ops, logits, draw);
      return;
    }
    check_pick(logits, draw);
    run_step(token, position, [&] {
      {
        const ScopedFlag pick_follows(&greedy_pick_follows_);
        ops();
      }
      enqueue_pick(logits, draw, /*advance_kv_row=*/true);
    }, /*with_pick=*/true);
    note_pick();
    if (kv_device_pos_ >= 0) ++kv_device_pos_;
  }
  // Batched picks go to step_ids_ (the next chained batch's tokens) and, by a copy after the pick, into a slot of
  // the BatchPickRing. They run after the step's recording, so the slot is the host's to name (no device cursor as
  // for pick_token). Sampled draws travel through the slot's own pinned and device draws (sample_rows' single
  // buffer would be rewritten while an earlier pick still waits for its copy).
  bool chains_batch_steps(int64_t rows) const override {
    return chain_steps_ && rows >= 2 && rows <= kStepGraphMaxRows;
  }
  void pick_rows(const TensorView& logits, std::span<const TokenDraw> draws) override {
    refuse_while_capturing("pick_rows");
    check_f32(logits, "pick_rows", "logits");
    const int64_t cols = logits.dim(-1), rows = logits.numel() / std::max<int64_t>(cols, 1);
    MOEX_ASSERT(chains_batch_steps(rows) && cols > 0, "cuda pick_rows: logits {} (2..{} rows)", logits.shape.str(),
                kStepGraphMaxRows);
    MOEX_ASSERT(draws.empty() || static_cast<int64_t>(draws.size()) == rows, "cuda pick_rows: {} draws for {} rows",
                draws.size(), rows);
    MOEX_ASSERT(batch_picks_->pending() < BatchPickRing::kSlots, "cuda pick_rows: {} picks not read yet",
                BatchPickRing::kSlots);
    auto* ids = static_cast<int32_t*>(step_ids_.get());
    const bool sampled = std::any_of(draws.begin(), draws.end(), [](const TokenDraw& d) { return d.temperature > 0; });
    if (sampled) {
      MOEX_ASSERT(samples_on_device(cols), "cuda pick_rows: sampled draws over {} tokens", cols);
      const BatchPickRing::Draws slot = batch_picks_->next_draws();
      for (int64_t r = 0; r < rows; ++r) slot.host[r] = device_draw(draws[r]);
      upload_pinned(slot.host, slot.device, static_cast<size_t>(rows) * sizeof(DeviceDraw));
      launch_sample_rows(logits.as<float>(), rows, cols, slot.device, DeviceDraw{}, ids, stream_);
    } else {
      launch_argmax_rows(logits.as<float>(), rows, cols, ids, workspace(argmax_scratch_bytes(rows, cols)), stream_);
    }
    MOEX_CUDA_CHECK_LAUNCH();
    batch_picks_->enqueue(ids, rows, stream_);
    rows_picked_ = rows;
  }
  void picked_rows(std::span<int32_t> ids) override { batch_picks_->read(ids); }

  int32_t picked_token() override {
    MOEX_ASSERT(picks_read_ < picks_enqueued_, "cuda picked_token: no pick_token() waiting to be read");
    const uint64_t slot = picks_read_ % kMaxPendingPicks;
    MOEX_CUDA_CHECK(cudaEventSynchronize(pick_events_[slot]));
    ++picks_read_;
    return static_cast<const volatile int32_t*>(picks_host_.get())[slot];
  }

  void moe_experts(const TensorView& x, const Routing& routing, std::span<const ExpertWeights> experts,
                   const TensorView& out) override;
  bool prefers_device_routing() const override { return true; }
  void moe_routed(const TensorView& x, const TensorView& router, const TensorView& logits, int64_t top_k,
                  RouterScoring scoring, bool normalize, std::span<const ExpertWeights> experts,
                  const TensorView& out) override;

 private:
  // A decode step's ops, recorded per context bucket and per with_pick (a step whose recording ends with the pick,
  // decode_step_with_pick, and one without are different graphs).
  void run_step(int32_t token, int64_t position, const std::function<void()>& ops, bool with_pick) {
    const bool token_on_device = token == kTokenOnDevice;
    if (!graphs_enabled_ && !token_on_device) {
      ops();
      return;
    }
    MOEX_ASSERT(!token_on_device || next_token_picked_, "cuda decode_step at {}: the token is on the device only "
                "after pick_token()", position);
    // Attention's grid is sized for the bucket's longest context; blocks past the real one exit at once.
    const int64_t bucket = attention_key_bucket(position + 1);
    MOEX_ASSERT(kv_rows_ == 1 && kv_bucket_keys_ == bucket && kv_host_pos_[0] == position,
                "cuda decode_step at {}: prepare_kv_step({} rows) first", position, kv_rows_);
    // The step's position is its prepared KV row's (step_position_device), so a chained step, whose token the
    // pick kernel already wrote into step_values_[0], uploads nothing here: a copy of its own had sat between
    // every two recorded steps. MOEX_CUDA_STEP_POSITION_UPLOAD=1 uploads the position as before (A/B).
    auto* values = static_cast<int32_t*>(step_values_.get());
    const int32_t pair[2] = {token, static_cast<int32_t>(position)};
    if (!token_on_device) upload_step_values(0, pair, values);
    else if (!position_from_kv_) upload_step_values(1, std::span<const int32_t>(pair + 1, 1), values + 1);
    next_token_picked_ = false;
    step_rows_ = 1;
    step_token_ = token;
    step_position_ = position;
    step_bucket_keys_ = bucket;
    // Rows are reused only with graphs on (prepare_kv_step): only a step that runs eagerly there resyncs.
    run_in_step_mode(step_graph_key(bucket, 1, with_pick), ops, [this] { resync_kv_row(); });
  }

  // ops() in step mode: replayed from, or recorded into, the graph of key (before_eager, if any, runs first when
  // ops() runs eagerly there), or run eagerly with graphs off.
  void run_in_step_mode(int64_t key, const std::function<void()>& ops, const std::function<void()>& before_eager = {}) {
    const ScopedFlag in_step(&step_mode_);
    if (graphs_enabled_) graphs_.run(key, stream_, ops, &capturing_, before_eager);
    else ops();
  }

  // values into step_host_ from offset, uploaded to device. The pinned slots are rewritten only after their
  // previous copy has left (one event, rarely waited on: it left at the start of the step before).
  void upload_step_values(int64_t offset, std::span<const int32_t> values, void* device) {
    MOEX_CUDA_CHECK(cudaEventSynchronize(step_event_));
    int32_t* host = static_cast<int32_t*>(step_host_.get()) + offset;
    std::copy(values.begin(), values.end(), host);
    upload_pinned(host, device, values.size_bytes());
    MOEX_CUDA_CHECK(cudaEventRecord(step_event_, stream_));
  }

  // The normed GEMV of one row (gemv_normed_kernel) for the ops above and below, with the first layer's embedding
  // where embed is set; false, launching nothing, where it does not apply (the caller takes the Backend default).
  bool launch_normed(const TensorView& x, const TensorView* delta, const TensorView& weight, float eps,
                     std::span<const LinearOutput> outputs, const char* op, const EmbedRowIn& embed = {},
                     unsigned long long* argmax_key = nullptr) {
    ResidualNormIn in;
    const int64_t K = x.dim(-1);
    if (x.numel() != K || outputs.size() > static_cast<size_t>(kGemvMaxOutputs) ||
        !residual_norm_in(x, delta, nullptr, weight, eps, op, &in))
      return false;
    GemvOutput gemv[kGemvMaxOutputs];
    gemv_outputs(x, outputs, op, gemv);
    if (!launch_gemv_bf16_multi_normed(in, K, gemv, static_cast<int>(outputs.size()), num_sms_, stream_, embed,
                                       argmax_key))
      return false;
    MOEX_CUDA_CHECK_LAUNCH();
    int64_t rows = 0;
    for (const GemvOutput& o : std::span(gemv, outputs.size())) rows += o.rows;
    free_half_sms_ = gemv_normed_free_half_sms(rows, K, num_sms_);  // for the attention launched next
    return true;
  }

  // MOEX_CUDA_TAIL_TIMES=1: the layer tails' phases on standard error, at the backend's end (us after each block's
  // PDL wait; mean over blocks and launches, and the worst block of any launch).
  void print_tail_times() const {
    if (!tail_times_.get()) return;
    LayerTailTimes t{};
    if (cudaMemcpy(&t, tail_times_.get(), sizeof(t), cudaMemcpyDeviceToHost) != cudaSuccess || t.samples == 0) return;
    static const char* const kNames[kLayerTailEvents] = {
        "wait (before it)", "o_proj done", "o_proj barrier", "router rows done", "top-k known (producer)",
        "gate/up done", "gate/up barrier", "down + combine done", "combine barrier", "next q/k/v done"};
    const double blocks = static_cast<double>(num_sms_) * static_cast<double>(t.samples);
    std::fprintf(stderr, "layer tail: %llu launches of %d blocks, us after each block's PDL wait (mean / worst)\n",
                 t.samples, num_sms_);
    std::fprintf(stderr, "  %-24s %8.2f\n  %-24s %8.2f\n", "consumer waits (sum)",
                 static_cast<double>(t.consumer_wait_ns) / blocks / 1e3, "producer waits (sum)",
                 static_cast<double>(t.producer_wait_ns) / blocks / 1e3);
    for (int e = 0; e < kLayerTailEvents; ++e)
      std::fprintf(stderr, "  %-24s %8.2f %8.2f\n", kNames[e], static_cast<double>(t.sum_ns[e]) / blocks / 1e3,
                   static_cast<double>(t.max_ns[e]) / 1e3);
  }

  // moe_layer_tail's launch; false (nothing launched) where the kernel does not take the shapes.
  bool launch_layer_tail_op(const TensorView& attn, const TensorView& o_proj, const TensorView& x,
                            const TensorView* pending, const TensorView& ffn_norm, float eps, const TensorView& normed,
                            const TensorView& router, const TensorView& logits, int64_t top_k, RouterScoring scoring,
                            bool normalize, std::span<const ExpertWeights> experts, const TensorView& out,
                            const LayerTailNext* next) {
    const char* op = "moe_layer_tail";
    const int64_t hidden = x.dim(-1), num_experts = logits.dim(-1);
    if (x.numel() != hidden || o_proj.shape.ndim != 2 || router.shape.ndim != 2 ||
        static_cast<int64_t>(experts.size()) != num_experts || (next && next->outputs.size() > kGemvMaxOutputs))
      return false;
    for (const TensorView* t : {&attn, &x, &normed, &logits, &out}) check_f32(*t, op, "activation");
    if (pending) check_f32(*pending, op, "pending");
    MOEX_ASSERT(attn.numel() == o_proj.dim(1) && o_proj.dim(0) == hidden && normed.numel() == hidden &&
                    out.numel() == hidden && (!pending || pending->numel() == hidden) && router.dim(0) == num_experts &&
                    router.dim(1) == hidden && logits.numel() == num_experts,
                "cuda {}: attn {} o_proj {} x {} router {} logits {}", op, attn.shape.str(), o_proj.shape.str(),
                x.shape.str(), router.shape.str(), logits.shape.str());
    LayerTailParams p;
    p.hidden = static_cast<int>(hidden);
    p.qdim = static_cast<int>(o_proj.dim(1));
    p.attn = attn.as<float>();
    p.o_proj = bf16_data(o_proj, op, "o_proj");
    p.x = x.as<float>();
    p.pending = pending ? pending->as<float>() : nullptr;
    MOEX_ASSERT(ffn_norm.numel() == hidden, "cuda {}: ffn_norm {}", op, ffn_norm.shape.str());
    p.ffn_norm = vector_data(ffn_norm, &p.ffn_norm_bf16, op);
    p.eps = eps;
    p.normed = normed.as<float>();
    p.router = bf16_data(router, op, "router");
    p.logits = logits.as<float>();
    p.num_experts = static_cast<int>(num_experts);
    p.top_k = static_cast<int>(top_k);
    p.sigmoid_scoring = scoring == RouterScoring::kSigmoid;
    p.normalize = normalize;
    p.out = out.as<float>();
    if (next) {
      MOEX_ASSERT(next->norm && next->norm->numel() == hidden, "cuda {}: the next layer's norm", op);
      GemvOutput gemv[kGemvMaxOutputs];
      gemv_outputs(x, next->outputs, op, gemv);
      p.next_count = static_cast<int>(next->outputs.size());
      for (int i = 0; i < p.next_count; ++i) p.next[i] = gemv[i];
      p.next_norm = vector_data(*next->norm, &p.next_norm_bf16, op);
    }
    // The experts' rows are bulk-copied: every matrix 16-byte aligned (the uploads are; views into a stacked
    // checkpoint tensor may not be).
    const auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
    for (const ExpertWeights& w : experts)
      if (!w.valid() || !aligned(w.gate.data) || !aligned(w.up.data) || !aligned(w.down.data)) return false;
    int64_t ffn = 0;
    p.table = expert_table(experts, hidden, &ffn);
    p.ffn = static_cast<int>(ffn);
    p.counters = static_cast<LayerTailCounters*>(tail_counters_.get());
    p.times = static_cast<LayerTailTimes*>(tail_times_.get());
    p.slot_bytes = env_int("MOEX_CUDA_TAIL_SLOT_KB", 32) * 1024;
    p.act = static_cast<float*>(workspace(static_cast<size_t>(top_k * ffn) * sizeof(float)));
    if (!launch_layer_tail(p, num_sms_, stream_)) return false;
    MOEX_CUDA_CHECK_LAUNCH();
    ++layer_tails_;
    // The attention after it starts its blocks beside these, which hold most of each SM's shared memory.
    free_half_sms_ = 0;
    return true;
  }

  // Whether kv_device_ already holds this one-row step (in the layout of its bucket): the same sequence row and
  // table as the last upload, at the position the device's row has reached. A chained greedy step's recorded pick
  // moves that position on by one (decode_step_with_pick), so consecutive steps of a sequence upload only when a
  // page is added or the bucket changes: the copy had sat between every two recorded steps.
  bool kv_row_on_device(const KvStep& step, int64_t bucket, int64_t stride, int64_t used) const {
    if (step.row_seq.size() != 1 || kv_device_pos_ < 0 || step.row_pos[0] != kv_device_pos_ || kv_rows_ != 1 ||
        step.num_seqs() != 1 || bucket != kv_bucket_keys_ || stride != kv_device_rows_.table_stride ||
        step.page_size != kv_device_rows_.page_size)
      return false;
    const auto* host = static_cast<const int32_t*>(kv_host_.get());
    const int32_t* tables = host + 2;
    return host[0] == step.row_seq[0] && std::equal(tables, tables + used, step.block_tables.begin()) &&
           std::all_of(tables + used, tables + stride, [](int32_t page) { return page == 0; });
  }

  // A reused row (kv_row_on_device) may be read only by a recorded step: a graph launch starts after the stream's
  // earlier work has ended. Kernels launched one by one after the pick's launch would not: under programmatic
  // dependent launch the decode attention reads the row's position before its wait, while the pick may still be
  // moving it on. Before such eager ops the row is uploaded after all (the copy orders them fully).
  void resync_kv_row() {
    if (!kv_row_reused_) return;
    kv_row_reused_ = false;
    MOEX_CUDA_CHECK(cudaEventSynchronize(kv_event_));  // the last copy has left kv_host_
    auto* host = static_cast<int32_t*>(kv_host_.get());
    host[1] = static_cast<int32_t>(kv_device_pos_);  // one row: [seq, pos, table...]
    upload_pinned(host, kv_device_.get(), static_cast<size_t>(2 + kv_device_rows_.table_stride) * sizeof(int32_t));
    MOEX_CUDA_CHECK(cudaEventRecord(kv_event_, stream_));
    --kv_rows_reused_;
    ++kv_uploads_;
  }

  void check_pick(const TensorView& logits, const TokenDraw& draw) const {
    check_f32(logits, "pick_token", "logits");
    const int64_t cols = logits.dim(-1), rows = logits.numel() / std::max<int64_t>(cols, 1);
    MOEX_ASSERT(rows >= 1 && cols > 0, "cuda pick_token: logits {}", logits.shape.str());
    MOEX_ASSERT(picks_enqueued_ - picks_read_ < static_cast<uint64_t>(kMaxPendingPicks),
                "cuda pick_token: {} picks not read yet (picked_token)", kMaxPendingPicks);
    MOEX_ASSERT(draw.temperature <= 0.0f || samples_on_device(cols), "cuda pick_token: no device sampling over {} "
                "tokens", cols);
  }

  // The pick's launches (recordable): the id into step_values_[0] and the next ring slot; advance_kv_row moves the
  // prepared one-row KV step's position on by one.
  void enqueue_pick(const TensorView& logits, const TokenDraw& draw, bool advance_kv_row) {
    const int64_t cols = logits.dim(-1), rows = logits.numel() / cols;
    const float* last_row = logits.as<float>() + (rows - 1) * cols;
    auto* values = static_cast<int32_t*>(step_values_.get());
    const PickSink sink = pick_sink(advance_kv_row);
    if (draw.temperature > 0.0f)
      launch_sample_rows(last_row, 1, cols, nullptr, device_draw(draw), values, stream_, sink);
    else if (argmax_key_logits_ == last_row) {  // the lm_head's blocks folded this row's argmax (norm_logits)
      launch_argmax_key_pick(last_row, static_cast<unsigned long long*>(argmax_key_.get()), values, stream_, sink);
      argmax_key_logits_ = nullptr;  // the pick sets the key back to 0
      ++argmax_key_picks_;
    } else {
      launch_argmax_rows(last_row, 1, cols, values, workspace(argmax_scratch_bytes(1, cols)), stream_, sink);
    }
    MOEX_CUDA_CHECK_LAUNCH();
  }

  // Where a chained step's pick goes besides step_values_[0]: the next ring slot (the cursor is step_values_[2]);
  // advance_kv_row moves the prepared one-row KV step's position on by one.
  PickSink pick_sink(bool advance_kv_row) const {
    auto* values = static_cast<int32_t*>(step_values_.get());
    PickSink sink{static_cast<int32_t*>(picks_host_.get()), reinterpret_cast<uint32_t*>(values + 2),
                  kMaxPendingPicks, nullptr};
    if (advance_kv_row) {
      MOEX_ASSERT(kv_rows_ == 1, "cuda decode_step_with_pick: {} prepared KV rows", kv_rows_);
      sink.advance = const_cast<int32_t*>(kv_device_rows_.row_pos);  // kv_device_'s own memory
    }
    return sink;
  }

  // The host's side of a pick just enqueued: the event of its ring slot (the slot the device cursor gave it: picks
  // are counted alike on both sides).
  void note_pick() {
    MOEX_CUDA_CHECK(cudaEventRecord(pick_events_[picks_enqueued_ % kMaxPendingPicks], stream_));
    ++picks_enqueued_;
    next_token_picked_ = true;
  }

  // moe_routed's device-planned path; false, launching nothing, outside its envelope. With norm (one token), x
  // is where the kernel stores the normalised row (residual step in the planner's launch, moe.cuh).
  bool moe_routed_on_device(const TensorView& x, const TensorView& router, const TensorView& logits, int64_t top_k,
                            RouterScoring scoring, bool normalize, std::span<const ExpertWeights> experts,
                            const TensorView& out, const ResidualNormIn* norm);
  // moe_routed's prefill-sized batches planned on the device (the tensor-core path); false, launching nothing,
  // outside that envelope.
  bool moe_routed_prefill(const TensorView& x, const TensorView& router, const TensorView& logits, int64_t top_k,
                          RouterScoring scoring, bool normalize, std::span<const ExpertWeights> experts,
                          const TensorView& out);
  // The kernels' view of linear_many's outputs (checked against x): gemv[i] for outputs[i], at most
  // kGemvMaxOutputs.
  static void gemv_outputs(const TensorView& x, std::span<const LinearOutput> outputs, const char* op,
                           GemvOutput* gemv) {
    const std::string shapes_op = fmt::format("cuda {}", op);
    for (size_t i = 0; i < outputs.size(); ++i) {
      const TensorView& w = *outputs[i].w;
      const TensorView& out = *outputs[i].out;
      check_f32(out, op, "out");
      check_linear_shapes(x, w, outputs[i].bias, out, shapes_op.c_str());
      const float* bias = nullptr;
      if (outputs[i].bias && !outputs[i].bias->empty()) {
        check_f32(*outputs[i].bias, op, "bias");
        bias = outputs[i].bias->as<float>();
      }
      gemv[i] = GemvOutput{bf16_data(w, op, "w"), bias, out.as<float>(), w.dim(0)};
    }
  }
  // The residual step's operands for a consumer kernel; false where the kernels cannot take them (the caller
  // then runs the unfused ops).
  static bool residual_norm_in(const TensorView& x, const TensorView* d0, const TensorView* d1,
                               const TensorView& weight, float eps, const char* op, ResidualNormIn* in) {
    check_f32(x, op, "x");
    const int64_t K = x.dim(-1);
    for (const TensorView* d : {d0, d1}) {
      if (!d) continue;
      check_f32(*d, op, "delta");
      MOEX_ASSERT(d->numel() == x.numel(), "cuda {}: x {} delta {}", op, x.shape.str(), d->shape.str());
    }
    MOEX_ASSERT(weight.numel() == K, "cuda {}: x {} weight {}", op, x.shape.str(), weight.shape.str());
    bool w_bf16 = false;
    const void* wp = vector_data(weight, &w_bf16, op);
    *in = ResidualNormIn{x.as<float>(), d0 ? d0->as<float>() : nullptr, d1 ? d1->as<float>() : nullptr, wp, w_bf16,
                         eps};
    return residual_norm_fits(*in, K);
  }

  // kv_write's checks (dtypes, shapes, the prepared step); the step's row count.
  int64_t checked_kv_write_rows(const KvStep& step, const TensorView& k, const TensorView& v, const TensorView& k_pages,
                                const TensorView& v_pages) {
    check_f32(k, "kv_write", "k");
    check_f32(v, "kv_write", "v");
    check_f32(k_pages, "kv_write", "k_pages");
    check_f32(v_pages, "kv_write", "v_pages");
    const int64_t n = check_kv_write_shapes(step, k, v, k_pages, v_pages, "cuda kv_write");
    check_prepared(step, n, k_pages.dim(0), "kv_write");
    return n;
  }
  // The per-head q/k norm weights as the kernels take them (both null, or both fp32 / both bf16 [head_dim]).
  void qk_norm_pointers(const TensorView* q_norm, const TensorView* k_norm, int64_t head_dim, const void** qn,
                        const void** kn, bool* norm_bf16) const {
    MOEX_ASSERT((q_norm == nullptr) == (k_norm == nullptr), "cuda qk_norm_rope: q_norm and k_norm go together");
    *qn = *kn = nullptr;
    *norm_bf16 = false;
    if (!q_norm) return;
    bool k_bf16 = false;
    *qn = vector_data(*q_norm, norm_bf16, "qk_norm_rope");
    *kn = vector_data(*k_norm, &k_bf16, "qk_norm_rope");
    MOEX_ASSERT(q_norm->numel() == head_dim && k_norm->numel() == head_dim && k_bf16 == *norm_bf16,
                "cuda qk_norm_rope: norms {} {} for head_dim {}", q_norm->shape.str(), k_norm->shape.str(), head_dim);
  }

  // The qk_norm_rope kernel (with the cache write when kv.k_pages is set); false, launching nothing, for head
  // dims past its envelope.
  bool qk_norm_rope_launch(const TensorView& q, const TensorView& k, const TensorView* q_norm,
                           const TensorView* k_norm, float eps, std::span<const int32_t> positions,
                           int64_t rotary_dim, double theta, const KvWrite& kv) {
    check_f32(q, "qk_norm_rope", "q");
    check_f32(k, "qk_norm_rope", "k");
    MOEX_ASSERT(q.shape.ndim == 3 && k.shape.ndim == 3 && q.dim(0) == k.dim(0) && q.dim(2) == k.dim(2),
                "cuda qk_norm_rope: q {} k {} must be [n, heads, head_dim]", q.shape.str(), k.shape.str());
    const int64_t n = q.dim(0), head_dim = q.dim(2);
    MOEX_ASSERT(static_cast<int64_t>(positions.size()) == n, "cuda qk_norm_rope: {} positions for {} tokens",
                positions.size(), n);
    MOEX_ASSERT(rotary_dim % 2 == 0 && rotary_dim <= head_dim, "cuda qk_norm_rope: rotary_dim {} for head_dim {}",
                rotary_dim, head_dim);
    if (head_dim > kQkNormRopeMaxHeadDim) return false;
    const void* qn = nullptr;
    const void* kn = nullptr;
    bool norm_bf16 = false;
    qk_norm_pointers(q_norm, k_norm, head_dim, &qn, &kn, &norm_bf16);
    if (n == 0) return true;
    launch_qk_norm_rope(q.as<float>(), k.as<float>(), n, q.dim(1), k.dim(1), head_dim, qn, kn, norm_bf16, eps,
                        device_positions(positions, "qk_norm_rope"), rotary_dim, theta, kv, stream_);
    MOEX_CUDA_CHECK_LAUNCH();
    return true;
  }


  // A demand copy (copy()'s work on copy_stream_) after the compute stream's work so far, recorded in the
  // timeline and in the ring of copy events, so that wait_copies_through() can name it by its ticket.
  template <typename Copy>
  void enqueue_expert_copy(const char* op, int64_t bytes, Copy&& copy) {
    refuse_while_capturing(op);
    expert_copies_seen_.store(true, std::memory_order_relaxed);
    MOEX_CUDA_CHECK(cudaEventRecord(compute_mark_, stream_));
    MOEX_CUDA_CHECK(cudaStreamWaitEvent(copy_stream_, compute_mark_, 0));
    timeline_.begin(copy_stream_);
    copy();
    timeline_.end(copy_stream_, "copy", bytes);
    MOEX_CUDA_CHECK(cudaEventRecord(copy_events_[copies_enqueued_ % kCopyEvents], copy_stream_));
    ++copies_enqueued_;
  }
  // Host-dependent work cannot be recorded: throwing makes StepGraphs abandon the capture and run eagerly.
  void refuse_while_capturing(const char* op) const {
    if (capturing_) throw UsageError(fmt::format("cuda {}: not recordable inside a CUDA graph capture", op));
  }
  void* upload(const void* src, size_t bytes) {
    refuse_while_capturing("host upload");
    return staging_->upload(src, bytes, stream_, expert_copies_seen_.load(std::memory_order_relaxed));
  }
  // A small host-to-device copy on the compute stream from pinned memory. Once expert copies run on the copy
  // stream, a kernel reads it (launch_copy_from_pinned): a cudaMemcpyAsync would queue on the copy engine behind
  // an expert copy of hundreds of MB. Before that (every resident run) the memcpy stays: it is ~8 us per decode
  // step faster than the kernel's PCIe reads (H100: Model A 0.968 vs 0.984 ms/token with the kernel always).
  void upload_pinned(const void* host, void* device, size_t bytes) {
    copy_pinned_to_device(host, device, bytes, stream_, expert_copies_seen_.load(std::memory_order_relaxed));
  }
  // A copy whose source starts in pageable memory and ends in a range page-locked by register_host_memory
  // (the offloaded experts' pages hold neighbouring tensors too) fails with "invalid argument" (seen on an
  // H200 with the offloading fixture test): such a copy goes through a pageable bounce buffer of whole pages of
  // its own (PackedArray), which no locked range can share.
  void copy_host_to_device(void* dst, const void* src, size_t bytes) {
    cudaError_t status = cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream_);
    if (status == cudaErrorInvalidValue && !registered_.empty()) {
      cudaGetLastError();
      PackedArray<char> bounce(static_cast<const char*>(src), static_cast<const char*>(src) + bytes);
      MOEX_CUDA_CHECK(cudaMemcpyAsync(dst, bounce.data(), bytes, cudaMemcpyHostToDevice, stream_));
      MOEX_CUDA_CHECK(cudaStreamSynchronize(stream_));  // bounce dies here
      return;
    }
    MOEX_CUDA_CHECK(status);
  }
  // Token positions on the device: inside a decode step the step's own device values (so the step can be
  // replayed for later positions), else an upload.
  const int32_t* device_positions(std::span<const int32_t> positions, const char* op) {
    if (step_mode_ && step_rows_ == 1 && positions.size() == 1) {
      MOEX_ASSERT(positions[0] == step_position_, "cuda {}: position {} inside the decode step at {}", op,
                  positions[0], step_position_);
      return step_position_device();
    }
    if (step_mode_ && step_rows_ > 1 && static_cast<int64_t>(positions.size()) == step_rows_) {
      MOEX_ASSERT(std::equal(positions.begin(), positions.end(), kv_host_pos_),
                  "cuda {}: positions other than the prepared rows' inside a batched decode step", op);
      return kv_device_rows_.row_pos;
    }
    return static_cast<const int32_t*>(upload(positions.data(), positions.size_bytes()));
  }
  // The kv ops run on the rows prepare_kv_step() uploaded: step must be that KvStep.
  // Every kv op passes here first: outside a decode step (ops run one by one) a reused row is uploaded before the
  // op's kernel (resync_kv_row).
  void check_prepared(const KvStep& step, int64_t n, int64_t num_pages, const char* op) {
    MOEX_ASSERT(n == kv_rows_ && step.row_seq.data() == kv_host_seq_ && step.row_pos.data() == kv_host_pos_,
                "cuda {}: {} rows of a KvStep that prepare_kv_step() did not see ({} rows prepared)", op, n, kv_rows_);
    if (!capturing_) check_kv_step(step, n, num_pages, op);
    if (!step_mode_) resync_kv_row();
  }
  const int32_t* step_token_device() const { return static_cast<const int32_t*>(step_values_.get()); }
  // ids on the device, checked against the vocabulary: a decode step's one token is step_values_[0] (a chained
  // step's, kTokenOnDevice, is a pick of the argmax kernel: in range by construction); others are uploaded.
  const int32_t* device_token_ids(std::span<const int32_t> ids, int64_t vocab, const char* op) {
    const bool chained = step_mode_ && ((step_rows_ == 1 && ids.size() == 1 && ids[0] == kTokenOnDevice) ||
                                        (step_rows_ > 1 && step_ids_on_device_));
    if (!chained)
      for (int32_t id : ids) MOEX_ASSERT(id >= 0 && id < vocab, "cuda {}: token id {} outside [0, {})", op, id, vocab);
    if (step_mode_ && step_rows_ == 1 && ids.size() == 1) {
      MOEX_ASSERT(ids[0] == step_token_, "cuda {}: token {} inside the decode step of token {}", op, ids[0],
                  step_token_);
      return step_token_device();
    }
    if (step_mode_ && step_rows_ > 1 && static_cast<int64_t>(ids.size()) == step_rows_) {
      MOEX_ASSERT(step_ids_on_device_ ||
                      std::equal(ids.begin(), ids.end(), static_cast<const int32_t*>(step_host_.get()) + kStepHostIds),
                  "cuda {}: ids other than the batched decode step's", op);
      return static_cast<const int32_t*>(step_ids_.get());
    }
    return static_cast<const int32_t*>(upload(ids.data(), ids.size_bytes()));
  }
  // Whether ptr lies in a table map_host_weight mapped (host memory the device reads over the bus).
  bool host_mapped(const void* ptr) const {
    const auto* p = static_cast<const char*>(ptr);
    return std::any_of(host_weight_views_.begin(), host_weight_views_.end(),
                       [&](const std::pair<const char*, size_t>& m) { return p >= m.first && p < m.first + m.second; });
  }
  // Inside a decode step (one row): the prepared KV row's position, unless MOEX_CUDA_STEP_POSITION_UPLOAD=1.
  const int32_t* step_position_device() const {
    return position_from_kv_ ? kv_device_rows_.row_pos : static_cast<const int32_t*>(step_values_.get()) + 1;
  }
  // The layer's expert table as device pointers, uploaded on first use (keyed by the span's data pointer,
  // which the Backend contract of moe_routed keeps stable). ffn of the layer in *ffn.
  const MoeExpertPtrs* expert_table(std::span<const ExpertWeights> experts, int64_t hidden, int64_t* ffn);

  // Scratch for the op being enqueued. Growing synchronises (the old buffer may still be in use).
  // A device-planned MoE batch's buffers (count picks, room for `groups` groups) at the start of the workspace,
  // then `tail` bytes for the kernels' activations: one allocation, carved alike for the GEMV and GEMM paths.
  struct PlanWorkspace {
    MoePlanBuffers plan;
    char* tail;
  };
  PlanWorkspace plan_workspace(size_t count, size_t groups, size_t tail) {
    const size_t small = align16(count * 4), groups_bytes = align16(groups * sizeof(MoeGroup));
    auto* ws = static_cast<char*>(workspace(4 * small + groups_bytes + 16 + tail));
    const MoePlanBuffers plan{reinterpret_cast<int32_t*>(ws), reinterpret_cast<float*>(ws + small),
                              reinterpret_cast<int32_t*>(ws + 2 * small), reinterpret_cast<int32_t*>(ws + 3 * small),
                              reinterpret_cast<MoeGroup*>(ws + 4 * small),
                              reinterpret_cast<int32_t*>(ws + 4 * small + groups_bytes)};
    return PlanWorkspace{plan, ws + 4 * small + groups_bytes + 16};
  }

  void* workspace(size_t bytes) {
    if (bytes == 0) return nullptr;
    if (workspace_.bytes() < bytes) {
      refuse_while_capturing("workspace growth");
      MOEX_CUDA_CHECK(cudaStreamSynchronize(stream_));
      workspace_ = DeviceMemory(bytes + bytes / 4);
      graphs_.reset();  // recorded steps name the old workspace
    }
    return workspace_.get();
  }

  void moe_experts_generic(const TensorView& x, const Routing& routing, std::span<const ExpertWeights> experts,
                           const TensorView& out);

  static void convert(const TensorView& host, DType target, void* dst) {
    int64_t count = host.numel();
    for (int64_t i = 0; i < count; ++i) {
      float value = 0.f;
      switch (host.dtype) {
        case DType::kF32: value = host.as<const float>()[i]; break;
        case DType::kBF16: value = bf16_to_f32(host.as<const uint16_t>()[i]); break;
        case DType::kF16: value = f16_to_f32(host.as<const uint16_t>()[i]); break;
        case DType::kI32:
        case DType::kI64: MOEX_ASSERT(false, "integer weight"); break;
      }
      if (target == DType::kBF16)
        static_cast<uint16_t*>(dst)[i] = f32_to_bf16(value);
      else
        static_cast<float*>(dst)[i] = value;
    }
  }

  int device_idx_;
  int num_sms_ = 0;
  int64_t memory_at_start_ = 0;  // device memory in use once the constructor's context and buffers exist
  cudaStream_t stream_ = nullptr;
  cudaStream_t copy_stream_ = nullptr;  // expert prefetches (another thread)
  PackedCopier packed_copier_;          // packed expert rows: staging + unpack on copy_stream_
  std::vector<void*> registered_;       // page-locked host ranges, unregistered at destruction
  WeightArena arena_;
  std::deque<PinnedMemory> host_weights_;  // map_host_weight's tables (a deque: views keep their addresses)
  std::vector<std::pair<const char*, size_t>> host_weight_views_;  // their device addresses and sizes
  std::unique_ptr<StagingRing> staging_;
  DeviceMemory workspace_;
  PinnedMemory readback_;
  PinnedMemory draws_host_;  // sample_rows' draws on their way to the device
  // Decode-step mode (decode_step): token and position on the device, graphs per context bucket.
  DeviceMemory step_values_;  // int32 [token, position, the pick ring's cursor (PickSink), unused]
  // launch_moe_router_plan's counter of finished blocks, then (from byte 16) launch_moe_one_launch_one_token's
  // counters: all 0 between launches.
  DeviceMemory route_ticket_;
  // The lm_head's argmax key (argmax_key.h) for the greedy pick that follows it in a step (launch_argmax_key_pick);
  // 0 between steps. argmax_key_logits_: the logits whose key it holds until their pick is enqueued (else null).
  DeviceMemory argmax_key_;
  const float* argmax_key_logits_ = nullptr;
  int64_t argmax_key_picks_ = 0;
  bool greedy_pick_follows_ = false;  // inside decode_step_with_pick's ops: a greedy pick of the last row follows
  bool pick_in_lm_head_ = true;       // MOEX_CUDA_PICK_IN_LM_HEAD=0: the argmax's own two launches (A/B)
  DeviceMemory tail_counters_;  // launch_layer_tail's counters: all 0 between launches
  DeviceMemory tail_times_;     // MOEX_CUDA_TAIL_TIMES=1: where its launches' time went (print_tail_times)
  const bool position_from_kv_ = !env_equals("MOEX_CUDA_STEP_POSITION_UPLOAD", "1");  // decode_step says why
  // Pinned: [token, position] of a single-row step, from kStepHostIds a batched step's ids (decode_rows_step).
  static constexpr int64_t kStepHostIds = 4;
  PinnedMemory step_host_;
  cudaEvent_t step_event_ = nullptr;
  DeviceMemory step_ids_;  // a batched decode step's ids (decode_rows_step)
  // Chained decode steps (pick_token): a ring of pinned ids, each with the event of the kernel that wrote it.
  PinnedMemory picks_host_;
  std::array<cudaEvent_t, kMaxPendingPicks> pick_events_{};
  uint64_t picks_enqueued_ = 0, picks_read_ = 0;
  bool next_token_picked_ = false;  // step_values_[0] holds a pick no decode step has taken yet
  // Chained batched steps (pick_rows): the ring the picks reach the host through; step_ids_ holds the last pick's
  // rows_picked_ ids for the next batched step.
  std::unique_ptr<BatchPickRing> batch_picks_;
  int64_t rows_picked_ = 0;
  cudaEvent_t compute_mark_ = nullptr;   // copy_from_host_enqueue: the compute stream's work so far
  StreamTimeline timeline_;              // MOEX_CUDA_TIMELINE: spans of copies, expert work, read-backs
  // Expert copies have run on copy_stream_ (offloading): small uploads are then read by a kernel (upload_pinned).
  std::atomic<bool> expert_copies_seen_{false};
  // copy_from_host_enqueue's copies, each recorded in copy_events_[its number % kCopyEvents]; a ticket is a count.
  static constexpr uint64_t kCopyEvents = 64;
  std::array<cudaEvent_t, kCopyEvents> copy_events_{};
  uint64_t copies_enqueued_ = 0;
  bool graphs_enabled_ = true;
  bool fused_norms_ = true;
  bool chain_steps_ = true;
  bool sample_on_device_ = true;
  bool fused_rope_ = false;
  bool preload_down_ = false;
  int64_t free_half_sms_ = 0;  // launch_normed's grid leaves these SM halves empty (AttentionShape::free_half_sms)
  bool pick_in_step_ = true;
  bool fused_embedding_ = true;
  bool step_mode_ = false;
  bool capturing_ = false;
  int64_t step_rows_ = 0;  // the decode step's rows (1: decode_step; more: decode_rows_step)
  bool step_ids_on_device_ = false;  // a batched step's ids are pick_rows()'s (kTokenOnDevice)
  int32_t step_token_ = 0;
  int64_t step_position_ = 0;
  int64_t step_bucket_keys_ = 0;
  StepGraphs graphs_;
  // The prepared KvStep (prepare_kv_step): rows and tables on the device, uploaded from kv_host_.
  DeviceMemory kv_device_;
  PinnedMemory kv_host_;
  cudaEvent_t kv_event_ = nullptr;
  PagedKvRows kv_device_rows_;
  int64_t kv_rows_ = -1, kv_max_keys_ = 0, kv_bucket_keys_ = 0;
  bool kv_one_sequence_ = false;
  bool kv_distinct_sequences_ = false;  // no two rows of one sequence (AttentionShape::distinct_sequences)
  const int32_t* kv_host_seq_ = nullptr;
  const int32_t* kv_host_pos_ = nullptr;
  // The one row's position kv_device_ holds now (a recorded pick advances it: PickSink), -1 when it holds several
  // rows; the rest of kv_device_ is kv_host_'s. prepare_kv_step uploads nothing when the step is that.
  int64_t kv_device_pos_ = -1;
  bool kv_row_reused_ = false;  // the prepared step is such a row (no upload yet: resync_kv_row)
  int64_t kv_uploads_ = 0, kv_rows_reused_ = 0;
  int64_t prefill_plans_on_device_ = 0;  // moe_routed_prefill's batches (tests ask which path ran)
  std::unique_ptr<CublasGemm> cublas_;   // loaded on first use (cublas()), unless MOEX_CUDA_CUBLAS=0
  bool cublas_tried_ = false;
  int64_t cublas_gemms_ = 0;  // outputs computed through cuBLAS (tests ask which path ran)
  int64_t layer_tails_ = 0;   // moe_layer_tail's persistent launches (tests ask which path ran)
  struct ExpertTable {
    DeviceMemory pointers;
    std::vector<MoeExpertPtrs> host;  // what pointers holds: a hit must match it whole
    int64_t ffn = 0;
  };
  std::unordered_map<const ExpertWeights*, ExpertTable> expert_tables_;
};

void CudaBackend::moe_experts(const TensorView& x, const Routing& routing, std::span<const ExpertWeights> experts,
                              const TensorView& out) {
  check_f32(x, "moe_experts", "x");
  check_f32(out, "moe_experts", "out");
  const int64_t n = routing.num_tokens, top_k = routing.top_k;
  const int64_t hidden = x.dim(-1);
  MOEX_ASSERT(x.numel() == n * hidden && out.numel() == x.numel(), "cuda moe_experts: x {} out {} for {} tokens",
              x.shape.str(), out.shape.str(), n);
  if (n == 0) return;
  int64_t ffn = -1;
  for (int32_t id : routing.expert_ids) {
    if (id < 0) continue;
    MOEX_ASSERT(id < static_cast<int64_t>(experts.size()) && experts[id].valid(),
                "cuda moe_experts: expert {} routed to but not valid", id);
    const ExpertWeights& w = experts[id];
    bf16_data(w.gate, "moe_experts", "gate");
    bf16_data(w.up, "moe_experts", "up");
    bf16_data(w.down, "moe_experts", "down");
    if (ffn < 0) ffn = w.gate.dim(0);
    MOEX_ASSERT(w.gate.dim(0) == ffn && w.gate.dim(1) == hidden && w.up.dim(0) == ffn && w.up.dim(1) == hidden &&
                    w.down.dim(0) == hidden && w.down.dim(1) == ffn,
                "cuda moe_experts: expert {} gate {} up {} down {} vs hidden {} ffn {}", id, w.gate.shape.str(),
                w.up.shape.str(), w.down.shape.str(), hidden, ffn);
  }
  if (ffn < 0) {  // every pick skipped
    MOEX_CUDA_CHECK(cudaMemsetAsync(out.data, 0, out.nbytes(), stream_));
    return;
  }
  if (hidden % 8 != 0 || ffn % 8 != 0) {
    moe_experts_generic(x, routing, experts, out);
    return;
  }
  timeline_.begin(stream_);
  MoePlan plan = plan_moe(routing, experts, /*allow_gemm=*/true);
  const int64_t rows = plan.num_rows();
  ArgBlob blob;
  size_t off_groups = blob.add(plan.groups.data(), plan.groups.size());
  size_t off_token = blob.add(plan.row_token.data(), plan.row_token.size());
  size_t off_slot = blob.add(plan.slot.data(), plan.slot.size());
  size_t off_weight = blob.add(routing.weights.data(), routing.weights.size());
  auto* args = static_cast<char*>(upload(blob.bytes().data(), blob.bytes().size()));
  auto* groups = reinterpret_cast<const MoeGroup*>(args + off_groups);
  auto* row_token = reinterpret_cast<const int32_t*>(args + off_token);
  auto* slot = reinterpret_cast<const int32_t*>(args + off_slot);
  auto* weights = reinterpret_cast<const float*>(args + off_weight);
  const int num_groups = static_cast<int>(plan.groups.size());
  if (plan.use_gemm) {
    // The gate/up GEMM reads the tokens' rows through row_token (gemm_gathers): only x's n rows are rounded.
    const bool gather = gemm_gathers();
    size_t a_bytes = align16(static_cast<size_t>((gather ? n : rows) * hidden) * 2);
    size_t h_bytes = align16(static_cast<size_t>(rows * ffn) * 2);
    auto* ws = static_cast<char*>(workspace(a_bytes + h_bytes + static_cast<size_t>(rows * hidden) * 4));
    auto* a = reinterpret_cast<uint16_t*>(ws);
    auto* h = reinterpret_cast<uint16_t*>(ws + a_bytes);
    auto* y = reinterpret_cast<float*>(ws + a_bytes + h_bytes);
    if (gather)
      launch_f32_to_bf16(x.as<float>(), a, n * hidden, stream_);
    else
      launch_gather_rows_bf16(x.as<float>(), row_token, rows, hidden, a, stream_);
    launch_moe_gemm_gate_up(a, gather ? row_token : nullptr, groups, num_groups, plan.tile_rows, hidden, ffn, h,
                            stream_);
    launch_moe_gemm_down(h, groups, num_groups, plan.tile_rows, hidden, ffn, y, stream_);
    launch_moe_combine(y, slot, weights, n, top_k, hidden, out.as<float>(), stream_);
  } else {
    size_t h_bytes = align16(static_cast<size_t>(rows * ffn) * 4);
    auto* ws = static_cast<char*>(workspace(h_bytes + static_cast<size_t>(rows * hidden) * 4));
    auto* h = reinterpret_cast<float*>(ws);
    auto* y = reinterpret_cast<float*>(ws + h_bytes);
    launch_moe_gemv(x.as<float>(), row_token, groups, num_groups, plan.max_rows, hidden, ffn, h, y, stream_, nullptr,
                    num_sms_, num_groups);
    launch_moe_combine(y, slot, weights, n, top_k, hidden, out.as<float>(), stream_);
  }
  timeline_.end(stream_, "experts", rows);
  MOEX_CUDA_CHECK_LAUNCH();
}

const MoeExpertPtrs* CudaBackend::expert_table(std::span<const ExpertWeights> experts, int64_t hidden,
                                               int64_t* ffn) {
  // Keyed by the span's address, but a hit must name the same weights: a table freed and another allocated at
  // its address (a second model on this backend, a test's next case) would otherwise run the old experts, whose
  // memory may be gone. Comparing the pointers is a few hundred loads; a miss uploads (and synchronises).
  auto it = expert_tables_.find(experts.data());
  if (it != expert_tables_.end() && it->second.host.size() == experts.size() &&
      std::equal(experts.begin(), experts.end(), it->second.host.begin(),
                 [](const ExpertWeights& w, const MoeExpertPtrs& p) {
                   return w.gate.data == p.gate && w.up.data == p.up && w.down.data == p.down;
                 })) {
    *ffn = it->second.ffn;
    return static_cast<const MoeExpertPtrs*>(it->second.pointers.get());
  }
  refuse_while_capturing("expert table upload");
  std::vector<MoeExpertPtrs> host(experts.size());
  int64_t layer_ffn = -1;
  for (size_t e = 0; e < experts.size(); ++e) {
    const ExpertWeights& w = experts[e];
    MOEX_ASSERT(w.valid(), "cuda moe_routed: expert {} of the layer's table is not resident", e);
    host[e] = MoeExpertPtrs{bf16_data(w.gate, "moe_routed", "gate"), bf16_data(w.up, "moe_routed", "up"),
                            bf16_data(w.down, "moe_routed", "down")};
    if (layer_ffn < 0) layer_ffn = w.gate.dim(0);
    MOEX_ASSERT(w.gate.dim(0) == layer_ffn && w.gate.dim(1) == hidden && w.up.dim(0) == layer_ffn &&
                    w.up.dim(1) == hidden && w.down.dim(0) == hidden && w.down.dim(1) == layer_ffn,
                "cuda moe_routed: expert {} gate {} up {} down {} vs hidden {} ffn {}", e, w.gate.shape.str(),
                w.up.shape.str(), w.down.shape.str(), hidden, layer_ffn);
  }
  ExpertTable table;
  table.pointers = DeviceMemory(std::max<size_t>(host.size() * sizeof(MoeExpertPtrs), 1));
  table.ffn = layer_ffn;
  MOEX_CUDA_CHECK(cudaMemcpyAsync(table.pointers.get(), host.data(), host.size() * sizeof(MoeExpertPtrs),
                                  cudaMemcpyHostToDevice, stream_));
  // Also what a replaced table's launches still read (the sync makes them done): recorded steps naming it go.
  MOEX_CUDA_CHECK(cudaStreamSynchronize(stream_));
  table.host = std::move(host);
  *ffn = layer_ffn;
  if (it != expert_tables_.end()) graphs_.reset();
  auto& slot = expert_tables_[experts.data()] = std::move(table);
  return static_cast<const MoeExpertPtrs*>(slot.pointers.get());
}

void CudaBackend::moe_routed(const TensorView& x, const TensorView& router, const TensorView& logits, int64_t top_k,
                             RouterScoring scoring, bool normalize, std::span<const ExpertWeights> experts,
                             const TensorView& out) {
  if (moe_routed_on_device(x, router, logits, top_k, scoring, normalize, experts, out, nullptr)) return;
  refuse_while_capturing("moe_routed outside the device-planned envelope");
  Backend::moe_routed(x, router, logits, top_k, scoring, normalize, experts, out);
}

bool CudaBackend::moe_routed_on_device(const TensorView& x, const TensorView& router, const TensorView& logits,
                                       int64_t top_k, RouterScoring scoring, bool normalize,
                                       std::span<const ExpertWeights> experts, const TensorView& out,
                                       const ResidualNormIn* norm) {
  check_f32(x, "moe_routed", "x");
  check_f32(logits, "moe_routed", "logits");
  check_f32(out, "moe_routed", "out");
  const uint16_t* router_data = bf16_data(router, "moe_routed", "router");
  const int64_t hidden = x.dim(-1), num_experts = logits.dim(-1);
  const int64_t n = logits.numel() / std::max<int64_t>(num_experts, 1), total = n * top_k;
  MOEX_ASSERT(x.numel() == n * hidden && out.numel() == x.numel() &&
                  num_experts == static_cast<int64_t>(experts.size()) && router.shape.ndim == 2 &&
                  router.dim(0) == num_experts && router.dim(1) == hidden,
              "cuda moe_routed: x {} router {} logits {} out {} for a table of {} experts", x.shape.str(),
              router.shape.str(), logits.shape.str(), out.shape.str(), experts.size());
  MOEX_ASSERT(num_experts <= kRouterMaxExperts && top_k >= 1 && top_k <= std::min<int64_t>(kRouterMaxTopK, num_experts),
              "cuda moe_routed: {} experts (max {}), top_k {} (max {})", num_experts, kRouterMaxExperts, top_k,
              kRouterMaxTopK);
  if (n == 0) return true;
  if (n > 2 * kMoeGemvMaxRows && !norm)
    return moe_routed_prefill(x, router, logits, top_k, scoring, normalize, experts, out);
  // Device-side planning here covers the GEMV path (few tokens per expert); prefill-sized batches take
  // moe_routed_prefill's. The residual step rides along at one token with top_k <= kMoeOneTokenMaxTopK only.
  if (n > 2 * kMoeGemvMaxRows || total > kMoeRoutePlanMaxAssignments || hidden % 8 != 0 ||
      !moe_router_plan_fits(x.as<float>(), router_data, hidden) ||
      (norm && (n != 1 || top_k > kMoeOneTokenMaxTopK)))
    return false;
  int64_t ffn = 0;
  const MoeExpertPtrs* table = expert_table(experts, hidden, &ffn);
  if (ffn % 8 != 0) return false;
  const size_t count = static_cast<size_t>(total);
  const size_t h_bytes = align16(count * static_cast<size_t>(ffn) * 4);
  const PlanWorkspace ws = plan_workspace(count, count, h_bytes + count * hidden * 4);
  const MoePlanBuffers& plan = ws.plan;
  const int32_t *row_token = plan.row_token, *slot = plan.slot, *num_groups = plan.num_groups;
  const float* weights = plan.weights;
  const MoeGroup* groups = plan.groups;
  auto* h = reinterpret_cast<float*>(ws.tail);
  auto* y = reinterpret_cast<float*>(ws.tail + h_bytes);
  // One token: every group has one row (a token's picks are distinct experts), the 1-row kernel instance.
  // A token picks an expert at most once, so no group has more rows than there are tokens. The host does not
  // see the plan, so the expert kernels' instance (registers, blocks per SM) is picked for the largest group the
  // planner may form: groups are cut at about twice the average rows per expert (8, 16 or 32), not at the
  // token count. At 32 sequences every expert had run the 32-token instance (1 block per SM) whatever its
  // tokens: Model A's MoE at ~57% of HBM, Model B's 128 experts with ~2 tokens each. An expert routed more
  // tokens than the cut runs as two groups (its weights read twice).
  // The row-split kernels (mma_rows.cuh) stage a group's tokens once for all of its weight rows and skip the
  // n-tiles a group leaves empty, so there every expert is one group of up to kMoeGemvMaxRows rows: its weights read
  // once.
  const int64_t average_rows = (total + num_experts - 1) / num_experts;
  int64_t group_cap = 8;
  const bool rows_kernels = moe_rows_kernels_take(std::min<int64_t>(n, kMoeGemvMaxRows), hidden, ffn);
  while (group_cap < (rows_kernels ? n : 2 * average_rows) && group_cap < kMoeGemvMaxRows) group_cap *= 2;
  const int max_rows = static_cast<int>(std::min<int64_t>(n, group_cap));
  // One token with the residual step: the router launch writes only the logits, the gate/up launch routes and
  // plans (kernels/moe_topk_gate_up.cu; H200, same call: Model A 0.5280 vs 0.5370 ms/token, Model B 2.5797 vs
  // 2.7381). MOEX_CUDA_TOPK_IN_GATE_UP=0 plans in the router's launch (A/B; read at every launch so that tests
  // can switch it).
  const bool topk_in_gate_up = norm && n == 1 && !env_equals("MOEX_CUDA_TOPK_IN_GATE_UP", "0");
  // One token: the router GEMV rides in the planner's launch. More: linear()'s kernel, then the planner.
  if (n > 1) linear(x, router, nullptr, logits);
  launch_moe_router_plan(x.as<float>(), n == 1 ? router_data : nullptr, n, hidden, num_experts, top_k,
                         scoring == RouterScoring::kSigmoid, normalize, table, static_cast<int>(group_cap),
                         logits.as<float>(), plan, static_cast<unsigned*>(route_ticket_.get()), stream_, norm,
                         norm ? x.as<float>() : nullptr, topk_in_gate_up);
  // ... and the rest of the block in the same launch (kernels/moe_one_launch.cu) where that pays
  // (moe_one_launch_pays). MOEX_CUDA_MOE_ONE_LAUNCH=1 / 0 forces it on / off (A/B; read at every launch so that
  // tests can switch it).
  const bool one_launch = topk_in_gate_up && !env_equals("MOEX_CUDA_MOE_ONE_LAUNCH", "0") &&
                          (env_equals("MOEX_CUDA_MOE_ONE_LAUNCH", "1") || moe_one_launch_pays(hidden));
  if (one_launch) {
    auto* counters = reinterpret_cast<MoeOneLaunchCounters*>(static_cast<char*>(route_ticket_.get()) + 16);
    launch_moe_one_launch_one_token(x.as<float>(), logits.as<float>(), hidden, ffn, num_experts, top_k,
                                    scoring == RouterScoring::kSigmoid, normalize, table, plan, h, *norm,
                                    out.as<float>(), counters, num_sms_, stream_);
    MOEX_CUDA_CHECK_LAUNCH();
    return true;
  }
  if (topk_in_gate_up) {
    launch_moe_topk_gate_up_one_token(x.as<float>(), logits.as<float>(), hidden, ffn, num_experts, top_k,
                                      scoring == RouterScoring::kSigmoid, normalize, table, plan, h, *norm,
                                      out.as<float>(), num_sms_, stream_);
    MOEX_CUDA_CHECK_LAUNCH();
    return true;
  }
  if (n == 1 && top_k <= kMoeOneTokenMaxTopK) {  // decode at batch 1: down and the combine in one kernel
    launch_moe_gemv_one_token(x.as<float>(), row_token, groups, static_cast<int>(top_k), hidden, ffn, slot, weights, h,
                              out.as<float>(), num_sms_, stream_, preload_down_);
    MOEX_CUDA_CHECK_LAUNCH();
    return true;
  }
  launch_moe_gemv(x.as<float>(), row_token, groups, static_cast<int>(total), max_rows, hidden, ffn, h, y, stream_,
                  num_groups, num_sms_, static_cast<int>(std::min(total, num_experts)));
  launch_moe_combine(y, slot, weights, n, top_k, hidden, out.as<float>(), stream_);
  MOEX_CUDA_CHECK_LAUNCH();
  return true;
}

// Prefill-sized batches: the router's logits (linear), the top-k, the plan and the tensor-core experts all on the
// device. Before, route() brought the ids to the host for plan_moe: a synchronising copy in every MoE layer, with
// the GPU idle until the plan's upload. The plan is plan_moe's (moe_prefill_plan.cu), so the output is the same
// bits. Not (false, nothing launched): MOEX_CUDA_PREFILL_PLAN=0 (A/B; read at every call); more experts than the
// planner's block holds; too few rows per expert for plan_moe to take the GEMM path even with every expert
// active; shapes off the kernels' envelope.
bool CudaBackend::moe_routed_prefill(const TensorView& x, const TensorView& router, const TensorView& logits,
                                     int64_t top_k, RouterScoring scoring, bool normalize,
                                     std::span<const ExpertWeights> experts, const TensorView& out) {
  const int64_t hidden = x.dim(-1), num_experts = logits.dim(-1);
  const int64_t n = logits.numel() / num_experts, total = n * top_k;
  if (env_equals("MOEX_CUDA_PREFILL_PLAN", "0") || num_experts > kMoePrefillPlanMaxExperts || hidden % 8 != 0 ||
      total / num_experts <= kMoeGemmMinAvgRows)
    return false;
  int64_t ffn = 0;
  const MoeExpertPtrs* table = expert_table(experts, hidden, &ffn);
  if (ffn % 8 != 0) return false;
  // plan_moe's tile size follows the rows per active expert; the host does not see which experts are active, so
  // this takes every expert as active: the same choice unless some expert gets no token and the rest average
  // 128 rows or more (then 64-row tiles where plan_moe cuts 128: the same sums on another kernel instance, not
  // checked to be the same bits).
  const int tile_rows = moe_gemm_tile_rows(total, num_experts);
  const int64_t max_tiles = moe_prefill_max_tiles(total, num_experts, tile_rows);
  // Gathering in the GEMM (gemm_gathers): x's rows are rounded to bf16 once, into the plan's workspace, and serve
  // both the router's GEMM (as linear() would have read its own copy) and the gate/up GEMM through row_token.
  // Otherwise linear() first (it takes the workspace for its bf16 copy of x), then a gathered copy.
  const bool gather = gemm_gathers() && n > kLinearGemmMinRows;
  const uint16_t* router_w = bf16_data(router, "moe_routed", "router");  // shapes: checked by moe_routed_on_device
  if (!gather) linear(x, router, nullptr, logits);
  if (!capturing_) timeline_.begin(stream_);
  const size_t count = static_cast<size_t>(total);
  const size_t a_bytes = align16((gather ? static_cast<size_t>(n) : count) * static_cast<size_t>(hidden) * 2);
  const size_t h_bytes = align16(count * static_cast<size_t>(ffn) * 2);
  const size_t split_floats = gather ? dense_gemm_split_floats(n, hidden, num_experts, num_sms_) : 0;
  const size_t y_bytes = align16(count * hidden * 4);
  const size_t split_bytes = align16(split_floats * sizeof(float));
  const size_t counts_bytes = static_cast<size_t>(moe_prefill_plan_counts(total, num_experts)) * sizeof(int32_t);
  const PlanWorkspace ws = plan_workspace(count, static_cast<size_t>(max_tiles),
                                          a_bytes + h_bytes + y_bytes + split_bytes + counts_bytes);
  const MoePlanBuffers& plan = ws.plan;  // plan.groups: the tiles, plan.num_groups: their count
  auto* a = reinterpret_cast<uint16_t*>(ws.tail);
  auto* h = reinterpret_cast<uint16_t*>(ws.tail + a_bytes);
  auto* y = reinterpret_cast<float*>(ws.tail + a_bytes + h_bytes);
  auto* split = reinterpret_cast<float*>(ws.tail + a_bytes + h_bytes + y_bytes);
  auto* plan_counts = reinterpret_cast<int32_t*>(ws.tail + a_bytes + h_bytes + y_bytes + split_bytes);
  if (gather) {
    launch_f32_to_bf16(x.as<float>(), a, n * hidden, stream_);
    const GemvOutput router_out{router_w, nullptr, logits.as<float>(), num_experts};
    dense_gemm(a, n, hidden, &router_out, 1, split, split_floats);
  }
  launch_router_topk(logits.as<float>(), n, num_experts, top_k, scoring == RouterScoring::kSigmoid, normalize,
                     plan.ids, plan.weights, stream_);
  launch_moe_prefill_plan(plan.ids, total, top_k, num_experts, table, tile_rows, plan_counts, plan.row_token,
                          plan.slot, plan.groups, plan.num_groups, stream_);
  if (!gather) launch_gather_rows_bf16(x.as<float>(), plan.row_token, total, hidden, a, stream_);
  const int grid_tiles = static_cast<int>(max_tiles);
  launch_moe_gemm_gate_up(a, gather ? plan.row_token : nullptr, plan.groups, grid_tiles, tile_rows, hidden, ffn, h,
                          stream_, plan.num_groups);
  launch_moe_gemm_down(h, plan.groups, grid_tiles, tile_rows, hidden, ffn, y, stream_, plan.num_groups);
  launch_moe_combine(y, plan.slot, plan.weights, n, top_k, hidden, out.as<float>(), stream_);
  if (!capturing_) timeline_.end(stream_, "experts", total);
  MOEX_CUDA_CHECK_LAUNCH();
  ++prefill_plans_on_device_;
  return true;
}

// Shapes outside the kernels' envelope (hidden or ffn not a multiple of 8, only in tiny test models): one
// expert application at a time through the scalar GEMV. Slow, exact.
void CudaBackend::moe_experts_generic(const TensorView& x, const Routing& routing,
                                      std::span<const ExpertWeights> experts, const TensorView& out) {
  const int64_t n = routing.num_tokens, top_k = routing.top_k, hidden = x.dim(-1);
  int64_t ffn = 0;
  for (int32_t id : routing.expert_ids)
    if (id >= 0) ffn = experts[id].gate.dim(0);
  size_t bytes = static_cast<size_t>(3 * ffn + hidden) * 4;
  auto* ws = static_cast<float*>(workspace(bytes));
  float *gate = ws, *up = ws + ffn, *act = ws + 2 * ffn, *y = ws + 3 * ffn;
  MOEX_CUDA_CHECK(cudaMemsetAsync(out.data, 0, out.nbytes(), stream_));
  for (int64_t t = 0; t < n; ++t) {
    const float* xt = x.as<float>() + t * hidden;
    float* ot = out.as<float>() + t * hidden;
    for (int64_t j = 0; j < top_k; ++j) {
      if (routing.expert_ids[t * top_k + j] < 0) continue;
      const ExpertWeights& w = experts[routing.expert_ids[t * top_k + j]];
      launch_gemv_bf16(xt, 1, static_cast<const uint16_t*>(w.gate.data), ffn, hidden, nullptr, gate, num_sms_, stream_);
      launch_gemv_bf16(xt, 1, static_cast<const uint16_t*>(w.up.data), ffn, hidden, nullptr, up, num_sms_, stream_);
      launch_silu_mul(gate, up, act, ffn, stream_);
      launch_gemv_bf16(act, 1, static_cast<const uint16_t*>(w.down.data), hidden, ffn, nullptr, y, num_sms_, stream_);
      launch_axpy(routing.weights[t * top_k + j], y, ot, hidden, stream_);
    }
  }
  MOEX_CUDA_CHECK_LAUNCH();
}

}  // namespace
}  // namespace cuda

int cuda_device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return count;
}

std::string cuda_device_description(int device_idx) {
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, device_idx) != cudaSuccess) {
    cudaGetLastError();
    return "no CUDA device";
  }
  return fmt::format("{}, sm_{}{}, {} SMs, {:.1f} GiB", prop.name, prop.major, prop.minor, prop.multiProcessorCount,
                     static_cast<double>(prop.totalGlobalMem) / (1 << 30));
}

CudaStepGraphStats cuda_step_graph_stats(const Backend& backend) {
  const auto* cuda = dynamic_cast<const cuda::CudaBackend*>(&backend);
  return cuda ? cuda->step_graph_stats() : CudaStepGraphStats{};
}

int64_t cuda_prefill_plans_on_device(const Backend& backend) {
  const auto* cuda = dynamic_cast<const cuda::CudaBackend*>(&backend);
  return cuda ? cuda->prefill_plans_on_device() : 0;
}

int64_t cuda_cublas_gemms(const Backend& backend) {
  const auto* cuda = dynamic_cast<const cuda::CudaBackend*>(&backend);
  return cuda ? cuda->cublas_gemms() : 0;
}

int64_t cuda_layer_tails(const Backend& backend) {
  const auto* cuda = dynamic_cast<const cuda::CudaBackend*>(&backend);
  return cuda ? cuda->layer_tails() : 0;
}

std::unique_ptr<Backend> make_cuda_backend(int device_idx) { return std::make_unique<cuda::CudaBackend>(device_idx); }

}  // namespace moex
