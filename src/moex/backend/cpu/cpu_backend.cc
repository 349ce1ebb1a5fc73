// CpuBackend: checks each op's tensors against the Backend contract (a mismatch is a bug in the
// caller, so MOEX_ASSERT), then hands raw pointers to the kernels in this folder.
#include "moex/backend/cpu/cpu_backend.h"

#include <cstring>

#include <fmt/format.h>

#include "moex/backend/cpu/linear_kernels.h"
#include "moex/backend/cpu/moe.h"
#include "moex/backend/cpu/packed_linear.h"
#include "moex/backend/cpu/ops.h"
#include "moex/core/thread_pool.h"

namespace moex {
namespace {

class CpuBuffer : public Buffer {
 public:
  CpuBuffer(DType dtype, Shape shape) : storage_(dtype, shape) { view = storage_.view(); }

 private:
  HostTensor storage_;
};

bool is_float_dtype(DType dtype) { return dtype == DType::kF32 || dtype == DType::kF16 || dtype == DType::kBF16; }

void check_f32(const TensorView& t, const char* op, const char* what) {
  MOEX_ASSERT(t.device == Device::kCpu && t.dtype == DType::kF32 && t.data != nullptr,
              "{}: {} must be a CPU F32 tensor (dtype {}, {})", op, what, dtype_name(t.dtype),
              t.data ? "non-null" : "null");
}

class CpuBackend final : public Backend {
 public:
  explicit CpuBackend(int num_threads) : pool_(num_threads) {}

  Device device() const override { return Device::kCpu; }
  std::string name() const override { return fmt::format("cpu ({} threads)", pool_.num_threads()); }

  std::unique_ptr<Buffer> alloc(DType dtype, Shape shape) override {
    return std::make_unique<CpuBuffer>(dtype, shape);
  }
  TensorView upload_weight(const TensorView& host, const std::string& name) override {
    MOEX_ASSERT(host.device == Device::kCpu, "weight {} is not in host memory", name);
    return host;
  }
  void copy_to_host(const TensorView& src, void* dst) override { std::memcpy(dst, src.data, src.nbytes()); }
  void copy_from_host(const void* src, const TensorView& dst) override { std::memcpy(dst.data, src, dst.nbytes()); }
  // The fast tier is host memory too: packed expert rows are unpacked straight into it.
  void copy_packed_from_host_async_path(const PackedBf16& src, int64_t row_begin, int64_t row_end,
                                        const TensorView& dst) override {
    copy_packed(src, row_begin, row_end, dst);
  }
  void copy_packed_from_host_enqueue(const PackedBf16& src, int64_t row_begin, int64_t row_end,
                                     const TensorView& dst) override {
    copy_packed(src, row_begin, row_end, dst);
  }

  void embedding(std::span<const int32_t> ids, const TensorView& table, const TensorView& out) override {
    check_f32(out, "embedding", "out");
    MOEX_ASSERT(table.shape.ndim == 2 && is_float_dtype(table.dtype), "embedding: table {} {}",
                dtype_name(table.dtype), table.shape.str());
    int64_t hidden = table.dim(1);
    MOEX_ASSERT(out.numel() == static_cast<int64_t>(ids.size()) * hidden, "embedding: out {} for {} ids x {}",
                out.shape.str(), ids.size(), hidden);
    cpu::embedding(ids, table.data, table.dtype, table.dim(0), hidden, out.as<float>());
  }

  void linear(const TensorView& x, const TensorView& w, const TensorView* bias, const TensorView& out) override {
    check_f32(x, "linear", "x");
    check_f32(out, "linear", "out");
    MOEX_ASSERT(is_float_dtype(w.dtype), "linear: weight dtype {}", dtype_name(w.dtype));
    const LinearDims dims = check_linear_shapes(x, w, bias, out, "linear");
    const int64_t out_features = dims.out_features, in_features = dims.in_features, n = dims.rows;
    cpu::LinearProblem p;
    p.x = x.as<float>();
    p.ldx = in_features;
    p.m = n;
    p.k = in_features;
    p.w = w.data;
    p.w_dtype = w.dtype;
    if (bias && !bias->empty()) {
      MOEX_ASSERT(is_float_dtype(bias->dtype), "linear: bias dtype {}", dtype_name(bias->dtype));
      p.bias = bias->data;
      p.bias_dtype = bias->dtype;
    }
    p.out = out.as<float>();
    p.ldo = out_features;
    cpu::linear(pool_, p, out_features);
  }

  void rms_norm(const TensorView& x, const TensorView& weight, float eps, const TensorView& out) override {
    check_f32(x, "rms_norm", "x");
    check_f32(out, "rms_norm", "out");
    int64_t cols = weight.numel();
    MOEX_ASSERT(cols > 0 && is_float_dtype(weight.dtype) && x.numel() % cols == 0 && out.numel() == x.numel(),
                "rms_norm: x {} weight {} out {}", x.shape.str(), weight.shape.str(), out.shape.str());
    cpu::rms_norm(pool_, x.as<float>(), weight.data, weight.dtype, eps, x.numel() / cols, cols, out.as<float>());
  }

  void add(const TensorView& a, const TensorView& b, const TensorView& out) override {
    check_f32(a, "add", "a");
    check_f32(b, "add", "b");
    check_f32(out, "add", "out");
    MOEX_ASSERT(a.numel() == b.numel() && a.numel() == out.numel(), "add: {} + {} -> {}", a.shape.str(),
                b.shape.str(), out.shape.str());
    cpu::add(pool_, a.as<float>(), b.as<float>(), out.as<float>(), out.numel());
  }

  void clamp(const TensorView& x, float limit) override {
    check_f32(x, "clamp", "x");
    cpu::clamp(pool_, x.as<float>(), x.numel(), limit);
  }

  void rope(const TensorView& x, std::span<const int32_t> positions, int64_t rotary_dim, double theta) override {
    check_f32(x, "rope", "x");
    MOEX_ASSERT(x.shape.ndim == 3 && x.dim(0) == static_cast<int64_t>(positions.size()),
                "rope: x {} for {} positions (want [n, heads, head_dim])", x.shape.str(), positions.size());
    cpu::rope(pool_, x.as<float>(), positions, x.dim(1), x.dim(2), rotary_dim, theta);
  }

  void kv_write(const KvStep& step, const TensorView& k, const TensorView& v, const TensorView& k_pages,
                const TensorView& v_pages) override {
    check_f32(k, "kv_write", "k");
    check_f32(v, "kv_write", "v");
    check_f32(k_pages, "kv_write", "k_pages");
    check_f32(v_pages, "kv_write", "v_pages");
    const int64_t n = check_kv_write_shapes(step, k, v, k_pages, v_pages, "kv_write");
    const int64_t row = k_pages.dim(2) * k_pages.dim(3);
    check_kv_step(step, n, k_pages.dim(0), "kv_write");
    cpu::kv_write(step, k.as<float>(), v.as<float>(), row, k_pages.as<float>(), v_pages.as<float>());
  }

  void attention(const KvStep& step, const TensorView& q, const TensorView& k_pages, const TensorView& v_pages,
                 float scale, const TensorView& out) override {
    check_f32(q, "attention", "q");
    check_f32(out, "attention", "out");
    check_f32(k_pages, "attention", "k_pages");
    check_f32(v_pages, "attention", "v_pages");
    check_attention_shapes(step, q, k_pages, v_pages, out, "attention");
    const int64_t n = q.dim(0);
    check_kv_step(step, n, k_pages.dim(0), "attention");
    if (n == 0) return;
    cpu::attention(pool_, step, q.as<float>(), k_pages.as<float>(), v_pages.as<float>(), q.dim(1), k_pages.dim(2),
                   q.dim(2), scale, out.as<float>());
  }

  void silu_mul(const TensorView& gate, const TensorView& up, const TensorView& out) override {
    check_f32(gate, "silu_mul", "gate");
    check_f32(up, "silu_mul", "up");
    check_f32(out, "silu_mul", "out");
    MOEX_ASSERT(gate.numel() == up.numel() && gate.numel() == out.numel(), "silu_mul: {} * {} -> {}",
                gate.shape.str(), up.shape.str(), out.shape.str());
    cpu::silu_mul(pool_, gate.as<float>(), up.as<float>(), out.as<float>(), out.numel());
  }

  void add_sigmoid_gated(const TensorView& acc, const TensorView& x, const TensorView& gate_logit) override {
    check_f32(acc, "add_sigmoid_gated", "acc");
    check_f32(x, "add_sigmoid_gated", "x");
    check_f32(gate_logit, "add_sigmoid_gated", "gate_logit");
    int64_t rows = gate_logit.numel();
    MOEX_ASSERT(rows > 0 && acc.numel() == x.numel() && acc.numel() % rows == 0,
                "add_sigmoid_gated: acc {} x {} gate {}", acc.shape.str(), x.shape.str(), gate_logit.shape.str());
    cpu::add_sigmoid_gated(acc.as<float>(), x.as<float>(), gate_logit.as<float>(), rows, acc.numel() / rows);
  }

  void route(const TensorView& logits, int64_t top_k, RouterScoring scoring, bool normalize,
             Routing* routing) override {
    check_f32(logits, "route", "logits");
    MOEX_ASSERT(logits.shape.ndim == 2, "route: logits {}", logits.shape.str());
    cpu::route(logits.as<float>(), logits.dim(0), logits.dim(1), top_k, scoring, normalize, routing);
  }

  void expert_gate_up_rows(const TensorView& x_gate, const TensorView& x_up, const ExpertWeights& w, int64_t rows,
                           const TensorView& gate_out, const TensorView& up_out) override {
    const int64_t hidden = w.gate.dim(1);
    MOEX_ASSERT(rows >= 0 && rows <= w.gate.dim(0) && x_gate.numel() == hidden && x_up.numel() == hidden &&
                    gate_out.numel() == rows && up_out.numel() == rows,
                "expert_gate_up_rows: {} rows of gate {}, x {} / {}, out {} / {}", rows, w.gate.shape.str(),
                x_gate.shape.str(), x_up.shape.str(), gate_out.shape.str(), up_out.shape.str());
    check_f32(gate_out, "expert_gate_up_rows", "gate_out");
    check_f32(up_out, "expert_gate_up_rows", "up_out");
    cpu::expert_gate_up_rows(pool_, x_gate.as<float>(), x_up.as<float>(), w, rows, gate_out.as<float>(),
                             up_out.as<float>());
  }

  void moe_experts(const TensorView& x, const Routing& routing, std::span<const ExpertWeights> experts,
                   const TensorView& out) override {
    check_f32(x, "moe_experts", "x");
    check_f32(out, "moe_experts", "out");
    MOEX_ASSERT(routing.num_tokens > 0 ? x.numel() % routing.num_tokens == 0 : x.numel() == 0,
                "moe_experts: x {} for {} tokens", x.shape.str(), routing.num_tokens);
    int64_t hidden = routing.num_tokens > 0 ? x.numel() / routing.num_tokens : 0;
    MOEX_ASSERT(out.numel() == x.numel(), "moe_experts: out {} vs x {}", out.shape.str(), x.shape.str());
    cpu::moe_experts(pool_, moe_scratch_, x.as<float>(), hidden, routing, experts, out.as<float>());
  }

 private:
  void copy_packed(const PackedBf16& src, int64_t row_begin, int64_t row_end, const TensorView& dst) {
    check_packed_copy_shapes(src, row_begin, row_end, dst, "copy_packed_from_host");
    cpu::unpack_rows(src, row_begin, row_end, dst.as<uint16_t>());
  }

  ThreadPool pool_;
  cpu::MoeScratch moe_scratch_;
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend(int num_threads) { return std::make_unique<CpuBackend>(num_threads); }

}  // namespace moex
