// parallel/model/decoder.h — a whole decoder model (embedding, layers, final norm,
// LM head) on the cpu in fp32: logits for inference, loss + gradients for training,
// and incremental decoding with a KV cache.
//
//   model_weights w = model_weights::load(dir);
//   decoder dec(w);
//   tensor logits = dec.forward_logits(ids, B, T);                  // (B, T, V)
//   model_weights g = model_weights::zeros_like(w);
//   float loss = dec.forward_backward(ids, targets, B, T, g);       // g += dloss/dw
//   fb_options o{.loss_denominator = global_tokens, .grads_ready = [&](int64_t grp) { start_allreduce(grp); }};
//   float part = dec.forward_backward(ids, targets, B, T, g, o);   // sum(losses)/global_tokens
//   dec.set_context_parallel(&cp);                                  // (B, T) is now this rank's chunk
//   kv_cache cache(w.config(), B, T + 16);
//   tensor last = dec.forward_cached(ids, B, T, cache);             // (B, V), then 1 token/step
//
// Invariants:
//   1. ids, targets: (B, T) int32, row-major; ids in [0, V) (else errc::out_of_range).
//      A target < 0 is ignored; the loss is the mean over the others (0 when there are none,
//      and then no gradient is added).
//   2. forward_backward never materialises the (B*T, V) logits: the LM head and the
//      cross-entropy run fused and chunked (kernels::cpu::classifier_forward_backward).
//   3. Gradients are accumulated (+=) into `grads`, a set with the same names and shapes;
//      tied embeddings receive the embedding and the LM-head gradient.
//   4. The per-layer saved activations of the last forward_backward/forward_loss stay in
//      saved() (layer_activations, the MEMO hook) until the next call; not with
//      fb_options::arena, nor forward_loss with fb_options::keep_activations = false.
//   5. forward_cached(x) over a cache holding a prefix gives the same logits (fp32 rounding
//      aside) as forward_logits over prefix+x at the new positions.
//   6. The decoder keeps a reference to the weights: they must outlive it.
//   7. fb_options::loss_denominator > 0 replaces the count of valid targets: the loss is
//      sum(losses)/denominator and the gradient d(sum)/denominator (so micro batches and ranks
//      simply add up to the global mean's gradient).
//   8. fb_options::grads_ready is called on the calling thread exactly once per group and call,
//      in the order grad_group::head, layers L-1 .. 0, grad_group::embedding, each as soon as
//      that group's gradients are final for this call (also when no gradient was added);
//      grad_group_tensors() names each group's tensors.
//   9. With set_context_parallel (parallel/cp/context_parallel.h), ids/targets are this rank's
//      contiguous chunk of T tokens of each sequence, at positions [rank*T, rank*T + T) (RoPE
//      tables for those, scaled for the full length T*size). Only attention talks to the other
//      ranks; saved() holds the local chunk only. The returned loss is this rank's
//      sum(losses)/denominator (callers add it over the CP ranks; pass loss_denominator, or each
//      rank divides by its own count) and grads get this rank's contribution (callers all-reduce
//      over dp*cp ranks). Every CP rank must call, also with no valid target. forward_cached is
//      rejected (errc::unsupported).
//  10. With fb_options::memo, the layers it swaps hold no tensors in saved() after the call (their
//      activations live in the swap engine's host buffers and rounding buffers).
#pragma once
#include <cstdint>
#include <functional>
#include <vector>

#include "parallel/model/decoder_layer.h"
#include "parallel/model/kv_cache.h"
#include "parallel/model/model_weights.h"

namespace troupe::parallel {

struct context_parallel;
namespace memo {
class memo_swap;
class step_arena;
}

// The parameter groups fb_options::grads_ready reports: a layer index >= 0, or one of these.
namespace grad_group {
inline constexpr int64_t head = -1;       // final norm (+ lm_head when untied)
inline constexpr int64_t embedding = -2;  // embedding (+ the LM head's gradient when tied)
}  // namespace grad_group

struct fb_options {
  // 0 = this call's valid targets (today's behaviour). Otherwise the loss is sum(losses)/loss_denominator
  // and the gradient is d(sum of losses)/loss_denominator: the trainer passes the global batch's token count
  // so that gradients summed over micro batches and ranks are exactly the global mean's gradient.
  double loss_denominator = 0;
  // Called on the calling thread as soon as a parameter group's gradients are final for this call:
  //   grad_group::head (final norm + lm_head when untied) right after their backward,
  //   then layer l for l = L-1 .. 0 after that layer's backward,
  //   then grad_group::embedding (embedding, + lm_head when tied) last.
  // The trainer starts the data-parallel all-reduce of that bucket from it (overlap with backward).
  // group: layer index >= 0, or grad_group::head / ::embedding
  std::function<void(int64_t group)> grads_ready = nullptr;
  // MEMO activation swapping + recomputation (parallel/memo/swap.h) for forward_backward; nullptr = off.
  // Gradients and loss are bitwise those of memo off. Not used by forward_loss.
  memo::memo_swap* memo = nullptr;
  // MEMO's step arena (parallel/memo/arena.h) for forward_backward; nullptr = the heap. While set, every
  // activation and transient of the call comes from it (runtime::allocator_scope), the layers' phases
  // are marked in it, and no activation outlives the call (saved() is empty afterwards).
  memo::step_arena* arena = nullptr;
  // forward_loss only: false keeps one layer's activations at a time and leaves saved() empty
  // (validation under a memory budget); true keeps them all in saved().
  bool keep_activations = true;
};

// RoPE cos/sin tables (T x rotary_dim/2 each) of positions [pos0, pos0 + T) in a sequence of seq_len
// positions (YaRN and llama3 scaling depend on it), as the decoder uses them. -> rotary_dim
int64_t rope_tables(const model_config& c, int64_t pos0, int64_t T, int64_t seq_len, std::vector<float>* cos,
                    std::vector<float>* sin);

// The tensors of `w` (a gradient set) in group `group`, in parameters() order; handles share storage.
std::vector<runtime::tensor> grad_group_tensors(const model_weights& w, int64_t group);

class decoder {
 public:
  explicit decoder(const model_weights& w);

  const model_weights& weights() const { return *w_; }
  const model_config& config() const { return w_->config(); }

  // ids: (B, T)  ->  logits: (B, T, V)
  runtime::tensor forward_logits(const int32_t* ids, int64_t B, int64_t T) const;
  // ids: i32 or i64 tensor (B, T)
  runtime::tensor forward_logits(const runtime::tensor& ids) const;
  // ids: (B, T) new tokens appended to `cache`  ->  logits of each sequence's last token (B, V)
  runtime::tensor forward_cached(const int32_t* ids, int64_t B, int64_t T, kv_cache& cache) const;

  // -> mean loss; grads +=
  float forward_backward(const int32_t* ids, const int32_t* targets, int64_t B, int64_t T, model_weights& grads);
  // -> sum(losses) / (opt.loss_denominator or the valid count); grads +=; opt.grads_ready per group
  float forward_backward(const int32_t* ids, const int32_t* targets, int64_t B, int64_t T, model_weights& grads,
                         const fb_options& opt);
  // -> mean loss (no gradient); saved() holds the activations
  float forward_loss(const int32_t* ids, const int32_t* targets, int64_t B, int64_t T);
  // -> sum(losses) / (opt.loss_denominator or the valid count); grads_ready is not used
  float forward_loss(const int32_t* ids, const int32_t* targets, int64_t B, int64_t T, const fb_options& opt);

  // Context parallelism for forward_backward / forward_loss / forward_logits (nullptr = off).
  // `cp` must outlive its use; checks the heads against its mode (errc::invalid_argument).
  void set_context_parallel(const context_parallel* cp);
  const context_parallel* context_parallelism() const { return cp_; }
  // Expert parallelism: MoE layers run through `moe` (parallel/ep/ep_runner.h); nullptr = this rank
  // alone. Every rank of its group must run the same calls (forward, forward_loss, forward_backward).
  void set_expert_parallel(moe_runner* moe) { moe_ = moe; }
  moe_runner* expert_parallelism() const { return moe_; }

  const std::vector<layer_activations>& saved() const { return saved_; }

 private:
  // Embedding + layers + final norm of T tokens at positions [pos0, pos0+T). -> h: (N, C)
  // With `save`, per-layer activations go to saved_ and the final norm's to final_*.
  runtime::tensor run(const int32_t* ids, int64_t B, int64_t T, kv_cache* cache,
                      std::vector<layer_activations>* save, runtime::tensor* x_final, runtime::tensor* rstd_final,
                      std::vector<float>* cos, std::vector<float>* sin, memo::memo_swap* memo = nullptr,
                      memo::step_arena* arena = nullptr) const;
  float forward_backward_step(const int32_t* ids, const int32_t* targets, int64_t B, int64_t T,
                              model_weights& grads, const fb_options& opt);

  attention_geom geom(int64_t B, int64_t T, int64_t rotary_dim) const;
  double denominator(const fb_options& opt, int64_t n_valid, const char* where) const;

  const model_weights* w_;
  const context_parallel* cp_ = nullptr;
  moe_runner* moe_ = nullptr;
  std::vector<layer_activations> saved_;
};

// targets[b, t] = ids[b, t+1], and -1 (ignored) at t = T-1: HF's causal-LM labels=input_ids.
std::vector<int32_t> shift_targets(const std::vector<int32_t>& ids, int64_t B, int64_t T);

}  // namespace troupe::parallel
