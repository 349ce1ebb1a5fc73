#include "moex/model/decoder.h"

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>

#include "moex/core/error.h"

namespace moex {

struct Decoder::DeviceLayer {
  TensorView attn_norm, ffn_norm, q_proj, k_proj, v_proj, o_proj, q_bias, k_bias, v_bias, q_norm, k_norm;
  TensorView router, shared_expert_gate;
  ExpertWeights shared_expert, dense_mlp;
};

namespace {
// Scratch slots: one buffer each, grown on demand and reused every step.
enum Slot : int {
  kResidual, kNormed, kQ, kK, kV, kAttn, kProj, kRouterLogits, kFfnOut, kGate, kUp, kAct, kShared, kSharedGate,
  kLogits, kPartial, kLookahead, kHostPartial, kSplitX, kSplitGate, kSplitUp, kSplitAct, kSplitOut, kNumSlots
};
}  // namespace

Decoder::Decoder(const ModelConfig& cfg, const ModelWeights& weights, Backend& backend, ExpertProvider& experts,
                 const KvCacheOptions& kv, bool embedding_on_host)
    : cfg_(cfg), host_(weights), backend_(backend), experts_(experts), scratch_(kNumSlots) {
  kv_ = std::make_unique<KvCache>(backend_, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, kv.page_size,
                                  kv.max_pages);
  default_seq_ = kv_->add_sequence();
  auto up = [&](const TensorView& view, const std::string& name) {
    return view.empty() ? TensorView{} : backend_.upload_weight(view, name);
  };
  auto up_mlp = [&](const ExpertWeights& mlp, const std::string& name) {
    if (!mlp.valid()) return ExpertWeights{};
    return ExpertWeights{up(mlp.gate, name + ".gate"), up(mlp.up, name + ".up"), up(mlp.down, name + ".down")};
  };
  const bool tied = weights.lm_head.data == weights.embed.data;
  embed_ = embedding_on_host && !tied ? backend_.map_host_weight(weights.embed, "embed") : up(weights.embed, "embed");
  final_norm_ = up(weights.final_norm, "final_norm");
  lm_head_ = tied ? embed_ : up(weights.lm_head, "lm_head");
  for (size_t layer_idx = 0; layer_idx < weights.layers.size(); ++layer_idx) {
    const LayerWeights& src = weights.layers[layer_idx];
    const std::string prefix = fmt::format("layers.{}.", layer_idx);
    DeviceLayer layer;
    layer.attn_norm = up(src.attn_norm, prefix + "attn_norm");
    layer.ffn_norm = up(src.ffn_norm, prefix + "ffn_norm");
    layer.q_proj = up(src.q_proj, prefix + "q_proj");
    layer.k_proj = up(src.k_proj, prefix + "k_proj");
    layer.v_proj = up(src.v_proj, prefix + "v_proj");
    layer.o_proj = up(src.o_proj, prefix + "o_proj");
    layer.q_bias = up(src.q_bias, prefix + "q_bias");
    layer.k_bias = up(src.k_bias, prefix + "k_bias");
    layer.v_bias = up(src.v_bias, prefix + "v_bias");
    layer.q_norm = up(src.q_norm, prefix + "q_norm");
    layer.k_norm = up(src.k_norm, prefix + "k_norm");
    layer.router = up(src.router, prefix + "router");
    layer.shared_expert_gate = up(src.shared_expert_gate, prefix + "shared_expert_gate");
    layer.shared_expert = up_mlp(src.shared_expert, prefix + "shared_expert");
    layer.dense_mlp = up_mlp(src.dense_mlp, prefix + "mlp");
    layers_.push_back(layer);
    if (src.is_moe) moe_layers_.push_back(static_cast<int32_t>(layer_idx));
    norms_fusable_ = norms_fusable_ && src.is_moe && !layer.shared_expert.valid();
  }
  norms_fusable_ = norms_fusable_ && cfg_.clip_qkv <= 0 && !layers_.empty();
}

Decoder::~Decoder() = default;

void Decoder::reserve(int64_t num_tokens) { kv_->reserve(num_tokens); }

int32_t Decoder::add_sequence() { return kv_->add_sequence(); }

void Decoder::free_sequence(int32_t seq) { kv_->free_sequence(seq); }

TensorView Decoder::scratch(int slot, Shape shape) {
  auto& buffer = scratch_[slot];
  if (!buffer || buffer->view.numel() < shape.numel()) {
    // The buffer is flat: doubling its element count (not dim 0 times the new row size, which compounded to
    // 64 GiB on a 2048-token prefill after decode steps).
    const int64_t grown = std::max<int64_t>(shape.numel(), buffer ? buffer->view.numel() * 2 : 0);
    buffer = backend_.alloc(DType::kF32, Shape{grown});
    backend_.reset_step_recordings();  // recorded steps name the old buffer
  }
  return TensorView(buffer->view.data, DType::kF32, shape, buffer->view.device);
}

void Decoder::swiglu(const TensorView& x, const ExpertWeights& mlp, int64_t ffn, const TensorView& out) {
  const int64_t n = x.dim(0);
  TensorView gate = scratch(kGate, Shape{n, ffn});
  TensorView up = scratch(kUp, Shape{n, ffn});
  const Backend::LinearOutput gate_up[2] = {{&mlp.gate, nullptr, &gate}, {&mlp.up, nullptr, &up}};
  backend_.linear_many(x, gate_up);
  backend_.silu_mul(gate, up, gate);
  backend_.linear(gate, mlp.down, nullptr, out);
}

void Decoder::run_experts(int32_t moe_layer_idx, const TensorView& h, const TensorView& out) {
  experts_.acquire(moe_layer_idx, routing_, h, &expert_table_);
  auto resident = [&](int32_t id) { return id >= 0 && expert_table_[id].valid(); };
  if (std::all_of(routing_.expert_ids.begin(), routing_.expert_ids.end(), resident)) {
    moe_wave(routing_, h, out, backend_.enqueued_copy_ticket());
    experts_.release(moe_layer_idx);
    return;
  }
  // The provider's budget could not hold every routed expert at once (a prefill touching most of a
  // layer's experts): run the resident ones, release them, ask for the rest, accumulate. When the provider
  // streams the layer, wave k+1 is acquired (its copies enqueued) before wave k runs, and wave k waits on the
  // device for its own copies only: the link copies the next wave while the GPU computes this one.
  pending_ = routing_;
  bool remaining = take_wave(expert_table_, &wave_);
  const TensorView partial = scratch(kPartial, out.shape);
  for (bool first = true;; first = false) {
    const uint64_t copies = backend_.enqueued_copy_ticket();
    bool next_acquired = false;
    if (remaining && experts_.streams_waves()) {
      experts_.acquire(moe_layer_idx, pending_, h, &next_table_);
      next_acquired = std::any_of(pending_.expert_ids.begin(), pending_.expert_ids.end(),
                                  [&](int32_t id) { return id >= 0 && next_table_[id].valid(); });
      if (next_acquired) remaining = take_wave(next_table_, &next_wave_);
    }
    moe_wave(wave_, h, first ? out : partial, copies);
    if (!first) backend_.add(out, partial, out);
    if (next_acquired) {
      experts_.release_wave(moe_layer_idx);
      std::swap(expert_table_, next_table_);
      std::swap(wave_, next_wave_);
      continue;
    }
    experts_.release(moe_layer_idx);
    if (!remaining) return;
    experts_.acquire(moe_layer_idx, pending_, h, &expert_table_);
    remaining = take_wave(expert_table_, &wave_);
  }
}

bool Decoder::take_wave(const std::vector<ExpertWeights>& table, Routing* wave) {
  *wave = pending_;
  bool remaining = false;
  for (size_t idx = 0; idx < pending_.expert_ids.size(); ++idx) {
    const int32_t id = pending_.expert_ids[idx];
    const bool now = id >= 0 && table[id].valid();
    wave->expert_ids[idx] = now ? id : -1;
    if (now) pending_.expert_ids[idx] = -1;
    remaining |= pending_.expert_ids[idx] >= 0;
  }
  return remaining;
}

void Decoder::moe_wave(const Routing& wave, const TensorView& h, const TensorView& out, uint64_t copies) {
  const std::span<const SplitExpert> splits = experts_.split_experts();
  auto on_host = [&](int32_t id) {
    return id >= 0 && expert_table_[id].gate.device == Device::kCpu && backend_.device() != Device::kCpu;
  };
  if (splits.empty() && std::none_of(wave.expert_ids.begin(), wave.expert_ids.end(), on_host)) {
    backend_.wait_copies_through(copies);
    backend_.moe_experts(h, wave, expert_table_, out);
    return;
  }
  MOEX_ASSERT(host_backend_, "the expert provider handed over host experts but the decoder has no host backend");
  auto split_of = [&](int32_t id) -> const SplitExpert* {
    for (const SplitExpert& split : splits)
      if (split.expert_idx == id) return &split;
    return nullptr;
  };
  host_wave_ = wave;
  device_wave_ = wave;
  split_entries_.clear();
  bool any_host = false;
  for (size_t idx = 0; idx < wave.expert_ids.size(); ++idx) {
    const int32_t id = wave.expert_ids[idx];
    if (id >= 0 && split_of(id)) {
      host_wave_.expert_ids[idx] = device_wave_.expert_ids[idx] = -1;
      split_entries_.push_back(static_cast<int64_t>(idx));
    } else if (on_host(id)) {
      device_wave_.expert_ids[idx] = -1;
      any_host = true;
    } else {
      host_wave_.expert_ids[idx] = -1;
    }
  }
  const int64_t n = h.dim(0), hidden = h.dim(1);
  h_host_.resize(static_cast<size_t>(n * hidden));
  out_host_.resize(static_cast<size_t>(n * hidden));
  // h and the small uploads below go before wait_enqueued_copies(): a read-back after it would wait for the
  // expert copies, which must run while the CPU works.
  backend_.copy_to_host(h, h_host_.data());
  // A split expert's up projection takes its input scaled by the routing weight (up is linear), so the
  // act rows of both paths carry the weight and the down projection adds straight into out.
  const int64_t num_splits = static_cast<int64_t>(split_entries_.size());
  const int64_t ffn = num_splits > 0 ? splits.front().host.gate.dim(0) : 0;
  TensorView split_x, split_gate, split_up, split_act, split_out;
  if (num_splits > 0) {
    split_x_host_.resize(static_cast<size_t>(num_splits * hidden));
    split_act_host_.resize(static_cast<size_t>(2 * num_splits * ffn));
    for (int64_t split_idx = 0; split_idx < num_splits; ++split_idx) {
      const int64_t token = split_entries_[split_idx] / wave.top_k;
      const float weight = wave.weights[split_entries_[split_idx]];
      for (int64_t col = 0; col < hidden; ++col)
        split_x_host_[split_idx * hidden + col] = weight * h_host_[token * hidden + col];
    }
    split_x = scratch(kSplitX, Shape{num_splits, hidden});
    backend_.copy_from_host(split_x_host_.data(), split_x);
    split_gate = scratch(kSplitGate, Shape{num_splits, ffn});
    split_up = scratch(kSplitUp, Shape{num_splits, ffn});
    split_act = scratch(kSplitAct, Shape{num_splits, ffn});
    split_out = scratch(kSplitOut, Shape{num_splits, hidden});
  }
  // Elements [offset, offset + count) of a contiguous fp32 view, as one row.
  auto part = [](const TensorView& view, int64_t offset, int64_t count) {
    return TensorView(view.as<float>() + offset, DType::kF32, Shape{1, count}, view.device);
  };
  backend_.wait_copies_through(copies);
  backend_.moe_experts(h, device_wave_, expert_table_, out);
  // The backend's rows of the split experts, queued behind their copies while the CPU computes its rows.
  for (int64_t split_idx = 0; split_idx < num_splits; ++split_idx) {
    const int32_t id = wave.expert_ids[split_entries_[split_idx]];
    const int64_t token = split_entries_[split_idx] / wave.top_k, rows = split_of(id)->host_rows;
    if (rows == ffn) continue;
    const ExpertWeights& w = expert_table_[id];
    const TensorView gate = part(split_gate, split_idx * ffn + rows, ffn - rows);
    const TensorView up = part(split_up, split_idx * ffn + rows, ffn - rows);
    backend_.linear(h.rows(token, 1), w.gate.rows(rows, ffn - rows), nullptr, gate);
    backend_.linear(split_x.rows(split_idx, 1), w.up.rows(rows, ffn - rows), nullptr, up);
    backend_.silu_mul(gate, up, part(split_act, split_idx * ffn + rows, ffn - rows));
  }
  const TensorView h_view(h_host_.data(), DType::kF32, Shape{n, hidden});
  const TensorView out_view(out_host_.data(), DType::kF32, Shape{n, hidden});
  const auto cpu_start = std::chrono::steady_clock::now();
  if (any_host) host_backend_->moe_experts(h_view, host_wave_, expert_table_, out_view);
  for (int64_t split_idx = 0; split_idx < num_splits; ++split_idx) {
    const SplitExpert& split = *split_of(wave.expert_ids[split_entries_[split_idx]]);
    const int64_t token = split_entries_[split_idx] / wave.top_k, rows = split.host_rows;
    float* act = split_act_host_.data() + 2 * split_idx * ffn;
    const TensorView gate(act, DType::kF32, Shape{1, rows}), up(act + ffn, DType::kF32, Shape{1, rows});
    const TensorView x_up(split_x_host_.data() + split_idx * hidden, DType::kF32, Shape{1, hidden});
    host_backend_->expert_gate_up_rows(h_view.rows(token, 1), x_up, split.host, rows, gate, up);
  }
  // The host's part is done; what remains of the copies (and the backend's short expert work) is a wait.
  const auto wait_start = std::chrono::steady_clock::now();
  experts_.add_cpu_ms(std::chrono::duration<double, std::milli>(wait_start - cpu_start).count());
  const TensorView from_host = scratch(kHostPartial, Shape{n, hidden});
  if (any_host) backend_.copy_from_host(out_host_.data(), from_host);
  for (int64_t split_idx = 0; split_idx < num_splits; ++split_idx) {
    const int64_t rows = split_of(wave.expert_ids[split_entries_[split_idx]])->host_rows;
    backend_.copy_from_host(split_act_host_.data() + 2 * split_idx * ffn, part(split_act, split_idx * ffn, rows));
  }
  const auto waited = std::chrono::steady_clock::now() - wait_start;
  experts_.add_stall_ms(std::chrono::duration<double, std::milli>(waited).count());
  if (any_host) backend_.add(out, from_host, out);
  for (int64_t split_idx = 0; split_idx < num_splits; ++split_idx) {
    const int32_t id = wave.expert_ids[split_entries_[split_idx]];
    const int64_t token = split_entries_[split_idx] / wave.top_k;
    backend_.linear(split_act.rows(split_idx, 1), expert_table_[id].down, nullptr, split_out.rows(split_idx, 1));
    backend_.add(out.rows(token, 1), split_out.rows(split_idx, 1), out.rows(token, 1));
  }
}

void Decoder::end_sequence() { experts_.end_sequence(); }

void Decoder::pregate(int32_t moe_layer_idx, const TensorView& h) {
  // The residual stream changes little from one layer to the next, so the next layers' routers applied
  // to this layer's normed hidden state predict their choices (Pre-gated MoE, ProMoE).
  const TensorView last = h.rows(h.dim(0) - 1, 1);
  TensorView logits = scratch(kLookahead, Shape{1, cfg_.num_experts});
  lookahead_host_.resize(static_cast<size_t>(cfg_.num_experts));
  const int32_t num_moe = static_cast<int32_t>(moe_layers_.size());
  for (int32_t ahead = 1; ahead <= experts_.lookahead_layers() && moe_layer_idx + ahead < num_moe; ++ahead) {
    backend_.linear(last, layers_[moe_layers_[moe_layer_idx + ahead]].router, nullptr, logits);
    backend_.copy_to_host(logits, lookahead_host_.data());
    experts_.observe_lookahead(moe_layer_idx + ahead, lookahead_host_);
  }
}

void Decoder::forward(std::span<const int32_t> ids, int64_t start_pos, bool all_logits, std::vector<float>* logits,
                      RouterObserver* observer) {
  forward_sequence(default_seq_, ids, start_pos, all_logits, logits, observer);
}

void Decoder::check_token(int32_t id) const {
  if (id < 0 || id >= cfg_.vocab_size)
    throw UsageError(fmt::format("token id {} is out of range: the vocabulary has {} ids (0..{})", id, cfg_.vocab_size,
                                 cfg_.vocab_size - 1));
}

void Decoder::forward_sequence(int32_t seq, std::span<const int32_t> ids, int64_t start_pos, bool all_logits,
                               std::vector<float>* logits, RouterObserver* observer) {
  const int64_t n = static_cast<int64_t>(ids.size());
  if (n == 0) throw UsageError("forward: no tokens to run");
  for (int32_t id : ids) check_token(id);
  const int64_t stride = prepare_rows(seq, start_pos, n);
  run_step(ids, start_pos, stride, all_logits, logits, observer);
}

int64_t Decoder::prepare_rows(int32_t seq, int64_t start_pos, int64_t n) {
  const int64_t length = kv_->length(seq);
  if (start_pos < 0 || start_pos > length)
    throw UsageError(fmt::format("forward: sequence {} holds positions 0..{}; cannot continue at position {}", seq,
                                 length - 1, start_pos));
  kv_->resize(seq, start_pos + n);
  row_seq_.assign(static_cast<size_t>(n), 0);
  positions_.resize(static_cast<size_t>(n));
  for (int64_t idx = 0; idx < n; ++idx) positions_[idx] = static_cast<int32_t>(start_pos + idx);
  const auto table = kv_->block_table(seq);
  tables_.assign(table.begin(), table.end());
  return static_cast<int64_t>(table.size());
}

bool Decoder::routes_on_device(const RouterObserver* observer) const {
  return backend_.prefers_device_routing() && experts_.all_resident() && observer == nullptr &&
         experts_.lookahead_layers() == 0 && routing_override_ == nullptr;
}

bool Decoder::can_chain_steps(bool sampled) const {
  return backend_.chains_steps() && routes_on_device(nullptr) &&
         (!sampled || backend_.samples_on_device(cfg_.vocab_size));
}

void Decoder::enqueue_step(int32_t token, int64_t position, const TokenDraw& draw) {
  MOEX_ASSERT(can_chain_steps(draw.temperature > 0.0f), "enqueue_step: the backend cannot chain these steps here");
  if (token != Backend::kTokenOnDevice) check_token(token);
  const int64_t stride = prepare_rows(default_seq_, position, 1);
  ids_.assign(1, token);
  launch_step(ids_, position, stride, /*all_logits=*/false, /*want_logits=*/true, nullptr, &draw);  // recordable
}

int32_t Decoder::next_token() { return backend_.picked_token(); }

bool Decoder::forward_batch(std::span<const DecodeStep> steps, std::vector<float>* logits,
                            std::vector<int32_t>* picked_ids, std::span<const TokenDraw> draws) {
  const int64_t stride = prepare_batch(steps, /*tokens_on_device=*/false);
  MOEX_ASSERT(draws.empty() || draws.size() == steps.size(), "forward_batch: {} draws for {} steps", draws.size(),
              steps.size());
  chained_seqs_.clear();  // the device's picks, if any, are not this step's tokens any more
  return run_step(ids_, steps[0].position, stride, /*all_logits=*/true, logits, nullptr, picked_ids, draws,
                  /*rows_are_sequences=*/true);
}

int64_t Decoder::prepare_batch(std::span<const DecodeStep> steps, bool tokens_on_device) {
  const int64_t n = static_cast<int64_t>(steps.size());
  if (n == 0) throw UsageError("forward_batch: no sequences to run");
  if (routing_override_) throw UsageError("forward_batch: a routing override replays one sequence; not a batch");
  ids_.resize(static_cast<size_t>(n));
  for (int64_t row = 0; row < n; ++row) {
    const DecodeStep& step = steps[row];
    if (!tokens_on_device) check_token(step.token);
    const int64_t length = kv_->length(step.seq);
    if (step.position < 0 || step.position > length)
      throw UsageError(fmt::format("forward_batch: sequence {} holds positions 0..{}; cannot continue at position {}",
                                   step.seq, length - 1, step.position));
    for (int64_t other = 0; other < row; ++other)
      if (steps[other].seq == step.seq)
        throw UsageError(fmt::format("forward_batch: sequence {} appears twice in one step", step.seq));
    ids_[row] = step.token;
  }
  int64_t stride = 0;
  for (const DecodeStep& step : steps) {
    kv_->resize(step.seq, step.position + 1);
    stride = std::max<int64_t>(stride, static_cast<int64_t>(kv_->block_table(step.seq).size()));
  }
  // Row i is the step's sequence i; shorter tables are padded with page 0, never read.
  row_seq_.resize(static_cast<size_t>(n));
  positions_.resize(static_cast<size_t>(n));
  tables_.assign(static_cast<size_t>(n * stride), 0);
  for (int64_t row = 0; row < n; ++row) {
    row_seq_[row] = static_cast<int32_t>(row);
    positions_[row] = static_cast<int32_t>(steps[row].position);
    const auto table = kv_->block_table(steps[row].seq);
    std::copy(table.begin(), table.end(), tables_.begin() + row * stride);
  }
  return stride;
}

bool Decoder::can_chain_batches(int64_t rows, bool sampled) const {
  return backend_.chains_batch_steps(rows) && routes_on_device(nullptr) &&
         (!sampled || backend_.samples_on_device(cfg_.vocab_size));
}

void Decoder::enqueue_batch(std::span<const DecodeStep> steps, std::span<const TokenDraw> draws) {
  const int64_t n = static_cast<int64_t>(steps.size());
  const bool sampled = std::any_of(draws.begin(), draws.end(), [](const TokenDraw& d) { return d.temperature > 0; });
  MOEX_ASSERT(can_chain_batches(n, sampled), "enqueue_batch: the backend cannot chain batches of {} rows here", n);
  MOEX_ASSERT(draws.empty() || draws.size() == steps.size(), "enqueue_batch: {} draws for {} steps", draws.size(),
              steps.size());
  const auto on_device = [](const DecodeStep& step) { return step.token == Backend::kTokenOnDevice; };
  const bool tokens_on_device = n > 0 && on_device(steps[0]);
  if (!std::all_of(steps.begin(), steps.end(), [&](const DecodeStep& step) { return on_device(step) == tokens_on_device; }))
    throw UsageError("enqueue_batch: the tokens are either all on the device or none");
  if (tokens_on_device &&
      !std::equal(steps.begin(), steps.end(), chained_seqs_.begin(), chained_seqs_.end(),
                  [](const DecodeStep& step, int32_t seq) { return step.seq == seq; }))
    throw UsageError("enqueue_batch: tokens on the device need the previous batch's sequences in its order");
  const int64_t stride = prepare_batch(steps, tokens_on_device);
  launch_step(ids_, steps[0].position, stride, /*all_logits=*/true, /*want_logits=*/true, nullptr, nullptr,
              /*rows_are_sequences=*/true);
  backend_.pick_rows(scratch(kLogits, Shape{n, cfg_.vocab_size}), draws);
  chained_seqs_.resize(static_cast<size_t>(n));
  for (int64_t row = 0; row < n; ++row) chained_seqs_[row] = steps[row].seq;
}

void Decoder::next_batch_tokens(std::span<int32_t> ids) { backend_.picked_rows(ids); }

void Decoder::launch_step(std::span<const int32_t> ids, int64_t start_pos, int64_t table_stride, bool all_logits,
                          bool want_logits, RouterObserver* observer, const TokenDraw* pick,
                          bool rows_are_sequences) {
  const int64_t n = static_cast<int64_t>(ids.size());
  kv_step_ = KvStep{row_seq_, positions_, tables_, table_stride, kv_->page_size()};
  backend_.prepare_kv_step(kv_step_);

  // All-resident experts and nobody who needs the routing on the host: the backend routes on its device,
  // and a single-token step, or a batched one, becomes one recordable sequence of ops (CUDA graphs).
  const bool device_routing = routes_on_device(observer);
  auto ops = [&] { run_layers(ids, start_pos, positions_, all_logits, want_logits, device_routing, observer); };
  MOEX_ASSERT(!pick || (n == 1 && device_routing && want_logits), "launch_step: a pick needs a recordable step");
  if (pick)
    backend_.decode_step_with_pick(ids[0], positions_[0], ops, scratch(kLogits, Shape{1, cfg_.vocab_size}), *pick);
  else if (n == 1 && device_routing)
    backend_.decode_step(ids[0], positions_[0], ops);
  else if (rows_are_sequences && device_routing)
    backend_.decode_rows_step(ids, ops);
  else
    ops();
}

bool Decoder::run_step(std::span<const int32_t> ids, int64_t start_pos, int64_t table_stride, bool all_logits,
                       std::vector<float>* logits, RouterObserver* observer, std::vector<int32_t>* picked_ids,
                       std::span<const TokenDraw> draws, bool rows_are_sequences) {
  launch_step(ids, start_pos, table_stride, all_logits, logits != nullptr || picked_ids != nullptr, observer,
              nullptr, rows_are_sequences);
  if (!logits && !picked_ids) return false;
  const int64_t n = static_cast<int64_t>(ids.size());
  const int64_t rows = all_logits ? n : 1;
  const TensorView device_logits = scratch(kLogits, Shape{rows, cfg_.vocab_size});
  if (picked_ids) {
    picked_ids->resize(static_cast<size_t>(rows));
    if (draws.empty() ? backend_.argmax_rows(device_logits, *picked_ids)
                      : backend_.sample_rows(device_logits, draws, *picked_ids))
      return true;
  }
  if (!logits) throw UsageError("forward: the backend cannot pick tokens itself; pass logits too");
  logits->resize(static_cast<size_t>(rows * cfg_.vocab_size));
  backend_.copy_to_host(device_logits, logits->data());
  return false;
}

void Decoder::run_layers(std::span<const int32_t> ids, int64_t start_pos, std::span<const int32_t> positions,
                         bool all_logits, bool want_logits, bool device_routing, RouterObserver* observer) {
  const int64_t n = static_cast<int64_t>(ids.size());
  const int64_t hidden = cfg_.hidden_size, heads = cfg_.num_heads, kv_heads = cfg_.num_kv_heads, hd = cfg_.head_dim;
  const float eps = static_cast<float>(cfg_.rms_norm_eps);
  TensorView x = scratch(kResidual, Shape{n, hidden});
  TensorView h = scratch(kNormed, Shape{n, hidden});
  TensorView ffn_out = scratch(kFfnOut, Shape{n, hidden});
  // Every layer an MoE layer routed on the device: each norm can ride in the kernel that consumes it (the
  // q/k/v GEMV; the router), which adds the previous blocks' outputs into x itself: two launches fewer a layer.
  // The first q/k/v GEMV then reads the token's embedding itself too (embed_norm_linear_many).
  const bool fused_norms = device_routing && norms_fusable_ && backend_.fuses_residual_norms(n);
  if (!fused_norms || layers_.empty()) backend_.embedding(ids, embed_, x);
  // ... and where the backend runs a layer's tail in one pass (opt-in on CUDA), o_proj, the MoE and the next layer's
  // q/k/v go together (moe_layer_tail): the attention and that pass are a layer's only launches.
  const bool fused_tail = fused_norms && backend_.fuses_layer_tail();
  // A layer's q/k/v projections into q, k and v, each with its bias where the checkpoint has one.
  const auto qkv_outputs = [](const DeviceLayer& layer, const TensorView& q, const TensorView& k,
                              const TensorView& v) -> std::array<Backend::LinearOutput, 3> {
    const auto bias = [](const TensorView& b) { return b.empty() ? nullptr : &b; };
    return {{{&layer.q_proj, bias(layer.q_bias), &q},
             {&layer.k_proj, bias(layer.k_bias), &k},
             {&layer.v_proj, bias(layer.v_bias), &v}}};
  };
  bool qkv_ready = false;  // the previous layer's tail wrote this layer's q/k/v
  for (size_t layer_idx = 0; layer_idx < layers_.size(); ++layer_idx) {
    const DeviceLayer& layer = layers_[layer_idx];
    const LayerWeights& host_layer = host_.layers[layer_idx];
    TensorView q = scratch(kQ, Shape{n, heads * hd});
    TensorView k = scratch(kK, Shape{n, kv_heads * hd});
    TensorView v = scratch(kV, Shape{n, kv_heads * hd});
    const std::array<Backend::LinearOutput, 3> qkv = qkv_outputs(layer, q, k, v);
    // The previous layer's MoE output, not yet in x when the norms are fused.
    const TensorView* pending = layer_idx == 0 ? nullptr : &ffn_out;
    if (qkv_ready) {
      // q, k and v hold this layer's rows already
    } else if (fused_norms && layer_idx == 0) {
      backend_.embed_norm_linear_many(ids, embed_, x, layer.attn_norm, eps, h, qkv);
    } else if (fused_norms) {
      backend_.norm_linear_many(x, pending, layer.attn_norm, eps, h, qkv);
    } else {
      // The previous block's residual add rides on this block's norm: one pass over x, one launch.
      if (layer_idx == 0) backend_.rms_norm(x, layer.attn_norm, eps, h);
      else backend_.add_rms_norm(x, ffn_out, layer.attn_norm, eps, h);
      backend_.linear_many(h, qkv);
    }
    // Per-head q/k norms go with RoPE into one op, unless a clamp must come between them (OLMoE's order:
    // norms, clamp, rope).
    const bool norm_with_rope = cfg_.qk_norm == QkNorm::kPerHead && cfg_.clip_qkv <= 0;
    if (cfg_.qk_norm == QkNorm::kPerHead && !norm_with_rope) {
      backend_.rms_norm(q.reshape(Shape{n * heads, hd}), layer.q_norm, eps, q.reshape(Shape{n * heads, hd}));
      backend_.rms_norm(k.reshape(Shape{n * kv_heads, hd}), layer.k_norm, eps, k.reshape(Shape{n * kv_heads, hd}));
    } else if (cfg_.qk_norm == QkNorm::kFull) {
      backend_.rms_norm(q, layer.q_norm, eps, q);
      backend_.rms_norm(k, layer.k_norm, eps, k);
    }
    if (cfg_.clip_qkv > 0) {  // OLMoE clamps after the q/k norms
      backend_.clamp(q, static_cast<float>(cfg_.clip_qkv));
      backend_.clamp(k, static_cast<float>(cfg_.clip_qkv));
      backend_.clamp(v, static_cast<float>(cfg_.clip_qkv));
    }
    TensorView q3 = q.reshape(Shape{n, heads, hd});
    TensorView k3 = k.reshape(Shape{n, kv_heads, hd});
    const TensorView& k_pages = kv_->k_pages(static_cast<int64_t>(layer_idx));
    const TensorView& v_pages = kv_->v_pages(static_cast<int64_t>(layer_idx));
    TensorView attn = scratch(kAttn, Shape{n, heads, hd});
    backend_.rope_kv_attention(q3, k3, v.reshape(Shape{n, kv_heads, hd}), norm_with_rope ? &layer.q_norm : nullptr,
                               norm_with_rope ? &layer.k_norm : nullptr, eps, positions, cfg_.rotary_dim,
                               cfg_.rope_theta, kv_step_, k_pages, v_pages,
                               static_cast<float>(1.0 / std::sqrt(static_cast<double>(hd))), attn);
    TensorView proj = scratch(kProj, Shape{n, hidden});
    if (fused_tail) {
      TensorView router_logits = scratch(kRouterLogits, Shape{n, cfg_.num_experts});
      qkv_ready = layer_idx + 1 < layers_.size();
      std::array<Backend::LinearOutput, 3> next_qkv{};
      Backend::LayerTailNext next;
      if (qkv_ready) {
        const DeviceLayer& nl = layers_[layer_idx + 1];
        next_qkv = qkv_outputs(nl, q, k, v);
        next = {&nl.attn_norm, next_qkv};
      }
      backend_.moe_layer_tail(attn.reshape(Shape{n, heads * hd}), layer.o_proj, proj, x, pending, layer.ffn_norm, eps,
                              h, layer.router, router_logits, cfg_.top_k, cfg_.router_scoring, cfg_.norm_topk_prob,
                              experts_.resident_layer(host_layer.moe_layer_idx), ffn_out, qkv_ready ? &next : nullptr);
      continue;
    }
    backend_.linear(attn.reshape(Shape{n, heads * hd}), layer.o_proj, nullptr, proj);
    if (fused_norms) {  // x += pending + proj, h = norm(x), and the MoE: in the router's launch
      TensorView router_logits = scratch(kRouterLogits, Shape{n, cfg_.num_experts});
      backend_.norm_moe_routed(x, pending, proj, layer.ffn_norm, eps, h, layer.router, router_logits, cfg_.top_k,
                               cfg_.router_scoring, cfg_.norm_topk_prob,
                               experts_.resident_layer(host_layer.moe_layer_idx), ffn_out);
      continue;
    }
    backend_.add_rms_norm(x, proj, layer.ffn_norm, eps, h);

    if (host_layer.is_moe) {
      TensorView router_logits = scratch(kRouterLogits, Shape{n, cfg_.num_experts});
      if (device_routing) {
        backend_.moe_routed(h, layer.router, router_logits, cfg_.top_k, cfg_.router_scoring, cfg_.norm_topk_prob,
                            experts_.resident_layer(host_layer.moe_layer_idx), ffn_out);
      } else {
        backend_.linear(h, layer.router, nullptr, router_logits);
        backend_.route(router_logits, cfg_.top_k, cfg_.router_scoring, cfg_.norm_topk_prob, &routing_);
        if (routing_override_) routing_override_->override_routing(host_layer.moe_layer_idx, start_pos, &routing_);
        if (observer) {
          router_host_.resize(static_cast<size_t>(n * cfg_.num_experts));
          backend_.copy_to_host(router_logits, router_host_.data());
          observer->on_router(host_layer.moe_layer_idx, start_pos, router_host_, routing_);
          const int32_t next = host_layer.moe_layer_idx + 1;
          if (observer->wants_pregate() && next < static_cast<int32_t>(moe_layers_.size())) {
            TensorView ahead = scratch(kLookahead, Shape{n, cfg_.num_experts});
            backend_.linear(h, layers_[moe_layers_[next]].router, nullptr, ahead);
            router_host_.resize(static_cast<size_t>(n * cfg_.num_experts));
            backend_.copy_to_host(ahead, router_host_.data());
            observer->on_pregate(next, start_pos, router_host_);
          }
        }
        if (experts_.lookahead_layers() > 0) pregate(host_layer.moe_layer_idx, h);
        run_experts(host_layer.moe_layer_idx, h, ffn_out);
      }
      if (layer.shared_expert.valid()) {
        TensorView shared = scratch(kShared, Shape{n, hidden});
        swiglu(h, layer.shared_expert, cfg_.shared_expert_ffn_size, shared);
        if (!layer.shared_expert_gate.empty()) {
          TensorView gate_logit = scratch(kSharedGate, Shape{n, 1});
          backend_.linear(h, layer.shared_expert_gate, nullptr, gate_logit);
          backend_.add_sigmoid_gated(ffn_out, shared, gate_logit);
        } else {
          backend_.add(ffn_out, shared, ffn_out);
        }
      }
    } else {
      swiglu(h, layer.dense_mlp, cfg_.dense_ffn_size, ffn_out);
    }
    // ffn_out is added to x by the next layer's norm, or below.
  }
  if (!want_logits) return;
  const int64_t rows = all_logits ? n : 1;
  TensorView normed = scratch(kNormed, Shape{rows, hidden});
  const TensorView logits = scratch(kLogits, Shape{rows, cfg_.vocab_size});
  if (rows == n) {  // the last layer's output is still pending (each layer leaves it to the next norm)
    backend_.norm_logits(x, &ffn_out, final_norm_, eps, normed, lm_head_, logits);
    return;
  }
  backend_.add(x, ffn_out, x);
  backend_.rms_norm(x.rows(n - rows, rows), final_norm_, eps, normed);
  backend_.linear(normed, lm_head_, nullptr, logits);
}

}  // namespace moex
