#include "moex/model/model_weights.h"

#include <cmath>
#include <cstring>
#include <thread>

#include "moex/core/error.h"
#include "moex/core/progress.h"
#include "moex/core/thread_pool.h"
#include "moex/io/hf_config.h"
#include "moex/model/registry.h"

namespace moex {
namespace {

bool is_float(DType dtype) { return dtype == DType::kF32 || dtype == DType::kF16 || dtype == DType::kBF16; }

class Loader {
 public:
  Loader(const Checkpoint& ckpt, const ModelConfig& cfg, ModelWeights* out) : ckpt_(ckpt), cfg_(cfg), out_(out) {}

  // A matrix: must exist, have exactly `shape`, and the config's dtype.
  TensorView matrix(const std::string& name, Shape shape) {
    TensorView view = ckpt_.tensor(name);
    check_shape(name, view, shape);
    if (view.dtype != cfg_.weight_dtype)
      throw FormatError(fmt::format("{}: tensor \"{}\" has dtype {} but config.json says {}", ckpt_.file_of(name),
                                    name, dtype_name(view.dtype), dtype_name(cfg_.weight_dtype)));
    return view;
  }

  // A small vector converted to fp32 (norm weights, biases).
  TensorView vector_f32(const std::string& name, int64_t size) {
    TensorView view = ckpt_.tensor(name);
    check_shape(name, view, Shape{size});
    return to_f32(view);
  }

  TensorView optional_vector_f32(const std::string& name, int64_t size) {
    return ckpt_.has(name) ? vector_f32(name, size) : TensorView{};
  }

  TensorView to_f32(const TensorView& view) {
    HostTensor owned(DType::kF32, view.shape);
    float* dst = owned.as<float>();
    for (int64_t idx = 0; idx < view.numel(); ++idx) {
      switch (view.dtype) {
        case DType::kF32: dst[idx] = view.as<float>()[idx]; break;
        case DType::kBF16: dst[idx] = bf16_to_f32(view.as<uint16_t>()[idx]); break;
        case DType::kF16: dst[idx] = f16_to_f32(view.as<uint16_t>()[idx]); break;
        case DType::kI32:
        case DType::kI64: MOEX_ASSERT(false, "integer weight"); break;
      }
    }
    out_->owned.push_back(owned);
    return owned.view();
  }

  void check_shape(const std::string& name, const TensorView& view, const Shape& shape) {
    if (!is_float(view.dtype))
      throw FormatError(fmt::format("{}: tensor \"{}\" has dtype {}, expected a float type", ckpt_.file_of(name), name,
                                    dtype_name(view.dtype)));
    if (!(view.shape == shape))
      throw FormatError(fmt::format("{}: tensor \"{}\" has shape {}, expected {} from config.json ({})",
                                    ckpt_.file_of(name), name, view.shape.str(), shape.str(), cfg_.summary()));
  }

  const std::string* first_present(const std::vector<std::string>& patterns, int64_t layer_idx, int64_t expert_idx) {
    for (const auto& pattern : patterns)
      if (ckpt_.has(WeightNames::format(pattern, layer_idx, expert_idx))) return &pattern;
    return nullptr;
  }

  // Experts of one layer, per-expert tensors or fused 3-D tensors.
  std::vector<ExpertWeights> experts(const WeightNames& names, int64_t layer_idx) {
    const int64_t num_experts = cfg_.num_experts, ffn = cfg_.expert_ffn_size, hidden = cfg_.hidden_size;
    std::vector<ExpertWeights> out(num_experts);
    for (const auto& layout : names.expert_layouts) {
      if (!ckpt_.has(WeightNames::format(layout[0], layer_idx, 0))) continue;
      for (int64_t expert_idx = 0; expert_idx < num_experts; ++expert_idx) {
        out[expert_idx].gate = matrix(WeightNames::format(layout[0], layer_idx, expert_idx), Shape{ffn, hidden});
        out[expert_idx].up = matrix(WeightNames::format(layout[1], layer_idx, expert_idx), Shape{ffn, hidden});
        out[expert_idx].down = matrix(WeightNames::format(layout[2], layer_idx, expert_idx), Shape{hidden, ffn});
      }
      return out;
    }
    for (const auto& [gate_up_pattern, down_pattern] : names.fused_experts) {
      std::string gate_up_name = WeightNames::format(gate_up_pattern, layer_idx);
      if (!ckpt_.has(gate_up_name)) continue;
      std::string down_name = WeightNames::format(down_pattern, layer_idx);
      TensorView gate_up = ckpt_.tensor(gate_up_name);
      TensorView down = ckpt_.tensor(down_name);
      const bool row_major = gate_up.shape == Shape{num_experts, 2 * ffn, hidden};
      if (!row_major) check_shape(gate_up_name, gate_up, Shape{num_experts, hidden, 2 * ffn});
      const bool down_row_major = down.shape == Shape{num_experts, hidden, ffn};
      if (!down_row_major) check_shape(down_name, down, Shape{num_experts, ffn, hidden});
      for (const auto& [name, view] : {std::pair{gate_up_name, gate_up}, std::pair{down_name, down}})
        if (view.dtype != cfg_.weight_dtype)
          throw FormatError(fmt::format("{}: tensor \"{}\" has dtype {} but config.json says {}", ckpt_.file_of(name),
                                        name, dtype_name(view.dtype), dtype_name(cfg_.weight_dtype)));
      for (int64_t expert_idx = 0; expert_idx < num_experts; ++expert_idx) {
        TensorView gate_up_e = gate_up.rows(expert_idx, 1).reshape(row_major ? Shape{2 * ffn, hidden} : Shape{hidden, 2 * ffn});
        TensorView down_e = down.rows(expert_idx, 1).reshape(down_row_major ? Shape{hidden, ffn} : Shape{ffn, hidden});
        if (row_major) {
          out[expert_idx].gate = gate_up_e.rows(0, ffn);
          out[expert_idx].up = gate_up_e.rows(ffn, ffn);
        } else {  // [hidden, 2*ffn]: transpose into owned [2*ffn, hidden]
          TensorView transposed = transpose(gate_up_e);
          out[expert_idx].gate = transposed.rows(0, ffn);
          out[expert_idx].up = transposed.rows(ffn, ffn);
        }
        out[expert_idx].down = down_row_major ? down_e : transpose(down_e);
      }
      return out;
    }
    throw FormatError(fmt::format("{}: no expert weights found for layer {} (looked for \"{}\" and \"{}\")", ckpt_.dir(),
                                  layer_idx, WeightNames::format(names.expert_layouts.front()[0], layer_idx, 0),
                                  WeightNames::format(names.fused_experts.front().first, layer_idx)));
  }

  TensorView transpose(const TensorView& view) {
    const int64_t rows = view.dim(0), cols = view.dim(1);
    HostTensor owned(view.dtype, Shape{cols, rows});
    const size_t elem = dtype_size(view.dtype);
    const char* src = static_cast<const char*>(view.data);
    char* dst = static_cast<char*>(owned.view().data);
    for (int64_t row = 0; row < rows; ++row)
      for (int64_t col = 0; col < cols; ++col)
        std::memcpy(dst + (col * rows + row) * elem, src + (row * cols + col) * elem, elem);
    out_->owned.push_back(owned);
    return owned.view();
  }

 private:
  const Checkpoint& ckpt_;
  const ModelConfig& cfg_;
  ModelWeights* out_;
};

}  // namespace

namespace {

// Packs every MoE expert of *weights (their views stay valid: they point into the checkpoint's mmap).
void pack_moe_experts(ModelWeights* weights) {
  ThreadPool pool;
  int64_t total = 0;
  for (const LayerWeights& layer : weights->layers) total += static_cast<int64_t>(layer.experts.size());
  ProgressBar progress("packing experts", total);
  for (LayerWeights& layer : weights->layers)
    for (ExpertWeights& expert : layer.experts) {
      progress.advance();
      auto packed = std::make_shared<PackedExpert>();
      for (auto [view, out] : {std::pair{&expert.gate, &packed->gate}, std::pair{&expert.up, &packed->up},
                               std::pair{&expert.down, &packed->down}}) {
        if (view->dtype != DType::kBF16)
          throw UsageError(fmt::format("--pack-experts packs bf16 experts; layer {}'s experts are {}",
                                       layer.moe_layer_idx, dtype_name(view->dtype)));
        *out = pack_bf16(view->as<uint16_t>(), view->dim(0), view->dim(1), &pool);
      }
      expert.packed = packed.get();
      weights->packed.push_back(std::move(packed));
    }
}

}  // namespace

ModelWeights load_checkpoint_weights(const Checkpoint& ckpt, const ModelConfig& cfg, bool pack_experts) {
  HfConfig hf = HfConfig::load(ckpt.config_path());
  WeightNames names = find_arch(hf).weight_names();
  ModelWeights weights;
  Loader load(ckpt, cfg, &weights);
  const int64_t hidden = cfg.hidden_size, q_dim = cfg.num_heads * cfg.head_dim, kv_dim = cfg.num_kv_heads * cfg.head_dim;
  weights.embed = load.matrix(names.embed, Shape{cfg.vocab_size, hidden});
  weights.final_norm = load.vector_f32(names.final_norm, hidden);
  if (cfg.tie_word_embeddings && !ckpt.has(names.lm_head)) weights.lm_head = weights.embed;
  else weights.lm_head = load.matrix(names.lm_head, Shape{cfg.vocab_size, hidden});

  int32_t moe_layer_idx = 0;
  for (int64_t layer_idx = 0; layer_idx < cfg.num_layers; ++layer_idx) {
    auto name = [&](const std::string& pattern) { return WeightNames::format(pattern, layer_idx); };
    LayerWeights layer;
    layer.attn_norm = load.vector_f32(name(names.attn_norm), hidden);
    layer.ffn_norm = load.vector_f32(name(names.ffn_norm), hidden);
    layer.q_proj = load.matrix(name(names.q_proj), Shape{q_dim, hidden});
    layer.k_proj = load.matrix(name(names.k_proj), Shape{kv_dim, hidden});
    layer.v_proj = load.matrix(name(names.v_proj), Shape{kv_dim, hidden});
    layer.o_proj = load.matrix(name(names.o_proj), Shape{hidden, q_dim});
    layer.q_bias = load.optional_vector_f32(name(names.q_bias), q_dim);
    layer.k_bias = load.optional_vector_f32(name(names.k_bias), kv_dim);
    layer.v_bias = load.optional_vector_f32(name(names.v_bias), kv_dim);
    switch (cfg.qk_norm) {
      case QkNorm::kNone: break;
      case QkNorm::kPerHead:
        layer.q_norm = load.vector_f32(name(names.q_norm), cfg.head_dim);
        layer.k_norm = load.vector_f32(name(names.k_norm), cfg.head_dim);
        break;
      case QkNorm::kFull:
        layer.q_norm = load.vector_f32(name(names.q_norm), q_dim);
        layer.k_norm = load.vector_f32(name(names.k_norm), kv_dim);
        break;
    }
    layer.is_moe = cfg.layer_is_moe[layer_idx];
    if (layer.is_moe) {
      layer.moe_layer_idx = moe_layer_idx++;
      const std::string* router = load.first_present(names.router, layer_idx, -1);
      if (!router)
        throw FormatError(fmt::format("{}: router weight \"{}\" of layer {} is missing", ckpt.dir(),
                                      name(names.router.front()), layer_idx));
      layer.router = load.matrix(name(*router), Shape{cfg.num_experts, hidden});
      layer.experts = load.experts(names, layer_idx);
      if (cfg.shared_expert_ffn_size > 0) {
        const int64_t shared = cfg.shared_expert_ffn_size;
        layer.shared_expert.gate = load.matrix(name(names.shared_gate_proj), Shape{shared, hidden});
        layer.shared_expert.up = load.matrix(name(names.shared_up_proj), Shape{shared, hidden});
        layer.shared_expert.down = load.matrix(name(names.shared_down_proj), Shape{hidden, shared});
        if (cfg.shared_expert_gate)
          layer.shared_expert_gate = load.matrix(name(names.shared_expert_gate), Shape{1, hidden});
      }
    } else {
      const int64_t ffn = cfg.dense_ffn_size;
      layer.dense_mlp.gate = load.matrix(name(names.dense_gate_proj), Shape{ffn, hidden});
      layer.dense_mlp.up = load.matrix(name(names.dense_up_proj), Shape{ffn, hidden});
      layer.dense_mlp.down = load.matrix(name(names.dense_down_proj), Shape{hidden, ffn});
    }
    weights.layers.push_back(std::move(layer));
  }
  if (pack_experts) pack_moe_experts(&weights);
  return weights;
}

namespace {

// splitmix64: a tiny, fast, well-mixed generator; each tensor gets its own stream from (seed, index).
uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// Values depend on the seed, the tensor's order and the host's hardware thread count (each of that many chunks of
// a tensor is its own xorshift stream), not on which thread runs a chunk: one pool fills every tensor, the chunks
// spread over it, and each page is first touched by the thread that writes it.
class RandomFiller {
 public:
  RandomFiller(const ModelConfig& cfg, uint64_t seed, ModelWeights* out)
      : cfg_(cfg), seed_(seed), out_(out), num_chunks_(std::max(1u, std::thread::hardware_concurrency())),
        pool_(static_cast<int>(num_chunks_)) {}

  // Uniform in [-a, a] with a = sqrt(3) * std: same variance as a normal, cheap to draw.
  TensorView matrix(Shape shape, float std_dev) {
    HostTensor owned = HostTensor::uninitialized(cfg_.weight_dtype, shape);
    fill(owned.view(), std_dev, 0.0f);
    out_->owned.push_back(owned);
    return owned.view();
  }

  // One MoE expert generated into a scratch matrix and packed: the values matrix() would have drawn.
  ExpertWeights packed_expert(int64_t ffn, int64_t hidden, float std_in, float std_down) {
    if (cfg_.weight_dtype != DType::kBF16)
      throw UsageError(fmt::format("--pack-experts packs bf16 experts; this model's weights are {}",
                                   dtype_name(cfg_.weight_dtype)));
    auto expert = std::make_shared<PackedExpert>();
    ExpertWeights views;
    auto one = [&](Shape shape, float std_dev, PackedBf16* packed, TensorView* view) {
      if (scratch_.view().empty() || scratch_.numel() < shape.numel())
        scratch_ = HostTensor::uninitialized(DType::kBF16, Shape{shape.numel()});
      const TensorView values(scratch_.view().data, DType::kBF16, shape);
      fill(values, std_dev, 0.0f);
      *packed = pack_bf16(values.as<uint16_t>(), shape[0], shape[1], &pool_);
      *view = TensorView(nullptr, DType::kBF16, shape);
    };
    one(Shape{ffn, hidden}, std_in, &expert->gate, &views.gate);
    one(Shape{ffn, hidden}, std_in, &expert->up, &views.up);
    one(Shape{hidden, ffn}, std_down, &expert->down, &views.down);
    views.packed = expert.get();
    out_->packed.push_back(std::move(expert));
    return views;
  }

  TensorView norm(int64_t size) {
    HostTensor owned = HostTensor::uninitialized(DType::kF32, Shape{size});
    fill(owned.view(), 0.1f, 1.0f);
    out_->owned.push_back(owned);
    return owned.view();
  }

 private:
  void fill(const TensorView& view, float std_dev, float mean) {
    const uint64_t stream = splitmix64(seed_ ^ splitmix64(++counter_));
    const int64_t numel = view.numel();
    const float scale = std_dev * 1.7320508f / 2147483648.0f;
    const int64_t chunk = (numel + num_chunks_ - 1) / num_chunks_;
    switch (view.dtype) {
      case DType::kF32: return fill_as<float>(view, stream, numel, chunk, mean, scale, [](float v) { return v; });
      case DType::kBF16:
        return fill_as<uint16_t>(view, stream, numel, chunk, mean, scale, [](float v) { return f32_to_bf16(v); });
      case DType::kF16:
        return fill_as<uint16_t>(view, stream, numel, chunk, mean, scale, [](float v) { return f32_to_f16(v); });
      case DType::kI32:
      case DType::kI64: return;
    }
  }

  template <typename T, typename Convert>
  void fill_as(const TensorView& view, uint64_t stream, int64_t numel, int64_t chunk, float mean, float scale,
               Convert convert) {
    T* data = view.as<T>();
    pool_.parallel_for(num_chunks_, 1, [&](int64_t first, int64_t last) {
      for (int64_t t = first; t < last; ++t) {
        const int64_t begin = t * chunk, end = std::min(numel, begin + chunk);
        uint64_t state = splitmix64(stream + static_cast<uint64_t>(t));
        for (int64_t idx = begin; idx < end; ++idx) {
          state ^= state << 13;
          state ^= state >> 7;
          state ^= state << 17;
          data[idx] = convert(mean + static_cast<float>(static_cast<int32_t>(state >> 32)) * scale);
        }
      }
    });
  }

  const ModelConfig& cfg_;
  uint64_t seed_;
  uint64_t counter_ = 0;
  ModelWeights* out_;
  unsigned num_chunks_;
  ThreadPool pool_;
  HostTensor scratch_;  // packed_expert's unpacked matrix
};

}  // namespace

ModelWeights make_random_weights(const ModelConfig& cfg, uint64_t seed, bool pack_experts) {
  ModelWeights weights;
  // Seconds for real shapes (the 8x7B shape: ~20 s, ~30 s packed, on a 16-core host).
  ProgressBar progress(pack_experts ? "random weights, packing experts" : "random weights", cfg.num_layers);
  RandomFiller rng(cfg, seed, &weights);
  const int64_t hidden = cfg.hidden_size, q_dim = cfg.num_heads * cfg.head_dim, kv_dim = cfg.num_kv_heads * cfg.head_dim;
  const float std_hidden = 1.0f / std::sqrt(static_cast<float>(hidden));
  weights.embed = rng.matrix(Shape{cfg.vocab_size, hidden}, 1.0f);
  weights.final_norm = rng.norm(hidden);
  weights.lm_head = cfg.tie_word_embeddings ? weights.embed : rng.matrix(Shape{cfg.vocab_size, hidden}, std_hidden);
  int32_t moe_layer_idx = 0;
  for (int64_t layer_idx = 0; layer_idx < cfg.num_layers; ++layer_idx) {
    LayerWeights layer;
    layer.attn_norm = rng.norm(hidden);
    layer.ffn_norm = rng.norm(hidden);
    layer.q_proj = rng.matrix(Shape{q_dim, hidden}, std_hidden);
    layer.k_proj = rng.matrix(Shape{kv_dim, hidden}, std_hidden);
    layer.v_proj = rng.matrix(Shape{kv_dim, hidden}, std_hidden);
    layer.o_proj = rng.matrix(Shape{hidden, q_dim}, 1.0f / std::sqrt(static_cast<float>(q_dim)));
    if (cfg.qk_norm == QkNorm::kPerHead) {
      layer.q_norm = rng.norm(cfg.head_dim);
      layer.k_norm = rng.norm(cfg.head_dim);
    } else if (cfg.qk_norm == QkNorm::kFull) {
      layer.q_norm = rng.norm(q_dim);
      layer.k_norm = rng.norm(kv_dim);
    }
    layer.is_moe = cfg.layer_is_moe[layer_idx];
    auto mlp = [&](int64_t ffn) {
      return ExpertWeights{rng.matrix(Shape{ffn, hidden}, std_hidden), rng.matrix(Shape{ffn, hidden}, std_hidden),
                           rng.matrix(Shape{hidden, ffn}, 1.0f / std::sqrt(static_cast<float>(ffn)))};
    };
    if (layer.is_moe) {
      layer.moe_layer_idx = moe_layer_idx++;
      layer.router = rng.matrix(Shape{cfg.num_experts, hidden}, std_hidden);
      const int64_t ffn = cfg.expert_ffn_size;
      for (int64_t expert_idx = 0; expert_idx < cfg.num_experts; ++expert_idx)
        layer.experts.push_back(pack_experts ? rng.packed_expert(ffn, hidden, std_hidden,
                                                                 1.0f / std::sqrt(static_cast<float>(ffn)))
                                             : mlp(ffn));
      if (cfg.shared_expert_ffn_size > 0) {
        layer.shared_expert = mlp(cfg.shared_expert_ffn_size);
        if (cfg.shared_expert_gate) layer.shared_expert_gate = rng.matrix(Shape{1, hidden}, std_hidden);
      }
    } else {
      layer.dense_mlp = mlp(cfg.dense_ffn_size);
    }
    weights.layers.push_back(std::move(layer));
    progress.advance();
  }
  return weights;
}

}  // namespace moex
