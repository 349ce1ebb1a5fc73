// The generic MoE decoder: runs any registered family's layer recipe (pre-norm GQA attention with
// RoPE and optional q/k norm, then a dense or MoE SwiGLU block with an optional shared expert) on a
// Backend, asking an ExpertProvider for expert weights. The paged KV cache lives here: a step runs one
// sequence's tokens (prefill), or one token of each of several sequences (batched decode).
#pragma once

#include <memory>
#include <span>
#include <vector>

#include "moex/backend/backend.h"
#include "moex/model/kv_cache.h"
#include "moex/model/model_config.h"
#include "moex/model/model_weights.h"
#include "moex/moe/expert_provider.h"

namespace moex {

// Receives each MoE layer's router output during forward() (for `moex logits --router`, traces,
// predictors). router_logits is host fp32 [num_tokens, num_experts].
class RouterObserver {
 public:
  virtual ~RouterObserver() = default;
  virtual void on_router(int32_t moe_layer_idx, int64_t start_pos, std::span<const float> router_logits,
                         const Routing& routing) = 0;
  // Pre-gating, for observers that ask for it: target_moe_layer_idx's router applied to the hidden states
  // that entered the previous MoE layer's router (host fp32 [num_tokens, num_experts]), delivered right
  // after that layer's on_router. What a pre-gating predictor sees one layer ahead (trace recording).
  virtual bool wants_pregate() const { return false; }
  virtual void on_pregate(int32_t target_moe_layer_idx, int64_t start_pos, std::span<const float> logits) {
    (void)target_moe_layer_idx, (void)start_pos, (void)logits;
  }
};

// Replaces the router's choice on the host before the experts are fetched and run: a benchmark replays
// recorded routing (a published trace) through the real engine, so that the expert cache, the predictors and
// the copies see real routing on random weights. The decoder routes on the host while one is set.
class RoutingOverride {
 public:
  virtual ~RoutingOverride() = default;
  // routing: the router's choice for the step's rows at positions start_pos, start_pos + 1, ... of one
  // sequence; rewrite its ids and weights in place (same num_tokens and top_k).
  virtual void override_routing(int32_t moe_layer_idx, int64_t start_pos, Routing* routing) = 0;
};

struct KvCacheOptions {
  int64_t page_size = 32;  // positions per page; 32 = one key tile of the CUDA attention kernel
  int64_t max_pages = 0;   // 0: the pools grow without limit
};

class Decoder {
 public:
  // Uploads the non-expert weights to the backend. cfg, weights, backend and experts must outlive it.
  // embedding_on_host: the token embedding goes to Backend::map_host_weight instead (a step reads one row of it),
  // unless the lm_head is the same matrix (read whole every step). Offloading sets it: the device memory the
  // table would take holds experts instead.
  Decoder(const ModelConfig& cfg, const ModelWeights& weights, Backend& backend, ExpertProvider& experts,
          const KvCacheOptions& kv = {}, bool embedding_on_host = false);
  // A CPU backend for experts the provider hands over as host views (CPU execution of missed experts
  // while the main backend is a GPU). Not owned; must outlive the decoder.
  void set_host_backend(Backend* host_backend) { host_backend_ = host_backend; }
  // nullptr: the router's own choice (the default). Not owned; must outlive its use.
  void set_routing_override(RoutingOverride* routing_override) { routing_override_ = routing_override; }
  ~Decoder();

  // Grows the KV cache to hold num_tokens tokens over all sequences without growing during later steps.
  void reserve(int64_t num_tokens);
  KvCache& kv_cache() { return *kv_; }

  // A new empty sequence for forward_sequence/forward_batch; free_sequence returns its pages.
  int32_t add_sequence();
  void free_sequence(int32_t seq);

  // Runs ids at positions [start_pos, start_pos + ids.size()) of sequence seq, whose cached positions from
  // start_pos on are replaced (start_pos <= its length, else UsageError). When logits is given it receives fp32
  // rows of vocab_size: every position when all_logits, else the last only.
  void forward_sequence(int32_t seq, std::span<const int32_t> ids, int64_t start_pos, bool all_logits,
                        std::vector<float>* logits, RouterObserver* observer = nullptr);
  // forward_sequence() on the decoder's own sequence (one sequence at a time).
  void forward(std::span<const int32_t> ids, int64_t start_pos, bool all_logits, std::vector<float>* logits,
               RouterObserver* observer = nullptr);

  // One token of each of several distinct sequences, run together; row i of logits ([steps, vocab]) is steps[i]'s.
  // A step's position is its sequence's length (or less, replacing the positions from there on).
  struct DecodeStep {
    int32_t seq = 0;
    int32_t token = 0;
    int64_t position = 0;
  };
  // With picked_ids: when the backend picks on its device (Backend::argmax_rows without draws, greedy;
  // Backend::sample_rows with draws[i] for row i), *picked_ids receives each row's pick, the logits are not read
  // back, and the call returns true; otherwise the logits are read back as without it and the call returns false
  // (the caller picks on the host, with the same draws).
  bool forward_batch(std::span<const DecodeStep> steps, std::vector<float>* logits,
                     std::vector<int32_t>* picked_ids = nullptr, std::span<const TokenDraw> draws = {});
  // Tells the expert provider that the current sequence ended (per-request predictors and policies).
  void end_sequence();

  // Decoding of the decoder's own sequence with its steps chained on the device (Backend::pick_token): the host
  // enqueues step t+1 before it has read step t's token. Possible when the backend chains steps, picks such draws
  // (greedy, or sampled where Backend::samples_on_device) and a step needs nothing from the host (routing on the
  // device: every expert resident, no lookahead).
  bool can_chain_steps(bool sampled) const;
  // Enqueues the step of token at position (the sequence's length, or less) and the pick of draw from its logits,
  // and returns without waiting. token = Backend::kTokenOnDevice takes the previous enqueued step's pick.
  void enqueue_step(int32_t token, int64_t position, const TokenDraw& draw);
  // The oldest enqueued step's pick; waits for it.
  int32_t next_token();

  // Batched decoding chained the same way (Backend::pick_rows): the host enqueues step t+1 of the same sequences
  // before it has read step t's picks. Possible when the backend chains batches of this many rows, picks such
  // draws (greedy, or sampled where Backend::samples_on_device) and a step needs nothing from the host (routing on
  // the device).
  bool can_chain_batches(int64_t rows, bool sampled) const;
  // Enqueues the batched step (as forward_batch) and the pick of each row (draws[i] for row i as forward_batch;
  // greedy without draws), and returns without waiting. The tokens may all be Backend::kTokenOnDevice: then they are
  // the picks of the previous enqueued batch, which must have had the same sequences in the same order.
  void enqueue_batch(std::span<const DecodeStep> steps, std::span<const TokenDraw> draws = {});
  // The oldest enqueued batch's picks, one per row; waits for them.
  void next_batch_tokens(std::span<int32_t> ids);

 private:
  struct DeviceLayer;
  TensorView scratch(int slot, Shape shape);
  void check_token(int32_t id) const;
  // Grows sequence seq to start_pos + n positions (start_pos <= its length, else UsageError) and fills row_seq_,
  // positions_ and tables_ for its n rows from start_pos; returns the table stride.
  int64_t prepare_rows(int32_t seq, int64_t start_pos, int64_t n);
  // Checks a batched step (UsageError: a token out of range, a position past a sequence's end, a sequence twice),
  // grows each sequence by its row and fills row_seq_, positions_, tables_ and ids_; returns the table stride.
  // tokens_on_device: the tokens are the previous chained batch's picks (not checked here).
  int64_t prepare_batch(std::span<const DecodeStep> steps, bool tokens_on_device);
  // Whether a step may route on the backend's device (no expert ids on the host): see run_step.
  bool routes_on_device(const RouterObserver* observer) const;
  // Enqueues ids as rows of kv_step_ (built from row_seq_, positions_, tables_): one decode step of a single row
  // routed on the device goes through Backend::decode_step (recordable), a batched one (rows_are_sequences: row i
  // the next token of sequence i, forward_batch) through Backend::decode_rows_step; the lm head runs when
  // want_logits. With pick (a single row only), Backend::decode_step_with_pick: the step and the pick of *pick from
  // its logits.
  void launch_step(std::span<const int32_t> ids, int64_t start_pos, int64_t table_stride, bool all_logits,
                   bool want_logits, RouterObserver* observer, const TokenDraw* pick = nullptr,
                   bool rows_are_sequences = false);
  // launch_step(), then reads logits back.
  // With picked_ids (and draws), as forward_batch. Returns whether picked_ids were filled on the device.
  bool run_step(std::span<const int32_t> ids, int64_t start_pos, int64_t table_stride, bool all_logits,
                std::vector<float>* logits, RouterObserver* observer, std::vector<int32_t>* picked_ids = nullptr,
                std::span<const TokenDraw> draws = {}, bool rows_are_sequences = false);
  // The step's ops from embedding to the lm head (left in the kLogits scratch when want_logits).
  void run_layers(std::span<const int32_t> ids, int64_t start_pos, std::span<const int32_t> positions,
                  bool all_logits, bool want_logits, bool device_routing, RouterObserver* observer);
  void swiglu(const TensorView& x, const ExpertWeights& mlp, int64_t ffn, const TensorView& out);
  // routing_'s experts on h into out, in waves when the provider cannot hold them all at once.
  void run_experts(int32_t moe_layer_idx, const TensorView& h, const TensorView& out);
  // Feeds the provider the next MoE layers' router logits on the last token of h.
  void pregate(int32_t moe_layer_idx, const TensorView& h);
  // One wave of experts from expert_table_, after the enqueued expert copies named by `copies`
  // (Backend::enqueued_copy_ticket); those given as host views, and the host rows of split experts, run on
  // host_backend_ while the backend copies and runs the rest.
  void moe_wave(const Routing& wave, const TensorView& h, const TensorView& out, uint64_t copies);
  // Moves the entries of pending_ whose expert `table` holds into *wave (the others become -1 there, the moved
  // ones -1 in pending_). Returns whether pending_ has entries left.
  bool take_wave(const std::vector<ExpertWeights>& table, Routing* wave);

  const ModelConfig& cfg_;
  const ModelWeights& host_;
  Backend& backend_;
  ExpertProvider& experts_;
  TensorView embed_, final_norm_, lm_head_;
  std::vector<DeviceLayer> layers_;
  std::unique_ptr<KvCache> kv_;
  int32_t default_seq_ = 0;
  // The current step: kv_step_ points into row_seq_, positions_ and tables_; ids_ holds forward_batch tokens.
  std::vector<int32_t> row_seq_, positions_, tables_, ids_;
  std::vector<int32_t> chained_seqs_;  // the sequences of the last enqueue_batch, in row order
  KvStep kv_step_;
  std::vector<std::unique_ptr<Buffer>> scratch_;
  std::vector<ExpertWeights> expert_table_;
  Routing routing_, pending_, wave_;
  // A streamed layer's next wave, acquired (its copies enqueued) before the current one runs.
  std::vector<ExpertWeights> next_table_;
  Routing next_wave_;
  std::vector<float> router_host_, lookahead_host_;
  std::vector<int32_t> moe_layers_;  // layer index of each MoE layer
  // Every layer is an MoE layer without a shared expert and q/k/v are not clamped: at batch 1 the residual
  // norms can ride in their consumers (Backend::fuses_residual_norms).
  bool norms_fusable_ = true;
  Backend* host_backend_ = nullptr;
  RoutingOverride* routing_override_ = nullptr;
  Routing host_wave_, device_wave_;
  std::vector<float> h_host_, out_host_;
  // Split experts (ExpertProvider::split_experts): their entries in the wave, the weight-scaled input of
  // their up rows, and the host's gate/up rows of each.
  std::vector<int64_t> split_entries_;
  std::vector<float> split_x_host_, split_act_host_;
};

}  // namespace moex
