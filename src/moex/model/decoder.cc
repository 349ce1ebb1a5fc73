#include "moex/model/decoder.h"

#include <algorithm>
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
  kLogits, kPartial, kLookahead, kHostPartial, kNumSlots
};
}  // namespace

Decoder::Decoder(const ModelConfig& cfg, const ModelWeights& weights, Backend& backend, ExpertProvider& experts)
    : cfg_(cfg), host_(weights), backend_(backend), experts_(experts), scratch_(kNumSlots) {
  auto up = [&](const TensorView& view, const std::string& name) {
    return view.empty() ? TensorView{} : backend_.upload_weight(view, name);
  };
  auto up_mlp = [&](const ExpertWeights& mlp, const std::string& name) {
    if (!mlp.valid()) return ExpertWeights{};
    return ExpertWeights{up(mlp.gate, name + ".gate"), up(mlp.up, name + ".up"), up(mlp.down, name + ".down")};
  };
  embed_ = up(weights.embed, "embed");
  final_norm_ = up(weights.final_norm, "final_norm");
  lm_head_ = weights.lm_head.data == weights.embed.data ? embed_ : up(weights.lm_head, "lm_head");
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
  }
}

Decoder::~Decoder() = default;

void Decoder::reserve(int64_t max_seq_len) {
  if (max_seq_len <= max_seq_len_) return;
  const Shape shape{max_seq_len, cfg_.num_kv_heads, cfg_.head_dim};
  std::vector<std::unique_ptr<Buffer>> grown;
  for (int64_t idx = 0; idx < 2 * cfg_.num_layers; ++idx) {
    grown.push_back(backend_.alloc(DType::kF32, shape));
    if (max_seq_len_ > 0) {  // keep the cached prefix: copy through the host (rare: only on growth)
      std::vector<float> host(static_cast<size_t>(max_seq_len_ * cfg_.num_kv_heads * cfg_.head_dim));
      backend_.copy_to_host(kv_cache_[idx]->view, host.data());
      backend_.copy_from_host(host.data(), grown.back()->view.rows(0, max_seq_len_));
    }
  }
  kv_cache_ = std::move(grown);
  backend_.reset_step_recordings();
  max_seq_len_ = max_seq_len;
}

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
  backend_.linear(x, mlp.gate, nullptr, gate);
  backend_.linear(x, mlp.up, nullptr, up);
  backend_.silu_mul(gate, up, gate);
  backend_.linear(gate, mlp.down, nullptr, out);
}

void Decoder::run_experts(int32_t moe_layer_idx, const TensorView& h, const TensorView& out) {
  experts_.acquire(moe_layer_idx, routing_, h, &expert_table_);
  auto resident = [&](int32_t id) { return id >= 0 && expert_table_[id].valid(); };
  if (std::all_of(routing_.expert_ids.begin(), routing_.expert_ids.end(), resident)) {
    moe_wave(routing_, h, out);
    experts_.release(moe_layer_idx);
    return;
  }
  // The provider's budget could not hold every routed expert at once (a prefill touching most of a
  // layer's experts): run the resident ones, release them, ask for the rest, accumulate.
  pending_ = routing_;
  wave_ = routing_;
  const TensorView partial = scratch(kPartial, out.shape);
  for (bool first = true;; first = false) {
    bool remaining = false;
    for (size_t idx = 0; idx < pending_.expert_ids.size(); ++idx) {
      const int32_t id = pending_.expert_ids[idx];
      const bool now = resident(id);
      wave_.expert_ids[idx] = now ? id : -1;
      if (now) pending_.expert_ids[idx] = -1;
      remaining |= pending_.expert_ids[idx] >= 0;
    }
    moe_wave(wave_, h, first ? out : partial);
    if (!first) backend_.add(out, partial, out);
    experts_.release(moe_layer_idx);
    if (!remaining) return;
    experts_.acquire(moe_layer_idx, pending_, h, &expert_table_);
  }
}

void Decoder::moe_wave(const Routing& wave, const TensorView& h, const TensorView& out) {
  auto on_host = [&](int32_t id) {
    return id >= 0 && expert_table_[id].gate.device == Device::kCpu && backend_.device() != Device::kCpu;
  };
  if (std::none_of(wave.expert_ids.begin(), wave.expert_ids.end(), on_host)) {
    backend_.moe_experts(h, wave, expert_table_, out);
    return;
  }
  MOEX_ASSERT(host_backend_, "the expert provider handed over host experts but the decoder has no host backend");
  host_wave_ = wave;
  device_wave_ = wave;
  for (size_t idx = 0; idx < wave.expert_ids.size(); ++idx) {
    if (on_host(wave.expert_ids[idx])) device_wave_.expert_ids[idx] = -1;
    else host_wave_.expert_ids[idx] = -1;
  }
  const int64_t n = h.dim(0), hidden = h.dim(1);
  h_host_.resize(static_cast<size_t>(n * hidden));
  out_host_.resize(static_cast<size_t>(n * hidden));
  // h reaches the host before the GPU's expert launch (copy_to_host waits for the stream), so the GPU
  // runs its resident experts while the CPU runs the missed ones.
  backend_.copy_to_host(h, h_host_.data());
  backend_.moe_experts(h, device_wave_, expert_table_, out);
  const TensorView h_view(h_host_.data(), DType::kF32, Shape{n, hidden});
  const TensorView out_view(out_host_.data(), DType::kF32, Shape{n, hidden});
  host_backend_->moe_experts(h_view, host_wave_, expert_table_, out_view);
  const TensorView from_host = scratch(kHostPartial, Shape{n, hidden});
  backend_.copy_from_host(out_host_.data(), from_host);
  backend_.add(out, from_host, out);
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
  const int64_t n = static_cast<int64_t>(ids.size());
  if (n == 0) throw UsageError("forward: no tokens to run");
  for (int32_t id : ids)
    if (id < 0 || id >= cfg_.vocab_size)
      throw UsageError(fmt::format("token id {} is out of range: the vocabulary has {} ids (0..{})", id,
                                   cfg_.vocab_size, cfg_.vocab_size - 1));
  if (start_pos + n > max_seq_len_) reserve(std::max(start_pos + n, max_seq_len_ * 2));

  std::vector<int32_t> positions(n);
  for (int64_t idx = 0; idx < n; ++idx) positions[idx] = static_cast<int32_t>(start_pos + idx);

  // All-resident experts and nobody who needs the routing on the host: the backend routes on its device,
  // and a single-token step becomes one recordable sequence of ops (CUDA graphs).
  const bool device_routing = backend_.prefers_device_routing() && experts_.all_resident() && observer == nullptr &&
                              experts_.lookahead_layers() == 0;
  auto ops = [&] { run_layers(ids, start_pos, positions, all_logits, logits != nullptr, device_routing, observer); };
  if (n == 1 && device_routing)
    backend_.decode_step(ids[0], start_pos, ops);
  else
    ops();
  if (!logits) return;
  const int64_t rows = all_logits ? n : 1;
  logits->resize(static_cast<size_t>(rows * cfg_.vocab_size));
  backend_.copy_to_host(scratch(kLogits, Shape{rows, cfg_.vocab_size}), logits->data());
}

void Decoder::run_layers(std::span<const int32_t> ids, int64_t start_pos, std::span<const int32_t> positions,
                         bool all_logits, bool want_logits, bool device_routing, RouterObserver* observer) {
  const int64_t n = static_cast<int64_t>(ids.size());
  const int64_t hidden = cfg_.hidden_size, heads = cfg_.num_heads, kv_heads = cfg_.num_kv_heads, hd = cfg_.head_dim;
  TensorView x = scratch(kResidual, Shape{n, hidden});
  backend_.embedding(ids, embed_, x);
  for (size_t layer_idx = 0; layer_idx < layers_.size(); ++layer_idx) {
    const DeviceLayer& layer = layers_[layer_idx];
    const LayerWeights& host_layer = host_.layers[layer_idx];
    TensorView h = scratch(kNormed, Shape{n, hidden});
    backend_.rms_norm(x, layer.attn_norm, static_cast<float>(cfg_.rms_norm_eps), h);

    TensorView q = scratch(kQ, Shape{n, heads * hd});
    TensorView k = scratch(kK, Shape{n, kv_heads * hd});
    TensorView v = scratch(kV, Shape{n, kv_heads * hd});
    backend_.linear(h, layer.q_proj, layer.q_bias.empty() ? nullptr : &layer.q_bias, q);
    backend_.linear(h, layer.k_proj, layer.k_bias.empty() ? nullptr : &layer.k_bias, k);
    backend_.linear(h, layer.v_proj, layer.v_bias.empty() ? nullptr : &layer.v_bias, v);
    switch (cfg_.qk_norm) {
      case QkNorm::kNone: break;
      case QkNorm::kPerHead:
        backend_.rms_norm(q.reshape(Shape{n * heads, hd}), layer.q_norm, static_cast<float>(cfg_.rms_norm_eps),
                          q.reshape(Shape{n * heads, hd}));
        backend_.rms_norm(k.reshape(Shape{n * kv_heads, hd}), layer.k_norm, static_cast<float>(cfg_.rms_norm_eps),
                          k.reshape(Shape{n * kv_heads, hd}));
        break;
      case QkNorm::kFull:
        backend_.rms_norm(q, layer.q_norm, static_cast<float>(cfg_.rms_norm_eps), q);
        backend_.rms_norm(k, layer.k_norm, static_cast<float>(cfg_.rms_norm_eps), k);
        break;
    }
    if (cfg_.clip_qkv > 0) {  // OLMoE clamps after the q/k norms
      backend_.clamp(q, static_cast<float>(cfg_.clip_qkv));
      backend_.clamp(k, static_cast<float>(cfg_.clip_qkv));
      backend_.clamp(v, static_cast<float>(cfg_.clip_qkv));
    }
    TensorView q3 = q.reshape(Shape{n, heads, hd});
    TensorView k3 = k.reshape(Shape{n, kv_heads, hd});
    backend_.rope(q3, positions, cfg_.rotary_dim, cfg_.rope_theta);
    backend_.rope(k3, positions, cfg_.rotary_dim, cfg_.rope_theta);
    const TensorView& k_cache = kv_cache_[2 * layer_idx]->view;
    const TensorView& v_cache = kv_cache_[2 * layer_idx + 1]->view;
    backend_.kv_write(k3, v.reshape(Shape{n, kv_heads, hd}), k_cache, v_cache, start_pos);
    TensorView attn = scratch(kAttn, Shape{n, heads, hd});
    backend_.attention(q3, k_cache, v_cache, start_pos, static_cast<float>(1.0 / std::sqrt(static_cast<double>(hd))),
                       attn);
    TensorView proj = scratch(kProj, Shape{n, hidden});
    backend_.linear(attn.reshape(Shape{n, heads * hd}), layer.o_proj, nullptr, proj);
    backend_.add(x, proj, x);

    backend_.rms_norm(x, layer.ffn_norm, static_cast<float>(cfg_.rms_norm_eps), h);
    TensorView ffn_out = scratch(kFfnOut, Shape{n, hidden});
    if (host_layer.is_moe) {
      TensorView router_logits = scratch(kRouterLogits, Shape{n, cfg_.num_experts});
      backend_.linear(h, layer.router, nullptr, router_logits);
      if (device_routing) {
        backend_.moe_routed(h, router_logits, cfg_.top_k, cfg_.router_scoring, cfg_.norm_topk_prob,
                            experts_.resident_layer(host_layer.moe_layer_idx), ffn_out);
      } else {
        backend_.route(router_logits, cfg_.top_k, cfg_.router_scoring, cfg_.norm_topk_prob, &routing_);
        if (observer) {
          router_host_.resize(static_cast<size_t>(n * cfg_.num_experts));
          backend_.copy_to_host(router_logits, router_host_.data());
          observer->on_router(host_layer.moe_layer_idx, start_pos, router_host_, routing_);
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
    backend_.add(x, ffn_out, x);
  }
  if (!want_logits) return;
  const int64_t rows = all_logits ? n : 1;
  TensorView last = x.rows(n - rows, rows);
  TensorView normed = scratch(kNormed, Shape{rows, hidden});
  backend_.rms_norm(last, final_norm_, static_cast<float>(cfg_.rms_norm_eps), normed);
  backend_.linear(normed, lm_head_, nullptr, scratch(kLogits, Shape{rows, cfg_.vocab_size}));
}

}  // namespace moex
