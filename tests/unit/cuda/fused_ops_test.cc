// The fused decode ops (linear_many, add_rms_norm, the residual norms in their consumers, qk_norm_rope) against double-precision references, and
// against the Backend defaults they replace (the unfused ops on the same device), on fresh random data.
#include <gtest/gtest.h>

#include <cmath>

#include "cuda_test_util.h"
#include "unit/scoped_env.h"
#include "moex/backend/cuda/cublas_gemm.h"
#include "moex/backend/cuda/cuda_resources.h"
#include "moex/backend/cuda/kernels/elementwise.cuh"

namespace moex::cuda_test {
namespace {

struct ManyCase {
  int64_t rows, in;
  std::vector<int64_t> outs;
  bool bias;
};

class CudaLinearMany : public ::testing::TestWithParam<ManyCase> {};

TEST_P(CudaLinearMany, MatchesReference) {
  MOEX_CUDA_BACKEND_OR_SKIP(backend);
  const ManyCase c = GetParam();
  std::mt19937 rng(static_cast<uint32_t>(c.rows * 977 + c.in * 3 + c.outs.size()));
  SCOPED_TRACE(testing::Message() << "linear_many(rows=" << c.rows << ",in=" << c.in << ",outputs=" << c.outs.size()
                                  << ")");
  auto x = random_floats(rng, static_cast<size_t>(c.rows * c.in));
  std::vector<Bf16Weight> w;
  std::vector<std::vector<float>> bias;
  std::vector<TensorView> wd, bd;
  std::vector<std::unique_ptr<GuardedTensor>> yd;
  for (int64_t n : c.outs) {
    w.push_back(random_bf16(rng, {n, c.in}, 1.f / std::sqrt(float(c.in))));
    bias.push_back(random_floats(rng, static_cast<size_t>(n)));
  }
  for (size_t i = 0; i < c.outs.size(); ++i) {
    wd.push_back(backend->upload_weight(w[i].host_view(), "w"));
    bd.push_back(backend->upload_weight(TensorView(bias[i].data(), DType::kF32, {c.outs[i]}), "b"));
    yd.push_back(std::make_unique<GuardedTensor>(*backend, Shape{c.rows, c.outs[i]}));
  }
  std::vector<TensorView> outs;
  for (auto& y : yd) outs.push_back(y->view());
  std::vector<Backend::LinearOutput> outputs;
  for (size_t i = 0; i < c.outs.size(); ++i) outputs.push_back({&wd[i], c.bias ? &bd[i] : nullptr, &outs[i]});
  GuardedTensor xd(*backend, {c.rows, c.in});
  xd.fill(x);
  // Past 32 rows the tensor-core GEMM takes x rounded to bf16: against that the products are exact and only the
  // fp32 sums differ, so a block that wrote another output's columns (the outputs share one grid) cannot hide in
  // the tolerance. Both GEMM kernels where the wgmma one runs (MOEX_CUDA_WGMMA=0: mma.sync only).
  const bool gemm = c.rows > 32;
  std::vector<float> xr = x;
  if (gemm)
    for (float& v : xr) v = bf16_to_f32(f32_to_bf16(v));
  std::vector<std::vector<double>> refs;
  for (size_t i = 0; i < c.outs.size(); ++i) {
    const int64_t n = c.outs[i];
    std::vector<double> ref(static_cast<size_t>(c.rows * n));
    for (int64_t r = 0; r < c.rows; ++r)
      for (int64_t o = 0; o < n; ++o) {
        double acc = c.bias ? bias[i][o] : 0.0;
        const float* xrow = xr.data() + r * c.in;
        const float* wrow = w[i].values.data() + o * c.in;
        for (int64_t k = 0; k < c.in; ++k) acc += double(xrow[k]) * wrow[k];
        ref[r * n + o] = acc;
      }
    refs.push_back(std::move(ref));
  }
  // cuBLAS (the default where it loads): the same products, its own fp32 sums, one call per output; and moex's own
  // kernels (MOEX_CUDA_CUBLAS=0), wgmma and mma.sync.
  static const bool have_cublas = [] {
    std::string why_not;
    return cuda::CublasGemm::open(&why_not) != nullptr;
  }();
  struct Variant {
    const char* wgmma;  // MOEX_CUDA_WGMMA's value (null: unset)
    bool blas;          // cuBLAS (MOEX_CUDA_CUBLAS unset), else MOEX_CUDA_CUBLAS=0
    const char* label;
  };
  for (const Variant v : {Variant{nullptr, false, "moex's wgmma kernel (MOEX_CUDA_CUBLAS=0)"},
                          Variant{"0", false, "MOEX_CUDA_WGMMA=0 MOEX_CUDA_CUBLAS=0"},
                          Variant{nullptr, true, "cuBLAS (the default)"}}) {
    if ((v.wgmma && !gemm) || (v.blas && !have_cublas)) continue;
    const test::ScopedEnv kernel("MOEX_CUDA_WGMMA", v.wgmma);
    const test::ScopedEnv library("MOEX_CUDA_CUBLAS", v.blas ? nullptr : "0");
    SCOPED_TRACE(v.label);
    for (auto& y : yd) y->fill(std::vector<float>(static_cast<size_t>(y->view().numel()), std::nanf("")));
    const int64_t before = cuda_cublas_gemms(*backend);
    backend->linear_many(xd.view(), outputs);
    EXPECT_EQ(cuda_cublas_gemms(*backend) - before, v.blas && gemm ? static_cast<int64_t>(c.outs.size()) : 0);
    for (size_t i = 0; i < c.outs.size(); ++i) {
      SCOPED_TRACE(testing::Message() << "output " << i);
      MOEX_EXPECT_CLOSE(yd[i]->read(), refs[i], 1e-5);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, CudaLinearMany,
                         ::testing::Values(ManyCase{1, 64, {32, 8, 8}, true}, ManyCase{3, 136, {7, 9}, false},
                                           ManyCase{8, 256, {31, 1, 65}, true}, ManyCase{2, 31, {5, 6}, true},
                                           ManyCase{40, 128, {64, 32, 32}, true},  // prefill: tensor cores
                                           // Model A q/k/v and Model B q/k/v at decode
                                           ManyCase{1, 2048, {2048, 1024, 1024}, false},
                                           ManyCase{1, 2048, {4096, 512, 512}, false},
                                           // an expert's gate/up, K = 5632 leaves a tail of partial rounds
                                           ManyCase{1, 5632, {64, 64}, false},
                                           // batched decode rows: the few-token tensor-core kernel
                                           ManyCase{2, 2048, {2048, 1024, 1024}, false},
                                           ManyCase{9, 5632, {40, 17}, true}, ManyCase{32, 768, {2048}, true},
                                           ManyCase{17, 96, {33, 16}, false},
                                           // prefill, the outputs side by side in one grid: Model A's and Model
                                           // B's q/k/v (129 and 192 rows: a partly filled last row tile), a ragged
                                           // last output with bias, a middle output that is no multiple of 256
                                           // columns (two grids), four outputs (two grids)
                                           ManyCase{129, 2048, {2048, 1024, 1024}, true},
                                           ManyCase{192, 2048, {4096, 512, 512}, false},
                                           ManyCase{128, 256, {512, 256, 100}, true},
                                           ManyCase{256, 512, {256, 300, 256}, false},
                                           ManyCase{64, 128, {256, 256, 256, 256}, true}));

TEST(CudaAddRmsNorm, MatchesReference) {
  MOEX_CUDA_BACKEND_OR_SKIP(backend);
  for (int64_t rows : {1, 5, 129}) {
    for (int64_t cols : {31, 2048}) {
      std::mt19937 rng(static_cast<uint32_t>(rows * 71 + cols));
      SCOPED_TRACE(testing::Message() << "add_rms_norm(rows=" << rows << ",cols=" << cols << ")");
      auto x = random_floats(rng, static_cast<size_t>(rows * cols), 2.f);
      auto delta = random_floats(rng, static_cast<size_t>(rows * cols), 2.f);
      auto weight = random_floats(rng, static_cast<size_t>(cols));
      TensorView wd = backend->upload_weight(TensorView(weight.data(), DType::kF32, {cols}), "w");
      GuardedTensor xd(*backend, {rows, cols}), dd(*backend, {rows, cols}), od(*backend, {rows, cols});
      xd.fill(x);
      dd.fill(delta);
      backend->add_rms_norm(xd.view(), dd.view(), wd, 1e-5f, od.view());
      std::vector<double> sum(x.size()), ref(x.size());
      for (int64_t r = 0; r < rows; ++r) {
        double ss = 0;
        for (int64_t c = 0; c < cols; ++c) {
          sum[r * cols + c] = double(x[r * cols + c] + delta[r * cols + c]);
          ss += sum[r * cols + c] * sum[r * cols + c];
        }
        const double inv = 1.0 / std::sqrt(ss / cols + 1e-5);
        for (int64_t c = 0; c < cols; ++c) ref[r * cols + c] = sum[r * cols + c] * inv * weight[c];
      }
      MOEX_EXPECT_CLOSE(xd.read(), sum, 1e-7);
      MOEX_EXPECT_CLOSE(od.read(), ref, 1e-6);
    }
  }
}

// The residual step inside its consumers (decode at batch 1): norm_linear_many and norm_moe_routed against the
// Backend defaults (add, rms_norm / add_rms_norm, then the unfused op) on the same device. x must come out
// bit-identical (same additions in the same order); the normalised row differs only in the norm's reduction order.
struct ResidualCase {
  int64_t hidden, ffn, experts, top_k;
  bool first_layer;   // no pending delta (layer 0)
  bool bf16_weight;   // the norm weight stored as bf16
};

class CudaResidualNorm : public ::testing::TestWithParam<ResidualCase> {};

// A case's residual step: x, the pending delta d0, the block output d1 (host) and the norm weight on the device
// (fp32 or bf16 as the case says; both are drawn so that the random stream does not depend on it).
struct ResidualInputs {
  std::vector<float> x, d0, d1, weight;
  Bf16Weight weight_bf16;
  TensorView norm;
};

ResidualInputs make_residual_inputs(Backend& backend, const ResidualCase& c, std::mt19937& rng) {
  const int64_t h = c.hidden;
  ResidualInputs in;
  in.x = random_floats(rng, static_cast<size_t>(h), 2.f);
  in.d0 = random_floats(rng, static_cast<size_t>(h), 2.f);
  in.d1 = random_floats(rng, static_cast<size_t>(h), 2.f);
  in.weight = random_floats(rng, static_cast<size_t>(h));
  in.weight_bf16 = random_bf16(rng, Shape{h}, 1.f);
  in.norm = c.bf16_weight ? backend.upload_weight(in.weight_bf16.host_view(), "norm")
                          : backend.upload_weight(TensorView(in.weight.data(), DType::kF32, {h}), "norm");
  return in;
}

// A case's MoE layer on the device: experts (gate, up, down) and the router, random bf16.
struct MoeLayer {
  std::vector<Bf16Weight> host;
  std::vector<ExpertWeights> experts;
  Bf16Weight router_host;
  TensorView router;
};

MoeLayer upload_moe_layer(Backend& backend, const ResidualCase& c, std::mt19937& rng) {
  MoeLayer layer;
  for (int64_t e = 0; e < c.experts; ++e)
    for (Shape shape : {Shape{c.ffn, c.hidden}, Shape{c.ffn, c.hidden}, Shape{c.hidden, c.ffn}})
      layer.host.push_back(random_bf16(rng, shape, 0.05f));
  for (int64_t e = 0; e < c.experts; ++e)
    layer.experts.push_back(ExpertWeights{backend.upload_weight(layer.host[3 * e].host_view(), "gate"),
                                          backend.upload_weight(layer.host[3 * e + 1].host_view(), "up"),
                                          backend.upload_weight(layer.host[3 * e + 2].host_view(), "down")});
  layer.router_host = random_bf16(rng, {c.experts, c.hidden}, 0.5f);
  layer.router = backend.upload_weight(layer.router_host.host_view(), "router");
  return layer;
}

TEST_P(CudaResidualNorm, ConsumersMatchUnfusedOps) {
  MOEX_CUDA_BACKEND_OR_SKIP(backend);
  const ResidualCase c = GetParam();
  ASSERT_TRUE(backend->fuses_residual_norms(1)) << "MOEX_CUDA_FUSED_NORMS=0 set?";
  SCOPED_TRACE(testing::Message() << "hidden " << c.hidden << " experts " << c.experts << " first " << c.first_layer
                                  << " bf16 " << c.bf16_weight);
  std::mt19937 rng(static_cast<uint32_t>(c.hidden * 13 + c.experts + c.first_layer));
  const int64_t h = c.hidden;
  const ResidualInputs in = make_residual_inputs(*backend, c, rng);
  const auto& x = in.x;
  const auto& d0 = in.d0;
  const auto& d1 = in.d1;
  const TensorView wn = in.norm;
  GuardedTensor xf(*backend, {1, h}), xu(*backend, {1, h}), d0d(*backend, {1, h}), d1d(*backend, {1, h});
  GuardedTensor scratch(*backend, {1, h}), normed_f(*backend, {1, h}), normed_u(*backend, {1, h});
  xf.fill(x);
  xu.fill(x);
  d0d.fill(d0);
  d1d.fill(d1);
  const TensorView d0v = d0d.view(), d1v = d1d.view();
  const TensorView* pending = c.first_layer ? nullptr : &d0v;

  // q/k/v through norm_linear_many: x left alone.
  const std::vector<int64_t> outs = {h, h / 2, h / 2};
  std::vector<Bf16Weight> w;
  std::vector<TensorView> wd;
  std::vector<std::unique_ptr<GuardedTensor>> fused_y, ref_y;
  for (int64_t n : outs) {
    w.push_back(random_bf16(rng, {n, h}, 1.f / std::sqrt(float(h))));
    wd.push_back(backend->upload_weight(w.back().host_view(), "w"));
    fused_y.push_back(std::make_unique<GuardedTensor>(*backend, Shape{1, n}));
    ref_y.push_back(std::make_unique<GuardedTensor>(*backend, Shape{1, n}));
  }
  std::vector<TensorView> fv, rv;
  for (size_t i = 0; i < outs.size(); ++i) {
    fv.push_back(fused_y[i]->view());
    rv.push_back(ref_y[i]->view());
  }
  std::vector<Backend::LinearOutput> fused_out, ref_out;
  for (size_t i = 0; i < outs.size(); ++i) {
    fused_out.push_back({&wd[i], nullptr, &fv[i]});
    ref_out.push_back({&wd[i], nullptr, &rv[i]});
  }
  backend->norm_linear_many(xf.view(), pending, wn, 1e-5f, scratch.view(), fused_out);
  backend->Backend::norm_linear_many(xu.view(), pending, wn, 1e-5f, scratch.view(), ref_out);
  EXPECT_EQ(xf.read(), x) << "norm_linear_many wrote x";
  for (size_t i = 0; i < outs.size(); ++i) {
    const auto want = ref_y[i]->read();
    MOEX_EXPECT_CLOSE(fused_y[i]->read(), std::vector<double>(want.begin(), want.end()), 1e-5);
  }

  // The MoE step: x += pending + d1 and the normalised row written by the router's launch.
  const MoeLayer layer = upload_moe_layer(*backend, c, rng);
  const std::vector<ExpertWeights>& experts = layer.experts;
  const TensorView& router = layer.router;
  GuardedTensor logits(*backend, {1, c.experts}), out_f(*backend, {1, h}), out_u(*backend, {1, h});
  for (int call = 0; call < 2; ++call) {  // twice: the planner's ticket must be back at 0
    xf.fill(x);
    xu.fill(x);
    backend->norm_moe_routed(xf.view(), pending, d1v, wn, 1e-5f, normed_f.view(), router, logits.view(), c.top_k,
                             RouterScoring::kSoftmax, true, experts, out_f.view());
    backend->Backend::norm_moe_routed(xu.view(), pending, d1v, wn, 1e-5f, normed_u.view(), router, logits.view(),
                                      c.top_k, RouterScoring::kSoftmax, true, experts, out_u.view());
    EXPECT_EQ(xf.read(), xu.read()) << "residual sum, call " << call;
    const auto want_normed = normed_u.read();
    MOEX_EXPECT_CLOSE(normed_f.read(), std::vector<double>(want_normed.begin(), want_normed.end()), 1e-6);
    const auto want = out_u.read();
    MOEX_EXPECT_CLOSE(out_f.read(), std::vector<double>(want.begin(), want.end()), 1e-5);
  }
}

// The end of a forward at one row (norm_logits): the final norm inside the lm_head GEMV where the fused norm
// loops (hidden 2048: a vocabulary's rows in many rounds of the looping grid; Model B's vocabulary, and a row
// count that leaves the last round partly empty) and add_rms_norm + linear at hidden 4096, against the Backend
// default on the same device.
TEST(CudaResidualNorm, NormLogitsMatchesUnfusedOps) {
  MOEX_CUDA_BACKEND_OR_SKIP(backend);
  for (const auto& [hidden, vocab] : {std::pair<int64_t, int64_t>{2048, 151936}, {2048, 32003}, {4096, 32000}}) {
    SCOPED_TRACE(testing::Message() << "hidden " << hidden << " vocab " << vocab);
    const ResidualCase c{hidden, 0, 0, 0, false, true};
    std::mt19937 rng(static_cast<uint32_t>(vocab + hidden));
    const ResidualInputs in = make_residual_inputs(*backend, c, rng);
    Bf16Weight head = random_bf16(rng, {vocab, hidden}, 1.f / std::sqrt(float(hidden)));
    const TensorView head_d = backend->upload_weight(head.host_view(), "lm_head");
    GuardedTensor xf(*backend, {1, hidden}), xu(*backend, {1, hidden}), d0(*backend, {1, hidden});
    GuardedTensor scratch(*backend, {1, hidden}), fused(*backend, {1, vocab}), unfused(*backend, {1, vocab});
    xf.fill(in.x);
    xu.fill(in.x);
    d0.fill(in.d0);
    const TensorView d0v = d0.view();
    backend->norm_logits(xf.view(), &d0v, in.norm, 1e-6f, scratch.view(), head_d, fused.view());
    backend->Backend::norm_logits(xu.view(), &d0v, in.norm, 1e-6f, scratch.view(), head_d, unfused.view());
    const auto want = unfused.read();
    MOEX_EXPECT_CLOSE(fused.read(), std::vector<double>(want.begin(), want.end()), 1e-5);
  }
}

// The first layer's q/k/v with the token's embedding read inside the GEMV (embed_norm_linear_many: block 0 stores
// x) against the Backend default (the embedding's own launch, then norm_linear_many) on the same device: the same
// row through the same normed kernel, so x and every output must be bit-identical. bf16 and fp32 tables; hidden
// 2048 (the looping grid) and 4096 (a block per 8 rows); the first and the last token of the vocabulary.
TEST(CudaResidualNorm, EmbedNormLinearMatchesEmbeddingThenNorm) {
  MOEX_CUDA_BACKEND_OR_SKIP(backend);
  ASSERT_TRUE(backend->fuses_residual_norms(1)) << "MOEX_CUDA_FUSED_NORMS=0 set?";
  const int64_t vocab = 1001;
  for (const int64_t hidden : {int64_t{2048}, int64_t{4096}}) {
    for (const bool f32_table : {false, true}) {
      for (const int32_t token : {int32_t{0}, int32_t{vocab - 1}, int32_t{517}}) {
        SCOPED_TRACE(testing::Message() << "hidden " << hidden << " f32 table " << f32_table << " token " << token);
        std::mt19937 rng(static_cast<uint32_t>(hidden + token * 7 + f32_table));
        const ResidualInputs in = make_residual_inputs(*backend, ResidualCase{hidden, 0, 0, 0, true, true}, rng);
        Bf16Weight table_bf16 = random_bf16(rng, {vocab, hidden}, 1.f);
        GuardedTensor table_f32(*backend, {vocab, hidden});
        table_f32.fill(random_floats(rng, static_cast<size_t>(vocab * hidden), 1.f));
        const TensorView table = f32_table ? table_f32.view() : backend->upload_weight(table_bf16.host_view(), "emb");
        const std::vector<int64_t> outs = {hidden, hidden / 2, hidden / 2};
        std::vector<TensorView> wd;
        std::vector<std::unique_ptr<GuardedTensor>> fused_y, ref_y;
        std::vector<TensorView> fv, rv;
        for (int64_t n : outs) {
          Bf16Weight w = random_bf16(rng, {n, hidden}, 1.f / std::sqrt(float(hidden)));
          wd.push_back(backend->upload_weight(w.host_view(), "w"));
          fused_y.push_back(std::make_unique<GuardedTensor>(*backend, Shape{1, n}));
          ref_y.push_back(std::make_unique<GuardedTensor>(*backend, Shape{1, n}));
        }
        for (size_t i = 0; i < outs.size(); ++i) {
          fv.push_back(fused_y[i]->view());
          rv.push_back(ref_y[i]->view());
        }
        std::vector<Backend::LinearOutput> fused_out, ref_out;
        for (size_t i = 0; i < outs.size(); ++i) {  // after the views: the outputs point into fv and rv
          fused_out.push_back({&wd[i], nullptr, &fv[i]});
          ref_out.push_back({&wd[i], nullptr, &rv[i]});
        }
        GuardedTensor xf(*backend, {1, hidden}), xu(*backend, {1, hidden}), scratch(*backend, {1, hidden});
        xf.fill(in.x);  // overwritten by both paths
        xu.fill(in.x);
        const int32_t ids[1] = {token};
        backend->embed_norm_linear_many(ids, table, xf.view(), in.norm, 1e-5f, scratch.view(), fused_out);
        backend->Backend::embed_norm_linear_many(ids, table, xu.view(), in.norm, 1e-5f, scratch.view(), ref_out);
        const auto x_ref = xu.read();
        EXPECT_EQ(xf.read(), x_ref) << "x is not the embedding row";
        EXPECT_NE(x_ref, in.x) << "the reference did not embed";
        for (size_t i = 0; i < outs.size(); ++i) EXPECT_EQ(fused_y[i]->read(), ref_y[i]->read()) << "output " << i;
      }
    }
  }
}

// norm_moe_routed at one token with env set to `tested` (nullptr: the default path) against the same with env set
// to "0", on the same device: the same loops in the same orders, so x, the normalised row, the logits and the output
// must be bit-identical. Three calls each (the one-launch path's work counters must be back at 0 after every
// launch); from the second on, the output is written over the pending delta, as the decoder does (the residual sum
// must take d0 before any block writes out).
void expect_norm_moe_matches(const ResidualCase& c, Backend& backend, const char* env, const char* tested) {
  std::mt19937 rng(static_cast<uint32_t>(c.hidden * 29 + c.experts + c.first_layer));
  const int64_t h = c.hidden;
  const ResidualInputs in = make_residual_inputs(backend, c, rng);
  const TensorView wn = in.norm;
  const MoeLayer layer = upload_moe_layer(backend, c, rng);
  GuardedTensor d1d(backend, {1, h});
  d1d.fill(in.d1);
  struct Run {  // one path's buffers
    GuardedTensor x, d0, normed, logits, out;
  };
  const auto make_run = [&] {
    return std::make_unique<Run>(Run{GuardedTensor(backend, {1, h}), GuardedTensor(backend, {1, h}),
                                     GuardedTensor(backend, {1, h}), GuardedTensor(backend, {1, c.experts}),
                                     GuardedTensor(backend, {1, h})});
  };
  auto fused = make_run(), reference = make_run();
  for (int call = 0; call < 3; ++call) {
    const bool out_over_pending = call >= 1 && !c.first_layer;
    for (Run* run : {fused.get(), reference.get()}) {
      run->x.fill(in.x);
      run->d0.fill(in.d0);
      const TensorView d0v = run->d0.view(), d1v = d1d.view();
      const TensorView* pending = c.first_layer ? nullptr : &d0v;
      const TensorView out = out_over_pending ? d0v : run->out.view();
      const test::ScopedEnv path(env, run == fused.get() ? tested : "0");
      backend.norm_moe_routed(run->x.view(), pending, d1v, wn, 1e-5f, run->normed.view(), layer.router,
                              run->logits.view(), c.top_k, RouterScoring::kSoftmax, true, layer.experts, out);
    }
    SCOPED_TRACE(testing::Message() << env << "=" << (tested ? tested : "default") << " against 0, call " << call
                                    << (out_over_pending ? ", out written over the pending delta" : ""));
    EXPECT_EQ(fused->x.read(), reference->x.read()) << "residual sum";
    EXPECT_EQ(fused->normed.read(), reference->normed.read()) << "normalised row";
    EXPECT_EQ(fused->logits.read(), reference->logits.read()) << "router logits";
    if (out_over_pending) EXPECT_EQ(fused->d0.read(), reference->d0.read()) << "output over the pending delta";
    else EXPECT_EQ(fused->out.read(), reference->out.read()) << "output";
  }
}

// The top-k and the plan inside the gate/up launch (the default at one token: the router launch writes only the
// logits) against the router's own planning launch (MOEX_CUDA_TOPK_IN_GATE_UP=0).
TEST_P(CudaResidualNorm, TopkInGateUpMatchesTheRouterLaunch) {
  MOEX_CUDA_BACKEND_OR_SKIP(backend);
  expect_norm_moe_matches(GetParam(), *backend, "MOEX_CUDA_TOPK_IN_GATE_UP", nullptr);
}

// The whole MoE block after the logits in one launch (kernels/moe_one_launch.cu; forced on, as it is the default for
// 4096-wide rows only) against gate/up and down as two launches (MOEX_CUDA_MOE_ONE_LAUNCH=0).
TEST_P(CudaResidualNorm, MoeOneLaunchMatchesTwoLaunches) {
  MOEX_CUDA_BACKEND_OR_SKIP(backend);
  expect_norm_moe_matches(GetParam(), *backend, "MOEX_CUDA_MOE_ONE_LAUNCH", "1");
}

INSTANTIATE_TEST_SUITE_P(Shapes, CudaResidualNorm,
                         ::testing::Values(ResidualCase{2048, 5632, 8, 2, false, false},   // Model A
                                           ResidualCase{2048, 768, 128, 8, false, true},   // Model B, bf16 norm
                                           ResidualCase{2048, 768, 128, 8, true, false},   // layer 0
                                           ResidualCase{64, 40, 8, 2, false, false},       // a fixture's size
                                           ResidualCase{4096, 256, 8, 2, true, true}),     // 8x7B's hidden
                         [](const auto& info) { return "case" + std::to_string(info.index); });

struct RopeCase {
  int64_t tokens, heads, kv_heads, head_dim, rotary_dim;
  bool norm;
};

class CudaQkNormRope : public ::testing::TestWithParam<RopeCase> {};

// The fused kernel against Backend's default (rms_norm per head, then rope on q and on k) on the same device:
// same formulas, only the norm's reduction order differs.
TEST_P(CudaQkNormRope, MatchesUnfusedOps) {
  MOEX_CUDA_BACKEND_OR_SKIP(backend);
  const RopeCase c = GetParam();
  SCOPED_TRACE(testing::Message() << "qk_norm_rope(tokens=" << c.tokens << ",heads=" << c.heads << "/" << c.kv_heads
                                  << ",head_dim=" << c.head_dim << ",rotary=" << c.rotary_dim << ",norm=" << c.norm
                                  << ")");
  std::mt19937 rng(static_cast<uint32_t>(c.tokens * 7 + c.heads * 131 + c.head_dim + c.norm));
  auto q = random_floats(rng, static_cast<size_t>(c.tokens * c.heads * c.head_dim), 2.f);
  auto k = random_floats(rng, static_cast<size_t>(c.tokens * c.kv_heads * c.head_dim), 2.f);
  auto qn = random_floats(rng, static_cast<size_t>(c.head_dim));
  auto kn = random_floats(rng, static_cast<size_t>(c.head_dim));
  std::vector<int32_t> positions(static_cast<size_t>(c.tokens));
  std::uniform_int_distribution<int32_t> pos(0, 6000);  // angles of thousands of radians
  for (auto& p : positions) p = pos(rng);
  TensorView qnd = backend->upload_weight(TensorView(qn.data(), DType::kF32, {c.head_dim}), "q_norm");
  TensorView knd = backend->upload_weight(TensorView(kn.data(), DType::kF32, {c.head_dim}), "k_norm");
  GuardedTensor qf(*backend, {c.tokens, c.heads, c.head_dim}), kf(*backend, {c.tokens, c.kv_heads, c.head_dim});
  GuardedTensor qu(*backend, {c.tokens, c.heads, c.head_dim}), ku(*backend, {c.tokens, c.kv_heads, c.head_dim});
  qf.fill(q);
  kf.fill(k);
  qu.fill(q);
  ku.fill(k);
  backend->qk_norm_rope(qf.view(), kf.view(), c.norm ? &qnd : nullptr, c.norm ? &knd : nullptr, 1e-6f, positions,
                        c.rotary_dim, 1e6);
  backend->Backend::qk_norm_rope(qu.view(), ku.view(), c.norm ? &qnd : nullptr, c.norm ? &knd : nullptr, 1e-6f,
                                 positions, c.rotary_dim, 1e6);
  const auto qref = qu.read(), kref = ku.read();
  MOEX_EXPECT_CLOSE(qf.read(), std::vector<double>(qref.begin(), qref.end()), 1e-5);
  MOEX_EXPECT_CLOSE(kf.read(), std::vector<double>(kref.begin(), kref.end()), 1e-5);
}

INSTANTIATE_TEST_SUITE_P(Shapes, CudaQkNormRope,
                         ::testing::Values(RopeCase{1, 32, 4, 128, 128, true},   // Model B decode (Qwen3)
                                           RopeCase{1, 16, 8, 128, 128, false},  // Model A decode
                                           RopeCase{7, 4, 2, 16, 16, true}, RopeCase{3, 6, 3, 64, 32, false},
                                           RopeCase{5, 2, 1, 40, 20, true},     // head_dim not a multiple of 32
                                           RopeCase{2, 3, 1, 256, 256, true},
                                           // prefill-sized: a block per token, each warp several heads
                                           RopeCase{300, 32, 4, 128, 128, true},   // Model B
                                           RopeCase{257, 16, 8, 128, 128, false},  // Model A
                                           RopeCase{256, 6, 3, 64, 32, false}));   // the last warps idle

// Small uploads read page-locked host memory from a kernel (launch_copy_from_pinned) instead of queueing on the
// copy engine: every byte arrives, at sizes with and without a tail past the 16-byte words, and nothing past the
// end is written.
TEST(CudaCopyFromPinned, CopiesEveryByteAndNothingMore) {
  if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  for (size_t bytes : {size_t{1}, size_t{15}, size_t{16}, size_t{17}, size_t{4101}, size_t{262144}, size_t{1} << 22}) {
    SCOPED_TRACE(bytes);
    cuda::PinnedMemory host(bytes);
    cuda::DeviceMemory device(bytes + 64);
    auto* src = static_cast<unsigned char*>(host.get());
    for (size_t idx = 0; idx < bytes; ++idx) src[idx] = static_cast<unsigned char>(idx * 131 + 7);
    ASSERT_EQ(cudaMemset(device.get(), 0xAB, bytes + 64), cudaSuccess);
    cuda::launch_copy_from_pinned(host.get(), device.get(), bytes, nullptr);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    std::vector<unsigned char> back(bytes + 64);
    ASSERT_EQ(cudaMemcpy(back.data(), device.get(), bytes + 64, cudaMemcpyDeviceToHost), cudaSuccess);
    size_t wrong = 0;
    for (size_t idx = 0; idx < bytes; ++idx) wrong += back[idx] != src[idx];
    EXPECT_EQ(wrong, 0u);
    for (size_t idx = bytes; idx < bytes + 64; ++idx) EXPECT_EQ(back[idx], 0xAB) << "written past the end at " << idx;
  }
}

// The A/B switches' integer reader: a value, the fallback when unset, and a mistyped value reported and ignored.
TEST(CudaEnvSwitch, IntegerSwitchesReportWhatTheyIgnore) {
  const char* name = "MOEX_CUDA_TEST_SWITCH";
  unsetenv(name);
  EXPECT_EQ(cuda::env_int(name, -1), -1);
  setenv(name, "3", 1);
  EXPECT_EQ(cuda::env_int(name, -1), 3);
  for (const char* bad : {"two", "2x", "-1", "99999999"}) {
    setenv(name, bad, 1);
    ::testing::internal::CaptureStderr();
    EXPECT_EQ(cuda::env_int(name, -1), -1) << bad;
    const std::string err = ::testing::internal::GetCapturedStderr();
    EXPECT_NE(err.find(std::string("ignoring MOEX_CUDA_TEST_SWITCH=\"") + bad + "\""), std::string::npos) << err;
  }
  unsetenv(name);
}

}  // namespace
}  // namespace moex::cuda_test
