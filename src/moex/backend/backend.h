// The Backend interface: every numeric op the model code needs, on tensors that live on the
// backend's device. Model code (model/) calls only this; cpu/ and cuda/ implement it.
// Conventions: activations are fp32, row-major [rows, cols]; weights are bf16, f16 or f32 in the
// checkpoint's layout ([out_features, in_features], like torch.nn.Linear); host-side integer inputs
// (token ids, positions, expert ids) are passed as host spans, since the host schedules every step.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "moex/backend/token_draw.h"
#include "moex/core/packed_bf16.h"
#include "moex/core/tensor.h"

namespace moex {

// One expert's SwiGLU weights: down(silu(gate x) * up x). gate/up [ffn, hidden], down [hidden, ffn].
struct ExpertWeights;

// An expert's gate, up and down in the 12-bit packing (core/packed_bf16.h): how offloaded experts can sit in
// host memory (--pack-experts), so that a miss reads 3/4 of the bf16 bytes, copied or run on the CPU.
struct PackedExpert {
  PackedBf16 gate, up, down;
  int64_t bytes() const { return gate.bytes() + up.bytes() + down.bytes(); }
};

struct ExpertWeights {
  TensorView gate;
  TensorView up;
  TensorView down;
  // Host experts held packed: the views give shapes and dtype (bf16), and their data may be null (random weights
  // are generated straight into the packing). Only the expert store and the CPU backend's expert ops read it.
  const PackedExpert* packed = nullptr;
  bool valid() const { return !gate.empty() || packed != nullptr; }
};

// Top-k routing of a batch of tokens: row t holds token t's experts, best first.
struct Routing {
  int64_t num_tokens = 0;
  int64_t top_k = 0;
  std::vector<int32_t> expert_ids;  // [num_tokens * top_k]
  std::vector<float> weights;       // [num_tokens * top_k]
};

enum class RouterScoring : uint8_t { kSoftmax, kSigmoid };

// One forward step's rows in a paged KV cache. A page holds page_size consecutive positions of one sequence.
// Row i is the token at position row_pos[i] of the step's sequence row_seq[i], whose position p lives in page
// block_tables[row_seq[i] * table_stride + p / page_size], slot p % page_size. Host memory owned by the caller;
// it must not change between prepare_kv_step() and the step's last kv op.
struct KvStep {
  std::span<const int32_t> row_seq;       // [n], each < num_seqs
  std::span<const int32_t> row_pos;       // [n], each < table_stride * page_size
  std::span<const int32_t> block_tables;  // [num_seqs, table_stride] page ids
  int64_t table_stride = 0;
  int64_t page_size = 0;
  int64_t num_seqs() const { return table_stride > 0 ? static_cast<int64_t>(block_tables.size()) / table_stride : 0; }
};

// Asserts that step is well formed for num_rows rows and a pool of num_pages pages (a malformed step is a bug in
// the caller): rows in range, every table entry a page of the pool. Largest row_pos + 1 in *max_keys if given.
void check_kv_step(const KvStep& step, int64_t num_rows, int64_t num_pages, const char* op, int64_t* max_keys = nullptr);

// The shape contracts every backend asserts before its kernels run (dtype and device checks stay with the
// backend: what a backend accepts there differs). A broken contract is a caller bug (MOEX_ASSERT).
struct LinearDims {
  int64_t rows = 0, in_features = 0, out_features = 0;
};
// linear: w [out, in]; x holds rows of `in` (x.numel() % in == 0); out [rows, out]; bias, if not null and not
// empty, [out].
LinearDims check_linear_shapes(const TensorView& x, const TensorView& w, const TensorView* bias, const TensorView& out,
                               const char* op);
// copy_packed_from_host_*: rows [row_begin, row_end) of src, into dst, bf16 holding exactly those rows.
void check_packed_copy_shapes(const PackedBf16& src, int64_t row_begin, int64_t row_end, const TensorView& dst,
                              const char* op);
// kv_write: pages [num_pages, page_size, kv_heads, head_dim] alike for k and v, matching step's page size; k and v
// hold n rows of kv_heads * head_dim. Returns n.
int64_t check_kv_write_shapes(const KvStep& step, const TensorView& k, const TensorView& v, const TensorView& k_pages,
                              const TensorView& v_pages, const char* op);
// attention: q [n, heads, head_dim], pages as for kv_write with heads % kv_heads == 0, out as many elements as q.
void check_attention_shapes(const KvStep& step, const TensorView& q, const TensorView& k_pages,
                            const TensorView& v_pages, const TensorView& out, const char* op);

// Owned activation memory on a backend's device; freed by the backend that made it.
class Buffer {
 public:
  virtual ~Buffer() = default;
  TensorView view;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual Device device() const = 0;
  virtual std::string name() const = 0;
  // The PCI bus id of the GPU this backend runs on ("0000:3B:00.0"), for NVML telemetry; empty on the CPU.
  virtual std::string pci_bus_id() const { return {}; }
  // Device memory in use now, all of it (used) and what the backend's own start took (the CUDA context, streams and
  // small buffers: at_start): used - at_start is what weights, expert slots, the KV cache and scratch hold, the part
  // that --gpu-memory bounds. {0, 0} on the CPU.
  struct DeviceMemoryUse {
    int64_t used = 0, at_start = 0;
  };
  virtual DeviceMemoryUse device_memory_use() const { return {}; }

  // ---- memory -------------------------------------------------------------------------------
  // An fp32/int activation buffer of the given shape on this device (contents undefined).
  virtual std::unique_ptr<Buffer> alloc(DType dtype, Shape shape) = 0;
  // A weight usable by this backend's ops. CPU: the host view itself (zero copy from the mmap);
  // CUDA: uploaded once. The returned view stays valid as long as the backend lives.
  virtual TensorView upload_weight(const TensorView& host, const std::string& name) = 0;
  // A weight matrix of which ops read a few rows per step (the token embedding), kept where it costs the
  // backend's memory nothing: CUDA copies it into page-locked host memory that kernels read over the bus (a
  // decode step reads one row), so an offloading budget leaves its bytes to experts. Default: upload_weight.
  virtual TensorView map_host_weight(const TensorView& host, const std::string& name) {
    return upload_weight(host, name);
  }
  virtual void copy_to_host(const TensorView& src, void* dst) = 0;
  virtual void copy_from_host(const void* src, const TensorView& dst) = 0;
  // The expert prefetcher's copy: like copy_from_host, but on a copy path separate from compute so it
  // overlaps with running ops, and callable from one other thread while ops run. Default: copy_from_host.
  virtual void copy_from_host_async_path(const void* src, const TensorView& dst) { copy_from_host(src, dst); }
  // A demand copy of expert weights that the caller's thread does not wait for, so the host can compute
  // while it runs: it starts after the ops enqueued before it (dst may be a slot they just stopped using)
  // and ahead of prefetcher copies issued after it. src must stay valid and unchanged until the copy is
  // done (page-locked expert weights). Ops see dst only after wait_enqueued_copies(). Default:
  // copy_from_host (done on return).
  virtual void copy_from_host_enqueue(const void* src, const TensorView& dst) { copy_from_host(src, dst); }
  // The two expert copies above from a packed host matrix: rows [row_begin, row_end) of src into dst, a bf16
  // [row_end - row_begin, src.cols] view. The link carries the packed bytes and the device unpacks them (CUDA);
  // src must stay valid until the copy is done, like the plain copies'. Default: unpacked on the host, then
  // copy_from_host.
  virtual void copy_packed_from_host_async_path(const PackedBf16& src, int64_t row_begin, int64_t row_end,
                                                const TensorView& dst);
  virtual void copy_packed_from_host_enqueue(const PackedBf16& src, int64_t row_begin, int64_t row_end,
                                             const TensorView& dst);
  // Ops enqueued after this call run after every copy_from_host_enqueue() issued before it; the host does
  // not wait.
  virtual void wait_enqueued_copies() { wait_copies_through(enqueued_copy_ticket()); }
  // Names the copy_from_host_enqueue() copies issued so far (0: none), so that ops can wait for those alone
  // while later copies still run: a layer streamed in waves enqueues wave k+1's copies before wave k's
  // compute, which must not wait for them. Default (copies done on return): 0.
  virtual uint64_t enqueued_copy_ticket() const { return 0; }
  // Ops enqueued after this call run after the copies named by ticket (and any issued before them); the host
  // does not wait.
  virtual void wait_copies_through(uint64_t ticket) { (void)ticket; }
  // Makes host memory that copies read from faster to copy (CUDA: page-locks it). A no-op where it does
  // not matter; never fails (an unregistered range is merely slower).
  virtual void register_host_memory(const void* ptr, size_t bytes) { (void)ptr, (void)bytes; }
  virtual void synchronize() {}

  // ---- ops ----------------------------------------------------------------------------------
  // out[i, :] = table[ids[i], :] as fp32.
  virtual void embedding(std::span<const int32_t> ids, const TensorView& table, const TensorView& out) = 0;
  // out[n, out_features] = x[n, in_features] @ w^T (+ bias[out_features]).
  virtual void linear(const TensorView& x, const TensorView& w, const TensorView* bias,
                      const TensorView& out) = 0;
  // Row-wise RMSNorm over the last dim: out = x / sqrt(mean(x^2) + eps) * weight. In-place allowed.
  virtual void rms_norm(const TensorView& x, const TensorView& weight, float eps, const TensorView& out) = 0;
  // out = a + b (same shape). In-place allowed.
  virtual void add(const TensorView& a, const TensorView& b, const TensorView& out) = 0;
  // Clamp every element into [-limit, limit] in place (OLMoE clip_qkv).
  virtual void clamp(const TensorView& x, float limit) = 0;
  // ---- fused ops (decode is launch-bound: a backend may do each in one pass; defaults compose the above) -
  // One input through several weights: outputs[i].out = x @ outputs[i].w^T (+ bias). Decode's q/k/v and an
  // MLP's gate/up read x once and launch once.
  struct LinearOutput {
    const TensorView* w = nullptr;
    const TensorView* bias = nullptr;  // may be null
    const TensorView* out = nullptr;
  };
  virtual void linear_many(const TensorView& x, std::span<const LinearOutput> outputs) {
    for (const LinearOutput& o : outputs) linear(x, *o.w, o.bias, *o.out);
  }
  // The residual step before a block: x += delta, then out = rms_norm(x, weight). out must not alias delta.
  virtual void add_rms_norm(const TensorView& x, const TensorView& delta, const TensorView& weight, float eps,
                            const TensorView& out) {
    add(x, delta, x);
    rms_norm(x, weight, eps, out);
  }
  // q [n, heads, head_dim] and k [n, kv_heads, head_dim] in place: per-head RMSNorm with q_norm / k_norm
  // [head_dim] when given (Qwen3; both or neither), then rope() on both.
  virtual void qk_norm_rope(const TensorView& q, const TensorView& k, const TensorView* q_norm,
                            const TensorView* k_norm, float eps, std::span<const int32_t> positions,
                            int64_t rotary_dim, double theta) {
    if (q_norm && k_norm) {
      const int64_t hd = q.dim(2);
      const TensorView q_rows = q.reshape(Shape{q.numel() / hd, hd}), k_rows = k.reshape(Shape{k.numel() / hd, hd});
      rms_norm(q_rows, *q_norm, eps, q_rows);
      rms_norm(k_rows, *k_norm, eps, k_rows);
    }
    rope(q, positions, rotary_dim, theta);
    rope(k, positions, rotary_dim, theta);
  }

  // Rotary embedding, rotate-half (GPT-NeoX) convention, in place on x[n, heads, head_dim]; token i
  // is at positions[i]; the first rotary_dim dims of each head rotate.
  virtual void rope(const TensorView& x, std::span<const int32_t> positions, int64_t rotary_dim,
                    double theta) = 0;
  // ---- paged KV cache (model/kv_cache.h) -------------------------------------------------------
  // Tells the backend the KvStep of the kv_write/attention calls that follow, once per forward step and before
  // its ops (CUDA: one upload of the step's rows and block tables, outside any recorded decode step).
  virtual void prepare_kv_step(const KvStep& step) { (void)step; }
  // Stores row i of k/v [n, kv_heads, head_dim] at position step.row_pos[i] of sequence step.row_seq[i].
  // k_pages/v_pages [num_pages, page_size, kv_heads, head_dim] fp32. step must be the prepared one.
  virtual void kv_write(const KvStep& step, const TensorView& k, const TensorView& v, const TensorView& k_pages,
                        const TensorView& v_pages) = 0;
  // qk_norm_rope() then kv_write() of the rotated k and of v [n, kv_heads, head_dim]: one op, so a device
  // backend can store the step's keys as it rotates them.
  virtual void qk_norm_rope_kv_write(const TensorView& q, const TensorView& k, const TensorView& v,
                                     const TensorView* q_norm, const TensorView* k_norm, float eps,
                                     std::span<const int32_t> positions, int64_t rotary_dim, double theta,
                                     const KvStep& step, const TensorView& k_pages, const TensorView& v_pages) {
    qk_norm_rope(q, k, q_norm, k_norm, eps, positions, rotary_dim, theta);
    kv_write(step, k, v, k_pages, v_pages);
  }
  // Causal GQA attention: row i of q [n, heads, head_dim] attends to positions 0..step.row_pos[i] of its
  // sequence (this step's kv_write included); out [n, heads, head_dim]. scale multiplies q.k (1/sqrt(head_dim)).
  virtual void attention(const KvStep& step, const TensorView& q, const TensorView& k_pages, const TensorView& v_pages,
                         float scale, const TensorView& out) = 0;
  // qk_norm_rope_kv_write() then attention() of the rotated q: one op, so that a device backend can rotate q and
  // the step's k inside its decode attention kernel. q and k may hold either rotation afterwards.
  virtual void rope_kv_attention(const TensorView& q, const TensorView& k, const TensorView& v,
                                 const TensorView* q_norm, const TensorView* k_norm, float eps,
                                 std::span<const int32_t> positions, int64_t rotary_dim, double theta,
                                 const KvStep& step, const TensorView& k_pages, const TensorView& v_pages, float scale,
                                 const TensorView& out) {
    qk_norm_rope_kv_write(q, k, v, q_norm, k_norm, eps, positions, rotary_dim, theta, step, k_pages, v_pages);
    attention(step, q, k_pages, v_pages, scale, out);
  }
  // out = silu(gate) * up, elementwise on [n, ffn].
  virtual void silu_mul(const TensorView& gate, const TensorView& up, const TensorView& out) = 0;
  // One token's first `rows` intermediate rows of an expert, the host's share of a split miss:
  // gate_out [1, rows] = silu(x_gate gate[0:rows]^T) * (x_up up[0:rows]^T); up_out [1, rows] is scratch. w may be
  // packed on backends that compute from host memory (CPU). Default: linear, linear, silu_mul.
  virtual void expert_gate_up_rows(const TensorView& x_gate, const TensorView& x_up, const ExpertWeights& w,
                                   int64_t rows, const TensorView& gate_out, const TensorView& up_out);
  // acc[r, :] += sigmoid(gate_logit[r, 0]) * x[r, :]  (Qwen2-MoE shared-expert gate).
  virtual void add_sigmoid_gated(const TensorView& acc, const TensorView& x, const TensorView& gate_logit) = 0;
  // Router: logits[n, num_experts] -> top-k ids/weights on the host. Ties pick the lower expert id.
  // Softmax scoring: weights are softmax probabilities, renormalised over the top-k if normalize.
  virtual void route(const TensorView& logits, int64_t top_k, RouterScoring scoring, bool normalize,
                     Routing* routing) = 0;
  // out[t, :] = sum_j routing.weights[t, j] * expert_{ids[t, j]}(x[t, :]). experts[e] must be valid
  // for every id >= 0 that occurs in routing; entries with id < 0 are skipped (they contribute
  // nothing: the offloading path runs a layer's experts in waves). out is overwritten.
  virtual void moe_experts(const TensorView& x, const Routing& routing, std::span<const ExpertWeights> experts,
                           const TensorView& out) = 0;
  // Whether moe_routed() saves anything over route() + moe_experts() here (a device round trip per MoE
  // layer); the decoder keeps host-side routing, and the providers' per-expert hit counts, otherwise.
  virtual bool prefers_device_routing() const { return false; }
  // The router GEMV, route() and moe_experts() for a layer whose experts are all resident, without the
  // routing reaching the host: a backend may keep ids and weights on its device (no host round trip per MoE
  // layer) and fuse the router with the routing. logits [n, num_experts] is scratch the op fills with x times
  // router^T. experts is the layer's whole table (every entry valid); the same data pointer must always carry
  // the same contents, so that a backend may cache what it derives from it (CUDA: a device copy of the
  // pointers).
  virtual void moe_routed(const TensorView& x, const TensorView& router, const TensorView& logits, int64_t top_k,
                          RouterScoring scoring, bool normalize, std::span<const ExpertWeights> experts,
                          const TensorView& out) {
    linear(x, router, nullptr, logits);
    Routing routing;
    route(logits, top_k, scoring, normalize, &routing);
    moe_experts(x, routing, experts, out);
  }

  // ---- the residual step inside its consumers (decode at batch 1) -----------------------------------------
  // A decoder block's norm is a launch of its own on a GPU, one short latency chain on the critical path, twice
  // per layer. These two ops let the consumer of each norm do it: the decoder calls them only where
  // fuses_residual_norms(rows) says they save something; the defaults compose the ops above.
  virtual bool fuses_residual_norms(int64_t rows) const {
    (void)rows;
    return false;
  }
  // outputs[i].out = rms_norm(x + delta, weight) @ outputs[i].w^T (+ bias); delta may be null. x is left as it
  // is (the sum is stored by norm_moe_routed later); scratch [rows, hidden] may be overwritten.
  virtual void norm_linear_many(const TensorView& x, const TensorView* delta, const TensorView& weight, float eps,
                                const TensorView& scratch, std::span<const LinearOutput> outputs) {
    if (delta) add(x, *delta, scratch);
    rms_norm(delta ? scratch : x, weight, eps, scratch);
    linear_many(scratch, outputs);
  }
  // The first layer's form: x = the embedding of ids (as embedding()), then norm_linear_many(x, nullptr, ...). A
  // backend may read the token's row inside the GEMV's blocks and store x from there: one launch fewer per step.
  virtual void embed_norm_linear_many(std::span<const int32_t> ids, const TensorView& table, const TensorView& x,
                                      const TensorView& weight, float eps, const TensorView& scratch,
                                      std::span<const LinearOutput> outputs) {
    embedding(ids, table, x);
    norm_linear_many(x, nullptr, weight, eps, scratch, outputs);
  }
  // x = (x + delta0) + delta1 (delta0 may be null), normed = rms_norm(x, weight), then moe_routed(normed, ...).
  virtual void norm_moe_routed(const TensorView& x, const TensorView* delta0, const TensorView& delta1,
                               const TensorView& weight, float eps, const TensorView& normed, const TensorView& router,
                               const TensorView& logits, int64_t top_k, RouterScoring scoring, bool normalize,
                               std::span<const ExpertWeights> experts, const TensorView& out) {
    if (delta0) add(x, *delta0, x);
    add_rms_norm(x, delta1, weight, eps, normed);
    moe_routed(normed, router, logits, top_k, scoring, normalize, experts, out);
  }

  // A layer's tail at one row, from its attention's output to the next layer's q/k/v: proj = attn @ o_proj^T, then
  // norm_moe_routed(x, pending, proj, ...) into out, then, with next, norm_linear_many(x, &out, *next->norm, eps,
  // normed, next->outputs) (x is left without out). The decoder calls it where fuses_layer_tail() says a backend
  // does it in one pass (CUDA: one persistent launch); proj [1, hidden] is scratch.
  virtual bool fuses_layer_tail() const { return false; }
  struct LayerTailNext {
    const TensorView* norm = nullptr;
    std::span<const LinearOutput> outputs;
  };
  virtual void moe_layer_tail(const TensorView& attn, const TensorView& o_proj, const TensorView& proj,
                              const TensorView& x, const TensorView* pending, const TensorView& ffn_norm, float eps,
                              const TensorView& normed, const TensorView& router, const TensorView& logits,
                              int64_t top_k, RouterScoring scoring, bool normalize,
                              std::span<const ExpertWeights> experts, const TensorView& out,
                              const LayerTailNext* next) {
    linear(attn, o_proj, nullptr, proj);
    norm_moe_routed(x, pending, proj, ffn_norm, eps, normed, router, logits, top_k, scoring, normalize, experts, out);
    if (next) norm_linear_many(x, &out, *next->norm, eps, normed, next->outputs);
  }

  // The end of a forward: x += delta (delta may be null), logits = rms_norm(x, weight) @ lm_head^T. normed
  // [rows, hidden] is scratch. A backend may compute the norm inside the lm_head's kernel and leave x without
  // delta: the caller must not read x afterwards.
  virtual void norm_logits(const TensorView& x, const TensorView* delta, const TensorView& weight, float eps,
                           const TensorView& normed, const TensorView& lm_head, const TensorView& logits) {
    if (delta) add_rms_norm(x, *delta, weight, eps, normed);
    else rms_norm(x, weight, eps, normed);
    linear(normed, lm_head, nullptr, logits);
  }

  // ---- picking tokens on the device (optional) ----------------------------------------------------------
  // ids[r] = the first index of the largest value of logits row r ([rows, vocab] fp32), NaN never winning
  // (row[0] wins when it is NaN), as the sampler's argmax(). Returns false when the backend has no such
  // kernel (the caller then reads the logits back and picks on the host). A device backend saves reading
  // back rows x vocab floats per batched step.
  virtual bool argmax_rows(const TensorView& logits, std::span<int32_t> ids) {
    (void)logits, (void)ids;
    return false;
  }
  // ids[r] = the token draws[r] picks from logits row r, as Sampler::sample(row, draws[r]) picks it (greedy rows
  // included). Returns false, with nothing done, when the backend cannot (no kernel, or a vocabulary too large for
  // it: samples_on_device): the caller then reads the logits back and picks on the host with the same draws.
  virtual bool sample_rows(const TensorView& logits, std::span<const TokenDraw> draws, std::span<int32_t> ids) {
    (void)logits, (void)draws, (void)ids;
    return false;
  }
  // Whether sample_rows() and pick_token() take sampled (temperature > 0) draws over a vocabulary this size.
  virtual bool samples_on_device(int64_t vocab) const {
    (void)vocab;
    return false;
  }

  // ---- chained decode steps (optional) -------------------------------------------------------------------------
  // Decoding of one sequence without a host round trip between steps. pick_token() enqueues the pick of draw from
  // logits' last row (as sample_rows; greedy when draw.temperature is 0) and returns at once: that id becomes the
  // token of the next decode_step() called with kTokenOnDevice, and picked_token() returns it once it reached the
  // host (the oldest pick not yet read; it waits). So the host enqueues step t+1 before it reads step t's token,
  // and the device does not idle while the host reads the token, checks it, prints it and launches the next step.
  // Up to kMaxPendingPicks picks may wait to be read. A backend that chains (chains_steps) supports this in
  // decode_step(), with greedy draws, and with sampled ones where samples_on_device(vocab).
  static constexpr int32_t kTokenOnDevice = -1;
  static constexpr int kMaxPendingPicks = 4;
  virtual bool chains_steps() const { return false; }
  virtual void pick_token(const TensorView& logits, const TokenDraw& draw);  // default: an error (no chaining)
  virtual int32_t picked_token();                                            // default: an error

  // Batched decoding chained the same way: pick_rows() enqueues the pick of every row of logits ([rows, vocab]),
  // row r's as sample_rows() picks it with draws[r] (greedy without draws), and returns at once; those ids become
  // the tokens of the next decode_rows_step() whose ids are all kTokenOnDevice (the same sequences in the same
  // rows), and picked_rows() returns them once they reached the host (the oldest pick_rows() not yet read; waits).
  // Up to kMaxPendingPicks may wait to be read. A backend that chains batches of this many rows says so in
  // chains_batch_steps(); sampled draws also need samples_on_device(vocab).
  virtual bool chains_batch_steps(int64_t rows) const {
    (void)rows;
    return false;
  }
  virtual void pick_rows(const TensorView& logits, std::span<const TokenDraw> draws);  // default: an error
  virtual void picked_rows(std::span<int32_t> ids);                                    // default: an error

  // ---- decode-step recording (optional) ---------------------------------------------------------
  // Runs the ops of one single-token step (token at position). A backend may record ops() once per
  // context-length bucket and replay the recording for later steps (CUDA graphs). ops() must then depend
  // on token and position only through the embedding and rope ops of one row and the kv ops of the prepared
  // KvStep (prepare_kv_step() comes before decode_step(), so its upload stays outside the recording), must
  // not read anything back to the host, and must touch the same buffers each time: call
  // reset_step_recordings() when a buffer it uses is reallocated. token may be kTokenOnDevice after a
  // pick_token() (backends that chain steps). Default: runs ops().
  virtual void decode_step(int32_t token, int64_t position, const std::function<void()>& ops) {
    (void)token, (void)position;
    ops();
  }
  // Runs the ops of one batched decode step: row i is ids[i], the next token of a sequence of its own
  // (Decoder::forward_batch). A backend may record ops() per batch size and context-length bucket and replay the
  // recording for later steps of that size, under decode_step()'s rules, ids taking the token's place: ops() may
  // depend on the ids only through the embedding of these rows and on positions only through the prepared KvStep
  // (whose rows are these). ids may all be kTokenOnDevice after a pick_rows() of as many rows (backends that chain
  // batches). Default: runs ops().
  virtual void decode_rows_step(std::span<const int32_t> ids, const std::function<void()>& ops) {
    (void)ids;
    ops();
  }
  // One chained step: decode_step(token, position, ops), then pick_token(logits, draw) of the logits ops() wrote.
  // A backend may record the pick with the step (the CUDA backend's greedy pick, inside the step's graph).
  virtual void decode_step_with_pick(int32_t token, int64_t position, const std::function<void()>& ops,
                                     const TensorView& logits, const TokenDraw& draw) {
    decode_step(token, position, ops);
    pick_token(logits, draw);
  }
  virtual void reset_step_recordings() {}
};

}  // namespace moex
